//! A version's boot set: the blocks a device read in its session's first
//! `--boot-window` seconds are saved beside the version's layers, and a
//! restarted server reads them back into the page cache before any device
//! asks; `--boot-window 0` does neither. A server that never saw a
//! version boot takes the set another server of the farm learned.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::nbd::Nbd;
use common::{have, have_python_nbd, wait_for, TestEtcd, TestServer};

const MIB: usize = 1 << 20;
const BLOCK: usize = 64 * 1024;

fn warm_lines(server: &TestServer) -> Vec<String> {
    server
        .log_text()
        .lines()
        .filter(|l| l.contains("boot set read into the page cache"))
        .map(str::to_owned)
        .collect()
}

/// The value of `key=` in a log line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

/// A server started with `flags` on a new folder (`data` in the returned
/// one), a 64 MiB Standard-mode vDisk `v` of random bytes from `seed`, and
/// its device d1 at `mac`.
fn server_with_v(flags: &[&str], seed: u64, mac: &str) -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start_with(dir.path().join("data"), flags);
    let image = dir.path().join("v.img");
    common::dense_image(&image, 64 * MIB as u64, seed);
    server.cli_ok(&["vdisk", "import", "v", image.to_str().expect("path")]);
    common::standard_v_and_d1(&server, mac);
    (dir, server)
}

#[test]
fn a_device_s_boot_reads_are_learned_and_read_back_at_a_restart() {
    if !have_python_nbd() {
        return;
    }
    let (dir, mut server) = server_with_v(&[], 7, "52:54:00:b0:07:01");
    let data = server.data.clone();
    assert!(warm_lines(&server).is_empty(), "nothing learned yet");

    // The boot: one block at 8 MiB, three from 40 MiB + 100.
    let scratch = dir.path().join("scratch");
    let mut nbd = Nbd::connect(&server.url("device/d1"));
    nbd.pread(8 * MIB, 4096, &scratch);
    nbd.pread(40 * MIB + 100, 2 * BLOCK, &scratch);
    nbd.quit();
    assert!(server.stop().success());
    let set = data.join("vdisks/v/boot-v1.set");
    assert!(set.exists(), "saved at stop:\n{}", server.log_text());

    server.restart();
    let line = wait_for(30, "the boot set read back at start", || {
        warm_lines(&server).pop()
    });
    assert_eq!(field(&line, "vdisk"), "v", "{line}");
    assert_eq!(field(&line, "version"), "1", "{line}");
    assert_eq!(field(&line, "set_of"), "1", "{line}");
    assert_eq!(field(&line, "bytes"), (4 * BLOCK).to_string(), "{line}");
    assert_eq!(
        server.metric("vstream_boot_set_read_ahead_versions_total"),
        1
    );
    assert_eq!(
        server.metric("vstream_boot_set_read_ahead_bytes_total"),
        4 * BLOCK as u64
    );
    let gauge = |name: &str| server.metric(&format!("{name}{{vdisk=\"v\",version=\"1\"}}"));
    assert_eq!(gauge("vstream_boot_set_bytes"), 4 * BLOCK as u64);
    assert!(gauge("vstream_boot_set_uncached_bytes") <= 4 * BLOCK as u64);

    assert!(server.stop().success());
    check_over_budget(&data);

    // A damaged set is said and learned again; nothing is read back.
    std::fs::write(&set, b"VSBOOTS1, then not a boot set").expect("damage");
    server.restart();
    wait_for(30, "the damaged set refused", || {
        server
            .log_text()
            .contains("a boot set cannot be used")
            .then_some(())
    });
    assert!(warm_lines(&server).is_empty(), "{}", server.log_text());
    assert!(server.stop().success());
    check_off(&data, &set);
}

/// With a budget smaller than the set (256 KiB), nothing is read back;
/// the log, /metrics and `version list` say why.
fn check_over_budget(data: &Path) {
    let mut server = TestServer::start_with(data.to_path_buf(), &["--boot-set-budget", "128K"]);
    let line = wait_for(30, "the set said over the budget", || {
        server
            .log_text()
            .lines()
            .find(|l| l.contains("larger than what is left of the boot-set budget"))
            .map(str::to_owned)
    });
    assert_eq!(field(&line, "bytes"), (4 * BLOCK).to_string(), "{line}");
    assert_eq!(field(&line, "budget"), "131072", "{line}");
    assert_eq!(server.metric("vstream_boot_set_budget_bytes"), 131072);
    let gauge = |name: &str| server.metric(&format!("{name}{{vdisk=\"v\",version=\"1\"}}"));
    assert_eq!(gauge("vstream_boot_set_over_budget"), 1);
    assert_eq!(gauge("vstream_boot_set_bytes"), 4 * BLOCK as u64);
    assert_eq!(server.metric("vstream_boot_set_read_ahead_bytes_total"), 0);
    assert!(warm_lines(&server).is_empty(), "{}", server.log_text());
    // This server's set of each version, in `version list`.
    let text = server.cli_ok(&["version", "list", "v"]);
    assert!(
        text.contains("BOOT SET") && text.contains("256 KiB, over budget: not read ahead"),
        "{text}"
    );
    let versions: Vec<serde_json::Value> =
        serde_json::from_str(&server.cli_ok(&["version", "list", "v", "--json"])).expect("JSON");
    assert_eq!(versions[0]["boot_set_bytes"], 4 * BLOCK as u64);
    assert_eq!(versions[0]["boot_set_over_budget"], true);
    assert!(server.stop().success());
}

/// With `--boot-window 0`, a session learns nothing and a start reads
/// nothing back.
fn check_off(data: &Path, set: &Path) {
    std::fs::remove_file(set).expect("remove the set");
    let mut server = TestServer::start_with(data.to_path_buf(), &["--boot-window", "0"]);
    let scratch = data.join("../scratch");
    let mut nbd = Nbd::connect(&server.url("device/d1"));
    nbd.pread(0, 4096, &scratch);
    nbd.quit();
    assert!(server.stop().success());
    assert!(!set.exists(), "learned with --boot-window 0");
    assert!(warm_lines(&server).is_empty());
}

/// The farm's case: devices booted version 1 on s1 only. s2, restarted,
/// asks s1 for its set over the peer protocol, reads it ahead and keeps it;
/// a caller without the farm's secret gets nothing.
#[test]
fn a_server_takes_the_boot_set_a_peer_learned() {
    if !have_python_nbd() || !have("curl") {
        return;
    }
    let Some(etcd) = TestEtcd::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let [s1, mut s2] = common::farm_of(dir.path(), &etcd, &[]);
    let image = dir.path().join("v.img");
    common::dense_image(&image, 64 * MIB as u64, 9);
    s1.cli_ok(&["vdisk", "import", "v", image.to_str().expect("path")]);
    common::standard_v_and_d1(&s1, "52:54:00:b0:07:02");
    common::wait_farm_ready(&s1, 2);
    common::wait_farm_ready(&s2, 2);
    let scratch = dir.path().join("scratch");
    let mut nbd = Nbd::connect(&s1.url("device/d1"));
    nbd.pread(MIB, 4096, &scratch);
    nbd.pread(30 * MIB, 3 * BLOCK, &scratch);
    nbd.quit();

    let peer_url = format!("{}/peer/v1/vdisks/v/boot-sets/1", s1.api);
    let code = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &peer_url])
        .output()
        .expect("curl");
    assert_eq!(code.stdout, b"401", "no secret, no set");

    assert!(s2.stop().success());
    s2.restart();
    let copied = wait_for(45, "s2 to copy s1's set", || {
        s2.log_text()
            .lines()
            .find(|l| l.contains("boot set copied from peers"))
            .map(str::to_owned)
    });
    assert_eq!(field(&copied, "peers"), "s1", "{copied}");
    assert_eq!(field(&copied, "bytes"), (4 * BLOCK).to_string(), "{copied}");
    let line = wait_for(30, "s2 to read it ahead", || warm_lines(&s2).pop());
    assert_eq!(field(&line, "version"), "1", "{line}");
    assert_eq!(field(&line, "bytes"), (4 * BLOCK).to_string(), "{line}");
    assert_eq!(
        s2.metric("vstream_boot_set_read_ahead_bytes_total"),
        4 * BLOCK as u64
    );
    // Every server shows it: s2 publishes it with the versions it holds.
    let row = wait_for(20, "s2's boot set in s1's replication status", || {
        let out = s1.cli(&["replication", "status", "--json"]);
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
        rows.into_iter()
            .find(|r| r["server"] == "s2" && r["vdisk"] == "v" && r["boot_set_bytes"].is_u64())
    });
    assert_eq!(row["boot_set_bytes"], 4 * BLOCK as u64, "{row}");
    let text = s1.cli_ok(&["replication", "status"]);
    assert!(
        text.contains("BOOT SET") && text.contains("cached"),
        "{text}"
    );
    if crate::console::have_browser() {
        let b = vstream_testkit::webdriver::Browser::start();
        crate::console::sign_in(&b, &s1.api, &s1.token());
        crate::console::open(&b, "#/replication");
        let cell = b.wait(20, "td[data-cell=\"v/1/s2\"] div[data-boot-set]");
        assert_eq!(
            b.attr(&cell, "data-boot-set").as_deref(),
            Some((4 * BLOCK).to_string().as_str())
        );
        assert!(b.text(&cell).starts_with("boot set "), "{}", b.text(&cell));
    }
    assert!(s2.stop().success());
    let kept = s2.data.join("vdisks/v/boot-v1.set");
    assert!(
        kept.exists(),
        "s2 keeps the set it took:\n{}",
        s2.log_text()
    );
    cleared_while_a_server_is_down(&s1, s2, &scratch);
}

/// An administrator clears version 1's set on s1 while s2 is down: s1
/// drops its own at once, s2 drops the one it kept once it is back (the
/// catalog carries the clear), neither takes the other's old set, and the
/// next boot learns it again.
fn cleared_while_a_server_is_down(s1: &TestServer, mut s2: TestServer, scratch: &Path) {
    let said = s1.cli_ok(&["version", "clear-boot-set", "v", "1"]);
    assert!(said.contains("cleared the boot set of version 1"), "{said}");
    let versions: Vec<serde_json::Value> =
        serde_json::from_str(&s1.cli_ok(&["version", "list", "v", "--json"])).expect("JSON");
    let stamp = versions[0]["boot_set_cleared_unix"]
        .as_u64()
        .expect("the version's clear");
    assert!(!s1.data.join("vdisks/v/boot-v1.set").exists());
    let audit = s1.cli_ok(&["audit", "list", "--json"]);
    assert!(
        audit.contains("/api/v1/vdisks/v/versions/1/boot-set"),
        "the clear is in the audit trail: {audit}"
    );
    s2.restart(); // a new log
    let kept = s2.data.join("vdisks/v/boot-v1.set");
    wait_for(
        60,
        "s2 to drop the set it kept from before the clear",
        || (!kept.exists()).then_some(()),
    );
    let log = s2.log_text();
    assert!(
        log.contains("is removed") || log.contains("boot set cleared"),
        "{log}"
    );
    assert!(
        !log.contains("boot set copied from peers"),
        "s2 took a set from before the clear: {log}"
    );
    // The next boot, on s1, is the whole of the new set, under the clear.
    let mut nbd = Nbd::connect(&s1.url("device/d1"));
    nbd.pread(20 * MIB, 4096, scratch);
    nbd.quit();
    let fresh = s1.data.join("vdisks/v/boot-v1.set");
    wait_for(45, "s1 to save the set learned after the clear", || {
        fresh.exists().then_some(())
    });
    assert_eq!(saved_stamp(&fresh), stamp);
    assert_eq!(saved_blocks(&fresh), [(20 * MIB / BLOCK) as u64]);
    assert!(s2.stop().success());
    if crate::console::have_browser() {
        // The console's button does the same.
        let b = vstream_testkit::webdriver::Browser::start();
        crate::console::sign_in(&b, &s1.api, &s1.token());
        crate::console::open(&b, "#/vdisk/v");
        b.click_on(
            20,
            "#versions tr[data-version=\"1\"] button[data-action=\"clear-boot-set\"]",
        );
        let says = b.text(&b.wait(5, "dialog[open] #confirm-body"));
        assert!(says.contains("Last cleared"), "{says}");
        b.click_on(5, "dialog[open] #confirm-ok");
        wait_for(20, "the console's clear", || {
            (!fresh.exists()).then_some(())
        });
        let versions: Vec<serde_json::Value> =
            serde_json::from_str(&s1.cli_ok(&["version", "list", "v", "--json"])).expect("JSON");
        assert!(versions[0]["boot_set_cleared_unix"].as_u64() > Some(stamp));
    }
}

/// The clear a saved set was learned after (its header's stamp).
fn saved_stamp(path: &Path) -> u64 {
    let bytes = std::fs::read(path).expect("the saved set");
    u64::from_le_bytes(bytes[24..32].try_into().expect("a stamp"))
}

/// The blocks a saved set holds: after its 32-byte header, pages of an
/// index and 512 words, then a 32-byte checksum (crates/image/src/bootset.rs).
fn saved_blocks(path: &Path) -> Vec<u64> {
    let bytes = std::fs::read(path).expect("the saved set");
    assert_eq!(&bytes[..8], b"VSBOOTS3");
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("a word"));
    bytes[32..bytes.len() - 32]
        .chunks(8 + 512 * 8)
        .enumerate()
        .flat_map(|(n, _)| {
            let at = 32 + n * (8 + 512 * 8);
            let page = word(at);
            (0..512u64).flat_map(move |w| {
                let bits = word(at + 8 + w as usize * 8);
                (0..64u64)
                    .filter(move |b| bits & (1 << b) != 0)
                    .map(move |b| page * 32768 + w * 64 + b)
            })
        })
        .collect()
}

/// A session that begins after its device's boot window (a failover or a
/// reconnect later in the day) adds nothing: the window runs from the boot
/// the farm recorded, not from the session. A device booting meanwhile
/// still does.
#[test]
fn a_session_after_its_boot_s_window_learns_nothing() {
    if !have_python_nbd() {
        return;
    }
    let (dir, mut server) = server_with_v(&["--boot-window", "2"], 11, "52:54:00:b0:07:03");
    let data = server.data.clone();
    server.cli_ok(&[
        "device",
        "add",
        "d2",
        "--mac",
        "52:54:00:b0:07:04",
        "--vdisk",
        "v",
    ]);
    let scratch = dir.path().join("scratch");

    let mut d1 = Nbd::connect(&server.url("device/d1;boot=d1-1"));
    d1.pread(8 * MIB, 4096, &scratch);
    d1.quit();
    wait_for(20, "d1's session to end", || {
        (server.metric("vstream_devices_connected") == 0).then_some(())
    });
    std::thread::sleep(std::time::Duration::from_secs(3));
    // The same boot, in a new session: past its window.
    let mut d1 = Nbd::connect(&server.url("device/d1;boot=d1-1"));
    d1.pread(40 * MIB, 4096, &scratch);
    // A new boot of another device.
    let mut d2 = Nbd::connect(&server.url("device/d2;boot=d2-1"));
    d2.pread(16 * MIB, 4096, &scratch);
    d1.quit();
    d2.quit();
    assert!(server.stop().success());
    let block = |at: usize| (at / BLOCK) as u64;
    assert_eq!(
        saved_blocks(&data.join("vdisks/v/boot-v1.set")),
        [block(8 * MIB), block(16 * MIB)],
        "d1's late read at 40 MiB is not its boot"
    );
}
