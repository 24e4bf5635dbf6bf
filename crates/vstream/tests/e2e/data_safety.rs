//! A wrong farm view never deletes a vDisk: a data folder knows its farm,
//! a vDisk the farm does not list is quarantined (kept, reported, never
//! served) until an admin adopts or removes it, and only a tombstone lets a
//! server remove its copy by itself.

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_ports, wait_for, TestEtcd, TestServer, BIN};

/// Runs `vstream server` on `data` with `extra` flags, expecting it to refuse
/// to start; returns what it printed.
fn refused(data: &Path, extra: &[&str]) -> String {
    let [nbd, api] = free_ports::<2>();
    let mut child = Command::new(BIN)
        .args(["server", "--data"])
        .arg(data)
        .args(["--nbd", &format!("127.0.0.1:{nbd}")])
        .args(["--api", &format!("127.0.0.1:{api}")])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "the server started (it should have refused); its log:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().expect("output");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!status.success(), "refused with a failure status:\n{text}");
    text
}

fn has_vdisk(data: &Path, name: &str) -> bool {
    data.join("vdisks").join(name).join("vdisk.toml").is_file()
}

fn quarantined(server: &TestServer) -> Vec<serde_json::Value> {
    let out = server.cli_ok(&["quarantine", "list", "--json"]);
    serde_json::from_str(&out).expect("quarantine list JSON")
}

#[test]
fn a_moved_farm_redb_stops_the_server_and_adoption_keeps_every_vdisk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut s = TestServer::start_in(data.clone());
    s.cli_ok(&["vdisk", "create", "keep1", "--size", "8MiB"]);
    s.cli_ok(&["vdisk", "create", "keep2", "--size", "16MiB"]);
    assert_eq!(s.stop().code(), Some(0));
    std::fs::rename(data.join("farm.redb"), dir.path().join("farm.redb.moved")).expect("move");

    // A new farm state: refused, with the way out, and nothing touched.
    let log = refused(&data, &[]);
    assert!(log.contains("belongs to farm"), "{log}");
    assert!(log.contains("--adopt-data"), "{log}");
    assert!(has_vdisk(&data, "keep1") && has_vdisk(&data, "keep2"));

    // Adopted on purpose: the vDisks wait in quarantine, reported, kept.
    let s = TestServer::start_with(data.clone(), &["--adopt-data"]);
    let q = wait_for(10, "both vDisks quarantined", || {
        let q = quarantined(&s);
        (q.len() == 2).then_some(q)
    });
    assert_eq!(q[0]["vdisk"], "keep1");
    assert_eq!(q[0]["size"], 8 << 20);
    std::thread::sleep(Duration::from_secs(3));
    assert!(has_vdisk(&data, "keep1") && has_vdisk(&data, "keep2"));
    assert!(
        s.log_text().contains("kept in quarantine"),
        "{}",
        s.log_text()
    );
    // Never served while quarantined: the farm does not know it; its name
    // is not taken over by a new vDisk.
    assert!(s
        .cli_ok(&["vdisk", "list"])
        .lines()
        .all(|l| !l.contains("keep1")));
    let err = s.cli_err(&["vdisk", "create", "keep1", "--size", "4MiB"]);
    assert!(err.contains("quarantined"), "{err}");

    // Without --yes, a command only says what it would do.
    let dry = s.cli_ok(&["quarantine", "remove", "keep2"]);
    assert!(dry.contains("nothing done"), "{dry}");
    assert!(has_vdisk(&data, "keep2"));

    // Adopt one, remove the other.
    s.cli_ok(&["quarantine", "adopt", "keep1", "--yes"]);
    let shown = s.cli_ok(&["vdisk", "show", "keep1"]);
    assert!(shown.contains("8 MiB"), "{shown}");
    s.cli_ok(&["quarantine", "remove", "keep2", "--yes"]);
    assert!(!has_vdisk(&data, "keep2"));
    wait_for(10, "quarantine empty", || {
        quarantined(&s).is_empty().then_some(())
    });
    assert!(has_vdisk(&data, "keep1"));
}

#[test]
fn standalone_to_etcd_keeps_every_vdisk_and_device() {
    let Some(etcd) = TestEtcd::start() else {
        return;
    };
    let farm = format!("etcd://{}", etcd.url.trim_start_matches("http://"));
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut s = TestServer::start_in(data.clone());
    s.cli_ok(&["vdisk", "create", "keepme", "--size", "8MiB"]);
    s.cli_ok(&[
        "device",
        "add",
        "pc1",
        "--mac",
        "52:54:00:00:15:01",
        "--vdisk",
        "keepme",
    ]);
    assert_eq!(s.stop().code(), Some(0));

    // Restarted against etcd without migrating: refused, the way told.
    let log = refused(&data, &["--farm", &farm, "--name", "s1"]);
    assert!(log.contains("vstream farm migrate"), "{log}");
    assert!(has_vdisk(&data, "keepme"));

    let out = Command::new(BIN)
        .args(["farm", "migrate", "--data"])
        .arg(&data)
        .args(["--to", &farm])
        .output()
        .expect("migrate");
    assert!(
        out.status.success(),
        "migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let s = TestServer::start_in_farm(data.clone(), &etcd.url, "s1");
    std::thread::sleep(Duration::from_secs(4));
    assert!(has_vdisk(&data, "keepme"));
    assert!(s.cli_ok(&["vdisk", "list"]).contains("keepme"));
    assert!(s.cli_ok(&["device", "list"]).contains("pc1"));
    assert!(quarantined(&s).is_empty());

    // The etcd farm has an identity now: a second migration is refused.
    let again = Command::new(BIN)
        .args(["farm", "migrate", "--data"])
        .arg(&data)
        .args(["--to", &farm])
        .output()
        .expect("migrate");
    assert!(!again.status.success());
}

#[test]
fn a_farm_that_forgets_a_vdisk_gets_it_quarantined_not_deleted() {
    let Some(etcd) = TestEtcd::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let s = TestServer::start_in_farm(data.clone(), &etcd.url, "s1");
    s.cli_ok(&["vdisk", "create", "g", "--size", "8MiB"]);
    // An etcd rewound to a snapshot before the vDisk: its records are gone.
    let etcdctl = |args: &[&str]| {
        let out = Command::new("etcdctl")
            .args(["--endpoints", &etcd.url])
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()
            .expect("etcdctl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    etcdctl(&["del", "/vstream/farm/vdisks/g"]);
    etcdctl(&["del", "/vstream/farm/catalog/g"]);
    wait_for(10, "g quarantined", || {
        quarantined(&s)
            .iter()
            .any(|q| q["vdisk"] == "g")
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(has_vdisk(&data, "g"), "{}", s.log_text());

    // A vDisk deleted through vstream leaves a tombstone: that one goes.
    s.cli_ok(&["quarantine", "adopt", "g", "--yes"]);
    s.cli_ok(&["vdisk", "create", "h", "--size", "8MiB"]);
    s.cli_ok(&["vdisk", "delete", "h"]);
    assert!(!has_vdisk(&data, "h"));
    let out = Command::new("etcdctl")
        .args([
            "--endpoints",
            &etcd.url,
            "get",
            "/vstream/farm/tombstones/h",
        ])
        .env("ETCDCTL_API", "3")
        .output()
        .expect("etcdctl");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"created\""));
    assert!(has_vdisk(&data, "g"));
}

const MIB: u64 = 1 << 20;

/// Imports `size` bytes of random data (every block data) as Standard-mode
/// vDisk `name` with device-side caches, on `s`.
fn import_standard(s: &TestServer, dir: &Path, name: &str, size: u64) {
    let image = dir.join(format!("{name}.raw"));
    common::dense_image(&image, size, 7);
    s.cli_ok(&["vdisk", "import", name, image.to_str().expect("path")]);
    s.cli_ok(&[
        "vdisk",
        "set",
        name,
        "--mode",
        "standard",
        "--cache-type",
        "device",
    ]);
}

/// Version 2 of `vdisk`, made by maintenance device `m` on `s` and promoted
/// to production: version 1 is then an older production version.
fn make_version_2(s: &TestServer, vdisk: &str) {
    s.cli_ok(&[
        "device",
        "add",
        "m",
        "--mac",
        "52:54:00:00:15:99",
        "--vdisk",
        vdisk,
        "--type",
        "maintenance",
    ]);
    s.cli_ok(&["version", "new", vdisk]);
    common::run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 1M 64k",
            &s.url("device/m"),
        ],
    );
    wait_for(20, "m to disconnect", || {
        let out = s.cli_ok(&["device", "show", "m", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        (v["connected"] == false).then_some(())
    });
    s.cli_ok(&["version", "promote", vdisk, "2", "--to", "production"]);
}

#[test]
fn a_version_a_device_runs_on_another_server_is_neither_merged_away_nor_deleted() {
    if !common::have("qemu-io") {
        return;
    }
    let Some(etcd) = TestEtcd::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let [s1, s2] = common::farm_of(dir.path(), &etcd, &[]);
    import_standard(&s1, dir.path(), "g1", 16 * MIB);
    s1.cli_ok(&[
        "device",
        "add",
        "d1",
        "--mac",
        "52:54:00:00:15:11",
        "--vdisk",
        "g1",
    ]);
    // d1 boots version 1 from s1 only.
    let agent = common::TestAgent::start(
        dir.path(),
        "d1",
        "52:54:00:00:15:11",
        &[&s1.api],
        "ram:64MiB",
    );
    make_version_2(&s1, "g1");
    let json = |s: &TestServer, args: &[&str]| -> serde_json::Value {
        serde_json::from_str(&s.cli_ok(args)).expect("JSON")
    };
    let sessions_of_d1 = |s: &TestServer| -> Vec<String> {
        json(s, &["server", "list", "--json"])
            .as_array()
            .expect("servers")
            .iter()
            .filter(|srv| {
                srv["sessions"]
                    .as_array()
                    .is_some_and(|ss| ss.iter().any(|x| x["device"] == "d1"))
            })
            .map(|srv| srv["name"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    wait_for(30, "s2 to hold version 2 and see d1", || {
        // Until s2 has copied g1, it has no versions of it to list.
        let out = s2.cli(&["version", "list", "g1", "--json"]);
        let versions: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let has2 = versions
            .as_array()
            .is_some_and(|vs| vs.iter().any(|v| v["number"] == 2));
        (has2 && sessions_of_d1(&s2) == ["s1"]).then_some(())
    });
    // From either server: refused, naming the device.
    for s in [&s1, &s2] {
        let err = s.cli_err(&["version", "merge", "g1"]);
        assert!(err.contains("d1"), "merge from {}: {err}", s.api);
        let err = s.cli_err(&["version", "delete", "g1", "1"]);
        assert!(err.contains("d1"), "delete from {}: {err}", s.api);
    }
    let versions = json(&s2, &["version", "list", "g1", "--json"]);
    assert!(
        versions.as_array().is_some_and(|vs| vs
            .iter()
            .any(|v| v["number"] == 1 && v["state"] == "production")),
        "{versions}"
    );
    drop(agent);
}

#[test]
fn an_agent_whose_version_is_gone_gets_an_io_error_not_a_hang() {
    if !common::have("qemu-io") || !common::have("etcdctl") || !common::have("python3") {
        return;
    }
    let Some(etcd) = TestEtcd::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s1 = TestServer::start_in_farm(dir.path().join("s1"), &etcd.url, "s1");
    import_standard(&s1, dir.path(), "g4", 16 * MIB);
    s1.cli_ok(&[
        "device",
        "add",
        "d4",
        "--mac",
        "52:54:00:00:15:44",
        "--vdisk",
        "g4",
    ]);
    let agent = common::TestAgent::start(
        dir.path(),
        "d4",
        "52:54:00:00:15:44",
        &[&s1.api],
        "ram:64MiB",
    );
    make_version_2(&s1, "g4");
    // The server goes down; meanwhile the farm loses version 1 for good (as
    // an older server's merge, or a hand-edited farm state, would).
    s1.kill9();
    let key = "/vstream/farm/catalog/g4";
    let got = Command::new("etcdctl")
        .args(["--endpoints", &etcd.url, "get", key, "--print-value-only"])
        .env("ETCDCTL_API", "3")
        .output()
        .expect("etcdctl get");
    let mut cat: serde_json::Value =
        serde_json::from_slice(&got.stdout).expect("the catalog's JSON");
    for v in cat["versions"].as_array_mut().expect("versions") {
        if v["number"] == 1 {
            v["state"] = "retired".into();
            v["layers"] = serde_json::json!([]);
        }
    }
    let put = Command::new("etcdctl")
        .args(["--endpoints", &etcd.url, "put", key, &cat.to_string()])
        .env("ETCDCTL_API", "3")
        .output()
        .expect("etcdctl put");
    assert!(put.status.success());
    s1.restart();
    // A read of the base: it must fail, within a bounded time, not hang.
    let started = Instant::now();
    let out = Command::new("timeout")
        .args(["90", "qemu-io", "-f", "raw", "-r", "-c", "read 8M 64k"])
        .arg(format!("nbd+unix:///?socket={}", agent.sock.display()))
        .output()
        .expect("qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(out.status.code(), Some(124), "the read hung for 90 s");
    assert!(text.contains("Input/output error"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(
        agent.log_text().contains("gone from the farm"),
        "{}",
        agent.log_text()
    );
}

#[test]
fn a_copy_changed_while_the_server_was_down_is_not_served() {
    if !common::have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = TestServer::start_in(dir.path().join("data"));
    import_standard(&s, dir.path(), "g", 16 * MIB);
    s.cli_ok(&[
        "device",
        "add",
        "pc",
        "--mac",
        "52:54:00:00:15:21",
        "--vdisk",
        "g",
    ]);
    let versions: serde_json::Value =
        serde_json::from_str(&s.cli_ok(&["version", "list", "g", "--json"])).expect("JSON");
    let hash = versions[0]["content_hash"]
        .as_str()
        .expect("a content hash")
        .to_owned();
    let base = s.url(&format!("base/pc@1/{hash}"));
    common::run("qemu-io", &["-f", "raw", "-r", "-c", "read 0 64k", &base]);
    assert_eq!(s.stop().code(), Some(0));
    // One byte of the data flips while the server is down.
    let layer = std::fs::read_dir(s.data.join("vdisks/g"))
        .expect("vdisk folder")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "layer"))
        .expect("a layer file");
    let len = std::fs::metadata(&layer).expect("layer").len();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&layer)
            .expect("open layer");
        let at = len - 16 * MIB + 3 * MIB + 17;
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).expect("read");
        f.write_all_at(&[!b[0]], at).expect("write");
        f.sync_all().expect("sync");
    }
    s.restart();
    // At once: neither the base export nor the device export serves it.
    for url in [base, s.url("device/pc")] {
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-r", "-c", "read 0 64k", &url])
            .output()
            .expect("qemu-io");
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(
            !out.status.success() || text.contains("failed"),
            "{url} was served: {text}"
        );
        assert!(text.contains("verification"), "{url}: {text}");
    }
}

#[test]
fn a_copy_of_a_farm_vdisk_imported_on_another_server_is_no_stranger() {
    let Some(etcd) = TestEtcd::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let s1 = TestServer::start_in_farm(dir.path().join("s1"), &etcd.url, "s1");
    let s2 = TestServer::start_in_farm_with(
        dir.path().join("s2"),
        &etcd.url,
        "s2",
        &["--replication-window", "03:00-03:01"],
        &[("VSTREAM_UTC_OFFSET", "0")],
    );
    import_standard(&s1, dir.path(), "g", 8 * MIB);
    // The same image imported on s2 too (PVS's manual copy): a copy of the
    // farm's vDisk, not a vDisk of its own.
    let image = dir.path().join("g.raw");
    s2.cli_ok(&["vdisk", "import", "g", image.to_str().expect("path")]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(quarantined(&s2).is_empty(), "{}", s2.log_text());
    assert!(has_vdisk(&s2.data, "g"));
}
