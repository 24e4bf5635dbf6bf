//! A QEMU guest (TCG) boots Linux with its root filesystem on a vDisk streamed
//! by vstream, writes and reads files, and powers off: in Private mode the
//! writes persist to the next boot; in Standard mode they are gone.

mod common;

use common::{have, TestServer};

#[test]
fn guest_boots_from_a_vdisk_in_private_then_standard_mode() {
    for tool in [
        "qemu-system-x86_64",
        "mkfs.ext4",
        "busybox",
        "cpio",
        "apt-get",
    ] {
        if !have(tool) {
            return;
        }
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
