//! A restarted server serves at once: versions whose layer files have not
//! changed since this server checked them (its verification record, kept
//! beside them) are offered for login at start, and read again in the
//! background; a file that changed, or has no record, is read in full before
//! it is offered; a Private-mode version a device writes is no replica and
//! is not checked as one.

use crate::common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::nbd::Nbd;
use common::{have, have_python_nbd, wait_for, TestEtcd, TestServer};

const MIB: u64 = 1 << 20;

/// The time a restart on unchanged files may take to a first login.
const LOGIN_BOUND: Duration = Duration::from_secs(2);

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// POST /api/v1/login for `mac`: (HTTP status, body).
fn login(server: &TestServer, mac: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-m", "5", "-w", "\n%{http_code}", "-X", "POST"])
        .args(["-H", "content-type: application/json"])
        .args(["-d", &format!("{{\"mac\":\"{mac}\"}}")])
        .arg(format!("{}/api/v1/login", server.api))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Polls the login of `mac` every 20 ms until it succeeds; the reply and
/// the time from `since`.
fn first_login(server: &TestServer, mac: &str, since: Instant) -> (serde_json::Value, Duration) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, body) = login(server, mac);
        if code == 200 {
            let reply = serde_json::from_str(&body).expect("login reply");
            return (reply, since.elapsed());
        }
        assert!(
            Instant::now() < deadline,
            "no login for {mac} within 60 s: {code} {body}\n{}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An image of `size` random bytes (from the kernel: fast in a debug build).
fn random_bytes(path: &Path, size: u64) {
    use std::io::Read;
    let mut src = std::fs::File::open("/dev/urandom")
        .expect("/dev/urandom")
        .take(size);
    let mut out = std::fs::File::create(path).expect("image");
    assert_eq!(std::io::copy(&mut src, &mut out).expect("image"), size);
}

/// A dense vDisk `name` of `size` bytes in Standard mode with two sealed
/// production versions (2 on 1, adding nothing), a device booting it; the
/// MiB of its image at `keep` (the image is removed).
fn standard_vdisk(
    server: &TestServer,
    dir: &Path,
    name: &str,
    size: u64,
    mac: &str,
    keep: u64,
) -> Vec<u8> {
    let img = dir.join(format!("{name}.raw"));
    random_bytes(&img, size);
    server.cli_ok(&["vdisk", "import", name, p(&img)]);
    let mut kept = vec![0u8; MIB as usize];
    std::fs::File::open(&img)
        .and_then(|f| f.read_exact_at(&mut kept, keep))
        .expect("reading the image");
    std::fs::remove_file(&img).expect("removing the image");
    server.cli_ok(&["vdisk", "set", name, "--mode", "standard"]);
    server.cli_ok(&["version", "new", name]);
    server.cli_ok(&["version", "promote", name, "2", "--to", "production"]);
    server.cli_ok(&[
        "device",
        "add",
        &format!("d-{name}"),
        "--mac",
        mac,
        "--vdisk",
        name,
    ]);
    kept
}

/// The layer file of version 1 of `name` (the base of version 2).
fn base_layer(data: &Path, name: &str) -> PathBuf {
    let dir = data.join("vdisks").join(name);
    std::fs::read_dir(&dir)
        .expect("vDisk folder")
        .flatten()
        .map(|e| e.path())
        .find(|f| {
            f.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("v1-") && n.ends_with(".layer"))
        })
        .unwrap_or_else(|| panic!("no version 1 layer in {}", dir.display()))
}

/// Flips one bit of the byte at disk offset `at` in layer file `layer` of a
/// vDisk of `size` bytes (data lives at the end of the file).
fn flip(layer: &Path, size: u64, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(layer)
        .expect("open layer");
    let off = f.metadata().expect("metadata").len() - size + at;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).expect("read");
    f.write_all_at(&[b[0] ^ 0x10], off).expect("write");
    f.sync_all().expect("sync");
}

/// Rewrites the verification record of `vdisk` in `data` so that it says
/// `layer` is as it is now: a change no file metadata shows (bit rot under
/// the file system).
fn record_as_is(data: &Path, vdisk: &str, layer: &Path) {
    let record_path = data.join("vdisks").join(vdisk).join("verified.json");
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record_path).expect("record")).expect("JSON");
    let m = std::fs::metadata(layer).unwrap();
    let name = layer.file_name().unwrap().to_str().unwrap();
    let entry = record["layers"]
        .as_array_mut()
        .expect("layers")
        .iter_mut()
        .find(|l| l["file"] == name)
        .expect("the layer in the record");
    entry["size"] = m.len().into();
    entry["mtime_ns"] = (m.mtime() * 1_000_000_000 + m.mtime_nsec()).into();
    entry["ctime_ns"] = (m.ctime() * 1_000_000_000 + m.ctime_nsec()).into();
    entry["ino"] = m.ino().into();
    entry["dev"] = m.dev().into();
    std::fs::write(&record_path, serde_json::to_vec(&record).unwrap()).unwrap();
}

fn log_lines<'a>(log: &'a str, what: &str, vdisk: &str) -> Vec<&'a str> {
    let tag = format!("vdisk={vdisk} ");
    log.lines()
        .filter(|l| l.contains(what) && l.contains(&tag))
        .collect()
}

/// (a) A server restarted on unchanged files logs a device in within 2 s of
/// its start without reading its vDisk; without the record (deleted) the
/// same restart reads it in full first and takes clearly longer.
#[test]
fn a_restart_on_unchanged_files_logs_a_device_in_at_once() {
    if !have("curl") || !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = TestServer::start_in(data.clone());
    // Big enough that reading it takes clearly longer than the bound.
    let size = 1024 * MIB;
    let at = 300 * MIB;
    let want = standard_vdisk(&server, dir.path(), "v", size, "52:54:00:aa:00:01", at);
    let mac = "52:54:00:aa:00:01";
    let (reply, _) = first_login(&server, mac, Instant::now());
    assert_eq!(reply["version"], 2, "{reply}");

    assert_eq!(server.stop().code(), Some(0));
    let start = Instant::now();
    server.restart();
    let (reply, took) = first_login(&server, mac, start);
    let log = server.log_text();
    assert!(
        took <= LOGIN_BOUND,
        "first login {took:?} after a restart on unchanged files (bound {LOGIN_BOUND:?}):\n{log}"
    );
    let read = server.metric("vstream_verify_read_bytes_total");
    assert_eq!(
        read, 0,
        "the checks before offering read {read} bytes:\n{log}"
    );
    assert!(
        log_lines(&log, "replica verified by its record", "v").len() >= 2,
        "versions 1 and 2 offered from the record:\n{log}"
    );

    // Served: the bytes are the image's.
    let url = format!(
        "nbd://127.0.0.1:{}/{}",
        server.nbd_port,
        reply["export"].as_str().expect("export")
    );
    let mut nbd = Nbd::connect(&url);
    let got = dir.path().join("got");
    nbd.ok(&format!("pread {at} 1048576 {}", p(&got)));
    nbd.quit();
    assert!(std::fs::read(&got).unwrap() == want, "export bytes differ");

    // Read again in the background, at the scrub's pace: the base once.
    wait_for(180, "the background re-check of version 2", || {
        (!log_lines(&server.log_text(), "replica re-checked", "v").is_empty()).then_some(())
    });
    wait_for(60, "both versions re-checked", || {
        (log_lines(&server.log_text(), "replica re-checked", "v").len() == 2).then_some(())
    });
    let reread = server.metric("vstream_recheck_read_bytes_total");
    assert!(
        (size..size + 2 * MIB).contains(&reread),
        "the re-check read {reread} bytes for a {size}-byte base and an empty layer"
    );

    // Without the record the same restart reads the vDisk first.
    assert_eq!(server.stop().code(), Some(0));
    std::fs::remove_file(data.join("vdisks/v/verified.json")).expect("the record exists");
    let start = Instant::now();
    server.restart();
    let (_, full) = first_login(&server, mac, start);
    let read = server.metric("vstream_verify_read_bytes_total");
    assert!(read >= size, "a restart without a record read {read} bytes");
    assert!(
        full > took * 2,
        "with the record the first login took {took:?}, reading the vDisk first {full:?}"
    );
    assert!(
        data.join("vdisks/v/verified.json").exists(),
        "the check wrote the record again"
    );

    // A server stopped while it re-checks (1 GiB at 64 MiB/s) stops at once.
    assert_eq!(server.stop().code(), Some(0));
    server.restart();
    first_login(&server, mac, Instant::now());
    wait_for(30, "the re-check to begin", || {
        (server.metric("vstream_recheck_read_bytes_total") > 0).then_some(())
    });
    let stopping = Instant::now();
    assert_eq!(server.stop().code(), Some(0));
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "SIGTERM waited {:?} for the re-check",
        stopping.elapsed()
    );
}

/// (b) A layer file changed while the server was down (one flipped byte) is
/// read before it is offered, and refused, whether its modification time
/// changed or was set back (`touch -r`); an unchanged vDisk beside it is
/// offered at once. A flip no file metadata shows (bit rot under the file
/// system, played by writing the record anew) is offered at start and
/// taken out of service by the background re-check.
#[test]
fn a_layer_changed_while_the_server_was_down_is_caught_before_it_is_offered() {
    if !have("curl") || !have("touch") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = TestServer::start_in(data.clone());
    let size = 64 * MIB;
    standard_vdisk(&server, dir.path(), "a", size, "52:54:00:bb:00:01", 0);
    standard_vdisk(&server, dir.path(), "b", size, "52:54:00:bb:00:02", 0);
    let (mac_a, mac_b) = ("52:54:00:bb:00:01", "52:54:00:bb:00:02");
    first_login(&server, mac_a, Instant::now());
    first_login(&server, mac_b, Instant::now());
    let layer = base_layer(&data, "b");
    let at = 40 * MIB + 123;

    // Each restart: b refused from the start until its check fails, and after.
    let refused_after_restart = |server: &mut TestServer, why: &str| {
        server.restart();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (code, body) = login(server, mac_b);
            assert_ne!(code, 200, "{why}: b offered: {body}\n{}", server.log_text());
            if log_lines(&server.log_text(), "failed verification", "b").len() >= 2 {
                break;
            }
            assert!(Instant::now() < deadline, "{why}: no failed check of b");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(2500));
        let (code, body) = login(server, mac_b);
        assert_eq!(code, 503, "{why}: {body}");
        // a is as it was: offered unread.
        let (code, body) = login(server, mac_a);
        assert_eq!(code, 200, "{why}: {body}");
        let log = server.log_text();
        assert!(
            log_lines(&log, "replica verified by its record", "a").len() >= 2,
            "{why}: a was read again:\n{log}"
        );
    };
    let fix_and_recheck = |server: &mut TestServer| {
        flip(&layer, size, at);
        server.restart();
        first_login(server, mac_b, Instant::now());
        assert_eq!(server.stop().code(), Some(0));
    };

    // 1. A plain write: the modification time changes.
    assert_eq!(server.stop().code(), Some(0));
    flip(&layer, size, at);
    refused_after_restart(&mut server, "a flipped byte");
    assert_eq!(server.stop().code(), Some(0));
    fix_and_recheck(&mut server);

    // 2. The modification time set back with touch -r.
    let reference = dir.path().join("times");
    std::fs::write(&reference, b"").unwrap();
    common::run("touch", &["-r", p(&layer), p(&reference)]);
    flip(&layer, size, at);
    common::run("touch", &["-r", p(&reference), p(&layer)]);
    let m = std::fs::metadata(&layer).unwrap();
    let r = std::fs::metadata(&reference).unwrap();
    assert_eq!((m.mtime(), m.mtime_nsec()), (r.mtime(), r.mtime_nsec()));
    refused_after_restart(&mut server, "a flipped byte, mtime set back");
    assert_eq!(server.stop().code(), Some(0));
    fix_and_recheck(&mut server);

    // 3. Bit rot: the record rewritten to the file as it is now.
    flip(&layer, size, at);
    record_as_is(&data, "b", &layer);
    server.restart();
    wait_for(60, "the re-check to take b out of service", || {
        (log_lines(&server.log_text(), "failed its re-check", "b").len() >= 2).then_some(())
    });
    assert!(server.metric("vstream_recheck_failures_total") >= 2);
    std::thread::sleep(Duration::from_millis(2500));
    let (code, body) = login(&server, mac_b);
    assert_eq!(
        code, 503,
        "b still offered after its re-check failed: {body}"
    );
    let (code, body) = login(&server, mac_a);
    assert_eq!(code, 200, "{body}");
    // Forgotten: the next start reads b before offering it.
    assert_eq!(server.stop().code(), Some(0));
    refused_after_restart(&mut server, "after a failed re-check");
}

/// (c) A server restarted under a device writing its Private-mode vDisk
/// does not check that version as a replica: no "failed verification" for
/// it, whenever the device's writes come.
#[test]
fn a_private_vdisk_a_device_writes_is_not_checked_as_a_replica_at_start() {
    if !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start_in(dir.path().join("data"));
    let img = dir.path().join("p.raw");
    random_bytes(&img, 512 * MIB);
    server.cli_ok(&["vdisk", "import", "p", p(&img)]);
    std::fs::remove_file(&img).unwrap();
    server.cli_ok(&[
        "device",
        "add",
        "d1",
        "--mac",
        "52:54:00:cc:00:01",
        "--vdisk",
        "p",
    ]);
    // Writes from 1.2 s come while the check (from 1 s on) reads; writes
    // from 0.3 s come before it, racing the status that names the hash.
    for (round, from_ms) in [1200, 300, 1200, 300].into_iter().enumerate() {
        // The stored content hash is current (the import, or `vdisk show`
        // after the last round's writes), as a quiet Private vDisk's is.
        server.cli_ok(&["vdisk", "show", "p"]);
        assert_eq!(server.stop().code(), Some(0));
        let start = Instant::now();
        server.restart();
        // The device boots: it reads at once, and writes from `from_ms` on.
        let mut d = Nbd::connect(&server.url("device/d1"));
        d.ok(&format!("pread 0 65536 {}", p(&dir.path().join("boot"))));
        let mut i = 0u64;
        while start.elapsed() < Duration::from_secs(5) {
            if start.elapsed() > Duration::from_millis(from_ms) {
                // Near the end, where a check reading in order comes last.
                d.ok(&format!(
                    "fill {} 65536 {}",
                    (511 - i % 256) * MIB,
                    round + 1
                ));
                i += 1;
            }
            std::thread::sleep(Duration::from_millis(40));
        }
        d.ok("flush");
        d.quit();
        let log = server.log_text();
        let bad: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("verification") || l.contains("not current"))
            .filter(|l| l.contains("ERROR") || l.contains("WARN"))
            .collect();
        assert!(
            bad.is_empty(),
            "round {round}: the written Private version was checked as a replica:\n{}",
            bad.join("\n")
        );
        assert!(
            log_lines(&log, "replica verified", "p").is_empty(),
            "round {round}: the written Private version was read as a replica:\n{log}"
        );
    }
}

/// True if `s` sees server `server` up and holding `vdisk@number` verified.
fn offered_by(s: &TestServer, server: &str, vdisk: &str, number: u64) -> bool {
    let out = s.cli(&["server", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    list.as_array().is_some_and(|l| {
        l.iter().any(|x| {
            x["name"] == server
                && x["up"] == true
                && x["versions"].as_array().is_some_and(|vs| {
                    vs.iter().any(|v| {
                        v["vdisk"] == vdisk && v["number"] == number && v["verified"] == true
                    })
                })
        })
    })
}

/// In a farm, a copy the background re-check finds bad after a restart is
/// taken out of service: every login, on either server, goes to the other.
#[test]
fn logins_leave_a_copy_that_fails_its_recheck() {
    if !have("curl") {
        return;
    }
    let Some(etcd) = TestEtcd::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let [s1, mut s2] = common::farm_of(dir.path(), &etcd, &[]);
    let size = 64 * MIB;
    let mac = "52:54:00:dd:00:01";
    standard_vdisk(&s1, dir.path(), "r", size, mac, 0);
    wait_for(120, "version 2 replicated and verified on s2", || {
        offered_by(&s1, "s2", "r", 2).then_some(())
    });
    assert_eq!(s2.stop().code(), Some(0));
    let layer = base_layer(&s2.data, "r");
    flip(&layer, size, 17 * MIB + 5);
    record_as_is(&s2.data, "r", &layer);
    s2.restart();
    let log = wait_for(60, "s2's re-check to take r out of service", || {
        let log = s2.log_text();
        (log_lines(&log, "failed its re-check", "r").len() >= 2).then_some(log)
    });
    assert!(
        log_lines(&log, "replica verified by its record", "r").len() >= 2,
        "s2 offered r from its record at start:\n{log}"
    );
    wait_for(10, "s1 to see s2's copy withdrawn", || {
        (!offered_by(&s1, "s2", "r", 2) && offered_by(&s1, "s1", "r", 2)).then_some(())
    });
    for round in 0..10 {
        for s in [&s1, &s2] {
            let (code, body) = login(s, mac);
            assert_eq!(code, 200, "{body}");
            let reply: serde_json::Value = serde_json::from_str(&body).expect("reply");
            assert_eq!(
                reply["server"], "s1",
                "login {round} via {}: {reply}",
                s.api
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
