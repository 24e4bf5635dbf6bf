//! The quarantine routes: list, adopt, remove (see `crate::quarantine`).

use std::sync::Arc;

use super::extract::Json;
use super::extract::Path;
use axum::extract::State;
use vstream_api::{Adopt, ErrorBody, Quarantined, VDisk};
use vstream_farm::FarmStore;
use vstream_image::Store;

use crate::config::Config;
use crate::error::ApiError;
use crate::quarantine::Quarantine;
use crate::replication::catalog;
use crate::replication::Replication;
use crate::sessions::Sessions;

fn held_here(quarantine: &Quarantine, me: &str, name: &str) -> Result<Quarantined, ApiError> {
    quarantine.get(name).ok_or_else(|| {
        ApiError::not_found(format!(
            "this server ({me}) holds no quarantined vDisk {name}; `vstream quarantine list` shows where each is"
        ))
    })
}

/// This server's quarantined vDisks.
#[utoipa::path(get, path = "/api/v1/quarantine", responses((status = 200, body = [Quarantined])))]
pub async fn list(State(quarantine): State<Arc<Quarantine>>) -> Json<Vec<Quarantined>> {
    Json(quarantine.list())
}

/// Makes quarantined vDisk `name` a vDisk of the farm again, from this copy.
#[utoipa::path(post, path = "/api/v1/quarantine/{name}/adopt", params(("name" = String, Path)),
    request_body = Adopt,
    responses((status = 200, body = Quarantined), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
// One extractor per handle it uses, and the request.
#[allow(clippy::too_many_arguments)]
pub async fn adopt(
    State(config): State<Arc<Config>>,
    State(store): State<Store>,
    State(farm): State<FarmStore>,
    State(quarantine): State<Arc<Quarantine>>,
    State(sessions): State<Arc<Sessions>>,
    State(replication): State<Arc<Replication>>,
    Path(name): Path<String>,
    Json(req): Json<Adopt>,
) -> Result<Json<Quarantined>, ApiError> {
    vstream_farm::validate_name(&name)?;
    let _lock = sessions.lock_vdisk(&name).await;
    let q = held_here(&quarantine, &config.name, &name)?;
    if let Some(other) = farm.get_vdisk(&name).await? {
        return Err(ApiError::conflict(format!(
            "the farm has a vDisk {name} already ({} bytes, made at {}); remove it, or this copy, first",
            other.size, other.created_unix
        )));
    }
    let props = store.properties(&name)?;
    let store_name = store.store_of(&name);
    let record = VDisk {
        mode: req.mode.unwrap_or_default(),
        cache_type: req.cache_type.unwrap_or_default(),
        store: store_name,
        ..VDisk::new(name.clone(), props.size, props.created_unix)
    };
    farm.create_vdisk(record).await?;
    let me = config.name.clone();
    farm.update_catalog(&name, |_| Ok(Some(catalog::from_props(&props, &me))))
        .await?;
    quarantine.take(&name);
    replication.wake.notify_one();
    tracing::info!(vdisk = %name, versions = ?q.versions, "quarantined vDisk adopted into the farm");
    Ok(Json(q))
}

/// Deletes quarantined vDisk `name` from this server's store.
#[utoipa::path(delete, path = "/api/v1/quarantine/{name}", params(("name" = String, Path)),
    responses((status = 200, body = Quarantined), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn remove(
    State(config): State<Arc<Config>>,
    State(store): State<Store>,
    State(farm): State<FarmStore>,
    State(quarantine): State<Arc<Quarantine>>,
    State(sessions): State<Arc<Sessions>>,
    Path(name): Path<String>,
) -> Result<Json<Quarantined>, ApiError> {
    vstream_farm::validate_name(&name)?;
    let _lock = sessions.lock_vdisk(&name).await;
    let q = held_here(&quarantine, &config.name, &name)?;
    // Still unlisted now, not only at the last reconcile.
    let listed = farm
        .catalog(&name)
        .await?
        .is_some_and(|c| c.created_unix == q.created_unix);
    if listed {
        return Err(ApiError::conflict(format!(
            "vDisk {name} is in the farm again; it is not removed"
        )));
    }
    let n = name.clone();
    tokio::task::spawn_blocking(move || store.delete(&n)).await??;
    quarantine.take(&name);
    tracing::info!(vdisk = %name, versions = ?q.versions, bytes = q.bytes, "quarantined vDisk removed by an admin");
    Ok(Json(q))
}
