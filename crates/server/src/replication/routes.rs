//! The peer protocol: HTTP on each server's API port, for servers of the
//! same farm only.
//!
//! ```text
//!   GET /peer/v1/vdisks/NAME/layers/FILE/meta               the layer's metadata (replica.rs)
//!   GET /peer/v1/vdisks/NAME/layers/FILE/data?from=C&to=C   its allocated chunks in [from, to)
//!   GET /peer/v1/vdisks/NAME/boot/HASH                      a boot file (kernel, initrd; boot.rs)
//!   GET /peer/v1/vdisks/NAME/boot-sets/VERSION              a version's boot set (bootsets.rs)
//!   POST /peer/v1/poke                                      "the catalog changed": reconcile now
//!   Authorization: Bearer <farm peer secret>     X-Vstream-Server: <the asking server>
//! ```
//!
//! A server answers only for layers of versions it holds verified and not
//! found corrupt since. There is no way to push: a server takes data only by
//! asking for it, and checks all it takes against the catalog's hashes.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde::Deserialize;
use vstream_image::replica;
use vstream_image::Layer;

use crate::auth::require_peer;
use crate::error::ApiError;
use vstream_service::metrics::Metrics;

use super::handles::Handles;
use super::peer::MAX_REQUEST_CHUNKS;
use crate::io::LowIo;

/// The peer routes, behind the farm's peer secret.
pub fn routes(server: Arc<Handles>) -> Router {
    Router::new()
        .route(
            "/peer/v1/vdisks/:name/layers/:file/meta",
            axum::routing::get(meta),
        )
        .route(
            "/peer/v1/vdisks/:name/layers/:file/data",
            axum::routing::get(data),
        )
        .route("/peer/v1/poke", axum::routing::post(poke))
        .layer(middleware::from_fn_with_state(
            server.replication.clone(),
            require_peer,
        ))
        .with_state(server)
}

/// The layer `file` of `vdisk`, if this server may hand it out: a layer of
/// a sealed version it holds verified, not found corrupt since.
fn servable(server: &Handles, vdisk: &str, file: &str) -> Result<Arc<Layer>, ApiError> {
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
async fn poke(State(server): State<Arc<Handles>>) -> axum::http::StatusCode {
    server.replication.wake.notify_one();
    axum::http::StatusCode::NO_CONTENT
}

async fn meta(
    State(server): State<Arc<Handles>>,
    Path((vdisk, file)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let s = server.clone();
    let bytes = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, ApiError> {
        let layer = servable(&s, &vdisk, &file)?;
        let _low_io = LowIo::enter();
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
    State(server): State<Arc<Handles>>,
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
        let _low_io = LowIo::enter();
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
