//! Moving a sealed layer file between stores: what the sender reads, and the
//! partial file the receiver builds, segment by segment, possibly from
//! several senders and across restarts.
//!
//! A layer travels as its *metadata*, then its *data*:
//!
//! ```text
//!   metadata = header (4 KiB) | bitmap (1 bit a chunk) | hash entries of the blocks it touches | tree
//!   data(from, to) = the allocated chunks in [from, to), in order, concatenated
//! ```
//!
//! Both sides know the bitmap, so data carries no framing: its length is
//! fixed by the bitmap and is checked. Unallocated chunks never travel; a
//! layer that changed 1% of a disk sends 1% of it plus ~0.005% of metadata.
//!
//! The receiver writes into a file that is not a `*.layer` in any vDisk
//! folder until it is complete ([`Incoming::finish`]), and records which
//! segments are durable in a small journal beside it, so a restart resumes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::ImageError;
use crate::hash::Tree;
use crate::layer::{decode_header, Geometry, Layer, CHUNK, FLAG_HASHES_VALID};
use crate::layer::{FLAG_SEALED, HASH_BLOCK, HEADER_LEN};

/// Chunks in a transfer segment: 16 MiB of logical disk.
pub const SEGMENT_CHUNKS: u64 = 4096;

/// The metadata of `layer` to send. Only a sealed layer with valid hashes
/// travels: anything else can still change.
pub fn export_meta(layer: &Layer) -> Result<Vec<u8>, ImageError> {
    let header = layer.header_bytes()?;
    let (geo, flags, _) = decode_header(&header).map_err(|reason| corrupt(layer.path(), reason))?;
    if flags & (FLAG_SEALED | FLAG_HASHES_VALID) != FLAG_SEALED | FLAG_HASHES_VALID {
        return Err(ImageError::Invalid(format!(
            "layer {} is not sealed; only sealed layers are replicated",
            layer.path().display()
        )));
    }
    let bitmap = layer.bitmap_bytes();
    let mut out = header;
    out.extend_from_slice(&bitmap);
    let touched = touched_blocks(&bitmap, geo.chunks, geo.blocks);
    for hash in layer.stored_hashes_of(&touched)? {
        out.extend_from_slice(&hash);
    }
    out.extend_from_slice(&layer.tree_bytes()?);
    Ok(out)
}

/// Bytes a sender reads and sends at a time: small enough to stay in the
/// CPU's cache between the page cache and the socket (a 16 MiB buffer makes
/// each copy run at memory speed, several times slower here).
pub const PIECE: usize = 128 * 1024;

/// Bytes the receiver reads, checks and writes at a time: its writes go
/// straight to the disk, which takes 1 MiB writes at twice the rate of
/// 128 KiB ones here.
const RECEIVE_PIECE: usize = 1024 * 1024;

/// What direct writes must be aligned to: their offset, length and buffer.
const DIRECT_ALIGN: usize = 4096;

/// A buffer whose start is aligned for direct writes.
struct AlignedBuf {
    /// `DIRECT_ALIGN` bytes more than the buffer, which starts at `at`.
    bytes: Vec<u8>,
    at: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let bytes = vec![0u8; len + DIRECT_ALIGN];
        let at = bytes.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuf { bytes, at }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        let len = self.bytes.len() - DIRECT_ALIGN;
        &mut self.bytes[self.at..self.at + len]
    }
}

/// The runs `(first chunk, count)` of chunks in `[from, to)` for which `set`.
fn runs(from: u64, to: u64, set: impl Fn(u64) -> bool) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut c = from;
    while c < to {
        if !set(c) {
            c += 1;
            continue;
        }
        let start = c;
        while c < to && set(c) {
            c += 1;
        }
        out.push((start, c - start));
    }
    out
}

/// Bytes of data `layer` holds in chunks `[from, to)`: the length of its answer.
pub fn data_len(layer: &Layer, from: u64, to: u64) -> u64 {
    runs(from, to.min(layer.chunks()), |c| layer.is_allocated(c))
        .iter()
        .map(|(_, n)| n * CHUNK)
        .sum()
}

/// Streams the data of `layer`'s allocated chunks in `[from, to)`, in order,
/// in pieces of at most [`PIECE`] bytes; `emit` returns false to stop.
pub fn export_data_pieces(
    layer: &Layer,
    from: u64,
    to: u64,
    mut emit: impl FnMut(Vec<u8>) -> bool,
) -> Result<(), ImageError> {
    for (start, n) in runs(from, to.min(layer.chunks()), |c| layer.is_allocated(c)) {
        let mut off = start * CHUNK;
        let end = (start + n) * CHUNK;
        while off < end {
            let len = ((end - off) as usize).min(PIECE);
            let mut piece = vec![0u8; len];
            // The last chunk may be short: the rest of it travels as zeros.
            let inside = len.min(layer.size().saturating_sub(off) as usize);
            layer.read_raw(&mut piece[..inside], off)?;
            if !emit(piece) {
                return Ok(());
            }
            off += len as u64;
        }
    }
    Ok(())
}

/// The data of `layer`'s allocated chunks in `[from, to)`, concatenated.
pub fn export_data(layer: &Layer, from: u64, to: u64) -> Result<Vec<u8>, ImageError> {
    let mut out = Vec::with_capacity(data_len(layer, from, to) as usize);
    export_data_pieces(layer, from, to, |p| {
        out.extend_from_slice(&p);
        true
    })?;
    Ok(out)
}

/// The hash blocks that any set bit of `bitmap` falls in, in order.
fn touched_blocks(bitmap: &[u8], chunks: u64, blocks: u64) -> Vec<u64> {
    let per = (HASH_BLOCK / CHUNK) as usize / 8; // bitmap bytes per block: 2
    (0..blocks)
        .filter(|&b| {
            let first = b as usize * per;
            let last = (first + per).min(bitmap.len());
            bitmap[first.min(last)..last].iter().any(|&x| x != 0)
        })
        .filter(|&b| b * (HASH_BLOCK / CHUNK) < chunks)
        .collect()
}

fn corrupt(path: &Path, reason: String) -> ImageError {
    ImageError::CorruptLayer {
        path: path.to_owned(),
        reason,
    }
}

fn bit(bitmap: &[u8], c: u64) -> bool {
    bitmap[(c / 8) as usize] & (1 << (c % 8)) != 0
}

/// A layer file being received.
pub struct Incoming {
    path: PathBuf,
    journal: PathBuf,
    file: File,
    /// The same file opened for direct I/O, for the data: a copy of many
    /// GiB goes straight to the disk instead of through the page cache,
    /// which here is several times slower (and would push out the pages
    /// that devices are reading). `None` where the filesystem refuses it.
    direct: Option<File>,
    /// Cleared when a direct write is refused: the page cache from then on.
    direct_ok: AtomicBool,
    geo: Geometry,
    bitmap: Vec<u8>,
    /// Per segment: its data is durable in the file.
    done: Vec<bool>,
    /// The stored hash of each block the layer touches.
    hashes: std::collections::HashMap<u64, [u8; 32]>,
    /// Nothing lies below this layer in the version it tops: every block it
    /// touches can be checked from its own data as it arrives.
    bottom: bool,
}

impl Incoming {
    /// Starts receiving into `path` (a file outside any vDisk folder) the
    /// layer described by `meta`, or resumes a partial file there with the
    /// same header. `expected` is the content hash the layer must carry, when
    /// the catalog says.
    pub fn open(
        path: &Path,
        meta: &[u8],
        expected: Option<[u8; 32]>,
    ) -> Result<Incoming, ImageError> {
        let bad = |reason: String| corrupt(path, format!("the sender's metadata: {reason}"));
        if meta.len() < HEADER_LEN as usize {
            return Err(bad("too short".into()));
        }
        let header = &meta[..HEADER_LEN as usize];
        let (geo, flags, content) = decode_header(header).map_err(&bad)?;
        if flags & FLAG_SEALED == 0
            || content.is_none()
            || (expected.is_some() && content != expected)
        {
            return Err(bad(
                "not a sealed layer with the expected content hash".into()
            ));
        }
        let bitmap_len = geo.chunks.div_ceil(8) as usize;
        let tree_len = Tree::stored_len(geo.blocks) as usize;
        let at = HEADER_LEN as usize;
        if meta.len() < at + bitmap_len {
            return Err(bad("the bitmap is cut short".into()));
        }
        let bitmap = meta[at..at + bitmap_len].to_vec();
        let touched = touched_blocks(&bitmap, geo.chunks, geo.blocks);
        let hashes_at = at + bitmap_len;
        let tree_at = hashes_at + touched.len() * 32;
        if meta.len() != tree_at + tree_len {
            return Err(bad(format!(
                "{} bytes where the bitmap implies {}",
                meta.len(),
                tree_at + tree_len
            )));
        }
        let journal = journal_path(path);
        let werr = |source| ImageError::Write {
            path: path.to_owned(),
            source,
        };
        let resumable = File::open(path)
            .and_then(|f| {
                let mut h = vec![0u8; HEADER_LEN as usize];
                f.read_exact_at(&mut h, 0)?;
                Ok(h == header)
            })
            .unwrap_or(false);
        let segments = geo.chunks.div_ceil(SEGMENT_CHUNKS) as usize;
        let mut done = vec![false; segments];
        if resumable {
            if let Ok(j) = fs::read(&journal) {
                for (i, d) in done.iter_mut().enumerate() {
                    *d = j.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0);
                }
            }
        } else {
            let _ = fs::remove_file(&journal);
            let _ = fs::remove_file(path);
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(werr)?;
        if !resumable {
            file.set_len(geo.data_offset + geo.size).map_err(werr)?;
        }
        // The metadata is written on every open, resumed or not: only the
        // journal says anything is durable, and it covers data only after
        // a sync, which covers these writes too. `finish` syncs it all.
        // The bitmap pages with a bit set: the others stay holes, which
        // opening the layer skips (an empty 8 TiB layer has 256 MiB of them).
        for (i, page) in bitmap.chunks(4096).enumerate() {
            if page.iter().any(|&b| b != 0) {
                file.write_all_at(page, geo.bitmap_offset + i as u64 * 4096)
                    .map_err(werr)?;
            }
        }
        for (i, block) in touched.iter().enumerate() {
            let h = &meta[hashes_at + i * 32..hashes_at + i * 32 + 32];
            file.write_all_at(h, geo.hashes_offset + block * 32)
                .map_err(werr)?;
        }
        file.write_all_at(&meta[tree_at..], geo.tree_offset)
            .map_err(werr)?;
        file.write_all_at(header, 0).map_err(werr)?;
        let hashes = touched
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                let mut h = [0u8; 32];
                h.copy_from_slice(&meta[hashes_at + i * 32..hashes_at + i * 32 + 32]);
                (b, h)
            })
            .collect();
        let inc = Incoming {
            path: path.to_owned(),
            journal,
            file,
            direct: open_direct(path),
            direct_ok: AtomicBool::new(true),
            geo,
            bitmap,
            done,
            hashes,
            bottom: false,
        };
        inc.allocate().map_err(werr)?;
        Ok(inc)
    }

    /// Opens a complete layer file in place, to repair its data.
    pub fn repair(path: &Path) -> Result<Incoming, ImageError> {
        let layer = Layer::open(path, false)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| ImageError::OpenLayer {
                path: path.to_owned(),
                source,
            })?;
        let geo = Geometry::for_size(layer.size());
        let segments = geo.chunks.div_ceil(SEGMENT_CHUNKS) as usize;
        let bitmap = layer.bitmap_bytes();
        let touched = touched_blocks(&bitmap, geo.chunks, geo.blocks);
        let stored = layer.stored_hashes_of(&touched)?;
        let hashes = touched.into_iter().zip(stored).collect();
        Ok(Incoming {
            path: path.to_owned(),
            journal: journal_path(path),
            file,
            direct: open_direct(path),
            direct_ok: AtomicBool::new(true),
            geo,
            bitmap,
            done: vec![true; segments],
            hashes,
            bottom: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Says that nothing lies below this layer in its version (a base):
    /// then every block it touches is checked as it arrives.
    pub fn set_bottom(&mut self, bottom: bool) {
        self.bottom = bottom;
    }

    /// True if every chunk of block `b` is in this layer.
    fn holds_block(&self, b: u64) -> bool {
        let per = HASH_BLOCK / CHUNK;
        (b * per..((b + 1) * per).min(self.geo.chunks)).all(|c| bit(&self.bitmap, c))
    }

    /// Whether block `b`'s content can be known from this layer alone.
    fn checkable(&self, b: u64) -> bool {
        self.bottom || self.holds_block(b)
    }

    pub fn segments(&self) -> usize {
        self.done.len()
    }

    /// The chunk range of segment `i`.
    pub fn segment(&self, i: usize) -> (u64, u64) {
        let from = i as u64 * SEGMENT_CHUNKS;
        (from, (from + SEGMENT_CHUNKS).min(self.geo.chunks))
    }

    pub fn is_done(&self, i: usize) -> bool {
        self.done[i]
    }

    /// Segments whose data is not yet durable here.
    pub fn missing(&self) -> Vec<usize> {
        (0..self.done.len()).filter(|&i| !self.done[i]).collect()
    }

    /// Bytes of data the chunks `[from, to)` hold (what a sender sends for them).
    pub fn data_len(&self, from: u64, to: u64) -> u64 {
        runs(from, to.min(self.geo.chunks), |c| bit(&self.bitmap, c))
            .iter()
            .map(|(_, n)| n * CHUNK)
            .sum()
    }

    /// Data bytes of the whole layer, and of the segments already durable.
    pub fn progress(&self) -> (u64, u64) {
        let mut total = 0;
        let mut done = 0;
        for i in 0..self.done.len() {
            let (from, to) = self.segment(i);
            let n = self.data_len(from, to);
            total += n;
            if self.done[i] {
                done += n;
            }
        }
        (done, total)
    }

    /// Writes what a sender answered for chunks `[from, to)` in place.
    pub fn write_range(&self, from: u64, to: u64, data: &[u8]) -> Result<(), ImageError> {
        self.read_range(from, to, &mut &data[..])
    }

    /// Reads a sender's answer for chunks `[from, to)` from `src`, piece by
    /// piece, writing each in place. Exactly the bytes the bitmap implies
    /// must come; fewer or more is an error.
    pub fn read_range(
        &self,
        from: u64,
        to: u64,
        src: &mut (impl Read + ?Sized),
    ) -> Result<(), ImageError> {
        let expected = self.data_len(from, to);
        let short = |got: u64| {
            corrupt(
                &self.path,
                format!(
                    "the sender gave {got} bytes for chunks {from}..{to}, whose bitmap holds {expected}"
                ),
            )
        };
        let werr = |source| ImageError::Write {
            path: self.path.clone(),
            source,
        };
        let mut piece = AlignedBuf::new(RECEIVE_PIECE);
        let buf = piece.as_mut();
        let mut got = 0u64;
        // The block being checked as its data goes by.
        let mut block: Option<BlockCheck> = None;
        for (start, n) in runs(from, to.min(self.geo.chunks), |c| bit(&self.bitmap, c)) {
            let mut off = start * CHUNK;
            let end = (start + n) * CHUNK;
            while off < end {
                let len = ((end - off) as usize).min(RECEIVE_PIECE);
                src.read_exact(&mut buf[..len]).map_err(|_| short(got))?;
                self.check_blocks(&mut block, off, &buf[..len])?;
                let inside = len.min(self.geo.size.saturating_sub(off) as usize);
                self.write_data(off, &buf[..inside]).map_err(werr)?;
                off += len as u64;
                got += len as u64;
            }
        }
        self.finish_block(block.take())?;
        let mut extra = [0u8; 1];
        if src.read(&mut extra).map_err(|_| short(got))? != 0 {
            return Err(short(got + 1));
        }
        Ok(())
    }

    /// Allocates the disk space of every chunk the layer holds, before any
    /// data comes. Direct writes into allocated space run side by side (an
    /// allocating one holds the file's lock until its I/O is done), no
    /// allocation waits for the writes in flight (as `fallocate` does), and
    /// a full disk fails here, before any data moved.
    fn allocate(&self) -> io::Result<()> {
        if self.direct.is_none() {
            return Ok(());
        }
        for (start, n) in runs(0, self.geo.chunks, |c| bit(&self.bitmap, c)) {
            let at = self.geo.data_offset + start * CHUNK;
            let len = (n * CHUNK).min(self.geo.size.saturating_sub(start * CHUNK));
            // SAFETY: fallocate on our own open descriptor; no memory is passed.
            let r = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    0,
                    at as libc::off_t,
                    len as libc::off_t,
                )
            };
            if r != 0 {
                let e = io::Error::last_os_error();
                // A filesystem without it: the writes allocate as they go.
                if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                    return Ok(());
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Writes data of logical offset `off`: directly when it is aligned
    /// and the filesystem allows, else through the page cache.
    fn write_data(&self, off: u64, data: &[u8]) -> io::Result<()> {
        let at = self.geo.data_offset + off;
        if let Some(direct) = &self.direct {
            let aligned = at.is_multiple_of(DIRECT_ALIGN as u64)
                && data.len().is_multiple_of(DIRECT_ALIGN)
                && (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN);
            if aligned && self.direct_ok.load(Ordering::Relaxed) {
                match direct.write_all_at(data, at) {
                    Ok(()) => return Ok(()),
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        self.direct_ok.store(false, Ordering::Relaxed);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        self.file.write_all_at(data, at)
    }

    /// The bytes of block `b` inside the disk.
    fn block_len(&self, b: u64) -> u64 {
        HASH_BLOCK.min(self.geo.size - b * HASH_BLOCK)
    }

    /// Feeds data arriving for logical offset `off` into the check of the
    /// blocks it falls in: a block is finished once the data moves past it.
    fn check_blocks(
        &self,
        block: &mut Option<BlockCheck>,
        mut off: u64,
        mut data: &[u8],
    ) -> Result<(), ImageError> {
        while !data.is_empty() {
            let b = off / HASH_BLOCK;
            if block.as_ref().is_some_and(|c| c.block != b) {
                self.finish_block(block.take())?;
            }
            let in_block = ((b + 1) * HASH_BLOCK - off).min(data.len() as u64) as usize;
            if self.checkable(b) {
                let check = block.get_or_insert_with(|| BlockCheck::new(b));
                let at = off - b * HASH_BLOCK;
                let inside = (self.block_len(b).saturating_sub(at) as usize).min(in_block);
                check.feed(at, &data[..inside]);
            }
            off += in_block as u64;
            data = &data[in_block..];
        }
        Ok(())
    }

    /// Checks a block against its stored hash.
    fn finish_block(&self, block: Option<BlockCheck>) -> Result<(), ImageError> {
        let Some(mut check) = block else {
            return Ok(());
        };
        let b = check.block;
        // Chunks the layer does not hold read as zeros (a base's holes).
        check.zeros_to(self.block_len(b));
        if self.hashes.get(&b) != Some(check.hasher.finalize().as_bytes()) {
            return Err(corrupt(
                &self.path,
                format!("block {b} from the sender does not match its hash"),
            ));
        }
        Ok(())
    }

    /// Makes the data written so far durable and records segments `done`
    /// as complete in the journal.
    pub fn commit(&mut self, done: &[usize]) -> Result<(), ImageError> {
        self.sync()?;
        self.record(done)
    }

    /// Makes the data written so far durable (writers may go on meanwhile).
    pub fn sync(&self) -> Result<(), ImageError> {
        self.file.sync_data().map_err(|source| ImageError::Write {
            path: self.path.clone(),
            source,
        })
    }

    /// Records segments `done`, whose data a [`Incoming::sync`] made durable
    /// after it was written, as complete in the journal.
    pub fn record(&mut self, done: &[usize]) -> Result<(), ImageError> {
        let werr = |source| ImageError::Write {
            path: self.path.clone(),
            source,
        };
        for &i in done {
            self.done[i] = true;
        }
        let mut j = vec![0u8; self.done.len().div_ceil(8)];
        for (i, d) in self.done.iter().enumerate() {
            if *d {
                j[i / 8] |= 1 << (i % 8);
            }
        }
        let tmp = self.journal.with_extension("journal.tmp");
        fs::write(&tmp, &j).map_err(werr)?;
        File::open(&tmp).and_then(|f| f.sync_all()).map_err(werr)?;
        fs::rename(&tmp, &self.journal).map_err(werr)?;
        Ok(())
    }

    /// Marks segments `done` as arrived without journalling them: for the
    /// last ones, just before [`Incoming::finish`] makes everything durable.
    pub fn mark_arrived(&mut self, done: &[usize]) {
        for &i in done {
            self.done[i] = true;
        }
    }

    /// A complete file: its data made durable, moved to `dest`; the journal goes.
    pub fn finish(self, dest: &Path) -> Result<(), ImageError> {
        if let Some(i) = self.done.iter().position(|d| !d) {
            return Err(ImageError::Invalid(format!(
                "{}: segment {i} has not arrived",
                self.path.display()
            )));
        }
        let werr = |source| ImageError::Write {
            path: dest.to_owned(),
            source,
        };
        // The data; the name follows with the folder sync of whoever moves
        // the file into a store (a crash before that only costs a new copy).
        self.file.sync_data().map_err(werr)?;
        fs::rename(&self.path, dest).map_err(werr)?;
        let _ = fs::remove_file(&self.journal);
        Ok(())
    }
}

/// The hash of one block, computed as its data goes by, without
/// assembling the block.
struct BlockCheck {
    block: u64,
    hasher: blake3::Hasher,
    /// Bytes of the block hashed so far.
    fed: u64,
}

impl BlockCheck {
    fn new(block: u64) -> BlockCheck {
        BlockCheck {
            block,
            hasher: blake3::Hasher::new(),
            fed: 0,
        }
    }

    /// Hashes zeros up to offset `to` within the block.
    fn zeros_to(&mut self, to: u64) {
        const ZEROS: [u8; CHUNK as usize] = [0; CHUNK as usize];
        while self.fed < to {
            let n = (to - self.fed).min(CHUNK) as usize;
            self.hasher.update(&ZEROS[..n]);
            self.fed += n as u64;
        }
    }

    /// Hashes `data`, which lies at offset `at` within the block (after
    /// what was fed, any gap reading as zeros).
    fn feed(&mut self, at: u64, data: &[u8]) {
        self.zeros_to(at);
        self.hasher.update(data);
        self.fed += data.len() as u64;
    }
}

/// `path` opened for direct writes, where the filesystem allows it.
fn open_direct(path: &Path) -> Option<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

fn journal_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".journal");
    PathBuf::from(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{hash, Disk};
    use std::sync::Arc;

    /// A sealed layer over `size` bytes with `writes` (offset, byte) of 5000 bytes each.
    fn sealed(dir: &Path, size: u64, writes: &[(u64, u8)]) -> Arc<Layer> {
        let path = dir.join("src.layer");
        let layer = Arc::new(Layer::create(&path, size).expect("create"));
        let disk = Disk::writable(vec![layer.clone()], None).expect("disk");
        for &(off, b) in writes {
            disk.write(&vec![b; 5000], off, false).expect("write");
        }
        disk.flush().expect("flush");
        let hashes = hash::hash_disk(&disk).expect("hash");
        layer.store_hashes(&hashes, true).expect("seal");
        drop(disk);
        layer
    }

    fn content(layer: &Layer) -> [u8; 32] {
        layer.content_hash().expect("hashed")
    }

    #[test]
    fn a_layer_travels_in_segments_and_resumes() {
        let dir = tempfile::tempdir().expect("tmp");
        // 100 MiB + 1 KiB: seven segments, the last one short, a short last chunk.
        let size = (100 << 20) + 1024;
        let writes = [(0, 1u8), (40 << 20, 2), (size - 5000, 3), (70 << 20, 4)];
        let src = sealed(dir.path(), size, &writes);
        let meta = export_meta(&src).expect("meta");
        assert!(meta.len() < 64 * 1024, "metadata is small: {}", meta.len());
        let part = dir.path().join("x.partial");
        let mut inc = Incoming::open(&part, &meta, Some(content(&src))).expect("open");
        inc.set_bottom(true);
        assert_eq!(inc.segments(), 7);
        let (done, total) = inc.progress();
        assert_eq!((done, total), (0, src.allocated_bytes()));
        // Two segments arrive, then the receiver stops.
        for i in [0usize, 2] {
            let (from, to) = inc.segment(i);
            let data = export_data(&src, from, to).expect("data");
            inc.write_range(from, to, &data).expect("write");
        }
        inc.commit(&[0, 2]).expect("commit");
        drop(inc);
        let mut inc = Incoming::open(&part, &meta, Some(content(&src))).expect("resume");
        assert_eq!(inc.missing(), vec![1, 3, 4, 5, 6], "resumed, not restarted");
        assert!(inc.finish(&dir.path().join("early.layer")).is_err());
        let mut inc2 = Incoming::open(&part, &meta, Some(content(&src))).expect("resume again");
        inc2.set_bottom(true);
        for i in inc2.missing() {
            let (from, to) = inc2.segment(i);
            let data = export_data(&src, from, to).expect("data");
            // Data of the wrong length is refused, and so is a flipped bit.
            assert!(inc2.write_range(from, to, &[0u8; 7]).is_err());
            if !data.is_empty() {
                let mut bad = data.clone();
                bad[data.len() / 2] ^= 4;
                let err = inc2.write_range(from, to, &bad).unwrap_err();
                assert!(err.to_string().contains("does not match its hash"), "{err}");
            }
            inc2.write_range(from, to, &data).expect("write");
            inc2.commit(&[i]).expect("commit");
        }
        inc = inc2;
        let dest = dir.path().join("copy.layer");
        inc.finish(&dest).expect("finish");
        assert!(!part.exists());
        let copy = Arc::new(Layer::open(&dest, false).expect("open copy"));
        assert_eq!(content(&copy), content(&src));
        let disk = Disk::read_only(vec![copy.clone()]);
        assert_eq!(
            hash::check_top(&disk).expect("check"),
            None,
            "every block checks"
        );
        let a = Disk::read_only(vec![src.clone()]);
        let mut x = vec![0u8; size as usize];
        let mut y = vec![0u8; size as usize];
        a.read(&mut x, 0, false).expect("read");
        disk.read(&mut y, 0, false).expect("read");
        assert!(x == y, "same bytes");
    }

    #[test]
    fn bad_metadata_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let src = sealed(dir.path(), 1 << 20, &[(0, 9)]);
        let meta = export_meta(&src).expect("meta");
        let part = dir.path().join("p");
        assert!(Incoming::open(&part, &meta[..100], Some(content(&src))).is_err());
        assert!(Incoming::open(&part, &meta[..meta.len() - 1], Some(content(&src))).is_err());
        assert!(
            Incoming::open(&part, &meta, Some([7u8; 32])).is_err(),
            "wrong hash"
        );
        let mut flipped = meta.clone();
        flipped[20] ^= 1;
        assert!(Incoming::open(&part, &flipped, Some(content(&src))).is_err());
        let open = Layer::create(&dir.path().join("open.layer"), 1 << 20).expect("c");
        assert!(export_meta(&open).is_err(), "unsealed layers do not travel");
    }

    #[test]
    fn repair_rewrites_data_in_place() {
        let dir = tempfile::tempdir().expect("tmp");
        let src = sealed(dir.path(), 4 << 20, &[(8192, 5), (1 << 20, 6)]);
        let copy_path = dir.path().join("copy.layer");
        fs::copy(src.path(), &copy_path).expect("copy");
        let copy = Layer::open(&copy_path, false).expect("open");
        // Flip one byte of data.
        let f = OpenOptions::new().write(true).open(&copy_path).expect("rw");
        let data_offset = fs::metadata(&copy_path).expect("m").len() - (4 << 20);
        f.write_all_at(&[0xff], data_offset + 8192 + 10)
            .expect("flip");
        drop(f);
        let disk = Disk::read_only(vec![Arc::new(copy)]);
        let bad = hash::check_top(&disk).expect("check").expect("found");
        assert_eq!(bad, 0);
        let per = HASH_BLOCK / CHUNK;
        let inc = Incoming::repair(&copy_path).expect("repair");
        let data = export_data(&src, bad * per, (bad + 1) * per).expect("data");
        inc.write_range(bad * per, (bad + 1) * per, &data)
            .expect("w");
        drop(inc);
        let disk = Disk::read_only(vec![Arc::new(Layer::open(&copy_path, false).expect("o"))]);
        assert_eq!(hash::check_top(&disk).expect("check"), None);
    }
}
