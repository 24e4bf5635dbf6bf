//! Setting a vDisk's network boot: its kernel, initrd and command line.

use std::io::Read;
use std::sync::Arc;

use super::extract::Json;
use super::extract::{Path, Query};
use axum::body::Body;
use axum::extract::State;
use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::mpsc;
use vstream_api::{BootFileKind, ErrorBody, SetBootCmdline, VDiskInfo};

use vstream_farm::FarmStore;
use vstream_image::Store;

use super::vdisks::{get_vdisk, vdisk_info};
use crate::config::Config;
use crate::error::ApiError;
use crate::membership::Membership;
use crate::replication::Replication;
use crate::sessions::Sessions;

#[derive(Deserialize, utoipa::IntoParams)]
pub(super) struct Upload {
    /// The file's name, for people (default: kernel or initrd).
    name: Option<String>,
}

/// Reads an upload's chunks from a blocking thread.
struct ChunkReader {
    rx: mpsc::Receiver<Bytes>,
    chunk: Bytes,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(c) => self.chunk = c,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

#[utoipa::path(put, path = "/api/v1/vdisks/{name}/boot/{file}",
    params(("name" = String, Path), ("file" = BootFileKind, Path), Upload),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = VDiskInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
// One extractor per handle it uses, and the request.
#[allow(clippy::too_many_arguments)]
pub(super) async fn upload(
    State(config): State<Arc<Config>>,
    State(store): State<Store>,
    State(membership): State<Arc<Membership>>,
    State(replication): State<Arc<Replication>>,
    State(farm): State<FarmStore>,
    State(sessions): State<Arc<Sessions>>,
    Path((name, which)): Path<(String, String)>,
    Query(q): Query<Upload>,
    body: Body,
) -> Result<Json<VDiskInfo>, ApiError> {
    let which: BootFileKind = which.parse().map_err(ApiError::bad_request)?;
    get_vdisk(&farm, &name).await?;
    let file_name = q.name.unwrap_or_else(|| which.to_string());
    if file_name.is_empty() || file_name.len() > 255 || file_name.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "a boot file name is 1 to 255 printable characters",
        ));
    }
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let (s, n, f) = (store.clone(), name.clone(), file_name.clone());
    let worker = tokio::task::spawn_blocking(move || {
        let mut reader = ChunkReader {
            rx,
            chunk: Bytes::new(),
        };
        crate::boot::store_file(&s, &n, &f, &mut reader, None)
    });
    let broke = super::content::feed(body, tx).await;
    let stored = worker.await?;
    if let Some(e) = broke {
        return Err(ApiError::bad_request(format!(
            "the upload of the {which} broke off: {e}"
        )));
    }
    let stored = stored.map_err(|e| ApiError::bad_request(format!("storing the {which}: {e}")))?;
    let _lock = sessions.lock_vdisk(&name).await;
    let v = farm
        .update_vdisk(&name, |v| {
            match which {
                BootFileKind::Kernel => v.boot.kernel = Some(stored.clone()),
                BootFileKind::Initrd => v.boot.initrd = Some(stored.clone()),
            }
            Ok(())
        })
        .await?;
    tracing::info!(vdisk = %name, file = %which, name = %stored.name, bytes = stored.size, hash = %stored.blake3, "boot file set");
    crate::replication::peer::poke_peers(&replication, &config.name, &membership.view());
    Ok(Json(vdisk_info(&sessions, v).await?))
}

#[utoipa::path(put, path = "/api/v1/vdisks/{name}/boot/cmdline", params(("name" = String, Path)),
    request_body = SetBootCmdline,
    responses((status = 200, body = VDiskInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn set_cmdline(
    State(farm): State<FarmStore>,
    State(sessions): State<Arc<Sessions>>,
    Path(name): Path<String>,
    Json(req): Json<SetBootCmdline>,
) -> Result<Json<VDiskInfo>, ApiError> {
    // As the document says: printable ASCII (so characters are bytes, as
    // the kernel counts them), one line.
    let printable = req.cmdline.bytes().all(|b| (b' '..=b'~').contains(&b));
    if !printable || req.cmdline.len() > 2048 {
        return Err(ApiError::bad_request(
            "a kernel command line is one line of printable ASCII, at most 2048 characters",
        ));
    }
    if req.cmdline.contains("vstream.bootstrap=") || req.cmdline.contains("vstream.mac=") {
        return Err(ApiError::bad_request(
            "vstream adds vstream.bootstrap= and vstream.mac= itself, from the farm and the device",
        ));
    }
    let _lock = sessions.lock_vdisk(&name).await;
    let v = farm
        .update_vdisk(&name, |v| {
            v.boot.cmdline = req.cmdline.trim().to_owned();
            Ok(())
        })
        .await?;
    Ok(Json(vdisk_info(&sessions, v).await?))
}
