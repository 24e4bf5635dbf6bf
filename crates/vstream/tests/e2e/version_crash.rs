//! Crash injection into the version operations: the server aborts at each
//! named step (`VSTREAM_CRASH_AT`), is started again without it, and must
//! show the old state or the new one, with every sealed version's bytes and
//! content hash intact, no layer lost, no stray file left, and the operation
//! possible to retry.

use crate::common;

use std::collections::{BTreeSet, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use common::nbd::{read_exports, text};
use common::{have_python_nbd, have_test_hooks, TestServer, PYTHON};

const MIB: usize = 1 << 20;
const SIZE: usize = 4 * MIB;
const VD: &str = "c";

/// `WRITER URL OFF PATH [OFF PATH ...]`: connects, pwrites each file's bytes
/// at its offset, flushes, and disconnects with NBD_CMD_DISC.
const WRITER: &str = r#"
import sys
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
args = sys.argv[2:]
for i in range(0, len(args), 2):
    with open(args[i + 1], "rb") as f:
        h.pwrite(f.read(), int(args[i]))
h.flush()
h.shutdown()
"#;

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// A server process started by this test with `VSTREAM_CRASH_AT`; killed if
/// the test ends while it still runs.
struct Crashing(Child);

impl Drop for Crashing {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// One vDisk on one server, with what every version should hold.
struct Case {
    server: TestServer,
    /// Expected bytes of every live version.
    data: HashMap<u32, Vec<u8>>,
    /// Content hashes recorded so far; a version's must never change.
    hashes: HashMap<u32, String>,
    scratch: tempfile::TempDir,
    rng: StdRng,
    imports: u32,
}

impl Case {
    /// vDisk `c` (4 MiB of scattered random data) as version 1, in Standard
    /// mode, and a maintenance device `m1`.
    fn new(seed: u64) -> Case {
        let server = TestServer::start();
        let scratch = tempfile::tempdir().expect("tempdir");
        let img = scratch.path().join("v1.img");
        common::random_image(&img, SIZE as u64, seed);
        server.cli_ok(&["vdisk", "import", VD, img.to_str().unwrap()]);
        server.cli_ok(&["vdisk", "set", VD, "--mode", "standard"]);
        server.cli_ok(&[
            "device",
            "add",
            "m1",
            "--mac",
            "52:54:00:60:00:01",
            "--vdisk",
            VD,
            "--type",
            "maintenance",
        ]);
        let mut case = Case {
            server,
            data: HashMap::from([(1, std::fs::read(&img).unwrap())]),
            hashes: HashMap::new(),
            scratch,
            rng: StdRng::seed_from_u64(seed),
            imports: 0,
        };
        case.check(&[(1, "production")]);
        case
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        self.server.cli_ok(args)
    }

    fn versions(&self) -> Vec<Value> {
        match json(&self.cli_ok(&["version", "list", VD, "--json"])) {
            Value::Array(a) => a,
            other => panic!("version list --json is not an array: {other}"),
        }
    }

    /// `version new`, then m1 writes some random extents into it.
    fn new_version(&mut self, expect: u32) {
        let out = self.cli_ok(&["version", "new", VD]);
        assert!(out.contains(&format!("version {expect} ")), "{out}");
        let head = self.data.keys().copied().max().unwrap();
        let base = self.data[&head].clone();
        self.data.insert(expect, base);
        self.maintain(expect);
    }

    /// m1 writes a few random extents (unaligned too) into `version`.
    fn maintain(&mut self, version: u32) {
        let mut args = vec![self.server.url("device/m1")];
        for i in 0..5 {
            let len = self.rng.gen_range(1..100_000);
            let off = self.rng.gen_range(0..SIZE - len);
            let bytes: Vec<u8> = (0..len).map(|_| self.rng.gen()).collect();
            let path = self.scratch.path().join(format!("w{i}"));
            std::fs::write(&path, &bytes).unwrap();
            self.data.get_mut(&version).unwrap()[off..off + len].copy_from_slice(&bytes);
            args.push(off.to_string());
            args.push(path.to_str().unwrap().to_string());
        }
        let out = Command::new(PYTHON)
            .args(["-c", WRITER])
            .args(&args)
            .output()
            .expect("running the libnbd writer");
        assert!(out.status.success(), "m1 writing: {}", text(&out));
        let deadline = Instant::now() + Duration::from_secs(10);
        while json(&self.cli_ok(&["device", "show", "m1", "--json"]))["connected"] == true {
            assert!(Instant::now() < deadline, "m1 still connected");
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The content hash a flat import of `data` gets.
    fn flat_hash(&mut self, data: &[u8]) -> String {
        self.imports += 1;
        let name = format!("flat{}", self.imports);
        let path = self.scratch.path().join("flat.img");
        std::fs::write(&path, data).unwrap();
        self.cli_ok(&["vdisk", "import", &name, path.to_str().unwrap()]);
        let v = json(&self.cli_ok(&["vdisk", "show", &name, "--json"]));
        self.cli_ok(&["vdisk", "delete", &name]);
        v["content_hash"]
            .as_str()
            .expect("content_hash")
            .to_string()
    }

    /// Everything a crash must not break: the versions and their states as
    /// `want`, every live version's bytes, every hash (once recorded it never
    /// changes; a new one is the flat content's), the layer files.
    fn check(&mut self, want: &[(u32, &str)]) {
        let list = self.versions();
        let mut got: Vec<(u32, String)> = list
            .iter()
            .map(|v| {
                (
                    v["number"].as_u64().unwrap() as u32,
                    v["state"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        got.sort();
        let want_owned: Vec<(u32, String)> =
            want.iter().map(|(n, s)| (*n, s.to_string())).collect();
        assert_eq!(got, want_owned, "versions: {list:?}");
        let live: Vec<u32> = want
            .iter()
            .filter(|(_, s)| *s != "retired")
            .map(|(n, _)| *n)
            .collect();
        self.data.retain(|n, _| live.contains(n));
        let urls: Vec<String> = live
            .iter()
            .map(|n| self.server.url(&format!("{VD}@{n}")))
            .collect();
        for (n, got) in live.iter().zip(read_exports(&urls)) {
            let got = got.unwrap_or_else(|e| panic!("reading {VD}@{n}: {e}"));
            common::assert_same_bytes(&got, &self.data[n], &format!("{VD}@{n}"));
        }
        for v in &list {
            let n = v["number"].as_u64().unwrap() as u32;
            if !live.contains(&n) {
                continue;
            }
            let hash = v["content_hash"].as_str();
            if v["state"] == "maintenance" {
                assert!(hash.is_none(), "maintenance version with a hash: {v}");
                assert!(
                    v["sealed_unix"].is_null(),
                    "sealed maintenance version: {v}"
                );
                continue;
            }
            assert!(
                !v["sealed_unix"].is_null() || n == 1,
                "unsealed {} version: {v}",
                v["state"]
            );
            let hash = hash.unwrap_or_else(|| panic!("no content hash: {v}"));
            let expected = match self.hashes.get(&n) {
                Some(h) => h.clone(),
                None => {
                    let data = self.data[&n].clone();
                    self.flat_hash(&data)
                }
            };
            assert_eq!(hash, expected, "content hash of version {n}");
            self.hashes.insert(n, expected);
        }
        // Every layer the properties name is there; nothing else is (but
        // the verification record, which a crash may catch being written).
        let dir = self.server.data.join("vdisks").join(VD);
        let toml = std::fs::read_to_string(dir.join("vdisk.toml")).unwrap();
        let referenced: BTreeSet<String> = toml
            .split('"')
            .filter(|s| s.ends_with(".layer"))
            .map(str::to_string)
            .collect();
        let mut files = BTreeSet::new();
        for e in std::fs::read_dir(&dir).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            if !["vdisk.toml", "verified.json", ".verified.json.tmp"].contains(&name.as_str()) {
                files.insert(name);
            }
        }
        assert_eq!(
            files, referenced,
            "files in the vDisk folder vs layers in vdisk.toml:\n{toml}"
        );
    }

    /// Chain length of `version`, from `version list`.
    fn layers(&self, version: u32) -> u64 {
        let list = self.versions();
        let v = list
            .iter()
            .find(|v| v["number"] == version)
            .unwrap_or_else(|| panic!("no version {version}: {list:?}"));
        v["layers"].as_u64().unwrap()
    }

    /// Stops the server; starts it on the same folder and ports with
    /// `VSTREAM_CRASH_AT=step`; `args` must reach that step (the server
    /// aborts and the CLI fails); then starts it again without.
    fn crash_during(&mut self, step: &str, args: &[&str]) {
        let s = &mut self.server;
        s.stop();
        let api_port: u16 = s.api.rsplit(':').next().unwrap().parse().unwrap();
        let log_path = s.data.join(format!("crash-{}.log", step.replace(':', "-")));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = Crashing(
            Command::new(common::BIN)
                .args(["server", "--data"])
                .arg(&s.data)
                .args(["--nbd", &format!("127.0.0.1:{}", s.nbd_port)])
                .arg("--nbd")
                .arg(format!("unix:{}", s.sock.display()))
                .args(["--api", &format!("127.0.0.1:{api_port}")])
                .env("RUST_LOG", "info")
                .env("VSTREAM_CRASH_AT", step)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawning vstream server"),
        );
        let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(std::net::TcpStream::connect(("127.0.0.1", api_port)).is_ok()
            && log_text().contains("NBD listening"))
        {
            if let Some(st) = child.0.try_wait().unwrap() {
                panic!(
                    "the crashing server exited with {st} at start:\n{}",
                    log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the crashing server did not start:\n{}",
                log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = s.cli(args);
        assert!(
            !out.status.success(),
            "vstream {args:?} succeeded although the server should crash at {step}: {}",
            text(&out)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = child.0.try_wait().unwrap() {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not crash at {step}:\n{}",
                log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(
            status.signal(),
            Some(libc::SIGABRT),
            "the server ended with {status}, not at the crash point:\n{}",
            log_text()
        );
        assert!(
            log_text().contains(&format!("crash injected at {step}")),
            "{}",
            log_text()
        );
        s.restart();
    }
}

fn crash_in_seal_during_new(step: &str) {
    if !have_test_hooks() || !have_python_nbd() {
        return;
    }
    let mut c = Case::new(11);
    let import_hash = c.versions()[0]["content_hash"]
        .as_str()
        .unwrap()
        .to_string();
    c.hashes.insert(1, import_hash.clone());
    c.crash_during(step, &["version", "new", VD]);
    // The old state: version 1 alone, in production, not sealed.
    c.check(&[(1, "production")]);
    assert!(c.versions()[0]["sealed_unix"].is_null());
    // Retry: sealing version 1 gives it the same hash it had.
    c.new_version(2);
    c.check(&[(1, "production"), (2, "maintenance")]);
    assert!(!c.versions()[0]["sealed_unix"].is_null());
    c.cli_ok(&["version", "promote", VD, "2", "--to", "production"]);
    c.check(&[(1, "production"), (2, "production")]);
}

#[test]
fn crash_in_seal_hashed_during_new() {
    crash_in_seal_during_new("seal:hashed");
}

#[test]
fn crash_in_seal_layer_sealed_during_new() {
    crash_in_seal_during_new("seal:layer-sealed");
}

fn crash_in_seal_during_promote(step: &str) {
    if !have_test_hooks() || !have_python_nbd() {
        return;
    }
    let mut c = Case::new(12);
    c.new_version(2);
    c.crash_during(step, &["version", "promote", VD, "2", "--to", "test"]);
    // The old state: version 2 still in maintenance, unsealed, writable.
    c.check(&[(1, "production"), (2, "maintenance")]);
    c.maintain(2);
    c.check(&[(1, "production"), (2, "maintenance")]);
    // Retry: the hash covers the writes made after the crash.
    c.cli_ok(&["version", "promote", VD, "2", "--to", "test"]);
    c.check(&[(1, "production"), (2, "test")]);
}

#[test]
fn crash_in_seal_hashed_during_promote() {
    crash_in_seal_during_promote("seal:hashed");
}

#[test]
fn crash_in_seal_layer_sealed_during_promote() {
    crash_in_seal_during_promote("seal:layer-sealed");
}

#[test]
fn crash_after_new_layer_created() {
    if !have_test_hooks() || !have_python_nbd() {
        return;
    }
    let mut c = Case::new(13);
    c.crash_during("new:layer-created", &["version", "new", VD]);
    // No maintenance version, and its layer file is gone (check() compares
    // the folder with vdisk.toml).
    c.check(&[(1, "production")]);
    c.new_version(2);
    c.check(&[(1, "production"), (2, "maintenance")]);
}

#[test]
fn crash_after_new_saved() {
    if !have_test_hooks() || !have_python_nbd() {
        return;
    }
    let mut c = Case::new(14);
    c.crash_during("new:saved", &["version", "new", VD]);
    // The new state: the maintenance version is there, version 1 sealed.
    c.data.insert(2, c.data[&1].clone());
    c.check(&[(1, "production"), (2, "maintenance")]);
    assert!(!c.versions()[0]["sealed_unix"].is_null());
    let e = c.server.cli_err(&["version", "new", VD]);
    assert!(e.contains("already has maintenance version 2"), "{e}");
    c.maintain(2);
    c.cli_ok(&["version", "promote", VD, "2", "--to", "production"]);
    c.check(&[(1, "production"), (2, "production")]);
}

#[test]
fn crash_after_promote_saved() {
    if !have_test_hooks() || !have_python_nbd() {
        return;
    }
    let mut c = Case::new(15);
    c.new_version(2);
    c.crash_during(
        "promote:saved",
        &["version", "promote", VD, "2", "--to", "production"],
    );
    c.check(&[(1, "production"), (2, "production")]);
    let named = read_exports(&[c.server.url(VD)]).remove(0).unwrap();
    common::assert_same_bytes(&named, &c.data[&2], "the newest production version");
    let e = c
        .server
        .cli_err(&["version", "promote", VD, "2", "--to", "production"]);
    assert!(e.contains("cannot be promoted"), "{e}");
    c.new_version(3);
    c.cli_ok(&["version", "promote", VD, "3", "--to", "test"]);
    c.check(&[(1, "production"), (2, "production"), (3, "test")]);
}

#[test]
fn crash_after_rollback_saved() {
    if !have_test_hooks() || !have_python_nbd() {
        return;
    }
    let mut c = Case::new(16);
    c.new_version(2);
    c.cli_ok(&["version", "promote", VD, "2", "--to", "production"]);
    c.check(&[(1, "production"), (2, "production")]);
    c.crash_during("rollback:saved", &["version", "rollback", VD]);
    c.check(&[(1, "production"), (2, "test")]);
    let named = read_exports(&[c.server.url(VD)]).remove(0).unwrap();
    common::assert_same_bytes(&named, &c.data[&1], "the production version after rollback");
    let e = c.server.cli_err(&["version", "rollback", VD]);
    assert!(e.contains("no earlier production version"), "{e}");
    c.cli_ok(&["version", "promote", VD, "2", "--to", "production"]);
    c.check(&[(1, "production"), (2, "production")]);
}

#[test]
fn crash_after_delete_saved() {
    if !have_test_hooks() || !have_python_nbd() {
        return;
    }
    let mut c = Case::new(17);
    c.new_version(2);
    c.cli_ok(&["version", "promote", VD, "2", "--to", "test"]);
    c.new_version(3);
    c.check(&[(1, "production"), (2, "test"), (3, "maintenance")]);
    c.crash_during("delete:saved", &["version", "delete", VD, "3"]);
    // Gone, and so is its layer file.
    c.check(&[(1, "production"), (2, "test")]);
    let e = c.server.cli_err(&["version", "delete", VD, "3"]);
    assert!(e.contains("has no version 3"), "{e}");
    // Its number is not given again.
    c.new_version(4);
    c.check(&[(1, "production"), (2, "test"), (4, "maintenance")]);
    c.cli_ok(&["version", "delete", VD, "4"]);
    c.check(&[(1, "production"), (2, "test")]);
}

/// Versions 1 and 2 production, 3 test, 4 maintenance: each with its own writes.
fn merge_case(seed: u64) -> Case {
    let mut c = Case::new(seed);
    c.new_version(2);
    c.cli_ok(&["version", "promote", VD, "2", "--to", "production"]);
    c.new_version(3);
    c.cli_ok(&["version", "promote", VD, "3", "--to", "test"]);
    c.new_version(4);
    c.check(&[
        (1, "production"),
        (2, "production"),
        (3, "test"),
        (4, "maintenance"),
    ]);
    c
}

const MERGED: [(u32, &str); 4] = [
    (1, "retired"),
    (2, "production"),
    (3, "test"),
    (4, "maintenance"),
];

#[test]
fn crash_after_merge_layer_written() {
    if !have_test_hooks() || !have_python_nbd() {
        return;
    }
    let mut c = merge_case(18);
    c.crash_during("merge:layer-written", &["version", "merge", VD]);
    // The old state; the merged layer file is gone again.
    c.check(&[
        (1, "production"),
        (2, "production"),
        (3, "test"),
        (4, "maintenance"),
    ]);
    assert_eq!(
        [c.layers(2), c.layers(3), c.layers(4)],
        [2, 3, 4],
        "chains after a merge that did not happen"
    );
    c.cli_ok(&["version", "merge", VD]);
    c.check(&MERGED);
    assert_eq!([c.layers(2), c.layers(3), c.layers(4)], [1, 2, 3]);
    // The maintenance version still takes writes over the merged base.
    c.maintain(4);
    c.cli_ok(&["version", "promote", VD, "4", "--to", "production"]);
    c.check(&[
        (1, "retired"),
        (2, "production"),
        (3, "test"),
        (4, "production"),
    ]);
}

#[test]
fn crash_after_merge_saved() {
    if !have_test_hooks() || !have_python_nbd() {
        return;
    }
    let mut c = merge_case(19);
    c.crash_during("merge:saved", &["version", "merge", VD]);
    // The new state; the layers nothing uses any more are gone.
    c.check(&MERGED);
    assert_eq!([c.layers(2), c.layers(3), c.layers(4)], [1, 2, 3]);
    // Retry: already one layer, nothing to do.
    c.cli_ok(&["version", "merge", VD]);
    c.check(&MERGED);
    c.maintain(4);
    c.cli_ok(&["version", "promote", VD, "4", "--to", "test"]);
    // Version 3 is no longer the newest test version: it retires.
    c.cli_ok(&["version", "merge", VD, "--upto", "4"]);
    c.check(&[
        (1, "retired"),
        (2, "production"),
        (3, "retired"),
        (4, "test"),
    ]);
    assert_eq!(c.layers(4), 1);
}

/// Every crash point named in the store is covered by a test here.
#[test]
fn every_crash_point_is_covered() {
    let store = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/src/store.rs"),
    )
    .unwrap();
    let points: BTreeSet<&str> = store
        .split("crash_point(\"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .collect();
    let me = include_str!("version_crash.rs");
    for p in &points {
        assert!(
            me.contains(&format!("\"{p}\"")),
            "crash point {p} has no test"
        );
    }
    assert!(points.len() >= 9, "{points:?}");
}
