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
//!   write, zeroes, trim, flush ──► a Private device's: to its server, on this task
//!                                  a Standard device's: the local stack (pipeline::Local), on the
//!                                  blocking pool; a write to part of a chunk the
//!                                  cache lacks first reads the rest of that chunk
//!                                  as a read does, and writes it whole
//! ```
//!
//! So the network is only ever waited on from the agent's tasks: the cache
//! (an `image::Disk`) never reads its base itself.

use std::io;
use std::mem::MaybeUninit;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use vstream_image::{Disk, LocalRead, CHUNK};
use vstream_pipeline::{Backend, Extent, Local, WriteError};

use crate::remote::Remote;

/// The device's disk: the local stack for what the device wrote (a [`Disk`]
/// whose base is `remote`), wrapped so that its base runs are read here.
pub struct Streamed {
    pub local: Arc<Local>,
    pub remote: Arc<Remote>,
    /// Partial writes to chunks the cache lacks take the lock of their
    /// chunk's stripe: one read-modify-write of a chunk at a time.
    stripes: Vec<tokio::sync::Mutex<()>>,
}

const STRIPES: u64 = 64;

/// The chunks at the two ends of `[offset, end)` that it covers only in part
/// and that `disk` does not hold: writing those needs the base's bytes.
/// None for a disk without layers of its own: its writes go to its server
/// as they are (a Private device's).
fn unheld_edges(disk: &Disk, offset: u64, end: u64) -> Vec<u64> {
    let mut edges = Vec::new();
    if offset >= end || disk.layers().is_empty() {
        return edges;
    }
    for c in [offset / CHUNK, (end - 1) / CHUNK] {
        let (start, stop) = (c * CHUNK, ((c + 1) * CHUNK).min(disk.size()));
        let whole = offset <= start && end >= stop;
        if !whole && !disk.holds(c) && !edges.contains(&c) {
            edges.push(c);
        }
    }
    edges
}

impl Streamed {
    /// A device whose writes belong to its server (Private mode): no cache,
    /// every write goes to the server as it is.
    fn stays(&self) -> bool {
        self.local.disk().layers().is_empty()
    }

    /// The checks a write makes before it leaves for the server.
    fn check_write(&self, offset: u64, len: u64) -> Result<(), WriteError> {
        if !self.local.is_writable() {
            return Err(WriteError::ReadOnly);
        }
        if !self.local.in_range(offset, len) {
            return Err(WriteError::OutOfRange);
        }
        Ok(())
    }

    pub fn new(local: Arc<Local>, remote: Arc<Remote>) -> Streamed {
        Streamed {
            local,
            remote,
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
        }
    }

    /// Writes `data` at `offset`. The chunks at its ends that it covers in
    /// part and the cache lacks are read first (the base's bytes, from the
    /// server, on this task) and written whole with it, so the cache never
    /// has to read its base itself.
    async fn write_filled(
        self: Arc<Self>,
        data: Bytes,
        offset: u64,
        fua: bool,
    ) -> Result<(), WriteError> {
        let disk = self.local.disk().clone();
        let len = data.len() as u64;
        if !disk.is_writable() || !disk.in_range(offset, len) {
            // The local stack gives the error.
            return self.local.clone().write(data, offset, fua).await;
        }
        let end = offset + len;
        let edges = unheld_edges(&disk, offset, end);
        if edges.is_empty() {
            return self.local.clone().write(data, offset, fua).await;
        }
        let mut stripes: Vec<u64> = edges.iter().map(|c| c % STRIPES).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut guards = Vec::with_capacity(stripes.len());
        for s in stripes {
            guards.push(self.stripes[s as usize].lock().await);
        }
        // Again under the locks: another write may have filled them meanwhile.
        let edges = unheld_edges(&disk, offset, end);
        let chunk_end = |c: u64| ((c + 1) * CHUNK).min(disk.size());
        let lo = edges.iter().map(|c| c * CHUNK).fold(offset, u64::min);
        let hi = edges.iter().map(|&c| chunk_end(c)).fold(end, u64::max);
        let mut whole = vec![0u8; (hi - lo) as usize];
        for &c in &edges {
            let start = c * CHUNK;
            let n = (chunk_end(c) - start) as u32;
            let old = self.clone().read_both(start, n, 0).await?;
            whole[(start - lo) as usize..][..n as usize].copy_from_slice(&old);
        }
        whole[(offset - lo) as usize..][..data.len()].copy_from_slice(&data);
        let written = self.local.clone().write(Bytes::from(whole), lo, fua).await;
        drop(guards);
        written
    }

    /// Zeroes a range: its whole chunks in the cache as the cache does it,
    /// its partial ends as writes of zeros (see [`Streamed::write_filled`]).
    async fn zero_filled(
        self: Arc<Self>,
        offset: u64,
        len: u64,
        fua: bool,
        punch: bool,
    ) -> Result<(), WriteError> {
        let disk = self.local.disk().clone();
        let end = offset.saturating_add(len);
        if !disk.is_writable()
            || !disk.in_range(offset, len)
            || unheld_edges(&disk, offset, end).is_empty()
        {
            return self
                .local
                .clone()
                .write_zeroes(offset, len, fua, punch)
                .await;
        }
        let first = offset.div_ceil(CHUNK) * CHUNK;
        let last = if end == disk.size() {
            end
        } else {
            end / CHUNK * CHUNK
        };
        if first >= last {
            let zeros = Bytes::from(vec![0u8; len as usize]);
            return self.write_filled(zeros, offset, fua).await;
        }
        if offset < first {
            let zeros = Bytes::from(vec![0u8; (first - offset) as usize]);
            self.clone().write_filled(zeros, offset, false).await?;
        }
        if last < end {
            let zeros = Bytes::from(vec![0u8; (end - last) as usize]);
            self.clone().write_filled(zeros, last, false).await?;
        }
        self.local
            .clone()
            .write_zeroes(first, last - first, fua, punch)
            .await
    }

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
        if self.stays() {
            return Box::pin(async move {
                self.check_write(offset, data.len() as u64)?;
                let written = self.remote.write_at(&data, offset, fua).await;
                written.map_err(WriteError::from_answer)
            });
        }
        Box::pin(self.write_filled(data, offset, fua))
    }
    fn write_zeroes(
        self: Arc<Self>,
        offset: u64,
        len: u64,
        fua: bool,
        punch: bool,
    ) -> BoxFuture<'static, Result<(), WriteError>> {
        if self.stays() {
            return Box::pin(async move {
                self.check_write(offset, len)?;
                let zeroed = self.remote.zero_at(offset, len, fua, punch).await;
                zeroed.map_err(WriteError::from_answer)
            });
        }
        Box::pin(self.zero_filled(offset, len, fua, punch))
    }
    fn trim(
        self: Arc<Self>,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> BoxFuture<'static, Result<(), WriteError>> {
        if self.stays() {
            return Box::pin(async move {
                self.check_write(offset, len)?;
                let trimmed = self.remote.trim_at(offset, len, fua).await;
                trimmed.map_err(WriteError::from_answer)
            });
        }
        self.local.clone().trim(offset, len, fua)
    }
    fn flush(self: Arc<Self>) -> BoxFuture<'static, io::Result<()>> {
        if self.stays() {
            return Box::pin(async move { self.remote.flush_at().await });
        }
        self.local.clone().flush()
    }
    fn extents(&self, offset: u64, len: u64, max: usize) -> Vec<Extent> {
        self.local.extents(offset, len, max)
    }
}
