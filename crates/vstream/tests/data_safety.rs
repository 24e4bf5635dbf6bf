//! A wrong farm view never deletes a vDisk: a data folder knows its farm,
//! a vDisk the farm does not list is quarantined (kept, reported, never
//! served) until an admin adopts or removes it, and only a tombstone lets a
//! server remove its copy by itself.

mod common;

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
    // Never served while quarantined: the farm does not know it.
    assert!(s
        .cli_ok(&["vdisk", "list"])
        .lines()
        .all(|l| !l.contains("keep1")));

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
