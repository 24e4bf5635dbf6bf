//! Replication between the servers of a farm on a real etcd: versions made on
//! one server reach the others by themselves, only their new data travels,
//! transfers resume and move between peers, the scrub repairs, the windows
//! hold, and strangers are refused.

use crate::common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::nbd::{read_exports, Nbd};
use common::{have, have_netns, have_python_nbd, wait_for, NetNs, TestAgent, TestEtcd, TestServer};

const MIB: u64 = 1 << 20;

fn tools() -> Option<TestEtcd> {
    if !have("curl") || !have_python_nbd() {
        return None;
    }
    TestEtcd::start()
}

/// `vstream replication status --json`, as seen from `s`.
fn status(s: &TestServer) -> Vec<serde_json::Value> {
    let out = s.cli(&["replication", "status", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn row(
    rows: &[serde_json::Value],
    server: &str,
    vdisk: &str,
    version: u64,
) -> Option<serde_json::Value> {
    rows.iter()
        .find(|r| r["server"] == server && r["vdisk"] == vdisk && r["version"] == version)
        .cloned()
}

/// Waits until `server` holds `vdisk@version` in `state`, as `s` reports it.
fn wait_state(s: &TestServer, server: &str, vdisk: &str, version: u64, state: &str, secs: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    let mut last = None;
    while std::time::Instant::now() < deadline {
        last = row(&status(s), server, vdisk, version);
        if last.as_ref().is_some_and(|r| r["state"] == state) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "gave up after {secs} s waiting for {vdisk}@{version} {state} on {server}; last: {last:?}\nlog of {}:\n{}",
        s.api,
        s.log_text()
    );
}

/// Imports a random image, every block of it data, as Standard-mode vDisk
/// `name` on `s`.
fn import(s: &TestServer, dir: &Path, name: &str, size: u64, seed: u64) -> Vec<u8> {
    let image = dir.join(format!("{name}.raw"));
    common::dense_image(&image, size, seed);
    s.cli_ok(&["vdisk", "import", name, image.to_str().unwrap()]);
    s.cli_ok(&[
        "vdisk",
        "set",
        name,
        "--mode",
        "standard",
        "--cache-type",
        "device",
    ]);
    std::fs::read(&image).expect("image")
}

fn mac(d: usize) -> String {
    format!("52:54:00:00:05:{d:02x}")
}

/// Makes version 2 of `vdisk` on `s` (server s1): maintenance device m1 (MAC number
/// `d`) fills each `(offset, len, byte)` of `fills` in `expected` and on
/// the disk, disconnects, and the version is promoted to production.
fn change_and_promote(
    s: &TestServer,
    vdisk: &str,
    d: usize,
    fills: &[(u64, u64, u8)],
    expected: &mut [u8],
) {
    s.cli_ok(&[
        "device",
        "add",
        "m1",
        "--mac",
        &mac(d),
        "--vdisk",
        vdisk,
        "--type",
        "maintenance",
    ]);
    s.cli_ok(&["version", "new", vdisk]);
    let mut m = Nbd::connect(&s.url("device/m1"));
    for &(at, len, byte) in fills {
        m.ok(&format!("fill {at} {len} {byte:#04x}"));
        expected[at as usize..(at + len) as usize].fill(byte);
    }
    m.ok("flush");
    m.quit();
    wait_for(20, "m1 to disconnect", || {
        let out = s.cli_ok(&["device", "list", "--json"]);
        (!out.contains("\"server\":\"s1\"") || !out.contains("m1")).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    s.cli_ok(&["version", "promote", vdisk, "2", "--to", "production"]);
}

#[test]
fn a_promoted_version_reaches_every_server_and_devices_boot_it() {
    let Some(etcd) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let servers: [TestServer; 3] = common::farm_of(dir.path(), &etcd, &[]);
    let mut expected = import(&servers[0], dir.path(), "demo", 32 * MIB, 11);
    for s in ["s1", "s2", "s3"] {
        wait_state(&servers[0], s, "demo", 1, "verified", 60);
    }
    let before: Vec<u64> = servers
        .iter()
        .map(|s| s.metric("vstream_replication_received_bytes_total"))
        .collect();
    // A maintenance device changes 1 MiB here and 64 KiB there on s1.
    let s1 = &servers[0];
    let fills = [(0, MIB, 0x5a), (20 * MIB, 65536, 0xa5)];
    change_and_promote(s1, "demo", 99, &fills, &mut expected);
    for s in ["s1", "s2", "s3"] {
        wait_state(s1, s, "demo", 2, "verified", 60);
    }
    // Only the new layer's data travelled (plus its metadata: bitmap, tree).
    let own = MIB + 65536;
    for (i, s) in servers.iter().enumerate().skip(1) {
        let got = s.metric("vstream_replication_received_bytes_total") - before[i];
        assert!(
            got >= own && got <= own + own / 50 + 64 * 1024,
            "server s{} received {got} bytes for a {own}-byte change",
            i + 1
        );
    }
    // Devices log in on every server and read version 2.
    let apis: Vec<&str> = servers.iter().map(|s| s.api.as_str()).collect();
    for d in 1..=3 {
        s1.cli_ok(&[
            "device",
            "add",
            &format!("pc{d}"),
            "--mac",
            &mac(d),
            "--vdisk",
            "demo",
        ]);
    }
    let agents: Vec<TestAgent> = (1..=3)
        .map(|d| TestAgent::start(dir.path(), &format!("pc{d}"), &mac(d), &apis, "ram:16MiB"))
        .collect();
    let mut on: Vec<String> = agents
        .iter()
        .map(|a| {
            let log = a.log_text();
            let line = log
                .lines()
                .find(|l| l.contains("logged in"))
                .unwrap_or_default()
                .to_string();
            assert!(line.contains("version=2"), "{log}");
            line.split(" server=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    on.sort();
    assert_eq!(on, ["s1", "s2", "s3"], "one device on each server");
    let urls: Vec<String> = agents
        .iter()
        .map(|a| format!("nbd+unix:///?socket={}", a.sock.display()))
        .collect();
    for (i, got) in read_exports(&urls).into_iter().enumerate() {
        let got = got.unwrap_or_else(|e| panic!("device {i}: {e}"));
        assert!(got == expected, "device pc{} read other bytes", i + 1);
    }
    // A merge makes a new base: it is copied once, and the layers it
    // replaces leave every store (the devices keep reading what they opened).
    let before = servers[1].metric("vstream_replication_received_bytes_total");
    s1.cli_ok(&["version", "merge", "demo"]);
    for s in &servers {
        wait_for(
            60,
            "the merged base in every store and the old layers gone",
            || {
                let files: Vec<String> = std::fs::read_dir(s.data.join("vdisks/demo"))
                    .ok()?
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|f| f.ends_with(".layer"))
                    .collect();
                (files.len() == 1 && files[0].starts_with("m2-")).then_some(())
            },
        );
    }
    let got = servers[1].metric("vstream_replication_received_bytes_total") - before;
    assert!(
        (32 * MIB..32 * MIB + MIB).contains(&got),
        "the merged base travelled once: {got} bytes"
    );
    for (i, got) in read_exports(&urls).into_iter().enumerate() {
        assert!(
            got.expect("read") == expected,
            "device pc{} after the merge",
            i + 1
        );
    }
}

#[test]
fn a_layer_two_versions_lack_travels_once() {
    let Some(etcd) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let s1 = common::farm_member(dir.path(), &etcd, 1, &[]);
    // Alone, s1 has no peer to seal its versions for: s2 comes later.
    let mut expected = import(&s1, dir.path(), "demo", 32 * MIB, 17);
    let base = expected.clone();
    change_and_promote(&s1, "demo", 98, &[(8 * MIB, 65536, 0x3c)], &mut expected);
    // A new server lacks both versions: their transfers start together, and
    // both need the base layer. It travels once, and both verify.
    let s2 = common::farm_member(dir.path(), &etcd, 2, &[]);
    wait_state(&s1, "s2", "demo", 1, "verified", 60);
    wait_state(&s1, "s2", "demo", 2, "verified", 60);
    let got = s2.metric("vstream_replication_received_bytes_total");
    let data = 32 * MIB + 65536;
    assert!(
        got >= data && got <= data + data / 50,
        "s2 received {got} bytes for {data} bytes of layers"
    );
    let log = s2.log_text();
    assert!(
        !log.contains("replication stopped"),
        "no transfer failed on the way:\n{log}"
    );
    let urls = [s2.url("demo@1"), s2.url("demo@2")];
    let read = read_exports(&urls);
    assert!(
        read[0].as_ref().expect("read v1") == &base,
        "s2's version 1"
    );
    assert!(
        read[1].as_ref().expect("read v2") == &expected,
        "s2's version 2"
    );
}

#[test]
fn a_receiver_killed_mid_transfer_resumes_where_it_stopped() {
    let Some(etcd) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let s1 = common::farm_member(dir.path(), &etcd, 1, &[]);
    let mut s2 = common::farm_member(dir.path(), &etcd, 2, &["--replication-rate", "6M"]);
    let size = 64 * MIB;
    import(&s1, dir.path(), "big", size, 5);
    wait_for(60, "s2 to be a third of the way", || {
        let r = row(&status(&s1), "s2", "big", 1)?;
        (r["state"] == "copying" && r["bytes_done"].as_u64()? > size / 3).then_some(())
    });
    s2.kill9();
    s2.restart();
    wait_state(&s1, "s2", "big", 1, "verified", 60);
    let after_restart = s2.metric("vstream_replication_received_bytes_total");
    assert!(
        after_restart < size * 3 / 4,
        "after the restart s2 fetched {after_restart} bytes of {size}: it started over"
    );
    assert!(
        s2.log_text().contains("resuming a partial copy"),
        "{}",
        s2.log_text()
    );
    let partials = std::fs::read_dir(s2.data.join("replication/big"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(partials, 0, "no partial file is left behind");
}

#[test]
fn a_transfer_goes_on_from_another_peer_when_its_sender_is_cut_off() {
    if !have_netns() || !have("curl") || !have_python_nbd() {
        return;
    }
    let ns = NetNs::create();
    let Some(etcd) = TestEtcd::start_on(&[&ns.outside]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let wrap = ns.wrap();
    let wrap: Vec<&str> = wrap.iter().map(String::as_str).collect();
    let farm = format!("etcd://{}:{}", ns.outside, etcd.port());
    // s1 lives behind a veth pair that the test can silence; s2 on loopback.
    let s1 = TestServer::start_wrapped(
        dir.path().join("s1"),
        &ns.inside,
        &wrap,
        &["--farm", &farm, "--name", "s1"],
    );
    let s2 = common::farm_member(dir.path(), &etcd, 2, &[]);
    let image = import(&s1, dir.path(), "v", 64 * MIB, 3);
    wait_state(&s2, "s2", "v", 1, "verified", 60);
    // s3 copies from both, slowly; s1 goes silent in the middle.
    let s3 = common::farm_member(dir.path(), &etcd, 3, &["--replication-rate", "8M"]);
    wait_for(60, "s3 to be copying", || {
        let r = row(&status(&s2), "s3", "v", 1)?;
        (r["state"] == "copying" && r["bytes_done"].as_u64()? > 8 * MIB).then_some(())
    });
    ns.silence();
    wait_state(&s3, "s3", "v", 1, "verified", 90);
    let log = s3.log_text();
    assert!(
        log.contains("a peer failed; the others go on") && log.contains("peer=s1"),
        "s3 never lost s1:\n{log}"
    );
    // And what it holds is the image, byte for byte.
    let layer_dir = s3.data.join("vdisks/v");
    assert!(layer_dir.join("vdisk.toml").exists());
    ns.restore();
    drop(s1);
    let mac = mac(42);
    s2.cli_ok(&["device", "add", "pc42", "--mac", &mac, "--vdisk", "v"]);
    let agent = TestAgent::start(dir.path(), "pc42", &mac, &[s3.api.as_str()], "ram:16MiB");
    let url = format!("nbd+unix:///?socket={}", agent.sock.display());
    let got = read_exports(&[url]).remove(0).expect("read");
    assert!(got == image, "the copy differs from the image");
}

#[test]
fn a_flipped_byte_is_found_by_the_scrub_and_repaired_from_a_peer() {
    let Some(etcd) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut s1 = common::farm_member(dir.path(), &etcd, 1, &[]);
    let s2 = common::farm_member(dir.path(), &etcd, 2, &["--scrub-interval", "2"]);
    import(&s1, dir.path(), "d", 16 * MIB, 9);
    wait_state(&s2, "s2", "d", 1, "verified", 60);
    s2.cli_ok(&["device", "add", "pc1", "--mac", &mac(1), "--vdisk", "d"]);
    // The only peer goes away; then a byte of s2's copy flips.
    s1.kill9();
    wait_for(30, "s2 to see s1 down", || {
        let out = s2.cli_ok(&["server", "list", "--json"]);
        let list: serde_json::Value = serde_json::from_str(&out).ok()?;
        let s1 = list.as_array()?.iter().find(|s| s["name"] == "s1")?.clone();
        (s1["up"] == false).then_some(())
    });
    let layer = std::fs::read_dir(s2.data.join("vdisks/d"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "layer"))
        .expect("a layer file");
    let len = std::fs::metadata(&layer).unwrap().len();
    let at = len - 16 * MIB + 5 * MIB + 123;
    let original = flip(&layer, at);
    wait_state(&s2, "s2", "d", 1, "corrupt", 30);
    // Not offered: a device cannot log in to that version anywhere.
    let login = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
        .args(["-H", "Content-Type: application/json"])
        .args(["-d", &format!("{{\"mac\":\"{}\"}}", mac(1))])
        .arg(format!("{}/api/v1/login", s2.api))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&login.stdout),
        "503",
        "login while corrupt"
    );
    assert!(s2.metric("vstream_scrub_corrupt_blocks_total") >= 1);
    // The peer returns: the block is fetched again and the copy is offered again.
    s1.restart();
    wait_state(&s2, "s2", "d", 1, "verified", 60);
    assert_eq!(read_byte(&layer, at), original, "the byte was repaired");
    assert!(s2.metric("vstream_scrub_repaired_blocks_total") >= 1);
}

fn flip(path: &Path, at: u64) -> u8 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[!b[0]], at).unwrap();
    f.sync_all().unwrap();
    b[0]
}

fn read_byte(path: &Path, at: u64) -> u8 {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    b[0]
}

#[test]
fn replication_waits_for_its_window_and_an_order_starts_it_at_once() {
    if !common::have_test_hooks() {
        return;
    }
    let Some(etcd) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    // 2026-11-25 12:00 UTC, a Wednesday; the window opens at 22:00.
    let noon = 1_795_608_000u64;
    let clock = dir.path().join("clock");
    std::fs::write(&clock, noon.to_string()).unwrap();
    let s1 = common::farm_member(dir.path(), &etcd, 1, &[]);
    let s2 = TestServer::start_in_farm_with(
        dir.path().join("s2"),
        &etcd.url,
        "s2",
        &["--replication-window", "22:00-06:00"],
        &[("VSTREAM_CLOCK_FILE", clock.to_str().unwrap())],
    );
    import(&s1, dir.path(), "a", 8 * MIB, 1);
    import(&s1, dir.path(), "b", 8 * MIB, 2);
    for v in ["a", "b"] {
        wait_state(&s1, "s2", v, 1, "queued", 30);
    }
    let r = row(&status(&s1), "s2", "a", 1).unwrap();
    assert!(
        r["note"]
            .as_str()
            .unwrap_or("")
            .contains("outside the replication windows"),
        "{r}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        row(&status(&s1), "s2", "a", 1).unwrap()["state"],
        "queued",
        "it waited"
    );
    // s2 lists the farm's vDisks it does not hold yet, and says so.
    let list = s2.cli_ok(&["vdisk", "list"]);
    assert!(list.contains("NOT HERE"), "{list}");
    // An order starts a at once, and only a.
    let said = s1.cli_ok(&["replication", "start", "a"]);
    assert!(said.contains("a@1"), "{said}");
    wait_state(&s1, "s2", "a", 1, "verified", 30);
    assert_eq!(row(&status(&s1), "s2", "b", 1).unwrap()["state"], "queued");
    // 23:00: inside the window, b goes too.
    std::fs::write(&clock, (noon + 11 * 3600).to_string()).unwrap();
    wait_state(&s1, "s2", "b", 1, "verified", 30);
    drop(s2);
}

#[test]
fn a_stranger_can_neither_pull_nor_push() {
    let Some(etcd) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let [s1, _s2] = common::farm_of(dir.path(), &etcd, &[]);
    import(&s1, dir.path(), "d", 4 * MIB, 4);
    wait_state(&s1, "s2", "d", 1, "verified", 60);
    let file = std::fs::read_dir(s1.data.join("vdisks/d"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|f| f.ends_with(".layer"))
        .unwrap();
    let url = format!(
        "{}/peer/v1/vdisks/d/layers/{file}/data?from=0&to=16",
        s1.api
    );
    let code = |args: &[&str]| {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(args)
            .arg(&url)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(code(&[]), "401", "no credentials");
    // A server of another farm has a secret of its own; the admin token is not one either.
    let stranger = TestServer::start();
    let theirs = format!("Authorization: Bearer {}", stranger.token());
    assert_eq!(code(&["-H", &theirs]), "403");
    let admin = format!("Authorization: Bearer {}", s1.token());
    assert_eq!(code(&["-H", &admin]), "403");
    // Nor can it push: the peer protocol has no way to send data to a server.
    assert_eq!(
        code(&["-X", "PUT", "-H", &theirs, "--data-binary", "x"]),
        "403"
    );
    assert!(
        s1.log_text().contains("wrong secret"),
        "the refusal is logged"
    );
}

/// Named stores: a vDisk imported into store `fast` lands in the store's
/// farm path on s1 and in s2's own path for it (`--store-path`), never in
/// either data folder; after a restart s2 finds it there again without
/// copying; a store that holds a vDisk cannot be removed.
#[test]
fn a_vdisk_in_a_named_store_replicates_into_each_servers_folder_for_it() {
    let Some(etcd) = tools() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let farm_path = dir.path().join("fast-farm");
    let s2_path = dir.path().join("fast-on-s2");
    let s1 = common::farm_member(dir.path(), &etcd, 1, &[]);
    let override_flag = format!("fast={}", s2_path.display());
    let mut s2 = common::farm_member(dir.path(), &etcd, 2, &["--store-path", &override_flag]);

    let e = s1.cli_err(&["store", "add", "default", "--path", "/srv/x"]);
    assert!(e.contains("data folder"), "{e}");
    s1.cli_ok(&[
        "store",
        "add",
        "fast",
        "--path",
        farm_path.to_str().unwrap(),
    ]);
    let img = dir.path().join("gold.raw");
    common::random_image(&img, 8 * MIB, 7);
    let img = img.to_str().unwrap();
    let e = s1.cli_err(&["vdisk", "import", "gold", img, "--store", "nosuch"]);
    assert!(e.contains("store nosuch does not exist"), "{e}");
    s1.cli_ok(&["vdisk", "import", "gold", img, "--store", "fast"]);
    s1.cli_ok(&[
        "vdisk",
        "set",
        "gold",
        "--mode",
        "standard",
        "--cache-type",
        "device",
    ]);
    wait_state(&s1, "s2", "gold", 1, "verified", 60);

    let holds = |root: &Path| root.join("vdisks/gold/vdisk.toml").is_file();
    assert!(holds(&farm_path), "s1 keeps it at the farm path");
    assert!(holds(&s2_path), "s2 keeps it at its own path");
    assert!(!holds(&s1.data) && !holds(&s2.data), "not in a data folder");
    let show = s1.cli_ok(&["vdisk", "show", "gold"]);
    assert!(show.contains("store:             fast"), "{show}");

    let list: serde_json::Value =
        serde_json::from_str(&s1.cli_ok(&["store", "list", "--json"])).unwrap();
    let fast = &list[0];
    assert_eq!(fast["name"], "fast");
    assert_eq!(fast["vdisks"], serde_json::json!(["gold"]));
    wait_for(10, "both servers reporting the store", || {
        let list: serde_json::Value =
            serde_json::from_str(&s1.cli_ok(&["store", "list", "--json"])).ok()?;
        let servers = list[0]["servers"].as_array()?.clone();
        let path_of = |name: &str| {
            servers
                .iter()
                .find(|h| h["server"] == name)
                .map(|h| h["path"].as_str().unwrap_or_default().to_owned())
        };
        (path_of("s1")? == farm_path.to_str()? && path_of("s2")? == s2_path.to_str()?).then_some(())
    });
    let e = s1.cli_err(&["store", "remove", "fast"]);
    assert!(e.contains("gold"), "{e}");

    // Each server remembers the stores it holds, for a restart while etcd is away.
    let held = std::fs::read_to_string(s2.data.join("stores.json")).unwrap();
    assert!(held.contains(s2_path.to_str().unwrap()), "{held}");

    // s2 finds it in its folder again after a restart: verified, not copied.
    s2.stop();
    s2.restart();
    wait_for(30, "s2 verifying gold again after its restart", || {
        s2.log_text()
            .lines()
            .any(|l| l.contains("replica verified") && l.contains("vdisk=gold"))
            .then_some(())
    });
    let log = s2.log_text();
    assert!(!log.contains("copying a layer vdisk=gold"), "{log}");
}

/// Boot files (a kernel, an initrd) set on one server are copied to the
/// others over the peer protocol, checked against their hashes, so that any
/// server can hand them to a booting device.
#[test]
fn boot_files_set_on_one_server_reach_the_others() {
    let Some(etcd) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let [s1, s2] = common::farm_of(dir.path(), &etcd, &[]);
    let mac = "52:54:00:77:00:09";
    s1.cli_ok(&["vdisk", "create", "root", "--size", "16MiB"]);
    s1.cli_ok(&["device", "add", "pc9", "--mac", mac, "--vdisk", "root"]);
    let kernel = dir.path().join("vmlinuz");
    let initrd = dir.path().join("initrd.img");
    common::random_image(&kernel, 3 * MIB, 91);
    common::random_image(&initrd, 2 * MIB, 92);
    s1.cli_ok(&[
        "vdisk",
        "set",
        "root",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
    ]);
    let fetched = dir.path().join("fetched");
    let get = |s: &TestServer, which: &str| -> Option<Vec<u8>> {
        let url = format!("{}/boot/{}/{which}", s.api, mac.replace(':', "-"));
        let out = Command::new("curl")
            .args(["-s", "-o"])
            .arg(&fetched)
            .args(["-w", "%{http_code}"])
            .arg(&url)
            .output()
            .unwrap();
        (out.stdout == b"200").then(|| std::fs::read(&fetched).unwrap())
    };
    for (which, file) in [("kernel", &kernel), ("initrd", &initrd)] {
        let want = std::fs::read(file).unwrap();
        assert_eq!(get(&s1, which).as_deref(), Some(&want[..]), "{which} on s1");
        let got = wait_for(60, &format!("the {which} on s2"), || get(&s2, which));
        assert!(
            got == want,
            "the {which} s2 serves differs from the one set"
        );
    }
    let log = s2.log_text();
    assert!(
        log.matches("boot file copied").count() >= 2,
        "s2 copied both from s1:\n{log}"
    );
}
