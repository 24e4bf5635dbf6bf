//! Serves the HTTP API, one task per connection, so that no client can hold
//! the API: a cap on connections in all and from one address, a deadline
//! for a request's headers, and an idle limit.
//!
//! ```text
//!   accept --> Limits::admit(peer ip) --> hyper HTTP/1 (header-read timeout)
//!          --> axum router (ConnectInfo = the peer)
//!   every second: no request running and no byte either way for the idle
//!   limit --> closed
//! ```
//!
//! An HTTPS listener (`--api-tls`) runs the TLS handshake first, within the
//! header deadline, and hands each request the client certificate it
//! verified, if the client showed one ([`PeerCertificate`]).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use vstream_service::limits::{Admitted, Limits, RefusalLog};

/// The API's deadlines.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub header: Duration,
    pub idle: Duration,
}

/// The client certificate of an HTTPS request, if its client showed one;
/// absent on plain HTTP.
#[derive(Debug, Clone)]
pub struct PeerCertificate(pub vstream_service::Certificate);

/// Present on every request that came over HTTPS, with or without a
/// client certificate.
#[derive(Debug, Clone, Copy)]
pub struct Https;

/// Accepts API connections until `shutdown`, then lets the running
/// requests finish; over TLS with `tls`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Arc<Limits>,
    timeouts: Timeouts,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    let mut refusals = RefusalLog::default();
    let mut stop = shutdown.clone();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "API accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let admitted = match limits.admit(Some(peer.ip().to_canonical())) {
            Ok(a) => a,
            Err(why) => {
                refusals.note(&format!("API {peer}"), &why);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        conns.spawn(accepted_connection(
            stream,
            peer,
            router.clone(),
            admitted,
            timeouts,
            tls.clone(),
            shutdown.clone(),
        ));
    }
    while conns.join_next().await.is_some() {}
}

/// Milliseconds since `start` of the last byte read or written.
struct Activity {
    start: Instant,
    last: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn idle_for(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last.load(Ordering::Relaxed)))
    }
}

/// The socket, noting each byte that moves.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

/// One accepted connection: its TLS handshake first on an HTTPS listener.
async fn accepted_connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    admitted: Admitted,
    timeouts: Timeouts,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity {
        start: Instant::now(),
        last: AtomicU64::new(0),
    });
    let io = Watched {
        inner: stream,
        activity: activity.clone(),
    };
    let Some(acceptor) = tls else {
        return connection(
            io, peer, router, admitted, timeouts, activity, None, shutdown,
        )
        .await;
    };
    let stream = match tokio::time::timeout(timeouts.header, acceptor.accept(io)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "API: refused: TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "API: TLS handshake timed out");
            return;
        }
    };
    let certificate = match vstream_service::Certificate::of_peer(stream.get_ref().1) {
        Ok(c) => Some(c.map(PeerCertificate)),
        Err(e) => {
            tracing::info!(%peer, error = %e, "API: refused: bad client certificate");
            return;
        }
    };
    connection(
        stream,
        peer,
        router,
        admitted,
        timeouts,
        activity,
        certificate,
        shutdown,
    )
    .await
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Counts a request while its handler runs.
struct Running(Arc<AtomicUsize>);

impl Running {
    fn new(n: &Arc<AtomicUsize>) -> Running {
        n.fetch_add(1, Ordering::Relaxed);
        Running(n.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[allow(clippy::too_many_arguments)]
async fn connection<S>(
    io: S,
    peer: SocketAddr,
    router: Router,
    admitted: Admitted,
    timeouts: Timeouts,
    activity: Arc<Activity>,
    // Over TLS: the client certificate, if it showed one.
    tls: Option<Option<PeerCertificate>>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let running = Arc::new(AtomicUsize::new(0));
    let counter = running.clone();
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        if let Some(certificate) = &tls {
            req.extensions_mut().insert(Https);
            if let Some(c) = certificate {
                req.extensions_mut().insert(c.clone());
            }
        }
        let mut router = router.clone();
        let guard = Running::new(&counter);
        async move {
            let response = tower_service::Service::call(&mut router, req).await;
            drop(guard);
            response
        }
    });
    let io = TokioIo::new(io);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let mut tick = tokio::time::interval(Duration::from_secs(1).min(timeouts.idle));
    let mut draining = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "API connection ended");
                }
                break;
            }
            _ = shutdown.wait_for(|s| *s), if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            _ = tick.tick() => {
                if running.load(Ordering::Relaxed) == 0 && activity.idle_for() >= timeouts.idle {
                    tracing::debug!(%peer, "API connection closed: idle for {} s", timeouts.idle.as_secs());
                    break;
                }
            }
        }
    }
    drop(admitted);
}
