//! Whether a layer's bytes are in the page cache, so that a front door may
//! send them from the connection's own thread without waiting for the disk.
//!
//! The kernel answers exactly (`cachestat(2)`, Linux 6.5), but one call per
//! 4 KiB read is about 7 % of the server's CPU per read at QD32 (it walks
//! the file's page-cache tree, one cache miss per level, every time). So a
//! layer remembers, per 2 MiB block of its data, when it last found the
//! whole block cached, and trusts that answer for a short window
//! ([`WINDOW_MS`]). A block found only partly cached is remembered too,
//! and each read in it is then asked of the kernel exactly, as before.
//!
//! What the window risks is time, never bytes: a page the kernel evicts
//! within it (memory pressure) is read from the disk by the `sendmsg` that
//! sends it, on the connection's thread, once. Every byte sent is still
//! the file's.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::OnceLock;

/// A block's size: a read of up to 256 KiB (the mapped path's largest)
/// mostly lies in one block, and a file that stays cached is asked about
/// once per block per window.
pub(crate) const BLOCK: u64 = 2 << 20;

/// How long a block found wholly cached is trusted to stay so.
pub(crate) const WINDOW_MS: u32 = 1000;

/// What a layer knows of its data's residency.
pub(crate) struct Residency {
    /// Bytes in the data region.
    size: u64,
    /// One word per block: 0 if never asked, else the time it was asked
    /// (milliseconds, shifted left one) with the low bit set if every page
    /// of it was cached then. Made at the first question.
    blocks: OnceLock<Box<[AtomicU32]>>,
    window_ms: u32,
}

impl Residency {
    pub(crate) fn new(size: u64) -> Residency {
        Residency::with_window(size, WINDOW_MS)
    }

    pub(crate) fn with_window(size: u64, window_ms: u32) -> Residency {
        Residency {
            size,
            blocks: OnceLock::new(),
            window_ms,
        }
    }

    /// Whether every page of data `[offset, offset + len)` is cached, where
    /// the data region starts at file position `data_offset` of `fd`.
    pub(crate) fn is_cached(&self, fd: i32, data_offset: u64, offset: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let Some(end) = offset.checked_add(len).filter(|&e| e <= self.size) else {
            return data_offset
                .checked_add(offset)
                .is_some_and(|pos| cachestat(fd, pos, len));
        };
        let block = offset / BLOCK;
        if (end - 1) / BLOCK != block {
            // Across two blocks (rare for reads this small): ask exactly.
            return cachestat(fd, data_offset + offset, len);
        }
        let blocks = self.blocks.get_or_init(|| {
            (0..self.size.div_ceil(BLOCK))
                .map(|_| AtomicU32::new(0))
                .collect()
        });
        let word = &blocks[block as usize];
        let now = now_ms();
        let seen = word.load(Ordering::Relaxed);
        if seen != 0 && now.wrapping_sub(seen >> 1) & (u32::MAX >> 1) < self.window_ms {
            if seen & 1 == 1 {
                return true;
            }
            return cachestat(fd, data_offset + offset, len);
        }
        let start = block * BLOCK;
        let whole = cachestat(
            fd,
            data_offset + start,
            (start + BLOCK).min(self.size) - start,
        );
        // (At tick 0 a partial block stores 0, "never asked": asked again.)
        word.store((now << 1) | u32::from(whole), Ordering::Relaxed);
        whole || cachestat(fd, data_offset + offset, len)
    }
}

/// A coarse monotonic clock in milliseconds, wrapping (31 bits are kept).
pub(crate) fn now_ms() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-parameter for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000) as u32 & (u32::MAX >> 1)
}

/// `cachestat(2)`'s system call number: one number on every architecture.
const SYS_CACHESTAT: libc::c_long = 451;

/// Whether all pages of the file's `[pos, pos + len)` are cached; `false`
/// on any error (an older kernel: `ENOSYS`, remembered).
pub(crate) fn cachestat(fd: i32, pos: u64, len: u64) -> bool {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    static MISSING: AtomicBool = AtomicBool::new(false);
    let Some(end) = pos.checked_add(len) else {
        return false;
    };
    if MISSING.load(Ordering::Relaxed) {
        return false;
    }
    let range = Range { off: pos, len };
    let mut stat = Stat::default();
    // SAFETY: `fd` is open for the call; `range` and `stat` are the layouts
    // the kernel reads and writes, alive for the call.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            fd,
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    if r != 0 {
        if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
            MISSING.store(true, Ordering::Relaxed);
        }
        return false;
    }
    let page = 4096u64;
    let pages = end.div_ceil(page) - pos / page;
    stat.nr_cache >= pages
}

/// Drops every page of the file `fd` from the page cache (a test's
/// eviction: `POSIX_FADV_DONTNEED`).
#[cfg(test)]
pub(crate) fn drop_cached(fd: i32) {
    // SAFETY: plain advice on a descriptor the caller holds open.
    let r = unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;

    const SIZE: u64 = 2 * BLOCK;
    /// Where the data starts in the test file: behind a 4 KiB header.
    const HEADER: u64 = 4096;

    /// A file of two blocks' data behind a header, synced and (just
    /// written) wholly cached, in a folder that lives as long as it.
    fn cached_file() -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        f.write_all_at(&vec![7u8; (HEADER + SIZE) as usize], 0)
            .unwrap();
        f.sync_all().unwrap();
        assert!(cachestat(f.as_raw_fd(), 0, HEADER + SIZE), "just written");
        (dir, f)
    }

    /// Drops the file's pages from the page cache, and checks it did.
    fn evict(f: &File) {
        drop_cached(f.as_raw_fd());
        assert!(
            !cachestat(f.as_raw_fd(), 0, HEADER + SIZE),
            "this filesystem keeps pages the kernel was told to drop"
        );
    }

    /// Reads data `[offset, offset + len)` into the page cache.
    fn load(f: &File, offset: u64, len: u64) {
        f.read_exact_at(&mut vec![0u8; len as usize], HEADER + offset)
            .unwrap();
    }

    /// What `memo` answers for data `[offset, offset + len)` of `f`.
    fn ask(memo: &Residency, f: &File, offset: u64, len: u64) -> bool {
        memo.is_cached(f.as_raw_fd(), HEADER, offset, len)
    }

    #[test]
    fn a_wholly_cached_block_is_trusted_for_its_window() {
        let (_dir, f) = cached_file();
        let memo = Residency::with_window(SIZE, 60_000);
        assert!(ask(&memo, &f, 8192, 4096));
        evict(&f);
        // Block 0 was found whole a moment ago: trusted, without asking.
        assert!(ask(&memo, &f, 100 << 10, 200 << 10));
        // Block 1 was never asked about: asked, and it is gone.
        assert!(!ask(&memo, &f, BLOCK, 4096));
        // With no window, nothing is trusted.
        assert!(!ask(&Residency::with_window(SIZE, 0), &f, 8192, 4096));
    }

    #[test]
    fn a_block_is_asked_again_once_its_window_has_passed() {
        let (_dir, f) = cached_file();
        let memo = Residency::with_window(SIZE, 30);
        assert!(ask(&memo, &f, 0, 4096));
        evict(&f);
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!ask(&memo, &f, 0, 4096));
        load(&f, 0, BLOCK);
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(ask(&memo, &f, 0, 4096), "cached again: asked again");
    }

    #[test]
    fn a_partly_cached_block_is_asked_read_by_read() {
        let (_dir, f) = cached_file();
        evict(&f);
        load(&f, 8192, 4096);
        let memo = Residency::with_window(SIZE, 60_000);
        for _ in 0..2 {
            assert!(ask(&memo, &f, 8192, 4096), "the one cached page");
            assert!(!ask(&memo, &f, 0, 4096), "a page never read");
            assert!(!ask(&memo, &f, 8192, 8192), "half of it cached");
        }
        // Read now: the block is still known as partial, and asked exactly.
        load(&f, 0, 4096);
        assert!(ask(&memo, &f, 0, 4096));
    }

    #[test]
    fn reads_across_blocks_or_past_the_end_are_asked_exactly() {
        let (_dir, f) = cached_file();
        let memo = Residency::with_window(SIZE, 60_000);
        assert!(ask(&memo, &f, 0, 4096));
        assert!(ask(&memo, &f, BLOCK, 4096));
        evict(&f);
        assert!(!ask(&memo, &f, BLOCK - 4096, 8192), "across");
        assert!(!ask(&memo, &f, SIZE - 4096, 8192), "past the end");
        assert!(!ask(&memo, &f, u64::MAX - 10, 20), "overflow");
        assert!(ask(&memo, &f, 0, 0), "nothing to read");
    }
}
