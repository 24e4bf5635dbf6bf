//! Compatibility: a data folder and an etcd farm written by an earlier binary open
//! unchanged with this one. The fixture in tests/compat/fixture was made by
//! `tests/compat/make-fixture.sh` with the binary its `expected.json` names (`made_by`):
//! a Standard vDisk with a production and a test version, a Private vDisk written in
//! place, three devices. Each test copies it, starts today's server on it, and checks
//! that the server lists the same vDisks, versions (content hashes included) and
//! devices, serves the same bytes on every export, and still writes in place.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use common::nbd::{read_export, Nbd};
use common::{have, have_python_nbd, repo, TestEtcd, TestServer};

fn fixture(kind: &str) -> PathBuf {
    repo().join("tests/compat/fixture").join(kind)
}

/// A private copy of the fixture's data folder (the server writes to it).
fn copy_data(kind: &str, into: &Path) -> PathBuf {
    let data = into.join("data");
    let st = Command::new("cp")
        .arg("-a")
        .arg(fixture(kind).join("data"))
        .arg(&data)
        .status()
        .expect("cp");
    assert!(st.success(), "copying the fixture failed");
    data
}

fn expected(kind: &str) -> Value {
    let p = fixture(kind).join("expected.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).expect("expected.json")
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn sha256(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(bytes)
        .expect("writing to sha256sum");
    let out = child.wait_with_output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_string()
}

/// `have` with each object cut down to the keys `like`'s object at the
/// same place has (arrays element by element).
fn only_keys_of(have: &Value, like: &Value) -> Value {
    match (have, like) {
        (Value::Array(h), Value::Array(l)) => Value::Array(
            h.iter()
                .zip(l.iter().chain(std::iter::repeat(&Value::Null)))
                .map(|(h, l)| only_keys_of(h, l))
                .collect(),
        ),
        (Value::Object(h), Value::Object(l)) => Value::Object(
            h.iter()
                .filter(|(k, _)| l.contains_key(*k))
                .map(|(k, v)| (k.clone(), only_keys_of(v, &l[k])))
                .collect(),
        ),
        _ => have.clone(),
    }
}

/// Everything the old binary said, and the server agrees: lists, hashes, bytes, writes.
fn check_server(server: &TestServer, want: &Value) {
    assert_eq!(
        json(&server.cli_ok(&["vdisk", "list", "--json"])),
        want["vdisks"],
        "vdisk list differs from what the old binary listed"
    );
    for vdisk in ["golden", "scratch"] {
        assert_eq!(
            json(&server.cli_ok(&["version", "list", vdisk, "--json"])),
            want["versions"][vdisk],
            "version list {vdisk} differs from what the old binary listed"
        );
    }
    // New fields may follow (the iSCSI names); every old one stays as it was.
    assert_eq!(
        only_keys_of(
            &json(&server.cli_ok(&["device", "list", "--json"])),
            &want["devices"]
        ),
        want["devices"],
        "device list differs from what the old binary listed"
    );
    for export in ["golden", "golden@2", "device/pc1"] {
        let bytes = read_export(&server.url(export)).unwrap_or_else(|e| panic!("{export}: {e}"));
        assert_eq!(
            sha256(&bytes),
            want["sha256"][export].as_str().expect("a digest"),
            "{export} does not hold what the old binary served"
        );
    }
    // The Private vDisk is still written in place, and the write reads back.
    let scratch = server.data.join("compat-scratch");
    let mut pc1 = Nbd::connect(&server.url("device/pc1"));
    pc1.pwrite(b"written by today's binary", 4096, &scratch);
    pc1.ok("flush");
    assert_eq!(pc1.pread(4096, 25, &scratch), b"written by today's binary");
    assert_eq!(
        pc1.pread(0, 32, &scratch),
        b"pc1's own data, written in place"
    );
    pc1.quit();
    // A new version still comes after the old ones, and the maintenance device writes it.
    server.cli_ok(&["version", "new", "golden"]);
    let list = json(&server.cli_ok(&["version", "list", "golden", "--json"]));
    let numbers: Vec<u64> = list
        .as_array()
        .expect("an array")
        .iter()
        .filter_map(|v| v["number"].as_u64())
        .collect();
    assert_eq!(numbers, vec![1, 2, 3], "versions after version new");
}

fn tools() -> bool {
    have_python_nbd() && have("sha256sum")
}

#[test]
fn an_embedded_farm_written_by_the_old_binary_opens_unchanged() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let data = copy_data("embedded", dir.path());
    let server = TestServer::start_in(data);
    check_server(&server, &expected("embedded"));
}

#[test]
fn an_etcd_farm_written_by_the_old_binary_opens_unchanged() {
    if !tools() || !have("etcdctl") {
        return;
    }
    let Some(etcd) = TestEtcd::start() else {
        return;
    };
    let keys: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("etcd").join("keys.json")).expect("keys.json"),
    )
    .expect("keys.json is JSON");
    for kv in keys.as_array().expect("an array of keys") {
        let (key, value) = (
            kv["key"].as_str().expect("key"),
            kv["value"].as_str().expect("value"),
        );
        let st = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &etcd.url, "put", "--", key, value])
            .stdout(Stdio::null())
            .status()
            .expect("etcdctl");
        assert!(st.success(), "etcdctl put {key} failed");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let data = copy_data("etcd", dir.path());
    let server = TestServer::start_in_farm(data, &etcd.url, "fx1");
    common::wait_farm_ready(&server, 1);
    check_server(&server, &expected("etcd"));
}
