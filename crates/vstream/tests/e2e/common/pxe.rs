//! Network boot on a LAN made of network namespaces, for the tests that
//! PXE-boot real QEMU guests (netboot.rs, reboot.rs): a bridge with a DHCP
//! server that gives addresses only, servers on hosts of their own with
//! vstream's ProxyDHCP and TFTP (10.X.200.N), the host itself at
//! 10.X.200.253, and taps for the VMs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::{have, sh, skip, TestServer};

pub const OVMF: &str = "/usr/share/ovmf/OVMF.fd";
/// QEMU's virtio-net option ROM, which is iPXE (Debian's ipxe-qemu).
pub const VIRTIO_ROM: &str = "/usr/lib/ipxe/qemu/efi-virtio.rom";

/// A LAN: a bridge in a namespace of its own, the host joined to it, a
/// DHCP server on it that gives addresses and nothing else, and namespaces
/// for servers and a tap for a VM plugged in. Removed on drop.
pub struct Lan {
    tag: String,
    /// `10.X.200`
    pub net: String,
    /// The LAN's own namespace (the bridge, dnsmasq, the taps).
    pub ns: String,
    namespaces: Vec<String>,
    dnsmasq: Option<Child>,
    /// dnsmasq's log and lease file, the guests' consoles.
    pub dir: tempfile::TempDir,
}

impl Lan {
    pub fn create() -> Lan {
        // Several LANs in one test process stay apart by a counter.
        static LANS: AtomicU32 = AtomicU32::new(0);
        let n = LANS.fetch_add(1, Ordering::Relaxed) % 50;
        let pid = std::process::id();
        let tag = format!("vb{}{n}", pid % 10_000);
        let net = format!("10.{}.{}", 100 + (pid % 150), 200 + n);
        let ns = format!("{tag}lan");
        let mut lan = Lan {
            tag: tag.clone(),
            net: net.clone(),
            ns: ns.clone(),
            namespaces: vec![],
            dnsmasq: None,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &format!("{tag}h")])
            .output();
        sh(&format!("ip netns add {ns}"));
        lan.namespaces.push(ns.clone());
        // An IPv6 prefix too: iPXE waits ~13 s for a router advertisement
        // that never comes otherwise (dnsmasq sends them).
        sh(&format!(
            "ip netns exec {ns} sh -c 'ip link set lo up && ip link add br0 type bridge && ip link set br0 type bridge forward_delay 0 && ip addr add {net}.254/24 dev br0 && ip -6 addr add fd00:77::254/64 dev br0 nodad && ip link set br0 up'"
        ));
        // The host's leg.
        sh(&format!(
            "ip link add {tag}h type veth peer name {tag}hp && ip link set {tag}hp netns {ns}"
        ));
        sh(&format!(
            "ip netns exec {ns} sh -c 'ip link set {tag}hp master br0 && ip link set {tag}hp up'"
        ));
        sh(&format!(
            "ip addr add {net}.253/24 dev {tag}h && ip link set {tag}h up"
        ));
        let leases = lan.dir.path().join("leases");
        let log = std::fs::File::create(lan.dir.path().join("dnsmasq.log")).expect("log");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "dnsmasq",
                "--no-daemon",
                "--conf-file=/dev/null",
            ])
            .args([
                "--port=0",
                "--interface=br0",
                "--bind-interfaces",
                "--no-ping",
            ])
            .arg(format!("--dhcp-range={net}.100,{net}.199,255.255.255.0,1h"))
            .args(["--enable-ra", "--dhcp-range=::,constructor:br0,ra-only"])
            .arg(format!("--dhcp-leasefile={}", leases.display()))
            .args(["--log-dhcp", "--log-facility=-"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning dnsmasq");
        lan.dnsmasq = Some(child);
        lan
    }

    /// A namespace for host `n` (1..99) on the LAN at `10.X.200.n`, its
    /// interface named `lan0`; returns the namespace's name.
    pub fn host(&mut self, n: u8) -> String {
        let (tag, ns) = (&self.tag, format!("{}s{n}", self.tag));
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        sh(&format!("ip netns add {ns}"));
        self.namespaces.push(ns.clone());
        sh(&format!(
            "ip netns exec {lan} sh -c 'ip link add {tag}s{n} type veth peer name lan0 && ip link set lan0 netns {ns} && ip link set {tag}s{n} master br0 && ip link set {tag}s{n} up'",
            lan = self.ns
        ));
        sh(&format!(
            "ip netns exec {ns} sh -c 'ip link set lo up && ip addr add {net}.{n}/24 dev lan0 && ip -6 addr add fd00:77::{n}/64 dev lan0 nodad && ip link set lan0 up'",
            net = self.net
        ));
        ns
    }

    /// A tap on the bridge for a VM; returns its name.
    pub fn tap(&self, n: u8) -> String {
        let tap = format!("{}t{n}", self.tag);
        sh(&format!(
            "ip netns exec {ns} sh -c 'ip tuntap add {tap} mode tap && ip link set {tap} master br0 && ip link set {tap} up'",
            ns = self.ns
        ));
        tap
    }

    pub fn dnsmasq_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dnsmasq.log")).unwrap_or_default()
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        if let Some(mut c) = self.dnsmasq.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &format!("{}h", self.tag)])
            .output();
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// True if a guest can PXE-boot here with each of `firmwares`: the guest
/// kit's tools, network namespaces, dnsmasq and the firmware files; else a
/// skip (a failure in CI).
pub fn have_netboot_tools(firmwares: &[Firmware]) -> bool {
    if !(super::have_guest_tools() && super::have_netns() && have("dnsmasq")) {
        return false;
    }
    let mut files = vec![];
    for f in firmwares {
        match f {
            Firmware::Uefi => files.extend([OVMF, "/usr/lib/ipxe/snponly.efi"]),
            Firmware::BiosIpxeRom => files.push(VIRTIO_ROM),
        }
    }
    files.iter().all(|f| {
        let here = Path::new(f).exists();
        if !here {
            skip(&format!(
                "{f} is missing (apt-get install ovmf ipxe ipxe-qemu)"
            ));
        }
        here
    })
}

/// How a VM boots from the network.
#[derive(Clone, Copy)]
pub enum Firmware {
    /// OVMF with the NIC's option ROM removed: the firmware's own PXE asks
    /// for a boot file (snponly.efi over TFTP), which then runs iPXE.
    Uefi,
    /// SeaBIOS with QEMU's NIC ROM, which is iPXE already: it asks for its
    /// script straight away (no TFTP).
    BiosIpxeRom,
}

impl Firmware {
    pub fn qemu_args(self, mac: &str) -> Vec<String> {
        let nic = format!("virtio-net-pci,netdev=n0,mac={mac}");
        match self {
            Firmware::Uefi => vec![
                "-bios".into(),
                OVMF.into(),
                "-device".into(),
                format!("{nic},romfile="),
            ],
            Firmware::BiosIpxeRom => vec!["-device".into(), nic],
        }
    }
}

/// Console lines that mark the stages of a boot, in order: iPXE runs (from
/// TFTP), the initramfs runs (kernel and initrd fetched over HTTP), the agent
/// has attached /dev/nbd0, the root filesystem is mounted.
pub const MILESTONES: [&str; 4] = [
    "iPXE initialising",
    "GUEST-INITRD",
    "GUEST-NETBOOT attached",
    "GUEST-BOOTED",
];

/// Boots a diskless guest on `tap` in the LAN; returns its console and
/// the seconds from QEMU's start to each of [`MILESTONES`] seen.
pub fn pxe_boot(
    lan: &Lan,
    tap: &str,
    mac: &str,
    firmware: Firmware,
    timeout: Duration,
) -> (String, [Option<f64>; 4]) {
    boot_vm(lan, tap, &firmware.qemu_args(mac), timeout)
}

/// The QEMU arguments that boot the kit's kernel and network-boot initramfs
/// directly (no firmware PXE, no boot script), with the kernel command line
/// `append`, on a NIC with `mac`: a device that boots from a kernel of its
/// own, as from a local disk.
pub fn kernel_args(kit: &Path, mac: &str, append: &str) -> Vec<String> {
    // The uncompressed kernel boots through PVH: no decompression under TCG.
    let vmlinux = kit.join("vmlinux");
    let kernel = if vmlinux.exists() {
        vmlinux
    } else {
        kit.join("vmlinuz")
    };
    vec![
        "-kernel".into(),
        kernel.display().to_string(),
        "-initrd".into(),
        kit.join("netboot-initrd.img").display().to_string(),
        "-append".into(),
        append.into(),
        "-device".into(),
        format!("virtio-net-pci,netdev=n0,mac={mac},romfile="),
    ]
}

/// Runs a VM with `args` (how it boots, its NIC) on `tap` in the LAN until
/// it powers off or `timeout` passes; returns its console and the seconds
/// from QEMU's start to each of [`MILESTONES`] seen.
pub fn boot_vm(
    lan: &Lan,
    tap: &str,
    args: &[String],
    timeout: Duration,
) -> (String, [Option<f64>; 4]) {
    let console_file = lan.dir.path().join(format!("{tap}.console"));
    // A console left from an earlier boot on this tap must not count.
    let _ = std::fs::remove_file(&console_file);
    let mut child = Command::new("ip")
        .args(["netns", "exec", &lan.ns])
        .args([
            "qemu-system-x86_64",
            "-machine",
            "pc,graphics=off",
            "-accel",
            "tcg",
        ])
        .args(["-cpu", "Nehalem", "-smp", "1", "-m", "768"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args([
            "-serial",
            &format!("file:{}", console_file.display()),
            "-monitor",
            "none",
        ])
        .args(args)
        .args([
            "-netdev",
            &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning qemu");
    let start = Instant::now();
    let mut seen = [None; 4];
    loop {
        let console = std::fs::read_to_string(&console_file).unwrap_or_default();
        for (i, m) in MILESTONES.iter().enumerate() {
            if seen[i].is_none() && console.contains(m) {
                seen[i] = Some(start.elapsed().as_secs_f64());
            }
        }
        if child.try_wait().ok().flatten().is_some() {
            break;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let console = std::fs::read_to_string(&console_file)
        .unwrap_or_default()
        .replace('\r', "");
    (console, seen)
}

/// A server on host `n` of `lan`, its data in `data`, with ProxyDHCP on the
/// LAN and TFTP on its address; `extra`: more `vstream server` flags.
pub fn server_on_lan(lan: &mut Lan, n: u8, data: PathBuf, extra: &[&str]) -> TestServer {
    let ns = lan.host(n);
    let ip = format!("{}.{n}", lan.net);
    let mut flags = vec!["--tftp", &ip, "--proxy-dhcp", "lan0"];
    flags.extend_from_slice(extra);
    TestServer::start_wrapped(data, &ip, &["ip", "netns", "exec", &ns], &flags)
}

/// Imports the kit's root file system as vDisk `name`, sets it with `set`
/// (`--mode standard --cache-type server`, ...) and gives it the kit's
/// kernel and network-boot initramfs.
pub fn netboot_vdisk(server: &TestServer, kit: &Path, name: &str, set: &[&str]) {
    netboot_vdisk_with(server, kit, &kit.join("netboot-initrd.img"), name, set);
}

/// [`netboot_vdisk`] with `initrd` instead of the kit's network-boot
/// initramfs (such as a copy with the farm's CA appended).
pub fn netboot_vdisk_with(
    server: &TestServer,
    kit: &Path,
    initrd: &Path,
    name: &str,
    set: &[&str],
) {
    let rootfs = kit.join("rootfs.img");
    server.cli_ok(&["vdisk", "import", name, rootfs.to_str().expect("path")]);
    let mut args = vec!["vdisk", "set", name];
    args.extend_from_slice(set);
    server.cli_ok(&args);
    let kernel = kit.join("vmlinuz");
    server.cli_ok(&[
        "vdisk",
        "set",
        name,
        "--kernel",
        kernel.to_str().expect("path"),
        "--initrd",
        initrd.to_str().expect("path"),
    ]);
}
