//! The iSCSI front door with Linux guests (issue 19), under TCG:
//!
//! - QEMU's libiscsi driver boots the guest kit with its root file system
//!   on a device's target (`-drive` with the device's initiator name and
//!   CHAP user, the secret in a secret object read from a file:
//!   tests/guest/run-guest.sh). A Private device's writes are there at the
//!   next boot; a Standard device's are its own while it runs, unseen by its
//!   neighbour and the vDisk, and gone once it comes back.
//! - Debian's open-iscsi (iscsiadm + iscsid) in a diskless guest
//!   (tests/guest/build-iscsi.sh, iscsi-init.sh), since the host kernel has
//!   no iscsi_tcp: discovery shows the device its own target only, a wrong
//!   CHAP secret is refused, and the guest makes a file system, writes,
//!   logs out, logs in again and reads it back; the host then finds the
//!   file in the vDisk.

use crate::common;
use crate::iscsi::{
    access, compare, device_json, out_text, qemu_opts, server, server_advertised, Access,
};

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use common::{have, skip, TestServer};

/// True if QEMU here has its iSCSI driver (package qemu-block-extra).
fn have_qemu_iscsi() -> bool {
    if !have("qemu-img") {
        return false;
    }
    let help = Command::new("qemu-img")
        .arg("--help")
        .output()
        .expect("qemu-img --help");
    let text = String::from_utf8_lossy(&help.stdout);
    if !text.split_whitespace().any(|w| w == "iscsi") {
        skip("QEMU has no iscsi driver (qemu-block-extra; .ci/install-deps installs it)");
        return false;
    }
    true
}

/// True if fetch-kernel.sh has cached Debian's open-iscsi for the guest.
fn have_open_iscsi() -> bool {
    common::fetch_kernel_finds(&["--find-deb", "open-iscsi"])
}

/// `a`'s CHAP secret in a file of its own under `dir` (mode 0600): how it
/// reaches QEMU and the guest, never on a command line.
fn secret_file(dir: &Path, a: &Access) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(format!("{}.chap", a.user));
    std::fs::write(&path, &a.secret).expect("writing the secret");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

/// run-guest.sh booting the kit's guest with its root on `a`'s target, as
/// device `a`, with `vstest` and more kernel words `append`.
fn iscsi_boot(
    kit: &Path,
    dir: &Path,
    port: u16,
    a: &Access,
    vstest: &str,
    append: &str,
) -> Command {
    let mut c = Command::new("bash");
    c.arg(common::repo().join("tests/guest/run-guest.sh"))
        .arg(kit)
        .arg(format!(
            "iscsi://{}@127.0.0.1:{port}/{}/0",
            a.user, a.target
        ))
        .args([vstest, "120"])
        .env("VSTREAM_GUEST_ISCSI_SECRET_FILE", secret_file(dir, a))
        .env("VSTREAM_GUEST_ISCSI_INITIATOR", &a.initiator);
    if !append.is_empty() {
        c.env("VSTREAM_GUEST_APPEND", append);
    }
    c
}

/// Boots as [`iscsi_boot`] to the end and insists on GUEST-OK; the console.
fn boot(kit: &Path, dir: &Path, port: u16, a: &Access, vstest: &str) -> String {
    let started = Instant::now();
    let out = iscsi_boot(kit, dir, port, a, vstest, "")
        .output()
        .expect("running run-guest.sh");
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "the guest ({vstest}) on {} failed ({}):\n{console}\n{said}",
        a.target,
        out.status
    );
    assert!(
        !console.contains(&a.secret) && !said.contains(&a.secret),
        "the CHAP secret on the console"
    );
    eprintln!(
        "iSCSI boot {} {vstest}: {:.1} s",
        a.user,
        started.elapsed().as_secs_f64()
    );
    console
}

/// A QEMU process stopped (SIGSTOP) until dropped.
struct Stopped(libc::pid_t);

impl Stopped {
    /// Stops the QEMU whose `-pidfile` is `pidfile`.
    fn new(pidfile: &Path) -> Stopped {
        let pid: libc::pid_t = std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pid in {}", pidfile.display()));
        // SAFETY: kill has no memory preconditions; a pid gone is an error.
        let r = unsafe { libc::kill(pid, libc::SIGSTOP) };
        assert_eq!(r, 0, "QEMU (pid {pid}) ended before it could be stopped");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

fn has_line(console: &str, line: &str) -> bool {
    console.lines().any(|l| l == line)
}

fn content_hash(s: &TestServer, vdisk: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&s.cli_ok(&["vdisk", "show", vdisk, "--json"])).expect("JSON");
    v["content_hash"].as_str().expect("content_hash").to_owned()
}

/// QEMU's iSCSI driver boots Linux from device targets. Private: what the
/// first boot wrote, the second reads. Standard: while the device is up
/// with its writes, its neighbour reads the imported image unchanged and
/// the vDisk's hash stays; after it reconnects (and a `device reset`) its
/// own next boot finds nothing of them.
#[test]
fn qemu_boots_linux_from_device_targets() {
    if !(common::have_guest_tools() && have_qemu_iscsi()) {
        return;
    }
    let kit = common::guest_kit();
    let rootfs = kit.join("rootfs.img");
    let dir = tempfile::tempdir().expect("tempdir");
    let w = dir.path();
    let (s, port) = server();
    let image = rootfs.to_str().expect("path");
    s.cli_ok(&["vdisk", "import", "priv", image]);
    s.cli_ok(&["vdisk", "set", "priv", "--mode", "private"]);
    s.cli_ok(&["vdisk", "import", "std", image]);
    s.cli_ok(&["vdisk", "set", "std", "--mode", "standard"]);
    for (name, mac, vdisk) in [
        ("pc1", "52:54:00:00:19:01", "priv"),
        ("pc2", "52:54:00:00:19:02", "std"),
        ("pc3", "52:54:00:00:19:03", "std"),
    ] {
        s.cli_ok(&["device", "add", name, "--mac", mac, "--vdisk", vdisk]);
    }
    let [a1, a2, a3] = ["pc1", "pc2", "pc3"].map(|d| access(&s, d));

    // Private: written in place, there at the next boot.
    let c = boot(&kit, w, port, &a1, "write:private-token");
    assert!(c.contains("GUEST-OK write private-token"), "{c}");
    let md5 = c.lines().find_map(|l| l.strip_prefix("GUEST-MD5 "));
    let c2 = boot(&kit, w, port, &a1, "read");
    assert!(has_line(&c2, "GUEST-TOKEN private-token"), "{c2}");
    assert!(has_line(&c2, "GUEST-BIGFILE OK"), "{c2}");
    assert_eq!(
        c2.lines().find_map(|l| l.strip_prefix("GUEST-MD5 ")),
        md5,
        "{c2}"
    );

    // Standard: pc2 writes and holds on, still logged in...
    let std_hash = content_hash(&s, "std");
    let pidfile = w.join("qemu.pid");
    let mut guest = iscsi_boot(&kit, w, port, &a2, "write:standard-token", "vstest.hold=2")
        .env(
            "VSTREAM_GUEST_QEMU_ARGS",
            format!("-pidfile {}", pidfile.display()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running run-guest.sh");
    let mut lines = BufReader::new(guest.stdout.take().expect("stdout")).lines();
    let mut console = String::new();
    for line in lines.by_ref() {
        let line = line.expect("console");
        console += &line;
        console.push('\n');
        if line.starts_with("GUEST-HOLD") {
            break;
        }
    }
    let held = console.contains("GUEST-OK write standard-token") && console.contains("GUEST-HOLD");
    if held {
        // (Stopped there, so that it cannot power off before the checks.)
        let _stopped = Stopped::new(&pidfile);
        let checks = Instant::now();
        // ...while its neighbour reads the imported image, unchanged, and
        // the vDisk keeps its hash.
        let o = compare(port, &rootfs, &a3);
        assert!(o.status.success(), "pc3 saw pc2's writes: {}", out_text(&o));
        assert_eq!(
            content_hash(&s, "std"),
            std_hash,
            "the Standard vDisk changed"
        );
        let d = device_json(&s, "pc2");
        assert!(
            d["connected"] == true && d["protocol"] == "iSCSI",
            "pc2 was gone before the checks were done: {d}"
        );
        eprintln!(
            "checks beside a running Standard guest: {:.1} s",
            checks.elapsed().as_secs_f64()
        );
    }
    for line in lines {
        console += &line.expect("console");
        console.push('\n');
    }
    let status = guest.wait().expect("run-guest.sh");
    let mut said = String::new();
    if let Some(mut e) = guest.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut said);
    }
    assert!(
        held && status.success(),
        "pc2's guest ({status}):\n{console}\n{said}"
    );
    // ...and once it is back (after an admin's reset too), they are gone.
    s.cli_ok(&["device", "reset", "pc2"]);
    let c = boot(&kit, w, port, &a2, "read");
    assert!(
        has_line(&c, "GUEST-TOKEN NONE") && has_line(&c, "GUEST-BIGFILE NONE"),
        "a Standard device's writes outlived its session:\n{c}"
    );
    assert_eq!(
        content_hash(&s, "std"),
        std_hash,
        "the Standard vDisk changed"
    );

    let log = s.log_text();
    for a in [&a1, &a2, &a3] {
        assert!(!log.contains(&a.secret), "a CHAP secret in the server log");
    }
    assert!(!log.contains("panicked"), "{log}");
}

/// Debian's open-iscsi in a guest against a device target, every step
/// reported on the console: discovery refused without CHAP and, with it,
/// showing the device's own target only (the farm has another device); a
/// login with a wrong secret refused; with the right one, mkfs.ext4, a file
/// written, sync, logout, a second login that reads it back, logout. The
/// host then reads the vDisk over iSCSI and finds the guest's file.
#[test]
fn open_iscsi_in_a_guest_discovers_logs_in_and_writes() {
    if !(common::have_guest_tools()
        && have_qemu_iscsi()
        && have_open_iscsi()
        && have("debugfs")
        && have("md5sum"))
    {
        return;
    }
    let kit = common::iscsi_kit();
    let dir = tempfile::tempdir().expect("tempdir");
    let w = dir.path();
    // The guest reaches the host's loopback at 10.0.2.2 (QEMU user
    // networking): the portal devices reach, which discovery names.
    let (s, port) = server_advertised(Some("10.0.2.2"));
    for (vdisk, device, mac) in [
        ("disk1", "pc1", "52:54:00:00:19:11"),
        ("disk2", "pc2", "52:54:00:00:19:12"),
    ] {
        s.cli_ok(&["vdisk", "create", vdisk, "--size", "64M"]);
        s.cli_ok(&["vdisk", "set", vdisk, "--mode", "private"]);
        s.cli_ok(&["device", "add", device, "--mac", mac, "--vdisk", vdisk]);
    }
    let a1 = access(&s, "pc1");
    let a2 = access(&s, "pc2");
    let initrd = w.join("iscsi-initrd.img");
    common::initrd_with(
        &kit.join("iscsi-initrd.img"),
        &initrd,
        &[("etc/vstest/chap-secret", &secret_file(w, &a1))],
    );
    let failures_before = s.metric("vstream_iscsi_login_failures_total");
    let append = format!(
        "vstest.portal=10.0.2.2:{port} vstest.initiator={} vstest.user={} \
         vstest.secret=/etc/vstest/chap-secret",
        a1.initiator, a1.user
    );
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(common::repo().join("tests/guest/run-netboot-guest.sh"))
        .arg(&kit)
        .args(["none", "52:54:00:00:19:11", "by-open-iscsi", "120"])
        .env("VSTREAM_GUEST_INITRD", &initrd)
        .env("VSTREAM_GUEST_APPEND", &append)
        // Entropy at once: mkfs.ext4 and /dev/urandom wait for it otherwise.
        .env("VSTREAM_GUEST_QEMU_ARGS", "-device virtio-rng-pci")
        .output()
        .expect("running run-netboot-guest.sh");
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("open-iscsi guest: {:.1} s", started.elapsed().as_secs_f64());
    assert!(
        out.status.success() && has_line(&console, "GUEST-OK iscsi by-open-iscsi"),
        "the open-iscsi guest failed ({}):\n{console}\n{said}\n{}",
        out.status,
        s.log_text()
    );
    let line = |prefix: &str| {
        console
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix}:\n{console}"))
            .trim()
            .to_owned()
    };

    // Discovery: CHAP required, then the device's own target alone.
    let noauth = line("GUEST-ISCSI-DISCOVERY noauth ");
    assert!(
        noauth.starts_with("refused") && noauth.contains("authorization failure"),
        "discovery without CHAP: {noauth}"
    );
    let targets: Vec<&str> = console
        .lines()
        .filter_map(|l| l.strip_prefix("GUEST-ISCSI-TARGET "))
        .collect();
    let own = format!("10.0.2.2:{port},1 {}", a1.target);
    assert_eq!(targets, [own.as_str()], "{console}");
    assert!(!console.contains(&a2.target), "{console}");
    assert!(
        has_line(&console, "GUEST-ISCSI-DISCOVERY 1 targets"),
        "{console}"
    );

    // A wrong secret refused, then the right one in, twice.
    let wrong = line("GUEST-ISCSI-WRONG-CHAP ");
    assert!(
        wrong.starts_with("refused") && wrong.contains("authorization failure"),
        "{wrong}"
    );
    assert!(
        s.metric("vstream_iscsi_login_failures_total") >= failures_before + 2,
        "the server counted no refused logins"
    );
    assert_eq!(line("GUEST-ISCSI-LOGIN 1 "), "sda 64", "{console}");
    assert_eq!(line("GUEST-ISCSI-LOGIN 2 "), "sda 64", "{console}");
    assert!(has_line(&console, "GUEST-ISCSI-MKFS sda"), "{console}");
    for n in [1, 2] {
        assert!(
            has_line(&console, &format!("GUEST-ISCSI-LOGOUT {n}")),
            "{console}"
        );
    }
    let md5 = line("GUEST-ISCSI-MD5 ");
    assert_eq!(md5.len(), 32, "{console}");
    assert_eq!(line("GUEST-ISCSI-READBACK "), md5, "{console}");

    // From the host, the guest gone: the vDisk over iSCSI, as pc1.
    let copy = w.join("disk1.img");
    let [obj, opts] = qemu_opts(port, &a1, "s0");
    let o = Command::new("qemu-img")
        .args([
            "convert",
            "-O",
            "raw",
            "--object",
            &obj,
            "--image-opts",
            &opts,
        ])
        .arg(&copy)
        .output()
        .expect("qemu-img");
    assert!(o.status.success(), "qemu-img convert: {}", out_text(&o));
    let img = copy.to_str().expect("path");
    let debugfs = |req: &str| common::run("debugfs", &["-R", req, img]);
    assert_eq!(debugfs("cat /iscsi-token").trim(), "by-open-iscsi");
    let bin = w.join("iscsi.bin");
    debugfs(&format!("dump /iscsi.bin {}", bin.display()));
    let sum = common::run("md5sum", &[bin.to_str().expect("path")]);
    assert_eq!(sum.split_whitespace().next(), Some(md5.as_str()));

    let log = s.log_text();
    assert!(
        !log.contains(&a1.secret),
        "the CHAP secret in the server log"
    );
    assert!(
        !console.contains(&a1.secret),
        "the CHAP secret on the console"
    );
    assert!(!log.contains("panicked"), "{log}");
}
