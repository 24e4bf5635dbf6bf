//! Dead peers are found, live idle ones kept (issue 16, points 1 and 3).
//!
//! A device that loses power sends no FIN. Without TCP keepalive and a user
//! timeout its connection stayed ESTABLISHED on the server for ever: its
//! session never ended, a Private vDisk stayed locked to it, and `device
//! reset` was refused. Here a device in a network namespace goes silent
//! (nftables drops all its packets), and the server must let it go within
//! the keepalive time while its other devices notice nothing; `device reset
//! --force` disconnects a live device; and an agent idle for a minute under
//! short keepalive settings keeps its session, its probes answered.

use crate::common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::nbd::Nbd;
use common::{have_netns, have_python_nbd, wait_for, NetNs, TestAgent, TestServer};

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn device(server: &TestServer, name: &str) -> serde_json::Value {
    json(&server.cli_ok(&["device", "show", name, "--json"]))
}

fn add_device(server: &TestServer, name: &str, mac: &str, vdisk: &str) {
    server.cli_ok(&["device", "add", name, "--mac", mac, "--vdisk", vdisk]);
}

/// TCP connections to or from `port` on this host, as `ss -tnoH` shows them
/// (with their timers).
fn sockets(filter: &str) -> String {
    let out = Command::new("ss")
        .args(["-tnoH", "state", "established", filter])
        .output()
        .expect("running ss");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_silent_device_is_let_go_within_the_keepalive_time() {
    if !have_netns() || !have_python_nbd() || !common::have("ss") {
        return;
    }
    let ns = NetNs::create();
    let dir = tempfile::tempdir().expect("tempdir");
    // Default keepalive settings: the test holds the server to them.
    let server = TestServer::start_wrapped(dir.path().join("s"), &ns.outside, &[], &[]);
    server.cli_ok(&["vdisk", "create", "p", "--size", "16MiB"]);
    server.cli_ok(&["vdisk", "set", "p", "--mode", "private"]);
    server.cli_ok(&["vdisk", "create", "s", "--size", "16MiB"]);
    server.cli_ok(&["vdisk", "set", "s", "--mode", "standard"]);
    add_device(&server, "d1", "52:54:00:00:16:01", "p");
    add_device(&server, "d2", "52:54:00:00:16:02", "p");
    add_device(&server, "d3", "52:54:00:00:16:03", "s");
    add_device(&server, "d4", "52:54:00:00:16:04", "s");

    // d1 (Private) and d3 (Standard) run in the namespace; d4 on this host.
    let mut d1 = Nbd::connect_in(&ns.wrap(), &server.url("device/d1"));
    d1.ok("fill 0 4096 0x11");
    let mut d3 = Nbd::connect_in(&ns.wrap(), &server.url("device/d3"));
    d3.ok("fill 0 4096 0x33");
    let mut d4 = Nbd::connect(&server.url("device/d4"));
    d4.ok("fill 0 4096 0x44");
    let d4_since = device(&server, "d4")["connected_since"].clone();
    assert!(d4_since.is_u64(), "{}", device(&server, "d4"));
    // While d1 lives, d2 is refused its Private vDisk.
    let err = Nbd::try_connect(&server.url("device/d2"))
        .err()
        .expect("d2 connected while d1 holds the Private vDisk");
    assert!(err.starts_with("connect-error"), "{err}");
    assert_eq!(device(&server, "d1")["connected"], true);
    // Reset is refused for a connected device, and says how to force it.
    let err = server.cli_err(&["device", "reset", "d3"]);
    assert!(
        err.contains("connected") && err.contains("--force"),
        "{err}"
    );

    // The namespace's devices lose power: not a packet more, no FIN.
    ns.silence();
    let silenced = Instant::now();
    let mut gone = [false, false];
    while gone != [true, true] {
        assert!(
            silenced.elapsed() < Duration::from_secs(45),
            "after {:?} the server still holds the silent devices: d1 {} d3 {}\n{}",
            silenced.elapsed(),
            device(&server, "d1"),
            device(&server, "d3"),
            sockets(&format!("( sport = :{} )", server.nbd_port)),
        );
        for (i, name) in ["d1", "d3"].into_iter().enumerate() {
            if !gone[i] && device(&server, name)["connected"] == false {
                gone[i] = true;
                eprintln!("{name} disconnected {:?} after silence", silenced.elapsed());
            }
        }
        // The device on this host notices nothing meanwhile.
        d4.ok("check 0 4096 0x44");
        std::thread::sleep(Duration::from_millis(500));
    }
    let took = silenced.elapsed();
    // The defaults: probes after 10 s idle, every 5 s, cut at 30 s without
    // an answer (a little slack for a busy machine).
    assert!(took <= Duration::from_secs(40), "took {took:?}");
    let info = device(&server, "d4");
    assert_eq!(info["connected"], true, "{info}");
    assert_eq!(
        info["connected_since"], d4_since,
        "d4's session restarted: {info}"
    );

    // The Private vDisk is free for another device, with d1's writes.
    let mut d2 = Nbd::connect(&server.url("device/d2"));
    d2.ok("check 0 4096 0x11");
    d2.quit();
    // Reset works on a device that is off: d3's kept cache goes.
    assert!(device(&server, "d3")["cache_bytes"].as_u64() > Some(0));
    server.cli_ok(&["device", "reset", "d3"]);
    assert_eq!(device(&server, "d3")["cache_bytes"], 0);
    let mut d3_again = Nbd::connect(&server.url("device/d3"));
    d3_again.ok("check 0 4096 0");
    d3_again.quit();
    d4.ok("check 0 4096 0x44");
    d4.quit();
    // The silenced clients d1 and d3 are killed on drop.
    drop((d1, d3));
}

#[test]
fn reset_force_disconnects_a_live_device() {
    if !have_python_nbd() {
        return;
    }
    let server = TestServer::start();
    server.cli_ok(&["vdisk", "create", "s", "--size", "16MiB"]);
    server.cli_ok(&["vdisk", "set", "s", "--mode", "standard"]);
    add_device(&server, "d1", "52:54:00:00:16:11", "s");
    add_device(&server, "d2", "52:54:00:00:16:12", "s");
    let mut d1 = Nbd::connect(&server.url("device/d1"));
    d1.ok("fill 0 4096 0x11");
    let mut d1b = Nbd::connect(&server.unix_url("device/d1"));
    d1b.ok("check 0 4096 0x11");
    let mut d2 = Nbd::connect(&server.url("device/d2"));
    d2.ok("fill 0 4096 0x22");
    let d2_since = device(&server, "d2")["connected_since"].clone();

    let err = server.cli_err(&["device", "reset", "d1"]);
    assert!(err.contains("--force"), "{err}");
    d1.ok("check 0 4096 0x11");
    let started = Instant::now();
    let out = server.cli_ok(&["device", "reset", "--force", "d1"]);
    assert!(out.contains("reset device d1"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let info = device(&server, "d1");
    assert_eq!(info["connected"], false, "{info}");
    assert_eq!(info["cache_bytes"], 0, "{info}");
    // Both of its connections were closed by the server.
    for c in [&mut d1, &mut d1b] {
        let a = c.cmd("check 0 4096 0x11");
        assert!(
            a.starts_with("error"),
            "a reset device's connection still answers: {a}"
        );
    }
    // Its next session starts from the clean vDisk; d2 noticed nothing.
    let mut again = Nbd::connect(&server.url("device/d1"));
    again.ok("check 0 4096 0");
    again.quit();
    d2.ok("check 0 4096 0x22");
    let info = device(&server, "d2");
    assert_eq!(info["connected_since"], d2_since, "{info}");
    d2.quit();
}

#[test]
fn a_live_idle_agent_keeps_its_session() {
    if !common::have("ss") {
        return;
    }
    const IDLE: Duration = Duration::from_secs(60);
    let dir = tempfile::tempdir().expect("tempdir");
    // Short settings: probes after 2 s idle, every second, cut after 4 s
    // unanswered. An idle minute is 30 rounds of probes.
    let short = ["--tcp-keepalive-secs", "2", "--tcp-user-timeout-secs", "4"];
    // And a short idle limit, which a device's session is exempt from: a
    // plain reader of the vDisk, idle as long, is cut.
    let mut server_flags = short.to_vec();
    server_flags.extend_from_slice(&["--idle-timeout", "10"]);
    let server = TestServer::start_with(dir.path().join("s"), &server_flags);
    let image = dir.path().join("g.raw");
    common::random_image(&image, 16 << 20, 16);
    server.cli_ok(&["vdisk", "import", "g", image.to_str().expect("path")]);
    server.cli_ok(&[
        "vdisk",
        "set",
        "g",
        "--mode",
        "standard",
        "--cache-type",
        "device",
    ]);
    add_device(&server, "pc1", "52:54:00:00:16:21", "g");
    let mut flags = vec!["--deadline-ms", "4000"];
    flags.extend_from_slice(&short);
    let agent = TestAgent::start_with(
        dir.path(),
        "pc1",
        "52:54:00:00:16:21",
        &[&server.api],
        "ram:64MiB",
        &flags,
    );
    let url = format!("nbd+unix:///?socket={}", agent.sock.display());
    let mut dev = Nbd::connect(&url);
    dev.ok("fill 0 4096 0x5a");
    dev.ok("flush");
    let since = wait_for(10, "pc1 connected", || {
        let d = device(&server, "pc1");
        (d["connected"] == true).then(|| d["connected_since"].clone())
    });
    // Both ends of the agent's connection probe: keepalive timers are on.
    let port = server.nbd_port;
    let server_side = sockets(&format!("( sport = :{port} )"));
    let agent_side = sockets(&format!("( dport = :{port} )"));
    assert!(
        server_side.contains("timer:(keepalive"),
        "the server's end has no keepalive timer:\n{server_side}"
    );
    assert!(
        agent_side.contains("timer:(keepalive"),
        "the agent's end has no keepalive timer:\n{agent_side}"
    );

    // A device on a server-side cache, with no agent, idle as well.
    add_device(&server, "pc2", "52:54:00:00:16:22", "g");
    let mut direct = Nbd::connect(&server.url("device/pc2;boot=pc2-1"));
    direct.ok("fill 0 4096 0x6b");
    direct.ok("flush");
    let mut reader = Nbd::connect(&server.url("g"));
    let scratch = dir.path().join("reader");
    assert_eq!(reader.pread(0, 11, &scratch), b"first bytes");

    // No I/O at all for a minute.
    std::thread::sleep(IDLE);

    assert_ne!(
        reader.cmd(&format!("pread 0 11 {}", scratch.display())),
        "ok",
        "a plain reader idle for {IDLE:?} was not cut at the 10 s idle limit"
    );
    direct.ok("check 0 4096 0x6b");
    assert_eq!(device(&server, "pc2")["connected"], true);

    let d = device(&server, "pc1");
    assert_eq!(d["connected"], true, "{d}");
    assert_eq!(
        d["connected_since"], since,
        "the idle session was restarted: {d}"
    );
    let log = server.log_text();
    assert!(
        !log.contains("connection dropped") && !log.contains("device session ended"),
        "the server cut the idle agent:\n{log}"
    );
    // Its cache (kept by the agent) is intact, and a read of the base goes
    // up the same connection, which was not lost.
    dev.ok("check 0 4096 0x5a");
    let base = dev.pread(1 << 20, 4096, &dir.path().join("scratch"));
    let image = std::fs::read(&image).expect("image");
    assert!(
        base == image[1 << 20..(1 << 20) + 4096],
        "base read differs"
    );
    let alog = agent.log_text();
    assert!(
        !alog.contains("failing over") && !alog.contains("reconnected"),
        "the agent lost its idle connection:\n{alog}"
    );
    dev.quit();
}
