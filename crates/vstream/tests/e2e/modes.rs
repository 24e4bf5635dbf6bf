//! Private and Standard mode as devices see them over NBD: who may connect,
//! where writes go, how long a Standard-mode write cache lives, its limit,
//! and which admin commands wait for devices to disconnect.

use crate::common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::nbd::{text, Nbd};
use common::{have, have_python_nbd, random_image, run, TestServer};

const MIB: u64 = 1 << 20;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn qemu_io(args: &[&str], url: &str, cmds: &[&str]) -> Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]).args(args);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(url).output().expect("running qemu-io")
}

/// qemu-io that must succeed with every command and pattern check.
fn qemu_io_ok(args: &[&str], url: &str, cmds: &[&str]) -> String {
    let out = qemu_io(args, url, cmds);
    let all = text(&out);
    assert!(out.status.success(), "qemu-io {cmds:?} {url}: {all}");
    let lower = all.to_lowercase();
    assert!(
        !lower.contains("failed") && !lower.contains("error"),
        "qemu-io {cmds:?} {url}: {all}"
    );
    all
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn content_hash(server: &TestServer, name: &str) -> String {
    let v = json(&server.cli_ok(&["vdisk", "show", name, "--json"]));
    v["content_hash"]
        .as_str()
        .unwrap_or_else(|| panic!("no content_hash: {v}"))
        .to_string()
}

fn device(server: &TestServer, name: &str) -> serde_json::Value {
    json(&server.cli_ok(&["device", "show", name, "--json"]))
}

/// Waits until the server has ended the device's session.
fn wait_disconnected(server: &TestServer, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let d = device(server, name);
        if d["connected"] == serde_json::Value::Bool(false) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "device {name} still connected: {d}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn private_writes_survive_a_restart_and_are_seen_by_name_mac_and_view() {
    if !have("qemu-io") {
        return;
    }
    let mut server = TestServer::start();
    server.cli_ok(&["vdisk", "create", "v", "--size", "16MiB"]);
    server.cli_ok(&[
        "device",
        "add",
        "d1",
        "--mac",
        "AA-BB-CC-00-00-01",
        "--vdisk",
        "v",
    ]);
    let hash_before = content_hash(&server, "v");
    qemu_io_ok(&[], &server.url("device/d1"), &["write -P 0x5a 1M 1M"]);

    let st = server.stop();
    assert!(
        st.success(),
        "SIGTERM: server exited with {st}:\n{}",
        server.log_text()
    );
    server.restart();

    qemu_io_ok(
        &["-r"],
        &server.url("v"),
        &["read -P 0x5a 1M 1M", "read -P 0 0 1M", "read -P 0 2M 1M"],
    );
    qemu_io_ok(
        &[],
        &server.url("device/aa:bb:cc:00:00:01"),
        &["read -P 0x5a 1M 1M"],
    );
    qemu_io_ok(&[], &server.url("device/d1"), &["read -P 0x5a 1M 1M"]);
    let hash = content_hash(&server, "v");
    assert_ne!(
        hash, hash_before,
        "a Private-mode write must change the vDisk's content hash"
    );
    // The new hash is the one of the same bytes imported afresh.
    let dir = tempfile::tempdir().unwrap();
    let exported = dir.path().join("v.raw");
    server.cli_ok(&["vdisk", "export", "v", p(&exported)]);
    server.cli_ok(&["vdisk", "import", "copy", p(&exported)]);
    assert_eq!(content_hash(&server, "copy"), hash);
}

#[test]
fn flushed_writes_survive_kill9_and_standard_caches_survive_a_restart() {
    if !have_python_nbd() {
        return;
    }
    let mut server = TestServer::start();
    server.cli_ok(&["vdisk", "create", "p", "--size", "16MiB"]);
    server.cli_ok(&["vdisk", "create", "s", "--size", "16MiB"]);
    server.cli_ok(&["vdisk", "set", "s", "--mode", "standard"]);
    server.cli_ok(&[
        "device",
        "add",
        "dp",
        "--mac",
        "aa:bb:cc:00:06:01",
        "--vdisk",
        "p",
    ]);
    server.cli_ok(&[
        "device",
        "add",
        "ds",
        "--mac",
        "aa:bb:cc:00:06:02",
        "--vdisk",
        "s",
    ]);

    // kill -9 after a FLUSH: the flushed writes are there, in both modes.
    let mut dp = Nbd::connect(&server.url("device/dp"));
    let mut ds = Nbd::connect(&server.url("device/ds"));
    dp.ok("fill 1048576 65536 0x71");
    ds.ok("fill 1048576 65536 0x72");
    dp.ok("flush");
    ds.ok("flush");
    server.kill9();
    dp.crash();
    ds.crash();
    server.restart();
    let mut dp = Nbd::connect(&server.url("device/dp"));
    let mut ds = Nbd::connect(&server.url("device/ds"));
    dp.ok("check 1048576 65536 0x71");
    ds.ok("check 1048576 65536 0x72");

    // SIGTERM with devices connected: the server exits 0, nothing is lost, and
    // a Standard-mode cache is kept (the session did not end with NBD_CMD_DISC).
    dp.ok("fill 2097152 65536 0x73");
    ds.ok("fill 2097152 65536 0x74");
    let st = server.stop();
    assert!(
        st.success(),
        "SIGTERM with devices connected: {st}\n{}",
        server.log_text()
    );
    dp.crash();
    ds.crash();
    server.restart();
    let mut dp = Nbd::connect(&server.url("device/dp"));
    let mut ds = Nbd::connect(&server.url("device/aa:bb:cc:00:06:02"));
    dp.ok("check 1048576 65536 0x71");
    dp.ok("check 2097152 65536 0x73");
    ds.ok("check 1048576 65536 0x72");
    ds.ok("check 2097152 65536 0x74");
    dp.quit();
    ds.quit();
    let mut view = Nbd::connect(&server.url("s"));
    view.ok("check 1048576 131072 0");
    view.quit();
    // The clean end discarded the Standard-mode cache; the Private writes stay.
    wait_disconnected(&server, "ds");
    let mut ds = Nbd::connect(&server.url("device/ds"));
    ds.ok("check 1048576 131072 0");
    ds.quit();
    let mut view = Nbd::connect(&server.url("p"));
    view.ok("check 2097152 65536 0x73");
    view.quit();
}

#[test]
fn private_mode_admits_one_device_at_a_time() {
    if !have("qemu-io") || !have("nbdinfo") || !have_python_nbd() {
        return;
    }
    let server = TestServer::start();
    server.cli_ok(&["vdisk", "create", "v", "--size", "16MiB"]);
    server.cli_ok(&[
        "device",
        "add",
        "d1",
        "--mac",
        "aa:bb:cc:00:00:01",
        "--vdisk",
        "v",
    ]);
    server.cli_ok(&[
        "device",
        "add",
        "d2",
        "--mac",
        "aa:bb:cc:00:00:02",
        "--vdisk",
        "v",
    ]);

    let mut d1 = Nbd::connect(&server.url("device/d1"));
    d1.ok("fill 0 4096 0x11");
    assert_eq!(device(&server, "d1")["connected"], true);

    // d2 is refused, by qemu-io, nbdinfo and libnbd alike, over TCP and unix.
    let out = qemu_io(&[], &server.url("device/d2"), &["read 0 4k"]);
    assert!(
        !out.status.success(),
        "d2 connected while d1 holds the Private vDisk: {}",
        text(&out)
    );
    let out = Command::new("nbdinfo")
        .arg(server.unix_url("device/d2"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "nbdinfo on d2 succeeded: {}",
        text(&out)
    );
    let err = Nbd::try_connect(&server.url("device/aa:bb:cc:00:00:02"))
        .err()
        .expect("d2 (by MAC) connected");
    assert!(err.starts_with("connect-error"), "{err}");
    let log = server.log_text();
    assert!(
        log.lines().any(
            |l| l.contains("vDisk v is in Private mode") && l.contains("device d1 has it open")
        ),
        "no log line says why d2 was refused:\n{log}"
    );
    // The refused attempts did not become sessions.
    assert_eq!(device(&server, "d2")["connected"], false);

    // d1 itself may open more connections (a reconnect, or multi-conn).
    qemu_io_ok(
        &[],
        &server.url("device/aa:bb:cc:00:00:01"),
        &["read -P 0x11 0 4k"],
    );

    // Deleting waits for the device to disconnect (and, later, to be removed).
    server.cli_ok(&["device", "remove", "d2"]);
    let err = server.cli_err(&["vdisk", "delete", "v"]);
    assert!(
        err.contains("d1") && err.contains("connected"),
        "vdisk delete refusal does not name the connected device: {err}"
    );
    let err = server.cli_err(&["device", "remove", "d1"]);
    assert!(err.contains("connected"), "{err}");
    server.cli_ok(&[
        "device",
        "add",
        "d2",
        "--mac",
        "aa:bb:cc:00:00:02",
        "--vdisk",
        "v",
    ]);
    let list = json(&server.cli_ok(&["vdisk", "list", "--json"]));
    assert_eq!(list.as_array().map(|a| a.len()), Some(1), "{list}");
    assert_eq!(list[0]["connected"], serde_json::json!(["d1"]), "{list}");

    d1.quit();
    wait_disconnected(&server, "d1");
    qemu_io_ok(
        &[],
        &server.url("device/d2"),
        &["read -P 0x11 0 4k", "write -P 0x22 4k 4k"],
    );
    wait_disconnected(&server, "d2");
    // The other way round: while d2 holds the vDisk, d1 is the one refused.
    let mut d2 = Nbd::connect(&server.url("device/d2"));
    let err = Nbd::try_connect(&server.url("device/d1"))
        .err()
        .expect("d1 connected while d2 holds the Private vDisk");
    assert!(err.starts_with("connect-error"), "{err}");
    d2.ok("check 4096 4096 0x22");
    d2.quit();
    wait_disconnected(&server, "d2");
    qemu_io_ok(
        &["-r"],
        &server.url("v"),
        &["read -P 0x11 0 4k", "read -P 0x22 4k 4k"],
    );
    let err = server.cli_err(&["vdisk", "delete", "v"]);
    assert!(err.contains("d1") && err.contains("d2"), "{err}");
    server.cli_ok(&["device", "remove", "d1"]);
    server.cli_ok(&["device", "remove", "d2"]);
    server.cli_ok(&["vdisk", "delete", "v"]);
    let list = json(&server.cli_ok(&["vdisk", "list", "--json"]));
    assert_eq!(list, serde_json::json!([]));
}

#[test]
fn standard_mode_keeps_each_devices_writes_apart_from_the_vdisk() {
    if !have("qemu-io") || !have("qemu-img") || !have_python_nbd() {
        return;
    }
    let server = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    random_image(&base, 16 * MIB, 7);
    let base_bytes = std::fs::read(&base).unwrap();
    let region = |off: u64, len: u64| &base_bytes[off as usize..(off + len) as usize];
    server.cli_ok(&["vdisk", "import", "v", p(&base)]);
    let hash = content_hash(&server, "v");
    server.cli_ok(&["vdisk", "set", "v", "--mode", "standard"]);
    assert_eq!(
        json(&server.cli_ok(&["vdisk", "show", "v", "--json"]))["mode"],
        "standard"
    );
    server.cli_ok(&[
        "device",
        "add",
        "s1",
        "--mac",
        "aa:bb:cc:00:01:01",
        "--vdisk",
        "v",
    ]);
    server.cli_ok(&[
        "device",
        "add",
        "s2",
        "--mac",
        "aa:bb:cc:00:01:02",
        "--vdisk",
        "v",
    ]);

    // Two qemu-io sessions, one per device, at the same offset.
    qemu_io_ok(
        &[],
        &server.url("device/s1"),
        &["write -P 0x11 2M 64k", "read -P 0x11 2M 64k"],
    );
    qemu_io_ok(
        &[],
        &server.url("device/s2"),
        &["write -P 0x22 2M 64k", "read -P 0x22 2M 64k"],
    );

    // Both devices at once, each with its own cache.
    // s1 names its boot, as the agent and the boot-script path do.
    let mut s1 = Nbd::connect(&server.url("device/s1;boot=s1-boot-1"));
    let mut s2 = Nbd::connect(&server.unix_url("device/aa:bb:cc:00:01:02"));
    s1.ok("fill 3145728 65536 0x33");
    s2.ok("fill 3145728 65536 0x44");
    s1.ok("fill 1000 10000 0x55"); // unaligned: the chunk's other bytes stay the base's
    s1.ok("check 3145728 65536 0x33");
    s2.ok("check 3145728 65536 0x44");
    s1.ok("check 1000 10000 0x55");
    let got = dir.path().join("s2-edge.raw");
    s2.ok(&format!("pread 0 16384 {}", p(&got)));
    common::assert_same_bytes(
        &std::fs::read(&got).unwrap(),
        region(0, 16384),
        "s2 sees s1's write",
    );
    let got = dir.path().join("s1-edge.raw");
    s1.ok(&format!("pread 0 1000 {}", p(&got)));
    common::assert_same_bytes(
        &std::fs::read(&got).unwrap(),
        region(0, 1000),
        "bytes before s1's unaligned write",
    );
    s1.ok(&format!("pread 11000 5384 {}", p(&got)));
    common::assert_same_bytes(
        &std::fs::read(&got).unwrap(),
        region(11000, 5384),
        "bytes after s1's unaligned write",
    );

    // The vDisk itself is untouched: over NBD, exported, and by its hash.
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            p(&base),
            "-F",
            "raw",
            &server.url("v"),
        ],
    );
    assert!(out.contains("identical"), "{out}");
    let exported = dir.path().join("exported.raw");
    server.cli_ok(&["vdisk", "export", "v", p(&exported)]);
    common::assert_same_bytes(
        &std::fs::read(&exported).unwrap(),
        &base_bytes,
        "vdisk export after Standard-mode writes",
    );
    assert_eq!(content_hash(&server, "v"), hash);
    let info = json(&server.cli_ok(&["vdisk", "show", "v", "--json"]));
    assert_eq!(info["connected"], serde_json::json!(["s1", "s2"]), "{info}");
    assert!(device(&server, "s1")["cache_bytes"].as_u64().unwrap() >= 65536 + 12288);

    // A reset waits for the device to disconnect.
    let err = server.cli_err(&["device", "reset", "s1"]);
    assert!(err.contains("connected"), "{err}");

    // An unclean end (no NBD_CMD_DISC) keeps the cache for a reconnect
    // within the same boot, with or without the boot named...
    s1.crash();
    wait_disconnected(&server, "s1");
    assert!(
        device(&server, "s1")["cache_bytes"].as_u64().unwrap() >= 65536,
        "cache of s1 lost after a crash"
    );
    let mut s1 = Nbd::connect(&server.url("device/s1;boot=s1-boot-1"));
    s1.ok("check 3145728 65536 0x33");
    s1.ok("check 1000 10000 0x55");
    s1.crash();
    wait_disconnected(&server, "s1");
    let mut s1 = Nbd::connect(&server.url("device/s1"));
    s1.ok("check 3145728 65536 0x33");
    // ... but not into the next boot: the device starts clean.
    s1.crash();
    wait_disconnected(&server, "s1");
    let mut s1 = Nbd::connect(&server.url("device/s1;boot=s1-boot-2"));
    s1.ok("check 3145728 65536 0x00");
    s1.ok("fill 3145728 65536 0x66");
    // A clean end discards it too.
    s1.quit();
    wait_disconnected(&server, "s1");
    assert_eq!(device(&server, "s1")["cache_bytes"], 0);
    let mut s1 = Nbd::connect(&server.url("device/s1;boot=s1-boot-2"));
    let got = dir.path().join("s1-after.raw");
    s1.ok(&format!("pread 0 {} {}", 4 * MIB, p(&got)));
    common::assert_same_bytes(
        &std::fs::read(&got).unwrap(),
        region(0, 4 * MIB),
        "s1 after a clean disconnect",
    );
    s1.quit();

    // `device reset` discards a cache kept by an unclean end.
    s2.crash();
    wait_disconnected(&server, "s2");
    let mut s2 = Nbd::connect(&server.url("device/s2"));
    s2.ok("check 3145728 65536 0x44");
    let err = server.cli_err(&["device", "reset", "s2"]);
    assert!(err.contains("connected") && err.contains("s2"), "{err}");
    s2.crash();
    wait_disconnected(&server, "s2");
    server.cli_ok(&["device", "reset", "s2"]);
    assert_eq!(device(&server, "s2")["cache_bytes"], 0);
    let mut s2 = Nbd::connect(&server.url("device/s2"));
    let got = dir.path().join("s2-after.raw");
    s2.ok(&format!("pread 0 {} {}", 4 * MIB, p(&got)));
    common::assert_same_bytes(
        &std::fs::read(&got).unwrap(),
        region(0, 4 * MIB),
        "s2 after device reset",
    );
    s2.quit();
    assert_eq!(content_hash(&server, "v"), hash);
}

#[test]
fn standard_mode_write_cache_limit_gives_enospc() {
    if !have("qemu-io") || !have_python_nbd() {
        return;
    }
    let server = TestServer::start();
    server.cli_ok(&["vdisk", "create", "v", "--size", "16MiB"]);
    server.cli_ok(&[
        "vdisk",
        "set",
        "v",
        "--mode",
        "standard",
        "--cache-limit",
        "1MiB",
    ]);
    let info = json(&server.cli_ok(&["vdisk", "show", "v", "--json"]));
    assert_eq!(info["cache_limit"].as_u64(), Some(MIB), "{info}");
    server.cli_ok(&[
        "device",
        "add",
        "c1",
        "--mac",
        "aa:bb:cc:00:02:01",
        "--vdisk",
        "v",
    ]);

    let mut c = Nbd::connect(&server.url("device/c1"));
    c.ok("fill 0 524288 0x31");
    c.ok("fill 4194304 524288 0x32"); // the cache now holds exactly 1 MiB
    let err = c.cmd("fill 8388608 4096 0x33");
    assert!(
        err.starts_with("error 28 ENOSPC"),
        "a write past the cache limit answered: {err}"
    );
    // Overwriting cached data, reading anything, and writing zeros over cached data still work.
    c.ok("check 0 524288 0x31");
    c.ok("check 4194304 524288 0x32");
    c.ok("check 8388608 4096 0");
    c.ok("fill 0 65536 0x34");
    c.ok("check 0 65536 0x34");
    c.ok("check 65536 458752 0x31");
    c.ok("flush");
    let err = c.cmd("fill 524288 1 0x35");
    assert!(
        err.starts_with("error 28 ENOSPC"),
        "a 1-byte write past the cache limit answered: {err}"
    );
    c.ok("check 524288 4096 0");
    c.crash();
    wait_disconnected(&server, "c1");
    assert_eq!(device(&server, "c1")["cache_bytes"].as_u64(), Some(MIB));

    // qemu-io says so in its words, on a reconnect with the cache still full.
    // The session goes on after the failed write (every qemu-io run is one session).
    let out = qemu_io(
        &[],
        &server.url("device/c1"),
        &[
            "write -P 0x36 12M 64k",
            "read -P 0x34 0 64k",
            "write -P 0x37 4M 64k",
            "read -P 0x37 4M 64k",
        ],
    );
    let all = text(&out);
    assert!(all.contains("No space left on device"), "{all}");
    assert!(!all.contains("Pattern verification failed"), "{all}");
    assert!(
        all.contains("wrote 65536/65536 bytes at offset 4194304"),
        "{all}"
    );
    assert_eq!(all.matches("read 65536/65536 bytes").count(), 2, "{all}");
    // That qemu-io session ended cleanly, discarding the cache: room again.
    qemu_io_ok(
        &[],
        &server.url("device/c1"),
        &[
            "read -P 0 0 64k",
            "write -P 0x38 12M 1M",
            "read -P 0x38 12M 1M",
        ],
    );
}

#[test]
fn vdisk_set_waits_for_devices_to_disconnect() {
    if !have_python_nbd() {
        return;
    }
    let server = TestServer::start();
    server.cli_ok(&["vdisk", "create", "v", "--size", "16MiB"]);
    server.cli_ok(&[
        "device",
        "add",
        "d1",
        "--mac",
        "aa:bb:cc:00:03:01",
        "--vdisk",
        "v",
    ]);

    let mut d1 = Nbd::connect(&server.url("device/d1"));
    d1.ok("fill 0 4096 0x41");
    for args in [
        &["vdisk", "set", "v", "--mode", "standard"][..],
        &["vdisk", "set", "v", "--cache-limit", "4MiB"][..],
        &["vdisk", "set", "v", "--mode", "private"][..],
    ] {
        let err = server.cli_err(args);
        assert!(
            err.contains("connected") && err.contains("d1"),
            "{args:?}: {err}"
        );
    }
    let info = json(&server.cli_ok(&["vdisk", "show", "v", "--json"]));
    assert_eq!(info["mode"], "private", "{info}");
    assert_eq!(info["cache_limit"], serde_json::Value::Null, "{info}");

    // A read-only view is no device session: it does not hold changes back.
    let view = Nbd::connect(&server.url("v"));
    d1.quit();
    wait_disconnected(&server, "d1");
    server.cli_ok(&[
        "vdisk",
        "set",
        "v",
        "--mode",
        "standard",
        "--cache-limit",
        "4MiB",
    ]);
    let info = json(&server.cli_ok(&["vdisk", "show", "v", "--json"]));
    assert_eq!(
        (info["mode"].as_str(), info["cache_limit"].as_u64()),
        (Some("standard"), Some(4 * MIB)),
        "{info}"
    );
    view.quit();
    let mut view = Nbd::connect(&server.url("v"));
    view.ok("check 0 4096 0x41");
    view.quit();

    // Now in Standard mode, d1's writes go to its cache.
    let mut d1 = Nbd::connect(&server.url("device/d1"));
    d1.ok("fill 0 4096 0x42");
    let err = server.cli_err(&["vdisk", "set", "v", "--mode", "private"]);
    assert!(err.contains("d1"), "{err}");
    d1.quit();
    wait_disconnected(&server, "d1");
    let mut view = Nbd::connect(&server.url("v"));
    view.ok("check 0 4096 0x41");
    view.quit();
}

/// `state.rs`: "every connection to the same vDisk shares one set of open
/// layers, so that a read-only view sees a Private-mode device's writes".
#[test]
fn read_only_view_sees_a_private_devices_writes() {
    if !have_python_nbd() {
        return;
    }
    let server = TestServer::start();
    server.cli_ok(&["vdisk", "create", "v", "--size", "16MiB"]);
    server.cli_ok(&[
        "device",
        "add",
        "d1",
        "--mac",
        "aa:bb:cc:00:04:01",
        "--vdisk",
        "v",
    ]);
    // One view opened before the device connects, one after its flushed write.
    let mut early = Nbd::connect(&server.url("v"));
    let mut d1 = Nbd::connect(&server.url("device/d1"));
    d1.ok("fill 0 4096 0x61");
    d1.ok("flush");
    let mut late = Nbd::connect(&server.url("v"));
    let mut seen = Vec::new();
    seen.push(("late view, flushed write", late.cmd("check 0 4096 0x61")));
    seen.push(("early view, flushed write", early.cmd("check 0 4096 0x61")));
    d1.ok("fill 8192 4096 0x62");
    d1.ok("flush");
    seen.push((
        "late view, write after it connected",
        late.cmd("check 8192 4096 0x62"),
    ));
    seen.push((
        "early view, write after it connected",
        early.cmd("check 8192 4096 0x62"),
    ));
    d1.quit();
    wait_disconnected(&server, "d1");
    seen.push((
        "late view, after the device disconnected",
        late.cmd("check 8192 4096 0x62"),
    ));
    seen.push((
        "early view, after the device disconnected",
        early.cmd("check 0 4096 0x61"),
    ));
    let mut fresh = Nbd::connect(&server.url("v"));
    seen.push((
        "new view, after the device disconnected",
        fresh.cmd("check 0 4096 0x61"),
    ));
    fresh.quit();
    let wrong: Vec<_> = seen.iter().filter(|(_, a)| a != "ok").collect();
    assert!(
        wrong.is_empty(),
        "read-only views miss the Private device's writes: {wrong:?}"
    );
    early.quit();
    late.quit();
}

/// `vdisk show` hashes a vDisk whose stored hash a Private-mode write made
/// stale, and stores the new hash if no device is connected when it starts.
/// A device that connects and writes while the hash is being computed must
/// not leave a stored hash that misses its write.
#[test]
fn content_hash_stays_right_when_a_write_races_vdisk_show() {
    if !have("nbdcopy") || !have("qemu-io") || !have_python_nbd() {
        return;
    }
    let server = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    // Enough data that hashing it takes a moment.
    let size = 128 * MIB;
    let raw = dir.path().join("full.raw");
    run(
        "sh",
        &["-c", &format!("head -c {size} /dev/urandom > {}", p(&raw))],
    );
    // v is raced; w gets the same writes without a race, as the reference.
    for (vdisk, dev, mac) in [
        ("v", "d1", "aa:bb:cc:00:05:01"),
        ("w", "e1", "aa:bb:cc:00:05:02"),
    ] {
        server.cli_ok(&["vdisk", "create", vdisk, "--size", &size.to_string()]);
        server.cli_ok(&["device", "add", dev, "--mac", mac, "--vdisk", vdisk]);
        run("nbdcopy", &[p(&raw), &server.url(&format!("device/{dev}"))]);
        wait_disconnected(&server, dev);
    }
    assert_eq!(content_hash(&server, "v"), content_hash(&server, "w"));
    // Attempts whose write was done while `vdisk show` still ran: the race
    // this test is about happened in them.
    let mut raced = 0;
    for (attempt, delay_ms) in [2u64, 5, 10, 15, 20, 30, 40, 60, 80, 120]
        .into_iter()
        .enumerate()
    {
        // Make the stored hash stale, identically on both.
        let first = format!("write -P {} {}k 4k", attempt + 1, attempt * 64);
        qemu_io_ok(&[], &server.url("device/d1"), &[&first]);
        qemu_io_ok(&[], &server.url("device/e1"), &[&first]);
        wait_disconnected(&server, "d1");
        wait_disconnected(&server, "e1");

        let mut d1 = Nbd::lazy(&server.url("device/d1"));
        let show = Command::new(common::BIN)
            .args(["vdisk", "show", "v", "--json"])
            .env("VSTREAM_API", &server.api)
            .env("VSTREAM_TOKEN", server.token())
            .stdout(Stdio::null())
            .spawn()
            .expect("vstream vdisk show");
        std::thread::sleep(Duration::from_millis(delay_ms));
        let offset = 64 * MIB + attempt as u64 * MIB;
        d1.connect_now();
        d1.ok(&format!("fill {offset} 65536 0x77"));
        let mut show = show;
        if show.try_wait().expect("vdisk show").is_none() {
            raced += 1;
        }
        d1.quit();
        let st = show.wait_with_output().expect("vdisk show").status;
        assert!(st.success(), "vdisk show: {st}");
        qemu_io_ok(
            &[],
            &server.url("device/e1"),
            &[&format!("write -P 0x77 {offset} 64k")],
        );
        wait_disconnected(&server, "d1");
        wait_disconnected(&server, "e1");

        let (hv, hw) = (content_hash(&server, "v"), content_hash(&server, "w"));
        assert_eq!(
            hv, hw,
            "attempt {attempt} (write {delay_ms} ms after `vdisk show` began): the stored content hash of v \
             misses a write made while `vdisk show` was hashing it"
        );
    }
    // The test proves something only if writes met the hashing.
    assert!(
        raced >= 3,
        "only {raced} of 10 writes were done while `vdisk show` ran: the window was missed"
    );
}

/// A Standard-mode write cache is a set of changes over one content of its
/// vDisk. If the vDisk changes under a kept cache (back to Private mode, a
/// device writes, then Standard again), the device must not see its old cached
/// chunks stitched onto the new content: the server must either refuse the
/// mode change while caches exist or not reuse the stale cache.
#[test]
fn a_kept_write_cache_is_not_laid_over_changed_vdisk_content() {
    if !have_python_nbd() {
        return;
    }
    let server = TestServer::start();
    server.cli_ok(&["vdisk", "create", "v", "--size", "16MiB"]);
    common::standard_v_and_d1(&server, "aa:bb:cc:00:07:01");
    // Device names in any MAC spelling reach the same device.
    let mut d1 = Nbd::connect(&server.url("device/AA-BB-CC-00-07-01"));
    d1.ok("fill 0 4096 0x41");
    d1.crash(); // no NBD_CMD_DISC: the cache is kept
    wait_disconnected(&server, "d1");
    assert_eq!(device(&server, "d1")["cache_bytes"], 4096);

    let out = server.cli(&["vdisk", "set", "v", "--mode", "private"]);
    if !out.status.success() {
        // Refusing is one right answer; it must say why.
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("d1"), "{err}");
        return;
    }
    let mut d1 = Nbd::connect(&server.url("device/aabbcc000701"));
    d1.ok("check 0 4096 0"); // Private mode: the vDisk itself, no cache
    d1.ok("fill 0 8192 0x99");
    d1.quit();
    wait_disconnected(&server, "d1");
    server.cli_ok(&["vdisk", "set", "v", "--mode", "standard"]);

    let mut d1 = Nbd::connect(&server.url("device/d1"));
    let seen = [d1.cmd("check 0 4096 0x99"), d1.cmd("check 4096 4096 0x99")];
    d1.quit();
    assert_eq!(
        seen,
        ["ok", "ok"],
        "back in Standard mode, device d1 sees its stale cached chunk over the vDisk's new content"
    );
}
