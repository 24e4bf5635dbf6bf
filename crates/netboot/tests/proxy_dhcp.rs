//! ProxyDHCP over real sockets.
//!
//! Port 67 and SO_BINDTODEVICE need root, and broadcasts need a real link, so the test
//! builds two network namespaces joined by a veth pair: the service runs in one, a
//! fake PXE client in the other. Without root, `ip` or network namespaces it is
//! skipped with a message (a failure under CI=true).

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use dhcproto::v4::{Architecture, DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};
use vstream_netboot::proxy_dhcp::{
    ProxyDhcp, ProxyDhcpConfig, ProxyDhcpStats, DHCP_CLIENT_PORT, DHCP_SERVER_PORT, PXE_PROXY_PORT,
};

const SERVER_IFACE: &str = "vsp-srv0";
const CLIENT_IFACE: &str = "vsp-cli0";
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 7, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 7, 2);
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const SCRIPT_URL: &str = "http://10.213.7.1:8080/boot/ipxe?mac={mac}";

/// Network namespaces deleted on drop (the veth pair goes with them).
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.0 {
            if let Err(e) = ip(&["netns", "del", name]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Server namespace with `SERVER_IFACE` (SERVER_IP) and a second, address-less veth
/// pair; client namespace with `CLIENT_IFACE` (CLIENT_IP). `None` after a skip
/// (not root, no `ip`, or no namespaces here), which fails the test under
/// CI=true; any later step that fails fails the test.
fn namespaces() -> Option<(Namespaces, String, String)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        vstream_testkit::skip("needs root (network namespaces, port 67)");
        return None;
    }
    if !vstream_testkit::have("ip") {
        return None;
    }
    let pid = std::process::id();
    let server = format!("vsp-s-{pid}");
    let client = format!("vsp-c-{pid}");
    let mut guard = Namespaces(Vec::new());
    for name in [&server, &client] {
        if let Err(e) = ip(&["netns", "add", name]) {
            vstream_testkit::skip(&format!("cannot make a network namespace here: {e}"));
            return None;
        }
        guard.0.push(name.clone());
    }
    // From here on a failure is the test's own, never a skip.
    let ip = |args: &[&str]| {
        if let Err(e) = ip(args) {
            panic!("{e}");
        }
    };
    let server_cidr = format!("{SERVER_IP}/24");
    let client_cidr = format!("{CLIENT_IP}/24");
    ip(&[
        "-n",
        &server,
        "link",
        "add",
        "name",
        SERVER_IFACE,
        "type",
        "veth",
        "peer",
        "name",
        CLIENT_IFACE,
        "netns",
        &client,
    ]);
    ip(&[
        "-n",
        &server,
        "link",
        "add",
        "name",
        "vsp-noip0",
        "type",
        "veth",
        "peer",
        "name",
        "vsp-noip1",
    ]);
    ip(&[
        "-n",
        &server,
        "addr",
        "add",
        &server_cidr,
        "dev",
        SERVER_IFACE,
    ]);
    ip(&[
        "-n",
        &client,
        "addr",
        "add",
        &client_cidr,
        "dev",
        CLIENT_IFACE,
    ]);
    for (ns, dev) in [
        (&server, SERVER_IFACE),
        (&server, "vsp-noip0"),
        (&server, "vsp-noip1"),
        (&server, "lo"),
        (&client, CLIENT_IFACE),
        (&client, "lo"),
    ] {
        ip(&["-n", ns, "link", "set", dev, "up"]);
    }
    Some((guard, server, client))
}

/// Moves the calling thread into network namespace `name`.
fn enter_netns(name: &str) -> io::Result<()> {
    let file = File::open(format!("/var/run/netns/{name}"))?;
    // SAFETY: `file` is an open namespace descriptor; setns only affects this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn pxe_request(kind: MessageType, xid: u32, arch: u16, ipxe: bool) -> Message {
    let mut msg = Message::default();
    msg.set_xid(xid)
        .set_flags(Flags::default().set_broadcast())
        .set_chaddr(&MAC);
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    opts.insert(DhcpOption::ClassIdentifier(
        format!("PXEClient:Arch:{arch:05}:UNDI:002001").into_bytes(),
    ));
    opts.insert(DhcpOption::ClientSystemArchitecture(Architecture(arch)));
    opts.insert(DhcpOption::ClientMachineIdentifier(vec![0; 17]));
    if ipxe {
        opts.insert(DhcpOption::UserClass(b"iPXE".to_vec()));
    }
    msg
}

fn encode(msg: &Message) -> Vec<u8> {
    msg.to_vec().expect("encode")
}

/// Waits for a BOOTREPLY with transaction id `xid`, skipping anything else.
fn receive(socket: &UdpSocket, xid: u32) -> io::Result<Message> {
    let mut buf = [0u8; 1500];
    loop {
        let (len, _) = socket.recv_from(&mut buf)?;
        match Message::decode(&mut Decoder::new(&buf[..len])) {
            Ok(msg) if msg.xid() == xid && msg.opcode() == Opcode::BootReply => return Ok(msg),
            _ => continue,
        }
    }
}

fn file(msg: &Message) -> String {
    let name = msg.fname().unwrap_or_default();
    String::from_utf8_lossy(name)
        .trim_end_matches('\0')
        .to_owned()
}

/// The fake PXE client, in the client namespace.
fn client(client_ns: &str) -> Result<(), String> {
    enter_netns(client_ns).map_err(|e| format!("entering {client_ns}: {e}"))?;
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, DHCP_CLIENT_PORT))
        .map_err(|e| format!("client bind: {e}"))?;
    socket.set_broadcast(true).map_err(|e| e.to_string())?;
    // Limited broadcast needs an outgoing interface: there is no default route.
    // SAFETY: the pointer and length describe CLIENT_IFACE's bytes.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            CLIENT_IFACE.as_ptr().cast(),
            CLIENT_IFACE.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(format!("SO_BINDTODEVICE: {}", io::Error::last_os_error()));
    }
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let broadcast = SocketAddrV4::new(Ipv4Addr::BROADCAST, DHCP_SERVER_PORT);
    let proxy = SocketAddrV4::new(SERVER_IP, PXE_PROXY_PORT);

    // Firmware (UEFI x64) DHCPDISCOVER -> broadcast proxy offer.
    socket
        .send_to(
            &encode(&pxe_request(MessageType::Discover, 0x1001, 7, false)),
            broadcast,
        )
        .map_err(|e| format!("sending DISCOVER: {e}"))?;
    let offer = receive(&socket, 0x1001).map_err(|e| format!("waiting for OFFER: {e}"))?;
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(offer.chaddr(), MAC);
    assert_eq!(offer.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(offer.siaddr(), SERVER_IP);
    assert_eq!(file(&offer), "snponly.efi");
    assert_eq!(
        offer.opts().get(OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(SERVER_IP))
    );
    assert_eq!(
        offer.opts().get(OptionCode::VendorExtensions),
        Some(&DhcpOption::VendorExtensions(vec![6, 1, 8, 255]))
    );

    // Now with an address: unicast ProxyDHCP request to 4011 -> ACK to our port.
    let mut request = pxe_request(MessageType::Request, 0x1002, 7, false);
    request.set_ciaddr(CLIENT_IP).set_flags(Flags::default());
    socket
        .send_to(&encode(&request), proxy)
        .map_err(|e| format!("sending REQUEST to 4011: {e}"))?;
    let ack = receive(&socket, 0x1002).map_err(|e| format!("waiting for ACK: {e}"))?;
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.siaddr(), SERVER_IP);
    assert_eq!(file(&ack), "snponly.efi");

    // iPXE gets its script, with its MAC.
    socket
        .send_to(
            &encode(&pxe_request(MessageType::Discover, 0x1003, 0, true)),
            broadcast,
        )
        .map_err(|e| format!("sending iPXE DISCOVER: {e}"))?;
    let offer = receive(&socket, 0x1003).map_err(|e| format!("waiting for iPXE OFFER: {e}"))?;
    assert_eq!(
        file(&offer),
        "http://10.213.7.1:8080/boot/ipxe?mac=52:54:00:12:34:56"
    );

    // Silence: a non-PXE DISCOVER, and a PXE DHCPREQUEST meant for the DHCP server.
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    let mut plain = pxe_request(MessageType::Discover, 0x1004, 0, false);
    plain
        .opts_mut()
        .insert(DhcpOption::ClassIdentifier(b"MSFT 5.0".to_vec()));
    socket
        .send_to(&encode(&plain), broadcast)
        .map_err(|e| format!("sending non-PXE DISCOVER: {e}"))?;
    let mut no_class = pxe_request(MessageType::Discover, 0x1005, 0, false);
    no_class.opts_mut().remove(OptionCode::ClassIdentifier);
    socket
        .send_to(&encode(&no_class), broadcast)
        .map_err(|e| format!("sending DISCOVER without option 60: {e}"))?;
    socket
        .send_to(
            &encode(&pxe_request(MessageType::Request, 0x1006, 0, false)),
            broadcast,
        )
        .map_err(|e| format!("sending REQUEST to 67: {e}"))?;
    // Garbage must not stop the service either.
    socket
        .send_to(b"not a DHCP packet", broadcast)
        .map_err(|e| format!("sending garbage: {e}"))?;
    let mut buf = [0u8; 1500];
    match socket.recv_from(&mut buf) {
        Ok((len, from)) => {
            return Err(format!(
                "unexpected {len}-byte reply from {from} to a request that must be ignored"
            ))
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) => {}
        Err(e) => return Err(format!("receiving: {e}")),
    }

    // Still answering after all that.
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    socket
        .send_to(
            &encode(&pxe_request(MessageType::Discover, 0x1007, 0, false)),
            broadcast,
        )
        .map_err(|e| format!("sending BIOS DISCOVER: {e}"))?;
    let offer = receive(&socket, 0x1007).map_err(|e| format!("waiting for BIOS OFFER: {e}"))?;
    assert_eq!(file(&offer), "undionly.kpxe");
    Ok(())
}

type Started = Result<(Ipv4Addr, std::sync::Arc<ProxyDhcpStats>), String>;

/// The service, in the server namespace, until `shutdown` turns true.
fn server(
    server_ns: &str,
    started: mpsc::Sender<Started>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let run = || -> Result<_, String> {
        enter_netns(server_ns).map_err(|e| format!("entering {server_ns}: {e}"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let service = runtime.block_on(async {
            // Clear errors for a missing interface and one without an address.
            let missing = ProxyDhcp::bind(ProxyDhcpConfig::new("vsp-missing0", SCRIPT_URL))
                .await
                .expect_err("missing interface");
            assert_eq!(missing.kind(), io::ErrorKind::NotFound);
            assert!(missing
                .to_string()
                .contains("\"vsp-missing0\" does not exist"));
            let no_ip = ProxyDhcp::bind(ProxyDhcpConfig::new("vsp-noip0", SCRIPT_URL))
                .await
                .expect_err("interface without IPv4");
            assert!(
                no_ip
                    .to_string()
                    .contains("\"vsp-noip0\" has no IPv4 address"),
                "{no_ip}"
            );

            ProxyDhcp::bind(ProxyDhcpConfig::new(SERVER_IFACE, SCRIPT_URL))
                .await
                .map_err(|e| e.to_string())
        })?;
        Ok((runtime, service))
    };
    match run() {
        Ok((runtime, service)) => {
            let _ = started.send(Ok((service.server_ip(), service.stats())));
            runtime.block_on(service.run(shutdown));
        }
        Err(e) => {
            let _ = started.send(Err(e));
        }
    }
}

#[test]
fn proxy_dhcp_answers_pxe_clients_over_a_veth_pair() {
    let Some((_namespaces, server_ns, client_ns)) = namespaces() else {
        return;
    };
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let (started_tx, started_rx) = mpsc::channel();
    let server_thread = thread::spawn(move || server(&server_ns, started_tx, shutdown_rx));
    let (server_ip, stats) = started_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("server thread reports")
        .expect("server binds");
    assert_eq!(server_ip, SERVER_IP, "address taken from the interface");

    let result = thread::spawn(move || client(&client_ns)).join();

    // Stop the server before looking at the client's result, so that a failed
    // assertion does not leave it running.
    shutdown_tx.send(true).expect("server still running");
    server_thread.join().expect("server thread");
    result.expect("client thread").expect("client exchange");
    assert_eq!(stats.offers.load(Ordering::Relaxed), 3);
    assert_eq!(stats.acks.load(Ordering::Relaxed), 1);
    assert_eq!(stats.ignored.load(Ordering::Relaxed), 4);
}

#[test]
fn bind_names_a_missing_interface() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let err = runtime
        .block_on(ProxyDhcp::bind(ProxyDhcpConfig::new(
            "vsp-nonexistent",
            SCRIPT_URL,
        )))
        .expect_err("no such interface");
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
    assert!(err.to_string().contains("vsp-nonexistent"), "{err}");
}
