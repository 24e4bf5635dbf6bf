//! One NBD client connection to a provisioning server: the fixed newstyle
//! handshake with NBD_OPT_GO, then read requests with replies matched by
//! handle, so many requests are in flight at once.
//!
//! ```text
//!   read(offset, len) --request (handle)--> writer task (queued requests leave in one write)
//!   reader task <--simple reply (handle, data)-- socket
//!        `--> the waiting read's oneshot, by handle
//! ```
//!
//! When the socket fails, every waiting read gets an error and the
//! connection is dead for good: the failover layer above replaces it.
//!
//! The bytes are `vstream_nbd`'s, the codec the server speaks too; this
//! module only moves them: handles, the two tasks, the pending map.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use vstream_nbd::*;

/// How a request failed.
#[derive(Debug)]
pub enum Failure {
    /// The server answered with this errno: the request's own result.
    Server(u32),
    /// The connection failed; the server may never have seen the request.
    Connection(io::Error),
}

/// A request waiting for its reply: the reply's data length, the bytes to
/// leave free before the data, and where the reply goes.
type Pending = HashMap<u64, (u32, usize, oneshot::Sender<io::Result<Vec<u8>>>)>;

/// A live connection to one server's export.
pub struct Connection {
    requests: mpsc::UnboundedSender<Outgoing>,
    pending: Arc<Mutex<Pending>>,
    dead: Arc<AtomicBool>,
    next_handle: AtomicU64,
    /// Turns true when the socket has failed or closed (the reader ended).
    closed: tokio::sync::watch::Receiver<bool>,
    pub size: u64,
    pub server: String,
    /// The server's API URL, from the login that chose it.
    pub api: String,
}

fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Connection {
    /// Connects to `addr` and opens `export`, within `timeout`; inside TLS
    /// (STARTTLS first) when `tls` is given.
    pub async fn open(
        reply: &vstream_api::LoginReply,
        timeout: Duration,
        keepalive: &vstream_service::tcp::Keepalive,
        tls: Option<&vstream_service::ClientTls>,
    ) -> io::Result<Connection> {
        let (addr, export) = (reply.nbd.as_str(), reply.export.as_str());
        let connect = async {
            let mut s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            // A server that vanishes (power loss, a cut link) while no read
            // is waiting is found too, and the agent fails over.
            if let Err(e) = vstream_service::tcp::configure(&s, keepalive) {
                tracing::warn!(%addr, error = %e, "setting TCP keepalive failed; a vanished server is found only by the read deadline");
            }
            greet(&mut s).await?;
            let Some(tls) = tls else {
                let size = go(&mut s, export).await?.size;
                return Ok::<_, io::Error>((Link::Plain(s), size));
            };
            starttls(&mut s).await?;
            let mut s = tls
                .connect(addr, s)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("TLS with {addr}: {e}")))?;
            let size = go(&mut s, export).await?.size;
            Ok((Link::Tls(Box::new(s)), size))
        };
        let (link, size) = tokio::time::timeout(timeout, connect).await.map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer from {addr} within {timeout:?}"),
            )
        })??;
        let pending: Arc<Mutex<Pending>> = Arc::default();
        let dead = Arc::new(AtomicBool::new(false));
        let (requests, queue) = mpsc::unbounded_channel();
        let (ended, closed) = tokio::sync::watch::channel(false);
        match link {
            Link::Plain(s) => {
                let (reader, writer) = s.into_split();
                start(reader, writer, &pending, &dead, ended, queue);
            }
            Link::Tls(s) => {
                let (reader, writer) = tokio::io::split(*s);
                start(reader, writer, &pending, &dead, ended, queue);
            }
        }
        Ok(Connection {
            requests,
            pending,
            dead,
            next_handle: AtomicU64::new(1),
            closed,
            size,
            server: reply.server.clone(),
            api: reply.api.clone(),
        })
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// Waits until the connection is dead: its socket failed, or the server
    /// closed it (let the device go).
    pub async fn closed(&self) {
        let mut closed = self.closed.clone();
        let _ = closed.wait_for(|c| *c).await;
    }

    /// Sends one request (`payload` is WRITE's data) and waits for its reply;
    /// a READ's reply carries `len` bytes, after `headroom` zero bytes the
    /// caller may fill (its own reply header: the data is then never copied).
    pub async fn request(
        &self,
        command: Command,
        flags: u16,
        (offset, length): (u64, u32),
        payload: &[u8],
        headroom: usize,
    ) -> Result<Vec<u8>, Failure> {
        let closed = || {
            Failure::Connection(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "connection is closed",
            ))
        };
        if self.is_dead() {
            return Err(closed());
        }
        let reply_len = if command == Command::Read { length } else { 0 };
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .insert(handle, (reply_len, headroom, tx));
        if self.is_dead() {
            // The reader may have failed the waiting requests just before.
            self.pending.lock().remove(&handle);
            return Err(closed());
        }
        let mut req = Vec::with_capacity(REQUEST_HEADER_LEN + payload.len());
        let header = Request {
            flags,
            command,
            cookie: handle,
            offset,
            length,
        };
        encode_request(&mut req, &header);
        req.extend_from_slice(payload);
        if self.requests.send(Outgoing::Request(req)).is_err() {
            self.pending.lock().remove(&handle);
            return Err(closed());
        }
        match rx.await {
            Ok(Ok(data)) => Ok(data),
            Ok(Err(e)) => Err(match reply_errno_of(&e) {
                Some(errno) => Failure::Server(errno),
                None => Failure::Connection(e),
            }),
            Err(_) => Err(closed()),
        }
    }

    /// Sends NBD_CMD_DISC and closes.
    pub async fn disconnect(&self) {
        let mut req = Vec::with_capacity(REQUEST_HEADER_LEN);
        let disc = Request {
            flags: 0,
            command: Command::Disc,
            cookie: 0,
            offset: 0,
            length: 0,
        };
        encode_request(&mut req, &disc);
        let (done, wait) = oneshot::channel();
        if self.requests.send(Outgoing::Close(req, done)).is_ok() {
            let _ = wait.await;
        }
    }
}

/// A connection's socket, plain or inside TLS.
enum Link {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Starts the reader and the writer task of a connection.
fn start<R, W>(
    reader: R,
    writer: W,
    pending: &Arc<Mutex<Pending>>,
    dead: &Arc<AtomicBool>,
    ended: tokio::sync::watch::Sender<bool>,
    queue: mpsc::UnboundedReceiver<Outgoing>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // Big enough for a burst of small replies; small enough that the
    // data a header read pulls in behind it (and copies) stays small.
    let mut reader = tokio::io::BufReader::with_capacity(READ_BUFFER, reader);
    let (p, d) = (pending.clone(), dead.clone());
    tokio::spawn(async move {
        let err = receive(&mut reader, &p).await;
        d.store(true, Ordering::SeqCst);
        let waiting: Vec<_> = p.lock().drain().collect();
        for (_, (_, _, tx)) in waiting {
            let _ = tx.send(Err(io::Error::new(err.kind(), err.to_string())));
        }
        ended.send_replace(true);
    });
    tokio::spawn(send(writer, queue));
}

/// What the writer task sends.
enum Outgoing {
    Request(Vec<u8>),
    /// The last request (DISC); then the socket closes and `done` fires.
    Close(Vec<u8>, oneshot::Sender<()>),
}

/// Writes requests as they come; all those queued meanwhile leave in one write.
async fn send<W: AsyncWrite + Unpin>(mut w: W, mut queue: mpsc::UnboundedReceiver<Outgoing>) {
    let mut buf = Vec::with_capacity(64 * REQUEST_HEADER_LEN);
    while let Some(first) = queue.recv().await {
        let mut next = Some(first);
        let mut close = None;
        while let Some(out) = next.take() {
            match out {
                Outgoing::Request(r) => buf.extend_from_slice(&r),
                Outgoing::Close(r, done) => {
                    buf.extend_from_slice(&r);
                    close = Some(done);
                    break;
                }
            }
            next = queue.try_recv().ok();
        }
        // A failed write shows up in the reader too, which fails every read.
        // Flushed: inside TLS the last records may wait in the session
        // otherwise (a no-op on a plain socket).
        if w.write_all(&buf).await.is_err() || w.flush().await.is_err() {
            return;
        }
        buf.clear();
        if let Some(done) = close {
            let _ = w.shutdown().await;
            let _ = done.send(());
            return;
        }
    }
}

/// Replies are read through a buffer of this size.
const READ_BUFFER: usize = 64 * 1024;
/// A reply's data past what the read buffer holds goes straight from the
/// socket into the reply once this much is left: no copy through the buffer.
const DIRECT_READ: usize = 16 * 1024;

/// Dispatches replies until the socket fails; returns why it stopped.
async fn receive<R: tokio::io::AsyncRead + Unpin>(
    r: &mut tokio::io::BufReader<R>,
    pending: &Mutex<Pending>,
) -> io::Error {
    loop {
        let mut head = [0u8; SIMPLE_REPLY_LEN];
        if let Err(e) = r.read_exact(&mut head).await {
            return e;
        }
        // Only simple replies: structured ones were never asked for.
        let SimpleReply {
            error,
            cookie: handle,
        } = match decode_simple_reply(&head) {
            Ok(Some((reply, _))) => reply,
            Ok(None) => return protocol("a whole reply header did not decode"),
            Err(e) => return protocol(e.to_string()),
        };
        let Some((len, headroom, tx)) = pending.lock().remove(&handle) else {
            return protocol(format!("reply to handle {handle}, which was never sent"));
        };
        if error != 0 {
            let _ = tx.send(Err(reply_errno(error)));
            continue;
        }
        // Into spare capacity: no zeroing of what the socket overwrites.
        let total = headroom + len as usize;
        let mut data = Vec::with_capacity(total);
        data.resize(headroom, 0);
        while data.len() < total {
            let want = total - data.len();
            let buffered = r.buffer();
            if !buffered.is_empty() {
                let n = buffered.len().min(want);
                data.extend_from_slice(&buffered[..n]);
                r.consume(n);
                continue;
            }
            let read = if want >= DIRECT_READ {
                r.get_mut().take(want as u64).read_buf(&mut data).await
            } else {
                (&mut *r).take(want as u64).read_buf(&mut data).await
            };
            match read {
                Ok(0) => {
                    let e = io::Error::new(io::ErrorKind::UnexpectedEof, "reply cut short");
                    let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                    return e;
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                    return e;
                }
            }
        }
        let _ = tx.send(Ok(data));
    }
}

/// What the handshake learned of an export.
#[derive(Debug)]
pub struct Opened {
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`).
    pub flags: u16,
}

/// The client side of the fixed newstyle handshake, with simple replies only
/// (what the kernel's NBD driver speaks too).
pub async fn handshake<S>(s: &mut S, export: &str) -> io::Result<Opened>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    greet(s).await?;
    go(s, export).await
}

/// Reads the server's greeting and answers with the client's flags.
async fn greet<S>(s: &mut S) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hello = [0u8; GREETING_LEN];
    s.read_exact(&mut hello).await?;
    let greeting = match decode_greeting(&hello) {
        Ok(Some((g, _))) if g.flags & FLAG_FIXED_NEWSTYLE != 0 => g,
        _ => return Err(protocol("not a fixed newstyle NBD server")),
    };
    let mut out = Vec::new();
    encode_client_flags(&mut out, greeting.client_flags());
    s.write_all(&out).await
}

/// One option's reply: its header and data.
async fn option_reply<S>(s: &mut S) -> io::Result<ServerReply>
where
    S: AsyncRead + Unpin,
{
    let mut head = [0u8; OPTION_REPLY_HEADER_LEN];
    s.read_exact(&mut head).await?;
    let header = match decode_option_reply_header(&head) {
        Ok(Some((header, _))) => header,
        _ => return Err(protocol("malformed option reply")),
    };
    let mut body = vec![0u8; header.length as usize];
    s.read_exact(&mut body).await?;
    Ok(decode_option_reply_data(&header, &body))
}

/// NBD_OPT_STARTTLS: once acknowledged, the TLS handshake follows on the
/// same socket.
async fn starttls<S>(s: &mut S) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = Vec::new();
    encode_option(&mut out, &ClientOption::StartTls);
    s.write_all(&out).await?;
    match option_reply(s).await? {
        ServerReply::Ack => Ok(()),
        ServerReply::Error { message, .. } => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("the server refused TLS: {message}"),
        )),
        other => Err(protocol(format!(
            "unexpected reply {} to NBD_OPT_STARTTLS",
            other.code()
        ))),
    }
}

/// NBD_OPT_GO for `export`.
async fn go<S>(s: &mut S, export: &str) -> io::Result<Opened>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = Vec::new();
    let go = ClientOption::Info {
        go: true,
        name: export.to_owned(),
        requests: Vec::new(),
    };
    encode_option(&mut out, &go);
    s.write_all(&out).await?;
    s.flush().await?;
    let mut opened = None;
    loop {
        match option_reply(s).await? {
            // An ACK's data, which it should not have, is ignored.
            ServerReply::Ack | ServerReply::Malformed { reply: REP_ACK, .. } => {
                return opened.ok_or_else(|| protocol("the server sent no export size"));
            }
            ServerReply::Info(Info::Export { size, flags }) => {
                opened = Some(Opened { size, flags });
            }
            // Information we did not ask for, or cannot read: not needed.
            ServerReply::Info(_)
            | ServerReply::Malformed {
                reply: REP_INFO, ..
            } => {}
            ServerReply::Error { message, .. } => {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("export {export:?} refused: {message}"),
                ));
            }
            other => {
                return Err(protocol(format!(
                    "unexpected option reply {}",
                    other.code()
                )))
            }
        }
    }
}

/// An errno the server answered, told apart from socket errors (which also
/// carry errnos) by a marker in the message.
const REPLY_MARK: &str = "the server answered errno";

fn reply_errno(errno: u32) -> io::Error {
    io::Error::new(
        io::Error::from_raw_os_error(errno as i32).kind(),
        ReplyErrno(errno),
    )
}

#[derive(Debug)]
struct ReplyErrno(u32);

impl std::fmt::Display for ReplyErrno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{REPLY_MARK} {}", self.0)
    }
}

impl std::error::Error for ReplyErrno {}

fn reply_errno_of(e: &io::Error) -> Option<u32> {
    e.get_ref()?.downcast_ref::<ReplyErrno>().map(|r| r.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    use vstream_nbd::handshake::{
        encode_info_block_size, encode_info_export, encode_option_error, encode_option_reply,
    };

    fn simple_reply(out: &mut Vec<u8>, handle: u64, error: u32, data: &[u8]) {
        vstream_nbd::transmission::encode_simple_reply(out, handle, error);
        out.extend_from_slice(data);
    }

    /// A server's half of the handshake, from the same codec: answers one
    /// option with `answer`'s replies and returns the option it got.
    async fn serve_one_option(
        mut s: tokio::io::DuplexStream,
        answer: impl FnOnce(&mut Vec<u8>, u32),
    ) -> ClientOption {
        let mut out = Vec::new();
        encode_greeting(&mut out);
        s.write_all(&out).await.unwrap();
        let mut flags = [0u8; 4];
        s.read_exact(&mut flags).await.unwrap();
        assert!(decode_client_flags(flags).unwrap(), "no zeroes was offered");
        let mut buf = Vec::new();
        let option = loop {
            if let Some((option, used)) = decode_option(&buf).unwrap() {
                assert_eq!(used, buf.len());
                break option;
            }
            s.read_buf(&mut buf).await.unwrap();
        };
        out.clear();
        answer(&mut out, option.code());
        s.write_all(&out).await.unwrap();
        option
    }

    #[tokio::test]
    async fn handshake_opens_the_export_with_go() {
        let (mut client, server) = tokio::io::duplex(4096);
        let server = tokio::spawn(serve_one_option(server, |out, option| {
            encode_info_block_size(out, option, 512, 4096, 32 << 20);
            encode_info_export(out, option, 1 << 30, TFLAG_HAS_FLAGS | TFLAG_READ_ONLY);
            encode_option_reply(out, option, REP_ACK, &[]);
        }));
        let opened = handshake(&mut client, "base/dev@1/abc").await.unwrap();
        assert_eq!(opened.size, 1 << 30);
        assert_eq!(opened.flags, TFLAG_HAS_FLAGS | TFLAG_READ_ONLY);
        assert_eq!(
            server.await.unwrap(),
            ClientOption::Info {
                go: true,
                name: "base/dev@1/abc".into(),
                requests: vec![],
            }
        );
    }

    #[tokio::test]
    async fn handshake_refusals_carry_the_servers_message() {
        let (mut client, server) = tokio::io::duplex(4096);
        let server = tokio::spawn(serve_one_option(server, |out, option| {
            encode_option_error(out, option, REP_ERR_UNKNOWN, "no such version");
        }));
        let err = handshake(&mut client, "disk").await.unwrap_err();
        server.await.unwrap();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(err.to_string(), "export \"disk\" refused: no such version");
        // An ACK without the export's size is no export.
        let (mut client, server) = tokio::io::duplex(4096);
        let server = tokio::spawn(serve_one_option(server, |out, option| {
            encode_option_reply(out, option, REP_ACK, &[]);
        }));
        let err = handshake(&mut client, "disk").await.unwrap_err();
        server.await.unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    /// Replies of every size, some larger than the read buffer, arriving in
    /// odd-sized pieces: each reaches its own request, whole, after its
    /// headroom, whether it came through the buffer or straight from the socket.
    #[tokio::test]
    async fn replies_of_every_size_reach_their_requests_whole() {
        let sizes = [
            4096usize,
            0,
            DIRECT_READ - 1,
            DIRECT_READ,
            READ_BUFFER + 17,
            256 << 10,
            1,
            3 * READ_BUFFER,
        ];
        let pending: Arc<Mutex<Pending>> = Arc::default();
        let mut stream = Vec::new();
        let mut waiting = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let handle = 100 + i as u64;
            let data: Vec<u8> = (0..n).map(|b| (b * 7 + i) as u8).collect();
            let (tx, rx) = oneshot::channel();
            let headroom = i % 3 * 14;
            pending.lock().insert(handle, (n as u32, headroom, tx));
            simple_reply(&mut stream, handle, 0, &data);
            waiting.push((rx, headroom, data));
        }
        let (tx, rx) = oneshot::channel();
        pending.lock().insert(7, (4096, 0, tx));
        simple_reply(&mut stream, 7, 5, &[]);
        let (mut w, r) = tokio::io::duplex(9_973);
        let writer = tokio::spawn(async move {
            for piece in stream.chunks(5_003) {
                w.write_all(piece).await.unwrap();
            }
        });
        let mut reader = tokio::io::BufReader::with_capacity(READ_BUFFER, r);
        let ended = receive(&mut reader, &pending).await;
        writer.await.unwrap();
        assert_eq!(ended.kind(), io::ErrorKind::UnexpectedEof, "{ended}");
        for (rx, headroom, data) in waiting {
            let got = rx.await.unwrap().unwrap();
            assert_eq!(got.len(), headroom + data.len());
            assert!(got[..headroom].iter().all(|b| *b == 0));
            assert!(
                got[headroom..] == data[..],
                "data of a {}-byte reply",
                data.len()
            );
        }
        let failed = rx.await.unwrap().unwrap_err();
        assert_eq!(reply_errno_of(&failed), Some(5));
        assert!(pending.lock().is_empty());
    }
}
