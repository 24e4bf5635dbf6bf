//! Named stores: `vstream store add|list|remove`, and placing a new vDisk
//! in one.

use std::sync::Arc;

use super::extract::Json;
use super::extract::Path;
use axum::extract::State;
use axum::http::StatusCode;
use vstream_api::{ErrorBody, StoreDef, StoreHere, StoreInfo, DEFAULT_STORE};

use vstream_farm::FarmStore;

use crate::error::ApiError;
use crate::membership::Membership;
use crate::stores::Stores;

/// Makes ready for vDisk `name` to be made here in `store`: the store is
/// the farm's and held here, and the vDisk will land in it.
pub(super) async fn prepare(
    stores: &Arc<Stores>,
    farm: &FarmStore,
    name: &str,
    store: &str,
) -> Result<(), ApiError> {
    if store != DEFAULT_STORE {
        let def = farm
            .get_store(store)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("store {store} does not exist")))?;
        let s = stores.clone();
        // A store this server cannot hold as the farm defines it (held here
        // at another folder, a folder vstream did not make, one overlapping
        // another) conflicts with what this server has: the request can
        // go through once an admin puts that right.
        tokio::task::spawn_blocking(move || s.hold(&def))
            .await?
            .map_err(ApiError::conflict)?;
    }
    stores
        .place_new(name, store)
        .map_err(|e| ApiError::conflict(e.to_string()))
}

#[utoipa::path(get, path = "/api/v1/stores", responses((status = 200, body = [StoreInfo])))]
pub(super) async fn list_stores(
    State(farm): State<FarmStore>,
    State(membership): State<Arc<Membership>>,
) -> Result<Json<Vec<StoreInfo>>, ApiError> {
    let vdisks = farm.list_vdisks().await?;
    let view = membership.view();
    let out = farm
        .list_stores()
        .await?
        .into_iter()
        .map(|store| {
            let servers: Vec<StoreHere> = view
                .servers
                .iter()
                .flat_map(|s| s.stores.iter())
                .filter(|h| h.store == store.name)
                .cloned()
                .collect();
            StoreInfo {
                vdisks: vdisks
                    .iter()
                    .filter(|v| v.store == store.name)
                    .map(|v| v.name.clone())
                    .collect(),
                servers,
                store,
            }
        })
        .collect();
    Ok(Json(out))
}

#[utoipa::path(post, path = "/api/v1/stores", request_body = StoreDef,
    responses((status = 201, body = StoreDef), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn add_store(
    State(held): State<Arc<Stores>>,
    State(farm): State<FarmStore>,
    State(membership): State<Arc<Membership>>,
    Json(def): Json<StoreDef>,
) -> Result<(StatusCode, Json<StoreDef>), ApiError> {
    vstream_farm::validate_name(&def.name)?;
    if def.name != DEFAULT_STORE {
        let stores = farm.list_stores().await?;
        let d = def.clone();
        tokio::task::spawn_blocking(move || check_new_store(&held, &d, &stores))
            .await?
            .map_err(|e| ApiError::bad_request(format!("store {}: {e}", def.name)))?;
    }
    let def = farm.create_store(def).await?;
    tracing::info!(store = %def.name, path = %def.path, "store added");
    membership.publish_now.notify_one();
    Ok((StatusCode::CREATED, Json(def)))
}

#[utoipa::path(delete, path = "/api/v1/stores/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn remove_store(
    State(farm): State<FarmStore>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    farm.delete_store(&name).await?;
    tracing::info!(store = %name, "store removed (its folders stay on each server)");
    Ok(StatusCode::NO_CONTENT)
}

/// Refuses a new store whose farm path is `/` or overlaps this server's
/// data folder or another store's farm path, or whose folder here (its
/// farm path, or this server's override) overlaps another store's folder
/// here or the data folder, or is a folder vstream did not make. Every server checks its own
/// folder again when it comes to hold the store.
fn check_new_store(held: &Stores, def: &StoreDef, stores: &[StoreDef]) -> Result<(), String> {
    use vstream_image::folders::{check_store_folder, check_store_path};
    let data = (
        "this server's data folder".to_owned(),
        held.data_folder().to_owned(),
    );
    let others = stores.iter().filter(|s| s.name != def.name);
    let mut farm_paths = vec![data.clone()];
    farm_paths.extend(others.clone().map(|s| {
        (
            format!("the path of store {}", s.name),
            std::path::PathBuf::from(&s.path),
        )
    }));
    let farm_path = std::path::Path::new(&def.path);
    check_store_path(farm_path, &farm_paths).map_err(|e| e.to_string())?;
    let here = held.path_here(def);
    let mut local = vec![data];
    local.extend(others.map(|s| {
        (
            format!("the folder of store {} on this server", s.name),
            held.path_here(s),
        )
    }));
    check_store_path(&here, &local).map_err(|e| e.to_string())?;
    check_store_folder(&def.name, &here).map_err(|e| e.to_string())
}
