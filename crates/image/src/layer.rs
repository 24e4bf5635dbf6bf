//! One layer file: a header, an allocation bitmap, a block-hash table, the
//! inner nodes of the version's hash tree, and a sparse data region where
//! logical offset X lives at `data_offset + X`.
//!
//! ```text
//!   0        4 KiB                                                                 data_offset (1 MiB aligned)
//!   | header | bitmap (1 bit per 4 KiB chunk) | hashes (32 B per 64 KiB block) | tree | data (sparse) ... |
//! ```
//!
//! Durability: data is written in place first; the bitmap bits that make it
//! visible are set in memory and reach the file only in [`Layer::flush`], after
//! an `fdatasync` of the data. A crash therefore never exposes a chunk whose
//! data was not durable: it shows the state of the last completed flush.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::mem::MaybeUninit;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;

use parking_lot::Mutex;

use crate::error::ImageError;
use crate::hash::{DiskHashes, Tree};
use crate::residency::Residency;

/// Allocation granularity: the unit of copy-up and of the bitmap.
pub const CHUNK: u64 = 4096;
/// Hashing granularity: one content hash per logical block of this size.
pub const HASH_BLOCK: u64 = 64 * 1024;
pub(crate) const HEADER_LEN: u64 = 4096;
const MAGIC: &[u8; 8] = b"VSLAYER1";
const FORMAT_VERSION: u32 = 2;
const BITMAP_PAGE: u64 = 4096;
/// Chunks one bitmap page describes: 128 MiB of disk.
pub const PAGE_CHUNKS: u64 = BITMAP_PAGE * 8;
const PAGE_WORDS: usize = (BITMAP_PAGE / 8) as usize;
/// Bitmap bytes read at a time when opening a layer.
const BITMAP_READ: u64 = 1 << 20;
const DATA_ALIGN: u64 = 1 << 20;
/// Most stored block hashes read at once: 128 KiB, whatever the layer's size.
const HASH_RUN: usize = 4096;
/// Largest virtual size a layer file may have (a corrupt header must not make
/// us allocate absurdly).
pub const MAX_SIZE: u64 = 1 << 50;
/// Largest virtual size of a new vDisk: 64 TiB. What still grows with the
/// virtual size rather than the data (the stored hash tree, 1/128 Ki of the
/// size, written at creation and read at each seal) stays under 512 MiB.
pub const MAX_NEW_SIZE: u64 = 64 << 40;

/// Where the header keeps the layer's label (a u16 length, then the bytes),
/// and the longest label: what a write cache lies over and the boot it
/// belongs to (see [`Layer::create_unsynced`]). Empty in any other layer,
/// and in a header written before labels were.
const LABEL_AT: usize = 1024;
pub const MAX_LABEL: usize = 2048;

pub const FLAG_SEALED: u32 = 1 << 0;
/// The block hashes of what the layer touches, the tree and the content hash
/// describe the version whose top this layer is.
pub const FLAG_HASHES_VALID: u32 = 1 << 1;

/// Offsets inside the file, derived from the virtual size alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub(crate) size: u64,
    pub(crate) chunks: u64,
    pub(crate) blocks: u64,
    pub(crate) bitmap_offset: u64,
    bitmap_len: u64,
    pub(crate) hashes_offset: u64,
    hashes_len: u64,
    pub(crate) tree_offset: u64,
    tree_len: u64,
    pub(crate) data_offset: u64,
}

impl Geometry {
    pub(crate) fn for_size(size: u64) -> Geometry {
        let chunks = size.div_ceil(CHUNK);
        let blocks = size.div_ceil(HASH_BLOCK);
        let bitmap_len = chunks.div_ceil(8).next_multiple_of(BITMAP_PAGE);
        let bitmap_offset = HEADER_LEN;
        let hashes_offset = bitmap_offset + bitmap_len;
        let hashes_len = (blocks * 32).next_multiple_of(4096);
        let tree_offset = hashes_offset + hashes_len;
        let tree_len = Tree::stored_len(blocks).next_multiple_of(4096);
        let data_offset = (tree_offset + tree_len).next_multiple_of(DATA_ALIGN);
        Geometry {
            size,
            chunks,
            blocks,
            bitmap_offset,
            bitmap_len,
            hashes_offset,
            hashes_len,
            tree_offset,
            tree_len,
            data_offset,
        }
    }
}

/// The allocation bitmap in memory, one bit per chunk, in pages of
/// [`PAGE_CHUNKS`] chunks. A page exists only once one of its bits was set
/// (in the file or since opening), so an empty or sparse layer costs memory
/// and opening time in proportion to its data, not to its virtual size.
struct Bitmap {
    pages: Box<[OnceLock<Box<[AtomicU64]>>]>,
    /// Words that hold bits of real chunks: the tail of the last page is unused.
    words: usize,
}

impl Bitmap {
    fn new(chunks: u64) -> Bitmap {
        Bitmap {
            pages: (0..chunks.div_ceil(PAGE_CHUNKS))
                .map(|_| OnceLock::new())
                .collect(),
            words: chunks.div_ceil(64) as usize,
        }
    }

    fn new_page() -> Box<[AtomicU64]> {
        (0..PAGE_WORDS).map(|_| AtomicU64::new(0)).collect()
    }

    /// Word `w` (chunks `64 w ..`): zero in a page that does not exist.
    #[inline]
    fn word(&self, w: usize) -> u64 {
        match self.pages[w / PAGE_WORDS].get() {
            Some(page) => page[w % PAGE_WORDS].load(Ordering::Acquire),
            None => 0,
        }
    }

    /// Word `w`, creating its page.
    fn word_cell(&self, w: usize) -> &AtomicU64 {
        &self.pages[w / PAGE_WORDS].get_or_init(Bitmap::new_page)[w % PAGE_WORDS]
    }

    fn page(&self, page: usize) -> Option<&[AtomicU64]> {
        self.pages.get(page).and_then(|p| p.get()).map(|p| &p[..])
    }
}

/// A layer file, open for reading and, if `writable`, for writing.
pub struct Layer {
    path: PathBuf,
    file: File,
    geo: Geometry,
    writable: bool,
    flags: AtomicU32,
    content_hash: Mutex<Option<[u8; 32]>>,
    /// The label in the header, kept by every header rewrite.
    label: Vec<u8>,
    bitmap: Bitmap,
    allocated: AtomicU64,
    dirty_pages: Mutex<BTreeSet<u64>>,
    flush_lock: Mutex<()>,
    /// Whether this file and its folder are owed a sync before the layer's
    /// first flush is acknowledged: see [`Layer::create_unsynced`]. False
    /// for a layer made durable at creation.
    owed_sync: AtomicBool,
    /// Data changes completed (each counted once it is in the file) and the
    /// count the last full flush covered: a flush with nothing new since
    /// returns without a disk round trip (a booting OS flushes often, most
    /// often with nothing written since its last flush). Starts unmatched,
    /// so a layer's first flush always syncs.
    changes: AtomicU64,
    synced_changes: AtomicU64,
    copy_up_locks: Vec<Mutex<()>>,
    /// Writes begun (ever) and writes running: a hash taken while both stand
    /// still describes the data.
    writes_begun: AtomicU64,
    writes_running: AtomicU64,
    /// The whole file mapped read-only, made at the first
    /// [`Layer::mapped_data`]; `None` inside if the mapping failed.
    mapping: OnceLock<Option<Mapping>>,
    /// What is known of which data is in the page cache.
    residency: Residency,
}

/// Held for the duration of one write to a layer.
pub struct WriteGuard<'a>(&'a Layer);

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        self.0.writes_running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl std::fmt::Debug for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layer")
            .field("path", &self.path)
            .field("size", &self.geo.size)
            .finish()
    }
}

impl Layer {
    /// Creates an empty layer file (all chunks unallocated) and makes it durable.
    pub fn create(path: &Path, size: u64) -> Result<Layer, ImageError> {
        let layer = Layer::create_file(path, size, &[])?;
        let write_err = |source| ImageError::Write {
            path: path.to_owned(),
            source,
        };
        layer.file.sync_all().map_err(write_err)?;
        if let Some(dir) = path.parent() {
            sync_dir(dir).map_err(write_err)?;
        }
        Ok(layer)
    }

    /// Creates an empty layer file like [`Layer::create`], with `label` in
    /// its header ([`Layer::label`], at most [`MAX_LABEL`] bytes), without
    /// waiting for the disk: the file and its folder are synced by the
    /// layer's first [`Layer::flush`], before it syncs any data. For a layer whose writes
    /// need not outlive a crash until its first flush is acknowledged, as a
    /// device's write cache: a crash before then leaves at worst a layer that
    /// does not open or whose label no longer matches, and is discarded.
    /// Creating many (a boot storm's caches) costs no disk round trip each.
    pub fn create_unsynced(path: &Path, size: u64, label: &[u8]) -> Result<Layer, ImageError> {
        if label.len() > MAX_LABEL {
            return Err(ImageError::Invalid(format!(
                "a layer label holds at most {MAX_LABEL} bytes, not {}",
                label.len()
            )));
        }
        let layer = Layer::create_file(path, size, label)?;
        layer.owed_sync.store(true, Ordering::SeqCst);
        Ok(layer)
    }

    fn create_file(path: &Path, size: u64, label: &[u8]) -> Result<Layer, ImageError> {
        if size == 0 || size > MAX_SIZE || !size.is_multiple_of(512) {
            return Err(ImageError::Invalid(format!(
                "a vDisk size must be a non-zero multiple of 512 bytes up to {MAX_SIZE}, not {size}"
            )));
        }
        let write_err = |source| ImageError::Write {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(write_err)?;
        let geo = Geometry::for_size(size);
        let len = geo.data_offset + size;
        if let Err(e) = file.set_len(len) {
            drop(file);
            // Ours: it was made just now (create_new).
            let _ = std::fs::remove_file(path);
            if e.raw_os_error() == Some(libc::EFBIG) {
                let dir = path.parent().unwrap_or(path);
                return Err(ImageError::Invalid(format!(
                    "a vDisk of {} needs a layer file of {len} bytes, more than the file \
                     system holding {} allows in one file; use a smaller size or a store on a \
                     file system that holds larger files (ext4 with 4 KiB blocks: under 16 TiB)",
                    size_text(size),
                    dir.display()
                )));
            }
            return Err(write_err(e));
        }
        file.write_all_at(&encode_header(&geo, 0, None, label), 0)
            .map_err(write_err)?;
        // New and empty: nothing to read back.
        Ok(Layer::from_parts(
            path,
            file,
            geo,
            true,
            0,
            None,
            label.to_vec(),
            (Bitmap::new(geo.chunks), 0),
        ))
    }

    /// The content hash recorded in the header of the layer file at `path`,
    /// if its hashes are current: one read of the 4 KiB header, whatever the
    /// layer's size, without opening the layer (no bitmap is read).
    pub fn recorded_content_hash(path: &Path) -> Result<Option<[u8; 32]>, ImageError> {
        Ok(read_header_of(path)?.2)
    }

    /// The label in the header of the layer file at `path` ([`Layer::label`]):
    /// one read of the 4 KiB header, without opening the layer.
    pub fn recorded_label(path: &Path) -> Result<Vec<u8>, ImageError> {
        Ok(read_header_of(path)?.3)
    }

    /// Opens and validates a layer file.
    pub fn open(path: &Path, writable: bool) -> Result<Layer, ImageError> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|source| ImageError::OpenLayer {
                path: path.to_owned(),
                source,
            })?;
        let corrupt = |reason: String| ImageError::CorruptLayer {
            path: path.to_owned(),
            reason,
        };
        let (geo, flags, content_hash, label) = read_header(&file, path)?;
        let file_len = file.metadata()?.len();
        if file_len < geo.data_offset + geo.size {
            return Err(corrupt(format!(
                "file is {file_len} bytes, shorter than its header says"
            )));
        }
        let bitmap =
            read_bitmap(&file, &geo).map_err(|e| corrupt(format!("cannot read bitmap: {e}")))?;
        Ok(Layer::from_parts(
            path,
            file,
            geo,
            writable,
            flags,
            content_hash,
            label,
            bitmap,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn from_parts(
        path: &Path,
        file: File,
        geo: Geometry,
        writable: bool,
        flags: u32,
        content_hash: Option<[u8; 32]>,
        label: Vec<u8>,
        (bitmap, allocated): (Bitmap, u64),
    ) -> Layer {
        let residency = Residency::new(geo.size);
        Layer {
            path: path.to_owned(),
            file,
            geo,
            writable,
            flags: AtomicU32::new(flags),
            content_hash: Mutex::new(content_hash),
            label,
            bitmap,
            allocated: AtomicU64::new(allocated),
            dirty_pages: Mutex::new(BTreeSet::new()),
            flush_lock: Mutex::new(()),
            owed_sync: AtomicBool::new(false),
            changes: AtomicU64::new(0),
            synced_changes: AtomicU64::new(u64::MAX),
            copy_up_locks: (0..64).map(|_| Mutex::new(())).collect(),
            writes_begun: AtomicU64::new(0),
            writes_running: AtomicU64::new(0),
            mapping: OnceLock::new(),
            residency,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The label given at creation ([`Layer::create_unsynced`]); empty if
    /// none was.
    pub fn label(&self) -> &[u8] {
        &self.label
    }
    /// The identity of the open file (see [`crate::record::FileId`]).
    pub fn file_id(&self) -> io::Result<crate::record::FileId> {
        Ok(crate::record::FileId::from_metadata(&self.file.metadata()?))
    }
    pub fn size(&self) -> u64 {
        self.geo.size
    }
    pub fn chunks(&self) -> u64 {
        self.geo.chunks
    }
    pub fn blocks(&self) -> u64 {
        self.geo.blocks
    }
    pub fn is_writable(&self) -> bool {
        self.writable
    }
    pub fn is_sealed(&self) -> bool {
        self.flags.load(Ordering::Acquire) & FLAG_SEALED != 0
    }
    /// Bytes of data this layer holds (allocated chunks × chunk size).
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed) * CHUNK
    }
    pub fn allocated_chunks(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    #[inline]
    pub fn is_allocated(&self, chunk: u64) -> bool {
        self.bitmap.word((chunk / 64) as usize) & (1u64 << (chunk % 64)) != 0
    }

    /// Calls `f` with every allocated chunk, in order, skipping empty words.
    pub fn for_each_allocated(&self, mut f: impl FnMut(u64)) {
        for p in 0..self.bitmap.pages.len() {
            let Some(page) = self.bitmap.page(p) else {
                continue;
            };
            for (i, word) in page.iter().enumerate() {
                let mut bits = word.load(Ordering::Acquire);
                let base = (p * PAGE_WORDS + i) as u64 * 64;
                while bits != 0 {
                    let b = bits.trailing_zeros() as u64;
                    f(base + b);
                    bits &= bits - 1;
                }
            }
        }
    }

    /// True if any chunk of `[first, last)` is allocated. A range in bitmap
    /// pages that were never set costs one look per page.
    pub fn any_allocated(&self, first: u64, last: u64) -> bool {
        let last = last.min(self.geo.chunks);
        let mut chunk = first;
        while chunk < last {
            let page = (chunk / PAGE_CHUNKS) as usize;
            let page_end = ((page as u64 + 1) * PAGE_CHUNKS).min(last);
            if self.bitmap.page(page).is_some() {
                let mut c = chunk;
                while c < page_end {
                    let w = c / 64;
                    let lo = c % 64;
                    let hi = (page_end - w * 64).min(64);
                    let mask = if hi - lo == 64 {
                        u64::MAX
                    } else {
                        ((1u64 << (hi - lo)) - 1) << lo
                    };
                    if self.bitmap.word(w as usize) & mask != 0 {
                        return true;
                    }
                    c = w * 64 + hi;
                }
            }
            chunk = page_end;
        }
        false
    }

    /// True if every chunk of hash block `block` is allocated here.
    pub fn holds_block(&self, block: u64) -> bool {
        let per = HASH_BLOCK / CHUNK;
        let first = block * per;
        let last = ((block + 1) * per).min(self.geo.chunks);
        (first..last).all(|c| self.is_allocated(c))
    }

    /// True if any chunk of hash block `block` is allocated here.
    pub fn touches_block(&self, block: u64) -> bool {
        let per = HASH_BLOCK / CHUNK;
        let first = block * per;
        let last = ((block + 1) * per).min(self.geo.chunks);
        // 16 chunks per block: they sit within one 64-bit word.
        (first..last).any(|c| self.is_allocated(c))
    }

    /// Reads `buf.len()` bytes of the data region at logical `offset` into
    /// memory that need not be initialised; on `Ok(true)` all of `buf` is
    /// written. With `nowait`, answers `Ok(false)` instead of blocking on a
    /// page-cache miss.
    pub fn read_data(
        &self,
        buf: &mut [MaybeUninit<u8>],
        offset: u64,
        nowait: bool,
    ) -> io::Result<bool> {
        let flags = if nowait { libc::RWF_NOWAIT } else { 0 };
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let iov = libc::iovec {
                iov_base: rest.as_mut_ptr().cast(),
                iov_len: rest.len(),
            };
            let pos = (self.geo.data_offset + offset + done as u64) as i64;
            // SAFETY: iov points into `buf`, which outlives the call; the kernel
            // only writes into it, so uninitialised memory is fine.
            let n = unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, pos, flags) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) | Some(libc::EOPNOTSUPP) if nowait => return Ok(false),
                    _ => return Err(e),
                }
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "layer file is shorter than its header says",
                ));
            }
            if nowait && (n as usize) < rest.len() {
                // Part of it is not cached: let a thread that may block do it all.
                return Ok(false);
            }
            done += n as usize;
        }
        Ok(true)
    }

    /// The open layer file and the position in it of logical `offset`: for
    /// a caller that moves a layer's bytes from the file straight to a
    /// socket (`sendfile`) rather than read them (see [`crate::Disk::read_only_span`]).
    pub fn data_file(&self, offset: u64) -> (std::os::fd::BorrowedFd<'_>, u64) {
        use std::os::fd::AsFd;
        (self.file.as_fd(), self.geo.data_offset + offset)
    }

    /// Whether every page of the data region's `[offset, offset + len)` is
    /// in the page cache (`cachestat(2)`, Linux 6.5): a read of it will not
    /// wait for the disk, barring an eviction. A 2 MiB block found wholly
    /// cached is trusted for a second without asking the kernel again
    /// (crate::residency). `false` where the kernel cannot tell.
    pub fn is_cached(&self, offset: u64, len: u64) -> bool {
        self.residency
            .is_cached(self.file.as_raw_fd(), self.geo.data_offset, offset, len)
    }

    /// The data region's `[offset, offset + len)` in a shared read-only
    /// mapping of the file, made at the first call and kept while the layer
    /// is open: bytes a front door hands to the kernel to send (`sendmsg`
    /// copies them from the page cache into the socket, with no copy into a
    /// buffer of ours first). `None` if the file cannot be mapped or the
    /// range lies past its end.
    ///
    /// Only the kernel may read these bytes (hand them to a system call's
    /// I/O vector), never this process: should the file be cut short under
    /// the mapping (by hand, in the store), a read of a page past its new
    /// end is a SIGBUS in user space, but an `EFAULT` in a system call,
    /// which fails that one connection.
    pub fn mapped_data(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let map = self
            .mapping
            .get_or_init(|| match Mapping::of(&self.file) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "a layer file cannot be mapped; its reads take the copy path");
                    None
                }
            })
            .as_ref()?;
        let pos = self.geo.data_offset.checked_add(offset)?;
        let end = usize::try_from(pos.checked_add(len)?).ok()?;
        if end > map.len {
            return None;
        }
        // SAFETY: `pos..end` lies within the mapping, which lives as long as
        // `self` (unmapped only when the layer is dropped); the bytes go to
        // the kernel only (above).
        Some(unsafe { std::slice::from_raw_parts(map.ptr.add(pos as usize), len as usize) })
    }

    /// Reads `buf.len()` bytes of the data region at logical `offset`.
    pub fn read_raw(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, self.geo.data_offset + offset)
    }

    /// The allocation bitmap as bytes, one bit per chunk (bit `c % 8` of byte `c / 8`).
    pub fn bitmap_bytes(&self) -> Vec<u8> {
        let mut out: Vec<u8> = (0..self.bitmap.words)
            .flat_map(|w| self.bitmap.word(w).to_le_bytes())
            .collect();
        out.truncate(self.geo.chunks.div_ceil(8) as usize);
        out
    }

    /// The raw header bytes as stored.
    pub fn header_bytes(&self) -> io::Result<Vec<u8>> {
        let mut h = vec![0u8; HEADER_LEN as usize];
        self.file.read_exact_at(&mut h, 0)?;
        Ok(h)
    }

    /// The stored tree region, raw.
    pub fn tree_bytes(&self) -> io::Result<Vec<u8>> {
        let mut raw = vec![0u8; Tree::stored_len(self.geo.blocks) as usize];
        self.file.read_exact_at(&mut raw, self.geo.tree_offset)?;
        Ok(raw)
    }

    /// Writes into the data region without touching the bitmap.
    pub fn write_data(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let written = self.file.write_all_at(data, self.geo.data_offset + offset);
        // Counted after it is in the file (and, failed, as it may be partly):
        // a flush that sees the count covers the data.
        self.changes.fetch_add(1, Ordering::SeqCst);
        written
    }

    /// Deallocates the file's storage behind a chunk-aligned range: it reads as zeros.
    pub fn punch_data(&self, offset: u64, len: u64) -> io::Result<()> {
        let punched = self.punch_data_inner(offset, len);
        self.changes.fetch_add(1, Ordering::SeqCst);
        punched
    }

    fn punch_data_inner(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: plain syscall on our own descriptor.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (self.geo.data_offset + offset) as i64,
                len as i64,
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                // No hole punching here: write zeros instead.
                return write_zeros(&self.file, self.geo.data_offset + offset, len);
            }
            return Err(e);
        }
        Ok(())
    }

    /// Marks chunks `[first, last)` allocated; returns how many were not before.
    pub fn set_allocated(&self, first: u64, last: u64) -> u64 {
        self.change_bits(first, last, true)
    }

    /// Marks chunks `[first, last)` unallocated; returns how many were allocated.
    pub fn clear_allocated(&self, first: u64, last: u64) -> u64 {
        self.change_bits(first, last, false)
    }

    fn change_bits(&self, first: u64, last: u64, set: bool) -> u64 {
        let mut changed = 0u64;
        let mut chunk = first;
        let mut pages = Vec::new();
        while chunk < last {
            let word_idx = chunk / 64;
            let lo = chunk % 64;
            let hi = (last - word_idx * 64).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let before = if set {
                self.bitmap
                    .word_cell(word_idx as usize)
                    .fetch_or(mask, Ordering::AcqRel)
            } else if self.bitmap.word(word_idx as usize) & mask == 0 {
                // Nothing to clear (and no page to create for it).
                0
            } else {
                self.bitmap
                    .word_cell(word_idx as usize)
                    .fetch_and(!mask, Ordering::AcqRel)
            };
            let flipped = if set { !before & mask } else { before & mask };
            if flipped != 0 {
                changed += u64::from(flipped.count_ones());
                let page = word_idx * 8 / BITMAP_PAGE;
                if pages.last() != Some(&page) {
                    pages.push(page);
                }
            }
            chunk = word_idx * 64 + hi;
        }
        if changed > 0 {
            if set {
                self.allocated.fetch_add(changed, Ordering::Relaxed);
            } else {
                self.allocated.fetch_sub(changed, Ordering::Relaxed);
            }
            self.dirty_pages.lock().extend(pages);
        }
        changed
    }

    /// The lock that serialises copy-up of one chunk.
    pub fn copy_up_lock(&self, chunk: u64) -> parking_lot::MutexGuard<'_, ()> {
        self.copy_up_locks[(chunk % self.copy_up_locks.len() as u64) as usize].lock()
    }

    /// Makes every completed write durable: data first, then the bitmap bits
    /// that were set before the data sync began.
    pub fn flush(&self) -> io::Result<()> {
        if !self.writable {
            return Ok(());
        }
        let _serial = self.flush_lock.lock();
        // Read before the sync: every change counted here is in the file.
        let changes = self.changes.load(Ordering::SeqCst);
        if self.covers(changes) {
            return Ok(());
        }
        self.flush_changes()?;
        self.synced_changes.store(changes, Ordering::SeqCst);
        Ok(())
    }

    /// Whether a flush now would have nothing to do: every write
    /// acknowledged so far is durable (a write is counted before it is
    /// acknowledged, and a flush records what it covered only once it is
    /// done). A front door answers such a flush without a thread hop.
    pub fn is_flushed(&self) -> bool {
        !self.writable || self.covers(self.changes.load(Ordering::SeqCst))
    }

    /// Whether the last full flush covered `changes` and nothing else is
    /// pending (no bitmap page dirty, no sync owed).
    fn covers(&self, changes: u64) -> bool {
        changes == self.synced_changes.load(Ordering::SeqCst)
            && self.dirty_pages.lock().is_empty()
            && !self.owed_sync.load(Ordering::SeqCst)
    }

    fn flush_changes(&self) -> io::Result<()> {
        let pages: Vec<u64> = std::mem::take(&mut *self.dirty_pages.lock())
            .into_iter()
            .collect();
        let restore = || self.dirty_pages.lock().extend(pages.iter().copied());
        // Snapshot the pages now: every bit in them belongs to a write whose data
        // was written before this point, so a sync after it covers that data.
        let snapshots: Vec<(u64, Vec<u8>)> = pages
            .iter()
            .map(|&p| (p, self.bitmap_page_bytes(p)))
            .collect();
        // The first flush of a layer made unsynced syncs the whole file (its
        // data too) and its folder; the data then needs no sync of its own.
        let synced = match self.pay_owed_sync() {
            Ok(synced) => synced,
            Err(e) => {
                restore();
                return Err(e);
            }
        };
        if !synced {
            if let Err(e) = self.file.sync_data() {
                restore();
                return Err(e);
            }
        }
        if snapshots.is_empty() {
            return Ok(());
        }
        for (page, bytes) in &snapshots {
            if let Err(e) = self
                .file
                .write_all_at(bytes, self.geo.bitmap_offset + page * BITMAP_PAGE)
            {
                restore();
                return Err(e);
            }
        }
        self.file.sync_data().inspect_err(|_| restore())
    }

    /// Syncs what [`Layer::create_unsynced`] left owed, the whole file and
    /// then its folder; true if it did. Kept owed if a sync fails, so the
    /// next flush tries again and no flush is acknowledged before it is paid.
    fn pay_owed_sync(&self) -> io::Result<bool> {
        if !self.owed_sync.load(Ordering::SeqCst) {
            return Ok(false);
        }
        self.file.sync_all()?;
        if let Some(dir) = self.path.parent() {
            sync_dir(dir)?;
        }
        self.owed_sync.store(false, Ordering::SeqCst);
        Ok(true)
    }

    fn bitmap_page_bytes(&self, page: u64) -> Vec<u8> {
        let mut out = vec![0u8; BITMAP_PAGE as usize];
        if let Some(words) = self.bitmap.page(page as usize) {
            for (i, w) in words.iter().enumerate() {
                out[i * 8..i * 8 + 8].copy_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
            }
        }
        out
    }

    /// The content hash recorded with the layer, if its hashes are current.
    pub fn content_hash(&self) -> Option<[u8; 32]> {
        if self.flags.load(Ordering::SeqCst) & FLAG_HASHES_VALID == 0 {
            return None;
        }
        *self.content_hash.lock()
    }

    /// Starts a write: counts it, and makes sure the stored hashes are marked
    /// stale (durably) before any data changes.
    pub fn begin_write(&self) -> io::Result<WriteGuard<'_>> {
        self.writes_running.fetch_add(1, Ordering::SeqCst);
        self.writes_begun.fetch_add(1, Ordering::SeqCst);
        let guard = WriteGuard(self);
        self.invalidate_hashes()?;
        Ok(guard)
    }

    /// The write epoch if no write is running now; hashes taken from here on
    /// may be stored with [`Layer::store_hashes_if_unchanged`].
    pub fn quiet_epoch(&self) -> Option<u64> {
        let begun = self.writes_begun.load(Ordering::SeqCst);
        (self.writes_running.load(Ordering::SeqCst) == 0).then_some(begun)
    }

    /// Like [`Layer::store_hashes`], but only if no write began since `epoch`;
    /// returns whether they were stored.
    pub fn store_hashes_if_unchanged(&self, epoch: u64, hashes: &DiskHashes) -> io::Result<bool> {
        self.store_hashes_inner(hashes, false, Some(epoch))
    }

    /// Records that the stored hashes no longer describe the data, durably,
    /// before the first write that changes it.
    fn invalidate_hashes(&self) -> io::Result<()> {
        if self.flags.load(Ordering::SeqCst) & FLAG_HASHES_VALID == 0 {
            return Ok(());
        }
        let _serial = self.flush_lock.lock();
        let flags = self.flags.load(Ordering::SeqCst);
        if flags & FLAG_HASHES_VALID == 0 {
            return Ok(());
        }
        let new = flags & !FLAG_HASHES_VALID;
        *self.content_hash.lock() = None;
        self.file
            .write_all_at(&encode_header(&self.geo, new, None, &self.label), 0)?;
        self.file.sync_data()?;
        self.flags.store(new, Ordering::SeqCst);
        Ok(())
    }

    /// Stores the hashes of the blocks this layer touches, the version's tree
    /// and its content hash, and marks them valid; with `seal`, the layer
    /// also becomes immutable.
    pub fn store_hashes(&self, hashes: &DiskHashes, seal: bool) -> io::Result<()> {
        self.store_hashes_inner(hashes, seal, None).map(|_| ())
    }

    fn store_hashes_inner(
        &self,
        hashes: &DiskHashes,
        seal: bool,
        epoch: Option<u64>,
    ) -> io::Result<bool> {
        let content = hashes.content;
        let _serial = self.flush_lock.lock();
        let mut flags = self.flags.load(Ordering::SeqCst) | FLAG_HASHES_VALID;
        if seal {
            flags |= FLAG_SEALED;
        }
        let before = self.flags.swap(flags, Ordering::SeqCst);
        if let Some(epoch) = epoch {
            // The flag is claimed first, then the writes checked: a write that
            // begins after this check sees the flag and waits for this lock to
            // clear it; one that began before makes us give up.
            if self.writes_begun.load(Ordering::SeqCst) != epoch
                || self.writes_running.load(Ordering::SeqCst) != 0
            {
                self.flags.store(before, Ordering::SeqCst);
                return Ok(false);
            }
        }
        let written = (|| {
            for (block, hash) in &hashes.touched {
                if *block < self.geo.blocks {
                    self.file
                        .write_all_at(hash, self.geo.hashes_offset + block * 32)?;
                }
            }
            let tree_len: u64 = hashes.tree.level_bytes().map(|l| l.len() as u64).sum();
            if tree_len > self.geo.tree_len {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "hash tree does not fit the layer's tree region",
                ));
            }
            // Level by level, without a copy of the whole tree.
            let mut at = self.geo.tree_offset;
            for level in hashes.tree.level_bytes() {
                self.file.write_all_at(level, at)?;
                at += level.len() as u64;
            }
            self.file.sync_data()?;
            self.file.write_all_at(
                &encode_header(&self.geo, flags, Some(content), &self.label),
                0,
            )?;
            self.file.sync_data()
        })();
        match written {
            Ok(()) => {
                *self.content_hash.lock() = Some(content);
                Ok(true)
            }
            Err(e) => {
                self.flags
                    .store(before & !FLAG_HASHES_VALID, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    /// The stored tree of the version whose top this layer is, if the
    /// layer's hashes are valid. A tree whose nodes do not match their
    /// children is an error, not a tree.
    pub fn stored_tree(&self) -> io::Result<Option<Tree>> {
        if self.flags.load(Ordering::SeqCst) & FLAG_HASHES_VALID == 0 {
            return Ok(None);
        }
        let mut at = self.geo.tree_offset;
        let tree = Tree::read(self.geo.blocks, |level| {
            let bytes = level.as_flattened_mut();
            self.file.read_exact_at(bytes, at)?;
            at += bytes.len() as u64;
            Ok(())
        })
        .map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData => io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", self.path.display()),
            ),
            _ => e,
        })?;
        if Some(tree.content(self.geo.size)) != *self.content_hash.lock() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: the stored tree does not give the recorded content hash",
                    self.path.display()
                ),
            ));
        }
        Ok(Some(tree))
    }

    /// Reads the whole stored hash table (one entry per block).
    pub fn stored_hashes(&self) -> io::Result<Vec<[u8; 32]>> {
        self.stored_block_hashes(0, self.geo.blocks)
    }

    /// The stored hashes of blocks `[from, to)`, in one read.
    pub fn stored_block_hashes(&self, from: u64, to: u64) -> io::Result<Vec<[u8; 32]>> {
        let mut raw = vec![0u8; (to.saturating_sub(from) * 32) as usize];
        self.file
            .read_exact_at(&mut raw, self.geo.hashes_offset + from * 32)?;
        Ok(raw
            .chunks_exact(32)
            .map(|c| c.try_into().unwrap_or([0u8; 32]))
            .collect())
    }

    /// Copies logical `[offset, offset+len)` of this layer's data into `dst`
    /// at the same place, inside the kernel (`copy_file_range`).
    pub fn copy_data_to(&self, dst: &Layer, offset: u64, len: u64) -> io::Result<()> {
        let copied = self.copy_data_inner(dst, offset, len);
        dst.changes.fetch_add(1, Ordering::SeqCst);
        copied
    }

    fn copy_data_inner(&self, dst: &Layer, offset: u64, len: u64) -> io::Result<()> {
        let mut src_pos = (self.geo.data_offset + offset) as i64;
        let mut dst_pos = (dst.geo.data_offset + offset) as i64;
        let mut left = len as usize;
        while left > 0 {
            // SAFETY: plain syscall on descriptors we own, with offsets we own.
            let n = unsafe {
                libc::copy_file_range(
                    self.file.as_raw_fd(),
                    &mut src_pos,
                    dst.file.as_raw_fd(),
                    &mut dst_pos,
                    left,
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "layer file ended during a copy",
                ));
            }
            left -= n as usize;
        }
        Ok(())
    }

    /// Clears the sealed flag: only to undo a seal whose operation never completed.
    /// Seals the layer with the hashes it already stores, if they are valid
    /// and no write began since `epoch` (see [`Layer::quiet_epoch`]); false
    /// if they are not (then hash it and [`Layer::store_hashes`]).
    pub fn seal_as_hashed(&self, epoch: u64) -> io::Result<bool> {
        let _serial = self.flush_lock.lock();
        let flags = self.flags.load(Ordering::SeqCst);
        let content = *self.content_hash.lock();
        let quiet = self.writes_begun.load(Ordering::SeqCst) == epoch
            && self.writes_running.load(Ordering::SeqCst) == 0;
        if flags & FLAG_HASHES_VALID == 0 || content.is_none() || !quiet {
            return Ok(false);
        }
        let new = flags | FLAG_SEALED;
        // Claimed before the header is written: a write arriving now waits
        // on the flush lock and then finds the layer sealed.
        self.flags.store(new, Ordering::SeqCst);
        let written = self
            .file
            .write_all_at(&encode_header(&self.geo, new, content, &self.label), 0)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            self.flags.store(flags, Ordering::SeqCst);
            return Err(e);
        }
        Ok(true)
    }

    pub fn unseal(&self) -> io::Result<()> {
        let _serial = self.flush_lock.lock();
        let flags = self.flags.load(Ordering::SeqCst);
        if flags & FLAG_SEALED == 0 {
            return Ok(());
        }
        let new = flags & !FLAG_SEALED;
        let content = *self.content_hash.lock();
        self.file.write_all_at(
            &encode_header(
                &self.geo,
                new,
                content.filter(|_| new & FLAG_HASHES_VALID != 0),
                &self.label,
            ),
            0,
        )?;
        self.file.sync_data()?;
        self.flags.store(new, Ordering::SeqCst);
        Ok(())
    }

    /// Reads the stored hash of one block.
    pub fn stored_block_hash(&self, block: u64) -> io::Result<[u8; 32]> {
        Ok(self.stored_block_hashes(block, block + 1)?[0])
    }

    /// The stored hashes of `blocks` (ascending), each run of consecutive
    /// blocks in one read of at most `HASH_RUN` entries.
    pub fn stored_hashes_of(&self, blocks: &[u64]) -> io::Result<Vec<[u8; 32]>> {
        let mut out = Vec::with_capacity(blocks.len());
        let mut i = 0;
        while i < blocks.len() {
            let mut j = i + 1;
            while j < blocks.len() && j - i < HASH_RUN && blocks[j] == blocks[j - 1] + 1 {
                j += 1;
            }
            out.extend(self.stored_block_hashes(blocks[i], blocks[j - 1] + 1)?);
            i = j;
        }
        Ok(out)
    }
}

impl Drop for Layer {
    /// A layer closed with unflushed allocations makes them durable: closing
    /// must not lose what a later open would otherwise never see.
    fn drop(&mut self) {
        if self.writable && !self.dirty_pages.lock().is_empty() {
            if let Err(e) = self.flush() {
                tracing::error!(path = %self.path.display(), error = %e, "flushing a layer at close failed");
            }
        }
    }
}

/// A layer file mapped whole, read-only and shared (it sees the page cache).
#[derive(Debug)]
struct Mapping {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the mapping is read-only memory of the kernel's page cache, valid
// until dropped; nothing here reads or writes through the pointer.
unsafe impl Send for Mapping {}
// SAFETY: as for Send.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn of(file: &File) -> io::Result<Mapping> {
        let len = usize::try_from(file.metadata()?.len()).map_err(io::Error::other)?;
        if len == 0 {
            return Err(io::Error::other("an empty file"));
        }
        // SAFETY: a new read-only shared mapping of an open file; the kernel
        // picks the address. The file may be closed after: the mapping
        // holds its own reference.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr as *const u8,
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr + len` is the mapping made in `of`, and every
        // `MappedBytes` borrowing it is gone (they borrow its layer).
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// Reads the bitmap of a layer: only the parts of its region the file holds
/// data in (a region never written is a hole), and of those only the pages
/// with a bit set are kept. Returns the bitmap and its count of set bits.
fn read_bitmap(file: &File, geo: &Geometry) -> io::Result<(Bitmap, u64)> {
    let bitmap = Bitmap::new(geo.chunks);
    let mut allocated = 0u64;
    let start = geo.bitmap_offset;
    let end = geo.bitmap_offset + geo.bitmap_len;
    let mut buf = Vec::new();
    for (from, to) in data_ranges(file, start, end)? {
        if buf.is_empty() {
            buf = vec![0u8; BITMAP_READ.min(end - start) as usize];
        }
        // Whole pages: the ranges are in file system blocks, pages are 4 KiB.
        let mut pos = start + (from - start) / BITMAP_PAGE * BITMAP_PAGE;
        let to = (start + (to - start).div_ceil(BITMAP_PAGE) * BITMAP_PAGE).min(end);
        while pos < to {
            let n = (to - pos).min(BITMAP_READ) as usize;
            file.read_exact_at(&mut buf[..n], pos)?;
            for (i, raw) in buf[..n].chunks_exact(BITMAP_PAGE as usize).enumerate() {
                if raw.iter().all(|&b| b == 0) {
                    continue;
                }
                let page = ((pos - start) / BITMAP_PAGE) as usize + i;
                for (j, w) in raw.chunks_exact(8).enumerate() {
                    let word_idx = page * PAGE_WORDS + j;
                    if word_idx >= bitmap.words {
                        break;
                    }
                    let mut b = [0u8; 8];
                    b.copy_from_slice(w);
                    let mut word = u64::from_le_bytes(b);
                    if word_idx == bitmap.words - 1 && !geo.chunks.is_multiple_of(64) {
                        word &= (1u64 << (geo.chunks % 64)) - 1;
                    }
                    if word != 0 {
                        allocated += u64::from(word.count_ones());
                        bitmap.word_cell(word_idx).store(word, Ordering::Relaxed);
                    }
                }
            }
            pos += n as u64;
        }
    }
    Ok((bitmap, allocated))
}

/// The parts of `[start, end)` of `file` that hold data (`SEEK_DATA` and
/// `SEEK_HOLE`); all of it where the file system cannot tell.
fn data_ranges(file: &File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        // SAFETY: plain syscalls on our own descriptor; this code reads with
        // pread only, so moving the file position disturbs nothing.
        let data = unsafe { libc::lseek(fd, pos as i64, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(out), // no data past pos
                _ => Ok(vec![(start, end)]),
            };
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as i64, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        out.push((data, hole));
        pos = hole;
    }
    Ok(out)
}

fn write_zeros(file: &File, mut pos: u64, mut len: u64) -> io::Result<()> {
    let zeros = vec![0u8; 1 << 20];
    while len > 0 {
        let n = len.min(zeros.len() as u64);
        file.write_all_at(&zeros[..n as usize], pos)?;
        pos += n;
        len -= n;
    }
    Ok(())
}

/// `bytes` for people: in the largest binary unit that keeps it whole, up to TiB.
pub(crate) fn size_text(bytes: u64) -> String {
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn encode_header(geo: &Geometry, flags: u32, content: Option<[u8; 32]>, label: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_LEN as usize];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&flags.to_le_bytes());
    h[16..24].copy_from_slice(&geo.size.to_le_bytes());
    h[24..28].copy_from_slice(&(CHUNK as u32).to_le_bytes());
    h[28..32].copy_from_slice(&(HASH_BLOCK as u32).to_le_bytes());
    h[32..40].copy_from_slice(&geo.bitmap_offset.to_le_bytes());
    h[40..48].copy_from_slice(&geo.bitmap_len.to_le_bytes());
    h[48..56].copy_from_slice(&geo.hashes_offset.to_le_bytes());
    h[56..64].copy_from_slice(&geo.hashes_len.to_le_bytes());
    h[64..72].copy_from_slice(&geo.data_offset.to_le_bytes());
    if let Some(c) = content {
        h[72..104].copy_from_slice(&c);
    }
    h[104..112].copy_from_slice(&geo.tree_offset.to_le_bytes());
    h[112..120].copy_from_slice(&geo.tree_len.to_le_bytes());
    let label = &label[..label.len().min(MAX_LABEL)];
    h[LABEL_AT..LABEL_AT + 2].copy_from_slice(&(label.len() as u16).to_le_bytes());
    h[LABEL_AT + 2..LABEL_AT + 2 + label.len()].copy_from_slice(label);
    let sum = blake3::hash(&h[..4088]);
    h[4088..4096].copy_from_slice(&sum.as_bytes()[..8]);
    h
}

/// Reads and checks the header of the layer file `file` (at `path`).
type Header = (Geometry, u32, Option<[u8; 32]>, Vec<u8>);

/// Reads and checks the header of the layer file at `path`, without opening
/// the layer.
fn read_header_of(path: &Path) -> Result<Header, ImageError> {
    let file = File::open(path).map_err(|source| ImageError::OpenLayer {
        path: path.to_owned(),
        source,
    })?;
    read_header(&file, path)
}

fn read_header(file: &File, path: &Path) -> Result<Header, ImageError> {
    let corrupt = |reason: String| ImageError::CorruptLayer {
        path: path.to_owned(),
        reason,
    };
    let mut header = [0u8; HEADER_LEN as usize];
    file.read_exact_at(&mut header, 0)
        .map_err(|e| corrupt(format!("cannot read header: {e}")))?;
    let (geo, flags, content) = decode_header(&header).map_err(corrupt)?;
    Ok((geo, flags, content, header_label(&header).to_vec()))
}

/// The label of a header [`decode_header`] accepted.
fn header_label(h: &[u8]) -> &[u8] {
    let len = u16::from_le_bytes([h[LABEL_AT], h[LABEL_AT + 1]]) as usize;
    &h[LABEL_AT + 2..LABEL_AT + 2 + len.min(MAX_LABEL)]
}

pub(crate) fn decode_header(h: &[u8]) -> Result<(Geometry, u32, Option<[u8; 32]>), String> {
    let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let u64_at = |o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&h[o..o + 8]);
        u64::from_le_bytes(a)
    };
    if &h[0..8] != MAGIC {
        return Err("not a vstream layer file (bad magic)".into());
    }
    if blake3::hash(&h[..4088]).as_bytes()[..8] != h[4088..4096] {
        return Err("header checksum mismatch".into());
    }
    let version = u32_at(8);
    if version == 1 {
        return Err(
            "layer format 1 (before version hash trees) is not supported; export it with \
             the vstream that wrote it and import it again"
                .into(),
        );
    }
    if version != FORMAT_VERSION {
        return Err(format!(
            "format version {version} is not supported (expected {FORMAT_VERSION})"
        ));
    }
    let flags = u32_at(12);
    if usize::from(u16::from_le_bytes([h[LABEL_AT], h[LABEL_AT + 1]])) > MAX_LABEL {
        return Err("label length out of range".into());
    }
    let size = u64_at(16);
    if size == 0 || size > MAX_SIZE {
        return Err(format!("virtual size {size} is out of range"));
    }
    if u64::from(u32_at(24)) != CHUNK || u64::from(u32_at(28)) != HASH_BLOCK {
        return Err("unsupported chunk or hash block size".into());
    }
    let geo = Geometry::for_size(size);
    let stored = [32, 40, 48, 56, 64, 104, 112].map(u64_at);
    if stored
        != [
            geo.bitmap_offset,
            geo.bitmap_len,
            geo.hashes_offset,
            geo.hashes_len,
            geo.data_offset,
            geo.tree_offset,
            geo.tree_len,
        ]
    {
        return Err("section offsets do not match the virtual size".into());
    }
    let mut content = [0u8; 32];
    content.copy_from_slice(&h[72..104]);
    let content = (flags & FLAG_HASHES_VALID != 0).then_some(content);
    Ok((geo, flags, content))
}

/// Chunks searched at once for data by [`next_allocated`] (16 MiB).
const HOLE_STRIDE: u64 = 4096;

/// The first chunk of `[from, to)` that any of `layers` holds, else `to`.
/// A 16 MiB stretch none of them touches is passed in one look per layer
/// (a bitmap page never set is one look), so walking a hole costs what the
/// data around it does, not the hole's size.
pub(crate) fn next_allocated(layers: &[std::sync::Arc<Layer>], from: u64, to: u64) -> u64 {
    let mut c = from;
    while c < to {
        let stretch = (c + HOLE_STRIDE).min(to);
        if !layers.iter().any(|l| l.any_allocated(c, stretch)) {
            c = stretch;
            continue;
        }
        while c < stretch {
            if layers.iter().any(|l| l.is_allocated(c)) {
                return c;
            }
            c += 1;
        }
    }
    to
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_data_is_the_layers_bytes_and_stops_at_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.layer");
        let size = 1 << 20;
        let l = Layer::create(&p, size).unwrap();
        let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 13 % 251) as u8).collect();
        l.write_data(&data, 8192).unwrap();
        let m = l
            .mapped_data(8192 + 100, 30_000)
            .expect("a layer file maps");
        assert_eq!(m.len(), 30_000);
        // Handed to the kernel, as a front door does: write(2) to a file.
        let out = dir.path().join("out");
        std::fs::write(&out, m).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), data[100..30_100]);
        let unwritten = l.mapped_data(size - 4096, 4096).expect("the last chunk");
        std::fs::write(&out, unwritten).unwrap();
        assert_eq!(
            std::fs::read(&out).unwrap(),
            vec![0u8; 4096],
            "a hole is zeros"
        );
        assert!(l.mapped_data(size - 4096, 4097).is_none(), "past the end");
        assert!(l.mapped_data(u64::MAX - 10, 20).is_none(), "no overflow");
    }

    #[test]
    fn create_write_flush_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.layer");
        let l = Layer::create(&p, 10 << 20).unwrap();
        assert_eq!(l.allocated_chunks(), 0);
        l.write_data(&[7u8; 8192], 4096).unwrap();
        assert_eq!(l.set_allocated(1, 3), 2);
        assert_eq!(l.set_allocated(1, 3), 0);
        l.flush().unwrap();
        drop(l);
        let l = Layer::open(&p, false).unwrap();
        assert!(!l.is_allocated(0) && l.is_allocated(1) && l.is_allocated(2) && !l.is_allocated(3));
        let mut b = [0u8; 8192];
        assert!(l
            .read_data(crate::disk::as_uninit(&mut b), 4096, false)
            .unwrap());
        assert_eq!(b, [7u8; 8192]);
    }

    #[test]
    fn a_flush_with_nothing_new_skips_its_sync_and_one_after_a_change_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layer::create(&dir.path().join("c.layer"), 1 << 20).unwrap();
        let covered =
            |l: &Layer| l.changes.load(Ordering::SeqCst) == l.synced_changes.load(Ordering::SeqCst);
        assert!(!covered(&l), "a layer's first flush syncs");
        l.flush().unwrap();
        assert!(covered(&l));
        // Data over chunks already allocated: no bitmap page, still a sync.
        l.write_data(&[3u8; 4096], 0).unwrap();
        assert!(!covered(&l), "a write is owed a sync");
        l.flush().unwrap();
        assert!(covered(&l));
        l.punch_data(0, CHUNK).unwrap();
        assert!(!covered(&l), "a punch is owed a sync");
        l.flush().unwrap();
        let other = Layer::create(&dir.path().join("d.layer"), 1 << 20).unwrap();
        other.flush().unwrap();
        l.copy_data_to(&other, 0, 4096).unwrap();
        assert!(!covered(&other), "a copy is owed a sync at its destination");
        other.flush().unwrap();
        assert!(covered(&other) && covered(&l));
        // A set bit alone (its page dirty) still flushes.
        l.set_allocated(1, 2);
        l.flush().unwrap();
        assert!(l.dirty_pages.lock().is_empty());
    }

    /// A label given at creation is in the header: it opens with the layer,
    /// reads without opening it, and outlives every rewrite of the header.
    #[test]
    fn a_label_stays_in_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.layer");
        let label = b"v@1/v1-0.layer\nboot-7\n";
        let l = Layer::create_unsynced(&p, 1 << 20, label).unwrap();
        assert_eq!(l.label(), label);
        l.write_data(&[1u8; 4096], 0).unwrap();
        l.set_allocated(0, 1);
        l.flush().unwrap();
        drop(l);
        assert_eq!(Layer::recorded_label(&p).unwrap(), label);
        let l = Layer::open(&p, true).unwrap();
        assert_eq!(l.label(), label);
        let hashes = crate::hash::hash_disk(&crate::Disk::read_only(vec![std::sync::Arc::new(
            Layer::open(&p, false).unwrap(),
        )]))
        .unwrap();
        l.store_hashes(&hashes, true).unwrap();
        l.unseal().unwrap();
        drop(l);
        assert_eq!(
            Layer::recorded_label(&p).unwrap(),
            label,
            "after a seal and an unseal"
        );
        // Another layer has none; one too long is refused, and a header
        // whose label length is out of range does not open.
        let other = Layer::create(&dir.path().join("o.layer"), 1 << 20).unwrap();
        assert!(other.label().is_empty());
        let long = vec![b'x'; MAX_LABEL + 1];
        assert!(Layer::create_unsynced(&dir.path().join("l.layer"), 1 << 20, &long).is_err());
        let mut h = encode_header(&Geometry::for_size(1 << 20), 0, None, b"");
        h[LABEL_AT..LABEL_AT + 2].copy_from_slice(&(MAX_LABEL as u16 + 1).to_le_bytes());
        let sum = blake3::hash(&h[..4088]);
        h[4088..4096].copy_from_slice(&sum.as_bytes()[..8]);
        assert!(decode_header(&h).unwrap_err().contains("label"));
    }

    #[test]
    fn an_unsynced_layer_acknowledges_no_flush_before_its_folder_is_synced() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("cache");
        std::fs::create_dir(&folder).unwrap();
        let p = folder.join("c.layer");
        let l = Layer::create_unsynced(&p, 1 << 20, b"").unwrap();
        assert!(
            l.owed_sync.load(Ordering::SeqCst),
            "the layer and its folder are owed"
        );
        l.write_data(&[3u8; 4096], 0).unwrap();
        l.set_allocated(0, 1);
        // A folder that cannot be synced fails the flush, and stays owed.
        let away = dir.path().join("away");
        std::fs::rename(&folder, &away).unwrap();
        let e = l.flush().expect_err("the folder is gone");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(l.owed_sync.load(Ordering::SeqCst));
        std::fs::rename(&away, &folder).unwrap();
        l.flush().unwrap();
        assert!(!l.owed_sync.load(Ordering::SeqCst), "paid once");
        drop(l);
        let l = Layer::open(&p, false).unwrap();
        assert!(l.is_allocated(0), "the flushed write is kept");
    }

    #[test]
    fn unflushed_bits_are_not_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.layer");
        let l = Layer::create(&p, 1 << 20).unwrap();
        l.write_data(&[1u8; 4096], 0).unwrap();
        l.set_allocated(0, 1);
        std::mem::forget(l); // no flush, no close: like kill -9
        let l = Layer::open(&p, true).unwrap();
        assert!(!l.is_allocated(0));
    }

    #[test]
    fn bit_ranges_across_words() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layer::create(&dir.path().join("a"), 64 << 20).unwrap();
        assert_eq!(l.set_allocated(60, 200), 140);
        assert_eq!(l.allocated_chunks(), 140);
        assert_eq!(l.clear_allocated(100, 300), 100);
        assert!(
            l.is_allocated(99) && !l.is_allocated(100) && l.is_allocated(60) && !l.is_allocated(59)
        );
    }

    #[test]
    fn corrupt_headers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.layer");
        drop(Layer::create(&p, 1 << 20).unwrap());
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xff], 20).unwrap();
        let err = Layer::open(&p, false).unwrap_err().to_string();
        assert!(err.contains("checksum"), "{err}");
        std::fs::write(&p, b"hello").unwrap();
        assert!(Layer::open(&p, false).is_err());
        assert!(Layer::create(&dir.path().join("b"), 1000).is_err());
    }

    #[test]
    fn hashes_and_seal_persist() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.layer");
        let l = Layer::create(&p, 1 << 20).unwrap();
        assert_eq!(l.content_hash(), None);
        let mut tree = Tree::zero(1 << 20);
        tree.update([(0, [7u8; 32])]);
        let content = tree.content(1 << 20);
        let hashes = DiskHashes {
            touched: vec![(3, [9u8; 32])],
            tree: tree.clone(),
            content,
        };
        l.store_hashes(&hashes, true).unwrap();
        drop(l);
        let l = Layer::open(&p, true).unwrap();
        assert!(l.is_sealed());
        assert_eq!(l.content_hash(), Some(content));
        assert_eq!(l.stored_block_hash(3).unwrap(), [9u8; 32]);
        // Runs and gaps read in pieces give the same hashes as one by one.
        let blocks = [0, 2, 3, 4, 9, 15];
        let each: Vec<_> = blocks
            .iter()
            .map(|&b| l.stored_block_hash(b).unwrap())
            .collect();
        assert_eq!(l.stored_hashes_of(&blocks).unwrap(), each);
        assert_eq!(each[2], [9u8; 32]);
        assert_eq!(l.stored_tree().unwrap(), Some(tree));
        drop(l.begin_write().unwrap());
        drop(l);
        assert_eq!(Layer::open(&p, false).unwrap().content_hash(), None);
    }
}
