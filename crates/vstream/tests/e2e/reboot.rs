//! A Standard-mode device starts every boot clean, whatever way it went down
//! (issue 16). Real QEMU guests PXE-boot from a server on a LAN of network
//! namespaces (common/pxe.rs), write a file on a Standard-mode vDisk and
//! power off with `poweroff -f`: no NBD disconnect, no FIN, as a machine
//! that loses power. They boot again and must not find the file. Through
//! the agent's `--attach` with the server's write cache, the agent with the
//! device's own (RAM) cache, and Debian's `nbd-client` (the kernel's NBD
//! client, `vstream.client=nbd-client`) with the server's cache; and
//! `nbd-client` on a guest that boots its kernel without PXE, as from a
//! local disk, so that no boot script request marks its boots: only the
//! boot token the initramfs sends at login (the kernel's boot_id) does.
//!
//! The server runs without TCP keepalive, so a dead device's connection
//! stays ESTABLISHED for the whole test: only the new boot itself can end
//! the old session. After the second boot, one connection from the device
//! is left on the server, and its session is the new boot's.

use crate::common;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::pxe::{boot_vm, Firmware, Lan};
use common::TestServer;

/// iPXE in the NIC's ROM: no TFTP, the quickest PXE boot.
const FIRMWARE: Firmware = Firmware::BiosIpxeRom;
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

struct Case {
    what: &'static str,
    device: &'static str,
    mac: &'static str,
    vdisk: &'static str,
    /// Kernel command-line words for the client.
    client: &'static str,
    /// PXE (the boot script gives the kernel), or the kernel given to QEMU.
    pxe: bool,
}

const CASES: [Case; 4] = [
    Case {
        what: "the agent (--attach), the server's write cache",
        device: "ra",
        mac: "52:54:00:78:00:01",
        vdisk: "server-cache",
        client: "vstream.client=agent vstream.cache=ram:256MiB",
        pxe: true,
    },
    Case {
        what: "the agent (--attach), the device's RAM cache",
        device: "rb",
        mac: "52:54:00:78:00:02",
        vdisk: "device-cache",
        client: "vstream.client=agent vstream.cache=ram:256MiB",
        pxe: true,
    },
    Case {
        what: "Debian's nbd-client, the server's write cache",
        device: "rc",
        mac: "52:54:00:78:00:03",
        vdisk: "server-cache",
        client: "vstream.client=nbd-client",
        pxe: true,
    },
    Case {
        what: "Debian's nbd-client, the server's write cache, a kernel booted without PXE",
        device: "rd",
        mac: "52:54:00:78:00:04",
        vdisk: "server-cache",
        client: "vstream.client=nbd-client",
        pxe: false,
    },
];

#[test]
fn a_standard_device_starts_every_boot_clean_after_a_power_off() {
    if !common::pxe::have_netboot_tools(&[FIRMWARE]) || !common::have("ss") {
        return;
    }
    let kit = common::netboot_kit();
    let mut lan = Lan::create();
    let dir = tempfile::tempdir().expect("tempdir");
    // No keepalive: a vanished device's connection is never found dead.
    let server = common::pxe::server_on_lan(
        &mut lan,
        1,
        dir.path().join("s1"),
        &["--tcp-keepalive-secs", "0", "--tcp-user-timeout-secs", "0"],
    );
    for (vdisk, cache) in [("server-cache", "server"), ("device-cache", "device")] {
        common::pxe::netboot_vdisk(
            &server,
            &kit,
            vdisk,
            &["--mode", "standard", "--cache-type", cache],
        );
    }
    for c in &CASES {
        server.cli_ok(&[
            "device", "add", c.device, "--mac", c.mac, "--vdisk", c.vdisk,
        ]);
    }
    let tap = lan.tap(1);

    // Every case runs, so that one report says which of them fail.
    let mut failures = vec![];
    for case in &CASES {
        let start = std::time::Instant::now();
        match reboot_case(&server, &lan, &tap, &kit, case) {
            Ok(()) => eprintln!(
                "ok: {} ({:.0} s for two boots)",
                case.what,
                start.elapsed().as_secs_f64()
            ),
            Err(e) => {
                eprintln!("FAILED: {}: {e}", case.what);
                failures.push(format!("{}: {e}", case.what));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}\n--- server log\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n"),
        server.log_text()
    );
}

/// Boots `case`'s device with `write:TOKEN`, checks it went down without a
/// word, boots it again with `read` and checks that the file is gone and
/// that only the new boot's connection and session are left.
fn reboot_case(
    server: &TestServer,
    lan: &Lan,
    tap: &str,
    kit: &Path,
    case: &Case,
) -> Result<(), String> {
    let token = format!("before-power-off-{}", case.device);
    let console = boot(server, lan, tap, kit, case, &format!("write:{token}"))?;
    if !console.contains(&format!("GUEST-OK write {token}")) {
        return Err(format!("the first boot did not write:\n{console}"));
    }
    // The test means something only if the guest vanished without closing
    // its connection: a client that sent NBD_CMD_DISC (or a FIN) would end
    // its session cleanly, and any server discards a cache then.
    one_connection(server, &console, "after `poweroff -f`")?;

    let read_start = now_unix();
    let console = boot(server, lan, tap, kit, case, "read")?;
    if !console.contains("GUEST-OK read") {
        return Err(format!("the second boot did not read:\n{console}"));
    }
    if !console.lines().any(|l| l == "GUEST-TOKEN NONE") {
        let seen = console
            .lines()
            .find(|l| l.starts_with("GUEST-TOKEN"))
            .unwrap_or("no GUEST-TOKEN line");
        return Err(format!(
            "the file written before the power-off survived into the next boot ({seen})"
        ));
    }
    one_connection(server, &console, "after the second boot")?;
    let show = server.cli_ok(&["device", "show", case.device, "--json"]);
    let dev: serde_json::Value =
        serde_json::from_str(&show).map_err(|e| format!("device show: {e}: {show}"))?;
    let since = dev["connected_since"].as_u64().unwrap_or(0);
    if dev["connected"] != true || since < read_start {
        return Err(format!(
            "the device's session is not the second boot's (which began at {read_start}): {show}"
        ));
    }
    Ok(())
}

/// Boots `case`'s guest for `vstest`: by PXE, with the words on its vDisk's
/// command line, or its kernel given to QEMU with them (and the server's
/// address and its MAC, which the boot script adds otherwise). Returns its
/// console.
fn boot(
    server: &TestServer,
    lan: &Lan,
    tap: &str,
    kit: &Path,
    case: &Case,
    vstest: &str,
) -> Result<String, String> {
    let words = format!(
        "console=ttyS0 panic=-1 quiet loglevel=3 rootfstype=ext4 rw vstream.timeout=120 vstest={vstest} vstest.bigmb=1 {}",
        case.client
    );
    let args = if case.pxe {
        server.cli_ok(&["vdisk", "set", case.vdisk, "--cmdline", &words]);
        FIRMWARE.qemu_args(case.mac)
    } else {
        let api = server.api.trim_start_matches("http://");
        let append = format!("{words} vstream.bootstrap={api} vstream.mac={}", case.mac);
        common::pxe::kernel_args(kit, case.mac, &append)
    };
    let (console, seen) = boot_vm(lan, tap, &args, BOOT_TIMEOUT);
    eprintln!("{} {vstest}: milestones {seen:?}", case.device);
    if console.contains("GUEST-ERROR") || seen[3].is_none() {
        return Err(format!(
            "the guest did not boot ({vstest}):\n{console}\n--- dnsmasq\n{}",
            lan.dnsmasq_log()
        ));
    }
    Ok(console)
}

/// Checks that the server holds one ESTABLISHED connection from the guest
/// whose console is `console`: the one its last boot left.
fn one_connection(server: &TestServer, console: &str, when: &str) -> Result<(), String> {
    let ip = guest_ip(console)?;
    // What the guest's last requests were is settled by now.
    std::thread::sleep(Duration::from_millis(500));
    match connections_from(server, &ip) {
        1 => Ok(()),
        n => Err(format!(
            "{when} the server holds {n} connections from {ip}, not the 1 a vanished device leaves"
        )),
    }
}

/// The guest's address, from the initramfs' `network: eth0 is A.B.C.D/24`.
fn guest_ip(console: &str) -> Result<String, String> {
    console
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix("vstream: network: ")?;
            let addr = rest.split(" is ").nth(1)?;
            Some(addr.split('/').next()?.trim().to_owned())
        })
        .ok_or_else(|| format!("no `vstream: network: IFACE is ADDR` line:\n{console}"))
}

/// ESTABLISHED connections from `ip` to the server's NBD port, as the
/// server's kernel sees them.
fn connections_from(server: &TestServer, ip: &str) -> usize {
    let (cmd, wrap) = server.wrap.split_first().expect("a server in a namespace");
    let filter = format!("( sport = :{} )", server.nbd_port);
    let mut args: Vec<&str> = wrap.iter().map(String::as_str).collect();
    args.extend(["ss", "-Htn", "state", "established", &filter]);
    common::run(cmd, &args)
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(3)
                .and_then(|peer| peer.rsplit_once(':'))
                .is_some_and(|(addr, _)| {
                    addr.trim_start_matches("[::ffff:").trim_end_matches(']') == ip
                })
        })
        .count()
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
