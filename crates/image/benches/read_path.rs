//! The read path of a vDisk version: `Disk::read` through a chain of layers.
//!
//! ```text
//!   cargo bench -p vstream-image --bench read_path
//! ```
//!
//! 256 MiB vDisks in one temporary store (under `$TMPDIR`):
//!
//! * `1_layer`: one layer, every chunk allocated (an import, written in 1 MiB
//!   pieces).
//! * `1_layer_4k_writes`: the same, but written 4 KiB at a time in random
//!   order. Its page cache is then made of 4 KiB folios, like the 10-layer
//!   chain's files, whose runs are that short; the 1-layer file above gets
//!   large folios. This separates the cost of the chain from the cost of
//!   the file layout in the page cache.
//! * `10_layers`: ten versions, each of whose layers holds a different random
//!   10 % of the chunks (every chunk in exactly one layer), so random reads
//!   hit every layer alike. Built the way the server builds it:
//!   `new_version`, writes through the maintenance chain, `promote`.
//! * `10_layers_no_index`: the same layers as a bare `Disk::read_only(layers)`
//!   (no chain index: a walk down the bitmaps per chunk).
//!
//! The disks are opened as the server opens an export
//! (`Store::chain(..).read_only()`, which uses the chain index when the code
//! builds one). Page cache warm: every disk is read whole before measuring,
//! and reads use `nowait` (`RWF_NOWAIT`) as the server's inline path does; a
//! read the page cache could not answer is counted, reported and redone
//! blocking.
//!
//! Groups:
//! * `random_4k/*`: time per 4 KiB read at a random 4 KiB-aligned offset.
//! * `seq_256k/*`: time per 256 KiB read at consecutive offsets.
//! * `lookup_64g/*`: time per 4 KiB read at a random offset of a 64 GiB
//!   (sparse) 10-layer chain holding almost nothing, so almost every read is
//!   an unallocated chunk (zero fill, no syscall): the cost of finding the
//!   owner among 10 layers whose bitmaps (2 MiB each) no longer fit in the
//!   CPU cache, with and without the chain index.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use vstream_image::{Disk, Store, VersionState, CHUNK};

const SIZE: u64 = 256 << 20;
const LAYERS: usize = 10;
const CHUNKS: u64 = SIZE / CHUNK;

static WOULD_BLOCK: AtomicU64 = AtomicU64::new(0);

struct Fixture {
    _dir: tempfile::TempDir,
    one: Disk,
    one_4k: Disk,
    ten: Disk,
    ten_no_index: Disk,
    big: Disk,
    big_no_index: Disk,
}

/// Writes `chunks` (sorted) of `disk` with pseudo-random bytes, one call per
/// run of consecutive chunks.
fn fill(disk: &Disk, chunks: &[u64], rng: &mut impl Rng) {
    let mut i = 0;
    let mut buf = Vec::new();
    while i < chunks.len() {
        let mut j = i + 1;
        while j < chunks.len() && chunks[j] == chunks[j - 1] + 1 && j - i < 256 {
            j += 1;
        }
        buf.resize((j - i) * CHUNK as usize, 0);
        rng.fill(&mut buf[..]);
        disk.write(&buf, chunks[i] * CHUNK, false).expect("write");
        i = j;
    }
    disk.flush().expect("flush");
}

fn warm(disk: &Disk) {
    let mut buf = vec![0u8; 4 << 20];
    let mut off = 0;
    while off < disk.size() {
        disk.read(&mut buf, off, false).expect("warm-up read");
        off += buf.len() as u64;
    }
}

fn fixture() -> Fixture {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);

    // One layer holding everything.
    let staging = store.begin_import("one", SIZE).expect("begin_import");
    let all: Vec<u64> = (0..CHUNKS).collect();
    fill(staging.disk(), &all, &mut rng);
    store.commit_import(staging, 1).expect("commit_import");

    // The same, written 4 KiB at a time in random order.
    let mut order = all.clone();
    order.shuffle(&mut rng);
    let staging = store.begin_import("one4k", SIZE).expect("begin_import");
    let mut buf = vec![0u8; CHUNK as usize];
    for &c in &order {
        rng.fill(&mut buf[..]);
        staging.disk().write(&buf, c * CHUNK, false).expect("write");
    }
    store.commit_import(staging, 1).expect("commit_import");

    // Ten layers, each a different random 10 % of the chunks.
    let per = order.len().div_ceil(LAYERS);
    let mut parts: Vec<Vec<u64>> = order.chunks(per).map(<[u64]>::to_vec).collect();
    for p in &mut parts {
        p.sort_unstable();
    }
    store.create("ten", SIZE, 1).expect("create");
    // Version 1 (the created vDisk, production, unsealed) takes part 0.
    fill(
        &store
            .chain("ten", 1)
            .expect("chain")
            .writable()
            .expect("writable"),
        &parts[0],
        &mut rng,
    );
    for (i, part) in parts.iter().enumerate().skip(1) {
        let v = store.new_version("ten", 1 + i as u64).expect("new_version");
        let chain = store.chain("ten", v.number).expect("chain");
        fill(&chain.writable().expect("writable"), part, &mut rng);
        store
            .promote("ten", v.number, VersionState::Production, 1 + i as u64)
            .expect("promote");
    }
    let top = LAYERS as u32;
    eprintln!(
        "read_path: 256 MiB disks built in {:.1?}",
        started.elapsed()
    );
    let t = Instant::now();
    let (big, big_no_index) = big_chain(&store, &mut rng);
    eprintln!(
        "read_path: 64 GiB 10-layer chain built in {:.1?}",
        t.elapsed()
    );

    let one = store.chain("one", 1).expect("chain one").read_only();
    let one_4k = store.chain("one4k", 1).expect("chain one4k").read_only();
    let chain = store.chain("ten", top).expect("chain ten");
    assert_eq!(chain.layers.len(), LAYERS);
    eprintln!(
        "read_path: 10-layer chain opened with a chain index: {}",
        chain.index.is_some()
    );
    let ten_no_index = Disk::read_only(chain.layers.clone());
    let ten = chain.read_only();
    for d in [&one, &one_4k, &ten] {
        warm(d);
    }
    // The same bytes, whichever way the chain is read.
    let (mut a, mut b) = (vec![0u8; 1 << 20], vec![1u8; 1 << 20]);
    ten.read(&mut a, 100 << 20, false).unwrap();
    ten_no_index.read(&mut b, 100 << 20, false).unwrap();
    assert!(a == b);
    Fixture {
        _dir: dir,
        one,
        one_4k,
        ten,
        ten_no_index,
        big,
        big_no_index,
    }
}

/// A 64 GiB vDisk of ten versions, each writing 64 random chunks: the chain
/// opened as an export would be, and as bare layers.
fn big_chain(store: &Store, rng: &mut impl Rng) -> (Disk, Disk) {
    const BIG: u64 = 64 << 30;
    let some_chunks = |rng: &mut dyn rand::RngCore| {
        let mut v: Vec<u64> = (0..64).map(|_| rng.gen_range(0..BIG / CHUNK)).collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    store.create("big", BIG, 1).expect("create big");
    let part = some_chunks(rng);
    fill(
        &store
            .chain("big", 1)
            .expect("chain")
            .writable()
            .expect("writable"),
        &part,
        rng,
    );
    for i in 1..LAYERS as u64 {
        let v = store.new_version("big", 1 + i).expect("new_version");
        let part = some_chunks(rng);
        let chain = store.chain("big", v.number).expect("chain");
        fill(&chain.writable().expect("writable"), &part, rng);
        store
            .promote("big", v.number, VersionState::Production, 1 + i)
            .expect("promote");
    }
    let chain = store.chain("big", LAYERS as u32).expect("chain big");
    assert_eq!(chain.layers.len(), LAYERS);
    let bare = Disk::read_only(chain.layers.clone());
    (chain.read_only(), bare)
}

/// Says how many reads of the bench just run missed the page cache.
fn report_blocked(group: &str, name: &str, before: u64) {
    let n = WOULD_BLOCK.load(Ordering::Relaxed) - before;
    if n > 0 {
        eprintln!("read_path: {group}/{name}: {n} reads were not answered from the page cache (RWF_NOWAIT)");
    }
}

#[inline]
fn read(disk: &Disk, buf: &mut [u8], off: u64) {
    if !disk.read(buf, off, true).expect("read") {
        WOULD_BLOCK.fetch_add(1, Ordering::Relaxed);
        disk.read(buf, off, false).expect("read");
    }
}

fn benches(c: &mut Criterion) {
    let f = fixture();
    let disks: [(&str, &Disk); 4] = [
        ("1_layer", &f.one),
        ("1_layer_4k_writes", &f.one_4k),
        ("10_layers", &f.ten),
        ("10_layers_no_index", &f.ten_no_index),
    ];

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let offsets: Arc<Vec<u64>> = Arc::new(
        (0..1 << 16)
            .map(|_| rng.gen_range(0..CHUNKS) * CHUNK)
            .collect(),
    );

    let mut g = c.benchmark_group("random_4k");
    g.sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(1));
    for (name, disk) in disks {
        let mut buf = vec![0u8; CHUNK as usize];
        let mut i = 0usize;
        let before = WOULD_BLOCK.load(Ordering::Relaxed);
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                let off = offsets[i & (offsets.len() - 1)];
                i = i.wrapping_add(1);
                read(disk, &mut buf, off);
                black_box(&buf);
            })
        });
        report_blocked("random_4k", name, before);
    }
    g.finish();

    let mut g = c.benchmark_group("seq_256k");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(256 << 10));
    for (name, disk) in disks {
        let mut buf = vec![0u8; 256 << 10];
        let mut off = 0u64;
        let before = WOULD_BLOCK.load(Ordering::Relaxed);
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                read(disk, &mut buf, off);
                off = (off + buf.len() as u64) % SIZE;
                black_box(&buf);
            })
        });
        report_blocked("seq_256k", name, before);
    }
    g.finish();

    let mut g = c.benchmark_group("lookup_64g");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(1));
    let big_chunks = f.big.size() / CHUNK;
    let offsets: Vec<u64> = (0..1 << 16)
        .map(|_| rng.gen_range(0..big_chunks) * CHUNK)
        .collect();
    for (name, disk) in [
        ("10_layers", &f.big),
        ("10_layers_no_index", &f.big_no_index),
    ] {
        let mut buf = vec![0u8; CHUNK as usize];
        let mut i = 0usize;
        let before = WOULD_BLOCK.load(Ordering::Relaxed);
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                let off = offsets[i & (offsets.len() - 1)];
                i = i.wrapping_add(1);
                read(disk, &mut buf, off);
                black_box(&buf);
            })
        });
        report_blocked("lookup_64g", name, before);
    }
    g.finish();
}

criterion_group!(read_path, benches);
criterion_main!(read_path);
