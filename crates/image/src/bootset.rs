//! A version's boot set: the parts of the disk its devices read while they
//! boot, learned from their sessions, so that a server can read them into
//! the page cache before the morning's boot storm rather than during it.
//!
//! A set is one bit per 64 KiB block of the virtual disk ([`BOOT_BLOCK`]),
//! kept in pages of 4 KiB, each made on the first block noted in it: a page
//! covers 2 GiB of disk, so a boot set costs a few pages whatever the
//! disk's size (and a 64 TiB disk 768 KiB of page slots). A block is set
//! once any device read a byte of it within its boot window; bits are
//! never cleared, so the set is the union of every boot seen.
//!
//! A set is a hint, never data. A file that cannot be read, or that was made
//! for another size, is said in the log and read as no set; the next save
//! replaces it. Its file, beside the version's layers, holds the pages that
//! have a block set:
//!
//! ```text
//!   0   "VSBOOTS3"
//!   8   virtual size, u64 LE
//!   16  block size, u32 LE (65536)
//!   20  pages that follow, u32 LE
//!   24  the version's boot_set_cleared_unix the set was learned after,
//!       u64 LE (0: never cleared)
//!   32  per page, by increasing index: its index (u64 LE), then its 512
//!       words (u64 LE); block b is page b / 32768, word b / 64 % 512,
//!       bit b % 64
//!   ..  blake3 of everything before, 32 bytes
//! ```
//!
//! The earlier forms are still read, as learned before any clear:
//! `VSBOOTS2` is this one without the stamp (pages at 24), `VSBOOTS1` has
//! every word of the disk after a reserved u32 where the page count is.
//!
//! A set cleared by an administrator stays cleared across the farm: a set
//! whose stamp is not its version's is dropped (its file removed), and
//! neither served to nor taken from a peer.

use std::fs;
use std::io;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::disk::Disk;
use crate::residency::now_ms;

/// One bit of a boot set covers this much of the disk.
pub const BOOT_BLOCK: u64 = 64 * 1024;
const MAGIC: &[u8; 8] = b"VSBOOTS3";
const MAGIC_V2: &[u8; 8] = b"VSBOOTS2";
const MAGIC_V1: &[u8; 8] = b"VSBOOTS1";
/// The header of this form; the earlier forms' is 24 bytes.
const HEADER: usize = 32;
const HEADER_V2: usize = 24;
const HASH: usize = 32;
/// Words in a page of a set, and the blocks it covers.
const PAGE_WORDS: usize = 512;
const PAGE_BLOCKS: u64 = PAGE_WORDS as u64 * 64;
/// A page in the file: its index and its words.
const PAGE_BYTES: usize = 8 + PAGE_WORDS * 8;
/// Most bytes a warm-up reads at once.
const WARM_PIECE: u64 = 1 << 20;

type Page = Box<[AtomicU64]>;

/// The blocks of one version read by its devices' boots.
#[derive(Debug)]
pub struct BootSet {
    size: u64,
    blocks: u64,
    pages: Box<[OnceLock<Page>]>,
    /// The version's `boot_set_cleared_unix` the set was learned after.
    cleared: u64,
    /// A bit was set since the last [`BootSet::take_changed`].
    changed: AtomicBool,
}

impl BootSet {
    /// An empty set for a disk of `size` bytes, of a version whose set was
    /// never cleared.
    pub fn new(size: u64) -> BootSet {
        BootSet::after_clear(size, 0)
    }

    /// An empty set for a disk of `size` bytes, of a version whose set was
    /// last cleared at `cleared` (its `boot_set_cleared_unix`; 0: never).
    pub fn after_clear(size: u64, cleared: u64) -> BootSet {
        let blocks = size.div_ceil(BOOT_BLOCK);
        BootSet {
            size,
            blocks,
            pages: (0..blocks.div_ceil(PAGE_BLOCKS))
                .map(|_| OnceLock::new())
                .collect(),
            cleared,
            changed: AtomicBool::new(false),
        }
    }

    /// The virtual size the set describes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The clear the set was learned after (0: none).
    pub fn cleared(&self) -> u64 {
        self.cleared
    }

    /// Page `p`, made if it is not yet.
    fn page(&self, p: usize) -> &Page {
        self.pages[p].get_or_init(|| (0..PAGE_WORDS).map(|_| AtomicU64::new(0)).collect())
    }

    /// The pages made, by index.
    fn made(&self) -> impl Iterator<Item = (usize, &Page)> {
        self.pages
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.get().map(|p| (i, p)))
    }

    /// Notes a read of `[offset, offset + len)`; what lies past the end is
    /// left out. A block already in the set costs one load.
    pub fn note(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.size);
        if len == 0 || offset >= end {
            return;
        }
        for block in offset / BOOT_BLOCK..end.div_ceil(BOOT_BLOCK) {
            let page = self.page((block / PAGE_BLOCKS) as usize);
            let word = &page[(block % PAGE_BLOCKS / 64) as usize];
            let bit = 1u64 << (block % 64);
            if word.load(Ordering::Relaxed) & bit == 0 {
                word.fetch_or(bit, Ordering::Relaxed);
                self.changed.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Whether a bit was set since the last call (and forgets it).
    pub fn take_changed(&self) -> bool {
        self.changed.swap(false, Ordering::Relaxed)
    }

    /// Makes the next [`BootSet::take_changed`] true (a save that failed).
    pub fn mark_changed(&self) {
        self.changed.store(true, Ordering::Relaxed);
    }

    /// The set as runs of the disk, `(offset, len)`, in order, adjacent
    /// blocks merged, the last one cut at the disk's end.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (p, page) in self.made() {
            for (w, word) in page.iter().enumerate() {
                let mut bits = word.load(Ordering::Relaxed);
                while bits != 0 {
                    let block =
                        p as u64 * PAGE_BLOCKS + w as u64 * 64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    // note, from_bytes and union set no block past the end.
                    let start = block * BOOT_BLOCK;
                    let len = BOOT_BLOCK.min(self.size - start);
                    match runs.last_mut() {
                        Some((o, l)) if *o + *l == start => *l += len,
                        _ => runs.push((start, len)),
                    }
                }
            }
        }
        runs
    }

    /// Whether no block is in the set.
    pub fn is_empty(&self) -> bool {
        self.made()
            .all(|(_, page)| page.iter().all(|w| w.load(Ordering::Relaxed) == 0))
    }

    /// Bytes of the disk the set covers.
    pub fn bytes(&self) -> u64 {
        self.runs().iter().map(|r| r.1).sum()
    }

    /// Adds every block of `other` (a set of the same disk, another
    /// server's) to this set; a set of another size, or learned after
    /// another clear, adds nothing.
    pub fn union(&self, other: &BootSet) {
        if other.size != self.size || other.cleared != self.cleared {
            return;
        }
        for (p, theirs) in other.made() {
            if theirs.iter().all(|w| w.load(Ordering::Relaxed) == 0) {
                continue;
            }
            for (w, o) in self.page(p).iter().zip(theirs.iter()) {
                let bits = o.load(Ordering::Relaxed);
                if bits & !w.load(Ordering::Relaxed) != 0 {
                    w.fetch_or(bits, Ordering::Relaxed);
                    self.changed.store(true, Ordering::Relaxed);
                }
            }
        }
    }

    /// The longest a set's file (and [`BootSet::to_bytes`]) can be for a
    /// disk of `size` bytes: every page present.
    pub fn encoded_len(size: u64) -> u64 {
        let pages = size.div_ceil(BOOT_BLOCK).div_ceil(PAGE_BLOCKS);
        (HEADER + HASH) as u64 + pages * PAGE_BYTES as u64
    }

    /// The set as its file holds it (the module's layout), checksum and all.
    pub fn to_bytes(&self) -> Vec<u8> {
        let pages: Vec<(usize, &Page)> = self
            .made()
            .filter(|(_, page)| page.iter().any(|w| w.load(Ordering::Relaxed) != 0))
            .collect();
        let mut out = Vec::with_capacity(HEADER + pages.len() * PAGE_BYTES + HASH);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&(BOOT_BLOCK as u32).to_le_bytes());
        out.extend_from_slice(&(pages.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.cleared.to_le_bytes());
        for (p, page) in pages {
            out.extend_from_slice(&(p as u64).to_le_bytes());
            for w in page.iter() {
                out.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
            }
        }
        let hash = blake3::hash(&out);
        out.extend_from_slice(hash.as_bytes());
        out
    }

    /// A set from [`BootSet::to_bytes`]' form (or an earlier one), for a
    /// disk of `size` bytes; the error says why it cannot be used (damaged,
    /// torn, another size, blocks past the disk's end). Whether it was
    /// learned after its version's last clear is the caller's to check
    /// ([`BootSet::cleared`]).
    pub fn from_bytes(bytes: &[u8], size: u64) -> Result<BootSet, String> {
        let magic = bytes.get(..8);
        let v1 = magic == Some(MAGIC_V1.as_slice());
        let header = if magic == Some(MAGIC.as_slice()) {
            HEADER
        } else if v1 || magic == Some(MAGIC_V2.as_slice()) {
            HEADER_V2
        } else {
            return Err("not a boot set".into());
        };
        if bytes.len() < header + HASH {
            return Err("not a boot set".into());
        }
        let (body, hash) = bytes.split_at(bytes.len() - HASH);
        if blake3::hash(body).as_bytes() != hash {
            return Err("its checksum does not match: a torn or damaged file".into());
        }
        let word = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().unwrap_or([0; 8]));
        let stored = word(8);
        let block = u32::from_le_bytes(body[16..20].try_into().unwrap_or([0; 4]));
        if stored != size || u64::from(block) != BOOT_BLOCK {
            return Err(format!(
                "made for a disk of {stored} bytes in blocks of {block}, not {size} in {BOOT_BLOCK}"
            ));
        }
        let cleared = if header == HEADER { word(24) } else { 0 };
        let set = BootSet::after_clear(size, cleared);
        // Each word's index among the whole disk's words, and its bits.
        let words: Box<dyn Iterator<Item = (u64, u64)> + '_> = if v1 {
            if body.len() - header != set.blocks.div_ceil(64) as usize * 8 {
                return Err("its length does not match its size".into());
            }
            Box::new((0..set.blocks.div_ceil(64)).map(|i| (i, word(header + i as usize * 8))))
        } else {
            let count = u32::from_le_bytes(body[20..24].try_into().unwrap_or([0; 4])) as usize;
            let len = body.len() - header;
            if !len.is_multiple_of(PAGE_BYTES) || len / PAGE_BYTES != count {
                return Err("its length does not match its page count".into());
            }
            let index = |n: usize| word(header + n * PAGE_BYTES);
            for n in 0..count {
                if (n > 0 && index(n) <= index(n - 1)) || index(n) >= set.pages.len() as u64 {
                    return Err(format!(
                        "page {} is out of order or past the disk's end",
                        index(n)
                    ));
                }
            }
            Box::new((0..count).flat_map(move |n| {
                let at = header + n * PAGE_BYTES + 8;
                (0..PAGE_WORDS)
                    .map(move |w| (index(n) * PAGE_WORDS as u64 + w as u64, word(at + w * 8)))
            }))
        };
        for (i, bits) in words.filter(|(_, b)| *b != 0) {
            let first = i * 64;
            if first >= set.blocks || (set.blocks - first < 64 && bits >> (set.blocks - first) != 0)
            {
                return Err("it holds blocks past the disk's end".into());
            }
            let page = set.page((i / PAGE_WORDS as u64) as usize);
            page[(i % PAGE_WORDS as u64) as usize].store(bits, Ordering::Relaxed);
        }
        Ok(set)
    }

    /// The set saved at `path` for a disk of `size` bytes: `None` if there is
    /// none, or if it cannot be used (said in the log: a set is a hint).
    pub fn load(path: &Path, size: u64) -> Option<BootSet> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read a boot set; it is learned again");
                return None;
            }
        };
        BootSet::from_bytes(&bytes, size)
            .inspect_err(|why| {
                tracing::warn!(path = %path.display(), %why, "a boot set cannot be used; it is learned again");
            })
            .ok()
    }

    /// Saves the set at `path`, replacing what is there by a rename from
    /// a `.tmp` file beside it (which the store's garbage collection removes
    /// if a crash leaves it). Not synced: a torn file fails its checksum.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let tmp = tmp_path(path);
        fs::write(&tmp, self.to_bytes())?;
        fs::rename(&tmp, path)
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(Default::default, |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".tmp-{name}"))
}

/// The file a version's boot set is kept in, in its vDisk's folder.
pub fn boot_set_file(version: u32) -> String {
    format!("boot-v{version}.set")
}

/// The version whose boot set file is named `name`, the inverse of
/// [`boot_set_file`]; `None` for any other name.
pub fn boot_set_version(name: &str) -> Option<u32> {
    let n = name
        .strip_prefix("boot-v")?
        .strip_suffix(".set")?
        .parse()
        .ok()?;
    (boot_set_file(n) == name).then_some(n)
}

/// Notes a session's reads into a boot set until its boot window closes.
/// After that, a read costs one relaxed load.
#[derive(Debug)]
pub struct BootRecorder {
    set: Arc<BootSet>,
    start_ms: u32,
    window_ms: u32,
    open: AtomicBool,
}

impl BootRecorder {
    /// Records into `set` for `window` from now (at most 24 days).
    pub fn new(set: Arc<BootSet>, window: Duration) -> BootRecorder {
        BootRecorder {
            set,
            start_ms: now_ms(),
            window_ms: window.as_millis().min(u128::from(u32::MAX >> 2)) as u32,
            open: AtomicBool::new(true),
        }
    }

    /// Notes a read of `[offset, offset + len)` if the window is open.
    #[inline]
    pub fn note(&self, offset: u64, len: u64) {
        if !self.open.load(Ordering::Relaxed) {
            return;
        }
        // The clock wraps at 31 bits; the window is far shorter.
        if now_ms().wrapping_sub(self.start_ms) & (u32::MAX >> 1) >= self.window_ms {
            self.open.store(false, Ordering::Relaxed);
            return;
        }
        self.set.note(offset, len);
    }

    /// Whether reads are still noted.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }
}

/// What [`warm`] (or [`uncached`]) found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Warmed {
    /// Bytes of the set.
    pub bytes: u64,
    /// Of them, bytes that were not in the page cache: read from the disk by
    /// [`warm`], left there by [`uncached`].
    pub from_disk: u64,
    pub took: Duration,
}

/// Reads the runs of `set` through `disk` (a version's read-only view), so
/// that its layers' pages are in the page cache, each run in pieces of at
/// most 1 MiB. A piece the kernel says is cached is not read at all; one it
/// cannot vouch for is read without waiting first, and counted as from the
/// disk only if that would have waited.
pub fn warm(disk: &Disk, set: &BootSet) -> io::Result<Warmed> {
    walk(disk, set, true)
}

/// How much of `set` the kernel cannot say is in the page cache, reading
/// nothing: for a set that is not read ahead (over the server's budget).
pub fn uncached(disk: &Disk, set: &BootSet) -> io::Result<Warmed> {
    walk(disk, set, false)
}

fn walk(disk: &Disk, set: &BootSet, read: bool) -> io::Result<Warmed> {
    let started = Instant::now();
    let mut done = Warmed::default();
    if set.size() != disk.size() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the boot set was made for a disk of another size",
        ));
    }
    let mut buf: Vec<MaybeUninit<u8>> = if read {
        vec![MaybeUninit::uninit(); WARM_PIECE as usize]
    } else {
        Vec::new()
    };
    for (offset, len) in set.runs() {
        let mut at = offset;
        while at < offset + len {
            let n = WARM_PIECE.min(offset + len - at);
            if !disk.is_cached(at, n) {
                if !read {
                    done.from_disk += n;
                } else {
                    let piece = &mut buf[..n as usize];
                    if !disk.read_uninit(piece, at, true)? {
                        disk.read_uninit(piece, at, false)?;
                        done.from_disk += n;
                    }
                }
            }
            done.bytes += n;
            at += n;
        }
    }
    done.took = started.elapsed();
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{Layer, CHUNK};
    use std::os::unix::io::AsRawFd;

    const MIB: u64 = 1 << 20;

    #[test]
    fn reads_become_runs_of_whole_blocks() {
        let set = BootSet::new(10 * MIB + 100);
        assert!(set.runs().is_empty());
        set.note(100, 1);
        set.note(BOOT_BLOCK - 1, 2); // across the first two blocks
        set.note(5 * MIB, 3 * BOOT_BLOCK);
        set.note(10 * MIB, 4096); // the short last block
        set.note(0, 0);
        set.note(20 * MIB, 10); // past the end: nothing
        assert_eq!(
            set.runs(),
            vec![
                (0, 2 * BOOT_BLOCK),
                (5 * MIB, 3 * BOOT_BLOCK),
                (10 * MIB, 100)
            ]
        );
        assert_eq!(set.bytes(), 5 * BOOT_BLOCK + 100);
        assert!(set.take_changed());
        set.note(5 * MIB + 7, 10);
        assert!(
            !set.take_changed(),
            "a block already in the set changes nothing"
        );
    }

    #[test]
    fn a_saved_set_loads_and_a_damaged_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(boot_set_file(3));
        assert!(BootSet::load(&path, 8 * MIB).is_none(), "no file, no set");
        let set = BootSet::new(8 * MIB);
        set.note(MIB, 3 * BOOT_BLOCK);
        set.note(7 * MIB, 1);
        set.save(&path).unwrap();
        assert!(!tmp_path(&path).exists());
        let back = BootSet::load(&path, 8 * MIB).unwrap();
        assert_eq!(back.runs(), set.runs());
        assert!(
            BootSet::load(&path, 16 * MIB).is_none(),
            "made for another size"
        );
        let mut bytes = fs::read(&path).unwrap();
        bytes[HEADER + 2] ^= 0x10;
        fs::write(&path, &bytes).unwrap();
        assert!(BootSet::load(&path, 8 * MIB).is_none(), "a flipped bit");
        fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(BootSet::load(&path, 8 * MIB).is_none(), "cut short");
        fs::write(&path, b"VSBOOTS1").unwrap();
        assert!(BootSet::load(&path, 8 * MIB).is_none(), "a header only");
        assert_eq!(
            set.to_bytes().len() as u64,
            BootSet::encoded_len(8 * MIB),
            "the length a peer's answer is read up to"
        );
    }

    /// A file of the given form: `words` after the 24-byte header, with
    /// `count` where the page count goes, and a good checksum.
    fn file(magic: &[u8; 8], size: u64, count: u32, words: &[u64]) -> Vec<u8> {
        let mut out = magic.to_vec();
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&(BOOT_BLOCK as u32).to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        for w in words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        let hash = blake3::hash(&out);
        out.extend_from_slice(hash.as_bytes());
        out
    }

    #[test]
    fn a_huge_disk_s_set_costs_its_pages_only() {
        let size = 64 << 40; // the largest vDisk
        let set = BootSet::new(size);
        assert_eq!(set.pages.len(), 32768);
        set.note(0, 4096);
        set.note(40 << 40, 3 * BOOT_BLOCK);
        set.note(size - 1, 10);
        assert_eq!(set.made().count(), 3);
        let bytes = set.to_bytes();
        assert_eq!(bytes.len(), HEADER + 3 * PAGE_BYTES + HASH);
        let back = BootSet::from_bytes(&bytes, size).unwrap();
        assert_eq!(back.runs(), set.runs());
        assert_eq!(
            back.runs(),
            [
                (0, BOOT_BLOCK),
                (40 << 40, 3 * BOOT_BLOCK),
                (size - BOOT_BLOCK, BOOT_BLOCK)
            ]
        );
        assert_eq!(back.made().count(), 3);
    }

    #[test]
    fn the_first_form_is_read_and_blocks_past_the_end_are_refused() {
        // VSBOOTS1: every word of the disk (8 MiB: 128 blocks, 2 words).
        let v1 = file(MAGIC_V1, 8 * MIB, 0, &[1 << 3, 1 << 6]);
        let set = BootSet::from_bytes(&v1, 8 * MIB).unwrap();
        assert_eq!(
            set.runs(),
            [(3 * BOOT_BLOCK, BOOT_BLOCK), (70 * BOOT_BLOCK, BOOT_BLOCK)]
        );
        assert!(BootSet::from_bytes(&file(MAGIC_V1, 8 * MIB, 0, &[1]), 8 * MIB).is_err());
        // 8 MiB + 100 bytes: 129 blocks; block 130 is past the end.
        let size = 8 * MIB + 100;
        let past = file(MAGIC_V1, size, 0, &[0, 0, 1 << 2]);
        let why = BootSet::from_bytes(&past, size).unwrap_err();
        assert!(why.contains("past the disk's end"), "{why}");
        let last = file(MAGIC_V1, size, 0, &[0, 0, 1]);
        assert_eq!(
            BootSet::from_bytes(&last, size).unwrap().runs(),
            [(128 * BOOT_BLOCK, 100)]
        );
        // VSBOOTS2: a page past the end, pages out of order, a bad count.
        let mut page = vec![5u64];
        page.extend([0u64; PAGE_WORDS]);
        assert!(BootSet::from_bytes(&file(MAGIC_V2, size, 1, &page), size).is_err());
        let big = 5 * PAGE_BLOCKS * BOOT_BLOCK;
        let mut two = vec![3u64, 1];
        two.extend([0u64; PAGE_WORDS - 1]);
        two.push(1);
        two.extend([0u64; PAGE_WORDS]);
        assert!(BootSet::from_bytes(&file(MAGIC_V2, big, 2, &two), big).is_err());
        two[PAGE_WORDS + 1] = 4;
        assert!(BootSet::from_bytes(&file(MAGIC_V2, big, 2, &two), big).is_ok());
        assert!(BootSet::from_bytes(&file(MAGIC_V2, big, 3, &two), big).is_err());
    }

    #[test]
    fn a_set_keeps_the_clear_it_was_learned_after() {
        let set = BootSet::after_clear(4 * MIB, 1_700_000_077);
        set.note(MIB, 1);
        let back = BootSet::from_bytes(&set.to_bytes(), 4 * MIB).unwrap();
        assert_eq!(back.cleared(), 1_700_000_077);
        assert_eq!(back.runs(), set.runs());
        // The second form was learned before any clear.
        let mut page = vec![0u64];
        page.push(1);
        page.extend([0u64; PAGE_WORDS - 1]);
        let v2 = BootSet::from_bytes(&file(MAGIC_V2, 4 * MIB, 1, &page), 4 * MIB).unwrap();
        assert_eq!((v2.cleared(), v2.runs()), (0, vec![(0, BOOT_BLOCK)]));
        // A set from before a clear adds nothing to one from after it.
        set.take_changed();
        set.union(&v2);
        assert!(!set.take_changed());
        assert_eq!(set.runs(), [(MIB, BOOT_BLOCK)]);
    }

    #[test]
    fn a_union_adds_another_set_s_blocks() {
        let ours = BootSet::new(4 * MIB);
        ours.note(0, 1);
        let theirs = BootSet::from_bytes(&ours.to_bytes(), 4 * MIB).unwrap();
        theirs.note(3 * MIB, 1);
        ours.take_changed();
        ours.union(&BootSet::from_bytes(&ours.to_bytes(), 4 * MIB).unwrap());
        assert!(!ours.take_changed(), "nothing new, nothing to save");
        let other_disk = BootSet::new(8 * MIB);
        other_disk.note(6 * MIB, 1);
        ours.union(&other_disk);
        assert!(!ours.take_changed(), "another disk's set adds nothing");
        ours.union(&theirs);
        assert!(ours.take_changed());
        assert_eq!(ours.runs(), vec![(0, BOOT_BLOCK), (3 * MIB, BOOT_BLOCK)]);
    }

    #[test]
    fn only_a_boot_set_file_s_name_gives_a_version() {
        assert_eq!(boot_set_version(&boot_set_file(12)), Some(12));
        for other in [
            "boot-v012.set",
            "boot-v.set",
            "boot-v1.set.tmp",
            ".tmp-boot-v1.set",
            "v1.layer",
        ] {
            assert_eq!(boot_set_version(other), None, "{other}");
        }
    }

    #[test]
    fn a_recorder_notes_only_within_its_window() {
        let set = Arc::new(BootSet::new(MIB));
        let open = BootRecorder::new(set.clone(), Duration::from_secs(60));
        open.note(0, 10);
        assert!(open.is_open());
        assert_eq!(set.runs(), vec![(0, BOOT_BLOCK)]);
        let closed = BootRecorder::new(set.clone(), Duration::ZERO);
        closed.note(512 * 1024, 10);
        assert!(!closed.is_open());
        assert_eq!(set.runs(), vec![(0, BOOT_BLOCK)]);
        // A window of 30 ms closes within a few coarse ticks.
        let short = BootRecorder::new(set.clone(), Duration::from_millis(30));
        std::thread::sleep(Duration::from_millis(80));
        short.note(BOOT_BLOCK, 1);
        assert!(!short.is_open());
        assert_eq!(set.runs(), vec![(0, BOOT_BLOCK)]);
    }

    #[test]
    fn warming_reads_the_set_into_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let size = 8 * MIB;
        let base = Layer::create(&dir.path().join("base.layer"), size).unwrap();
        base.write_data(&vec![7u8; (2 * MIB) as usize], MIB)
            .unwrap();
        base.set_allocated(MIB / CHUNK, 3 * MIB / CHUNK);
        base.flush().unwrap();
        let base = Arc::new(base);
        let top = Layer::create(&dir.path().join("top.layer"), size).unwrap();
        top.write_data(&vec![9u8; 4096], 5 * MIB).unwrap();
        top.set_allocated(5 * MIB / CHUNK, 5 * MIB / CHUNK + 1);
        top.flush().unwrap();
        let top = Arc::new(top);
        let disk = Disk::read_only(vec![base.clone(), top.clone()]);
        let set = BootSet::new(size);
        set.note(MIB + 4096, 3 * BOOT_BLOCK);
        set.note(5 * MIB, 100);
        let cached = |l: &Layer, offset: u64, len: u64| {
            let (fd, pos) = l.data_file(offset);
            crate::residency::cachestat(fd.as_raw_fd(), pos, len)
        };
        for l in [&base, &top] {
            crate::residency::drop_cached(l.data_file(0).0.as_raw_fd());
        }
        assert!(
            !cached(&base, MIB, 4 * BOOT_BLOCK),
            "this filesystem keeps pages the kernel was told to drop"
        );
        let counted = uncached(&disk, &set).unwrap();
        assert_eq!(counted.bytes, 5 * BOOT_BLOCK);
        assert!(counted.from_disk > 0, "{counted:?}");
        assert!(
            !cached(&base, MIB, 4 * BOOT_BLOCK),
            "counting what is not cached reads none of it"
        );
        let done = warm(&disk, &set).unwrap();
        assert_eq!(done.bytes, 5 * BOOT_BLOCK);
        assert!(done.from_disk > 0, "{done:?}");
        assert!(cached(&base, MIB, 4 * BOOT_BLOCK), "the base's run");
        assert!(cached(&top, 5 * MIB, 4096), "the top's chunk");
        let again = warm(&disk, &set).unwrap();
        assert_eq!(again.from_disk, 0, "a second warm-up finds it cached");
        assert_eq!(uncached(&disk, &set).unwrap().from_disk, 0);
        assert!(warm(&Disk::read_only(vec![base]), &BootSet::new(size / 2)).is_err());
    }
}
