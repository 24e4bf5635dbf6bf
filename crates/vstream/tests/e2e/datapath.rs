//! Reads sent from the layer file (large ones by `sendfile`, shorter ones
//! from its mapping, crates/service/src/sink.rs) through real clients: the
//! bytes are the image's, over TCP and unix; a
//! Standard device's reads of the base under its write cache leave from the
//! file too; reads that span a hole or a write cache and its base take the
//! copy path and are right too; and a client that goes away in the middle of a reply leaves
//! the server serving.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::nbd::Nbd;
use common::{dense_image, have, have_python_nbd, run, TestServer, PYTHON};

const MIB: u64 = 1 << 20;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Where two byte strings first differ, if they do (or their lengths).
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then_some(a.len().min(b.len())))
}

/// A 24 MiB image of random data with a 512 KiB run of zeros at 8 MiB + 64 KiB
/// (a hole once imported): many 256 KiB reads lie within the base layer,
/// some straddle data and the hole.
fn image(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let raw = dir.join("disk.raw");
    dense_image(&raw, 24 * MIB, 21);
    let mut bytes = std::fs::read(&raw).unwrap();
    let hole = (8 * MIB + (64 << 10)) as usize;
    bytes[hole..hole + (512 << 10)].fill(0);
    std::fs::write(&raw, &bytes).unwrap();
    (raw, bytes)
}

#[test]
fn large_reads_from_the_layer_file_are_the_images_bytes() {
    if !have("nbdcopy") || !have_python_nbd() {
        return;
    }
    let server = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (raw, bytes) = image(dir.path());
    server.cli_ok(&["vdisk", "import", "v", p(&raw)]);
    let before = server.metric("vstream_nbd_sendfile_reads_total");

    // nbdcopy reads in 256 KiB requests on 4 connections, over TCP and unix.
    for (i, url) in [server.url("v"), server.unix_url("v")].iter().enumerate() {
        let out = dir.path().join(format!("out{i}.raw"));
        run("nbdcopy", &[url, p(&out)]);
        let got = std::fs::read(&out).unwrap();
        assert_eq!(
            first_difference(&got, &bytes),
            None,
            "nbdcopy of {url}: differs from the image"
        );
    }
    let sent = server.metric("vstream_nbd_sendfile_reads_total") - before;
    assert!(sent > 0, "no read was sent from the layer file");

    // Reads of every shape through libnbd (1 MiB pieces): within the base,
    // across the hole's edges, unaligned, the last bytes.
    let scratch = dir.path().join("buf");
    let mut c = Nbd::connect(&server.url("v"));
    let hole = (8 * MIB + (64 << 10)) as usize;
    for (off, len) in [
        (0, 4 * MIB as usize),
        (hole - (100 << 10), 1 << 20),
        (hole + (500 << 10), 300 << 10),
        (3 * MIB as usize + 513, (200 << 10) + 7),
        (24 * MIB as usize - (128 << 10), 128 << 10),
    ] {
        let got = c.pread(off, len, &scratch);
        assert_eq!(
            first_difference(&got, &bytes[off..off + len]),
            None,
            "read of {len} bytes at {off}"
        );
    }
    // Shorter reads within the base go from the file's mapping.
    let mapped = || server.metric("vstream_nbd_mapped_reads_total");
    let before = mapped();
    for (off, len) in [
        (0, 512),
        (5 * MIB as usize + 17, 4096),
        (hole - (128 << 10), 128 << 10),
        (11 * MIB as usize + 4095, (200 << 10) + 3),
        (24 * MIB as usize - 1, 1),
    ] {
        let got = c.pread(off, len, &scratch);
        assert_eq!(
            first_difference(&got, &bytes[off..off + len]),
            None,
            "read of {len} bytes at {off}"
        );
    }
    assert!(
        mapped() >= before + 5,
        "short reads of the base were not sent from its mapping"
    );
    c.quit();

    // A Standard device: its reads lie in its write cache, in the base, or
    // across both; those across both take the copy path.
    common::standard_v_and_d1(&server, "52:54:00:21:00:01");
    let mut expected = bytes.clone();
    let mut d = Nbd::connect(&server.url("device/d1"));
    for (off, byte) in [(2 * MIB + 4096, 0x11u8), (5 * MIB - 8192, 0x22)] {
        d.ok(&format!("fill {off} 12288 {byte:#x}"));
        expected[off as usize..off as usize + 12288].fill(byte);
    }
    d.ok("flush");
    // A flush with nothing written since the last is answered on the spot;
    // one after a write is not.
    let inline = || server.metric("vstream_nbd_inline_flushes_total");
    let flushes = inline();
    d.ok("flush");
    assert_eq!(inline(), flushes + 1, "a flush with nothing new");
    d.ok(&format!("fill {} 4096 0x33", 7 * MIB));
    expected[7 * MIB as usize..7 * MIB as usize + 4096].fill(0x33);
    d.ok("flush");
    assert_eq!(
        inline(),
        flushes + 1,
        "a flush after a write was answered at once"
    );
    let before = server.metric("vstream_nbd_sendfile_reads_total");
    let got = d.pread(0, 24 * MIB as usize, &scratch);
    assert_eq!(
        first_difference(&got, &expected),
        None,
        "the device reads its writes over the base"
    );
    // nbdcopy's connections join the device's session (its cache) while
    // the first one holds it.
    let out = dir.path().join("device.raw");
    run("nbdcopy", &[&server.url("device/d1"), p(&out)]);
    assert_eq!(
        first_difference(&std::fs::read(&out).unwrap(), &expected),
        None,
        "nbdcopy of the device"
    );
    // The base under the cache is the imported version, never sealed: the
    // device does not write it, so its large reads there leave from the file.
    assert!(
        server.metric("vstream_nbd_sendfile_reads_total") > before,
        "no read of the device was sent from the base's file"
    );
    d.quit();
}

/// Queues big reads, then exits without reading the replies: the server is
/// in the middle of sending one when the connection goes.
const WALK_AWAY: &str = r#"
import os, sys, time
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
n = 32 << 20 if size >= 32 << 20 else size
for i in range(8):
    h.aio_pread(nbd.Buffer(n), (i * n) % (size - n + 1))
# Let the server start its replies and fill the socket.
time.sleep(0.3)
print("gone", flush=True)
os._exit(0)
"#;

#[test]
fn a_client_gone_in_the_middle_of_a_reply_leaves_the_server_serving() {
    if !have("nbdcopy") || !have_python_nbd() {
        return;
    }
    let server = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    dense_image(&raw, 64 * MIB, 22);
    let bytes = std::fs::read(&raw).unwrap();
    server.cli_ok(&["vdisk", "import", "v", p(&raw)]);
    for url in [server.url("v"), server.unix_url("v")] {
        for _ in 0..3 {
            let out = Command::new(PYTHON)
                .args(["-c", WALK_AWAY, &url])
                .output()
                .expect("python3");
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("gone"),
                "the client on {url}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    assert!(
        server.metric("vstream_nbd_sendfile_reads_total") > 0,
        "no read was sent from the layer file"
    );
    // The server goes on serving: every byte, over both transports.
    for (i, url) in [server.url("v"), server.unix_url("v")].iter().enumerate() {
        let out = dir.path().join(format!("after{i}.raw"));
        run("nbdcopy", &[url, p(&out)]);
        assert_eq!(
            first_difference(&std::fs::read(&out).unwrap(), &bytes),
            None,
            "nbdcopy of {url} after the clients went away"
        );
    }
    common::wait_for(10, "the walked-away connections to close", || {
        (server.metric("vstream_nbd_connections_open") == 0).then_some(())
    });
    let log = server.log_text();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
}
