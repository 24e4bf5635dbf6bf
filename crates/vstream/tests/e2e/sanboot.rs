//! The Windows-shaped boot path, run with Linux: a QEMU guest (TCG, SeaBIOS,
//! one NIC, no disk) PXE-boots from a two-server farm whose vDisk is set to
//! `--boot sanboot`. The NIC's option ROM is iPXE: the LAN's DHCP server
//! (dnsmasq, addresses only) gives it an address, vstream's ProxyDHCP the
//! script URL, vstream's HTTP the sanboot script, which sets the device's
//! initiator name and CHAP secrets and runs `sanboot iscsi:SERVER::::TARGET
//! || goto next` over the servers. iPXE logs in to the device's target,
//! hooks the disk into the BIOS as INT13 drive 0x80 and writes the iBFT;
//! the disk's own MBR and syslinux load a Linux kernel and initramfs from
//! it; the initramfs takes the disk over from the iBFT with Debian's
//! open-iscsi (`iscsistart -b`), as Windows' initiator would, mounts its
//! root partition from it, writes and reads a file and powers off
//! (tests/guest/build-sanboot.sh, sanboot-init.sh).
//!
//! ```text
//!   SeaBIOS -> iPXE ROM -DHCP/ProxyDHCP-> script (HTTP) -> sanboot (iSCSI login, CHAP)
//!     -> INT13 0x80 + iBFT -> mbr.bin -> syslinux -> vmlinuz + initrd (read by INT13)
//!     -> iscsi_ibft + iscsistart -N/-b (a second login) -> /dev/sda2 as root
//! ```
//!
//! The vDisk is Standard (a server-side write cache per device): the
//! failover run needs a verified replica on both servers, and a Private
//! vDisk has one writable home only, so its script lists one portal. It is
//! also how a farm runs a Windows golden image.
//!
//! Then again with the first server the script lists unreachable on iSCSI,
//! so `|| goto next` has to move iPXE to the second: the server's portal
//! answers TCP resets (an nft rule in its namespace) while it stays in the
//! farm. That is what a server that died after handing out the script looks
//! like; a server stopped for good leaves the farm's view within 3 s
//! (`LIVE_TTL`), and the scripts after that do not list it at all, so a
//! stopped process cannot make the script try it on purpose.
//!
//! Last, the same by UEFI: OVMF's own PXE fetches `snponly.efi` from
//! vstream's TFTP, iPXE's EFI sanboot runs the disk's
//! `\EFI\BOOT\BOOTX64.EFI` (syslinux.efi) and puts the iBFT in an ACPI
//! table, where Linux's iscsi_ibft finds it.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::pxe::{pxe_boot, Firmware, Lan};
use common::{TestEtcd, TestServer};

const MAC: &str = "52:54:00:77:05:01";

fn have_tools() -> bool {
    if !(common::pxe::have_netboot_tools(&[Firmware::BiosIpxeRom, Firmware::Uefi])
        && ["etcd", "nft", "syslinux", "mcopy", "mkfs.vfat", "sfdisk"]
            .iter()
            .all(|t| common::have(t)))
    {
        return false;
    }
    common::fetch_kernel_finds(&["--find-deb", "open-iscsi"])
}

/// The guest kit with the sanboot disk (tests/guest/build-sanboot.sh).
fn sanboot_kit() -> PathBuf {
    let kit = common::guest_kit();
    let script = common::repo().join("tests/guest/build-sanboot.sh");
    common::run(
        "bash",
        &[script.to_str().expect("path"), kit.to_str().expect("path")],
    );
    kit
}

struct Farm {
    lan: Lan,
    _etcd: TestEtcd,
    servers: Vec<TestServer>,
    /// The servers' addresses on the LAN, s1's first.
    ips: Vec<String>,
    _dir: tempfile::TempDir,
}

/// Two servers on hosts of their own, with ProxyDHCP, TFTP and an iSCSI
/// portal on :3260; the sanboot disk imported as Standard vDisk `win` with
/// `--boot sanboot`, replicated and verified on both, and device pc1.
fn farm(kit: &Path) -> Farm {
    let mut lan = Lan::create();
    let etcd = TestEtcd::start_on(&[&format!("{}.253", lan.net)]).expect("etcd");
    let farm_url = format!("etcd://{}.253:{}", lan.net, etcd.port());
    let dir = tempfile::tempdir().expect("tempdir");
    let ips: Vec<String> = (1..=2).map(|n| format!("{}.{n}", lan.net)).collect();
    let servers: Vec<TestServer> = (1..=2u8)
        .map(|n| {
            let name = format!("s{n}");
            let ip = &ips[n as usize - 1];
            let flags = ["--farm", &farm_url, "--name", &name, "--iscsi", ip];
            common::pxe::server_on_lan(&mut lan, n, dir.path().join(&name), &flags)
        })
        .collect();
    let s1 = &servers[0];
    let disk = kit.join("sanboot-disk.img");
    s1.cli_ok(&["vdisk", "import", "win", disk.to_str().expect("path")]);
    s1.cli_ok(&[
        "vdisk", "set", "win", "--mode", "standard", "--boot", "sanboot",
    ]);
    s1.cli_ok(&["device", "add", "pc1", "--mac", MAC, "--vdisk", "win"]);
    for s in &servers {
        common::wait_farm_ready(s, 2);
        common::wait_for(10, "the iSCSI portal", || {
            s.log_text().contains("iSCSI listening").then_some(())
        });
    }
    Farm {
        lan,
        _etcd: etcd,
        servers,
        ips,
        _dir: dir,
    }
}

/// What `device show pc1 --secrets --json` says: initiator name, target
/// name, CHAP secret.
fn access(s: &TestServer) -> (String, String, String) {
    let out = s.cli_ok(&["device", "show", "pc1", "--secrets", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let field = |k: &str| {
        v[k].as_str()
            .unwrap_or_else(|| panic!("{k}: {v}"))
            .to_owned()
    };
    (field("initiator"), field("target"), field("chap_secret"))
}

/// One boot: the console, and the seconds from QEMU's start to iPXE
/// running, the initramfs running (kernel and initrd read from the iSCSI
/// disk through INT13), the root mounted and GUEST-OK.
struct Boot {
    console: String,
    ipxe: f64,
    initrd: f64,
    root: f64,
    ok: f64,
}

fn boot(farm: &Farm, tap: &str, firmware: Firmware) -> Boot {
    let console_file = farm.lan.dir.path().join(format!("{tap}.console"));
    let _ = std::fs::remove_file(&console_file);
    let (console, seen, ok) = std::thread::scope(|sc| {
        let lan = &farm.lan;
        let start = Instant::now();
        let vm = sc.spawn(move || pxe_boot(lan, tap, MAC, firmware, Duration::from_secs(300)));
        let mut ok = None;
        while !vm.is_finished() {
            if ok.is_none()
                && std::fs::read_to_string(&console_file)
                    .unwrap_or_default()
                    .contains("GUEST-OK")
            {
                ok = Some(start.elapsed().as_secs_f64());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let (console, seen) = vm.join().expect("boot thread");
        (console, seen, ok)
    });
    let logs: String = farm
        .servers
        .iter()
        .map(|s| format!("--- {}\n{}", s.log.display(), s.log_text()))
        .collect();
    let done = console.contains("GUEST-OK write sanboot")
        && console.contains("GUEST-READDISK /dev/sda2 OK")
        && !console.contains("GUEST-ERROR");
    assert!(
        done,
        "the guest did not sanboot, write and read:\n{console}\n--- dnsmasq\n{}\n{logs}",
        farm.lan.dnsmasq_log()
    );
    // The boot's story, for the CI log: the script, iPXE's SAN lines, the guest's.
    for l in console.lines().filter(|l| {
        [
            "GUEST-",
            "vstream: ",
            "Could not open SAN",
            "Registered SAN",
            "iscsistart: ",
        ]
        .iter()
        .any(|p| l.starts_with(p))
    }) {
        eprintln!("  {l}");
    }
    let at =
        |i: usize, what: &str| seen[i].unwrap_or_else(|| panic!("{what} not seen:\n{console}"));
    Boot {
        ipxe: at(0, "iPXE"),
        initrd: at(1, "GUEST-INITRD"),
        root: at(3, "GUEST-BOOTED"),
        ok: ok.unwrap_or_else(|| panic!("GUEST-OK not seen while QEMU ran:\n{console}")),
        console,
    }
}

/// The portals of the last sanboot script any server handed pc1, in order.
fn last_script_portals(farm: &Farm) -> Vec<String> {
    let mut last: Option<(String, String)> = None;
    for s in &farm.servers {
        for line in s.log_text().lines() {
            if line.contains("boot script") && line.contains("device=pc1") {
                let portals = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("portals="))
                    .unwrap_or_default()
                    .to_owned();
                // Log lines start with an RFC 3339 time: the latest wins.
                let time = line
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                if last.as_ref().is_none_or(|(t, _)| time >= *t) {
                    last = Some((time, portals));
                }
            }
        }
    }
    let (_, portals) = last.expect("no sanboot script served to pc1");
    portals.split(',').map(str::to_owned).collect()
}

/// The iSCSI logins of pc1's initiator a server logged (iPXE's, then
/// iscsistart's).
fn logins(s: &TestServer, initiator: &str) -> usize {
    s.log_text()
        .lines()
        .filter(|l| l.contains("iSCSI login") && l.contains(initiator) && !l.contains("refused"))
        .count()
}

/// The checks every boot shares: the initramfs found the iBFT iPXE wrote
/// for pc1 (its initiator name, its target, CHAP, the portal it landed on),
/// logged in from it, and its root is the iSCSI disk; no secret shown.
fn check_ibft(farm: &Farm, b: &Boot, portal: &str) {
    let (initiator, target, secret) = access(&farm.servers[0]);
    let c = &b.console;
    let ibft = format!(
        "GUEST-IBFT initiator={initiator} target={target} portal={portal} mac={MAC} chap=yes"
    );
    assert!(c.contains(&ibft), "no {ibft:?} in:\n{c}");
    let iscsi = format!("target={target} portal={portal} disk=sda");
    assert!(
        c.lines()
            .any(|l| l.starts_with("GUEST-ISCSI session=") && l.ends_with(&iscsi)),
        "no GUEST-ISCSI ... {iscsi:?} in:\n{c}"
    );
    let root = format!("GUEST-ROOT /dev/sda2 on iSCSI target {target}");
    assert!(c.contains(&root), "no {root:?} in:\n{c}");
    assert!(
        c.contains("vstream: device pc1"),
        "no sanboot script ran:\n{c}"
    );
    assert!(!c.contains(&secret), "the CHAP secret on the console");
    for s in &farm.servers {
        assert!(!s.log_text().contains(&secret), "the CHAP secret in a log");
    }
}

/// Ends the sessions of the last boot (the guest powered off without a
/// logout) by asking for a script, as a new boot does, and waits until no
/// server carries the device; then the next script's order is the one the
/// guest gets. The index of the server that order lists first.
fn settle(farm: &Farm) -> usize {
    let script = || {
        common::run(
            "curl",
            &[
                "-sf",
                &format!("{}/boot/ipxe?mac={MAC}", farm.servers[0].api),
            ],
        )
    };
    script();
    common::wait_for(30, "the last boot's sessions ended", || {
        let s1 = &farm.servers[0];
        let dev: serde_json::Value =
            serde_json::from_str(&s1.cli_ok(&["device", "show", "pc1", "--json"])).ok()?;
        let list: serde_json::Value =
            serde_json::from_str(&s1.cli_ok(&["server", "list", "--json"])).ok()?;
        let idle = list.as_array()?.iter().all(|s| s["devices"] == 0);
        (dev["connected"] != true && idle).then_some(())
    });
    let script = script();
    let first = script
        .lines()
        .find_map(|l| l.strip_prefix("sanboot iscsi:"))
        .and_then(|l| l.split("::").next())
        .unwrap_or_else(|| panic!("no sanboot line in:\n{script}"))
        .to_owned();
    farm.ips
        .iter()
        .position(|ip| *ip == first)
        .expect("a server's address")
}

#[test]
fn a_guest_sanboots_linux_over_iscsi_by_bios_past_a_dead_portal_and_by_uefi() {
    if !have_tools() {
        return;
    }
    let kit = sanboot_kit();
    let farm = farm(&kit);
    let tap = farm.lan.tap(1);
    let (initiator, ..) = access(&farm.servers[0]);

    // Boot 1: both servers up; iPXE lands on the first portal listed.
    let b = boot(&farm, &tap, Firmware::BiosIpxeRom);
    let portals = last_script_portals(&farm);
    let want: Vec<String> = farm.ips.iter().map(|ip| format!("{ip}:3260")).collect();
    assert_eq!(
        {
            let mut p = portals.clone();
            p.sort();
            p
        },
        want,
        "the script does not list both servers' portals"
    );
    check_ibft(&farm, &b, &portals[0]);
    let first = farm
        .ips
        .iter()
        .position(|ip| portals[0].starts_with(&format!("{ip}:")))
        .expect("a server's portal");
    // iPXE's login and iscsistart's, both on the first server.
    assert!(
        logins(&farm.servers[first], &initiator) >= 2,
        "{}",
        farm.servers[first].log_text()
    );
    println!(
        "BENCH sanboot (BIOS, iPXE ROM, 2 servers up): iPXE running {:.1} s, initramfs running {:.1} s, root mounted {:.1} s, GUEST-OK {:.1} s after QEMU started",
        b.ipxe, b.initrd, b.root, b.ok
    );

    // Boot 2: the portal the script lists first refuses every connection, as
    // a server that died after handing out the script; iPXE goes on to the
    // next, and Linux takes over from there.
    let before: Vec<usize> = farm.servers.iter().map(|s| logins(s, &initiator)).collect();
    let dead = settle(&farm);
    let alive = 1 - dead;
    let tag = farm
        .lan
        .ns
        .strip_suffix("lan")
        .expect("the LAN's namespace");
    let ns = format!("{tag}s{}", dead + 1);
    common::sh(&format!(
        "ip netns exec {ns} sh -c 'nft add table inet vstest && nft \"add chain inet vstest input {{ type filter hook input priority 0 ; }}\" && nft add rule inet vstest input tcp dport 3260 reject with tcp reset'"
    ));
    let b = boot(&farm, &tap, Firmware::BiosIpxeRom);
    let portals = last_script_portals(&farm);
    assert_eq!(
        portals[0],
        format!("{}:3260", farm.ips[dead]),
        "the guest's script did not list the blocked server first"
    );
    let landed = format!("{}:3260", farm.ips[alive]);
    check_ibft(&farm, &b, &landed);
    assert!(
        b.console
            .contains(&format!("vstream: sanboot from {}", portals[0]))
            && b.console
                .contains(&format!("vstream: sanboot from {landed}")),
        "iPXE did not try the first portal, then the second:\n{}",
        b.console
    );
    // The second portal served it at once: no redirection back to the dead
    // one, which made iPXE give up and wait 10 s for a new script.
    assert!(
        !b.console.contains("no server of the farm could sanboot"),
        "iPXE went round the script again:\n{}",
        b.console
    );
    assert_eq!(
        farm.servers[alive].metric("vstream_iscsi_redirects_total"),
        0,
        "{}",
        farm.servers[alive].log_text()
    );
    let after: Vec<usize> = farm.servers.iter().map(|s| logins(s, &initiator)).collect();
    assert_eq!(
        after[dead], before[dead],
        "a login reached the blocked server"
    );
    assert!(
        after[alive] >= before[alive] + 2,
        "the session did not land on the second server:\n{}",
        farm.servers[alive].log_text()
    );
    println!(
        "BENCH sanboot (BIOS, first portal dead, goto next): iPXE running {:.1} s, initramfs running {:.1} s, root mounted {:.1} s, GUEST-OK {:.1} s after QEMU started",
        b.ipxe, b.initrd, b.root, b.ok
    );

    // Boot 3, UEFI: OVMF's own PXE fetches snponly.efi from vstream's TFTP,
    // iPXE's EFI sanboot runs the disk's \EFI\BOOT\BOOTX64.EFI (syslinux.efi)
    // and puts the iBFT in an ACPI table, where Linux finds it.
    common::sh(&format!("ip netns exec {ns} nft delete table inet vstest"));
    let tftp: usize = farm
        .servers
        .iter()
        .map(|s| s.metric("vstream_tftp_transfers_total") as usize)
        .sum();
    let first = settle(&farm);
    let b = boot(&farm, &tap, Firmware::Uefi);
    let portals = last_script_portals(&farm);
    assert_eq!(portals[0], format!("{}:3260", farm.ips[first]));
    check_ibft(&farm, &b, &portals[0]);
    let tftp_after: usize = farm
        .servers
        .iter()
        .map(|s| s.metric("vstream_tftp_transfers_total") as usize)
        .sum();
    assert!(
        tftp_after > tftp,
        "no TFTP transfer of iPXE for the UEFI boot"
    );
    println!(
        "BENCH sanboot (UEFI, PXE and TFTP of snponly.efi, 2 servers up): iPXE running {:.1} s, initramfs running {:.1} s, root mounted {:.1} s, GUEST-OK {:.1} s after QEMU started",
        b.ipxe, b.initrd, b.root, b.ok
    );
}
