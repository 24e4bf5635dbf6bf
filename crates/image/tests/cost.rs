//! What a vDisk costs follows its data, not its virtual size: an empty
//! layer of 1 TiB opens and verifies with memory measured by a counting
//! allocator, and a size the store's file system cannot hold is refused
//! with a clear error.

use std::alloc::{GlobalAlloc, Layout, System};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use vstream_image::hash::{self, zero_content_hash};
use vstream_image::{Layer, Store, VersionState, HASH_BLOCK};

/// Counts the bytes allocated now and the most allocated at once.
struct Counting;

static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = NOW.fetch_add(by, Ordering::SeqCst) + by;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

// SAFETY: every call goes to the system allocator unchanged; only counts
// are kept beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees for `alloc` (a layout of nonzero
        // size) are the system allocator's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`: the caller's guarantees are passed on.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator with `layout`, so from the
        // system allocator, as the caller of `dealloc` guarantees.
        unsafe { System.dealloc(ptr, layout) };
        NOW.fetch_sub(layout.size(), Ordering::SeqCst);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from the system allocator with `layout`, and
        // `new_size` is valid for it, as the caller of `realloc` guarantees.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            NOW.fetch_sub(layout.size(), Ordering::SeqCst);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The tests of this file one at a time: the counts are process-wide.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `f` and gives the most bytes it had allocated at once beyond what
/// was allocated before.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = NOW.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let out = f();
    (out, PEAK.load(Ordering::SeqCst).saturating_sub(before))
}

const TIB: u64 = 1 << 40;
const MIB: usize = 1 << 20;

#[test]
fn an_empty_layer_opens_and_verifies_in_memory_that_follows_its_data() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let size = TIB;

    // Creating hashes the disk: the stored tree is 1/128 Ki of the size
    // (8 MiB here), but there is no hash per block in memory (512 MiB).
    let (created, peak) = peak_of(|| store.create("big", size, 1));
    created.expect("create a 1 TiB vDisk");
    assert!(
        peak < 32 * MIB,
        "creating an empty 1 TiB vDisk allocated {} MiB at once",
        peak / MIB
    );
    let props = store.properties("big").expect("properties");
    let recorded = props.versions[0].content_hash.clone().expect("hash");
    assert_eq!(recorded, hash::to_hex(&zero_content_hash(size)));

    // Opening reads no bitmap (32 MiB of it at 1 TiB): the file has none.
    let (chain, peak) = peak_of(|| store.chain("big", 1));
    let chain = chain.expect("open version 1");
    assert!(
        peak < MIB,
        "opening an empty 1 TiB layer allocated {} KiB at once",
        peak / 1024
    );
    drop(chain);

    // Verifying: the stored hashes of the blocks some layer touches, and a
    // tree built as they stream by (not 2 x 512 MiB of block hashes).
    let (verified, peak) = peak_of(|| store.verify("big", 1, &recorded));
    verified.expect("an empty vDisk verifies");
    assert!(
        peak < 2 * MIB,
        "verifying an empty 1 TiB vDisk allocated {} KiB at once",
        peak / 1024
    );

    // With data in three places far apart, the cost follows those places,
    // and the hash is the one the data gives.
    {
        let disk = store
            .chain("big", 1)
            .expect("chain")
            .writable()
            .expect("writable");
        for (i, at) in [0, size / 3 + 12_345, size - HASH_BLOCK]
            .into_iter()
            .enumerate()
        {
            disk.write(&[i as u8 + 1; 5000], at, false).expect("write");
        }
        disk.flush().expect("flush");
        let top = disk.layers()[0].clone();
        let epoch = top.quiet_epoch().expect("no write running");
        let hashes = hash::hash_disk(&disk).expect("hash");
        assert_ne!(hashes.content, zero_content_hash(size));
        assert_eq!(hashes.touched.len(), 3, "blocks touched");
        assert!(top
            .store_hashes_if_unchanged(epoch, &hashes)
            .expect("store hashes"));
        let expected = hash::to_hex(&hashes.content);
        drop(disk);
        let (verified, peak) = peak_of(|| store.verify("big", 1, &expected));
        verified.expect("verifies with data");
        assert!(
            peak < 2 * MIB,
            "verifying 1 TiB with 3 blocks of data allocated {} KiB at once",
            peak / 1024
        );
        // A stored block hash that lies is still found.
        let path = top.path().to_owned();
        drop(top);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        let hashes_offset = 4096 + (size / 4096).div_ceil(8).next_multiple_of(4096);
        let last_block = size / HASH_BLOCK - 1;
        f.write_all_at(&[0xee; 32], hashes_offset + last_block * 32)
            .expect("spoil a stored hash");
        drop(f);
        let err = store
            .verify("big", 1, &expected)
            .expect_err("a spoilt hash must fail verification")
            .to_string();
        assert!(err.contains(&format!("block {last_block}")), "{err}");
    }
}

/// A chain of sealed layers reads through an index of which layer holds each
/// chunk: it is made where the layers hold data, not one byte per chunk of
/// the virtual size (256 MiB at 1 TiB).
#[test]
fn the_index_of_a_long_chain_follows_its_data() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    store.create("long", TIB, 1).expect("create");
    for now in 2..5 {
        let v = store.new_version("long", now).expect("new version");
        store
            .promote("long", v.number, VersionState::Test, now)
            .expect("promote");
    }
    let (chain, peak) = peak_of(|| store.chain("long", 4));
    let chain = chain.expect("open version 4");
    assert_eq!(chain.layers.len(), 4);
    assert!(
        chain.index.is_some(),
        "a chain of 4 sealed layers is indexed"
    );
    assert!(
        peak < 4 * MIB,
        "opening 4 empty 1 TiB layers and their index allocated {} KiB at once",
        peak / 1024
    );
    let mut buf = vec![0u8; 4096];
    chain
        .read_only()
        .read(&mut buf, TIB - 4096, false)
        .expect("read");
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn a_size_the_file_system_cannot_hold_is_refused_clearly() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");

    // Past the limit for new vDisks, on any file system.
    for size in [65 * TIB, 1 << 50] {
        let err = store
            .create("huge", size, 1)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("at most 64 TiB"), "{err}");
        assert!(!store.exists("huge"));
    }

    // 16 TiB: whether this file system holds a file that long (the layer
    // file is a little longer) decides. ext4 with 4 KiB blocks does not.
    let size = 16 * TIB;
    let probe = dir.path().join("probe");
    let holds = std::fs::File::create(&probe)
        .expect("probe file")
        .set_len(size + TIB)
        .map_err(|e| e.raw_os_error());
    std::fs::remove_file(&probe).expect("remove probe");
    match holds {
        Err(Some(libc::EFBIG)) => {
            let err = store
                .create("wide", size, 1)
                .expect_err("a file system that cannot hold it refuses it")
                .to_string();
            assert!(
                err.contains("16 TiB") && err.contains("more than the file system"),
                "not a clear error: {err}"
            );
            assert!(!store.exists("wide"));
            let tmp: Vec<_> = std::fs::read_dir(dir.path().join("tmp"))
                .expect("tmp")
                .collect();
            assert!(tmp.is_empty(), "left behind in tmp/: {tmp:?}");
        }
        Ok(()) => {
            // It holds it (XFS, Btrfs): the layer file is made, empty.
            let path = dir.path().join("wide.layer");
            let layer = Layer::create(&path, size).expect("a file system that holds it");
            assert_eq!((layer.size(), layer.allocated_chunks()), (size, 0));
        }
        Err(e) => panic!("probing the file system with a {size} byte file: errno {e:?}"),
    }
}
