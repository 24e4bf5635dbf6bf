//! A write cache over a lower backend, the way nbdkit's cow filter stacks
//! over a plugin: what the device wrote is the cache's (a [`Local`] stack
//! of layers made [`Disk::over_lower`]), everything else the lower
//! backend's (the agent's remote base, with failover).
//!
//! ```text
//!   read  ──► try_read: the cache's runs, from the page cache; a lower run never
//!             │ no
//!             ▼
//!         read: none of it cached: the lower backend's reply itself, no copy;
//!               else the cache's runs (on the blocking pool if not in the page
//!               cache), then each lower run from the lower backend, on this task
//!   write, zeroes, trim, flush ──► the cache, on the blocking pool; a write to
//!                                  part of a chunk the cache lacks first reads the
//!                                  rest of that chunk as a read does, and writes
//!                                  it whole
//! ```
//!
//! So the lower backend is only ever waited on from the caller's tasks: the
//! cache never reads it itself.

use std::io;
use std::mem::MaybeUninit;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use vstream_image::{Disk, LocalRead, CHUNK};

use crate::{Backend, Extent, Local, WriteError};

/// A write cache over a lower backend.
pub struct Overlay {
    cache: Arc<Local>,
    lower: Arc<dyn Backend>,
    /// Partial writes to chunks the cache lacks take the lock of their
    /// chunk's stripe: one read-modify-write of a chunk at a time.
    stripes: Vec<tokio::sync::Mutex<()>>,
}

const STRIPES: u64 = 64;

/// The chunks at the two ends of `[offset, end)` that it covers only in part
/// and that `disk` does not hold: writing those needs the base's bytes.
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

impl Overlay {
    /// `cache` over `lower`. The cache's disk must be made
    /// [`Disk::over_lower`], of the lower disk's size.
    pub fn new(cache: Arc<Local>, lower: Arc<dyn Backend>) -> Overlay {
        Overlay {
            cache,
            lower,
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
        }
    }

    /// The write cache.
    pub fn cache(&self) -> &Arc<Local> {
        &self.cache
    }

    /// Writes `data` at `offset`. The chunks at its ends that it covers in
    /// part and the cache lacks are read first (the lower disk's bytes, on
    /// this task) and written whole with it, so the cache never has to read
    /// its lower disk itself.
    async fn write_filled(
        self: Arc<Self>,
        data: Bytes,
        offset: u64,
        fua: bool,
    ) -> Result<(), WriteError> {
        let disk = self.cache.disk().clone();
        let len = data.len() as u64;
        if !disk.is_writable() || !disk.in_range(offset, len) {
            // The local stack gives the error.
            return self.cache.clone().write(data, offset, fua).await;
        }
        let end = offset + len;
        let edges = unheld_edges(&disk, offset, end);
        if edges.is_empty() {
            return self.cache.clone().write(data, offset, fua).await;
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
        let written = self.cache.clone().write(Bytes::from(whole), lo, fua).await;
        drop(guards);
        written
    }

    /// Zeroes a range: its whole chunks in the cache as the cache does it,
    /// its partial ends as writes of zeros (see [`Overlay::write_filled`]).
    async fn zero_filled(
        self: Arc<Self>,
        offset: u64,
        len: u64,
        fua: bool,
        punch: bool,
    ) -> Result<(), WriteError> {
        let disk = self.cache.disk().clone();
        let end = offset.saturating_add(len);
        if !disk.is_writable()
            || !disk.in_range(offset, len)
            || unheld_edges(&disk, offset, end).is_empty()
        {
            return self
                .cache
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
        self.cache
            .clone()
            .write_zeroes(first, last - first, fua, punch)
            .await
    }

    /// `len` bytes at `offset` after `headroom` zero bytes: the cache's runs
    /// from its disk, the others from the lower disk.
    async fn read_both(
        self: Arc<Self>,
        offset: u64,
        len: u32,
        headroom: usize,
    ) -> io::Result<Vec<u8>> {
        let disk = self.cache.disk();
        let end = offset.saturating_add(u64::from(len)).min(disk.size());
        if len > 0 && (offset / CHUNK..end.div_ceil(CHUNK)).all(|c| !disk.holds(c)) {
            // All of it is the lower disk's: its reply, read with the same
            // headroom, is the answer as it is.
            return self.lower.clone().read(offset, len, headroom).await;
        }
        let n = len as usize;
        let mut out = Vec::with_capacity(headroom + n);
        out.resize(headroom, 0);
        let local = disk.read_local(&mut out.spare_capacity_mut()[..n], offset, true)?;
        let missing = match local {
            LocalRead::Done => Vec::new(),
            LocalRead::Missing(runs) => runs,
            LocalRead::WouldBlock => {
                // A cache run is not in the page cache: read the cache's runs
                // where blocking is allowed, then the lower disk's here.
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
        for (at, run) in missing {
            let data = self.lower.clone().read(at, run as u32, 0).await?;
            if data.len() as u64 != run {
                return Err(io::Error::other("short read from the lower disk"));
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

/// Reads that need no waiting, writes, trims and flushes are the cache's;
/// what the cache lacks is the lower disk's.
impl Backend for Overlay {
    fn size(&self) -> u64 {
        self.cache.size()
    }
    fn is_writable(&self) -> bool {
        self.cache.is_writable()
    }
    fn try_read(&self, buf: &mut [MaybeUninit<u8>], offset: u64) -> io::Result<bool> {
        // A run of the lower disk is never read here: it may wait.
        self.cache.try_read(buf, offset)
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
        Box::pin(self.write_filled(data, offset, fua))
    }
    fn write_zeroes(
        self: Arc<Self>,
        offset: u64,
        len: u64,
        fua: bool,
        punch: bool,
    ) -> BoxFuture<'static, Result<(), WriteError>> {
        Box::pin(self.zero_filled(offset, len, fua, punch))
    }
    fn trim(
        self: Arc<Self>,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> BoxFuture<'static, Result<(), WriteError>> {
        self.cache.clone().trim(offset, len, fua)
    }
    fn flush(self: Arc<Self>) -> BoxFuture<'static, io::Result<()>> {
        self.cache.clone().flush()
    }
    fn extents(&self, offset: u64, len: u64, max: usize) -> Vec<Extent> {
        self.cache.extents(offset, len, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vstream_image::Layer;

    /// A lower disk of `size` bytes holding `byte` everywhere, read-only,
    /// and a fresh cache over it.
    async fn stack(dir: &std::path::Path, size: u64, byte: u8) -> (Arc<Overlay>, Arc<Local>) {
        let base = Arc::new(Layer::create(&dir.join("base.layer"), size).unwrap());
        let fill = Local::new(Arc::new(Disk::writable(vec![base.clone()], None).unwrap()));
        fill.write(Bytes::from(vec![byte; size as usize]), 0, true)
            .await
            .unwrap();
        let lower = Local::new(Arc::new(Disk::read_only(vec![base])));
        let top = Arc::new(Layer::create(&dir.join("cache.layer"), size).unwrap());
        let cache = Disk::writable(vec![top], None).unwrap().over_lower();
        let overlay = Arc::new(Overlay::new(Local::new(Arc::new(cache)), lower.clone()));
        (overlay, lower)
    }

    #[tokio::test]
    async fn a_partial_write_keeps_the_lower_bytes_around_it() {
        let dir = tempfile::tempdir().unwrap();
        let (o, lower) = stack(dir.path(), 4 * CHUNK, 0xab).await;
        // Nothing cached: the lower disk's bytes, with the headroom in front.
        let got = o.clone().read(100, 5000, 3).await.unwrap();
        assert_eq!(&got[..3], &[0u8; 3]);
        assert!(got[3..].iter().all(|&x| x == 0xab));
        // Across a chunk boundary, in part of each chunk.
        let at = CHUNK - 10;
        o.clone()
            .write(Bytes::from(vec![7u8; 20]), at, false)
            .await
            .unwrap();
        let got = o.clone().read(0, (2 * CHUNK) as u32, 0).await.unwrap();
        for (i, &x) in got.iter().enumerate() {
            let want = if (at..at + 20).contains(&(i as u64)) {
                7
            } else {
                0xab
            };
            assert_eq!(x, want, "byte {i}");
        }
        // Both chunks are the cache's now, whole; the lower disk is untouched.
        assert!(o.cache().disk().holds(0) && o.cache().disk().holds(1));
        assert!(!o.cache().disk().holds(2));
        let below = lower.read(0, (2 * CHUNK) as u32, 0).await.unwrap();
        assert!(below.iter().all(|&x| x == 0xab));
    }

    #[tokio::test]
    async fn zeroes_trims_and_flushes_stay_in_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let (o, lower) = stack(dir.path(), 4 * CHUNK, 0x55).await;
        // Zeroes from the middle of chunk 0 to the middle of chunk 2.
        o.clone()
            .write_zeroes(CHUNK / 2, 2 * CHUNK, false, true)
            .await
            .unwrap();
        o.clone().flush().await.unwrap();
        let got = o.clone().read(0, (4 * CHUNK) as u32, 0).await.unwrap();
        let (z0, z1) = ((CHUNK / 2) as usize, (CHUNK / 2 + 2 * CHUNK) as usize);
        assert!(got[..z0].iter().all(|&x| x == 0x55));
        assert!(got[z0..z1].iter().all(|&x| x == 0));
        assert!(got[z1..].iter().all(|&x| x == 0x55));
        let below = lower.read(0, (4 * CHUNK) as u32, 0).await.unwrap();
        assert!(below.iter().all(|&x| x == 0x55));
        // A run of the lower disk is never read on the spot.
        let mut buf = vec![MaybeUninit::new(0u8); 100];
        assert!(!o.try_read(&mut buf, 3 * CHUNK).unwrap());
        // Past the end: refused, whoever would answer.
        assert!(o.clone().read(4 * CHUNK, 1, 0).await.is_err());
        let err = o
            .clone()
            .write(Bytes::from_static(b"x"), 4 * CHUNK, false)
            .await
            .unwrap_err();
        assert!(matches!(err, WriteError::OutOfRange), "{err:?}");
    }
}
