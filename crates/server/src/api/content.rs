//! Streaming a vDisk's content in and out, in the extents framing of
//! `vstream_api::extents`: only data travels, holes are implied.
//!
//! The socket side is async; the disk side runs on one blocking thread; a
//! small bounded channel between them keeps memory constant.

use std::sync::Arc;

use super::extract::Json;
use super::extract::{Path, Query};
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use vstream_api::extents::{self, Decoder, Event};
use vstream_api::{ErrorBody, VDiskInfo};
use vstream_image::Disk;

use vstream_farm::FarmStore;
use vstream_image::Store;

use super::vdisks::{get_vdisk, register_vdisk, vdisk_info};
use crate::clock::now_unix;
use crate::error::ApiError;
use crate::membership::Membership;
use crate::quarantine::Quarantine;
use crate::replication::Replication;
use crate::sessions::Sessions;
use crate::stores::Stores;

/// Largest frame we send; equal to the framing's limit.
const FRAME: u64 = extents::MAX_FRAME_LEN as u64;

/// Which store a new vDisk goes in (`?store=NAME`; default: the data folder's).
#[derive(serde::Deserialize, utoipa::IntoParams)]
pub(super) struct InStore {
    store: Option<String>,
}

#[utoipa::path(put, path = "/api/v1/vdisks/{name}/content", params(("name" = String, Path), InStore),
    request_body(content = Vec<u8>, content_type = "application/vnd.vstream.extents",
        description = "header, then (offset, length, data) frames, then the terminator"),
    responses((status = 201, body = VDiskInfo), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
// One extractor per handle it uses, and the request.
#[allow(clippy::too_many_arguments)]
pub(super) async fn import_vdisk(
    State(store): State<Store>,
    State(farm): State<FarmStore>,
    State(quarantine): State<Arc<Quarantine>>,
    State(stores): State<Arc<Stores>>,
    State(sessions): State<Arc<Sessions>>,
    State(replication): State<Arc<Replication>>,
    State(membership): State<Arc<Membership>>,
    Path(name): Path<String>,
    Query(q): Query<InStore>,
    body: Body,
) -> Result<(StatusCode, Json<VDiskInfo>), ApiError> {
    vstream_farm::validate_name(&name)?;
    let _lock = sessions.lock_vdisk(&name).await;
    quarantine.check_free(&name)?;
    // In a farm, a vDisk another server created may be imported here too:
    // that makes a local copy (a replica once its hashes check), not a record.
    let existing = farm.get_vdisk(&name).await?;
    if existing.is_some() && store.exists(&name) {
        return Err(ApiError::conflict(format!("vDisk {name} already exists")));
    }
    let store_name = match &existing {
        Some(v) => v.store.clone(),
        None => q.store.unwrap_or_else(vstream_api::default_store),
    };
    super::stores::prepare(&stores, &farm, &name, &store_name).await?;
    // A copy of the farm's vDisk carries its creation time: that names the
    // vDisk (a copy made at another time would be another vDisk, kept in
    // quarantine).
    let created = match &existing {
        Some(v) => Some(
            farm.catalog(&name)
                .await?
                .map_or(v.created_unix, |c| c.created_unix),
        ),
        None => None,
    };
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let (s, m, n) = (store.clone(), membership.clone(), name.clone());
    let worker = tokio::task::spawn_blocking(move || import_blocking(&s, &m, &n, rx, created));
    let body_error = feed(body, tx).await;
    let result = worker.await?;
    if let Some(e) = body_error {
        return Err(ApiError::bad_request(format!(
            "the upload of vDisk {name} broke off: {e}"
        )));
    }
    let (size, created) = result?;
    let vdisk = match existing {
        Some(v) if v.size != size => {
            let _ = store.delete(&name);
            return Err(ApiError::conflict(format!(
                "vDisk {name} is {} bytes in the farm; this upload is {size}",
                v.size
            )));
        }
        Some(v) => v,
        None => register_vdisk(&farm, &store, &name, size, created, &store_name).await?,
    };
    tracing::info!(vdisk = %name, size, "vDisk imported");
    replication.wake.notify_one();
    Ok((
        StatusCode::CREATED,
        Json(vdisk_info(&sessions, vdisk).await?),
    ))
}

/// Hands an upload to a blocking worker chunk by chunk, and returns how
/// the upload broke off, if it did. Once the worker has stopped, its error
/// is the answer: the rest of the upload is read and dropped so the client
/// gets to read that answer.
pub(super) async fn feed(body: Body, tx: mpsc::Sender<Bytes>) -> Option<axum::Error> {
    let mut stream = body.into_data_stream();
    let mut worker_stopped = false;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) if !worker_stopped => worker_stopped = tx.send(c).await.is_err(),
            Ok(_) => {}
            Err(e) => return Some(e),
        }
    }
    None
}

fn import_blocking(
    store: &Store,
    membership: &Membership,
    name: &str,
    mut rx: mpsc::Receiver<Bytes>,
    created: Option<u64>,
) -> Result<(u64, u64), ApiError> {
    let bad = |e: extents::ExtentError| {
        ApiError::bad_request(format!("the upload of vDisk {name} is malformed: {e}"))
    };
    let mut dec = Decoder::new();
    let mut staging = None;
    while let Some(chunk) = rx.blocking_recv() {
        dec.feed(&chunk);
        loop {
            match dec.next_event().map_err(bad)? {
                Event::NeedMore | Event::End => break,
                Event::Header { size } => staging = Some(store.begin_import(name, size)?),
                Event::Frame { offset, data } => {
                    let s = staging
                        .as_ref()
                        .ok_or_else(|| ApiError::bad_request("frame before header"))?;
                    s.disk().write(data, offset, false).map_err(|e| {
                        ApiError::new(
                            if matches!(e, vstream_image::WriteError::NoSpace) {
                                StatusCode::INSUFFICIENT_STORAGE
                            } else {
                                StatusCode::INTERNAL_SERVER_ERROR
                            },
                            format!("writing vDisk {name}: {e}"),
                        )
                    })?;
                }
            }
        }
    }
    dec.finish().map_err(bad)?;
    let staging = staging.ok_or_else(|| ApiError::bad_request("empty upload"))?;
    let size = staging.disk().size();
    let created = created.unwrap_or_else(now_unix);
    let hash = store.commit_import(staging, created)?;
    // Hashed from the data just written: verified as it stands.
    let hex = vstream_image::hash::to_hex(&hash);
    membership.verified_here_blocking(name, 1, &hex);
    Ok((size, created))
}

#[utoipa::path(get, path = "/api/v1/vdisks/{name}/content", params(("name" = String, Path)),
    responses((status = 200, content_type = "application/vnd.vstream.extents", body = Vec<u8>),
        (status = 404, body = ErrorBody)))]
pub(super) async fn export_vdisk(
    State(store): State<Store>,
    State(farm): State<FarmStore>,
    State(sessions): State<Arc<Sessions>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let (vdisk_name, version) = match name.split_once('@') {
        Some((v, n)) => {
            let n = n.parse::<u32>().map_err(|_| {
                ApiError::bad_request(format!("{name:?}: a version is a number, as in NAME@3"))
            })?;
            (v.to_owned(), Some(n))
        }
        None => (name.clone(), None),
    };
    let vdisk = get_vdisk(&farm, &vdisk_name).await?;
    let chain = match version {
        Some(n) => store
            .chain(&vdisk.name, n)
            .map_err(|_| ApiError::not_found(format!("vDisk {} has no version {n}", vdisk.name)))?,
        None => sessions.production(&vdisk.name)?,
    };
    let disk = chain.read_only();
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        if let Err(e) = export_blocking(&disk, &tx) {
            tracing::warn!(vdisk = %name, error = %e, "export stopped");
            let _ = tx.blocking_send(Err(e));
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, extents::CONTENT_TYPE)
        .header("x-vstream-size", vdisk.size)
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// Walks the allocated extents of `disk` and sends them as frames.
fn export_blocking(
    disk: &Disk,
    tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> std::io::Result<()> {
    let gone = || std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away");
    let mut head = Vec::new();
    extents::encode_header(&mut head, disk.size());
    tx.blocking_send(Ok(head.into())).map_err(|_| gone())?;
    let size = disk.size();
    let mut pos = 0u64;
    let mut data = vec![0u8; FRAME as usize];
    while pos < size {
        let window = (size - pos).min(1 << 30);
        for ext in disk.block_status(pos, window, 1 << 12) {
            if !ext.zero {
                let mut at = pos;
                while at < pos + ext.length {
                    let n = (pos + ext.length - at).min(FRAME);
                    let buf = &mut data[..n as usize];
                    disk.read(buf, at, false)?;
                    if buf.iter().any(|&b| b != 0) {
                        let mut frame = Vec::with_capacity(n as usize + extents::FRAME_HEADER_LEN);
                        extents::encode_frame(&mut frame, at, buf).map_err(|e| {
                            std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
                        })?;
                        tx.blocking_send(Ok(frame.into())).map_err(|_| gone())?;
                    }
                    at += n;
                }
            }
            pos += ext.length;
        }
    }
    let mut end = Vec::new();
    extents::encode_end(&mut end);
    tx.blocking_send(Ok(end.into())).map_err(|_| gone())?;
    Ok(())
}
