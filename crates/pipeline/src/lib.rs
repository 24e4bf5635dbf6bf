//! The device storage pipeline: what a front door (the NBD service today,
//! iSCSI next) asks of the disk behind an export, and the one implementation
//! every local disk shares.
//!
//! ```text
//!   front door (NBD: vstream-service) ──► dyn Backend
//!        Local     a stack of layers on this machine: a vDisk's sealed chain,
//!                  a device's write cache (RAM, disk, RAM with overflow, a limit)
//!                  over it; the server's exports
//!        Streamed  the agent's (crates/target): the device's write cache, a
//!                  Local, over the base streamed from a server with failover
//! ```
//!
//! A front door decodes requests and encodes replies; it never knows where
//! the bytes live. It first offers a read to [`Backend::try_read`], which
//! answers on the spot when nothing has to wait (a page-cache hit), and
//! otherwise awaits [`Backend::read`]. Writes, zeroes, trims and flushes are
//! always awaited. A backend runs blocking work on the blocking pool and
//! network work on the runtime, so a front door's task never blocks.

use std::io;
use std::mem::MaybeUninit;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use vstream_image::Layer;
pub use vstream_image::{BootRecorder, Disk, Extent, WriteError};

mod overlay;
pub use overlay::Overlay;

/// A device's disk as a front door sees it.
pub trait Backend: Send + Sync + 'static {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Whether writes, zeroes and trims are allowed.
    fn is_writable(&self) -> bool;
    /// Whether `[offset, offset + len)` lies inside the disk.
    fn in_range(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.size())
    }
    /// Reads `buf.len()` bytes at `offset` if that needs no waiting: `Ok(true)`
    /// when every byte of `buf` is written, `Ok(false)` when the caller must
    /// await [`Backend::read`] instead.
    fn try_read(&self, buf: &mut [MaybeUninit<u8>], offset: u64) -> io::Result<bool>;
    /// Reads `len` bytes at `offset`. They come after `headroom` bytes that
    /// the caller fills (its reply header), so the answer is sent as it is.
    fn read(
        self: Arc<Self>,
        offset: u64,
        len: u32,
        headroom: usize,
    ) -> BoxFuture<'static, io::Result<Vec<u8>>>;
    /// Writes `data` at `offset`; with `fua`, durable when it returns.
    fn write(
        self: Arc<Self>,
        data: Bytes,
        offset: u64,
        fua: bool,
    ) -> BoxFuture<'static, Result<(), WriteError>>;
    /// Zeroes a range; with `punch`, whole chunks may become holes.
    fn write_zeroes(
        self: Arc<Self>,
        offset: u64,
        len: u64,
        fua: bool,
        punch: bool,
    ) -> BoxFuture<'static, Result<(), WriteError>>;
    /// Tells the disk a range's content is no longer needed.
    fn trim(
        self: Arc<Self>,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> BoxFuture<'static, Result<(), WriteError>>;
    /// Makes every acknowledged write durable.
    fn flush(self: Arc<Self>) -> BoxFuture<'static, io::Result<()>>;
    /// Whether every acknowledged write is durable already, so a flush now
    /// has nothing to do and may be answered on the spot. `false` (the
    /// default): flush with [`Backend::flush`].
    fn is_flushed(&self) -> bool {
        false
    }
    /// Allocation of `[offset, offset + len)`: at most `max` extents.
    fn extents(&self, offset: u64, len: u64, max: usize) -> Vec<Extent>;
    /// Where `[offset, offset + len)` lies whole in one file that this
    /// backend does not write (see [`Disk::read_only_span`]), all in the
    /// page cache: a front door may send it from that file straight to its
    /// socket, with no copy through user space. `None` (the default): read
    /// it with [`Backend::try_read`].
    fn file_span(&self, _offset: u64, _len: u64) -> Option<FileSpan> {
        None
    }
}

/// A read's bytes as a range of a layer file, cached: see
/// [`Backend::file_span`].
#[derive(Debug, Clone)]
pub struct FileSpan {
    layer: Arc<Layer>,
    /// Where the bytes are on the disk.
    offset: u64,
    pub len: u64,
}

impl FileSpan {
    /// The bytes in the layer file's shared mapping, to be handed to the
    /// kernel (see [`Layer::mapped_data`]); `None` if the file cannot be
    /// mapped.
    pub fn mapped(&self) -> Option<&[u8]> {
        self.layer.mapped_data(self.offset, self.len)
    }

    /// The file the bytes are in, open for reading.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.layer.data_file(0).0
    }

    /// Where the bytes begin in the file.
    pub fn pos(&self) -> u64 {
        self.layer.data_file(self.offset).1
    }
}

/// A stack of layers on this machine: reads from the page cache on the
/// caller's task, everything else on the blocking pool.
#[derive(Debug)]
pub struct Local {
    disk: Arc<Disk>,
    /// Notes the reads of a device's boot (see [`BootRecorder`]).
    boot: Option<Arc<BootRecorder>>,
}

impl Local {
    pub fn new(disk: Arc<Disk>) -> Arc<Local> {
        Arc::new(Local { disk, boot: None })
    }

    /// Like [`Local::new`], and every read answered is noted by `boot`.
    pub fn recording(disk: Arc<Disk>, boot: Option<Arc<BootRecorder>>) -> Arc<Local> {
        Arc::new(Local { disk, boot })
    }

    #[inline]
    fn note(&self, offset: u64, len: u64) {
        if let Some(boot) = &self.boot {
            boot.note(offset, len);
        }
    }

    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }
}

/// Runs `f` on the blocking pool.
pub fn blocking<T, E, F>(f: F) -> BoxFuture<'static, Result<T, E>>
where
    F: FnOnce() -> Result<T, E> + Send + 'static,
    T: Send + 'static,
    E: From<io::Error> + Send + 'static,
{
    Box::pin(async move {
        tokio::task::spawn_blocking(f)
            .await
            .unwrap_or_else(|e| Err(io::Error::other(format!("a storage task failed: {e}")).into()))
    })
}

/// `len` bytes of `disk` at `offset` after `headroom` zero bytes, read with
/// `nowait` as [`Disk::read_uninit`] does; `None` if it would block.
pub fn read_vec(
    disk: &Disk,
    offset: u64,
    len: u32,
    headroom: usize,
    nowait: bool,
) -> io::Result<Option<Vec<u8>>> {
    let len = len as usize;
    let mut out = Vec::with_capacity(headroom + len);
    out.resize(headroom, 0);
    if !disk.read_uninit(&mut out.spare_capacity_mut()[..len], offset, nowait)? {
        return Ok(None);
    }
    // SAFETY: `read_uninit` answered true, so it wrote all `len` bytes after
    // the `headroom` initialised ones.
    unsafe { out.set_len(headroom + len) };
    Ok(Some(out))
}

impl Backend for Local {
    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn is_writable(&self) -> bool {
        self.disk.is_writable()
    }
    fn try_read(&self, buf: &mut [MaybeUninit<u8>], offset: u64) -> io::Result<bool> {
        let done = self.disk.read_uninit(buf, offset, true)?;
        if done {
            self.note(offset, buf.len() as u64);
        }
        Ok(done)
    }
    fn read(
        self: Arc<Self>,
        offset: u64,
        len: u32,
        headroom: usize,
    ) -> BoxFuture<'static, io::Result<Vec<u8>>> {
        self.note(offset, u64::from(len));
        blocking(move || {
            read_vec(&self.disk, offset, len, headroom, false)?
                .ok_or_else(|| io::Error::other("a blocking read was refused"))
        })
    }
    fn write(
        self: Arc<Self>,
        data: Bytes,
        offset: u64,
        fua: bool,
    ) -> BoxFuture<'static, Result<(), WriteError>> {
        blocking(move || self.disk.write(&data, offset, fua))
    }
    fn write_zeroes(
        self: Arc<Self>,
        offset: u64,
        len: u64,
        fua: bool,
        punch: bool,
    ) -> BoxFuture<'static, Result<(), WriteError>> {
        blocking(move || self.disk.write_zeroes(offset, len, fua, punch))
    }
    fn trim(
        self: Arc<Self>,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> BoxFuture<'static, Result<(), WriteError>> {
        blocking(move || self.disk.trim(offset, len, fua))
    }
    fn flush(self: Arc<Self>) -> BoxFuture<'static, io::Result<()>> {
        blocking(move || self.disk.flush())
    }
    fn is_flushed(&self) -> bool {
        self.disk.is_flushed()
    }
    fn extents(&self, offset: u64, len: u64, max: usize) -> Vec<Extent> {
        self.disk.block_status(offset, len, max)
    }
    fn file_span(&self, offset: u64, len: u64) -> Option<FileSpan> {
        let layer = self.disk.read_only_span(offset, len)?;
        if !layer.is_cached(offset, len) {
            return None;
        }
        self.note(offset, len);
        Some(FileSpan {
            offset,
            layer: layer.clone(),
            len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vstream_image::Layer;

    fn local(dir: &std::path::Path, size: u64) -> Arc<Local> {
        let base = Arc::new(Layer::create(&dir.join("base.layer"), size).unwrap());
        let top = Arc::new(Layer::create(&dir.join("top.layer"), size).unwrap());
        Local::new(Arc::new(Disk::writable(vec![base, top], None).unwrap()))
    }

    #[tokio::test]
    async fn reads_see_writes_with_headroom_in_front() {
        let dir = tempfile::tempdir().unwrap();
        let b = local(dir.path(), 1 << 20);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        b.clone()
            .write(Bytes::from(data.clone()), 4096 + 100, false)
            .await
            .unwrap();
        let got = b.clone().read(4096 + 100, 10_000, 7).await.unwrap();
        assert_eq!(got.len(), 7 + 10_000);
        assert_eq!(&got[..7], &[0u8; 7], "the headroom is zeros");
        assert_eq!(&got[7..], &data[..]);
        // Around the write: zeros.
        let around = b.clone().read(0, 4096 + 100, 0).await.unwrap();
        assert!(around.iter().all(|&x| x == 0));
        b.clone().flush().await.unwrap();
        // The same bytes on the spot: written moments ago, so in the page cache.
        let mut buf = vec![MaybeUninit::new(1u8); 10_000];
        if b.try_read(&mut buf, 4096 + 100).unwrap() {
            // SAFETY: try_read answered true, so every byte is written.
            let got: Vec<u8> = buf.iter().map(|x| unsafe { x.assume_init() }).collect();
            assert_eq!(got, data);
        }
    }

    #[tokio::test]
    async fn zeroes_trims_and_extents_go_to_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let b = local(dir.path(), 1 << 20);
        b.clone()
            .write(Bytes::from(vec![9u8; 65536]), 0, true)
            .await
            .unwrap();
        assert!(!b.extents(0, 65536, 16)[0].zero, "written data is data");
        b.clone().write_zeroes(0, 8192, false, false).await.unwrap();
        b.clone().trim(8192, 8192, false).await.unwrap();
        let got = b.clone().read(0, 65536, 0).await.unwrap();
        assert!(got[..16384].iter().all(|&x| x == 0));
        assert!(got[16384..].iter().all(|&x| x == 9));
        assert!(b.in_range(0, 1 << 20));
        assert!(!b.in_range(1, 1 << 20));
        assert!(!b.in_range(u64::MAX, 2));
    }

    #[tokio::test]
    async fn a_read_only_stack_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let base = Arc::new(Layer::create(&dir.path().join("b.layer"), 1 << 20).unwrap());
        let b = Local::new(Arc::new(Disk::read_only(vec![base])));
        assert!(!b.is_writable());
        let err = b
            .clone()
            .write(Bytes::from_static(b"x"), 0, false)
            .await
            .unwrap_err();
        assert!(matches!(err, WriteError::ReadOnly), "{err:?}");
        assert!(b.read(1 << 20, 1, 0).await.is_err(), "past the end");
    }

    #[tokio::test]
    async fn a_recording_stack_notes_each_read_it_answers() {
        use vstream_image::bootset::BOOT_BLOCK;
        use vstream_image::BootSet;
        let dir = tempfile::tempdir().unwrap();
        let size = 4 << 20;
        let base = Arc::new(Layer::create(&dir.path().join("b.layer"), size).unwrap());
        base.write_data(&[5u8; 8192], 1 << 20).unwrap();
        base.set_allocated(256, 258);
        let set = Arc::new(BootSet::new(size));
        let boot = Arc::new(BootRecorder::new(
            set.clone(),
            std::time::Duration::from_secs(60),
        ));
        let b = Local::recording(Arc::new(Disk::read_only(vec![base])), Some(boot));
        b.clone().read(3 * BOOT_BLOCK, 10, 0).await.unwrap();
        let mut buf = vec![MaybeUninit::uninit(); 4096];
        let answered = b.try_read(&mut buf, 1 << 20).unwrap();
        let span = b.file_span((1 << 20) + 4096, 4096);
        let mut want = vec![(3 * BOOT_BLOCK, BOOT_BLOCK)];
        if answered || span.is_some() {
            want.push((1 << 20, BOOT_BLOCK));
        }
        assert_eq!(set.runs(), want);
        // A plain stack notes nothing.
        let plain = Local::new(b.disk().clone());
        plain.clone().read(0, 10, 0).await.unwrap();
        assert_eq!(set.runs(), want);
    }
}
