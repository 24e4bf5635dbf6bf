//! The iPXE bootstrap script a server hands a device at `/boot/ipxe`.
//!
//! The script names every live server of the farm, this one first, and tries
//! each in turn for the kernel and initrd, so one dead server never stops a
//! boot. The kernel command line carries the whole list (not capped at 4, as
//! PVS's bootstrap is) for `vstream target` to log in through.

use std::fmt::Write;

/// What a device boots.
pub struct BootScript<'a> {
    pub device: &'a str,
    /// Lowercase, colon-separated.
    pub mac: &'a str,
    pub vdisk: &'a str,
    /// The servers' HTTP base URLs (`http://HOST:PORT`), in the order to try.
    pub servers: &'a [String],
    /// Where the device logs in (`vstream.bootstrap=`), in the order to
    /// try: `http://HOST:PORT` becomes `HOST:PORT`; an `https://` URL (a
    /// farm with TLS) stays whole.
    pub login: &'a [String],
    /// Kernel command line words from the vDisk's boot settings.
    pub cmdline: &'a str,
    pub has_initrd: bool,
    /// This boot's identity (`vstream.boot=`): the agent, or the initramfs
    /// for a plain NBD client, names it, so servers tell this boot from the
    /// last. Letters, digits and `-` only.
    pub boot: &'a str,
    /// A one-time enrollment token (`vstream.enroll=`) the agent trades
    /// for its certificate, or empty. Letters and digits only.
    pub enroll: &'a str,
}

/// The form of a MAC in a URL path: `52-54-00-12-34-56`.
pub fn mac_in_path(mac: &str) -> String {
    mac.replace(':', "-")
}

/// `HOST:PORT` of a base URL, as `vstream target --bootstrap` takes it.
pub fn host_port(base: &str) -> &str {
    let s = base
        .strip_prefix("http://")
        .or_else(|| base.strip_prefix("https://"))
        .unwrap_or(base);
    s.trim_end_matches('/')
}

/// Makes admin-supplied text safe on one script line: iPXE would expand
/// `${...}` settings and a line break would start a new command.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .replace("${", "$ {")
}

impl BootScript<'_> {
    /// The kernel command line the device boots with.
    pub fn kernel_args(&self) -> String {
        let bootstrap: Vec<&str> = self
            .login
            .iter()
            .map(|s| match s.starts_with("https://") {
                true => s.trim_end_matches('/'),
                false => host_port(s),
            })
            .collect();
        let mut args = String::new();
        if self.has_initrd {
            // UEFI iPXE hands the kernel its initrd only when named here.
            args.push_str("initrd=initrd ");
        }
        let cmdline = one_line(self.cmdline);
        if !cmdline.trim().is_empty() {
            args.push_str(cmdline.trim());
            args.push(' ');
        }
        let _ = write!(
            args,
            "vstream.bootstrap={} vstream.mac={}",
            bootstrap.join(","),
            self.mac
        );
        if !self.boot.is_empty() {
            let _ = write!(args, " vstream.boot={}", one_line(self.boot));
        }
        if !self.enroll.is_empty() {
            let _ = write!(args, " vstream.enroll={}", one_line(self.enroll));
        }
        args
    }

    /// The script: each server in turn, then a retry of the whole list.
    pub fn render(&self) -> String {
        let mut s = String::from("#!ipxe\n");
        let _ = writeln!(
            s,
            "echo vstream: device {} ({}) boots vDisk {} from {} server(s)",
            one_line(self.device),
            self.mac,
            one_line(self.vdisk),
            self.servers.len()
        );
        let path = mac_in_path(self.mac);
        let args = self.kernel_args();
        for (i, base) in self.servers.iter().enumerate() {
            let base = base.trim_end_matches('/');
            let next = format!("try{}", i + 1);
            let _ = writeln!(s, ":try{i}");
            let _ = writeln!(s, "echo vstream: loading the kernel from {base}");
            s.push_str("imgfree ||\n");
            let _ = writeln!(
                s,
                "kernel --name kernel {base}/boot/{path}/kernel {args} || goto {next}"
            );
            if self.has_initrd {
                let _ = writeln!(
                    s,
                    "initrd --name initrd {base}/boot/{path}/initrd || goto {next}"
                );
            }
            let _ = writeln!(s, "boot || goto {next}");
        }
        let _ = writeln!(s, ":try{}", self.servers.len());
        s.push_str(
            "echo vstream: no server of the farm could hand out the kernel; trying again in 10 s\n",
        );
        s.push_str("sleep 10 ||\n");
        s.push_str(&self.retry());
        s
    }

    /// Asks every server for a fresh script (the farm may have changed).
    fn retry(&self) -> String {
        retry_lines(self.servers, self.mac)
    }
}

fn retry_lines(servers: &[String], mac: &str) -> String {
    let mut s = String::new();
    for base in servers {
        let _ = writeln!(
            s,
            "chain --replace --autofree {}/boot/ipxe?mac={mac} ||",
            base.trim_end_matches('/')
        );
    }
    // Every server failed even that: start over from the firmware's boot order.
    s.push_str("exit 1\n");
    s
}

/// The script for a device the farm cannot boot (an unknown MAC, a vDisk
/// without a kernel): says why on the device's console, waits, and asks
/// again, so the device boots as soon as an administrator fixes it.
pub fn refusal(why: &str, hint: &str, mac: &str, servers: &[String]) -> String {
    let mut s = String::from("#!ipxe\n");
    let _ = writeln!(s, "echo vstream: {}", one_line(why));
    if !hint.is_empty() {
        let _ = writeln!(s, "echo vstream: {}", one_line(hint));
    }
    s.push_str("echo vstream: asking again in 30 s\n");
    s.push_str("sleep 30 ||\n");
    s.push_str(&retry_lines(servers, mac));
    s
}

/// What a device sanboots: its iSCSI target over every portal that can
/// serve it, in turn. iPXE writes the iBFT from these settings, and the OS
/// (Windows' own initiator, open-iscsi's `iscsistart -b`) takes the disk
/// over from it with the same names and secrets.
pub struct SanbootScript<'a> {
    pub device: &'a str,
    /// Lowercase, colon-separated.
    pub mac: &'a str,
    pub vdisk: &'a str,
    pub initiator: &'a str,
    pub target: &'a str,
    pub chap_user: &'a str,
    pub chap_secret: &'a str,
    /// The target's own CHAP name and secret (mutual CHAP).
    pub target_user: &'a str,
    pub target_secret: &'a str,
    /// The portals (`HOST:PORT`) to try, in order.
    pub portals: &'a [String],
    /// The servers' HTTP base URLs, for asking again.
    pub servers: &'a [String],
}

/// An iPXE iSCSI root path: `iscsi:HOST:PROTOCOL:PORT:LUN:TARGET` (the
/// protocol and LUN left to their defaults, TCP and 0).
pub fn iscsi_uri(portal: &str, target: &str) -> String {
    let (host, port) = match portal.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.chars().all(|c| c.is_ascii_digit()) => (h, p),
        _ => (portal, ""),
    };
    format!("iscsi:{host}::{port}::{target}")
}

impl SanbootScript<'_> {
    /// The script: the iSCSI settings, then `sanboot` at each portal in
    /// turn, then a fresh script from the farm.
    pub fn render(&self) -> String {
        let mut s = String::from("#!ipxe\n");
        let _ = writeln!(
            s,
            "echo vstream: device {} ({}) sanboots vDisk {} over iSCSI from {} server(s)",
            one_line(self.device),
            self.mac,
            one_line(self.vdisk),
            self.portals.len()
        );
        // Every value is ours (names and generated secrets), but a `${`
        // or a line break would still be read as script: one_line keeps
        // each on its own line, unexpanded.
        for (key, value) in [
            ("initiator-iqn", self.initiator),
            ("username", self.chap_user),
            ("password", self.chap_secret),
            ("reverse-username", self.target_user),
            ("reverse-password", self.target_secret),
        ] {
            let _ = writeln!(s, "set {key} {}", one_line(value));
        }
        for (i, portal) in self.portals.iter().enumerate() {
            let _ = writeln!(s, ":san{i}");
            let _ = writeln!(s, "echo vstream: sanboot from {}", one_line(portal));
            let _ = writeln!(
                s,
                "sanboot {} || goto san{}",
                one_line(&iscsi_uri(portal, self.target)),
                i + 1
            );
        }
        let _ = writeln!(s, ":san{}", self.portals.len());
        s.push_str(
            "echo vstream: no server of the farm could sanboot this device; asking again in 10 s\n",
        );
        s.push_str("sleep 10 ||\n");
        s.push_str(&retry_lines(self.servers, self.mac));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers() -> Vec<String> {
        vec![
            "http://10.0.2.1:8080".to_owned(),
            "http://10.0.2.2:8080/".to_owned(),
        ]
    }

    #[test]
    fn the_script_tries_every_server_in_turn() {
        let servers = servers();
        let b = BootScript {
            device: "pc1",
            mac: "52:54:00:12:34:56",
            vdisk: "root",
            servers: &servers,
            login: &servers,
            cmdline: "console=ttyS0 boot=vstream",
            has_initrd: true,
            boot: "5f0e-77",
            enroll: "",
        };
        let s = b.render();
        assert!(s.starts_with("#!ipxe\n"));
        let args = "initrd=initrd console=ttyS0 boot=vstream vstream.bootstrap=10.0.2.1:8080,10.0.2.2:8080 vstream.mac=52:54:00:12:34:56 vstream.boot=5f0e-77";
        assert!(s.contains(&format!(
            "kernel --name kernel http://10.0.2.1:8080/boot/52-54-00-12-34-56/kernel {args} || goto try1\n"
        )), "{s}");
        assert!(s.contains(
            "initrd --name initrd http://10.0.2.2:8080/boot/52-54-00-12-34-56/initrd || goto try2\n"
        ));
        assert!(s.contains(":try2\n"));
        assert!(s.contains(
            "chain --replace --autofree http://10.0.2.2:8080/boot/ipxe?mac=52:54:00:12:34:56 ||\n"
        ));
        // Every goto has its label.
        for target in s.split("goto ").skip(1) {
            let label = target.split_whitespace().next().unwrap();
            assert!(s.contains(&format!(":{label}\n")), "no label {label}");
        }
    }

    #[test]
    fn without_an_initrd_the_kernel_line_does_not_name_one() {
        let servers = servers();
        let b = BootScript {
            device: "pc1",
            mac: "52:54:00:12:34:56",
            vdisk: "root",
            servers: &servers[..1],
            login: &servers[..1],
            cmdline: "",
            has_initrd: false,
            boot: "",
            enroll: "",
        };
        let s = b.render();
        assert!(!s.contains("initrd"), "{s}");
        assert_eq!(
            b.kernel_args(),
            "vstream.bootstrap=10.0.2.1:8080 vstream.mac=52:54:00:12:34:56"
        );
    }

    #[test]
    fn a_farm_with_tls_logs_in_over_https_with_a_token() {
        let servers = servers();
        let login = vec![
            "https://pvs1.example:7443/".to_owned(),
            "http://10.0.2.2:8080".to_owned(),
        ];
        let b = BootScript {
            device: "pc1",
            mac: "52:54:00:12:34:56",
            vdisk: "root",
            servers: &servers,
            login: &login,
            cmdline: "",
            has_initrd: false,
            boot: "b-1",
            enroll: "00ff",
        };
        assert_eq!(
            b.kernel_args(),
            "vstream.bootstrap=https://pvs1.example:7443,10.0.2.2:8080 \
             vstream.mac=52:54:00:12:34:56 vstream.boot=b-1 vstream.enroll=00ff"
        );
        // The kernel still comes over plain HTTP (iPXE without TLS).
        assert!(b
            .render()
            .contains("kernel --name kernel http://10.0.2.1:8080/boot/"));
    }

    #[test]
    fn admin_text_cannot_inject_script_lines() {
        let servers = servers();
        let b = BootScript {
            device: "pc1",
            mac: "52:54:00:12:34:56",
            vdisk: "root",
            servers: &servers,
            login: &servers,
            cmdline: "quiet\nshell\n${net0/ip}",
            has_initrd: false,
            boot: "",
            enroll: "",
        };
        let s = b.render();
        assert!(!s.lines().any(|l| l == "shell"), "{s}");
        assert!(!s.contains("${net0/ip}"));
        let r = refusal("unknown\ndevice", "", "52:54:00:12:34:56", &servers);
        assert!(r.contains("echo vstream: unknown device\n"), "{r}");
    }

    #[test]
    fn host_port_strips_the_scheme() {
        assert_eq!(host_port("http://10.0.0.1:80/"), "10.0.0.1:80");
        assert_eq!(host_port("10.0.0.1:80"), "10.0.0.1:80");
    }

    #[test]
    fn a_sanboot_script_sets_the_credentials_and_tries_each_portal() {
        let portals = vec!["10.0.0.1:3260".to_string(), "[fd00::2]:3261".to_string()];
        let servers = servers();
        let script = SanbootScript {
            device: "pc1",
            mac: "52:54:00:12:34:56",
            vdisk: "win10",
            initiator: "iqn.2026-12.org.vstream:mac.525400123456",
            target: "iqn.2026-12.org.vstream:device.pc1",
            chap_user: "pc1",
            chap_secret: "abcdefgh12345678",
            target_user: "iqn.2026-12.org.vstream:device.pc1",
            target_secret: "ABCDEFGH12345678",
            portals: &portals,
            servers: &servers,
        }
        .render();
        let lines: Vec<&str> = script.lines().collect();
        assert_eq!(lines[0], "#!ipxe");
        for want in [
            "set initiator-iqn iqn.2026-12.org.vstream:mac.525400123456",
            "set username pc1",
            "set password abcdefgh12345678",
            "set reverse-username iqn.2026-12.org.vstream:device.pc1",
            "set reverse-password ABCDEFGH12345678",
            "sanboot iscsi:10.0.0.1::3260::iqn.2026-12.org.vstream:device.pc1 || goto san1",
            "sanboot iscsi:[fd00::2]::3261::iqn.2026-12.org.vstream:device.pc1 || goto san2",
            ":san2",
        ] {
            assert!(lines.contains(&want), "{want:?} missing from:\n{script}");
        }
        let first = lines.iter().position(|l| l.starts_with("sanboot")).unwrap();
        let set = lines.iter().rposition(|l| l.starts_with("set ")).unwrap();
        assert!(set < first, "the settings come before the first sanboot");
        assert!(
            script.contains("/boot/ipxe?mac=52:54:00:12:34:56"),
            "{script}"
        );
        assert!(script.ends_with("exit 1\n"));
        assert_eq!(iscsi_uri("host", "t"), "iscsi:host::::t");
    }
}
