//! A diskless QEMU guest (TCG, UEFI firmware, one NIC, no disk) boots over
//! the network from a two-server farm: the LAN's own DHCP server (dnsmasq,
//! addresses only) gives it an address, vstream's ProxyDHCP its boot file,
//! vstream's TFTP the iPXE binary, vstream's HTTP the iPXE script, kernel and
//! initrd; the initramfs starts `vstream target`, which attaches the guest
//! kernel's /dev/nbd0 to a Standard-mode vDisk. The guest writes and reads
//! files and powers off. Then the same boot with one server stopped.
//!
//! The main test's farm requires TLS end to end (issue 18): the servers'
//! certificates come from `vstream ca init` and `vstream ca server
//! --enrollment`, the initramfs holds the farm's CA only, the boot script
//! hands the device a one-time `vstream.enroll=` token, the agent trades it
//! over HTTPS for its certificate and streams over TLS, and the server it
//! streams from is killed while the guest is up.
//!
//! ```text
//!   host (tests, etcd, CLI) 10.X.200.253 --veth--+
//!   server s1 netns 10.X.200.1 --veth-----------+-- br0 (LAN netns): dnsmasq 10.X.200.254
//!   server s2 netns 10.X.200.2 --veth-----------+
//!   QEMU (in the LAN netns) --tap---------------+
//! ```

use crate::common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::pxe::{pxe_boot, Firmware, Lan};
use common::{TestEtcd, TestServer};

const MAC: &str = "52:54:00:77:00:01";

fn have_netboot_tools() -> bool {
    common::pxe::have_netboot_tools(&[Firmware::Uefi, Firmware::BiosIpxeRom])
        && common::have("etcd")
}

struct Farm {
    lan: Lan,
    _etcd: TestEtcd,
    servers: Vec<TestServer>,
    _dir: tempfile::TempDir,
}

/// Port of each server's HTTPS API, in its own network namespace.
const API_TLS_PORT: u16 = 7443;

/// Two servers, each on its own host of the LAN with ProxyDHCP and TFTP,
/// holding the kit's root filesystem as a Standard-mode vDisk whose boot
/// files are the kit's kernel and network-boot initramfs. With `tls`: each
/// server requires TLS with its own certificate and enrollment CA (made by
/// `vstream ca`), serves its API over HTTPS too, and the initramfs has the
/// farm CA's certificate in /etc/vstream/tls, as the initramfs-tools hook
/// puts it there.
fn farm(kit: &Path, tls: bool) -> Farm {
    let mut lan = Lan::create();
    let etcd = TestEtcd::start_on(&[&format!("{}.253", lan.net)]).expect("etcd");
    let etcd_url = format!("http://{}.253:{}", lan.net, etcd.port());
    let dir = tempfile::tempdir().expect("tempdir");
    let ips = [format!("{}.1", lan.net), format!("{}.2", lan.net)];
    let ca = tls.then(|| {
        common::farm_pki(
            dir.path(),
            &[("s1", &[ips[0].as_str()]), ("s2", &[ips[1].as_str()])],
        )
    });
    let servers: Vec<TestServer> = (1..=2u8)
        .map(|n| {
            let farm = format!("etcd://{}", etcd_url.trim_start_matches("http://"));
            let name = format!("s{n}");
            let certs = dir.path().join(format!("{name}-tls"));
            let api_tls = format!("{}:{API_TLS_PORT}", ips[n as usize - 1]);
            let mut flags = vec!["--farm", &farm, "--name", &name];
            if tls {
                flags.extend([
                    "--tls",
                    "require",
                    "--tls-certificates",
                    certs.to_str().expect("path"),
                    "--api-tls",
                    &api_tls,
                ]);
            }
            common::pxe::server_on_lan(&mut lan, n, dir.path().join(&name), &flags)
        })
        .collect();
    let s1 = &servers[0];
    let initrd = match &ca {
        Some(ca) => {
            let initrd = dir.path().join("netboot-initrd-tls.img");
            common::initrd_with(
                &kit.join("netboot-initrd.img"),
                &initrd,
                &[("etc/vstream/tls/ca-cert.pem", &ca.join("ca-cert.pem"))],
            );
            initrd
        }
        None => kit.join("netboot-initrd.img"),
    };
    common::pxe::netboot_vdisk_with(
        s1,
        kit,
        &initrd,
        "root",
        &["--mode", "standard", "--cache-type", "device"],
    );
    s1.cli_ok(&["device", "add", "pc1", "--mac", MAC, "--vdisk", "root"]);
    common::wait_farm(&servers);
    Farm {
        lan,
        _etcd: etcd,
        servers,
        _dir: dir,
    }
}

/// The vDisk's kernel command line for the next boot. With `vstest.stopagent`
/// the initramfs stops and continues the agent, as systemd's shutdown does to
/// every process, and checks that the disk still reads.
/// `more`: more words (`vstest.pause=N`, `vstest.agentlog`, ...; see
/// tests/guest/rootfs-init.sh).
fn set_cmdline(server: &TestServer, vstest: &str, more: &str) {
    server.cli_ok(&[
        "vdisk",
        "set",
        "root",
        "--cmdline",
        &format!(
            "console=ttyS0 panic=-1 quiet loglevel=3 rootfstype=ext4 rw vstest={vstest} vstream.cache=ram:256MiB vstest.stopagent {more}"
        ),
    ]);
}

fn boot_and_check(farm: &Farm, tap: &str, firmware: Firmware, token: &str) -> (f64, String) {
    let (console, seen) = pxe_boot(&farm.lan, tap, MAC, firmware, Duration::from_secs(300));
    check_boot(farm, &console, token);
    (seen[3].expect("GUEST-BOOTED seen"), console)
}

fn check_boot(farm: &Farm, console: &str, token: &str) {
    let logs: String = farm
        .servers
        .iter()
        .map(|s| format!("--- {}\n{}", s.log.display(), s.log_text()))
        .collect();
    let ok = console.contains(&format!("GUEST-OK write {token}"))
        && console.contains("GUEST-NETBOOT agent survived SIGSTOP/SIGCONT")
        && !console.contains("GUEST-ERROR");
    assert!(
        ok,
        "the guest did not boot and write:\n{console}\n--- dnsmasq\n{}\n{logs}",
        farm.lan.dnsmasq_log()
    );
}

/// The agent's log lines the guest copied to its console (`vstest.agentlog`).
fn agent_said(console: &str, what: &str) -> bool {
    console
        .lines()
        .any(|l| l.starts_with("GUEST-AGENT ") && l.contains(what))
}

/// Neither a server's log nor the console holds an enrollment token.
fn no_token_shown(farm: &Farm, console: &str) {
    for s in &farm.servers {
        assert!(
            !s.log_text().contains("vstream.enroll="),
            "a token in {}",
            s.log.display()
        );
    }
    assert!(
        !console.contains("vstream.enroll="),
        "a token on the console"
    );
}

#[test]
fn a_diskless_guest_pxe_boots_from_the_farm_and_again_with_a_server_stopped() {
    if !have_netboot_tools() {
        return;
    }
    let kit = common::netboot_kit();
    let mut farm = farm(&kit, true);
    let tap = farm.lan.tap(1);

    // Boot 1, TLS end to end; the server the guest streams from is killed
    // while the guest is up (paused after mounting its root), and all of
    // the guest's I/O after that (8 MiB written, read back, the whole disk
    // read) goes through the other.
    set_cmdline(
        &farm.servers[0],
        "write:both-up",
        "vstest.pause=5 vstest.readdisk vstest.agentlog",
    );
    let console_file = farm.lan.dir.path().join(format!("{tap}.console"));
    let _ = std::fs::remove_file(&console_file);
    let Farm { lan, servers, .. } = &mut farm;
    let (console, seen, victim, before_kill) = std::thread::scope(|sc| {
        let lan = &*lan;
        let tap = tap.as_str();
        let boot =
            sc.spawn(move || pxe_boot(lan, tap, MAC, Firmware::Uefi, Duration::from_secs(300)));
        let deadline = Instant::now() + Duration::from_secs(300);
        while !std::fs::read_to_string(&console_file)
            .unwrap_or_default()
            .contains("GUEST-PAUSE")
            && !boot.is_finished()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        let victim = servers.iter().position(|s| {
            s.log_text()
                .contains("device streaming its base device=pc1")
        });
        let mut before_kill = Vec::new();
        if let (Some(v), false) = (victim, boot.is_finished()) {
            let s = &mut servers[v];
            before_kill = METRICS.iter().map(|m| s.metric(m)).collect();
            s.kill9();
        }
        let (console, seen) = boot.join().expect("boot thread");
        (console, seen, victim, before_kill)
    });
    let victim = victim.unwrap_or_else(|| panic!("no server streamed to pc1:\n{console}"));
    assert!(
        !before_kill.is_empty(),
        "the guest ended before a server could be killed:\n{console}"
    );
    check_boot(&farm, &console, "both-up");
    for l in console.lines().filter(|l| l.starts_with("GUEST-AGENT ")) {
        eprintln!("{l}");
    }
    let t = seen[3].expect("GUEST-BOOTED seen");
    eprintln!("root mounted {t:.1} s after QEMU started (two servers up, TLS)");
    assert!(console.contains("GUEST-READDISK /dev/nbd0 OK"), "{console}");
    // The agent enrolled with its boot token, and moved on the kill.
    assert!(
        agent_said(&console, "device certificate from enrollment"),
        "{console}"
    );
    assert!(agent_said(&console, "failed over"), "{console}");
    let left = 1 - victim;
    let s = &farm.servers[left];
    assert!(
        s.log_text()
            .contains("device streaming its base device=pc1"),
        "the server left never streamed to the guest:\n{}",
        s.log_text()
    );
    // Victim's counters before the kill, plus the survivor's now.
    let total = |name: &str| {
        let i = METRICS.iter().position(|m| *m == name).expect("a metric");
        before_kill[i] + s.metric(name)
    };
    assert!(total("vstream_enroll_certificates_total") >= 1);
    assert!(
        before_kill[0] >= 1,
        "the killed server had no TLS connection"
    );
    assert!(
        s.metric("vstream_nbd_tls_connections_total") >= 1,
        "the failover did not come over TLS"
    );
    assert_eq!(
        s.metric(r#"vstream_nbd_refusals_total{reason="no_tls"}"#),
        0,
        "something tried plain NBD"
    );
    no_token_shown(&farm, &console);
    // The chain really went through vstream: firmware TFTP, then iPXE's script.
    let logs: String = farm.servers.iter().map(|s| s.log_text()).collect();
    assert!(
        logs.contains("snponly.efi"),
        "no TFTP transfer of snponly.efi:\n{logs}"
    );
    assert!(
        logs.contains("boot script"),
        "no boot script served:\n{logs}"
    );
    // The default TFTP folder holds copies of Debian's iPXE binaries, not
    // links out of it (ipxe.efi is one there).
    let ipxe_efi = farm.servers[0].data.join("tftp/ipxe.efi");
    let meta = std::fs::symlink_metadata(&ipxe_efi).expect("ipxe.efi in the TFTP folder");
    assert!(meta.file_type().is_file() && meta.len() > 0, "{meta:?}");
    assert!(total("vstream_tftp_transfers_total") >= 1);
    assert!(total("vstream_boot_scripts_total") >= 1);
    // Both servers answer the firmware, then iPXE.
    assert!(total("vstream_proxy_dhcp_offers_total") >= 4);
    assert!(total("vstream_boot_file_sent_bytes_total") > 0);

    // The killed server stays down for the next boot: the other does it all,
    // enrollment included.
    let count = |s: &TestServer, what: &str| s.log_text().matches(what).count();
    let before = [
        count(s, "TFTP transfer completed"),
        count(s, "boot script device=pc1"),
        count(s, "device streaming its base device=pc1"),
    ];
    let certs = s.metric("vstream_enroll_certificates_total");
    set_cmdline(s, "write:one-down", "vstest.agentlog");
    let (t, console) = boot_and_check(&farm, &tap, Firmware::Uefi, "one-down");
    eprintln!("root mounted {t:.1} s after QEMU started (one server stopped, TLS)");
    let after = [
        count(s, "TFTP transfer completed"),
        count(s, "boot script device=pc1"),
        count(s, "device streaming its base device=pc1"),
    ];
    for (i, what) in ["TFTP", "the boot script", "the vDisk"].iter().enumerate() {
        assert!(
            after[i] > before[i],
            "the server left did not serve {what}:\n{}",
            s.log_text()
        );
    }
    assert!(
        agent_said(&console, "device certificate from enrollment"),
        "{console}"
    );
    assert!(s.metric("vstream_enroll_certificates_total") > certs);

    // A BIOS machine whose NIC ROM is iPXE: ProxyDHCP hands it the script URL
    // at once (its user class says iPXE), whatever its architecture.
    set_cmdline(s, "write:bios", "");
    let (t, console) = boot_and_check(&farm, &tap, Firmware::BiosIpxeRom, "bios");
    eprintln!("root mounted {t:.1} s after QEMU started (BIOS, iPXE ROM, TLS)");
    assert!(
        s.log_text().contains("arch=0 client=iPXE"),
        "{}",
        s.log_text()
    );
    no_token_shown(&farm, &console);
}

/// What the test reads from the server it kills, just before: the first
/// must be the TLS connections.
const METRICS: [&str; 6] = [
    "vstream_nbd_tls_connections_total",
    "vstream_enroll_certificates_total",
    "vstream_tftp_transfers_total",
    "vstream_boot_scripts_total",
    "vstream_proxy_dhcp_offers_total",
    "vstream_boot_file_sent_bytes_total",
];

/// The network-boot benchmark (`bash bench/netboot.sh` runs it on a release
/// build): seconds from QEMU's start to the root filesystem mounted, for one
/// VM and for `VSTREAM_BENCH_VMS` (default 10) VMs booting at once against
/// the two servers; and the TFTP rate of the iPXE binaries, vstream's server
/// beside dnsmasq's in the same run.
#[test]
#[ignore = "a benchmark: bash bench/netboot.sh"]
fn bench_network_boot() {
    if !have_netboot_tools() {
        return;
    }
    let vms: u8 = std::env::var("VSTREAM_BENCH_VMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
        .clamp(1, 50);
    let kit = common::netboot_kit();
    let farm = farm(&kit, false);
    let s1 = &farm.servers[0];
    set_cmdline(s1, "read", "");
    let macs: Vec<String> = (1..=vms)
        .map(|i| format!("52:54:00:77:01:{i:02x}"))
        .collect();
    for (i, mac) in macs.iter().enumerate() {
        s1.cli_ok(&[
            "device",
            "add",
            &format!("b{i}"),
            "--mac",
            mac,
            "--vdisk",
            "root",
        ]);
    }
    let taps: Vec<String> = (1..=vms).map(|i| farm.lan.tap(i)).collect();
    std::thread::sleep(Duration::from_secs(2)); // the servers' views take the devices in

    let boot = |tap: &str, mac: &str| {
        let (console, seen) = pxe_boot(
            &farm.lan,
            tap,
            mac,
            Firmware::Uefi,
            Duration::from_secs(900),
        );
        assert!(console.contains("GUEST-OK read"), "{tap}:\n{console}");
        seen.map(|t| t.expect("every stage seen"))
    };
    let stages = boot(&taps[0], &macs[0]);
    let one = stages[3];
    println!(
        "BENCH boot 1 VM stages: iPXE running {:.1} s, initramfs running {:.1} s, /dev/nbd0 attached {:.1} s, root mounted {:.1} s",
        stages[0], stages[1], stages[2], stages[3]
    );
    let start = Instant::now();
    let mut times: Vec<f64> = std::thread::scope(|sc| {
        let handles: Vec<_> = taps
            .iter()
            .zip(&macs)
            .map(|(t, m)| sc.spawn(move || boot(t, m)[3]))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("boot"))
            .collect()
    });
    let wall = start.elapsed().as_secs_f64();
    times.sort_by(f64::total_cmp);
    println!("BENCH boot 1 VM: root mounted after {one:.1} s");
    println!(
        "BENCH boot {vms} VMs at once: root mounted after min {:.1} s, median {:.1} s, max {:.1} s (all done in {wall:.1} s)",
        times[0],
        times[times.len() / 2],
        times[times.len() - 1]
    );
    for s in &farm.servers {
        let n = s.log_text().matches("device streaming its base").count();
        println!("BENCH server {} streamed to {n} boots", s.log.display());
    }

    // TFTP: vstream's server against dnsmasq's, from the host, same files.
    let dnsmasq = Command::new("ip")
        .args([
            "netns",
            "exec",
            &farm.lan.ns,
            "dnsmasq",
            "--no-daemon",
            "--conf-file=/dev/null",
        ])
        .args([
            "--port=0",
            "--enable-tftp",
            &format!("--tftp-root={}", s1.data.join("tftp").display()),
            "--bind-interfaces",
        ])
        .arg(format!("--listen-address={}.254", farm.lan.net))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(KillOnDrop)
        .expect("dnsmasq tftp");
    std::thread::sleep(Duration::from_millis(500));
    for file in ["undionly.kpxe", "snponly.efi", "ipxe.efi"] {
        let size = std::fs::metadata(s1.data.join("tftp").join(file))
            .expect("file")
            .len();
        for blksize in [512, 1468] {
            let ours = tftp_rate(&format!("{}.1", farm.lan.net), file, blksize, size);
            let theirs = tftp_rate(&format!("{}.254", farm.lan.net), file, blksize, size);
            println!(
                "BENCH tftp {file} ({size} B) blksize {blksize}: vstream {:.1} MB/s, dnsmasq {:.1} MB/s, ratio {:.2}",
                ours / 1e6,
                theirs / 1e6,
                ours / theirs
            );
        }
    }
    drop(dnsmasq);
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Bytes per second of 20 downloads of `file` from the TFTP server at `ip`
/// (the median run), checking each is whole.
fn tftp_rate(ip: &str, file: &str, blksize: u32, size: u64) -> f64 {
    let mut rates: Vec<f64> = (0..20)
        .map(|_| {
            let out = Command::new("curl")
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{size_download} %{time_total}",
                ])
                .args(["--tftp-blksize", &blksize.to_string()])
                .arg(format!("tftp://{ip}/{file}"))
                .output()
                .expect("curl");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let mut it = text.split_whitespace();
            let got: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            let secs: f64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(f64::MAX);
            assert_eq!(got, size, "tftp://{ip}/{file}: {text}");
            size as f64 / secs
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

fn http_get(url: &str) -> (u16, Vec<u8>) {
    let out = Command::new("curl")
        .args(["-s", "-m", "10", "-w", "\n%{http_code}", url])
        .output()
        .expect("curl");
    let mut body = out.stdout;
    let split = body.iter().rposition(|&b| b == b'\n').expect("status line");
    let code = String::from_utf8_lossy(&body[split + 1..])
        .parse()
        .expect("status");
    body.truncate(split);
    (code, body)
}

/// The HTTP side of network boot on one server, without a VM: the script for
/// a known device, the console message for an unknown one or a vDisk without
/// a kernel, the files behind the script (and only the device's own), the
/// checks on what an administrator sets, and auto-add.
#[test]
fn the_boot_script_and_files_over_http() {
    if !common::have("curl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path().join("s"), &["--auto-add", "pool"]);
    let script = |mac: &str| {
        let (code, body) = http_get(&format!("{}/boot/ipxe?mac={mac}", server.api));
        assert_eq!(code, 200);
        String::from_utf8(body).unwrap()
    };
    let unknown = "52:54:00:aa:00:01";
    // Auto-add is on, but its vDisk does not exist yet: a clear message.
    let s = script(unknown);
    assert!(s.starts_with("#!ipxe\n"), "{s}");
    assert!(s.contains("vDisk pool does not exist"), "{s}");
    assert!(
        s.contains(&format!(
            "chain --replace --autofree {}/boot/ipxe?mac={unknown}",
            server.api
        )),
        "{s}"
    );

    server.cli_ok(&["vdisk", "create", "root", "--size", "16MiB"]);
    server.cli_ok(&["vdisk", "create", "pool", "--size", "16MiB"]);
    server.cli_ok(&["device", "add", "pc1", "--mac", MAC, "--vdisk", "root"]);
    let s = script(MAC);
    assert!(s.contains("vDisk root has no kernel"), "{s}");
    assert!(s.contains("vstream vdisk set root --kernel FILE"), "{s}");

    let kernel = dir.path().join("vmlinuz");
    let initrd = dir.path().join("initrd.img");
    common::random_image(&kernel, 3 << 20, 1);
    common::random_image(&initrd, 5 << 20, 2);
    let out = server.cli_ok(&[
        "vdisk",
        "set",
        "root",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 boot=vstream",
    ]);
    assert!(out.contains("kernel vmlinuz (3 MiB"), "{out}");
    let show = server.cli_ok(&["vdisk", "show", "root"]);
    assert!(show.contains("console=ttyS0 boot=vstream"), "{show}");

    let s = script(MAC);
    let host = server.api.trim_start_matches("http://");
    let path = MAC.replace(':', "-");
    // Each script request is a new boot, with its own token for the agent.
    let boot_token = |s: &str| -> String {
        let line = s
            .lines()
            .find(|l| l.contains("/kernel initrd="))
            .unwrap_or_else(|| panic!("no kernel line in {s}"));
        let want = format!(
            "kernel --name kernel {}/boot/{path}/kernel initrd=initrd console=ttyS0 boot=vstream vstream.bootstrap={host} vstream.mac={MAC} vstream.boot=",
            server.api
        );
        let token = line
            .strip_prefix(&want)
            .and_then(|rest| rest.strip_suffix(" || goto try1"))
            .unwrap_or_else(|| panic!("{line:?} is not {want:?}TOKEN || goto try1"));
        assert!(
            token.len() == 32 && token.bytes().all(|b| b.is_ascii_hexdigit()),
            "{token:?}"
        );
        token.to_owned()
    };
    let first = boot_token(&s);
    assert_ne!(first, boot_token(&script(MAC)), "two boots, one token");
    let (code, body) = http_get(&format!("{}/boot/{path}/kernel", server.api));
    assert_eq!(code, 200);
    assert_eq!(body, std::fs::read(&kernel).unwrap());
    let (code, body) = http_get(&format!("{}/boot/{path}/initrd", server.api));
    assert_eq!(code, 200);
    assert_eq!(body, std::fs::read(&initrd).unwrap());
    assert!(server.metric("vstream_boot_file_sent_bytes_total") >= 8 << 20);
    assert!(server.metric("vstream_boot_scripts_total") >= 1);

    // The files are reached only through a device of that vDisk.
    let (code, _) = http_get(&format!("{}/boot/52-54-00-99-99-99/kernel", server.api));
    assert_eq!(code, 404);
    let (code, _) = http_get(&format!("{}/boot/{path}/config", server.api));
    assert_eq!(code, 404);
    // The peer route needs the farm's peer secret.
    let (code, _) = http_get(&format!(
        "{}/peer/v1/vdisks/root/boot/{}",
        server.api,
        "0".repeat(64)
    ));
    assert_eq!(code, 401);

    // What the administrator sets is checked.
    let err = server.cli_err(&["vdisk", "set", "root", "--cmdline", "quiet\nshell"]);
    assert!(err.contains("one line"), "{err}");
    let err = server.cli_err(&[
        "vdisk",
        "set",
        "root",
        "--cmdline",
        "vstream.mac=00:00:00:00:00:01",
    ]);
    assert!(
        err.contains("adds vstream.bootstrap= and vstream.mac= itself"),
        "{err}"
    );
    let err = server.cli_err(&[
        "vdisk",
        "set",
        "nosuch",
        "--kernel",
        kernel.to_str().unwrap(),
    ]);
    assert!(err.contains("does not exist"), "{err}");
    // A body forgotten (an empty file) is refused, and nothing changes.
    let empty = kernel.with_file_name("empty");
    std::fs::write(&empty, b"").unwrap();
    let err = server.cli_err(&["vdisk", "set", "root", "--kernel", empty.to_str().unwrap()]);
    assert!(err.contains("the boot file is empty"), "{err}");
    let (code, body) = http_get(&format!("{}/boot/{path}/kernel", server.api));
    assert_eq!((code, body), (200, std::fs::read(&kernel).unwrap()));

    // A replaced kernel's file goes once it is old enough; the new one stays.
    let boot_dir = server.data.join("boot/root");
    let hash_of = |show: &str| {
        let v: serde_json::Value = serde_json::from_str(show).unwrap();
        v["boot"]["kernel"]["blake3"].as_str().unwrap().to_owned()
    };
    let old_hash = hash_of(&server.cli_ok(&["vdisk", "show", "root", "--json"]));
    common::random_image(&kernel, 3 << 20, 3);
    server.cli_ok(&["vdisk", "set", "root", "--kernel", kernel.to_str().unwrap()]);
    let new_hash = hash_of(&server.cli_ok(&["vdisk", "show", "root", "--json"]));
    assert_ne!(old_hash, new_hash);
    common::run(
        "touch",
        &[
            "-d",
            "1 hour ago",
            boot_dir.join(&old_hash).to_str().unwrap(),
        ],
    );
    common::wait_for(10, "the replaced kernel's file removed", || {
        (!boot_dir.join(&old_hash).exists()).then_some(())
    });
    assert!(boot_dir.join(&new_hash).is_file());

    // Asking for a file does not auto-add: only the script does.
    let (code, _) = http_get(&format!("{}/boot/52-54-00-aa-00-02/kernel", server.api));
    assert_eq!(code, 404);
    let err = server.cli_err(&["device", "show", "52:54:00:aa:00:02"]);
    assert!(err.contains("does not exist"), "{err}");

    // Auto-add: the unknown MAC is now a device of vDisk pool.
    let s = script(unknown);
    assert!(s.contains("vDisk pool has no kernel"), "{s}");
    let dev = server.cli_ok(&["device", "show", unknown]);
    assert!(
        dev.contains("auto-525400aa0001") && dev.contains("pool"),
        "{dev}"
    );
    // A MAC that is not one gets a message, not an error page.
    let s = script("nonsense%0Ashell");
    assert!(s.contains("is not a MAC address"), "{s}");
    assert!(!s.lines().any(|l| l == "shell"), "{s}");
    assert!(s.contains("/boot/ipxe?mac=${net0/mac} ||"), "{s}");
}
