//! A QEMU guest (TCG) boots Linux with its root filesystem on a vDisk streamed
//! by vstream, writes and reads files, and powers off: in Private mode the
//! writes persist to the next boot; in Standard mode they are gone.

use crate::common;

use common::TestServer;

#[test]
fn guest_boots_from_a_vdisk_in_private_then_standard_mode() {
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
    server.cli_ok(&[
        "device",
        "add",
        "pc1",
        "--mac",
        "52:54:00:00:00:01",
        "--vdisk",
        "root",
    ]);
    server.cli_ok(&[
        "device",
        "add",
        "pc2",
        "--mac",
        "52:54:00:00:00:02",
        "--vdisk",
        "root",
    ]);

    // Private: the write reaches the vDisk and the next boot sees it.
    let c = common::guest_boot(&kit, &server.url("device/pc1"), "write:private-token");
    assert!(c.contains("GUEST-OK write private-token"), "{c}");
    let c = common::guest_boot(&kit, &server.url("device/pc1"), "read");
    assert!(c.lines().any(|l| l == "GUEST-TOKEN private-token"), "{c}");
    let hash_after_private = show_hash(&server);

    // Standard: writes go to the device's cache, which is gone at the next boot.
    server.cli_ok(&["vdisk", "set", "root", "--mode", "standard"]);
    let c = common::guest_boot(&kit, &server.unix_url("device/pc2"), "write:standard-token");
    assert!(c.contains("GUEST-OK write standard-token"), "{c}");
    let c = common::guest_boot(&kit, &server.url("device/pc2"), "read");
    assert!(
        c.lines().any(|l| l == "GUEST-TOKEN private-token"),
        "Standard-mode write survived a reboot:\n{c}"
    );
    assert_eq!(
        show_hash(&server),
        hash_after_private,
        "the shared vDisk changed under Standard mode"
    );
}

fn show_hash(server: &TestServer) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["vdisk", "show", "root", "--json"])).unwrap();
    v["content_hash"]
        .as_str()
        .expect("content_hash")
        .to_string()
}

/// A guest boots through a `vstream target` agent in a two-server farm; the
/// server it streams from is killed while the guest boots, writes and reads,
/// and the guest finishes cleanly on the other one.
#[test]
fn guest_boots_through_the_agent_across_a_server_kill() {
    if !common::have_guest_tools() {
        return;
    }
    let Some(etcd) = common::TestEtcd::start() else {
        return;
    };
    let kit = common::guest_kit();
    let dir = tempfile::tempdir().unwrap();
    let mut servers: Vec<TestServer> = (1..=2)
        .map(|i| {
            TestServer::start_in_farm(
                dir.path().join(format!("s{i}")),
                &etcd.url,
                &format!("s{i}"),
            )
        })
        .collect();
    // Imported on one server; replication copies it to the other.
    let image = kit.join("rootfs.img");
    servers[0].cli_ok(&["vdisk", "import", "root", image.to_str().unwrap()]);
    servers[0].cli_ok(&[
        "vdisk",
        "set",
        "root",
        "--mode",
        "standard",
        "--cache-type",
        "device",
    ]);
    servers[0].cli_ok(&[
        "device",
        "add",
        "pc1",
        "--mac",
        "52:54:00:00:00:01",
        "--vdisk",
        "root",
    ]);
    for s in &servers {
        common::wait_farm_ready(s, 2);
    }
    let apis: Vec<&str> = servers.iter().map(|s| s.api.as_str()).collect();
    let agent =
        common::TestAgent::start(dir.path(), "pc1", "52:54:00:00:00:01", &apis, "ram:256MiB");
    let first = if agent.log_text().contains("server=s1") {
        0
    } else {
        1
    };
    let url = format!("nbd+unix:///pc1?socket={}", agent.sock.display());
    let guest = {
        let (kit, url) = (kit.clone(), url.clone());
        std::thread::spawn(move || common::guest_boot(&kit, &url, "write:farm-token"))
    };
    std::thread::sleep(std::time::Duration::from_secs(4));
    servers[first].kill9();
    let console = guest.join().expect("guest thread");
    assert!(console.contains("GUEST-OK write farm-token"), "{console}");
    let log = agent.log_text();
    assert!(log.contains("failed over"), "the agent never moved:\n{log}");
}
