//! The NBD stream service, one front door onto a device's storage:
//! listeners, one task per connection, the handshake and transmission
//! phases over [`vstream_nbd`]'s codec, connection limits, TCP keepalive
//! and metrics; drain on shutdown. It serves whatever implements
//! [`Exports`]: the provisioning server's vDisks and device exports, or the
//! one device of a `vstream target` agent. It knows no farm, store or HTTP.
//!
//! ```text
//!   accept --> limits (all, per peer address) --> handshake (timeout)
//!          --> transmission (idle limit unless a device session) --> session end
//! ```
//!
//! No one client can take every connection: each peer address gets at most
//! `per_peer` of the `total`, and a connection that is not a device's and
//! does nothing for the idle limit is closed.

pub mod handshake;
pub mod iscsi;
pub mod transmission;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub mod limits;
pub mod metrics;
pub mod sink;
pub mod tcp;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;

pub use crate::limits::Limits;
use crate::limits::RefusalLog;
use crate::metrics::Metrics;
pub use crate::metrics::Refusal;
pub use crate::tls::{Certificate, Client, ClientTls, Tls, TlsMode};
use handshake::{HandshakeError, Outcome, Phase};
pub use sink::Sink;
use transmission::Ending;
pub use vstream_pipeline::Backend;

/// Where the NBD service listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Listen, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
        s.parse::<SocketAddr>().map(Listen::Tcp).map_err(|e| {
            format!("{s:?} is not HOST:PORT (an IP address and a port) or unix:PATH: {e}")
        })
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Why a device cannot open its export.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no export named {0:?}; exports are a vDisk name or device/DEVICE")]
    Unknown(String),
    /// A name no export can have (`device/..`); the sentence says why.
    #[error("invalid export name {0:?}: {1}; exports are VDISK, VDISK@VERSION or device/DEVICE")]
    Invalid(String, String),
    #[error("{0}")]
    Refused(String),
    /// Not this client's to open (`NBD_REP_ERR_POLICY`); counted and logged
    /// by reason.
    #[error("{1}")]
    Denied(Refusal, String),
    #[error("{0}")]
    Failed(String),
}

/// An export resolved for one connection.
pub struct Export {
    pub name: String,
    pub description: String,
    /// The device storage pipeline behind the export.
    pub backend: Arc<dyn Backend>,
    /// Present for device exports; ends the session's connection on drop.
    pub session: Option<Box<dyn SessionEnd>>,
}

/// Waits for SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}

/// A bound NBD listener.
/// What an NBD service serves: the provisioning server's vDisks and device
/// exports, or the one device of a `vstream target` agent.
pub trait Exports: Send + Sync + 'static {
    /// Resolves an export name for a new connection (`go`) or for a query.
    /// `client` says who asks: its address, and what its certificate proves.
    fn open<'a>(
        self: Arc<Self>,
        name: &'a str,
        client: &'a Client,
        go: bool,
    ) -> BoxFuture<'a, Result<Export, OpenError>>;
    /// Names and descriptions for NBD_OPT_LIST: what `client` may open.
    fn list<'a>(&'a self, client: &'a Client) -> BoxFuture<'a, Vec<(String, String)>>;
    fn structured_replies(&self) -> bool;
    fn handshake_timeout(&self) -> Duration;
    /// How long a connection to `export` may go without a request before it
    /// is closed; `None`: never (a device's session, which may idle for
    /// hours and ends by keepalive instead).
    fn idle_timeout(&self, _export: &Export) -> Option<Duration> {
        None
    }
    fn metrics(&self) -> &Metrics;
    /// How its TCP connections find a vanished peer.
    fn keepalive(&self) -> crate::tcp::Keepalive {
        crate::tcp::Keepalive::default()
    }
    /// Whether its connections may or must use TLS (see [`tls`]).
    fn tls(&self) -> Tls {
        Tls::off()
    }
}

/// Told when the connection holding an export ends with NBD_CMD_DISC.
pub trait SessionEnd: Send + Sync {
    fn ended_cleanly(&mut self);
    /// Turns true when the server lets the device go (a rebalance).
    fn released(&self) -> Option<watch::Receiver<bool>> {
        None
    }
}

/// A device's own export (`device/NAME`, `base/...`), as opposed to a vDisk
/// opened by a tool.
pub fn is_device_session(export: &str) -> bool {
    export.starts_with("device/") || export.starts_with("base/")
}

/// Most connections the kernel completes for a TCP listener before it
/// accepts them (capped by `net.core.somaxconn`). The standard library's 128
/// overflowed in a 500-device boot storm: the kernel dropped the ACKs past
/// it, and those devices held connections the server never saw, waiting for
/// a greeting that never came.
pub const TCP_BACKLOG: u32 = 4096;

/// A TCP listener on `addr` with a [`TCP_BACKLOG`] accept queue.
pub fn listen_tcp(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // As the standard library's bind: a restarted server takes its port back
    // while the last run's connections sit in TIME-WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(TCP_BACKLOG)
}

pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, std::path::PathBuf),
}

impl Listener {
    pub async fn bind(addr: &Listen) -> std::io::Result<Listener> {
        match addr {
            Listen::Tcp(a) => Ok(Listener::Tcp(listen_tcp(*a)?)),
            Listen::Unix(p) => {
                // A stale socket from a previous run would make bind fail.
                if std::fs::symlink_metadata(p)
                    .map(|m| m.file_type())
                    .is_ok_and(|t| {
                        use std::os::unix::fs::FileTypeExt;
                        t.is_socket()
                    })
                {
                    std::fs::remove_file(p)?;
                }
                let listener = UnixListener::bind(p)?;
                // Only this process's user (root, for the agent) may open
                // the disk through it.
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))?;
                Ok(Listener::Unix(listener, p.clone()))
            }
        }
    }

    pub fn local_addr(&self) -> String {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Accepts connections on `listener` until `shutdown` turns true, then waits
/// for every connection to finish its in-flight requests.
pub async fn serve(
    listener: Listener,
    exports: Arc<dyn Exports>,
    limits: Arc<Limits>,
    shutdown: watch::Receiver<bool>,
) {
    let keepalive = exports.keepalive();
    accept_loop(listener, keepalive, limits, shutdown, move |c, shutdown| {
        let exports = exports.clone();
        Box::pin(async move {
            connection(c.reader, c.writer, &c.peer, exports, shutdown).await;
        })
    })
    .await
}

/// One accepted connection, past the limits.
pub(crate) struct Accepted {
    pub reader: Box<dyn AsyncRead + Unpin + Send>,
    pub writer: Box<dyn Sink>,
    /// The client's address (`unix` on a unix socket).
    pub peer: String,
    /// The address it reached (a portal, for iSCSI discovery).
    pub local: String,
}

/// The accept loop of every front door: accepts on `listener` until
/// `shutdown` turns true, admits each connection against `limits` (all,
/// and per client address), and runs `handle` on it in a task of its own;
/// then waits for every connection to finish.
pub(crate) async fn accept_loop<F>(
    listener: Listener,
    keepalive: crate::tcp::Keepalive,
    limits: Arc<Limits>,
    mut shutdown: watch::Receiver<bool>,
    handle: F,
) where
    F: Fn(Accepted, watch::Receiver<bool>) -> BoxFuture<'static, ()>,
{
    let mut conns = JoinSet::new();
    let mut refusals = RefusalLog::default();
    loop {
        let accepted = tokio::select! {
            a = accept(&listener, keepalive) => a,
            _ = shutdown.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let conn = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // An IPv4 client of a dual-stack listener counts as its IPv4 address.
        let ip = conn
            .peer
            .parse::<std::net::SocketAddr>()
            .ok()
            .map(|a| a.ip().to_canonical());
        let permit = match limits.admit(ip) {
            Ok(p) => p,
            Err(why) => {
                refusals.note(&conn.peer, &why);
                continue;
            }
        };
        let task = handle(conn, shutdown.clone());
        conns.spawn(async move {
            task.await;
            drop(permit);
        });
    }
    while conns.join_next().await.is_some() {}
}

async fn accept(
    listener: &Listener,
    keepalive: crate::tcp::Keepalive,
) -> std::io::Result<Accepted> {
    match listener {
        Listener::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            configure_socket(&s, &peer, &keepalive)?;
            let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
            let (r, w) = s.into_split();
            Ok(Accepted {
                reader: Box::new(r),
                writer: Box::new(w),
                peer: peer.to_string(),
                local,
            })
        }
        Listener::Unix(l, path) => {
            let (s, _) = l.accept().await?;
            let (r, w) = s.into_split();
            Ok(Accepted {
                reader: Box::new(r),
                writer: Box::new(w),
                peer: "unix".to_string(),
                local: format!("unix:{}", path.display()),
            })
        }
    }
}

/// Sets up an accepted TCP connection: no Nagle delay, and keepalive with a
/// user timeout, so that a device that vanishes without a word (power loss, a
/// cut cable) is found and its session ends (see `crate::tcp`).
fn configure_socket(
    s: &tokio::net::TcpStream,
    peer: &std::net::SocketAddr,
    keepalive: &crate::tcp::Keepalive,
) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    if let Err(e) = crate::tcp::configure(s, keepalive) {
        tracing::warn!(%peer, error = %e, "setting TCP keepalive failed; a vanished peer may go unnoticed");
    }
    Ok(())
}

/// How a connection's handshake ended: on the plain stream, or inside TLS.
enum Handshaken<S> {
    Plain(S, Outcome),
    Tls(Box<tokio_rustls::server::TlsStream<S>>, Outcome),
}

/// The handshake of one connection, STARTTLS included: the greeting, the
/// options, and, if the client starts TLS, the TLS handshake and the
/// options again inside it.
async fn handshake<S>(
    mut stream: S,
    exports: &Arc<dyn Exports>,
    peer: &str,
) -> Result<Handshaken<S>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let tls = exports.tls();
    let no_zeroes = handshake::greet(&mut stream).await?;
    let mode = tls.acceptor().map_or(TlsMode::Off, |_| tls.mode);
    let client = Client::plain(peer);
    let outcome =
        handshake::options(&mut stream, exports, &client, no_zeroes, Phase::Plain(mode)).await?;
    let (Outcome::StartTls, Some(acceptor)) = (&outcome, tls.acceptor()) else {
        return Ok(Handshaken::Plain(stream, outcome));
    };
    let mut stream = match acceptor.accept(stream).await {
        Ok(s) => Box::new(s),
        Err(e) => {
            exports.metrics().refused(Refusal::BadCertificate);
            return Err(HandshakeError::Tls(e));
        }
    };
    Metrics::add(&exports.metrics().tls_connections, 1);
    let certificate =
        Certificate::of_peer(stream.get_ref().1).map_err(HandshakeError::Certificate)?;
    if let Some(c) = &certificate {
        tracing::debug!(%peer, name = ?c.name, serial = %c.serial, "client certificate");
    }
    let client = Client {
        addr: peer.to_owned(),
        tls: true,
        certificate,
    };
    let outcome = handshake::options(&mut stream, exports, &client, no_zeroes, Phase::Tls).await?;
    Ok(Handshaken::Tls(stream, outcome))
}

/// One connection from greeting to close. Every failure is logged once here.
/// The agent also calls it for the socket it hands the kernel (`--attach`).
pub async fn connection<R, W>(
    reader: R,
    writer: W,
    peer: &str,
    exports: Arc<dyn Exports>,
    shutdown: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: Sink + 'static,
{
    let metrics = exports.metrics();
    Metrics::add(&metrics.connections_total, 1);
    metrics.connections_open.fetch_add(1, Ordering::Relaxed);
    let stream = tokio::io::join(reader, writer);
    let timeout = exports.handshake_timeout();
    let handshaken = tokio::time::timeout(timeout, handshake(stream, &exports, peer)).await;
    let failed = |why: Option<&HandshakeError>| {
        Metrics::add(&metrics.handshake_failures, 1);
        match why {
            Some(e) => log_handshake_error(peer, e),
            None => tracing::info!(%peer, "handshake timed out after {} s", timeout.as_secs()),
        }
        metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
    };
    match handshaken {
        Ok(Ok(Handshaken::Plain(stream, Outcome::Go(neg)))) => {
            let (reader, writer) = stream.into_inner();
            transmit(reader, writer, neg, peer, &exports, shutdown).await;
        }
        Ok(Ok(Handshaken::Tls(stream, Outcome::Go(neg)))) => {
            let (reader, writer) = tokio::io::split(*stream);
            transmit(reader, writer, neg, peer, &exports, shutdown).await;
        }
        Ok(Ok(_)) => {
            tracing::debug!(%peer, "client ended the handshake");
            metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(Err(e)) => failed(Some(&e)),
        Err(_) => failed(None),
    }
}

/// Transmission on a negotiated connection, then its end: flushed, logged,
/// counted.
async fn transmit<R, W>(
    reader: R,
    writer: W,
    neg: handshake::Negotiated,
    peer: &str,
    exports: &Arc<dyn Exports>,
    shutdown: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin + Send,
    W: Sink + 'static,
{
    let metrics = exports.metrics();
    tracing::debug!(%peer, export = %neg.export.name, structured = neg.structured, "transmission starts");
    let result = transmission::serve(reader, writer, &neg, exports.clone(), shutdown).await;
    let mut neg = neg;
    match result {
        Ok(Ending::Disconnect) => {
            if let Some(s) = neg.export.session.as_mut() {
                s.ended_cleanly();
            }
            tracing::debug!(%peer, export = %neg.export.name, "client disconnected");
        }
        Ok(Ending::Dropped) => {
            tracing::info!(%peer, export = %neg.export.name, "client dropped the connection")
        }
        Ok(Ending::Released) => {
            tracing::info!(%peer, export = %neg.export.name, "the server let the device go (a rebalance, or device reset --force)")
        }
        Ok(Ending::Idle(after)) => {
            tracing::info!(%peer, export = %neg.export.name, "closed: no request for {} s (the idle limit of a connection that is not a device's)", after.as_secs())
        }
        Ok(Ending::Shutdown) => {
            tracing::debug!(%peer, export = %neg.export.name, "closed for shutdown")
        }
        Err(e) => {
            tracing::warn!(%peer, export = %neg.export.name, error = %e, "connection dropped")
        }
    }
    if let Err(e) = neg.export.backend.clone().flush().await {
        tracing::error!(%peer, export = %neg.export.name, error = %e, "flush at close failed");
    }
    drop(neg);
    metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
}

fn log_handshake_error(peer: &str, e: &handshake::HandshakeError) {
    use handshake::HandshakeError as H;
    match e {
        H::Closed => tracing::debug!(%peer, "client closed during the handshake"),
        H::ExportName { .. } => tracing::info!(%peer, error = %e, "export refused"),
        H::TlsRequired(_) => tracing::info!(%peer, error = %e, "refused: no TLS"),
        H::Tls(_) => tracing::info!(%peer, error = %e, "refused: TLS handshake failed"),
        _ => tracing::warn!(%peer, error = %e, "handshake failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A storm of devices connecting at once: the kernel completes every
    /// connection before the server gets round to accepting any, and each
    /// is then accepted. With the standard library's backlog (128) the
    /// connections past it were dropped by the kernel and their clients,
    /// connected on their side, waited for a greeting forever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_storm_of_connections_waits_in_the_accept_queue() {
        const N: usize = 300;
        let listener = listen_tcp("127.0.0.1:0".parse().unwrap()).expect("listen");
        let addr = listener.local_addr().unwrap();
        let clients = tokio::task::spawn_blocking(move || {
            let timeout = std::time::Duration::from_secs(5);
            (0..N)
                .map(|_| std::net::TcpStream::connect_timeout(&addr, timeout))
                .collect::<Result<Vec<_>, _>>()
        });
        // Nothing is accepted until every client is connected.
        let clients = clients.await.unwrap().expect("every connect completes");
        let mut accepted = 0;
        while accepted < N {
            let accept = tokio::time::timeout(std::time::Duration::from_secs(5), listener.accept());
            accept.await.expect("a queued connection").expect("accept");
            accepted += 1;
        }
        assert_eq!(clients.len(), N);
    }
}
