//! Durability of a Private-mode device's writes across kill -9 and SIGTERM,
//! driven by a libnbd (Python) writer against a real server.
//!
//! The writer and the checks are in common/durable.rs: after a crash and
//! restart each block must hold the last write to it that was covered by a
//! completed flush, or a later write, never an older one and never anything
//! else. A killed process leaves its writes in the page cache; power_loss.rs
//! cuts the power of a guest the server runs in instead.

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::durable::{
    check_disk, content, last_number, last_write_to, write_script, Writer, BLOCK, BLOCKS, DISK_SIZE,
};
use common::{have, have_python_nbd, TestServer};
use rand::Rng;

// ---------------------------------------------------------------------------
// Harness.

fn tools_present() -> bool {
    have("nbdcopy") && have_python_nbd()
}

/// A server with vDisk `v` (64 MiB) and device `d1` on it (Private mode).
fn server() -> TestServer {
    let s = TestServer::start();
    common::add_v_and_d1(&s, "52:54:00:d0:00:01");
    s
}

/// The whole content of `export`, through nbdcopy.
fn read_disk(server: &TestServer, export: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join("disk.img");
    let _ = std::fs::remove_file(&out);
    common::run("nbdcopy", &[&server.url(export), out.to_str().unwrap()]);
    std::fs::read(&out).expect("reading the copied disk")
}

fn assert_no_panic(server: &TestServer) {
    let log = server.log_text();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
}

// ---------------------------------------------------------------------------
// 1. kill -9 during writes and flushes.

#[test]
fn kill_9_during_writes_keeps_every_flushed_write() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(dir.path());
    let mut server = server();
    let mut rng = rand::thread_rng();
    let mut found: Vec<Option<u64>> = vec![None; BLOCKS as usize];
    for round in 0..3u64 {
        // Write numbers grow from round to round, so "later" means a larger number.
        let start = round * 1_000_000;
        let mut writer = Writer::start(
            &script,
            &["crash", &server.url("device/d1"), &start.to_string()],
        );
        let mut seen = Vec::new();
        writer.wait_for("FLUSHED ", &mut seen);
        let delay = Duration::from_millis(rng.gen_range(1000..=3000));
        std::thread::sleep(delay);
        server.kill9();
        let lines = writer.finish(seen);
        let flushed = last_number(&lines, "FLUSHED ").expect("at least one FLUSHED");
        assert!(
            lines.last().is_some_and(|l| l.starts_with("END ")),
            "round {round}: the writer did not see the server die: {:?}",
            lines.last()
        );
        eprintln!(
            "round {round}: killed after {delay:?}, last flush covered writes {start}..={flushed}"
        );

        server.restart();
        let img = read_disk(&server, "v", dir.path());
        // The last write to each block covered by the last completed flush, or
        // what an earlier round left there, whichever is newer.
        let lower: Vec<Option<u64>> = (0..BLOCKS)
            .map(|b| found[b as usize].max(last_write_to(b, start, flushed)))
            .collect();
        found = check_disk(
            &img,
            &lower,
            flushed + 8,
            &format!("round {round} after kill -9"),
        );
        assert_no_panic(&server);
    }
    // One more restart changes nothing.
    server.kill9();
    server.restart();
    let img = read_disk(&server, "v", dir.path());
    let again = check_disk(&img, &found, u64::MAX, "after a further restart");
    assert_eq!(
        again, found,
        "the disk changed across a restart with no writes"
    );
}

// 2. SIGTERM drains and flushes.

#[test]
fn sigterm_drains_and_keeps_every_acknowledged_write() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(dir.path());
    let mut server = server();
    let mut writer = Writer::start(&script, &["ack", &server.url("device/d1"), "0"]);
    let mut seen = Vec::new();
    writer.wait_for("ACK ", &mut seen);
    std::thread::sleep(Duration::from_millis(1500));
    let t = Instant::now();
    let status = server.stop();
    let took = t.elapsed();
    assert!(
        status.success(),
        "the server exited with {status} on SIGTERM:\n{}",
        server.log_text()
    );
    assert!(
        took < Duration::from_secs(5),
        "the server took {took:?} to stop"
    );
    let lines = writer.finish(seen);
    let acked = last_number(&lines, "ACK ").expect("at least one ACK");
    eprintln!("writes 0..={acked} acknowledged before SIGTERM; stopped in {took:?}");
    assert!(
        acked > 8,
        "the writer made too little progress ({acked}) for the test to mean anything"
    );
    assert_no_panic(&server);

    server.restart();
    let img = read_disk(&server, "v", dir.path());
    let lower: Vec<Option<u64>> = (0..BLOCKS).map(|b| last_write_to(b, 0, acked)).collect();
    // At most one write was in flight past the last acknowledged one.
    check_disk(&img, &lower, acked + 1, "after SIGTERM");
    assert_no_panic(&server);
}

// 3. FUA without FLUSH.

#[test]
fn fua_write_survives_kill_9_without_flush() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(dir.path());
    let mut server = server();
    let mut writer = Writer::start(&script, &["fua", &server.url("device/d1")]);
    let mut seen = Vec::new();
    writer.wait_for("DONE", &mut seen);
    // The writer still holds its connection open: no flush at disconnect helps.
    server.kill9();
    writer.finish(seen);

    server.restart();
    let img = read_disk(&server, "v", dir.path());
    // Writes 5, 100, 4000 and 4096+5 (which replaced 5) were sent with FUA.
    let mut want = vec![0u8; DISK_SIZE];
    for i in [100u64, 4000, 4096 + 5] {
        let at = (i % BLOCKS) as usize * BLOCK;
        want[at..at + BLOCK].copy_from_slice(&content(i));
    }
    let partial = b"FUA-PARTIAL!".repeat(100);
    want[7 * BLOCK + 100..7 * BLOCK + 100 + partial.len()].copy_from_slice(&partial);
    for (b, (got, exp)) in img.chunks(BLOCK).zip(want.chunks(BLOCK)).enumerate() {
        assert!(
            got == exp,
            "block {b} after kill -9: FUA write lost or wrong (got {:02x?}...)",
            &got[..32]
        );
    }
    assert_no_panic(&server);
}
