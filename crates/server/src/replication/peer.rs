//! The peer protocol: HTTP on each server's API port, for servers of the
//! same farm only.
//!
//! ```text
//!   GET /peer/v1/vdisks/NAME/layers/FILE/meta               the layer's metadata (replica.rs)
//!   GET /peer/v1/vdisks/NAME/layers/FILE/data?from=C&to=C   its allocated chunks in [from, to)
//!   GET /peer/v1/vdisks/NAME/boot/HASH                      a boot file (kernel, initrd; boot.rs)
//!   POST /peer/v1/poke                                      "the catalog changed": reconcile now
//!   Authorization: Bearer <farm peer secret>     X-Vstream-Server: <the asking server>
//! ```
//!
//! A server answers only for layers of versions it holds verified and not
//! found corrupt since. There is no way to push: a server takes data only by
//! asking for it, and checks all it takes against the catalog's hashes.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde::Deserialize;
use vstream_image::replica::{self, SEGMENT_CHUNKS};
use vstream_image::Layer;

use vstream_client::{Agent, Client};

use crate::api::ApiError;
use crate::metrics::Metrics;
use crate::state::Server;

pub const SERVER_HEADER: &str = vstream_client::SERVER_HEADER;
/// Most chunks one data request may cover (1 GiB of logical disk; the
/// answer holds only what the layer has there, streamed).
pub const MAX_REQUEST_CHUNKS: u64 = 64 * SEGMENT_CHUNKS;

pub fn routes(server: Arc<Server>) -> Router<Arc<Server>> {
    Router::new()
        .route(
            "/peer/v1/vdisks/:name/layers/:file/meta",
            axum::routing::get(meta),
        )
        .route(
            "/peer/v1/vdisks/:name/layers/:file/data",
            axum::routing::get(data),
        )
        .route(
            "/peer/v1/vdisks/:name/boot/:hash",
            axum::routing::get(crate::boot::peer_file),
        )
        .route("/peer/v1/poke", axum::routing::post(poke))
        .layer(middleware::from_fn_with_state(server, require_peer))
}

async fn require_peer(State(server): State<Arc<Server>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let who = req
        .headers()
        .get(SERVER_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_owned();
    let Some(secret) = server.replication.secret() else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this server has not read the farm's peer secret yet",
        )
        .into_response();
    };
    match given {
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "peer requests need the farm's peer secret (Authorization: Bearer ...)",
        )
        .into_response(),
        Some(g) if !crate::api::constant_time_eq(g.as_bytes(), secret.as_bytes()) => {
            tracing::warn!(peer = %who, "a peer request with a wrong secret was refused");
            ApiError::new(
                StatusCode::FORBIDDEN,
                "not a server of this farm: wrong peer secret",
            )
            .into_response()
        }
        Some(_) => next.run(req).await,
    }
}

/// The layer `file` of `vdisk`, if this server may hand it out: a layer of
/// a sealed version it holds verified, not found corrupt since.
fn servable(server: &Server, vdisk: &str, file: &str) -> Result<Arc<Layer>, ApiError> {
    let props = server.store.properties(vdisk)?;
    let ok = props.versions.iter().any(|v| {
        v.is_sealed()
            && v.layers.iter().any(|f| f == file)
            && v.content_hash
                .as_deref()
                .is_some_and(|h| server.membership.is_verified(vdisk, v.number, h))
    });
    if !ok || server.replication.is_corrupt(vdisk, &[file.to_owned()]) {
        return Err(ApiError::not_found(format!(
            "this server holds no verified copy of layer {file} of vDisk {vdisk}"
        )));
    }
    let path = server.store.layer_path(vdisk, file)?;
    Ok(server.store.open_layer_at(&path, props.size)?)
}

/// A peer's catalog changed: look at it now rather than at the next tick.
async fn poke(State(server): State<Arc<Server>>) -> axum::http::StatusCode {
    server.replication.wake.notify_one();
    axum::http::StatusCode::NO_CONTENT
}

/// Tells every other live server that the catalog changed (best effort:
/// they look at it within a second anyway).
pub fn poke_peers(server: &Server) {
    let Some(secret) = server.replication.secret() else {
        return;
    };
    let me = server.config.name.clone();
    let peers: Vec<Peer> = server
        .membership
        .view()
        .servers
        .iter()
        .filter(|s| s.name != me)
        .map(|s| Peer {
            name: s.name.clone(),
            api: s.api.clone(),
        })
        .collect();
    if peers.is_empty() {
        return;
    }
    std::thread::spawn(move || {
        let agent = Agent::builder().timeout(Duration::from_secs(2)).build();
        for p in peers {
            let _ = PeerClient::new(&agent, &p, &secret, &me).and_then(|c| c.poke());
        }
    });
}

async fn meta(
    State(server): State<Arc<Server>>,
    Path((vdisk, file)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let s = server.clone();
    let bytes = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, ApiError> {
        let layer = servable(&s, &vdisk, &file)?;
        let _low_io = super::transfer::LowIo::enter();
        Ok(replica::export_meta(&layer)?)
    })
    .await??;
    Metrics::add(&server.replication.sent_bytes, bytes.len() as u64);
    Ok(octets(bytes))
}

#[derive(Deserialize)]
struct Range {
    from: u64,
    to: u64,
}

async fn data(
    State(server): State<Arc<Server>>,
    Path((vdisk, file)): Path<(String, String)>,
    Query(range): Query<Range>,
) -> Result<Response, ApiError> {
    if range.to <= range.from || range.to - range.from > MAX_REQUEST_CHUNKS {
        return Err(ApiError::bad_request(format!(
            "a data request covers 1 to {MAX_REQUEST_CHUNKS} chunks, not {}..{}",
            range.from, range.to
        )));
    }
    let permit = server
        .replication
        .serving
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError::internal("shutting down"))?;
    let s = server.clone();
    let (layer, len) = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let layer = servable(&s, &vdisk, &file)?;
        if range.from >= layer.chunks() {
            return Err(ApiError::bad_request(format!(
                "chunk {} is beyond the layer's {} chunks",
                range.from,
                layer.chunks()
            )));
        }
        let len = replica::data_len(&layer, range.from, range.to);
        Ok((layer, len))
    })
    .await??;
    // Streamed in small pieces, read as they go out (see replica::PIECE).
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    let s = server.clone();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let _low_io = super::transfer::LowIo::enter();
        let sent = replica::export_data_pieces(&layer, range.from, range.to, |piece| {
            Metrics::add(&s.replication.sent_bytes, piece.len() as u64);
            tx.blocking_send(Ok(bytes::Bytes::from(piece))).is_ok()
        });
        if let Err(e) = sent {
            let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
    });
    let body = axum::body::Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        body,
    )
        .into_response())
}

fn octets(bytes: Vec<u8>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/octet-stream")],
        bytes,
    )
        .into_response()
}

/// A peer to pull from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    /// Its API URL.
    pub api: String,
}

/// The HTTP client for peers: a short connect timeout, and a whole-request
/// deadline that takes a silent peer as failed (a request moves at most
/// 64 MiB, in well under that on any LAN).
pub fn agent() -> Agent {
    Agent::builder()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .max_idle_per_host(2 * super::transfer::MAX_PEERS)
        .build()
}

/// The largest answer read into memory (a layer's metadata is ~33 KiB per GiB).
const MAX_IN_MEMORY: u64 = 256 << 20;

/// One peer's `/peer/v1`, asked as server `me` with the farm's secret. Every
/// failure comes back as a sentence naming the peer.
pub struct PeerClient<'a> {
    client: Client,
    peer: &'a Peer,
}

impl<'a> PeerClient<'a> {
    pub fn new(
        agent: &Agent,
        peer: &'a Peer,
        secret: &str,
        me: &str,
    ) -> Result<PeerClient<'a>, String> {
        let client = agent
            .client(&peer.api)
            .map_err(|e| describe(peer, e))?
            .with_token(secret)
            .as_server(me);
        Ok(PeerClient { client, peer })
    }

    /// A layer's metadata.
    pub fn meta(&self, vdisk: &str, file: &str) -> Result<Vec<u8>, String> {
        self.client
            .layer_meta(vdisk, file, MAX_IN_MEMORY)
            .map_err(|e| describe(self.peer, e))
    }

    /// A layer's data `[from, to)`, handed to `read` as it arrives.
    pub fn data<T>(
        &self,
        vdisk: &str,
        file: &str,
        (from, to): (u64, u64),
        read: impl FnOnce(&mut dyn Read) -> Result<T, String>,
    ) -> Result<T, String> {
        let mut body = self
            .client
            .layer_data(vdisk, file, from, to)
            .map_err(|e| describe(self.peer, e))?;
        read(&mut body).map_err(|e| format!("server {}: {e}", self.peer.name))
    }

    /// A layer's data `[from, to)` in memory (a repaired block).
    pub fn data_vec(&self, vdisk: &str, file: &str, range: (u64, u64)) -> Result<Vec<u8>, String> {
        self.client
            .layer_data_vec(vdisk, file, range, MAX_IN_MEMORY)
            .map_err(|e| describe(self.peer, e))
    }

    /// "The catalog changed": the peer reconciles now.
    pub fn poke(&self) -> Result<(), String> {
        self.client.poke().map_err(|e| describe(self.peer, e))
    }
}

/// A failed peer request, as replication has always reported it.
fn describe(peer: &Peer, e: vstream_client::Error) -> String {
    match e {
        vstream_client::Error::Status { status, body, .. } => {
            format!("server {} answered {status}: {}", peer.name, body.trim())
        }
        vstream_client::Error::ReadAnswer { source, .. } => {
            format!("server {}: reading the answer: {source}", peer.name)
        }
        other => format!("server {}: {}", peer.name, other.http_text()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> Peer {
        Peer {
            name: "s2".into(),
            api: "http://10.0.0.2:7080".into(),
        }
    }

    #[test]
    fn failures_name_the_peer_as_before() {
        let refused = vstream_client::Error::Status {
            url: "http://10.0.0.2:7080/peer/v1/poke".into(),
            status: 403,
            status_text: "Forbidden".into(),
            error: Some("not a server of this farm: wrong peer secret".into()),
            body: "{\"error\":\"not a server of this farm: wrong peer secret\"}\n".into(),
        };
        assert_eq!(
            describe(&peer(), refused),
            "server s2 answered 403: {\"error\":\"not a server of this farm: wrong peer secret\"}"
        );
        let broken = vstream_client::Error::ReadAnswer {
            url: "http://10.0.0.2:7080/peer/v1/x".into(),
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out reading response"),
        };
        assert_eq!(
            describe(&peer(), broken),
            "server s2: reading the answer: timed out reading response"
        );
        let bad = Peer {
            name: "s3".into(),
            api: "10.0.0.3:7080".into(),
        };
        let err = PeerClient::new(&agent(), &bad, "secret", "s1")
            .err()
            .unwrap();
        assert_eq!(
            err,
            "server s3: \"10.0.0.3:7080\" is not an http:// or https:// URL"
        );
    }

    #[test]
    fn a_dead_peer_is_named_with_the_url_asked() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dead = Peer {
            name: "s4".into(),
            api: format!("http://127.0.0.1:{port}/"),
        };
        let err = PeerClient::new(&agent(), &dead, "secret", "s1")
            .unwrap()
            .meta("w", "0001.layer")
            .unwrap_err();
        assert!(
            err.starts_with(&format!(
                "server s4: http://127.0.0.1:{port}/peer/v1/vdisks/w/layers/0001.layer/meta: Connection Failed"
            )),
            "{err}"
        );
    }
}
