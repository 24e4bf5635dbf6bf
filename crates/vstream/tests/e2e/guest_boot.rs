//! A QEMU guest (TCG) boots Linux with its root filesystem on a vDisk streamed
//! by vstream, writes and reads files, and powers off: in Private mode the
//! writes persist to the next boot; in Standard mode they are gone.

use crate::common;

use std::process::Command;

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
    let mut servers: [TestServer; 2] = common::farm_of(dir.path(), &etcd, &[]);
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
    common::wait_farm(&servers);
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
    // The agent leaves a closed connection on its own, not at the guest's
    // next read: a guest that read all it needed before the kill may end
    // while the agent is still moving.
    let moved = (0..300).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        agent.log_text().contains("failed over")
    });
    assert!(moved, "the agent never moved:\n{}", agent.log_text());
}

/// Issue 18 in a guest, two boots against a server that requires TLS:
/// QEMU's own NBD client boots the guest with its root on `device/pc1`
/// over TLS (a `tls-creds-x509` object with the device's credential from
/// `vstream device credential --ca`) and writes; then Debian's nbd-client, in a
/// second guest, attaches the same export to the guest kernel's /dev/nbd0
/// over TLS with `-certfile -keyfile -cacertfile` and the credential a
/// server signed (`vstream device credential`), finds the first boot's
/// writes (Private: they persisted), writes a file and reads it back
/// uncached. The host reads the disk over TLS with nbdcopy and finds that
/// file's bytes. Without TLS, or with another device's credential, neither
/// client gets the disk.
#[test]
fn guests_reach_their_disk_over_tls_with_qemu_and_nbd_client() {
    if !(common::have_guest_tools()
        && common::have("nbdcopy")
        && common::have("debugfs")
        && common::have("md5sum"))
    {
        return;
    }
    let kit = common::netboot_kit();
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    // The guest reaches the host's loopback at 10.0.2.2 (QEMU user
    // networking): the certificate names it too.
    let ca = common::farm_pki(w, &[("pvs1", &["127.0.0.1", "localhost", "10.0.2.2"])]);
    let tls = w.join("pvs1-tls");
    let [api_tls] = common::free_ports::<1>();
    let server = TestServer::start_fresh_with(&[
        "--tls",
        "require",
        "--tls-certificates",
        tls.to_str().unwrap(),
        "--api-tls",
        &format!("127.0.0.1:{api_tls}"),
    ]);
    server.cli_ok(&[
        "vdisk",
        "import",
        "root",
        kit.join("rootfs.img").to_str().unwrap(),
    ]);
    for (name, mac) in [("pc1", "52:54:00:00:00:01"), ("pc2", "52:54:00:00:00:02")] {
        server.cli_ok(&["device", "add", name, "--mac", mac, "--vdisk", "root"]);
    }
    // QEMU 10.0 checks its own certificate against ca-cert.pem alone, and
    // refuses one that a server's enrollment CA signed ("hasn't got a known
    // issuer": it does not use the chain in client-cert.pem): it gets
    // credentials signed offline by the farm CA. nbd-client and libnbd take
    // the chain: they get the server-signed one.
    let offline = |name: &str| {
        let out = w.join(format!("{name}-offline"));
        let (ca, dir) = (ca.to_str().unwrap(), out.to_str().unwrap());
        let args = ["device", "credential", name, "--ca", ca, "--out", dir];
        common::run(common::BIN, &args);
        out
    };
    let (pc1, pc2) = (offline("pc1"), offline("pc2"));
    let pc1_online = w.join("pc1-online");
    server.cli_ok(&[
        "device",
        "credential",
        "pc1",
        "--out",
        pc1_online.to_str().unwrap(),
    ]);
    let url = server.url("device/pc1");

    // QEMU cannot open the drive without TLS, nor with pc2's credential.
    let out = common::guest_boot_env(&kit, &url, "read", &[]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !out.status.success() && said.contains("TLS negotiation required"),
        "a plain QEMU opened the disk of a server requiring TLS:\n{said}"
    );
    let out = common::guest_boot_env(
        &kit,
        &url,
        "read",
        &[("VSTREAM_GUEST_TLS_CREDS", pc2.as_path())],
    );
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !out.status.success() && !said.contains("GUEST-BOOTED"),
        "pc2's credential opened device/pc1:\n{said}"
    );
    assert!(
        server
            .log_text()
            .contains("the certificate of device pc2 opens only its own disk"),
        "{}",
        server.log_text()
    );

    // Boot 1: QEMU's NBD client over TLS, root on device/pc1, writing.
    let tls_before = server.metric("vstream_nbd_tls_connections_total");
    let out = common::guest_boot_env(
        &kit,
        &url,
        "write:over-tls",
        &[("VSTREAM_GUEST_TLS_CREDS", pc1.as_path())],
    );
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success()
            && console.contains("GUEST-BOOTED")
            && console.contains("GUEST-OK write over-tls"),
        "the guest did not boot over TLS ({}):\n{console}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        server.log_text()
    );
    assert!(server.metric("vstream_nbd_tls_connections_total") > tls_before);

    // Boot 2: nbd-client in the guest, the credential appended to its initrd.
    let initrd = w.join("nbdc-initrd.img");
    common::initrd_with(
        &kit.join("netboot-initrd.img"),
        &initrd,
        &[
            (
                "etc/vstest/tls/ca-cert.pem",
                &pc1_online.join("ca-cert.pem"),
            ),
            (
                "etc/vstest/tls/client-cert.pem",
                &pc1_online.join("client-cert.pem"),
            ),
            (
                "etc/vstest/tls/client-key.pem",
                &pc1_online.join("client-key.pem"),
            ),
        ],
    );
    let no_tls_before = server.metric(r#"vstream_nbd_refusals_total{reason="no_tls"}"#);
    let append = format!(
        "rdinit=/nbd-client-init vstest.nbd=10.0.2.2:{} vstest.export=device/pc1 vstest.tls=/etc/vstest/tls",
        server.nbd_port
    );
    let out = Command::new("bash")
        .arg(common::repo().join("tests/guest/run-netboot-guest.sh"))
        .arg(&kit)
        .args(["none", "52:54:00:00:00:01", "by-nbd-client", "180"])
        .env("VSTREAM_GUEST_INITRD", &initrd)
        .env("VSTREAM_GUEST_APPEND", &append)
        .output()
        .expect("running run-netboot-guest.sh");
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && console.contains("GUEST-OK nbd-client by-nbd-client"),
        "nbd-client did not attach over TLS ({}):\n{console}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        server.log_text()
    );
    assert!(console.contains("GUEST-NBDC plain refused"), "{console}");
    assert!(
        server.metric(r#"vstream_nbd_refusals_total{reason="no_tls"}"#) > no_tls_before,
        "the plain nbd-client was not refused for want of TLS"
    );
    // What QEMU wrote over TLS is on the disk (Private mode), whole.
    assert!(
        console.lines().any(|l| l == "GUEST-TOKEN over-tls"),
        "{console}"
    );
    assert!(
        console.lines().any(|l| l == "GUEST-BIGFILE OK"),
        "{console}"
    );
    let md5 = console
        .lines()
        .find_map(|l| l.strip_prefix("GUEST-NBDC-MD5 "))
        .unwrap_or_else(|| panic!("no GUEST-NBDC-MD5:\n{console}"))
        .trim()
        .to_owned();

    // From the host, over TLS too: nbd-client's bytes are in the vDisk.
    let copy = w.join("copy.img");
    common::run(
        "nbdcopy",
        &[
            &format!(
                "nbds://127.0.0.1:{}/device/pc1?tls-certificates={}",
                server.nbd_port,
                pc1_online.display()
            ),
            copy.to_str().unwrap(),
        ],
    );
    let debugfs = |req: &str| common::run("debugfs", &["-R", req, copy.to_str().unwrap()]);
    assert_eq!(debugfs("cat /data/nbdc-token").trim(), "by-nbd-client");
    assert_eq!(debugfs("cat /data/token").trim(), "over-tls");
    let bin = w.join("nbdc.bin");
    debugfs(&format!("dump /data/nbdc.bin {}", bin.display()));
    let sum = common::run("md5sum", &[bin.to_str().unwrap()]);
    assert_eq!(sum.split_whitespace().next(), Some(md5.as_str()));
    let log = server.log_text();
    assert!(!log.contains("PRIVATE KEY"), "a key in the server log");
}
