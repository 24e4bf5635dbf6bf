//! Version endpoints: list, new, promote, rollback, merge, delete, and
//! clearing a version's boot set.
//!
//! The store checks the structure (states, dependencies); these handlers add
//! what only the server knows: which devices are connected to what.

use std::sync::Arc;

use super::extract::Json;
use super::extract::Path;
use axum::extract::State;
use axum::http::StatusCode;
use vstream_api::{ErrorBody, Merge, Promote, VersionInfo};
use vstream_image::{ImageError, Version, VersionState};

use vstream_farm::FarmStore;
use vstream_image::Store;

use super::vdisks::get_vdisk;
use crate::clock::now_unix;
use crate::error::ApiError;
use crate::replication::Handles as Replicator;
use crate::sessions::Sessions;

fn info(store: &Store, sessions: &Sessions, vdisk: &str, v: &Version) -> VersionInfo {
    let set = sessions
        .boot_sets
        .warm_of(vdisk, v.number)
        .unwrap_or_default();
    let own_bytes = store
        .properties(vdisk)
        .and_then(|p| store.own_bytes(&p, v))
        .unwrap_or(0);
    VersionInfo {
        number: v.number,
        state: v.state,
        created_unix: v.created_unix,
        sealed_unix: v.sealed_unix,
        own_bytes,
        layers: v.layers.len(),
        content_hash: v.content_hash.clone(),
        devices: sessions.devices_on(vdisk, v.number),
        boot_set_cleared_unix: v.boot_set_cleared_unix,
        boot_set: set,
    }
}

/// Runs version operation `op` on vDisk `name` in this store, with the
/// store caught up with the farm's catalog first, and records its change in
/// the catalog after. `creates`: it makes a new version (refused while
/// another server holds one open for writing). The caller holds the vDisk's lock.
async fn operate<T: Send + 'static>(
    ops: &Arc<Replicator>,
    name: &str,
    creates: bool,
    op: impl FnOnce(&Store) -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ApiError> {
    crate::replication::before_operation(ops, name, creates)
        .await
        .map_err(|e| ApiError::new(e.status(), e.to_string()))?;
    let before = ops.store.properties(name)?;
    crate::replication::begin_change(ops, name, &before)
        .map_err(|e| ApiError::internal(format!("recording the change of vDisk {name}: {e}")))?;
    let store = ops.store.clone();
    let out = blocking(move || op(&store)).await;
    if out.is_ok() {
        // What the operation sealed it hashed from the data just now, over
        // layers checked before: verified as it stands.
        for v in ops.store.properties(name)?.versions {
            let changed = before.version(v.number) != Some(&v);
            if let (true, true, Some(h)) = (changed, v.is_sealed(), &v.content_hash) {
                ops.membership.verified_here(name, v.number, h);
            }
        }
        ops.membership.publish_now.notify_one();
    }
    if let Err(e) = crate::replication::finish_change(ops, name).await {
        // It stays recorded here, and is published at the next reconcile.
        tracing::warn!(vdisk = %name, error = %e, "the change is not in the farm's catalog yet");
    }
    out
}

/// Runs a store operation on the blocking pool (it may hash or copy gigabytes).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await?.map_err(|e| match e {
        ImageError::Invalid(msg) => ApiError::conflict(msg),
        other => other.into(),
    })
}

#[utoipa::path(get, path = "/api/v1/vdisks/{name}/versions", params(("name" = String, Path)),
    responses((status = 200, body = [VersionInfo]), (status = 404, body = ErrorBody)))]
pub(super) async fn list_versions(
    State(sessions): State<Arc<Sessions>>,
    State(store): State<Store>,
    State(farm): State<FarmStore>,
    Path(name): Path<String>,
) -> Result<Json<Vec<VersionInfo>>, ApiError> {
    get_vdisk(&farm, &name).await?;
    let props = store.properties(&name)?;
    Ok(Json(
        props
            .versions
            .iter()
            .map(|v| info(&store, &sessions, &name, v))
            .collect(),
    ))
}

#[utoipa::path(post, path = "/api/v1/vdisks/{name}/versions", params(("name" = String, Path)),
    responses((status = 201, body = VersionInfo), (status = 409, body = ErrorBody)))]
pub(super) async fn new_version(
    State(ops): State<Arc<Replicator>>,
    State(store): State<Store>,
    State(farm): State<FarmStore>,
    State(sessions): State<Arc<Sessions>>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<VersionInfo>), ApiError> {
    let vdisk = get_vdisk(&farm, &name).await?;
    let _lock = sessions.lock_vdisk(&name).await;
    let props = store.properties(&name)?;
    if let Some(head) = props.head().filter(|h| !h.is_sealed()) {
        // Sealing the head must not happen under a device writing it.
        let writers = sessions.devices_on(&name, head.number);
        if !writers.is_empty() && vdisk.mode == vstream_api::Mode::Private {
            return Err(ApiError::conflict(format!(
                "version {} of vDisk {name} is being written by {}; a new version can start once it disconnects",
                head.number,
                writers.join(", ")
            )));
        }
    }
    let n = name.clone();
    let v = operate(&ops, &name, true, move |s| s.new_version(&n, now_unix())).await?;
    tracing::info!(vdisk = %name, version = v.number, "maintenance version created");
    Ok((
        StatusCode::CREATED,
        Json(info(&store, &sessions, &name, &v)),
    ))
}

#[utoipa::path(post, path = "/api/v1/vdisks/{name}/versions/{version}/promote",
    params(("name" = String, Path), ("version" = u32, Path)), request_body = Promote,
    responses((status = 200, body = VersionInfo), (status = 409, body = ErrorBody)))]
pub(super) async fn promote(
    State(ops): State<Arc<Replicator>>,
    State(store): State<Store>,
    State(farm): State<FarmStore>,
    State(sessions): State<Arc<Sessions>>,
    Path((name, version)): Path<(String, u32)>,
    Json(req): Json<Promote>,
) -> Result<Json<VersionInfo>, ApiError> {
    get_vdisk(&farm, &name).await?;
    let _lock = sessions.lock_vdisk(&name).await;
    let to = match req.to {
        to @ (VersionState::Test | VersionState::Production) => to,
        other => {
            return Err(ApiError::bad_request(format!(
                "a version is promoted to test or production, not {other}"
            )))
        }
    };
    let props = store.properties(&name)?;
    if props
        .version(version)
        .is_some_and(|v| v.state == VersionState::Maintenance)
    {
        let on = sessions.devices_on(&name, version);
        if !on.is_empty() {
            return Err(ApiError::conflict(format!(
                "maintenance device {} is connected to version {version}; shut it down before promoting",
                on.join(", ")
            )));
        }
    }
    let n = name.clone();
    let v = operate(&ops, &name, false, move |s| {
        s.promote(&n, version, to, now_unix())
    })
    .await?;
    tracing::info!(vdisk = %name, version, to = %to, "version promoted");
    Ok(Json(info(&store, &sessions, &name, &v)))
}

#[utoipa::path(post, path = "/api/v1/vdisks/{name}/rollback", params(("name" = String, Path)),
    responses((status = 200, body = VersionInfo), (status = 409, body = ErrorBody)))]
pub(super) async fn rollback(
    State(ops): State<Arc<Replicator>>,
    State(store): State<Store>,
    State(farm): State<FarmStore>,
    State(sessions): State<Arc<Sessions>>,
    Path(name): Path<String>,
) -> Result<Json<VersionInfo>, ApiError> {
    get_vdisk(&farm, &name).await?;
    let _lock = sessions.lock_vdisk(&name).await;
    let n = name.clone();
    let v = operate(&ops, &name, false, move |s| s.rollback(&n)).await?;
    tracing::info!(vdisk = %name, version = v.number, "rolled back: production version");
    Ok(Json(info(&store, &sessions, &name, &v)))
}

#[utoipa::path(post, path = "/api/v1/vdisks/{name}/merge", params(("name" = String, Path)), request_body = Merge,
    responses((status = 200, body = VersionInfo), (status = 409, body = ErrorBody)))]
pub(super) async fn merge(
    State(ops): State<Arc<Replicator>>,
    State(store): State<Store>,
    State(farm): State<FarmStore>,
    State(sessions): State<Arc<Sessions>>,
    Path(name): Path<String>,
    Json(req): Json<Merge>,
) -> Result<Json<VersionInfo>, ApiError> {
    get_vdisk(&farm, &name).await?;
    let _lock = sessions.lock_vdisk(&name).await;
    // The versions it would retire must be in use nowhere in the farm.
    let props = store.properties(&name)?;
    let upto = req
        .upto
        .or_else(|| props.newest(VersionState::Production).map(|v| v.number));
    for n in upto.map(|u| props.retired_by_merge(u)).unwrap_or_default() {
        let on = sessions.farm_devices_on(&name, Some(n));
        if !on.is_empty() {
            return Err(ApiError::conflict(format!(
                "merging would retire version {n} of vDisk {name}, which devices {} are running; \
                 merge once they have rebooted onto a newer version",
                on.join(", ")
            )));
        }
    }
    let n = name.clone();
    let v = operate(&ops, &name, true, move |s| s.merge(&n, req.upto)).await?;
    tracing::info!(vdisk = %name, version = v.number, "merged");
    Ok(Json(info(&store, &sessions, &name, &v)))
}

#[utoipa::path(delete, path = "/api/v1/vdisks/{name}/versions/{version}",
    params(("name" = String, Path), ("version" = u32, Path)),
    responses((status = 204), (status = 409, body = ErrorBody)))]
pub(super) async fn delete_version(
    State(ops): State<Arc<Replicator>>,
    State(farm): State<FarmStore>,
    State(sessions): State<Arc<Sessions>>,
    Path((name, version)): Path<(String, u32)>,
) -> Result<StatusCode, ApiError> {
    get_vdisk(&farm, &name).await?;
    let _lock = sessions.lock_vdisk(&name).await;
    let on = sessions.farm_devices_on(&name, Some(version));
    if !on.is_empty() {
        return Err(ApiError::conflict(format!(
            "version {version} of vDisk {name} is in use by devices {}",
            on.join(", ")
        )));
    }
    let n = name.clone();
    operate(&ops, &name, false, move |s| {
        s.delete_version(&n, version, false)
    })
    .await?;
    tracing::info!(vdisk = %name, version, "version deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/api/v1/vdisks/{name}/versions/{version}/boot-set",
    params(("name" = String, Path), ("version" = u32, Path)),
    responses((status = 200, body = VersionInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
/// Clears the version's boot set on every server of the farm: each drops
/// the set it learned (and read ahead) before now, takes none from a peer
/// that has not yet, and learns it again from the next boots.
pub(super) async fn clear_boot_set(
    State(ops): State<Arc<Replicator>>,
    State(store): State<Store>,
    State(farm): State<FarmStore>,
    State(sessions): State<Arc<Sessions>>,
    Path((name, version)): Path<(String, u32)>,
) -> Result<Json<VersionInfo>, ApiError> {
    get_vdisk(&farm, &name).await?;
    let _lock = sessions.lock_vdisk(&name).await;
    let n = name.clone();
    let v = operate(&ops, &name, false, move |s| {
        s.clear_boot_set(&n, version, now_unix())
    })
    .await?;
    let sets = sessions.boot_sets.clone();
    tokio::task::spawn_blocking(move || sets.forget_stale()).await?;
    tracing::info!(vdisk = %name, version, "boot set cleared across the farm");
    Ok(Json(info(&store, &sessions, &name, &v)))
}
