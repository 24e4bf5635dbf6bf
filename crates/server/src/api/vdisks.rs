//! vDisk endpoints: list, create, show, set, delete; and what `vdisk show`
//! reports of one.

use std::sync::Arc;

use super::extract::Json;
use super::extract::Path;
use axum::extract::State;
use axum::http::StatusCode;
use vstream_api::{CreateVDisk, ErrorBody, SetVDisk, VDisk, VDiskInfo};
use vstream_farm::FarmStore;
use vstream_image::{hash, Store};

use crate::clock::now_unix;
use crate::error::ApiError;
use crate::membership::Membership;
use crate::quarantine::Quarantine;
use crate::replication::Replication;
use crate::sessions::Sessions;
use crate::stores::Stores;

/// Everything `vdisk show` reports about one vDisk.
pub(crate) async fn vdisk_info(
    sessions: &Arc<Sessions>,
    vdisk: VDisk,
) -> Result<VDiskInfo, ApiError> {
    let connected = sessions.connected_to(&vdisk.name);
    let srv = sessions.clone();
    let name = vdisk.name.clone();
    let (content, allocated) = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let chain = srv.production(&name)?;
        let layers = chain.layers;
        let allocated = layers.iter().map(|l| l.allocated_bytes()).sum::<u64>();
        let top = layers
            .last()
            .ok_or_else(|| ApiError::internal("vDisk has no layers"))?
            .clone();
        if chain.version.is_sealed() {
            if let Some(h) = chain
                .version
                .content_hash
                .as_deref()
                .and_then(hash::from_hex)
            {
                return Ok((h, allocated));
            }
        }
        if let Some(h) = top.content_hash() {
            return Ok((h, allocated));
        }
        // Stale after Private-mode writes: hash again, and keep the result only
        // if no write began or ran meanwhile.
        let epoch = top.quiet_epoch();
        let disk = vstream_image::Disk::read_only(layers);
        let hashes = hash::hash_disk(&disk)
            .map_err(|e| ApiError::internal(format!("hashing vDisk {name}: {e}")))?;
        if let Some(epoch) = epoch {
            if let Err(e) = top.store_hashes_if_unchanged(epoch, &hashes) {
                tracing::warn!(vdisk = %name, error = %e, "could not store the new content hash");
            }
        }
        Ok((hashes.content, allocated))
    })
    .await??;
    Ok(VDiskInfo {
        vdisk,
        content_hash: hash::to_hex(&content),
        allocated,
        connected,
        problem: None,
        not_here: false,
    })
}

pub(super) async fn get_vdisk(farm: &FarmStore, name: &str) -> Result<VDisk, ApiError> {
    farm.get_vdisk(name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("vDisk {name} does not exist")))
}

#[utoipa::path(get, path = "/api/v1/vdisks", responses((status = 200, body = [VDiskInfo])))]
pub(super) async fn list_vdisks(
    State(store): State<Store>,
    State(farm): State<FarmStore>,
    State(sessions): State<Arc<Sessions>>,
) -> Result<Json<Vec<VDiskInfo>>, ApiError> {
    let mut out = Vec::new();
    for v in farm.list_vdisks().await? {
        // One broken vDisk must not hide the others: list it with its problem.
        let info = match vdisk_info(&sessions, v.clone()).await {
            Ok(info) => info,
            // A farm vDisk this server does not hold (yet).
            Err(_) if !store.exists(&v.name) => VDiskInfo {
                connected: sessions.connected_to(&v.name),
                vdisk: v,
                content_hash: String::new(),
                allocated: 0,
                problem: Some(
                    "not in this server's store yet: replication copies it \
                     (vstream replication status)"
                        .into(),
                ),
                not_here: true,
            },
            Err(e) if e.status.is_server_error() => VDiskInfo {
                connected: sessions.connected_to(&v.name),
                vdisk: v,
                content_hash: String::new(),
                allocated: 0,
                problem: Some(e.message),
                not_here: false,
            },
            Err(e) => return Err(e),
        };
        out.push(info);
    }
    Ok(Json(out))
}

#[utoipa::path(post, path = "/api/v1/vdisks", request_body = CreateVDisk,
    responses((status = 201, body = VDiskInfo), (status = 409, body = ErrorBody)))]
pub(super) async fn create_vdisk(
    State(store): State<Store>,
    State(farm): State<FarmStore>,
    State(membership): State<Arc<Membership>>,
    State(quarantine): State<Arc<Quarantine>>,
    State(stores): State<Arc<Stores>>,
    State(sessions): State<Arc<Sessions>>,
    Json(req): Json<CreateVDisk>,
) -> Result<(StatusCode, Json<VDiskInfo>), ApiError> {
    vstream_farm::validate_name(&req.name)?;
    let _lock = sessions.lock_vdisk(&req.name).await;
    quarantine.check_free(&req.name)?;
    if farm.get_vdisk(&req.name).await?.is_some() {
        return Err(ApiError::conflict(format!(
            "vDisk {} already exists",
            req.name
        )));
    }
    let created = now_unix();
    let store_name = req.store.unwrap_or_else(vstream_api::default_store);
    super::stores::prepare(&stores, &farm, &req.name, &store_name).await?;
    let (s, name, size) = (store.clone(), req.name.clone(), req.size);
    tokio::task::spawn_blocking(move || s.create(&name, size, created)).await??;
    // Hashed as it was made: verified as it stands.
    if let Some(h) = store
        .properties(&req.name)?
        .version(1)
        .and_then(|v| v.content_hash.clone())
    {
        membership.verified_here(&req.name, 1, &h);
    }
    let vdisk = register_vdisk(&farm, &store, &req.name, req.size, created, &store_name).await?;
    Ok((
        StatusCode::CREATED,
        Json(vdisk_info(&sessions, vdisk).await?),
    ))
}

/// Records a vDisk that is now in the store in the farm state; undoes the store on failure.
pub(crate) async fn register_vdisk(
    farm: &FarmStore,
    store: &Store,
    name: &str,
    size: u64,
    created: u64,
    store_name: &str,
) -> Result<VDisk, ApiError> {
    let vdisk = VDisk {
        store: store_name.to_owned(),
        ..VDisk::new(name, size, created)
    };
    match farm.create_vdisk(vdisk).await {
        Ok(v) => Ok(v),
        Err(e) => {
            let _ = store.delete(name);
            Err(e.into())
        }
    }
}

#[utoipa::path(get, path = "/api/v1/vdisks/{name}", params(("name" = String, Path)),
    responses((status = 200, body = VDiskInfo), (status = 404, body = ErrorBody)))]
pub(super) async fn show_vdisk(
    State(farm): State<FarmStore>,
    State(sessions): State<Arc<Sessions>>,
    Path(name): Path<String>,
) -> Result<Json<VDiskInfo>, ApiError> {
    let v = get_vdisk(&farm, &name).await?;
    Ok(Json(vdisk_info(&sessions, v).await?))
}

#[utoipa::path(patch, path = "/api/v1/vdisks/{name}", params(("name" = String, Path)), request_body = SetVDisk,
    responses((status = 200, body = VDiskInfo), (status = 409, body = ErrorBody)))]
pub(super) async fn set_vdisk(
    State(store): State<Store>,
    State(farm): State<FarmStore>,
    State(sessions): State<Arc<Sessions>>,
    State(replication): State<Arc<Replication>>,
    Path(name): Path<String>,
    Json(req): Json<SetVDisk>,
) -> Result<Json<VDiskInfo>, ApiError> {
    let _lock = sessions.lock_vdisk(&name).await;
    // What a connected device would see change under it.
    let content = req.mode.is_some()
        || req.cache_limit.is_some()
        || req.cache_type.is_some()
        || req.physical_sector.is_some();
    if !content && req.anonymous_read.is_none() && req.boot.is_none() {
        return Err(ApiError::bad_request(
            "nothing to change: give a mode, a cache type, a cache limit, anonymous read, \
             a boot method or a physical sector",
        ));
    }
    if let Some(p) = req.physical_sector {
        if !vstream_api::PHYSICAL_SECTORS.contains(&p) {
            return Err(ApiError::bad_request(format!(
                "a physical sector of {p} bytes: it must be 512 (512n) or 4096 (512e)"
            )));
        }
    }
    // Who may read it changes nothing under a connected device.
    let connected = match content {
        true => sessions.farm_devices_on(&name, None),
        false => Vec::new(),
    };
    if !connected.is_empty() {
        return Err(ApiError::conflict(format!(
            "vDisk {name} cannot change while devices are connected to it: {}",
            connected.join(", ")
        )));
    }
    let before = get_vdisk(&farm, &name).await?;
    let v = farm
        .update_vdisk(&name, |v| {
            if let Some(m) = req.mode {
                v.mode = m;
            }
            if let Some(t) = req.cache_type {
                v.cache_type = t;
            }
            if let Some(a) = req.anonymous_read {
                v.anonymous_read = a;
            }
            if let Some(p) = req.physical_sector {
                v.physical_sector = p;
            }
            // Counts from each device's next boot script.
            if let Some(b) = req.boot {
                v.boot.method = b;
            }
            if let Some(l) = req.cache_limit {
                if l < 4096 {
                    return Err(vstream_farm::FarmError::Invalid(
                        "a cache limit must be at least 4 KiB".into(),
                    ));
                }
                v.cache_limit = Some(l);
            }
            Ok(())
        })
        .await?;
    // A Standard-mode vDisk's imported version is sealed for the peers now.
    replication.wake.notify_one();
    if v.mode != before.mode {
        // Write caches were made over the old content: a device must not see
        // them laid over whatever the vDisk holds next.
        for d in farm.devices_using(&name).await? {
            store.discard_cache(&d.name)?;
        }
    }
    Ok(Json(vdisk_info(&sessions, v).await?))
}

#[utoipa::path(delete, path = "/api/v1/vdisks/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 409, body = ErrorBody)))]
pub(super) async fn delete_vdisk(
    State(store): State<Store>,
    State(farm): State<FarmStore>,
    State(sessions): State<Arc<Sessions>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let _lock = sessions.lock_vdisk(&name).await;
    let connected = sessions.connected_to(&name);
    if !connected.is_empty() {
        return Err(ApiError::conflict(format!(
            "vDisk {name} is in use: devices {} are connected to it",
            connected.join(", ")
        )));
    }
    // With its catalog, leaving a tombstone: every other server removes its
    // copy once no device uses it.
    farm.delete_vdisk(&name).await?;
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.delete(&name)).await??;
    Ok(StatusCode::NO_CONTENT)
}
