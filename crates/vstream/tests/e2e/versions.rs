//! vDisk versions end to end, through the real server, CLI and NBD clients:
//! a randomized model test of new/write/promote/rollback/merge/delete against
//! flat copies; devices keeping their version across a promote; refusals and
//! their reasons; and a QEMU guest booting a maintenance, then a production
//! version.

use crate::common;

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use common::nbd::{read_export, read_exports, text, Nbd};
use common::{have, have_python_nbd, TestServer, PYTHON};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// `version list --json`.
fn versions(server: &TestServer, vdisk: &str) -> Vec<Value> {
    match json(&server.cli_ok(&["version", "list", vdisk, "--json"])) {
        Value::Array(a) => a,
        other => panic!("version list --json is not an array: {other}"),
    }
}

fn version_of(list: &[Value], number: u32) -> &Value {
    list.iter()
        .find(|v| v["number"] == number)
        .unwrap_or_else(|| panic!("no version {number} in {list:?}"))
}

fn devices_of(v: &Value) -> Vec<String> {
    v["devices"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|d| d.as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn device_connected(server: &TestServer, name: &str) -> bool {
    json(&server.cli_ok(&["device", "show", name, "--json"]))["connected"] == Value::Bool(true)
}

/// Waits until the server has ended the device's session.
fn wait_disconnected(server: &TestServer, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while device_connected(server, name) {
        assert!(
            Instant::now() < deadline,
            "device {name} still connected 10 s after it hung up"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The CLI's answer: stdout on success, stderr on failure.
fn attempt(server: &TestServer, args: &[&str]) -> Result<String, String> {
    let out = server.cli(args);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn fingerprint(data: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut h);
    h.finish()
}

/// The content hash a flat import of `data` gets.
fn flat_hash(server: &TestServer, data: &[u8], name: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("flat.img");
    std::fs::write(&path, data).expect("writing the flat image");
    server.cli_ok(&["vdisk", "import", name, path.to_str().unwrap()]);
    let v = json(&server.cli_ok(&["vdisk", "show", name, "--json"]));
    let h = v["content_hash"]
        .as_str()
        .unwrap_or_else(|| panic!("no content_hash: {v}"))
        .to_string();
    server.cli_ok(&["vdisk", "delete", name]);
    h
}

/// Layer files and temporary files in the vDisk's folder.
fn vdisk_files(server: &TestServer, vdisk: &str) -> (BTreeSet<String>, Vec<String>) {
    let mut layers = BTreeSet::new();
    let mut other = Vec::new();
    for e in std::fs::read_dir(server.data.join("vdisks").join(vdisk)).expect("vDisk folder") {
        let name = e.expect("entry").file_name().to_string_lossy().into_owned();
        if name.ends_with(".layer") && !name.starts_with('.') {
            layers.insert(name);
        } else if name != "vdisk.toml" && name != "verified.json" {
            other.push(name);
        }
    }
    (layers, other)
}

// ---------------------------------------------------------------------------
// The model.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum St {
    Maintenance,
    Test,
    Production,
    Retired,
}

impl St {
    fn name(self) -> &'static str {
        match self {
            St::Maintenance => "maintenance",
            St::Test => "test",
            St::Production => "production",
            St::Retired => "retired",
        }
    }
}

#[derive(Clone, Debug)]
struct Ver {
    number: u32,
    state: St,
    /// Abstract layer ids, bottom first, as the server's chains should be.
    layers: Vec<u32>,
    sealed: bool,
    data: Vec<u8>,
}

impl Ver {
    fn live(&self) -> bool {
        self.state != St::Retired && !self.layers.is_empty()
    }
}

/// What the server should hold: every version's state, chain and bytes.
struct Model {
    versions: Vec<Ver>,
    next_layer: u32,
    /// The highest number ever given: numbers are never reused.
    last_number: u32,
}

impl Model {
    fn get(&self, n: u32) -> Option<&Ver> {
        self.versions.iter().find(|v| v.number == n)
    }
    fn get_mut(&mut self, n: u32) -> Option<&mut Ver> {
        self.versions.iter_mut().find(|v| v.number == n)
    }
    fn newest(&self, st: St) -> Option<u32> {
        self.versions
            .iter()
            .filter(|v| v.state == st && v.live())
            .map(|v| v.number)
            .max()
    }
    fn head(&self) -> Option<u32> {
        self.versions
            .iter()
            .filter(|v| v.live())
            .map(|v| v.number)
            .max()
    }
    fn live(&self) -> impl Iterator<Item = &Ver> {
        self.versions.iter().filter(|v| v.live())
    }
    fn numbers(&self) -> Vec<u32> {
        self.versions.iter().map(|v| v.number).collect()
    }

    /// `version new`: Ok(new number) or the refusal's reason.
    fn new_version(&mut self) -> Result<u32, &'static str> {
        if self.newest(St::Maintenance).is_some() {
            return Err("already has maintenance version");
        }
        let head = self.head().expect("a live version");
        let base = self.get_mut(head).unwrap();
        base.sealed = true;
        let base = base.clone();
        let number = self
            .versions
            .iter()
            .map(|v| v.number)
            .max()
            .unwrap_or(0)
            .max(self.last_number)
            + 1;
        self.last_number = number;
        let mut layers = base.layers.clone();
        layers.push(self.next_layer);
        self.next_layer += 1;
        self.versions.push(Ver {
            number,
            state: St::Maintenance,
            layers,
            sealed: false,
            data: base.data,
        });
        Ok(number)
    }

    fn promote(&mut self, n: u32, to: St, held: Option<u32>) -> Result<(), &'static str> {
        let Some(v) = self.get(n) else {
            return Err("has no version");
        };
        if v.state == St::Maintenance && held == Some(n) {
            return Err("before promoting");
        }
        if !v.live() {
            return Err("has no version");
        }
        let allowed = matches!(
            (v.state, to),
            (St::Maintenance, St::Test)
                | (St::Maintenance, St::Production)
                | (St::Test, St::Production)
        );
        if !allowed {
            return Err("cannot be promoted");
        }
        let v = self.get_mut(n).unwrap();
        v.sealed = true;
        v.state = to;
        Ok(())
    }

    fn rollback(&mut self) -> Result<u32, &'static str> {
        let newest = self.newest(St::Production);
        let previous = self
            .live()
            .filter(|v| v.state == St::Production && Some(v.number) != newest)
            .map(|v| v.number)
            .max();
        match (newest, previous) {
            (Some(n), Some(p)) => {
                self.get_mut(n).unwrap().state = St::Test;
                Ok(p)
            }
            _ => Err("no earlier production version"),
        }
    }

    fn merge(&mut self, upto: Option<u32>) -> Result<(), &'static str> {
        let upto = upto.unwrap_or_else(|| self.newest(St::Production).unwrap_or(0));
        let Some(target) = self.get(upto).filter(|v| v.live()).cloned() else {
            return Err("has no version");
        };
        if !target.sealed {
            return Err("not sealed");
        }
        if target.layers.len() == 1 {
            return Ok(());
        }
        let merged = self.next_layer;
        self.next_layer += 1;
        let keep: Vec<u32> = [St::Production, St::Test]
            .iter()
            .filter_map(|s| self.newest(*s))
            .collect();
        let old = target.layers;
        for v in self.versions.iter_mut() {
            if v.layers.starts_with(&old) {
                v.layers.splice(..old.len(), [merged]);
            } else if v.number < upto && v.live() && !keep.contains(&v.number) {
                v.state = St::Retired;
                v.layers.clear();
                v.data.clear();
            }
        }
        Ok(())
    }

    fn delete(&mut self, n: u32, in_use: bool) -> Result<(), &'static str> {
        if in_use {
            return Err("in use");
        }
        let Some(v) = self.get(n) else {
            return Err("has no version");
        };
        if let Some(own) = v.layers.last() {
            if self
                .versions
                .iter()
                .any(|o| o.number != n && o.layers.contains(own))
            {
                return Err("built on");
            }
        }
        if !self
            .versions
            .iter()
            .any(|o| o.number != n && o.live() && o.state == St::Production)
        {
            return Err("last production");
        }
        self.versions.retain(|v| v.number != n);
        Ok(())
    }
}

/// Checks a CLI answer against the model's: success, or refusal for `reason`.
fn expect(ctx: &str, what: &str, got: Result<String, String>, want: Result<(), &str>) {
    match (got, want) {
        (Ok(_), Ok(())) => {}
        (Err(e), Ok(())) => panic!("{ctx}\n{what} failed but the model says it succeeds:\n{e}"),
        (Ok(out), Err(reason)) => {
            panic!("{ctx}\n{what} succeeded but the model says it is refused ({reason}):\n{out}")
        }
        (Err(e), Err(reason)) => assert!(
            e.contains(reason),
            "{ctx}\n{what} was refused, but not for {reason:?}:\n{e}"
        ),
    }
}

/// Checks everything observable against the model: the version list, every
/// live version's bytes, the named and device exports, content hashes, and
/// the files in the vDisk folder.
fn verify(
    server: &TestServer,
    vdisk: &str,
    model: &Model,
    held: Option<u32>,
    hashes: &mut HashMap<u64, String>,
    by_hash: &mut HashMap<String, u64>,
    ctx: &str,
) {
    let list = versions(server, vdisk);
    let got: Vec<u32> = list
        .iter()
        .map(|v| v["number"].as_u64().unwrap() as u32)
        .collect();
    let mut want = model.numbers();
    let mut got_sorted = got.clone();
    got_sorted.sort();
    want.sort();
    assert_eq!(got_sorted, want, "{ctx}\nversion numbers: {list:?}");
    for v in &model.versions {
        let j = version_of(&list, v.number);
        assert_eq!(
            j["state"].as_str(),
            Some(v.state.name()),
            "{ctx}\nstate of version {}: {j}",
            v.number
        );
        assert_eq!(
            j["layers"].as_u64(),
            Some(v.layers.len() as u64),
            "{ctx}\nchain length of version {}: {j}",
            v.number
        );
        if v.state != St::Retired {
            assert_eq!(
                j["sealed_unix"].is_u64(),
                v.sealed,
                "{ctx}\nsealed or not, version {}: {j}",
                v.number
            );
        }
        let devices = devices_of(j);
        let want_devices: Vec<String> = if held == Some(v.number) {
            vec!["m1".into()]
        } else {
            vec![]
        };
        assert_eq!(
            devices, want_devices,
            "{ctx}\ndevices on version {}",
            v.number
        );
        if v.live() {
            let h = j["content_hash"].as_str();
            if v.sealed {
                assert!(h.is_some(), "{ctx}\nsealed version without a hash: {j}");
            }
            if v.state == St::Maintenance {
                assert!(h.is_none(), "{ctx}\nmaintenance version with a hash: {j}");
            }
            if let Some(h) = h {
                let fp = fingerprint(&v.data);
                let seen = hashes.entry(fp).or_insert_with(|| h.to_string());
                assert_eq!(
                    seen, h,
                    "{ctx}\nversion {} has the same content as an earlier version but another content hash",
                    v.number
                );
                let seen = by_hash.entry(h.to_string()).or_insert(fp);
                assert_eq!(
                    *seen, fp,
                    "{ctx}\nversion {} has the content hash of different content",
                    v.number
                );
            }
        }
    }

    // Bytes: every live version by number; retired ones are not exported;
    // NAME is the newest production; device types pick theirs.
    let live: Vec<&Ver> = model.live().collect();
    let mut urls: Vec<String> = live
        .iter()
        .map(|v| server.url(&format!("{vdisk}@{}", v.number)))
        .collect();
    urls.push(server.url(vdisk));
    urls.push(server.url("device/p1"));
    urls.push(server.url("device/t1"));
    let retired: Vec<u32> = model
        .versions
        .iter()
        .filter(|v| !v.live())
        .map(|v| v.number)
        .collect();
    for r in &retired {
        urls.push(server.url(&format!("{vdisk}@{r}")));
    }
    let got = read_exports(&urls);
    for (v, g) in live.iter().zip(&got) {
        let g = g
            .as_ref()
            .unwrap_or_else(|e| panic!("{ctx}\nreading {vdisk}@{}: {e}", v.number));
        common::assert_same_bytes(g, &v.data, &format!("{ctx}\n{vdisk}@{}", v.number));
    }
    let prod = model.get(model.newest(St::Production).unwrap()).unwrap();
    let test = model
        .newest(St::Test)
        .map(|n| model.get(n).unwrap())
        .unwrap_or(prod);
    let n = live.len();
    for (i, (what, want)) in [
        (vdisk.to_string(), prod),
        ("device/p1".to_string(), prod),
        ("device/t1".to_string(), test),
    ]
    .iter()
    .enumerate()
    {
        let g = got[n + i]
            .as_ref()
            .unwrap_or_else(|e| panic!("{ctx}\nreading {what}: {e}"));
        common::assert_same_bytes(
            g,
            &want.data,
            &format!("{ctx}\n{what} (should be version {})", want.number),
        );
    }
    for (r, g) in retired.iter().zip(&got[n + 3..]) {
        assert!(
            g.is_err(),
            "{ctx}\nretired version {vdisk}@{r} is still exported"
        );
    }

    // Files: one per layer some version uses, nothing temporary left.
    let referenced: BTreeSet<u32> = model
        .versions
        .iter()
        .flat_map(|v| v.layers.iter().copied())
        .collect();
    let (files, other) = vdisk_files(server, vdisk);
    assert_eq!(
        files.len(),
        referenced.len(),
        "{ctx}\nlayer files {files:?} for {} layers in use",
        referenced.len()
    );
    assert!(other.is_empty(), "{ctx}\nleftover files: {other:?}");
    // The device reads ended their sessions; wait until the server knows.
    wait_disconnected(server, "p1");
    wait_disconnected(server, "t1");
}

fn model_run(seed: u64, steps: usize) {
    let size = 4 * MIB;
    let server = TestServer::start();
    let scratch_dir = tempfile::tempdir().expect("tempdir");
    let scratch = scratch_dir.path().join("buf");
    let img = scratch_dir.path().join("v1.img");
    common::random_image(&img, size as u64, seed);
    let v1 = std::fs::read(&img).unwrap();
    let vd = "mv";
    server.cli_ok(&["vdisk", "import", vd, img.to_str().unwrap()]);
    server.cli_ok(&["vdisk", "set", vd, "--mode", "standard"]);
    for (dev, mac, kind) in [
        ("m1", "52:54:00:10:00:01", "maintenance"),
        ("p1", "52:54:00:10:00:02", "production"),
        ("t1", "52:54:00:10:00:03", "test"),
    ] {
        server.cli_ok(&[
            "device", "add", dev, "--mac", mac, "--vdisk", vd, "--type", kind,
        ]);
    }
    let mut model = Model {
        versions: vec![Ver {
            number: 1,
            state: St::Production,
            layers: vec![0],
            sealed: false,
            data: v1,
        }],
        next_layer: 1,
        last_number: 1,
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut held: Option<(Nbd, u32)> = None;
    let mut history: Vec<String> = Vec::new();
    let mut hashes = HashMap::new();
    let mut by_hash = HashMap::new();
    let m1 = server.url("device/m1");

    let ctx0 = format!("seed {seed}");
    verify(&server, vd, &model, None, &mut hashes, &mut by_hash, &ctx0);
    for step in 0..steps {
        // Now and then the maintenance device hangs up.
        if held.is_some() && rng.gen_bool(0.25) {
            let (n, _) = held.take().unwrap();
            n.quit();
            wait_disconnected(&server, "m1");
            history.push(format!("{step}: m1 disconnected"));
        }
        let held_on = held.as_ref().map(|(_, v)| *v);
        let pick: u32 = rng.gen_range(0..100);
        let numbers = model.numbers();
        let any_number = |rng: &mut StdRng| -> u32 {
            if rng.gen_bool(0.05) {
                numbers.iter().max().unwrap() + 3
            } else {
                numbers[rng.gen_range(0..numbers.len())]
            }
        };
        let desc: String;
        if pick < 14 {
            desc = "version new".into();
            let want = model.new_version();
            let got = attempt(&server, &["version", "new", vd]);
            history.push(format!("{step}: {desc} -> {want:?}"));
            let ctx = format!("{ctx0}\n{}", history.join("\n"));
            expect(&ctx, &desc, got, want.map(|_| ()));
        } else if pick < 40 {
            let maint = model.newest(St::Maintenance);
            let Some(mv) = maint else {
                // No maintenance version: a maintenance device is refused.
                desc = "m1 connects without a maintenance version".into();
                history.push(format!("{step}: {desc}"));
                let ctx = format!("{ctx0}\n{}", history.join("\n"));
                match Nbd::try_connect(&m1) {
                    Ok(_) => panic!("{ctx}\nm1 connected without a maintenance version"),
                    Err(e) => assert!(e.starts_with("connect-error"), "{ctx}\n{e}"),
                }
                let ctx = format!("{ctx0}\n{}", history.join("\n"));
                verify(&server, vd, &model, None, &mut hashes, &mut by_hash, &ctx);
                continue;
            };
            let mut conn = match held.take() {
                Some((c, v)) => {
                    assert_eq!(v, mv, "held session on another version");
                    c
                }
                None => Nbd::connect(&m1),
            };
            let writes = rng.gen_range(1..=4);
            let mut ops = Vec::new();
            for _ in 0..writes {
                let len = if rng.gen_bool(0.3) {
                    rng.gen_range(1..600)
                } else {
                    rng.gen_range(1..200 * KIB)
                };
                let off = rng.gen_range(0..size - len);
                let data = &mut model.get_mut(mv).unwrap().data;
                if conn.can_zero && rng.gen_bool(0.2) {
                    let hole = if rng.gen_bool(0.5) { "hole" } else { "nohole" };
                    conn.ok(&format!("zero {off} {len} {hole}"));
                    data[off..off + len].fill(0);
                    ops.push(format!("zero {off}+{len} {hole}"));
                } else {
                    let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                    conn.pwrite(&bytes, off, &scratch);
                    data[off..off + len].copy_from_slice(&bytes);
                    ops.push(format!("write {off}+{len}"));
                }
            }
            conn.ok("flush");
            let keep = rng.gen_bool(0.4);
            desc = format!(
                "m1 on version {mv}: {}{}",
                ops.join(", "),
                if keep { " (stays connected)" } else { "" }
            );
            if keep {
                held = Some((conn, mv));
            } else {
                conn.quit();
                wait_disconnected(&server, "m1");
            }
            history.push(format!("{step}: {desc}"));
        } else if pick < 60 {
            let candidates: Vec<u32> = model
                .live()
                .filter(|v| matches!(v.state, St::Maintenance | St::Test))
                .map(|v| v.number)
                .collect();
            let n = if !candidates.is_empty() && rng.gen_bool(0.75) {
                candidates[rng.gen_range(0..candidates.len())]
            } else {
                any_number(&mut rng)
            };
            let to = if rng.gen_bool(0.4) {
                St::Test
            } else {
                St::Production
            };
            desc = format!("version promote {n} --to {}", to.name());
            let want = model.promote(n, to, held_on);
            let got = attempt(
                &server,
                &["version", "promote", vd, &n.to_string(), "--to", to.name()],
            );
            history.push(format!("{step}: {desc} -> {want:?}"));
            let ctx = format!("{ctx0}\n{}", history.join("\n"));
            expect(&ctx, &desc, got, want);
        } else if pick < 70 {
            desc = "version rollback".into();
            let want = model.rollback();
            let got = attempt(&server, &["version", "rollback", vd]);
            history.push(format!("{step}: {desc} -> {want:?}"));
            let ctx = format!("{ctx0}\n{}", history.join("\n"));
            if let (Ok(out), Ok(p)) = (&got, &want) {
                assert!(
                    out.contains(&format!("version {p} ")),
                    "{ctx}\nrollback should name version {p}: {out}"
                );
            }
            expect(&ctx, &desc, got, want.map(|_| ()));
        } else if pick < 84 {
            let upto = if rng.gen_bool(0.3) {
                None
            } else {
                Some(any_number(&mut rng))
            };
            let mut args = vec!["version".to_string(), "merge".into(), vd.into()];
            if let Some(u) = upto {
                args.extend(["--upto".into(), u.to_string()]);
            }
            desc = args.join(" ");
            let want = model.merge(upto);
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            let got = attempt(&server, &argv);
            history.push(format!("{step}: {desc} -> {want:?}"));
            let ctx = format!("{ctx0}\n{}", history.join("\n"));
            expect(&ctx, &desc, got, want);
        } else if pick < 97 {
            let n = any_number(&mut rng);
            desc = format!("version delete {n}");
            let want = model.delete(n, held_on == Some(n));
            let got = attempt(&server, &["version", "delete", vd, &n.to_string()]);
            history.push(format!("{step}: {desc} -> {want:?}"));
            let ctx = format!("{ctx0}\n{}", history.join("\n"));
            expect(&ctx, &desc, got, want);
        } else {
            desc = "check only".into();
            history.push(format!("{step}: {desc}"));
        }
        let ctx = format!("{ctx0}\n{}", history.join("\n"));
        verify(
            &server,
            vd,
            &model,
            held.as_ref().map(|(_, v)| *v),
            &mut hashes,
            &mut by_hash,
            &ctx,
        );
    }
    if let Some((n, _)) = held.take() {
        n.quit();
        wait_disconnected(&server, "m1");
    }

    // The recorded hashes are those of the flat content, whatever the layering.
    let ctx = format!("{ctx0}\n{}", history.join("\n"));
    let list = versions(&server, vd);
    let mut checked = BTreeSet::new();
    for v in model.live().filter(|v| v.sealed) {
        let h = version_of(&list, v.number)["content_hash"]
            .as_str()
            .unwrap()
            .to_string();
        if checked.insert(h.clone()) {
            let flat = flat_hash(&server, &v.data, &format!("flat{}", v.number));
            assert_eq!(
                h, flat,
                "{ctx}\nversion {}'s content hash is not the flat import's",
                v.number
            );
        }
    }
    eprintln!("seed {seed}: {steps} steps\n{}", history.join("\n"));
}

/// Random version operations and maintenance writes, checked after every
/// step against flat copies of every version. `VSTREAM_MODEL_SEED` picks
/// another seed; `VSTREAM_MODEL_STEPS` another length.
#[test]
fn versions_follow_a_flat_model() {
    if !have_python_nbd() {
        return;
    }
    let steps = std::env::var("VSTREAM_MODEL_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    match std::env::var("VSTREAM_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(seed) => model_run(seed, steps),
        None => {
            for seed in [1, 2, 3] {
                model_run(seed, steps);
            }
        }
    }
}

// ---------------------------------------------------------------------------

/// A 4 MiB image: `a` in the first MiB, zeros elsewhere.
/// Imports vDisk `name` on `server` from a 4 MiB image in `dir` whose first
/// MiB is all `a`, the rest zeros.
fn import_patterned(server: &TestServer, dir: &Path, name: &str, a: u8) {
    let path = dir.join(format!("img-{a:02x}.img"));
    let mut data = vec![0u8; 4 * MIB];
    data[..MIB].fill(a);
    std::fs::write(&path, data).unwrap();
    server.cli_ok(&["vdisk", "import", name, path.to_str().unwrap()]);
}

fn qemu_io(url: &str, cmds: &[&str]) -> Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", "-r"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(url).output().expect("running qemu-io")
}

/// qemu-io that must succeed with every pattern check.
fn qemu_io_ok(url: &str, cmds: &[&str]) {
    let out = qemu_io(url, cmds);
    let all = text(&out);
    let lower = all.to_lowercase();
    assert!(
        out.status.success() && !lower.contains("failed") && !lower.contains("error"),
        "qemu-io {cmds:?} {url}: {all}"
    );
}

/// A device streaming version 1 keeps it while version 2 is promoted to
/// production; its next session gets version 2 (and not its old write cache).
#[test]
fn a_connected_device_keeps_its_version_across_a_promote() {
    if !have_python_nbd() || !have("qemu-io") {
        return;
    }
    let server = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().join("buf");
    import_patterned(&server, dir.path(), "k", 0xAA);
    server.cli_ok(&["vdisk", "set", "k", "--mode", "standard"]);
    server.cli_ok(&[
        "device",
        "add",
        "m1",
        "--mac",
        "52:54:00:20:00:01",
        "--vdisk",
        "k",
        "--type",
        "maintenance",
    ]);
    server.cli_ok(&[
        "device",
        "add",
        "p1",
        "--mac",
        "52:54:00:20:00:02",
        "--vdisk",
        "k",
    ]);
    server.cli_ok(&["version", "new", "k"]);
    let mut m = Nbd::connect(&server.url("device/m1"));
    m.ok(&format!("fill 0 {MIB} 0xBB"));
    m.ok("flush");
    m.quit();
    wait_disconnected(&server, "m1");

    // p1 starts on version 1 and writes a little into its write cache.
    let mut p = Nbd::connect(&server.url("device/p1;boot=p1-boot-1"));
    assert_eq!(p.cmd(&format!("check 0 {MIB} 0xAA")), "ok");
    p.ok(&format!("fill {} 4096 0xCC", 2 * MIB));
    p.ok("flush");
    let list = versions(&server, "k");
    assert_eq!(devices_of(version_of(&list, 1)), ["p1"]);

    server.cli_ok(&["version", "promote", "k", "2", "--to", "production"]);
    // The open session still reads version 1 and its own write.
    assert_eq!(p.cmd(&format!("check 0 {MIB} 0xAA")), "ok");
    assert_eq!(p.cmd(&format!("check {} 4096 0xCC", 2 * MIB)), "ok");
    let bytes = p.pread(0, 64 * KIB, &scratch);
    assert!(bytes.iter().all(|&b| b == 0xAA));
    let list = versions(&server, "k");
    assert_eq!(
        devices_of(version_of(&list, 1)),
        ["p1"],
        "version list: {list:?}"
    );
    assert!(devices_of(version_of(&list, 2)).is_empty());
    // A second connection of the same device joins its session: version 1.
    qemu_io_ok(
        &server.url("device/p1"),
        &["read -P 0xAA 0 64k", "read -P 0xCC 2M 4k"],
    );
    // The named exports: production is version 2 now.
    qemu_io_ok(&server.url("k"), &["read -P 0xBB 0 64k", "read -P 0 2M 4k"]);
    qemu_io_ok(&server.url("k@1"), &["read -P 0xAA 0 1M"]);
    qemu_io_ok(&server.url("k@2"), &["read -P 0xBB 0 1M"]);

    // A reconnect within the boot after its session ended (no
    // NBD_CMD_DISC): the running OS goes on with version 1 and its cache.
    p.crash();
    wait_disconnected(&server, "p1");
    let mut p = Nbd::connect(&server.url("device/p1;boot=p1-boot-1"));
    assert_eq!(p.cmd(&format!("check 0 {MIB} 0xAA")), "ok");
    assert_eq!(
        p.cmd(&format!("check {} 4096 0xCC", 2 * MIB)),
        "ok",
        "a reconnect within the boot lost its cache"
    );
    assert_eq!(devices_of(version_of(&versions(&server, "k"), 1)), ["p1"]);
    // Power loss, and the next boot: version 2, and the cache over version 1
    // is neither kept nor laid over it.
    p.crash();
    wait_disconnected(&server, "p1");
    let mut p = Nbd::connect(&server.url("device/p1;boot=p1-boot-2"));
    assert_eq!(p.cmd(&format!("check 0 {MIB} 0xBB")), "ok");
    assert_eq!(
        p.cmd(&format!("check {} 4096 0", 2 * MIB)),
        "ok",
        "a write cache made over version 1 shows through version 2"
    );
    let list = versions(&server, "k");
    assert_eq!(devices_of(version_of(&list, 2)), ["p1"]);
    assert!(devices_of(version_of(&list, 1)).is_empty());
    p.quit();
    wait_disconnected(&server, "p1");
    qemu_io_ok(
        &server.url("device/p1"),
        &["read -P 0xBB 0 64k", "read -P 0 2M 4k"],
    );
}

/// Refusals, each with its reason.
#[test]
fn refusals_say_why() {
    if !have_python_nbd() {
        return;
    }
    let server = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    import_patterned(&server, dir.path(), "r", 0x11);
    server.cli_ok(&["vdisk", "set", "r", "--mode", "standard"]);
    for (dev, mac, kind) in [
        ("m1", "52:54:00:30:00:01", "maintenance"),
        ("m2", "52:54:00:30:00:02", "maintenance"),
        ("p1", "52:54:00:30:00:03", "production"),
    ] {
        server.cli_ok(&[
            "device", "add", dev, "--mac", mac, "--vdisk", "r", "--type", kind,
        ]);
    }

    // A maintenance device without a maintenance version.
    let e = Nbd::try_connect(&server.url("device/m1"))
        .err()
        .expect("m1 connected without a maintenance version");
    assert!(e.starts_with("connect-error"), "{e}");
    let log = server.log_text();
    assert!(
        log.contains("vDisk r has no maintenance version"),
        "the log does not say why m1 was refused:\n{log}"
    );

    // Rollback with one production version.
    let e = server.cli_err(&["version", "rollback", "r"]);
    assert!(e.contains("no earlier production version"), "{e}");

    // A second maintenance version.
    server.cli_ok(&["version", "new", "r"]);
    let e = server.cli_err(&["version", "new", "r"]);
    assert!(e.contains("already has maintenance version 2"), "{e}");

    // Two maintenance devices at once.
    let mut m1 = Nbd::connect(&server.url("device/m1"));
    m1.ok("fill 0 4096 0x22");
    let e = Nbd::try_connect(&server.url("device/m2"))
        .err()
        .expect("a second maintenance device connected");
    assert!(e.starts_with("connect-error"), "{e}");
    let log = server.log_text();
    assert!(
        log.contains("maintenance device m1 has the maintenance version of vDisk r open"),
        "the log does not say why m2 was refused:\n{log}"
    );

    // Promote and delete while the maintenance device is connected.
    let e = server.cli_err(&["version", "promote", "r", "2", "--to", "test"]);
    assert!(e.contains("m1") && e.contains("before promoting"), "{e}");
    let e = server.cli_err(&["version", "delete", "r", "2"]);
    assert!(e.contains("in use") && e.contains("m1"), "{e}");
    m1.quit();
    wait_disconnected(&server, "m1");
    server.cli_ok(&["version", "promote", "r", "2", "--to", "test"]);
    let e = server.cli_err(&["version", "promote", "r", "2", "--to", "test"]);
    assert!(e.contains("cannot be promoted"), "{e}");

    // A version another is built on.
    let e = server.cli_err(&["version", "delete", "r", "1"]);
    assert!(
        e.contains("version 2") && e.contains("built on version 1"),
        "{e}"
    );

    // A version in use by a production device.
    let p1 = Nbd::connect(&server.url("device/p1"));
    let e = server.cli_err(&["version", "delete", "r", "1"]);
    assert!(e.contains("in use") && e.contains("p1"), "{e}");
    p1.quit();
    wait_disconnected(&server, "p1");

    // Merging an unsealed version; a version that does not exist.
    server.cli_ok(&["version", "new", "r"]);
    let e = server.cli_err(&["version", "merge", "r", "--upto", "3"]);
    assert!(e.contains("not sealed"), "{e}");
    let e = server.cli_err(&["version", "merge", "r", "--upto", "9"]);
    assert!(e.contains("has no version 9"), "{e}");
    server.cli_ok(&["version", "delete", "r", "3"]);

    // After merging up to 2, version 1 stands alone: it is the last
    // production version, and that is the reason now.
    server.cli_ok(&["version", "merge", "r", "--upto", "2"]);
    let e = server.cli_err(&["version", "delete", "r", "1"]);
    assert!(e.contains("last production version"), "{e}");
    let list = versions(&server, "r");
    assert_eq!(version_of(&list, 1)["state"], "production");
    assert_eq!(version_of(&list, 2)["layers"], 1);
    let mut v1 = vec![0u8; 4 * MIB];
    v1[..MIB].fill(0x11);
    let mut v2 = v1.clone();
    v2[..4096].fill(0x22);
    expect_export(&server, "r@1", &v1);
    expect_export(&server, "r@2", &v2);
}

fn expect_export(server: &TestServer, export: &str, want: &[u8]) {
    let data = read_export(&server.url(export)).unwrap_or_else(|e| panic!("{export}: {e}"));
    common::assert_same_bytes(&data, want, export);
}

/// A device's Standard-mode write cache names the version it lies over
/// (`vdisk@N`). A deleted version's number must not come back for other
/// content under a kept cache: the device would see its old cached writes
/// laid over the new version's content.
#[test]
fn a_kept_write_cache_is_not_laid_over_a_new_version_with_a_reused_number() {
    if !have_python_nbd() {
        return;
    }
    let server = TestServer::start();
    server.cli_ok(&["vdisk", "create", "n", "--size", "4MiB"]);
    server.cli_ok(&["vdisk", "set", "n", "--mode", "standard"]);
    for (dev, mac, kind) in [
        ("m1", "52:54:00:40:00:01", "maintenance"),
        ("t1", "52:54:00:40:00:02", "test"),
    ] {
        server.cli_ok(&[
            "device", "add", dev, "--mac", mac, "--vdisk", "n", "--type", kind,
        ]);
    }
    let maintain = |byte: u8| {
        let mut m = Nbd::connect(&server.url("device/m1"));
        m.ok(&format!("fill 0 65536 {byte}"));
        m.quit();
        wait_disconnected(&server, "m1");
    };
    server.cli_ok(&["version", "new", "n"]);
    maintain(0x11);
    server.cli_ok(&["version", "promote", "n", "2", "--to", "test"]);

    // t1 boots the test version, writes into its cache, loses power.
    let mut t = Nbd::connect(&server.url("device/t1"));
    assert_eq!(t.cmd("check 0 65536 0x11"), "ok");
    t.ok(&format!("fill {MIB} 4096 0x77"));
    t.ok("flush");
    t.crash();
    wait_disconnected(&server, "t1");

    // The test version goes; another one takes its place.
    server.cli_ok(&["version", "delete", "n", "2"]);
    let out = server.cli_ok(&["version", "new", "n"]);
    let list = versions(&server, "n");
    let newest = list
        .iter()
        .map(|v| v["number"].as_u64().unwrap())
        .max()
        .unwrap();
    maintain(0x22);
    server.cli_ok(&[
        "version",
        "promote",
        "n",
        &newest.to_string(),
        "--to",
        "test",
    ]);

    let mut t = Nbd::connect(&server.url("device/t1"));
    assert_eq!(t.cmd("check 0 65536 0x22"), "ok");
    let seen = t.cmd(&format!("check {MIB} 4096 0"));
    t.quit();
    assert_eq!(
        seen,
        "ok",
        "device t1 sees the write cache it made over the deleted version 2 laid over \
         the new test version {newest} ({}): its number was reused",
        out.trim()
    );
}

// ---------------------------------------------------------------------------

fn token(console: &str) -> Option<&str> {
    console
        .lines()
        .find_map(|l| l.strip_prefix("GUEST-TOKEN "))
        .map(str::trim)
}

/// A maintenance device boots the maintenance version read/write; after the
/// promote, production devices boot what it wrote.
#[test]
fn guest_boots_maintenance_then_production_version() {
    if !common::have_guest_tools() {
        return;
    }
    let kit = common::guest_kit();
    let server = TestServer::start();
    server.cli_ok(&[
        "vdisk",
        "import",
        "root",
        kit.join("rootfs.img").to_str().unwrap(),
    ]);
    server.cli_ok(&["vdisk", "set", "root", "--mode", "standard"]);
    server.cli_ok(&[
        "device",
        "add",
        "maint",
        "--mac",
        "52:54:00:50:00:01",
        "--vdisk",
        "root",
        "--type",
        "maintenance",
    ]);
    server.cli_ok(&[
        "device",
        "add",
        "prod",
        "--mac",
        "52:54:00:50:00:02",
        "--vdisk",
        "root",
    ]);
    let before = token(&common::guest_boot(
        &kit,
        &server.url("device/prod"),
        "read",
    ))
    .unwrap_or("NONE")
    .to_string();
    assert_ne!(before, "v2-token");

    server.cli_ok(&["version", "new", "root"]);
    let c = common::guest_boot(&kit, &server.url("device/maint"), "write:v2-token");
    assert!(c.contains("GUEST-OK write v2-token"), "{c}");
    // Not yet promoted: production still boots version 1.
    let c = common::guest_boot(&kit, &server.unix_url("device/prod"), "read");
    assert_eq!(token(&c), Some(before.as_str()), "{c}");

    server.cli_ok(&["version", "promote", "root", "2", "--to", "production"]);
    let c = common::guest_boot(&kit, &server.url("device/prod"), "read");
    assert_eq!(token(&c), Some("v2-token"), "{c}");
    assert!(c.contains("GUEST-BIGFILE OK"), "{c}");
    // Version 1 is still there, unchanged: a rollback brings it back.
    server.cli_ok(&["version", "rollback", "root"]);
    let c = common::guest_boot(&kit, &server.url("device/prod"), "read");
    assert_eq!(token(&c), Some(before.as_str()), "{c}");
    let list = versions(&server, "root");
    assert_eq!(version_of(&list, 1)["state"], "production");
    assert_eq!(version_of(&list, 2)["state"], "test");
}

// ---------------------------------------------------------------------------

/// Promotes a version while a maintenance device keeps trying to connect
/// (from DELAY seconds after the promote started):
/// prints `promote RC MESSAGE`, `connected 0|1`, then (if connected) tries a
/// write after the promote returned: `write ok` or `write refused WHY`.
const PROMOTE_RACE: &str = r#"
import subprocess, sys, threading, time
import nbd
bin, vdisk, version, url, delay = sys.argv[1:6]
out = {}
def promote():
    p = subprocess.run([bin, "version", "promote", vdisk, version, "--to", "test"],
                       capture_output=True, text=True)
    out["rc"] = p.returncode
    out["msg"] = (p.stdout + p.stderr).strip().replace("\n", " ")
t = threading.Thread(target=promote)
t.start()
time.sleep(float(delay))
h = None
# Attempts made while the promote still ran: 0 means the window was missed.
tries = 0
while t.is_alive():
    tries += 1
    x = nbd.NBD()
    try:
        x.connect_uri(url)
        h = x
        break
    except nbd.Error:
        pass
t.join()
print("promote", out["rc"], out["msg"], flush=True)
print("tries", tries, flush=True)
if h is None:
    print("connected 0", flush=True)
    sys.exit(0)
print("connected 1", flush=True)
try:
    h.pwrite(b"\x5a" * 4096, 0)
    h.flush()
    print("write ok", flush=True)
except nbd.Error as e:
    print("write refused", e.string, flush=True)
h.shutdown()
"#;

/// `FILL URL MIB`: writes MIB MiB of random-looking data from offset 0.
const FILL: &str = r#"
import os, sys
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
buf = os.urandom(1 << 20)
for i in range(int(sys.argv[2])):
    h.pwrite(buf[i % 7:] + buf[:i % 7], i << 20)
h.flush()
h.shutdown()
"#;

/// "Promote while the maintenance device is connected" is refused; so must
/// be the other order: a maintenance device that connects while a promote
/// is sealing its version must not end up writing the sealed version. The
/// seal of a few hundred MiB takes long enough for the device to get in.
#[test]
fn a_maintenance_device_cannot_write_a_version_promoted_under_it() {
    if !have_python_nbd() {
        return;
    }
    let server = TestServer::start();
    server.cli_ok(&["vdisk", "create", "race", "--size", "512MiB"]);
    server.cli_ok(&["vdisk", "set", "race", "--mode", "standard"]);
    server.cli_ok(&[
        "device",
        "add",
        "m1",
        "--mac",
        "52:54:00:80:00:01",
        "--vdisk",
        "race",
        "--type",
        "maintenance",
    ]);
    let m1 = server.url("device/m1");
    // Rounds whose device tried to connect while the promote ran: the race
    // this test is about happened in them.
    let mut raced = 0;
    // Each round starts the device's attempts a little later into the promote.
    for (round, delay) in ["0.01", "0.03", "0.05", "0.08", "0.12"].iter().enumerate() {
        server.cli_ok(&["version", "new", "race"]);
        let number = versions(&server, "race")
            .iter()
            .map(|v| v["number"].as_u64().unwrap())
            .max()
            .unwrap();
        let out = Command::new(PYTHON)
            .args(["-c", FILL, &m1, "256"])
            .output()
            .expect("running the filler");
        assert!(out.status.success(), "filling: {}", text(&out));
        wait_disconnected(&server, "m1");
        let out = Command::new(PYTHON)
            .args([
                "-c",
                PROMOTE_RACE,
                common::BIN,
                "race",
                &number.to_string(),
                &m1,
                delay,
            ])
            .env("VSTREAM_API", &server.api)
            .env("VSTREAM_TOKEN", server.token())
            .output()
            .expect("running the race");
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "race: {}", text(&out));
        wait_disconnected(&server, "m1");
        eprintln!("round {round}: {said}");
        let promoted = said.lines().any(|l| l.starts_with("promote 0 "));
        let connected = said.lines().any(|l| l == "connected 1");
        let wrote = said.lines().any(|l| l == "write ok");
        if said
            .lines()
            .any(|l| l.starts_with("tries ") && l != "tries 0")
        {
            raced += 1;
        }
        let list = versions(&server, "race");
        assert!(
            !(promoted && connected && wrote),
            "round {round}: maintenance device m1 connected to version {number} while it was \
             being promoted, the promote succeeded, and m1's write then went into the sealed \
             test version:\n{said}\nversions: {list:?}"
        );
        if !promoted {
            // m1 got in first: the promote was refused; do it now.
            server.cli_ok(&[
                "version",
                "promote",
                "race",
                &number.to_string(),
                "--to",
                "test",
            ]);
        }
    }
    // The test proves something only if the device met the promote.
    assert!(
        raced >= 3,
        "only {raced} of 5 rounds tried to connect while the promote ran: the window was missed"
    );
}

/// Version 1 is written in Private mode after its import, then sealed by
/// `version new`: its content hash is that of what was written, and Private
/// devices are refused from then on, with the reason.
#[test]
fn private_writes_are_in_the_hash_of_the_sealed_version() {
    if !have_python_nbd() {
        return;
    }
    let server = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    import_patterned(&server, dir.path(), "pv", 0x31);
    server.cli_ok(&[
        "device",
        "add",
        "p1",
        "--mac",
        "52:54:00:90:00:01",
        "--vdisk",
        "pv",
    ]);
    let mut want = vec![0u8; 4 * MIB];
    want[..MIB].fill(0x31);
    let mut p = Nbd::connect(&server.url("device/p1"));
    // Unaligned, across the end of the imported data, and a zeroed range.
    p.ok(&format!("fill {} 70000 0x32", MIB - 1000));
    want[MIB - 1000..MIB - 1000 + 70000].fill(0x32);
    p.ok(&format!("fill {} 333 0x33", 3 * MIB + 7));
    want[3 * MIB + 7..3 * MIB + 340].fill(0x33);
    if p.can_zero {
        p.ok("zero 4096 65536 hole");
        want[4096..4096 + 65536].fill(0);
    }
    p.ok("flush");
    p.quit();
    wait_disconnected(&server, "p1");

    server.cli_ok(&["version", "new", "pv"]);
    let list = versions(&server, "pv");
    let v1 = version_of(&list, 1);
    assert!(v1["sealed_unix"].is_u64(), "{v1}");
    let flat = flat_hash(&server, &want, "pvflat");
    assert_eq!(v1["content_hash"].as_str(), Some(flat.as_str()), "{v1}");
    expect_export(&server, "pv@1", &want);
    expect_export(&server, "pv@2", &want);

    let e = Nbd::try_connect(&server.url("device/p1"))
        .err()
        .expect("a Private-mode device connected to a sealed version");
    assert!(e.starts_with("connect-error"), "{e}");
    let log = server.log_text();
    assert!(
        log.contains("is sealed and cannot be written in Private mode"),
        "the log does not say why p1 was refused:\n{log}"
    );
}
