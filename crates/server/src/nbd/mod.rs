//! The NBD stream service: listeners, one task per connection, drain on shutdown.
//!
//! ```text
//!   accept --> limit (semaphore) --> handshake (timeout) --> transmission --> session end
//! ```

pub mod handshake;
pub mod transmission;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::config::Listen;
use crate::metrics::Metrics;
use crate::state::Server;
use transmission::Ending;

/// A bound NBD listener.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, std::path::PathBuf),
}

impl Listener {
    pub async fn bind(addr: &Listen) -> std::io::Result<Listener> {
        match addr {
            Listen::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a).await?)),
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
                Ok(Listener::Unix(UnixListener::bind(p)?, p.clone()))
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
    server: Arc<Server>,
    limit: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = accept(&listener) => a,
            _ = shutdown.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (reader, writer, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection refused: connection limit reached");
            continue;
        };
        let (server, shutdown) = (server.clone(), shutdown.clone());
        conns.spawn(async move {
            connection(reader, writer, &peer, server, shutdown).await;
            drop(permit);
        });
    }
    while conns.join_next().await.is_some() {}
}

type Halves = (
    Box<dyn AsyncRead + Unpin + Send>,
    Box<dyn AsyncWrite + Unpin + Send>,
    String,
);

async fn accept(listener: &Listener) -> std::io::Result<Halves> {
    match listener {
        Listener::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            s.set_nodelay(true)?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w), peer.to_string()))
        }
        Listener::Unix(l, _) => {
            let (s, _) = l.accept().await?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w), "unix".to_string()))
        }
    }
}

/// One connection from greeting to close. Every failure is logged once here.
async fn connection<R, W>(
    reader: R,
    writer: W,
    peer: &str,
    server: Arc<Server>,
    shutdown: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let metrics = &server.metrics;
    Metrics::add(&metrics.connections_total, 1);
    metrics.connections_open.fetch_add(1, Ordering::Relaxed);
    let mut stream = tokio::io::join(reader, writer);
    let timeout = Duration::from_secs(server.config.handshake_timeout_secs);
    let negotiated =
        tokio::time::timeout(timeout, handshake::negotiate(&mut stream, &server, peer)).await;
    let neg = match negotiated {
        Ok(Ok(Some(n))) => n,
        Ok(Ok(None)) => {
            tracing::debug!(%peer, "client ended the handshake");
            metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        Ok(Err(e)) => {
            Metrics::add(&metrics.handshake_failures, 1);
            log_handshake_error(peer, &e);
            metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        Err(_) => {
            Metrics::add(&metrics.handshake_failures, 1);
            tracing::info!(%peer, "handshake timed out after {} s", timeout.as_secs());
            metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
            return;
        }
    };
    tracing::debug!(%peer, export = %neg.export.name, structured = neg.structured, "transmission starts");
    let (reader, writer) = stream.into_inner();
    let result = transmission::serve(reader, writer, &neg, server.clone(), shutdown).await;
    let mut neg = neg;
    match result {
        Ok(Ending::Disconnect) => {
            if let Some(s) = neg.export.session.as_mut() {
                s.clean = true;
            }
            tracing::debug!(%peer, export = %neg.export.name, "client disconnected");
        }
        Ok(Ending::Dropped) => {
            tracing::info!(%peer, export = %neg.export.name, "client dropped the connection")
        }
        Ok(Ending::Shutdown) => {
            tracing::debug!(%peer, export = %neg.export.name, "closed for shutdown")
        }
        Err(e) => {
            tracing::warn!(%peer, export = %neg.export.name, error = %e, "connection dropped")
        }
    }
    if let Err(e) = neg.export.disk.flush() {
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
        _ => tracing::warn!(%peer, error = %e, "handshake failed"),
    }
}
