//! A boot is a boundary (issue 16, point 2).
//!
//! A device that loses power says nothing: no NBD_CMD_DISC, often not even a
//! FIN. Its next boot must still start clean (Standard mode), free its
//! Private vDisk and take the current version, wherever in the farm its old
//! session lives; while a reconnect within one boot keeps its cache. The
//! server learns of a boot from the boot script request, the agent's login
//! (its boot identity) or an NBD client's export name (`;boot=TOKEN`).
//! docs/farm.md, "What ends a session", says which client does what.

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::nbd::Nbd;
use common::{have_netns, have_python_nbd, wait_for, NetNs, TestAgent, TestEtcd, TestServer};

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn device(server: &TestServer, name: &str) -> serde_json::Value {
    json(&server.cli_ok(&["device", "show", name, "--json"]))
}

fn add_device(server: &TestServer, name: &str, mac: &str, vdisk: &str) {
    server.cli_ok(&["device", "add", name, "--mac", mac, "--vdisk", vdisk]);
}

fn wait_disconnected(server: &TestServer, name: &str) {
    wait_for(20, &format!("{name} to disconnect"), || {
        (device(server, name)["connected"] == false).then_some(())
    });
}

/// `GET /boot/ipxe?mac=MAC` (what iPXE asks as the machine starts); returns
/// the script.
fn boot_script(server: &TestServer, mac: &str) -> String {
    let out = Command::new("curl")
        .args(["-sf", "-m", "10"])
        .arg(format!("{}/boot/ipxe?mac={mac}", server.api))
        .output()
        .expect("curl");
    assert!(out.status.success(), "boot script for {mac}: {out:?}");
    String::from_utf8(out.stdout).expect("utf-8 script")
}

/// Gives vDisk `vdisk` boot files, so that devices on it get a boot script.
fn make_bootable(server: &TestServer, dir: &Path, vdisk: &str) {
    let kernel = dir.join("vmlinuz");
    common::random_image(&kernel, 1 << 20, 5);
    server.cli_ok(&["vdisk", "set", vdisk, "--kernel", kernel.to_str().unwrap()]);
}

/// Established TCP connections on the server's NBD port.
fn established(server: &TestServer) -> usize {
    let out = Command::new("ss")
        .args(["-tnH", "state", "established"])
        .arg(format!("( sport = :{} )", server.nbd_port))
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// Waits until the server publishes `n` sessions (`server list`, which
/// shows its status of up to a second ago).
fn wait_sessions(server: &TestServer, n: usize) {
    let mut last = serde_json::Value::Null;
    let seen = (0..100).any(|_| {
        let list = json(&server.cli_ok(&["server", "list", "--json"]));
        let count = list[0]["sessions"].as_array().map_or(0, |s| s.len());
        last = list;
        count == n || {
            std::thread::sleep(Duration::from_millis(100));
            false
        }
    });
    assert!(seen, "not {n} sessions: {last}");
}

/// A device loses power without a word (its namespace drops every packet,
/// so not even the FIN of its exit leaves), and boots again from another
/// machine's address at once, long before the keepalive would notice: the
/// new boot ends the old session. A Standard-mode device finds its vDisk
/// clean; a Private-mode one gets its vDisk (with its writes) at once.
#[test]
fn a_new_boot_ends_the_session_of_a_device_that_vanished() {
    if !have_netns() || !have_python_nbd() || !common::have("ss") {
        return;
    }
    let ns = NetNs::create();
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start_wrapped(dir.path().join("s"), &ns.outside, &[], &[]);
    server.cli_ok(&["vdisk", "create", "s", "--size", "16MiB"]);
    server.cli_ok(&["vdisk", "set", "s", "--mode", "standard"]);
    server.cli_ok(&["vdisk", "create", "p", "--size", "16MiB"]);
    server.cli_ok(&["vdisk", "set", "p", "--mode", "private"]);
    add_device(&server, "ds", "52:54:00:00:17:01", "s");
    add_device(&server, "dp", "52:54:00:00:17:02", "p");
    add_device(&server, "other", "52:54:00:00:17:03", "s");

    let mut ds = Nbd::connect_in(&ns.wrap(), &server.url("device/ds;boot=ds-1"));
    ds.ok("fill 0 65536 0x5a");
    ds.ok("flush");
    let mut dp = Nbd::connect_in(&ns.wrap(), &server.url("device/dp;boot=dp-1"));
    dp.ok("fill 0 65536 0x6b");
    dp.ok("flush");
    let mut other = Nbd::connect(&server.url("device/other;boot=o-1"));
    other.ok("fill 0 4096 0x77");
    assert_eq!(established(&server), 3);

    ns.silence();
    ds.crash();
    dp.crash();
    // The server heard nothing: both sessions look alive.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(device(&server, "ds")["connected"], true);
    assert_eq!(device(&server, "dp")["connected"], true);

    // Both boot again (from this host: their old address is dead).
    let t = Instant::now();
    let mut ds = Nbd::connect(&server.url("device/ds;boot=ds-2"));
    ds.ok("check 0 65536 0");
    let mut dp = Nbd::connect(&server.url("device/dp;boot=dp-2"));
    dp.ok("check 0 65536 0x6b");
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "the new boots waited {took:?} (for the keepalive?)"
    );
    // One session each, one live connection each.
    wait_sessions(&server, 3);
    wait_for(10, "the old connections to close", || {
        (established(&server) == 3).then_some(())
    });
    other.ok("check 0 4096 0x77");
    let log = server.log_text();
    assert!(
        log.contains("device booted again: ending its session of an earlier boot"),
        "{log}"
    );
    for mut c in [ds, dp, other] {
        c.ok("flush");
        c.quit();
    }
}

/// 50 boots of one device, each leaving its connection behind without a
/// word, leave one session and one connection on the server. Half boot
/// through the boot script with a plain client that names no boot (the
/// kernel's nbd-client, QEMU), half name their boot in the export.
#[test]
fn fifty_boots_leave_one_session_and_one_connection() {
    if !have_python_nbd() || !common::have("ss") || !common::have("curl") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start_in(dir.path().join("s"));
    server.cli_ok(&["vdisk", "create", "v", "--size", "16MiB"]);
    server.cli_ok(&["vdisk", "set", "v", "--mode", "standard"]);
    make_bootable(&server, dir.path(), "v");
    let mac = "52:54:00:00:17:50";
    add_device(&server, "pc", mac, "v");
    let mut left_behind = Vec::new();
    for boot in 1..=50u32 {
        let export = match boot % 2 {
            0 => format!("device/pc;boot=pc-{boot}"),
            _ => {
                let script = boot_script(&server, mac);
                assert!(script.contains(" vstream.boot="), "{script}");
                "device/pc".to_owned()
            }
        };
        let mut c = Nbd::connect(&server.url(&export));
        // Every boot starts clean: the last one's write is gone.
        let answer = c.cmd("check 0 4096 0");
        assert_eq!(answer, "ok", "boot {boot} saw the last boot's write");
        c.ok(&format!("fill 0 4096 {}", boot % 255 + 1));
        c.ok("flush");
        // A reconnect within the boot keeps what it wrote.
        let mut again = Nbd::connect(&server.url(&export));
        again.ok(&format!("check 0 4096 {}", boot % 255 + 1));
        left_behind.push(c);
        left_behind.push(again);
    }
    wait_sessions(&server, 1);
    wait_for(10, "one connection on the server", || {
        (established(&server) == 2).then_some(())
    });
    let info = device(&server, "pc");
    assert_eq!(info["connected"], true, "{info}");
    let cache = info["cache_bytes"].as_u64().unwrap_or(u64::MAX);
    assert!(cache <= 65536, "the cache holds {cache} bytes: {info}");
    drop(left_behind);
}

/// A device whose session lives on one server boots again through another
/// (its boot script, or its agent's login, reaches the other first): the
/// first server ends the old session and discards its cache.
#[test]
fn a_boot_seen_by_another_server_ends_the_session_here() {
    if !have_python_nbd() || !common::have("curl") {
        return;
    }
    let Some(etcd) = TestEtcd::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let [s1, s2] = common::farm_of(dir.path(), &etcd, &[]);
    s1.cli_ok(&["vdisk", "create", "v", "--size", "16MiB"]);
    s1.cli_ok(&["vdisk", "set", "v", "--mode", "standard"]);
    make_bootable(&s1, dir.path(), "v");
    common::wait_farm_ready(&s1, 2);
    let mac = "52:54:00:00:17:60";
    add_device(&s1, "pc", mac, "v");
    let mut c = Nbd::connect(&s1.url("device/pc;boot=first"));
    c.ok("fill 0 65536 0x42");
    c.ok("flush");
    assert!(device(&s1, "pc")["cache_bytes"].as_u64() >= Some(65536));

    // It boots again: s2 answers its boot script.
    let t = Instant::now();
    let script = boot_script(&s2, mac);
    assert!(script.contains("vstream.boot="), "{script}");
    wait_for(15, "s1 to end the session of the earlier boot", || {
        (device(&s1, "pc")["connected"] == false).then_some(())
    });
    eprintln!("s1 ended the session {:?} after the boot", t.elapsed());
    assert!(
        s1.log_text()
            .contains("the device booted again; write cache discarded"),
        "{}",
        s1.log_text()
    );
    let cache = s1.data.join("cache").join("pc.layer");
    assert!(!cache.exists(), "{} is still there", cache.display());
    // Its old connection is closed.
    assert_ne!(c.cmd("check 0 65536 0x42"), "ok");
    // s2 sees the ended session go before pc connects again: what s2 then
    // sees of pc on s1 is the new session, not the ended one's stale
    // status (which once let the remove below through while s2's view
    // passed by the moment pc was connected nowhere).
    wait_for(10, "s2 to see pc's ended session go", || {
        (device(&s2, "pc")["connected"] == false).then_some(())
    });
    let mut c = Nbd::connect(&s1.url("device/pc"));
    c.ok("check 0 65536 0");
    // It cannot be removed through s2 while connected to s1 (once s2 has
    // read s1's status).
    wait_for(10, "s2 to see pc on s1", || {
        (device(&s2, "pc")["server"] == "s1").then_some(())
    });
    let err = s2.cli_err(&["device", "remove", "pc"]);
    assert!(err.contains("connected to server s1"), "{err}");
    c.quit();

    // Caches left on s1 by sessions that ended (no NBD_CMD_DISC) go once
    // nothing can use them: pc2 boots again through s2, pc3 is removed
    // through s2. pc4's is kept: it may reconnect within its boot.
    let mut cached = Vec::new();
    for (name, mac) in [
        ("pc2", "52:54:00:00:17:62"),
        ("pc3", "52:54:00:00:17:63"),
        ("pc4", "52:54:00:00:17:64"),
    ] {
        add_device(&s1, name, mac, "v");
        let mut c = Nbd::connect(&s1.url(&format!("device/{name};boot={name}-1")));
        c.ok("fill 0 65536 0x24");
        c.ok("flush");
        c.crash();
        wait_disconnected(&s1, name);
        let file = s1.data.join("cache").join(format!("{name}.layer"));
        assert!(file.exists(), "{}", file.display());
        cached.push(file);
    }
    boot_script(&s2, "52:54:00:00:17:62");
    s2.cli_ok(&["device", "remove", "pc3"]);
    wait_for(30, "s1 to discard the caches of pc2 and pc3", || {
        (!cached[0].exists() && !cached[1].exists()).then_some(())
    });
    let log = s1.log_text();
    assert!(log.contains("the device has booted since"), "{log}");
    assert!(log.contains("the device no longer exists"), "{log}");
    assert!(cached[2].exists(), "pc4's cache went");
    let mut c = Nbd::connect(&s1.url("device/pc4;boot=pc4-1"));
    c.ok("check 0 65536 0x24");
    c.quit();
}

/// The agent names its boot at login (`--boot-id`; by default the boot
/// script's token from the kernel command line, else the kernel's boot id):
/// an agent killed and started again in the same boot keeps the server's
/// write cache; started in a new boot, it does not.
#[test]
fn the_agent_keeps_its_cache_within_a_boot_and_not_across_boots() {
    if !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start_in(dir.path().join("s"));
    server.cli_ok(&["vdisk", "create", "v", "--size", "16MiB"]);
    server.cli_ok(&[
        "vdisk",
        "set",
        "v",
        "--mode",
        "standard",
        "--cache-type",
        "server",
    ]);
    let mac = "52:54:00:00:17:70";
    add_device(&server, "pc", mac, "v");
    let agent_from = |program: &str, boot: &str| {
        let mut flags = vec![program, "--deadline-ms", "4000", "--boot-id", boot];
        flags.retain(|f| !f.is_empty());
        TestAgent::start_with(
            dir.path(),
            &format!("agent-{boot}"),
            mac,
            &[&server.api],
            "ram:64MiB",
            &flags,
        )
    };
    let agent = |boot: &str| agent_from("", boot);
    let url = |a: &TestAgent| format!("nbd+unix:///?socket={}", a.sock.display());
    let a = agent("boot-a");
    let mut c = Nbd::connect(&url(&a));
    c.ok("fill 0 65536 0x31");
    c.ok("flush");
    c.crash();
    drop(a); // SIGKILL: no NBD_CMD_DISC to the server
    wait_disconnected(&server, "pc");

    // Started again as `vstream-agent`, the agent alone: the same agent.
    let a = agent_from("--agent-binary", "boot-a");
    let mut c = Nbd::connect(&url(&a));
    assert_eq!(
        c.cmd("check 0 65536 0x31"),
        "ok",
        "the agent's restart within the boot lost the cache"
    );
    c.crash();
    drop(a);
    wait_disconnected(&server, "pc");

    let a = agent("boot-b");
    let mut c = Nbd::connect(&url(&a));
    assert_eq!(
        c.cmd("check 0 65536 0"),
        "ok",
        "the agent's new boot found the last boot's writes"
    );
    c.quit();
    drop(a);
}

/// QEMU sends NBD_CMD_DISC when it stops, but not when it is killed, and
/// reconnects on its own within one run. Given a boot identity in its
/// export name (new at each start of the VM), a killed QEMU's next start is
/// a new boot; with the same one, the cache is kept.
#[test]
fn qemu_names_its_boot_in_the_export() {
    if !common::have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start_in(dir.path().join("s"));
    server.cli_ok(&["vdisk", "create", "v", "--size", "16MiB"]);
    server.cli_ok(&["vdisk", "set", "v", "--mode", "standard"]);
    add_device(&server, "vm", "52:54:00:00:17:80", "v");
    // qemu-io reads its commands from stdin; killed after the last answer.
    let run = |boot: &str, cmds: &[&str]| -> String {
        let opts = format!(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=device/vm;boot={boot}",
            server.nbd_port
        );
        let mut child = Command::new("qemu-io")
            .args(["--image-opts", &opts])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-io");
        {
            use std::io::Write;
            let stdin = child.stdin.as_mut().expect("stdin");
            for c in cmds {
                writeln!(stdin, "{c}").expect("qemu-io stdin");
            }
            stdin.flush().expect("flush");
        }
        // Each command answers before the next is read: wait for the
        // server to see the writes, then kill (no NBD_CMD_DISC).
        wait_for(20, "qemu-io's session", || {
            (device(&server, "vm")["connected"] == true).then_some(())
        });
        std::thread::sleep(Duration::from_secs(1));
        let _ = child.kill();
        let out = child.wait_with_output().expect("qemu-io output");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let out = run("vm-1", &["write -P 0x21 0 64k", "flush"]);
    assert!(out.contains("wrote 65536/65536"), "{out}");
    wait_disconnected(&server, "vm");
    let out = run("vm-1", &["read -P 0x21 0 64k"]);
    assert!(
        out.contains("read 65536/65536") && !out.contains("Pattern verification failed"),
        "the same boot lost its cache: {out}"
    );
    wait_disconnected(&server, "vm");
    let out = run("vm-2", &["read -P 0 0 64k"]);
    assert!(
        out.contains("read 65536/65536") && !out.contains("Pattern verification failed"),
        "a new boot found the last boot's writes: {out}"
    );
}
