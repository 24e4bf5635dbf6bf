//! The agent's storage pipeline: the device's write cache (a stack of local
//! layers, or none for a device whose writes belong to its server) over the
//! base streamed from the farm, as one [`Backend`] for the front door.
//!
//! ```text
//!   read  ──► try_read: the cache's runs, from the page cache; a base run never
//!             │ no
//!             ▼
//!         read: the cache's runs (on the blocking pool if not in the page cache),
//!               then each base run from the server (remote.rs), on this task;
//!               a read wholly of the base is the server's reply itself, no copy
//!   write, zeroes, trim, flush ──► the local stack (pipeline::Local), on the
//!                                  blocking pool
//! ```

use std::io;
use std::mem::MaybeUninit;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use vstream_image::LocalRead;
use vstream_pipeline::{Backend, Extent, Local, WriteError};

use crate::remote::Remote;

/// The device's disk: the local stack for what the device wrote (a [`Disk`]
/// whose base is `remote`), wrapped so that its base runs are read here.
pub struct Streamed {
    pub local: Arc<Local>,
    pub remote: Arc<Remote>,
}

impl Streamed {
    /// `len` bytes at `offset` after `headroom` zero bytes: the cache's runs
    /// from the disk, the base's from the server.
    async fn read_both(
        self: Arc<Self>,
        offset: u64,
        len: u32,
        headroom: usize,
    ) -> io::Result<Vec<u8>> {
        let n = len as usize;
        let mut out = Vec::with_capacity(headroom + n);
        out.resize(headroom, 0);
        let disk = self.local.disk();
        let local = disk.read_local(&mut out.spare_capacity_mut()[..n], offset, true)?;
        let missing = match local {
            LocalRead::Done => Vec::new(),
            LocalRead::Missing(runs) => runs,
            LocalRead::WouldBlock => {
                // A cache run is not in the page cache: read the cache's runs
                // where blocking is allowed, then the base's here.
                let disk = disk.clone();
                let (back, local) = tokio::task::spawn_blocking(move || {
                    let local = disk.read_local(&mut out.spare_capacity_mut()[..n], offset, false);
                    (out, local)
                })
                .await
                .map_err(|e| io::Error::other(format!("a cache read failed: {e}")))?;
                out = back;
                match local? {
                    LocalRead::Done => Vec::new(),
                    LocalRead::Missing(runs) => runs,
                    LocalRead::WouldBlock => {
                        return Err(io::Error::other("a blocking cache read would block"))
                    }
                }
            }
        };
        if missing.len() == 1 && missing[0] == (offset, u64::from(len)) {
            // All of it is the base's: the server's reply, read with the same
            // headroom, becomes the answer as it is.
            return self.remote.read_at(offset, len, headroom).await;
        }
        for (at, run) in missing {
            let data = self.remote.read_at(at, run as u32, 0).await?;
            if data.len() as u64 != run {
                return Err(io::Error::other("short read from the base"));
            }
            let dst = &mut out.spare_capacity_mut()[(at - offset) as usize..][..run as usize];
            // SAFETY: `dst` is `run` bytes of spare capacity and `data` holds `run` bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    data.as_ptr(),
                    dst.as_mut_ptr().cast::<u8>(),
                    data.len(),
                )
            };
        }
        // SAFETY: read_local wrote every byte outside the missing runs, and
        // the loop above wrote every missing run.
        unsafe { out.set_len(headroom + n) };
        Ok(out)
    }
}

/// Everything but a read that must wait is the local stack's.
impl Backend for Streamed {
    fn size(&self) -> u64 {
        self.local.size()
    }
    fn is_writable(&self) -> bool {
        self.local.is_writable()
    }
    fn try_read(&self, buf: &mut [MaybeUninit<u8>], offset: u64) -> io::Result<bool> {
        // A base run is never read here: it waits on the network.
        self.local.try_read(buf, offset)
    }
    fn read(
        self: Arc<Self>,
        offset: u64,
        len: u32,
        headroom: usize,
    ) -> BoxFuture<'static, io::Result<Vec<u8>>> {
        Box::pin(self.read_both(offset, len, headroom))
    }
    fn write(
        self: Arc<Self>,
        data: Bytes,
        offset: u64,
        fua: bool,
    ) -> BoxFuture<'static, Result<(), WriteError>> {
        self.local.clone().write(data, offset, fua)
    }
    fn write_zeroes(
        self: Arc<Self>,
        offset: u64,
        len: u64,
        fua: bool,
        punch: bool,
    ) -> BoxFuture<'static, Result<(), WriteError>> {
        self.local.clone().write_zeroes(offset, len, fua, punch)
    }
    fn trim(
        self: Arc<Self>,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> BoxFuture<'static, Result<(), WriteError>> {
        self.local.clone().trim(offset, len, fua)
    }
    fn flush(self: Arc<Self>) -> BoxFuture<'static, io::Result<()>> {
        self.local.clone().flush()
    }
    fn extents(&self, offset: u64, len: u64, max: usize) -> Vec<Extent> {
        self.local.extents(offset, len, max)
    }
}
