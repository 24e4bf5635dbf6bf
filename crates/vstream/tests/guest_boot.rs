//! A QEMU guest (TCG) boots Linux with its root filesystem on a vDisk streamed
//! by vstream, writes and reads files, and powers off: in Private mode the
//! writes persist to the next boot; in Standard mode they are gone.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{have, TestServer};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds (or reuses) the guest kit: kernel, initramfs, root file system image.
fn kit() -> PathBuf {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-kit");
    common::run(
        "bash",
        &[
            repo().join("tests/guest/build.sh").to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    out
}

/// Boots the guest on `url` with `vstest`; returns the console output.
fn boot(kit: &Path, url: &str, vstest: &str) -> String {
    let out = Command::new("bash")
        .arg(repo().join("tests/guest/run-guest.sh"))
        .args([kit.to_str().unwrap(), url, vstest, "180"])
        .output()
        .expect("running run-guest.sh");
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "guest boot ({vstest}) on {url} failed ({}):\n{console}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    console
}

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
    let kit = kit();
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
    let c = boot(&kit, &server.url("device/pc1"), "write:private-token");
    assert!(c.contains("GUEST-OK write private-token"), "{c}");
    let c = boot(&kit, &server.url("device/pc1"), "read");
    assert!(c.lines().any(|l| l == "GUEST-TOKEN private-token"), "{c}");
    let hash_after_private = show_hash(&server);

    // Standard: writes go to the device's cache, which is gone at the next boot.
    server.cli_ok(&["vdisk", "set", "root", "--mode", "standard"]);
    let c = boot(&kit, &server.unix_url("device/pc2"), "write:standard-token");
    assert!(c.contains("GUEST-OK write standard-token"), "{c}");
    let c = boot(&kit, &server.url("device/pc2"), "read");
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
