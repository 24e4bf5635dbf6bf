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

use crate::api::ApiError;
use crate::metrics::Metrics;
use crate::state::Server;

pub const SERVER_HEADER: &str = "x-vstream-server";
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
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(2))
            .build();
        for p in peers {
            let url = format!("{}/peer/v1/poke", p.api.trim_end_matches('/'));
            let _ = agent
                .post(&url)
                .set("Authorization", &format!("Bearer {secret}"))
                .set(SERVER_HEADER, &me)
                .call();
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
pub fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .max_idle_connections_per_host(2 * super::transfer::MAX_PEERS)
        .build()
}

/// GETs `path` from `peer`, as server `me` with the farm's `secret`, and
/// hands the answer's body to `read`.
pub fn get_with<T>(
    agent: &ureq::Agent,
    peer: &Peer,
    secret: &str,
    me: &str,
    path: &str,
    read: impl FnOnce(&mut dyn Read) -> Result<T, String>,
) -> Result<T, String> {
    let url = format!("{}{path}", peer.api.trim_end_matches('/'));
    let resp = agent
        .get(&url)
        .set("Authorization", &format!("Bearer {secret}"))
        .set(SERVER_HEADER, me)
        .call()
        .map_err(|e| match e {
            ureq::Error::Status(code, r) => format!(
                "server {} answered {code}: {}",
                peer.name,
                r.into_string().unwrap_or_default().trim()
            ),
            other => format!("server {}: {other}", peer.name),
        })?;
    let mut body = resp.into_reader();
    read(&mut body).map_err(|e| format!("server {}: {e}", peer.name))
}

/// The largest answer read into memory (a layer's metadata is ~33 KiB per GiB).
const MAX_IN_MEMORY: u64 = 256 << 20;

/// GETs `path` from `peer` into memory (metadata, a repaired block).
pub fn get(
    agent: &ureq::Agent,
    peer: &Peer,
    secret: &str,
    me: &str,
    path: &str,
) -> Result<Vec<u8>, String> {
    get_with(agent, peer, secret, me, path, |body| {
        let mut out = Vec::new();
        body.take(MAX_IN_MEMORY)
            .read_to_end(&mut out)
            .map_err(|e| format!("reading the answer: {e}"))?;
        Ok(out)
    })
}

/// The path of a layer's metadata, or of data `[from, to)`.
pub fn layer_path(vdisk: &str, file: &str, range: Option<(u64, u64)>) -> String {
    match range {
        None => format!("/peer/v1/vdisks/{vdisk}/layers/{file}/meta"),
        Some((from, to)) => {
            format!("/peer/v1/vdisks/{vdisk}/layers/{file}/data?from={from}&to={to}")
        }
    }
}
