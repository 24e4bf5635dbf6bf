//! Per-request cost of the transmission codec: decoding a request header and
//! encoding the reply header that goes before a READ's data.
//!
//! ```text
//!   cargo bench -p vstream-nbd --bench codec
//! ```
//!
//! * `decode_request`: one 28-byte READ header.
//! * `decode_request_x32`: 32 headers back to back from one buffer (what one
//!   socket read at QD32 delivers), time per batch.
//! * `encode_simple_reply`, `encode_offset_data_header`: one reply header
//!   appended to a reused `Vec` (cleared each time; no allocation).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vstream_nbd::transmission::{encode_offset_data_header, encode_simple_reply};
use vstream_nbd::{decode_request, REQUEST_MAGIC};

fn request(cookie: u64, offset: u64, length: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&0u16.to_be_bytes()); // flags
    b[6..8].copy_from_slice(&0u16.to_be_bytes()); // NBD_CMD_READ
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&length.to_be_bytes());
    b
}

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("nbd_codec");
    g.sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));

    let one = request(7, 1 << 30, 4096);
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_request", |b| {
        b.iter(|| black_box(decode_request(black_box(&one)).unwrap()))
    });

    let batch: Vec<u8> = (0..32u64)
        .flat_map(|i| request(i, i * 4096, 4096))
        .collect();
    g.throughput(Throughput::Elements(32));
    g.bench_function("decode_request_x32", |b| {
        b.iter(|| {
            let mut buf = black_box(&batch[..]);
            let mut n = 0u64;
            while let Some(r) = decode_request(buf).unwrap() {
                n = n.wrapping_add(r.offset);
                buf = &buf[28..];
            }
            black_box(n)
        })
    });

    g.throughput(Throughput::Elements(1));
    let mut out = Vec::with_capacity(64);
    g.bench_function("encode_simple_reply", |b| {
        b.iter(|| {
            out.clear();
            encode_simple_reply(&mut out, black_box(7), 0);
            black_box(&out);
        })
    });
    g.bench_function("encode_offset_data_header", |b| {
        b.iter(|| {
            out.clear();
            encode_offset_data_header(&mut out, black_box(7), black_box(1 << 30), 4096);
            black_box(&out);
        })
    });
    g.finish();
}

criterion_group!(codec, benches);
criterion_main!(codec);
