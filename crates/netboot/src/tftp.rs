//! A small, read-only TFTP server: RFC 1350 with option negotiation (RFC 2347)
//! and the `blksize` (RFC 2348), `tsize` and `timeout` (RFC 2349) options.
//!
//! PXE firmware can only fetch its first program over TFTP, so every provisioning
//! server runs this to hand out the iPXE binaries (`undionly.kpxe`, `ipxe.efi`,
//! `snponly.efi`). It serves regular files below one boot folder and nothing
//! outside it, not even through a symlink.
//!
//! The module has two layers:
//!
//! - A pure codec, [`parse`] and [`Packet::encode`], plus the pure halves of option
//!   negotiation ([`Negotiated::from_options`]) and path confinement
//!   ([`relative_path`]). They never panic on any input and are fuzzed
//!   (`fuzz/fuzz_targets/tftp_packet.rs`).
//! - [`TftpServer`]: one listening socket; every accepted read request becomes a
//!   task with a UDP socket of its own (the server's transfer ID), which sends one
//!   block at a time and waits for its ACK.
//!
//! # Modes
//!
//! Only `octet` is served. `netascii` (and `mail`) requests are refused with
//! ERROR 4 and a message asking for binary mode: the files here are firmware
//! binaries, which netascii's line-ending translation would corrupt, and sending
//! them untranslated under the netascii label would corrupt them for any client
//! that does translate.
//!
//! # Which local address answers
//!
//! Transfer sockets are bound to the listening socket's IP with port 0, so replies
//! leave from the address the client sent its request to. If the server listens
//! on an unspecified address (`0.0.0.0` or `::`), transfer sockets are bound to
//! the unspecified address too and the kernel picks the source address by route;
//! on a host with several addresses on the boot network, PXE clients may then
//! ignore the replies. Bind to the boot network's address on such hosts.

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, BufReader};
use tokio::net::UdpSocket;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Block size when the client does not negotiate one (RFC 1350).
pub const DEFAULT_BLKSIZE: u16 = 512;
/// Smallest block size a client may ask for (RFC 2348).
pub const MIN_BLKSIZE: u16 = 8;
/// Largest block size the server agrees to: the RFC 2348 maximum. A DATA packet
/// of that size (65 468 bytes) still fits one UDP datagram over IPv4 and IPv6;
/// bigger requests are answered with this value, as RFC 2348 allows.
pub const MAX_BLKSIZE: u16 = 65464;
/// How long to wait for an ACK before sending the last packet again, unless the
/// client negotiated `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// Retransmissions of one packet before a transfer is given up.
pub const MAX_RETRANSMITS: u32 = 5;
/// Transfers served at once. Requests beyond this are dropped without an answer,
/// so that the client retransmits its request later instead of failing its boot.
pub const MAX_TRANSFERS: usize = 64;

const OP_RRQ: u16 = 1;
const OP_WRQ: u16 = 2;
const OP_DATA: u16 = 3;
const OP_ACK: u16 = 4;
const OP_ERROR: u16 = 5;
const OP_OACK: u16 = 6;

/// Big enough for any UDP datagram, so a request is never silently truncated.
const MAX_DATAGRAM: usize = 65536;
/// Receive buffer of a transfer: it only expects ACKs and ERRORs.
const TRANSFER_RECV_BUFFER: usize = 4096;
/// File reads go through a buffer this big, so a small block size does not cost
/// one blocking-pool round trip per block.
const READ_BUFFER: usize = 128 * 1024;

// ---------------------------------------------------------------------------
// Codec
// ---------------------------------------------------------------------------

/// The error codes of RFC 1350 and RFC 2347.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// Not defined; the message says what went wrong.
    NotDefined = 0,
    FileNotFound = 1,
    AccessViolation = 2,
    DiskFull = 3,
    IllegalOperation = 4,
    UnknownTransferId = 5,
    FileExists = 6,
    NoSuchUser = 7,
    /// The client refuses the options of an OACK (RFC 2347).
    OptionRefused = 8,
}

impl From<ErrorCode> for u16 {
    fn from(code: ErrorCode) -> u16 {
        code as u16
    }
}

/// One TFTP packet, borrowing its strings and data from the datagram it was
/// parsed from.
///
/// Strings are UTF-8 (a superset of the netascii the RFCs specify). An ERROR's
/// message is decoded lossily, because an abort must be understood even when a
/// client's message is in some other encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    /// Read request.
    Rrq(Request<'a>),
    /// Write request (refused by this server).
    Wrq(Request<'a>),
    /// One block of the file; a block shorter than the block size is the last.
    Data { block: u16, data: &'a [u8] },
    /// Acknowledges the DATA block `block`, or with block 0 an OACK.
    Ack { block: u16 },
    /// Ends the transfer; never answered.
    Error {
        /// Usually an [`ErrorCode`]; kept raw because peers may send any value.
        code: u16,
        message: Cow<'a, str>,
    },
    /// Option acknowledgement (RFC 2347): the options the server accepted.
    Oack { options: Vec<(&'a str, &'a str)> },
}

/// The body of a read or write request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub filename: &'a str,
    /// Transfer mode as sent (`octet`, `netascii`, ...); compare case-insensitively.
    pub mode: &'a str,
    /// Option name/value pairs in the order sent; names are case-insensitive.
    pub options: Vec<(&'a str, &'a str)>,
}

/// Which string of a packet a [`PacketError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Filename,
    Mode,
    OptionName,
    OptionValue,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Field::Filename => "file name",
            Field::Mode => "mode",
            Field::OptionName => "option name",
            Field::OptionValue => "option value",
        })
    }
}

/// Why a datagram is not a TFTP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("packet shorter than its header")]
    Truncated,
    #[error("unknown opcode {0}")]
    UnknownOpcode(u16),
    #[error("{0} is not terminated by a NUL byte")]
    Unterminated(Field),
    #[error("{0} is not valid UTF-8")]
    NotUtf8(Field),
    #[error("empty option name")]
    EmptyOptionName,
}

/// Parses one datagram.
///
/// Framing is checked strictly (every string of a request or OACK must end with
/// NUL); meaning is not (an empty file name or an unknown mode parses, and is
/// refused by the server). Two leniencies keep real clients working: NUL bytes
/// padding the end of a request or OACK are ignored, and an ERROR whose message
/// lacks its NUL still parses, so that a client's abort is always understood.
/// Bytes after an ACK's block number or an ERROR message's NUL are ignored.
pub fn parse(buf: &[u8]) -> Result<Packet<'_>, PacketError> {
    let (opcode, body) = split_u16(buf).ok_or(PacketError::Truncated)?;
    match opcode {
        OP_RRQ => parse_request(body).map(Packet::Rrq),
        OP_WRQ => parse_request(body).map(Packet::Wrq),
        OP_DATA => {
            let (block, data) = split_u16(body).ok_or(PacketError::Truncated)?;
            Ok(Packet::Data { block, data })
        }
        OP_ACK => {
            let (block, _) = split_u16(body).ok_or(PacketError::Truncated)?;
            Ok(Packet::Ack { block })
        }
        OP_ERROR => {
            let (code, rest) = split_u16(body).ok_or(PacketError::Truncated)?;
            let text = match rest.iter().position(|&b| b == 0) {
                Some(end) => &rest[..end],
                None => rest,
            };
            Ok(Packet::Error {
                code,
                message: String::from_utf8_lossy(text),
            })
        }
        OP_OACK => parse_options(body).map(|options| Packet::Oack { options }),
        other => Err(PacketError::UnknownOpcode(other)),
    }
}

impl<'a> Packet<'a> {
    /// An ERROR packet.
    pub fn error(code: ErrorCode, message: impl Into<Cow<'a, str>>) -> Packet<'a> {
        Packet::Error {
            code: code.into(),
            message: message.into(),
        }
    }

    /// Appends the wire form of the packet to `out`.
    ///
    /// A string is written up to its first NUL, if it has one, since that is
    /// where any receiver stops reading it. Packets from [`parse`] never hold
    /// one, so `parse(encode(p)) == p` for them.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Packet::Rrq(request) => {
                put_u16(out, OP_RRQ);
                put_request(out, request);
            }
            Packet::Wrq(request) => {
                put_u16(out, OP_WRQ);
                put_request(out, request);
            }
            Packet::Data { block, data } => {
                put_data_header(out, *block);
                out.extend_from_slice(data);
            }
            Packet::Ack { block } => {
                put_u16(out, OP_ACK);
                put_u16(out, *block);
            }
            Packet::Error { code, message } => {
                put_u16(out, OP_ERROR);
                put_u16(out, *code);
                put_str(out, message);
            }
            Packet::Oack { options } => {
                put_u16(out, OP_OACK);
                put_options(out, options);
            }
        }
    }

    /// The packet type, for logs.
    fn kind(&self) -> &'static str {
        match self {
            Packet::Rrq(_) => "RRQ",
            Packet::Wrq(_) => "WRQ",
            Packet::Data { .. } => "DATA",
            Packet::Ack { .. } => "ACK",
            Packet::Error { .. } => "ERROR",
            Packet::Oack { .. } => "OACK",
        }
    }
}

fn split_u16(buf: &[u8]) -> Option<(u16, &[u8])> {
    match buf {
        [hi, lo, rest @ ..] => Some((u16::from_be_bytes([*hi, *lo]), rest)),
        _ => None,
    }
}

/// Takes one NUL-terminated string off the front of `rest`.
fn take_str<'a>(rest: &mut &'a [u8], field: Field) -> Result<&'a str, PacketError> {
    let end = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or(PacketError::Unterminated(field))?;
    let text = std::str::from_utf8(&rest[..end]).map_err(|_| PacketError::NotUtf8(field))?;
    *rest = &rest[end + 1..];
    Ok(text)
}

fn parse_request(body: &[u8]) -> Result<Request<'_>, PacketError> {
    let mut rest = body;
    let filename = take_str(&mut rest, Field::Filename)?;
    let mode = take_str(&mut rest, Field::Mode)?;
    let options = parse_options(rest)?;
    Ok(Request {
        filename,
        mode,
        options,
    })
}

fn parse_options(mut rest: &[u8]) -> Result<Vec<(&str, &str)>, PacketError> {
    let mut options = Vec::new();
    // Whatever is left once only NULs remain is padding, not an option.
    while rest.iter().any(|&b| b != 0) {
        let name = take_str(&mut rest, Field::OptionName)?;
        if name.is_empty() {
            return Err(PacketError::EmptyOptionName);
        }
        let value = take_str(&mut rest, Field::OptionValue)?;
        options.push((name, value));
    }
    Ok(options)
}

fn put_u16(out: &mut Vec<u8>, value: u16) {
    out.extend_from_slice(&value.to_be_bytes());
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    out.extend_from_slice(&bytes[..end]);
    out.push(0);
}

fn put_request(out: &mut Vec<u8>, request: &Request<'_>) {
    put_str(out, request.filename);
    put_str(out, request.mode);
    put_options(out, &request.options);
}

fn put_options(out: &mut Vec<u8>, options: &[(&str, &str)]) {
    for (name, value) in options {
        put_str(out, name);
        put_str(out, value);
    }
}

/// The four header bytes of a DATA packet; the transfer loop reads file data
/// straight in after them instead of copying through [`Packet::encode`].
fn put_data_header(out: &mut Vec<u8>, block: u16) {
    put_u16(out, OP_DATA);
    put_u16(out, block);
}

// ---------------------------------------------------------------------------
// Option negotiation
// ---------------------------------------------------------------------------

/// The options of a read request that the server accepts: what goes into the
/// OACK, and how the transfer then runs.
///
/// Options that are unknown (e.g. `windowsize`, `multicast`), repeated (the
/// first wins) or invalid are ignored, which RFC 2347 allows: the client then
/// runs without them. A request with no accepted option gets no OACK: the
/// transfer starts with DATA block 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Negotiated {
    /// Accepted `blksize`, already clamped to [`MAX_BLKSIZE`]. Values below
    /// [`MIN_BLKSIZE`] or that are not decimal numbers are ignored.
    pub blksize: Option<u16>,
    /// Accepted `timeout` in seconds (1..=255, RFC 2349).
    pub timeout: Option<u8>,
    /// Whether the client asked for the file size. Any value is accepted: in a
    /// read request it is meaningless (clients send `0`).
    pub tsize: bool,
}

impl Negotiated {
    /// Picks the accepted options out of a request's options.
    pub fn from_options(options: &[(&str, &str)]) -> Negotiated {
        let mut negotiated = Negotiated::default();
        let (mut seen_blksize, mut seen_timeout) = (false, false);
        for (name, value) in options {
            if name.eq_ignore_ascii_case("blksize") && !seen_blksize {
                seen_blksize = true;
                negotiated.blksize = decimal(value)
                    .filter(|&size| size >= u64::from(MIN_BLKSIZE))
                    .map(|size| size.min(u64::from(MAX_BLKSIZE)) as u16);
            } else if name.eq_ignore_ascii_case("timeout") && !seen_timeout {
                seen_timeout = true;
                negotiated.timeout = decimal(value)
                    .filter(|secs| (1..=255).contains(secs))
                    .map(|secs| secs as u8);
            } else if name.eq_ignore_ascii_case("tsize") {
                negotiated.tsize = true;
            }
        }
        negotiated
    }

    /// Whether the server must answer with an OACK before sending data.
    pub fn needs_oack(&self) -> bool {
        self.blksize.is_some() || self.timeout.is_some() || self.tsize
    }

    /// Data bytes per DATA packet.
    pub fn block_size(&self) -> usize {
        usize::from(self.blksize.unwrap_or(DEFAULT_BLKSIZE))
    }

    /// How long to wait for an ACK before retransmitting.
    pub fn retransmit_timeout(&self) -> Duration {
        self.timeout
            .map_or(DEFAULT_TIMEOUT, |secs| Duration::from_secs(secs.into()))
    }

    /// The OACK's option values, given the size of the file to send.
    fn oack_values(&self, file_size: u64) -> Vec<(&'static str, String)> {
        let mut values = Vec::new();
        if let Some(blksize) = self.blksize {
            values.push(("blksize", blksize.to_string()));
        }
        if let Some(timeout) = self.timeout {
            values.push(("timeout", timeout.to_string()));
        }
        if self.tsize {
            values.push(("tsize", file_size.to_string()));
        }
        values
    }
}

/// A plain decimal number. Numbers too big for `u64` saturate, so that an
/// absurd `blksize` is clamped like any other too-big one.
fn decimal(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(text.parse().unwrap_or(u64::MAX))
}

// ---------------------------------------------------------------------------
// Path confinement
// ---------------------------------------------------------------------------

/// Why a requested file is not served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathRefusal {
    #[error("empty file name")]
    Empty,
    #[error("file name contains a NUL byte")]
    Nul,
    #[error("file name contains a backslash")]
    Backslash,
    #[error("file name contains a `..` component")]
    ParentComponent,
    #[error("file not found")]
    NotFound,
    #[error("file is outside the boot folder")]
    OutsideRoot,
    #[error("not a regular file")]
    NotAFile,
    #[error("file cannot be opened")]
    Unreadable,
}

impl PathRefusal {
    /// The TFTP error code that tells the client.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            PathRefusal::NotFound => ErrorCode::FileNotFound,
            _ => ErrorCode::AccessViolation,
        }
    }
}

/// The lexical half of path confinement: turns a requested file name into a
/// relative path made only of normal components.
///
/// Leading and repeated `/` and `.` components are dropped (PXE clients often
/// send `/ipxe.efi`). A `..` component, a backslash (a Windows-style separator
/// that could smuggle `..\`) and a NUL are refused rather than rewritten: no
/// legitimate boot file needs them. The result still has to be checked against
/// the real file system, since a symlink can lead anywhere; [`TftpServer`] does
/// that after canonicalizing.
pub fn relative_path(filename: &str) -> Result<PathBuf, PathRefusal> {
    if filename.contains('\0') {
        return Err(PathRefusal::Nul);
    }
    if filename.contains('\\') {
        return Err(PathRefusal::Backslash);
    }
    let mut path = PathBuf::new();
    for component in filename.split('/') {
        match component {
            "" | "." => {}
            ".." => return Err(PathRefusal::ParentComponent),
            name => path.push(name),
        }
    }
    if path.as_os_str().is_empty() {
        return Err(PathRefusal::Empty);
    }
    Ok(path)
}

/// Opens `filename` below `root` (which must be canonical), returning the file
/// and its size. Blocking.
///
/// After the lexical check, the path is canonicalized (resolving every symlink)
/// and must still lie below `root`. The final open uses `O_NOFOLLOW`, so a last
/// component swapped for a symlink after the check is refused; swapping a
/// directory in between would need write access to the boot folder.
/// `O_NONBLOCK` keeps a FIFO in the folder from hanging the open; the file type
/// is then checked on the open descriptor.
fn open_confined(root: &Path, filename: &str) -> Result<(std::fs::File, u64), PathRefusal> {
    use std::os::unix::fs::OpenOptionsExt;

    let relative = relative_path(filename)?;
    let canonical = std::fs::canonicalize(root.join(relative)).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => PathRefusal::NotFound,
        _ => PathRefusal::Unreadable,
    })?;
    if !canonical.starts_with(root) {
        return Err(PathRefusal::OutsideRoot);
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&canonical)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => PathRefusal::NotFound,
            _ => PathRefusal::Unreadable,
        })?;
    let metadata = file.metadata().map_err(|_| PathRefusal::Unreadable)?;
    if !metadata.is_file() {
        return Err(PathRefusal::NotAFile);
    }
    Ok((file, metadata.len()))
}

// ---------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------

/// Counters of a [`TftpServer`], shared with whoever exports metrics.
#[derive(Debug, Default)]
pub struct TftpStats {
    /// Files sent completely (the last block was acknowledged).
    pub transfers_completed: AtomicU64,
    /// Transfers that started but did not finish for a reason on the server's
    /// or the network's side: no ACK after [`MAX_RETRANSMITS`] retransmissions,
    /// a read or socket error, a protocol violation, or shutdown.
    pub transfers_failed: AtomicU64,
    /// Transfers the client ended with an ERROR packet. OVMF does this after
    /// every size probe (an RRQ with `tsize`, answered by an OACK and then
    /// refused with ERROR 8), so these are not failures.
    pub transfers_aborted: AtomicU64,
    /// Requests answered with an ERROR or dropped before any transfer: write
    /// requests, unsupported modes, files missing or outside the boot folder,
    /// malformed requests, and requests beyond [`MAX_TRANSFERS`].
    pub requests_refused: AtomicU64,
    /// File bytes sent, each block counted once however often it was resent.
    pub bytes_sent: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// What the listening loop shares with the transfer tasks.
struct Shared {
    /// The boot folder, canonicalized once at bind time.
    root: PathBuf,
    /// Where transfer sockets bind: the listening socket's address with port 0
    /// (an IPv6 scope ID is kept).
    transfer_addr: SocketAddr,
    stats: Arc<TftpStats>,
}

/// A read-only TFTP server for one boot folder. See the [module docs](self).
pub struct TftpServer {
    socket: UdpSocket,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
}

impl TftpServer {
    /// Binds the listening socket; `root` is the boot folder.
    ///
    /// The folder is canonicalized now, so a later change of a symlink to it does
    /// not move what is served; it must exist and be a directory. Port 69 needs
    /// `CAP_NET_BIND_SERVICE`.
    pub async fn bind(addr: SocketAddr, root: PathBuf) -> io::Result<TftpServer> {
        let root = tokio::fs::canonicalize(&root).await.map_err(|e| {
            io::Error::new(e.kind(), format!("boot folder {}: {e}", root.display()))
        })?;
        if !tokio::fs::metadata(&root).await?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("boot folder {} is not a directory", root.display()),
            ));
        }
        let socket = UdpSocket::bind(addr).await?;
        let local_addr = socket.local_addr()?;
        let mut transfer_addr = local_addr;
        transfer_addr.set_port(0);
        tracing::info!(addr = %local_addr, root = %root.display(), "TFTP server listening");
        Ok(TftpServer {
            socket,
            local_addr,
            shared: Arc::new(Shared {
                root,
                transfer_addr,
                stats: Arc::new(TftpStats::default()),
            }),
            limit: Arc::new(Semaphore::new(MAX_TRANSFERS)),
        })
    }

    /// The address actually bound (useful when binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The server's counters; they stay readable after [`run`](Self::run) ends.
    pub fn stats(&self) -> Arc<TftpStats> {
        self.shared.stats.clone()
    }

    /// Serves until `shutdown` becomes true (or its sender is dropped).
    ///
    /// Transfers still running then are ended with ERROR 0 ("server shutting
    /// down") rather than awaited, so that shutdown takes no longer than a
    /// round trip; the client's firmware retries its boot.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let (stop, _) = watch::channel(false);
        let mut transfers = JoinSet::new();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            if *shutdown.borrow_and_update() {
                break;
            }
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                Some(joined) = transfers.join_next(), if !transfers.is_empty() => {
                    if let Err(e) = joined {
                        tracing::error!(error = %e, "TFTP transfer task failed");
                    }
                }
                received = self.socket.recv_from(&mut buf) => match received {
                    Ok((len, client)) => {
                        self.on_request(&buf[..len], client, &mut transfers, &stop).await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "TFTP receive failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                },
            }
        }
        let _ = stop.send(true);
        while transfers.join_next().await.is_some() {}
        tracing::info!(addr = %self.local_addr, "TFTP server stopped");
    }

    /// Handles one datagram that arrived on the listening socket.
    async fn on_request(
        &self,
        datagram: &[u8],
        client: SocketAddr,
        transfers: &mut JoinSet<()>,
        stop: &watch::Sender<bool>,
    ) {
        let stats = &self.shared.stats;
        let request = match parse(datagram) {
            Ok(Packet::Rrq(request)) => request,
            Ok(Packet::Wrq(request)) => {
                tracing::warn!(%client, file = request.filename, "TFTP write request refused");
                bump(&stats.requests_refused, 1);
                self.reply_error(
                    client,
                    ErrorCode::AccessViolation,
                    "this server is read-only",
                )
                .await;
                return;
            }
            Ok(Packet::Error { code, message }) => {
                // Never answer an ERROR: two confused peers would loop.
                tracing::debug!(%client, code, %message, "ERROR on the TFTP listening port ignored");
                return;
            }
            Ok(other) => {
                tracing::debug!(%client, packet = other.kind(), "non-request on the TFTP listening port");
                self.reply_error(
                    client,
                    ErrorCode::IllegalOperation,
                    "expected a read request",
                )
                .await;
                return;
            }
            Err(e) => {
                if datagram.starts_with(&OP_ERROR.to_be_bytes()) {
                    return;
                }
                tracing::warn!(%client, error = %e, "malformed TFTP request");
                bump(&stats.requests_refused, 1);
                let message = format!("malformed request: {e}");
                self.reply_error(client, ErrorCode::IllegalOperation, &message)
                    .await;
                return;
            }
        };
        if !request.mode.eq_ignore_ascii_case("octet") {
            tracing::warn!(%client, file = request.filename, mode = request.mode, "TFTP mode refused");
            bump(&stats.requests_refused, 1);
            let message = format!(
                "transfer mode {:?} is not supported: use octet (binary) mode",
                request.mode
            );
            self.reply_error(client, ErrorCode::IllegalOperation, &message)
                .await;
            return;
        }
        let Ok(permit) = self.limit.clone().try_acquire_owned() else {
            tracing::warn!(%client, file = request.filename, limit = MAX_TRANSFERS,
                "TFTP request dropped: too many transfers; the client will retry");
            bump(&stats.requests_refused, 1);
            return;
        };
        let transfer = Transfer {
            shared: self.shared.clone(),
            client,
            filename: request.filename.to_owned(),
            options: Negotiated::from_options(&request.options),
            stop: stop.subscribe(),
            _permit: permit,
        };
        tracing::debug!(%client, file = %transfer.filename, options = ?transfer.options, "TFTP read request");
        transfers.spawn(transfer.run());
    }

    async fn reply_error(&self, client: SocketAddr, code: ErrorCode, message: &str) {
        let mut out = Vec::new();
        Packet::error(code, message).encode(&mut out);
        if let Err(e) = self.socket.send_to(&out, client).await {
            tracing::debug!(%client, error = %e, "sending a TFTP error failed");
        }
    }
}

/// One read request being served, from its own socket.
struct Transfer {
    shared: Arc<Shared>,
    client: SocketAddr,
    filename: String,
    options: Negotiated,
    stop: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
}

/// Why a transfer did not complete.
#[derive(Debug, thiserror::Error)]
enum TransferError {
    #[error("no ACK for block {block} after {MAX_RETRANSMITS} retransmissions")]
    TimedOut { block: u16 },
    #[error("client sent ERROR {code}: {message}")]
    ClientAborted { code: u16, message: String },
    #[error("client sent an unexpected {0}")]
    Protocol(&'static str),
    #[error("reading the file failed: {0}")]
    Read(io::Error),
    #[error("network error: {0}")]
    Network(io::Error),
    #[error("interrupted by shutdown")]
    Shutdown,
}

impl Transfer {
    async fn run(mut self) {
        let started = std::time::Instant::now();
        let stats = self.shared.stats.clone();
        let socket = match UdpSocket::bind(self.shared.transfer_addr).await {
            Ok(socket) => socket,
            Err(e) => {
                tracing::warn!(client = %self.client, file = %self.filename, error = %e,
                    "TFTP transfer socket could not be bound");
                bump(&stats.transfers_failed, 1);
                return;
            }
        };
        let mut link = Link {
            socket,
            client: self.client,
            timeout: self.options.retransmit_timeout(),
            stop: &mut self.stop,
            buf: vec![0u8; TRANSFER_RECV_BUFFER],
        };

        let root = self.shared.root.clone();
        let filename = self.filename.clone();
        let opened = tokio::task::spawn_blocking(move || open_confined(&root, &filename))
            .await
            .unwrap_or(Err(PathRefusal::Unreadable));
        let (file, size) = match opened {
            Ok(opened) => opened,
            Err(refusal) => {
                tracing::warn!(client = %self.client, file = %self.filename, reason = %refusal,
                    "TFTP request refused");
                bump(&stats.requests_refused, 1);
                link.send_error(refusal.error_code(), &refusal.to_string())
                    .await;
                return;
            }
        };

        let blksize = self.options.block_size();
        let result = send_file(&mut link, file, size, self.options, &stats).await;
        let ms = started.elapsed().as_millis() as u64;
        let (client, file) = (self.client, &self.filename);
        match result {
            Ok(bytes) => {
                bump(&stats.transfers_completed, 1);
                tracing::info!(%client, file, bytes, blksize, ms, "TFTP transfer completed");
            }
            Err(TransferError::ClientAborted { code, message }) => {
                bump(&stats.transfers_aborted, 1);
                // OVMF probes the size this way before every real download.
                if code == u16::from(ErrorCode::OptionRefused) {
                    tracing::debug!(%client, file, code, %message, "TFTP client declined the options");
                } else {
                    tracing::info!(%client, file, code, %message, "TFTP client aborted the transfer");
                }
            }
            Err(e) => {
                bump(&stats.transfers_failed, 1);
                match &e {
                    TransferError::Read(_) => {
                        link.send_error(ErrorCode::NotDefined, "read error on the server")
                            .await
                    }
                    TransferError::Shutdown => {
                        link.send_error(ErrorCode::NotDefined, "server shutting down")
                            .await
                    }
                    TransferError::Protocol(_) => {
                        link.send_error(ErrorCode::IllegalOperation, "unexpected packet")
                            .await
                    }
                    TransferError::TimedOut { .. }
                    | TransferError::Network(_)
                    | TransferError::ClientAborted { .. } => {}
                }
                tracing::warn!(%client, file, blksize, ms, error = %e, "TFTP transfer failed");
            }
        }
    }
}

/// Sends the OACK if options were accepted, then the file block by block.
/// Returns the number of file bytes delivered.
async fn send_file(
    link: &mut Link<'_>,
    file: std::fs::File,
    size: u64,
    options: Negotiated,
    stats: &TftpStats,
) -> Result<u64, TransferError> {
    if options.needs_oack() {
        let values = options.oack_values(size);
        let oack = Packet::Oack {
            options: values.iter().map(|(n, v)| (*n, v.as_str())).collect(),
        };
        let mut out = Vec::new();
        oack.encode(&mut out);
        link.send_until_acked(&out, 0).await?;
    }

    let blksize = options.block_size();
    let capacity = READ_BUFFER.max(blksize);
    let mut reader = BufReader::with_capacity(capacity, tokio::fs::File::from_std(file));
    let mut packet = Vec::with_capacity(4 + blksize);
    let mut block: u16 = 1;
    let mut delivered: u64 = 0;
    loop {
        packet.clear();
        put_data_header(&mut packet, block);
        packet.resize(4 + blksize, 0);
        let len = read_full(&mut reader, &mut packet[4..])
            .await
            .map_err(TransferError::Read)?;
        packet.truncate(4 + len);
        bump(&stats.bytes_sent, len as u64);
        link.send_until_acked(&packet, block).await?;
        delivered += len as u64;
        // A short block (possibly empty) tells the client the file ended.
        if len < blksize {
            return Ok(delivered);
        }
        // Past block 65535 the numbering wraps to 0, as most clients expect.
        block = block.wrapping_add(1);
    }
}

/// Fills `buf` from `reader` unless the file ends first; returns the bytes read.
async fn read_full<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]).await {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// A transfer's socket and its peer: lock-step send, wait, retransmit.
struct Link<'s> {
    socket: UdpSocket,
    /// The client's transfer ID; datagrams from anywhere else are turned away.
    client: SocketAddr,
    timeout: Duration,
    stop: &'s mut watch::Receiver<bool>,
    buf: Vec<u8>,
}

impl Link<'_> {
    /// Sends `packet` and waits for the ACK of `block`, resending `packet` only
    /// when the timeout expires.
    ///
    /// Duplicate and stale ACKs are ignored rather than answered: resending on
    /// them would double every packet from then on (the "sorcerer's
    /// apprentice" bug of RFC 1350). Datagrams from another address or port
    /// get ERROR 5 and do not disturb the transfer or its timer.
    async fn send_until_acked(&mut self, packet: &[u8], block: u16) -> Result<(), TransferError> {
        self.send(packet).await?;
        let mut retransmits = 0;
        let mut deadline = Instant::now() + self.timeout;
        loop {
            let received = tokio::select! {
                received = tokio::time::timeout_at(deadline, self.socket.recv_from(&mut self.buf)) => received,
                _ = self.stop.changed() => return Err(TransferError::Shutdown),
            };
            let (len, from) = match received {
                Err(_elapsed) => {
                    if retransmits == MAX_RETRANSMITS {
                        return Err(TransferError::TimedOut { block });
                    }
                    retransmits += 1;
                    tracing::debug!(client = %self.client, block, retransmits, "TFTP retransmission");
                    self.send(packet).await?;
                    deadline = Instant::now() + self.timeout;
                    continue;
                }
                Ok(Err(e)) => return Err(TransferError::Network(e)),
                Ok(Ok(received)) => received,
            };
            let datagram = &self.buf[..len];
            if from != self.client {
                self.turn_away(from, datagram).await;
                continue;
            }
            match parse(datagram) {
                Ok(Packet::Ack { block: acked }) if acked == block => return Ok(()),
                Ok(Packet::Ack { .. }) => {}
                Ok(Packet::Error { code, message }) => {
                    return Err(TransferError::ClientAborted {
                        code,
                        message: message.into_owned(),
                    })
                }
                Ok(other) => return Err(TransferError::Protocol(other.kind())),
                // Garbage from the right port: ignore it, a retransmission
                // or the real ACK will follow.
                Err(e) => {
                    tracing::debug!(client = %self.client, error = %e, "malformed TFTP packet ignored")
                }
            }
        }
    }

    async fn send(&self, packet: &[u8]) -> Result<(), TransferError> {
        self.socket
            .send_to(packet, self.client)
            .await
            .map(drop)
            .map_err(TransferError::Network)
    }

    /// Answers a datagram from a stranger with ERROR 5 (RFC 1350, section 4),
    /// unless it is an ERROR itself.
    async fn turn_away(&self, from: SocketAddr, datagram: &[u8]) {
        tracing::debug!(client = %self.client, %from, "TFTP packet from an unknown transfer ID");
        if datagram.starts_with(&OP_ERROR.to_be_bytes()) {
            return;
        }
        let mut out = Vec::new();
        Packet::error(ErrorCode::UnknownTransferId, "unknown transfer ID").encode(&mut out);
        let _ = self.socket.send_to(&out, from).await;
    }

    /// Best effort: the transfer is over whether or not this arrives.
    async fn send_error(&self, code: ErrorCode, message: &str) {
        let mut out = Vec::new();
        Packet::error(code, message).encode(&mut out);
        let _ = self.socket.send_to(&out, self.client).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(packet: &Packet<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        packet.encode(&mut out);
        out
    }

    fn round_trip(packet: Packet<'_>) {
        let bytes = encoded(&packet);
        assert_eq!(parse(&bytes), Ok(packet));
    }

    #[test]
    fn rrq_wire_format_matches_rfc() {
        let bytes = b"\x00\x01ipxe.efi\x00octet\x00tsize\x000\x00blksize\x001468\x00";
        let expected = Packet::Rrq(Request {
            filename: "ipxe.efi",
            mode: "octet",
            options: vec![("tsize", "0"), ("blksize", "1468")],
        });
        assert_eq!(parse(bytes), Ok(expected.clone()));
        assert_eq!(encoded(&expected), bytes);
    }

    #[test]
    fn every_packet_type_round_trips() {
        round_trip(Packet::Rrq(Request {
            filename: "undionly.kpxe",
            mode: "octet",
            options: vec![],
        }));
        round_trip(Packet::Wrq(Request {
            filename: "dir/x",
            mode: "netascii",
            options: vec![("blksize", "512"), ("x", "")],
        }));
        round_trip(Packet::Data {
            block: 65535,
            data: b"\x00\x01binary\xff",
        });
        round_trip(Packet::Data {
            block: 0,
            data: b"",
        });
        round_trip(Packet::Ack { block: 0 });
        round_trip(Packet::Ack { block: 40000 });
        round_trip(Packet::error(ErrorCode::OptionRefused, "tsize refused"));
        round_trip(Packet::error(ErrorCode::NotDefined, ""));
        round_trip(Packet::Oack {
            options: vec![("blksize", "1468"), ("tsize", "1048576")],
        });
        round_trip(Packet::Oack { options: vec![] });
    }

    #[test]
    fn data_ack_and_error_wire_formats() {
        assert_eq!(
            encoded(&Packet::Data {
                block: 0x0102,
                data: b"ab"
            }),
            b"\x00\x03\x01\x02ab"
        );
        assert_eq!(encoded(&Packet::Ack { block: 7 }), b"\x00\x04\x00\x07");
        assert_eq!(
            encoded(&Packet::error(ErrorCode::UnknownTransferId, "who?")),
            b"\x00\x05\x00\x05who?\x00"
        );
    }

    #[test]
    fn too_short_packets_are_truncated() {
        assert_eq!(parse(b""), Err(PacketError::Truncated));
        assert_eq!(parse(b"\x00"), Err(PacketError::Truncated));
        assert_eq!(parse(b"\x00\x03\x00"), Err(PacketError::Truncated));
        assert_eq!(parse(b"\x00\x04"), Err(PacketError::Truncated));
        assert_eq!(parse(b"\x00\x05\x00"), Err(PacketError::Truncated));
    }

    #[test]
    fn odd_opcodes_are_refused() {
        assert_eq!(
            parse(b"\x00\x00abc\x00"),
            Err(PacketError::UnknownOpcode(0))
        );
        assert_eq!(parse(b"\x00\x07"), Err(PacketError::UnknownOpcode(7)));
        assert_eq!(
            parse(b"\xff\xff\x00\x01"),
            Err(PacketError::UnknownOpcode(0xffff))
        );
        assert_eq!(parse(b"\x01\x00"), Err(PacketError::UnknownOpcode(256)));
    }

    #[test]
    fn requests_need_their_nul_terminators() {
        assert_eq!(
            parse(b"\x00\x01"),
            Err(PacketError::Unterminated(Field::Filename))
        );
        assert_eq!(
            parse(b"\x00\x01ipxe.efi"),
            Err(PacketError::Unterminated(Field::Filename))
        );
        assert_eq!(
            parse(b"\x00\x01ipxe.efi\x00"),
            Err(PacketError::Unterminated(Field::Mode))
        );
        assert_eq!(
            parse(b"\x00\x02ipxe.efi\x00octet"),
            Err(PacketError::Unterminated(Field::Mode))
        );
        assert_eq!(
            parse(b"\x00\x01f\x00octet\x00tsize"),
            Err(PacketError::Unterminated(Field::OptionName))
        );
        assert_eq!(
            parse(b"\x00\x01f\x00octet\x00tsize\x00"),
            Err(PacketError::Unterminated(Field::OptionValue))
        );
        assert_eq!(
            parse(b"\x00\x01f\x00octet\x00tsize\x000"),
            Err(PacketError::Unterminated(Field::OptionValue))
        );
        assert_eq!(
            parse(b"\x00\x06blksize\x00"),
            Err(PacketError::Unterminated(Field::OptionValue))
        );
    }

    #[test]
    fn request_strings_must_be_utf8() {
        assert_eq!(
            parse(b"\x00\x01\xff\xfe\x00octet\x00"),
            Err(PacketError::NotUtf8(Field::Filename))
        );
        assert_eq!(
            parse(b"\x00\x01f\x00oct\xc3\x00"),
            Err(PacketError::NotUtf8(Field::Mode))
        );
        assert_eq!(
            parse(b"\x00\x01f\x00octet\x00\x80\x001\x00"),
            Err(PacketError::NotUtf8(Field::OptionName))
        );
        assert_eq!(
            parse(b"\x00\x06tsize\x00\xc0\x00"),
            Err(PacketError::NotUtf8(Field::OptionValue))
        );
    }

    #[test]
    fn trailing_nul_padding_is_ignored_but_empty_option_names_are_not() {
        assert_eq!(
            parse(b"\x00\x01f\x00octet\x00tsize\x000\x00\x00\x00\x00"),
            Ok(Packet::Rrq(Request {
                filename: "f",
                mode: "octet",
                options: vec![("tsize", "0")],
            }))
        );
        assert_eq!(
            parse(b"\x00\x01f\x00octet\x00\x00x\x00"),
            Err(PacketError::EmptyOptionName)
        );
    }

    #[test]
    fn empty_strings_parse_and_are_left_to_the_server() {
        assert_eq!(
            parse(b"\x00\x01\x00\x00"),
            Ok(Packet::Rrq(Request {
                filename: "",
                mode: "",
                options: vec![],
            }))
        );
    }

    #[test]
    fn error_packets_parse_leniently() {
        // OVMF's refusal of an OACK.
        assert_eq!(
            parse(b"\x00\x05\x00\x08option refused\x00"),
            Ok(Packet::error(ErrorCode::OptionRefused, "option refused"))
        );
        // No NUL, no message, junk after the NUL, bytes that are not UTF-8.
        assert_eq!(
            parse(b"\x00\x05\x00\x08abc"),
            Ok(Packet::error(ErrorCode::OptionRefused, "abc"))
        );
        assert_eq!(
            parse(b"\x00\x05\x12\x34"),
            Ok(Packet::Error {
                code: 0x1234,
                message: "".into()
            })
        );
        assert_eq!(
            parse(b"\x00\x05\x00\x00hi\x00junk"),
            Ok(Packet::error(ErrorCode::NotDefined, "hi"))
        );
        assert_eq!(
            parse(b"\x00\x05\x00\x00a\xffb\x00"),
            Ok(Packet::error(ErrorCode::NotDefined, "a\u{fffd}b"))
        );
    }

    #[test]
    fn ack_ignores_trailing_bytes() {
        assert_eq!(
            parse(b"\x00\x04\x00\x02\x00\x00"),
            Ok(Packet::Ack { block: 2 })
        );
    }

    #[test]
    fn encode_stops_strings_at_nul() {
        let bytes = encoded(&Packet::error(ErrorCode::NotDefined, "a\0b"));
        assert_eq!(bytes, b"\x00\x05\x00\x00a\x00");
    }

    #[test]
    fn huge_option_values_parse_and_are_clamped_or_ignored() {
        let big = "9".repeat(10_000);
        let mut bytes = b"\x00\x01f\x00octet\x00blksize\x00".to_vec();
        bytes.extend_from_slice(big.as_bytes());
        bytes.extend_from_slice(b"\x00timeout\x00");
        bytes.extend_from_slice(big.as_bytes());
        bytes.extend_from_slice(b"\x00tsize\x00");
        bytes.extend_from_slice(big.as_bytes());
        bytes.push(0);
        let Ok(Packet::Rrq(request)) = parse(&bytes) else {
            panic!("a huge but well-framed request parses");
        };
        assert_eq!(request.options[0].1.len(), 10_000);
        assert_eq!(
            Negotiated::from_options(&request.options),
            Negotiated {
                blksize: Some(MAX_BLKSIZE),
                timeout: None,
                tsize: true,
            }
        );
    }

    #[test]
    fn blksize_is_clamped_and_small_or_bogus_values_ignored() {
        let blksize = |value| Negotiated::from_options(&[("blksize", value)]).blksize;
        assert_eq!(blksize("1468"), Some(1468));
        assert_eq!(blksize("8"), Some(8));
        assert_eq!(blksize("65464"), Some(65464));
        assert_eq!(blksize("65465"), Some(MAX_BLKSIZE));
        assert_eq!(blksize("18446744073709551616"), Some(MAX_BLKSIZE));
        assert_eq!(blksize("7"), None);
        assert_eq!(blksize("0"), None);
        assert_eq!(blksize(""), None);
        assert_eq!(blksize("+1468"), None);
        assert_eq!(blksize("-1"), None);
        assert_eq!(blksize("1468 "), None);
        assert_eq!(blksize("0x600"), None);
    }

    #[test]
    fn timeout_must_be_between_1_and_255_seconds() {
        let timeout = |value| Negotiated::from_options(&[("timeout", value)]).timeout;
        assert_eq!(timeout("1"), Some(1));
        assert_eq!(timeout("255"), Some(255));
        assert_eq!(timeout("0"), None);
        assert_eq!(timeout("256"), None);
        assert_eq!(timeout("x"), None);
        let negotiated = Negotiated::from_options(&[("timeout", "3")]);
        assert_eq!(negotiated.retransmit_timeout(), Duration::from_secs(3));
        assert_eq!(Negotiated::default().retransmit_timeout(), DEFAULT_TIMEOUT);
    }

    #[test]
    fn negotiation_is_case_insensitive_first_wins_and_skips_unknown_options() {
        let negotiated = Negotiated::from_options(&[
            ("windowsize", "8"),
            ("BLKSIZE", "1024"),
            ("blksize", "2048"),
            ("TSize", "0"),
        ]);
        assert_eq!(
            negotiated,
            Negotiated {
                blksize: Some(1024),
                timeout: None,
                tsize: true,
            }
        );
        assert_eq!(negotiated.block_size(), 1024);
        assert_eq!(
            negotiated.oack_values(1234),
            vec![
                ("blksize", "1024".to_string()),
                ("tsize", "1234".to_string())
            ]
        );
    }

    #[test]
    fn no_accepted_option_means_no_oack() {
        assert!(!Negotiated::from_options(&[]).needs_oack());
        assert!(!Negotiated::from_options(&[("windowsize", "4"), ("blksize", "2")]).needs_oack());
        assert_eq!(Negotiated::from_options(&[]).block_size(), 512);
        assert!(Negotiated::from_options(&[("tsize", "0")]).needs_oack());
    }

    #[test]
    fn relative_path_keeps_only_normal_components() {
        assert_eq!(relative_path("ipxe.efi"), Ok(PathBuf::from("ipxe.efi")));
        assert_eq!(relative_path("/ipxe.efi"), Ok(PathBuf::from("ipxe.efi")));
        assert_eq!(
            relative_path("//efi/./x64//snponly.efi"),
            Ok(PathBuf::from("efi/x64/snponly.efi"))
        );
        assert_eq!(
            relative_path("/etc/passwd"),
            Ok(PathBuf::from("etc/passwd"))
        );
        assert_eq!(
            relative_path("../etc/passwd"),
            Err(PathRefusal::ParentComponent)
        );
        assert_eq!(
            relative_path("a/../../b"),
            Err(PathRefusal::ParentComponent)
        );
        assert_eq!(relative_path("a/.."), Err(PathRefusal::ParentComponent));
        assert_eq!(
            relative_path("..\\etc\\passwd"),
            Err(PathRefusal::Backslash)
        );
        assert_eq!(relative_path("a\0b"), Err(PathRefusal::Nul));
        assert_eq!(relative_path(""), Err(PathRefusal::Empty));
        assert_eq!(relative_path("/./"), Err(PathRefusal::Empty));
        // Dots inside a name are just a name.
        assert_eq!(relative_path("...x/..y"), Ok(PathBuf::from("...x/..y")));
    }

    #[test]
    fn open_confined_refuses_escapes_and_non_files() {
        let root_dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(root_dir.path()).expect("canonicalize");
        std::fs::write(root.join("ipxe.efi"), b"efi").expect("write");
        std::fs::create_dir(root.join("sub")).expect("mkdir");
        std::fs::write(root.join("sub/inner"), b"inner").expect("write");
        std::fs::write(outside.path().join("secret"), b"secret").expect("write");
        std::os::unix::fs::symlink(outside.path().join("secret"), root.join("escape"))
            .expect("symlink");
        std::os::unix::fs::symlink(outside.path(), root.join("escape-dir")).expect("symlink");
        std::os::unix::fs::symlink("sub/inner", root.join("alias")).expect("symlink");

        let size = |name| open_confined(&root, name).map(|(_, size)| size);
        assert_eq!(size("ipxe.efi"), Ok(3));
        assert_eq!(size("/sub/inner"), Ok(5));
        assert_eq!(size("alias"), Ok(5));
        assert_eq!(size("escape"), Err(PathRefusal::OutsideRoot));
        assert_eq!(size("escape-dir/secret"), Err(PathRefusal::OutsideRoot));
        assert_eq!(size("missing"), Err(PathRefusal::NotFound));
        assert_eq!(size("ipxe.efi/x"), Err(PathRefusal::NotFound));
        assert_eq!(size("sub"), Err(PathRefusal::NotAFile));
        assert_eq!(size("/"), Err(PathRefusal::Empty));
        assert_eq!(
            size("sub/../../etc/passwd"),
            Err(PathRefusal::ParentComponent)
        );
        assert_eq!(PathRefusal::NotFound.error_code(), ErrorCode::FileNotFound);
        assert_eq!(
            PathRefusal::OutsideRoot.error_code(),
            ErrorCode::AccessViolation
        );
    }
}
