//! ProxyDHCP: tells PXE clients what to boot, next to a DHCP server we do not control.
//!
//! Diskless devices usually sit on a LAN whose DHCP server belongs to someone else, so
//! (like the PXE service of Citrix PVS) we never hand out addresses. Instead we answer
//! the PXE part of the conversation, as described in PXE 2.1 and implemented by iPXE
//! and EDK2/OVMF:
//!
//! 1. The client broadcasts a DHCPDISCOVER to port 67. The real DHCP server offers an
//!    address; we send a *proxy offer* (`yiaddr` 0.0.0.0) with the next server and the
//!    boot file, broadcast to port 68.
//! 2. Once the client has its address it sends a unicast DHCPREQUEST to our port 4011
//!    (the "ProxyDHCP request") and we repeat the same information in a DHCPACK.
//!    A DHCPREQUEST on port 67 belongs to the real DHCP server and is ignored.
//!
//! What to boot depends on who is asking: firmware PXE gets the iPXE binary for its
//! architecture (option 93), and iPXE itself (user class, option 77, `iPXE`) gets the
//! URL of its HTTP bootstrap script. Anything that does not identify itself as a PXE
//! client (option 60 starting with `PXEClient`) gets no answer at all, so that ordinary
//! DHCP clients on the LAN never notice us.
//!
//! The decision is the pure function [`answer`] (or [`decide`], which also says why it
//! stayed silent); [`ProxyDhcp`] only moves packets.

use std::ffi::{CStr, CString};
use std::fmt;
use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// Port on which DHCP servers (and we) receive broadcast DHCPDISCOVERs.
pub const DHCP_SERVER_PORT: u16 = 67;
/// Port on which DHCP clients receive; proxy offers are broadcast to it.
pub const DHCP_CLIENT_PORT: u16 = 68;
/// PXE boot server port, where clients send their unicast ProxyDHCP request.
pub const PXE_PROXY_PORT: u16 = 4011;

/// Prefix of option 60 that PXE clients send, and the value we answer with.
pub const PXE_CLIENT_CLASS: &[u8] = b"PXEClient";
/// User class (option 77) sent by iPXE.
pub const IPXE_USER_CLASS: &[u8] = b"iPXE";
/// Placeholder in [`ProxyDhcpConfig::script_url`] replaced by the client's MAC.
pub const MAC_PLACEHOLDER: &str = "{mac}";

/// PXE vendor sub-option (in option 43): how the client discovers boot servers.
const PXE_DISCOVERY_CONTROL: u8 = 6;
/// PXE vendor sub-option (in option 43): the boot server type and layer a client asks for.
const PXE_BOOT_ITEM: u8 = 71;
/// Discovery control bit 3: "download the boot file named in this offer", i.e. skip
/// boot server discovery and the boot menu.
const DISCOVERY_USE_BOOT_FILE: u8 = 0b1000;

/// Length of the fixed BOOTP header up to and including the magic cookie.
const BOOTP_HEADER_LEN: usize = 240;
const DHCP_MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
/// The `file` header field is 128 bytes; we keep room for a terminating NUL.
const FILE_FIELD_MAX: usize = 127;
/// Options we read. Everything else is dropped before `dhcproto` decodes the packet:
/// its decoders `debug_assert!` on the length of a few exotic options, and hostile
/// input must not be able to panic the service (even in a debug build).
const OPTIONS_WE_READ: [u8; 10] = [43, 53, 54, 55, 57, 60, 61, 77, 93, 97];

/// Length of option 97 (client machine identifier): type 0, then a 16-byte UUID.
const CLIENT_UUID_LEN: usize = 17;

/// The client architectures we have boot files for (RFC 4578 option 93 values).
const ARCH_BIOS: u16 = 0;
const ARCH_EFI_BC: u16 = 7;
const ARCH_EFI_X64: u16 = 9;

/// Boot file names handed to firmware PXE clients, by architecture.
///
/// Firmware only gets as far as loading iPXE over TFTP; iPXE then comes back with
/// user class `iPXE` and is sent to the HTTP script instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFiles {
    /// For legacy BIOS clients (architecture 0, or no option 93 at all).
    pub bios: String,
    /// For x86-64 UEFI clients (architectures 7 and 9).
    pub uefi_x64: String,
}

impl Default for BootFiles {
    /// `undionly.kpxe` and `snponly.efi`: the iPXE builds that drive the NIC through
    /// the firmware's own network stack, so one binary works with every NIC.
    fn default() -> Self {
        Self {
            bios: "undionly.kpxe".to_owned(),
            uefi_x64: "snponly.efi".to_owned(),
        }
    }
}

/// Configuration of the ProxyDHCP service (`--proxy-dhcp IFACE`).
#[derive(Debug, Clone)]
pub struct ProxyDhcpConfig {
    /// Interface the service listens on. The sockets are bound to it, so broadcasts
    /// on other networks of a multi-homed server are neither answered nor sent to.
    pub interface: String,
    /// Address announced as next server and server identifier. `None` takes the
    /// first IPv4 address of [`interface`](Self::interface).
    pub server_ip: Option<Ipv4Addr>,
    /// URL of the iPXE bootstrap script, with [`MAC_PLACEHOLDER`] (`{mac}`) replaced by
    /// the client's MAC, e.g. `http://10.0.2.1:8080/boot/ipxe?mac={mac}`.
    pub script_url: String,
    /// Boot files for firmware PXE clients.
    pub boot_files: BootFiles,
    /// (DHCP server port, PXE port): normally ([`DHCP_SERVER_PORT`], [`PXE_PROXY_PORT`]).
    /// Proxy offers are always broadcast to [`DHCP_CLIENT_PORT`].
    pub ports: (u16, u16),
}

impl ProxyDhcpConfig {
    /// A configuration with the default boot files and ports, the server address taken
    /// from the interface.
    pub fn new(interface: impl Into<String>, script_url: impl Into<String>) -> Self {
        Self {
            interface: interface.into(),
            server_ip: None,
            script_url: script_url.into(),
            boot_files: BootFiles::default(),
            ports: (DHCP_SERVER_PORT, PXE_PROXY_PORT),
        }
    }
}

/// Everything [`answer`] needs besides the request: kept apart from the sockets so the
/// decision can be unit tested without a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerContext {
    /// Next server (`siaddr`) and server identifier (option 54).
    pub server_ip: Ipv4Addr,
    /// Script URL template for iPXE, see [`ProxyDhcpConfig::script_url`].
    pub script_url: String,
    /// Boot files for firmware PXE clients.
    pub boot_files: BootFiles,
}

/// Who sent a PXE request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// The PXE stack of the firmware (BIOS option ROM or UEFI): gets an iPXE binary.
    Firmware,
    /// iPXE, already loaded: gets the HTTP script.
    Ipxe,
}

impl fmt::Display for ClientKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClientKind::Firmware => "firmware",
            ClientKind::Ipxe => "iPXE",
        })
    }
}

/// A reply to send, with what went into it (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The DHCPOFFER or DHCPACK.
    pub message: Message,
    /// Client MAC, lowercase colon hex.
    pub mac: String,
    /// Option 93 as sent by the client; `None` when it was absent (treated as BIOS).
    pub arch: Option<u16>,
    /// Firmware or iPXE.
    pub client: ClientKind,
    /// The boot file name or script URL handed out.
    pub boot_file: String,
}

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ignored {
    /// A BOOTREPLY (another server's answer), not a request.
    NotBootRequest,
    /// `hlen` is 0 or larger than the 16-byte `chaddr` field.
    BadHardwareAddress(u8),
    /// Option 60 is missing or does not start with `PXEClient`: not ours to answer.
    NotPxeClient,
    /// Not a DHCPDISCOVER on the DHCP port, nor a DHCPREQUEST on the PXE port; a
    /// DHCPREQUEST on port 67 is the client talking to the real DHCP server.
    OtherMessage {
        /// Option 53, if any.
        message_type: Option<MessageType>,
        /// Whether it arrived on the PXE port (4011).
        on_port_4011: bool,
    },
    /// Option 93 names an architecture we have no boot file for (e.g. 6, EFI IA32).
    UnsupportedArchitecture(u16),
}

impl Ignored {
    /// Whether this is worth an info-level log line: an unsupported architecture is a
    /// PXE client we could have booted, everything else is normal LAN traffic.
    pub fn is_notable(&self) -> bool {
        matches!(self, Ignored::UnsupportedArchitecture(_))
    }
}

impl fmt::Display for Ignored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ignored::NotBootRequest => f.write_str("not a BOOTREQUEST"),
            Ignored::BadHardwareAddress(hlen) => write!(f, "bad hardware address length {hlen}"),
            Ignored::NotPxeClient => f.write_str("not a PXE client (option 60)"),
            Ignored::OtherMessage {
                message_type,
                on_port_4011,
            } => {
                let port = if *on_port_4011 { "PXE" } else { "DHCP" };
                match message_type {
                    Some(t) => write!(f, "{t:?} on the {port} port is not for us"),
                    None => write!(f, "no DHCP message type on the {port} port"),
                }
            }
            Ignored::UnsupportedArchitecture(arch) => {
                write!(f, "unsupported client architecture {arch}")
            }
        }
    }
}

/// What to answer to `request`, received on the PXE port (4011) when `on_port_4011`,
/// else on the DHCP port (67). `None` means stay silent.
///
/// Pure, so that every rule about who gets what can be unit tested; see [`decide`].
pub fn answer(request: &Message, on_port_4011: bool, ctx: &AnswerContext) -> Option<Message> {
    decide(request, on_port_4011, ctx).ok().map(|a| a.message)
}

/// Like [`answer`], but says why it stays silent and what went into the reply.
pub fn decide(
    request: &Message,
    on_port_4011: bool,
    ctx: &AnswerContext,
) -> Result<Answer, Ignored> {
    if request.opcode() != Opcode::BootRequest {
        return Err(Ignored::NotBootRequest);
    }
    // `Message::chaddr` slices by `hlen`, which comes off the wire.
    let hlen = request.hlen();
    if hlen == 0 || usize::from(hlen) > 16 {
        return Err(Ignored::BadHardwareAddress(hlen));
    }
    let opts = request.opts();
    let is_pxe = matches!(
        opts.get(OptionCode::ClassIdentifier),
        Some(DhcpOption::ClassIdentifier(class)) if class.starts_with(PXE_CLIENT_CLASS)
    );
    if !is_pxe {
        return Err(Ignored::NotPxeClient);
    }
    let message_type = opts.msg_type();
    let reply_type = match (message_type, on_port_4011) {
        (Some(MessageType::Discover), false) => MessageType::Offer,
        (Some(MessageType::Request), true) => MessageType::Ack,
        _ => {
            return Err(Ignored::OtherMessage {
                message_type,
                on_port_4011,
            })
        }
    };

    let mac = format_mac(request.chaddr());
    let arch = match opts.get(OptionCode::ClientSystemArchitecture) {
        Some(DhcpOption::ClientSystemArchitecture(arch)) => Some(arch.0),
        _ => None,
    };
    let ipxe = matches!(
        opts.get(OptionCode::UserClass),
        Some(DhcpOption::UserClass(class)) if is_ipxe_user_class(class)
    );
    let (client, boot_file) = if ipxe {
        // iPXE can fetch the script whatever it runs on; its architecture does not matter.
        (
            ClientKind::Ipxe,
            ctx.script_url.replace(MAC_PLACEHOLDER, &mac),
        )
    } else {
        // PXE 2.0 clients predate option 93; they are all BIOS.
        let file = match arch.unwrap_or(ARCH_BIOS) {
            ARCH_BIOS => &ctx.boot_files.bios,
            ARCH_EFI_BC | ARCH_EFI_X64 => &ctx.boot_files.uefi_x64,
            other => return Err(Ignored::UnsupportedArchitecture(other)),
        };
        (ClientKind::Firmware, file.clone())
    };

    let mut reply = Message::default();
    reply
        .set_opcode(Opcode::BootReply)
        .set_htype(request.htype())
        .set_xid(request.xid())
        .set_flags(request.flags())
        .set_giaddr(request.giaddr())
        .set_siaddr(ctx.server_ip)
        .set_chaddr(request.chaddr());
    // A script URL can outgrow the 128-byte `file` field; option 67 has no such limit
    // and iPXE reads it first.
    if boot_file.len() <= FILE_FIELD_MAX {
        reply.set_fname_str(&boot_file);
    } else {
        reply
            .opts_mut()
            .insert(DhcpOption::BootfileName(boot_file.clone().into_bytes()));
    }
    let reply_opts = reply.opts_mut();
    reply_opts.insert(DhcpOption::MessageType(reply_type));
    reply_opts.insert(DhcpOption::ServerIdentifier(ctx.server_ip));
    reply_opts.insert(DhcpOption::ClassIdentifier(PXE_CLIENT_CLASS.to_vec()));
    let boot_item = match opts.get(OptionCode::VendorExtensions) {
        Some(DhcpOption::VendorExtensions(vendor)) if on_port_4011 => pxe_boot_item(vendor),
        _ => None,
    };
    reply_opts.insert(DhcpOption::VendorExtensions(pxe_vendor_options(boot_item)));
    // The client's UUID is echoed if it has the one form RFC 4578 defines: type 0
    // and 16 bytes. Anything else would go back as a malformed option 97.
    if let Some(DhcpOption::ClientMachineIdentifier(uuid)) =
        opts.get(OptionCode::ClientMachineIdentifier)
    {
        if uuid.len() == CLIENT_UUID_LEN && uuid[0] == 0 {
            reply_opts.insert(DhcpOption::ClientMachineIdentifier(uuid.clone()));
        }
    }

    Ok(Answer {
        message: reply,
        mac,
        arch,
        client,
        boot_file,
    })
}

/// Option 43 of our replies: discovery control "boot the file in this packet" (so the
/// client neither broadcasts for boot servers nor shows a menu), plus, in an ACK, the
/// boot item the client asked for, which PXE 2.1 boot servers echo.
fn pxe_vendor_options(boot_item: Option<[u8; 4]>) -> Vec<u8> {
    let mut vendor = vec![PXE_DISCOVERY_CONTROL, 1, DISCOVERY_USE_BOOT_FILE];
    if let Some(item) = boot_item {
        vendor.extend_from_slice(&[PXE_BOOT_ITEM, 4]);
        vendor.extend_from_slice(&item);
    }
    vendor.push(255);
    vendor
}

/// The PXE_BOOT_ITEM sub-option (type and layer, 4 bytes) of a client's option 43.
fn pxe_boot_item(vendor: &[u8]) -> Option<[u8; 4]> {
    let mut rest = vendor;
    loop {
        match rest {
            [] | [255, ..] => return None,
            [0, tail @ ..] => rest = tail,
            [code, len, tail @ ..] => {
                let value = tail.get(..usize::from(*len))?;
                if *code == PXE_BOOT_ITEM {
                    return value.try_into().ok();
                }
                rest = &tail[value.len()..];
            }
            [_] => return None,
        }
    }
}

/// Whether option 77 says iPXE. iPXE sends the bare bytes `iPXE`; RFC 3004 encodes the
/// option as length-prefixed class names, which we accept too.
pub fn is_ipxe_user_class(user_class: &[u8]) -> bool {
    if user_class == IPXE_USER_CLASS {
        return true;
    }
    let mut rest = user_class;
    while let [len, tail @ ..] = rest {
        let Some(class) = tail.get(..usize::from(*len)) else {
            return false;
        };
        if class == IPXE_USER_CLASS {
            return true;
        }
        rest = &tail[class.len()..];
    }
    false
}

/// A hardware address as lowercase colon hex (`52:54:00:12:34:56`), the form the
/// script URL and our logs use.
pub fn format_mac(chaddr: &[u8]) -> String {
    chaddr
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Decode a datagram, or say why it is not a DHCP packet.
///
/// Only the few options we read are kept: `dhcproto` `debug_assert!`s on the length
/// of some others, and hostile input must not be able to panic the service.
pub fn parse_request(datagram: &[u8]) -> Result<Message, String> {
    if datagram.len() < BOOTP_HEADER_LEN {
        return Err(format!("{} bytes is too short for BOOTP", datagram.len()));
    }
    let (header, mut rest) = datagram.split_at(BOOTP_HEADER_LEN);
    if header[BOOTP_HEADER_LEN - 4..] != DHCP_MAGIC_COOKIE {
        return Err("no DHCP magic cookie".to_owned());
    }
    let mut packet = header.to_vec();
    loop {
        match rest {
            [] | [255, ..] => break,
            [0, tail @ ..] => rest = tail,
            [code, len, tail @ ..] => {
                let Some(value) = tail.get(..usize::from(*len)) else {
                    return Err(format!("option {code} runs past the end of the packet"));
                };
                if OPTIONS_WE_READ.contains(code) {
                    packet.extend_from_slice(&[*code, *len]);
                    packet.extend_from_slice(value);
                }
                rest = &tail[value.len()..];
            }
            [code] => return Err(format!("option {code} has no length")),
        }
    }
    packet.push(255);
    Message::decode(&mut Decoder::new(&packet)).map_err(|e| e.to_string())
}

/// Counters, for the status API and tests.
#[derive(Debug, Default)]
pub struct ProxyDhcpStats {
    /// Proxy offers sent (answers to DHCPDISCOVER on the DHCP port).
    pub offers: AtomicU64,
    /// ACKs sent (answers to DHCPREQUEST on the PXE port).
    pub acks: AtomicU64,
    /// Datagrams that got no answer: not PXE, not for us, unsupported or malformed.
    pub ignored: AtomicU64,
}

/// The running ProxyDHCP service: two UDP sockets bound to one interface.
#[derive(Debug)]
pub struct ProxyDhcp {
    interface: String,
    /// 0.0.0.0:67: broadcast DHCPDISCOVERs in, proxy offers out.
    dhcp: UdpSocket,
    /// 0.0.0.0:4011: unicast ProxyDHCP requests in, ACKs out.
    pxe: UdpSocket,
    ctx: AnswerContext,
    stats: Arc<ProxyDhcpStats>,
}

impl ProxyDhcp {
    /// Binds the DHCP and PXE ports on `config.interface`.
    ///
    /// Fails with a message naming the interface when it does not exist, has no IPv4
    /// address (and none is configured), or the ports cannot be bound (port 67 needs
    /// root or `CAP_NET_BIND_SERVICE`).
    pub async fn bind(config: ProxyDhcpConfig) -> io::Result<ProxyDhcp> {
        let iface = &config.interface;
        let c_iface = CString::new(iface.as_str()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid interface name {iface:?}"),
            )
        })?;
        if iface.is_empty() || iface.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid interface name {iface:?}"),
            ));
        }
        // SAFETY: `c_iface` is a valid NUL-terminated string.
        if unsafe { libc::if_nametoindex(c_iface.as_ptr()) } == 0 {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("ProxyDHCP: network interface {iface:?} does not exist"),
            ));
        }
        let server_ip = match config.server_ip {
            Some(ip) => ip,
            None => interface_ipv4(iface)?.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::AddrNotAvailable,
                    format!(
                        "ProxyDHCP: network interface {iface:?} has no IPv4 address \
                         (assign one or configure the server address)"
                    ),
                )
            })?,
        };
        let (dhcp_port, pxe_port) = config.ports;
        let dhcp = UdpSocket::from_std(bind_udp(iface, dhcp_port)?)?;
        let pxe = UdpSocket::from_std(bind_udp(iface, pxe_port)?)?;
        info!(
            interface = %iface, %server_ip, dhcp_port, pxe_port,
            "ProxyDHCP listening"
        );
        Ok(ProxyDhcp {
            interface: config.interface,
            dhcp,
            pxe,
            ctx: AnswerContext {
                server_ip,
                script_url: config.script_url,
                boot_files: config.boot_files,
            },
            stats: Arc::default(),
        })
    }

    /// The address announced as next server.
    pub fn server_ip(&self) -> Ipv4Addr {
        self.ctx.server_ip
    }

    /// The ports actually bound (DHCP, PXE): useful when the configuration asked for 0.
    pub fn local_ports(&self) -> io::Result<(u16, u16)> {
        Ok((
            self.dhcp.local_addr()?.port(),
            self.pxe.local_addr()?.port(),
        ))
    }

    /// Counters shared with the running service.
    pub fn stats(&self) -> Arc<ProxyDhcpStats> {
        Arc::clone(&self.stats)
    }

    /// Answers requests until `shutdown` becomes true or its sender is dropped.
    ///
    /// Errors on single datagrams are logged and never stop the service.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        // Large enough for any DHCP packet on an Ethernet without jumbo frames.
        let mut dhcp_buf = vec![0u8; 1500];
        let mut pxe_buf = vec![0u8; 1500];
        while !*shutdown.borrow_and_update() {
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                received = self.dhcp.recv_from(&mut dhcp_buf) => match received {
                    Ok((len, from)) => self.handle(&dhcp_buf[..len], from, false).await,
                    Err(e) => debug!(interface = %self.interface, "ProxyDHCP receive: {e}"),
                },
                received = self.pxe.recv_from(&mut pxe_buf) => match received {
                    Ok((len, from)) => self.handle(&pxe_buf[..len], from, true).await,
                    Err(e) => debug!(interface = %self.interface, "ProxyDHCP receive: {e}"),
                },
            }
        }
        debug!(interface = %self.interface, "ProxyDHCP stopped");
    }

    async fn handle(&self, datagram: &[u8], from: SocketAddr, on_port_4011: bool) {
        let request = match parse_request(datagram) {
            Ok(request) => request,
            Err(e) => {
                debug!(%from, "ProxyDHCP: dropping malformed packet: {e}");
                self.stats.ignored.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let answer = match decide(&request, on_port_4011, &self.ctx) {
            Ok(answer) => answer,
            Err(why) => {
                if why.is_notable() {
                    info!(%from, mac = %format_mac_checked(&request), "ProxyDHCP: no answer: {why}");
                } else {
                    debug!(%from, "ProxyDHCP: no answer: {why}");
                }
                self.stats.ignored.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let (socket, to, counter, what) = if on_port_4011 {
            (&self.pxe, from, &self.stats.acks, "ACK")
        } else {
            let giaddr = request.giaddr();
            // Behind a relay the client is on another network: answer the relay (RFC 2131 4.1).
            let to = if giaddr.is_unspecified() {
                SocketAddrV4::new(Ipv4Addr::BROADCAST, DHCP_CLIENT_PORT)
            } else {
                SocketAddrV4::new(giaddr, DHCP_SERVER_PORT)
            };
            (&self.dhcp, SocketAddr::V4(to), &self.stats.offers, "offer")
        };
        let bytes = match answer.message.to_vec() {
            Ok(bytes) => bytes,
            Err(e) => {
                warn!(mac = %answer.mac, "ProxyDHCP: cannot encode {what}: {e}");
                return;
            }
        };
        let arch = answer
            .arch
            .map_or_else(|| "none (BIOS)".to_owned(), |a| a.to_string());
        match socket.send_to(&bytes, to).await {
            Ok(_) => {
                counter.fetch_add(1, Ordering::Relaxed);
                info!(
                    mac = %answer.mac, arch = %arch, client = %answer.client,
                    boot_file = %answer.boot_file, %to,
                    "ProxyDHCP {what}"
                );
            }
            Err(e) => warn!(mac = %answer.mac, %to, "ProxyDHCP: sending {what}: {e}"),
        }
    }
}

/// The client MAC for a log line, without trusting `hlen`.
fn format_mac_checked(request: &Message) -> String {
    if (1..=16).contains(&request.hlen()) {
        format_mac(request.chaddr())
    } else {
        "?".to_owned()
    }
}

/// The first IPv4 address of `interface`, from getifaddrs(3).
fn interface_ipv4(interface: &str) -> io::Result<Option<Ipv4Addr>> {
    let mut addrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: on success getifaddrs stores a list we free below.
    if unsafe { libc::getifaddrs(&mut addrs) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("ProxyDHCP: listing addresses of {interface:?}: {e}"),
        ));
    }
    let mut found = None;
    let mut cursor = addrs;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the list returned by getifaddrs; `ifa_name` is a
        // C string and `ifa_addr`, when not null, points to a sockaddr of the family
        // it announces, here AF_INET, i.e. a sockaddr_in.
        unsafe {
            let ifa = &*cursor;
            if !ifa.ifa_addr.is_null()
                && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET
                && CStr::from_ptr(ifa.ifa_name).to_bytes() == interface.as_bytes()
            {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                found = Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
                break;
            }
            cursor = ifa.ifa_next;
        }
    }
    // SAFETY: `addrs` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(addrs) };
    Ok(found)
}

/// A non-blocking UDP socket on 0.0.0.0:`port`, bound to `interface`.
///
/// SO_REUSEADDR lets us share port 67 with a DHCP server on the same host (broadcasts
/// reach every socket), SO_BROADCAST allows sending offers to 255.255.255.255, and
/// SO_BINDTODEVICE keeps us to one network and makes the limited broadcast leave by
/// that interface.
fn bind_udp(interface: &str, port: u16) -> io::Result<std::net::UdpSocket> {
    let context = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("ProxyDHCP: binding UDP port {port} on {interface:?}: {e}"),
        )
    };
    // SAFETY: plain socket(2) call; the descriptor is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(context(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    for option in [libc::SO_REUSEADDR, libc::SO_BROADCAST] {
        setsockopt(
            &fd,
            option,
            std::ptr::from_ref(&one).cast(),
            mem::size_of_val(&one),
        )
        .map_err(context)?;
    }
    setsockopt(
        &fd,
        libc::SO_BINDTODEVICE,
        interface.as_ptr().cast(),
        interface.len(),
    )
    .map_err(context)?;
    // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_in = unsafe { mem::zeroed() };
    addr.sin_family = libc::AF_INET as libc::sa_family_t;
    addr.sin_port = port.to_be();
    addr.sin_addr.s_addr = u32::from(Ipv4Addr::UNSPECIFIED).to_be();
    // SAFETY: `addr` is a valid sockaddr_in and the length matches.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::from_ref(&addr).cast(),
            mem::size_of_val(&addr) as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(context(io::Error::last_os_error()));
    }
    Ok(std::net::UdpSocket::from(fd))
}

fn setsockopt(
    fd: &OwnedFd,
    option: libc::c_int,
    value: *const libc::c_void,
    len: usize,
) -> io::Result<()> {
    // SAFETY: the caller passes a pointer to `len` readable bytes.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            value,
            len as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::v4::{Architecture, Flags, HType};

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xAB, 0xCD, 0xEF];
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
    const UUID: [u8; 17] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];

    fn ctx() -> AnswerContext {
        AnswerContext {
            server_ip: SERVER,
            script_url: "http://10.0.2.1:8080/boot/ipxe?mac={mac}".to_owned(),
            boot_files: BootFiles::default(),
        }
    }

    fn request(kind: MessageType, class: Option<&[u8]>, arch: Option<u16>) -> Message {
        let mut msg = Message::default();
        msg.set_xid(0x1234_5678)
            .set_flags(Flags::default().set_broadcast())
            .set_chaddr(&MAC);
        let opts = msg.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        if let Some(class) = class {
            opts.insert(DhcpOption::ClassIdentifier(class.to_vec()));
        }
        if let Some(arch) = arch {
            opts.insert(DhcpOption::ClientSystemArchitecture(Architecture(arch)));
        }
        msg
    }

    fn firmware(kind: MessageType, arch: u16) -> Message {
        let class = format!("PXEClient:Arch:{arch:05}:UNDI:002001");
        request(kind, Some(class.as_bytes()), Some(arch))
    }

    fn ipxe(kind: MessageType, arch: u16) -> Message {
        let mut msg = firmware(kind, arch);
        msg.opts_mut()
            .insert(DhcpOption::UserClass(IPXE_USER_CLASS.to_vec()));
        msg
    }

    /// Round-trips through the wire format, as the service sees packets.
    fn wire(msg: &Message) -> Message {
        parse_request(&msg.to_vec().expect("encode")).expect("decode")
    }

    /// Round-trips a reply through the wire format, decoding every option.
    fn reply(msg: Option<Message>) -> Message {
        let bytes = msg.expect("an answer").to_vec().expect("encode");
        Message::decode(&mut Decoder::new(&bytes)).expect("decode")
    }

    fn file(msg: &Message) -> &str {
        let name = msg.fname().expect("file field set");
        std::str::from_utf8(name)
            .expect("utf-8")
            .trim_end_matches('\0')
    }

    fn opt(msg: &Message, code: OptionCode) -> Option<&DhcpOption> {
        msg.opts().get(code)
    }

    #[test]
    fn bios_discover_gets_a_complete_proxy_offer() {
        let req = wire(&firmware(MessageType::Discover, 0));
        let offer = reply(answer(&req, false, &ctx()));
        assert_eq!(offer.opcode(), Opcode::BootReply);
        assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(offer.xid(), 0x1234_5678);
        assert_eq!(offer.chaddr(), MAC);
        assert_eq!(offer.htype(), HType::Eth);
        assert!(offer.flags().broadcast());
        assert_eq!(offer.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(offer.ciaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(offer.siaddr(), SERVER);
        assert_eq!(file(&offer), "undionly.kpxe");
        assert_eq!(
            opt(&offer, OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(SERVER))
        );
        assert_eq!(
            opt(&offer, OptionCode::ClassIdentifier),
            Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec()))
        );
        assert_eq!(
            opt(&offer, OptionCode::VendorExtensions),
            Some(&DhcpOption::VendorExtensions(vec![6, 1, 8, 255]))
        );
        // Nothing else: no address, no lease, no iPXE-specific options (175...).
        let codes: Vec<u8> = offer.opts().iter().map(|(c, _)| u8::from(*c)).collect();
        assert_eq!(codes, [43, 53, 54, 60]);
    }

    #[test]
    fn offer_encodes_option_43_exactly() {
        let req = firmware(MessageType::Discover, 0);
        let bytes = answer(&req, false, &ctx())
            .expect("offer")
            .to_vec()
            .expect("encode");
        let options = &bytes[BOOTP_HEADER_LEN..];
        let at = options
            .windows(2)
            .position(|w| w == [43, 4])
            .expect("option 43");
        assert_eq!(&options[at..at + 6], [43, 4, 6, 1, 8, 255]);
        assert_eq!(&bytes[236..240], DHCP_MAGIC_COOKIE);
    }

    #[test]
    fn missing_architecture_is_bios() {
        let req = request(MessageType::Discover, Some(b"PXEClient"), None);
        let answer = decide(&req, false, &ctx()).expect("offer");
        assert_eq!(answer.arch, None);
        assert_eq!(answer.boot_file, "undionly.kpxe");
        assert_eq!(file(&answer.message), "undionly.kpxe");
    }

    #[test]
    fn uefi_x64_gets_snponly() {
        for arch in [7, 9] {
            let req = wire(&firmware(MessageType::Discover, arch));
            let offer = answer(&req, false, &ctx()).expect("offer");
            assert_eq!(file(&offer), "snponly.efi", "arch {arch}");
            let answer = decide(&req, false, &ctx()).expect("offer");
            assert_eq!(answer.client, ClientKind::Firmware);
            assert_eq!(answer.arch, Some(arch));
        }
    }

    #[test]
    fn configured_boot_files_are_used() {
        let mut ctx = ctx();
        ctx.boot_files = BootFiles {
            bios: "ipxe/undionly.kpxe".to_owned(),
            uefi_x64: "ipxe/ipxe.efi".to_owned(),
        };
        let bios = answer(&firmware(MessageType::Discover, 0), false, &ctx).expect("offer");
        assert_eq!(file(&bios), "ipxe/undionly.kpxe");
        let uefi = answer(&firmware(MessageType::Discover, 7), false, &ctx).expect("offer");
        assert_eq!(file(&uefi), "ipxe/ipxe.efi");
    }

    #[test]
    fn unsupported_architectures_get_no_answer() {
        for arch in [6, 2, 10, 11, 16, 0xffff] {
            let req = firmware(MessageType::Discover, arch);
            assert_eq!(answer(&req, false, &ctx()), None, "arch {arch}");
            assert_eq!(
                decide(&req, false, &ctx()).unwrap_err(),
                Ignored::UnsupportedArchitecture(arch)
            );
        }
        assert_eq!(
            Ignored::UnsupportedArchitecture(6).to_string(),
            "unsupported client architecture 6"
        );
    }

    #[test]
    fn ipxe_gets_the_script_url_with_its_mac() {
        for arch in [0, 7, 9] {
            let req = wire(&ipxe(MessageType::Discover, arch));
            let answer = decide(&req, false, &ctx()).expect("offer");
            let url = "http://10.0.2.1:8080/boot/ipxe?mac=52:54:00:ab:cd:ef";
            assert_eq!(answer.client, ClientKind::Ipxe);
            assert_eq!(answer.boot_file, url);
            assert_eq!(file(&answer.message), url, "arch {arch}");
            assert_eq!(answer.message.siaddr(), SERVER);
        }
    }

    #[test]
    fn ipxe_user_class_in_rfc_3004_form_is_recognised() {
        assert!(is_ipxe_user_class(b"iPXE"));
        assert!(is_ipxe_user_class(b"\x04iPXE"));
        assert!(is_ipxe_user_class(b"\x03foo\x04iPXE"));
        assert!(!is_ipxe_user_class(b"gPXE"));
        assert!(!is_ipxe_user_class(b"iPXE2"));
        assert!(!is_ipxe_user_class(b"\x09iPXE"));
        assert!(!is_ipxe_user_class(b""));
        let mut req = firmware(MessageType::Discover, 0);
        req.opts_mut()
            .insert(DhcpOption::UserClass(b"gPXE".to_vec()));
        assert_eq!(
            file(&answer(&req, false, &ctx()).expect("offer")),
            "undionly.kpxe"
        );
    }

    #[test]
    fn long_script_url_goes_to_option_67() {
        let mut ctx = ctx();
        ctx.script_url = format!("http://boot.example/{}?mac={{mac}}", "x".repeat(120));
        let req = wire(&ipxe(MessageType::Discover, 0));
        let offer = reply(answer(&req, false, &ctx));
        assert_eq!(offer.fname(), None);
        let expected = ctx.script_url.replace("{mac}", "52:54:00:ab:cd:ef");
        assert_eq!(
            opt(&offer, OptionCode::BootfileName),
            Some(&DhcpOption::BootfileName(expected.into_bytes()))
        );
    }

    #[test]
    fn non_pxe_clients_get_no_answer() {
        let ctx = ctx();
        for class in [None, Some(&b"MSFT 5.0"[..]), Some(b"PXECLIENT"), Some(b"")] {
            for kind in [MessageType::Discover, MessageType::Request] {
                let req = request(kind, class, Some(0));
                assert_eq!(answer(&req, false, &ctx), None, "{class:?} {kind:?}");
                assert_eq!(answer(&req, true, &ctx), None, "{class:?} {kind:?}");
                assert_eq!(
                    decide(&req, false, &ctx).unwrap_err(),
                    Ignored::NotPxeClient
                );
            }
        }
        // Even iPXE must say PXEClient.
        let mut req = request(MessageType::Discover, Some(b"MSFT 5.0"), Some(0));
        req.opts_mut()
            .insert(DhcpOption::UserClass(IPXE_USER_CLASS.to_vec()));
        assert_eq!(answer(&req, false, &ctx), None);
    }

    #[test]
    fn request_on_port_67_is_for_the_dhcp_server() {
        let req = firmware(MessageType::Request, 0);
        assert_eq!(answer(&req, false, &ctx()), None);
        let ipxe = ipxe(MessageType::Request, 0);
        assert_eq!(answer(&ipxe, false, &ctx()), None);
    }

    #[test]
    fn other_message_types_get_no_answer() {
        let ctx = ctx();
        assert_eq!(
            answer(&firmware(MessageType::Discover, 0), true, &ctx),
            None
        );
        for kind in [
            MessageType::Inform,
            MessageType::Release,
            MessageType::Decline,
        ] {
            assert_eq!(answer(&firmware(kind, 0), false, &ctx), None);
            assert_eq!(answer(&firmware(kind, 0), true, &ctx), None);
        }
        let mut no_type = firmware(MessageType::Discover, 0);
        no_type.opts_mut().remove(OptionCode::MessageType);
        assert_eq!(answer(&no_type, false, &ctx), None);
    }

    #[test]
    fn replies_and_bad_hardware_addresses_get_no_answer() {
        let mut reply = firmware(MessageType::Discover, 0);
        reply.set_opcode(Opcode::BootReply);
        assert_eq!(
            decide(&reply, false, &ctx()).unwrap_err(),
            Ignored::NotBootRequest
        );
        let mut no_mac = firmware(MessageType::Discover, 0);
        no_mac.set_chaddr(&[]);
        assert_eq!(
            decide(&no_mac, false, &ctx()).unwrap_err(),
            Ignored::BadHardwareAddress(0)
        );
        // hlen 17 off the wire: `chaddr()` would panic if we called it.
        let mut bytes = firmware(MessageType::Discover, 0).to_vec().expect("encode");
        bytes[2] = 17;
        let req = parse_request(&bytes).expect("decode");
        assert_eq!(
            decide(&req, false, &ctx()).unwrap_err(),
            Ignored::BadHardwareAddress(17)
        );
    }

    #[test]
    fn proxy_request_on_4011_gets_an_ack_with_the_offer_fields() {
        let ctx = ctx();
        let mut req = firmware(MessageType::Request, 7);
        req.set_ciaddr(Ipv4Addr::new(10, 0, 2, 50))
            .set_flags(Flags::default());
        let req = wire(&req);
        let ack = reply(answer(&req, true, &ctx));
        let offer = answer(&firmware(MessageType::Discover, 7), false, &ctx).expect("offer");
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(ack.opcode(), Opcode::BootReply);
        assert_eq!(ack.xid(), req.xid());
        assert_eq!(ack.chaddr(), MAC);
        assert!(!ack.flags().broadcast());
        assert_eq!(ack.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(ack.siaddr(), SERVER);
        assert_eq!(file(&ack), "snponly.efi");
        for code in [
            OptionCode::ServerIdentifier,
            OptionCode::ClassIdentifier,
            OptionCode::VendorExtensions,
        ] {
            assert_eq!(opt(&ack, code), opt(&offer, code), "{code:?}");
        }
        // iPXE's ProxyDHCP request gets the script too.
        let ack = answer(&ipxe(MessageType::Request, 0), true, &ctx).expect("ack");
        assert_eq!(
            file(&ack),
            "http://10.0.2.1:8080/boot/ipxe?mac=52:54:00:ab:cd:ef"
        );
    }

    #[test]
    fn ack_echoes_the_requested_boot_item() {
        let mut req = firmware(MessageType::Request, 7);
        req.opts_mut()
            .insert(DhcpOption::VendorExtensions(vec![71, 4, 0, 0, 0, 0, 255]));
        let ack = reply(answer(&wire(&req), true, &ctx()));
        assert_eq!(
            opt(&ack, OptionCode::VendorExtensions),
            Some(&DhcpOption::VendorExtensions(vec![
                6, 1, 8, 71, 4, 0, 0, 0, 0, 255
            ]))
        );
        assert_eq!(
            pxe_boot_item(&[1, 1, 0, 71, 4, 0x80, 0, 0, 1, 255]),
            Some([0x80, 0, 0, 1])
        );
        assert_eq!(pxe_boot_item(&[71, 3, 0, 0, 0]), None);
        assert_eq!(pxe_boot_item(&[71, 9, 0]), None);
        assert_eq!(pxe_boot_item(&[1]), None);
    }

    #[test]
    fn client_uuid_is_echoed() {
        let mut req = firmware(MessageType::Discover, 0);
        req.opts_mut()
            .insert(DhcpOption::ClientMachineIdentifier(UUID.to_vec()));
        let offer = reply(answer(&wire(&req), false, &ctx()));
        assert_eq!(
            opt(&offer, OptionCode::ClientMachineIdentifier),
            Some(&DhcpOption::ClientMachineIdentifier(UUID.to_vec()))
        );
        let without = answer(&firmware(MessageType::Discover, 0), false, &ctx()).expect("offer");
        assert_eq!(opt(&without, OptionCode::ClientMachineIdentifier), None);
    }

    #[test]
    fn a_malformed_client_uuid_is_not_echoed() {
        // Found by fuzz/fuzz_targets/proxy_dhcp.rs: an empty option 97 came back
        // as an empty option 97, which RFC 4578 does not allow (and which does
        // not even decode back to what was sent).
        for uuid in [&[][..], &[0; 16], &[1; 17], &[0; 18]] {
            let mut req = firmware(MessageType::Discover, 0).to_vec().expect("encode");
            let end = req.len() - 1;
            assert_eq!(req[end], 255);
            req.truncate(end);
            req.extend_from_slice(&[97, uuid.len() as u8]);
            req.extend_from_slice(uuid);
            req.push(255);
            let offer = answer(&parse_request(&req).expect("decode"), false, &ctx());
            let offer = offer.expect("an offer");
            let bytes = offer.to_vec().expect("encode");
            assert!(
                !bytes[BOOTP_HEADER_LEN..]
                    .windows(2)
                    .any(|w| w == [97, uuid.len() as u8]),
                "{uuid:?} echoed"
            );
            assert_eq!(opt(&offer, OptionCode::ClientMachineIdentifier), None);
        }
    }

    #[test]
    fn relay_address_is_kept() {
        let mut req = firmware(MessageType::Discover, 0);
        req.set_giaddr(Ipv4Addr::new(10, 9, 0, 1));
        let offer = answer(&req, false, &ctx()).expect("offer");
        assert_eq!(offer.giaddr(), Ipv4Addr::new(10, 9, 0, 1));
    }

    #[test]
    fn malformed_packets_are_rejected_without_panicking() {
        let good = firmware(MessageType::Discover, 0).to_vec().expect("encode");
        assert!(parse_request(&[]).is_err());
        assert!(parse_request(&good[..239]).is_err());
        let mut bad_cookie = good.clone();
        bad_cookie[236] = 0;
        assert!(parse_request(&bad_cookie).is_err());
        // An option whose length runs past the end.
        let mut truncated = good[..BOOTP_HEADER_LEN].to_vec();
        truncated.extend_from_slice(&[53, 1, 1, 60, 40, b'P']);
        assert!(parse_request(&truncated).is_err());
        truncated.truncate(BOOTP_HEADER_LEN + 3);
        truncated.push(60);
        assert!(parse_request(&truncated).is_err());
        // Options dhcproto asserts on (94 with a bad length, 81 too short, 151 empty)
        // are dropped before decoding.
        let mut odd = good[..BOOTP_HEADER_LEN].to_vec();
        odd.extend_from_slice(&[94, 1, 1, 81, 1, 0, 151, 0, 80, 3, 1, 2, 3]);
        odd.extend_from_slice(&[53, 1, 1, 60, 9]);
        odd.extend_from_slice(b"PXEClient");
        odd.push(255);
        let req = parse_request(&odd).expect("decode");
        assert_eq!(
            file(&answer(&req, false, &ctx()).expect("offer")),
            "undionly.kpxe"
        );
        // Truncated or odd-sized values of the options we read.
        for tail in [
            &[53, 0][..],
            &[93, 1, 0],
            &[93, 0],
            &[54, 3, 1, 2, 3],
            &[60, 0],
            &[77, 0],
            &[97, 0],
            &[43, 2, 71, 9],
        ] {
            let mut packet = good[..BOOTP_HEADER_LEN].to_vec();
            packet.extend_from_slice(&[60, 9]);
            packet.extend_from_slice(b"PXEClient");
            packet.extend_from_slice(&[53, 1, 1]);
            packet.extend_from_slice(tail);
            packet.push(255);
            if let Ok(req) = parse_request(&packet) {
                let _ = decide(&req, false, &ctx());
                let _ = decide(&req, true, &ctx());
            }
        }
        // Every prefix and every single-byte corruption of a real request.
        let mut ipxe_req = ipxe(MessageType::Request, 7);
        ipxe_req
            .opts_mut()
            .insert(DhcpOption::ClientMachineIdentifier(UUID.to_vec()));
        let ipxe_req = ipxe_req.to_vec().expect("encode");
        for len in 0..ipxe_req.len() {
            if let Ok(req) = parse_request(&ipxe_req[..len]) {
                let _ = decide(&req, true, &ctx());
            }
        }
        for at in 0..ipxe_req.len() {
            for value in [0, 1, 4, 17, 0x7f, 0xff] {
                let mut packet = ipxe_req.clone();
                packet[at] = value;
                if let Ok(req) = parse_request(&packet) {
                    let _ = decide(&req, true, &ctx());
                    let _ = decide(&req, false, &ctx());
                }
            }
        }
    }

    #[test]
    fn mac_is_lowercase_colon_hex() {
        assert_eq!(format_mac(&MAC), "52:54:00:ab:cd:ef");
        assert_eq!(format_mac(&[]), "");
    }
}
