//! The admin HTTP API: JSON over `/api/v1`, a bearer token on every call but
//! the OpenAPI document and the health check.

mod boot;
mod content;
mod error;
mod farm;
mod stores;
mod versions;

use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use utoipa::OpenApi;
use vstream_api::{
    CreateDevice, CreateVDisk, Device, DeviceInfo, ErrorBody, SetVDisk, VDisk, VDiskInfo,
};
use vstream_image::hash;

pub use error::ApiError;

use crate::state::{now_unix, Server};

type Shared = State<Arc<Server>>;

#[derive(OpenApi)]
#[openapi(
    info(title = "vstream admin API", description = "Manage the vDisks and devices of a vstream server."),
    paths(
        list_vdisks, create_vdisk, show_vdisk, set_vdisk, delete_vdisk,
        content::import_vdisk, content::export_vdisk,
        list_devices, add_device, show_device, set_device, remove_device, reset_device,
        versions::list_versions, versions::new_version, versions::promote, versions::rollback,
        versions::merge, versions::delete_version, farm::login, farm::list_servers, farm::rebalance, farm::cache_report,
        farm::replication_status, farm::replication_start, boot::upload, boot::set_cmdline,
        stores::list_stores, stores::add_store, stores::remove_store,
        crate::quarantine::list, crate::quarantine::adopt, crate::quarantine::remove
    ),
    components(schemas(VDisk, VDiskInfo, CreateVDisk, SetVDisk, Device, DeviceInfo, CreateDevice, ErrorBody,
        vstream_api::Mode, vstream_api::CacheType, vstream_api::DeviceType, vstream_api::SetDevice,
        vstream_api::VersionState, vstream_api::VersionInfo, vstream_api::Promote, vstream_api::Merge,
        vstream_api::LoginRequest, vstream_api::LoginReply, vstream_api::Pin, vstream_api::ServerInfo,
        vstream_api::ServerStatus, vstream_api::HeldVersion, vstream_api::Rebalance,
        vstream_api::RebalancePlan, vstream_api::PlannedMove, vstream_api::CacheReport,
        vstream_api::SessionInfo, vstream_api::ReplicaRow, vstream_api::ReplicaProgress,
        vstream_api::ReplicaState, vstream_api::ReplicationStart, vstream_api::ReplicationOverride,
        vstream_api::Catalog, vstream_api::CatalogVersion, vstream_api::BootFiles,
        vstream_api::BootFile, vstream_api::BootFileKind, vstream_api::SetBootCmdline,
        vstream_api::StoreDef, vstream_api::StoreInfo, vstream_api::StoreHere,
        vstream_api::Quarantined, vstream_api::Adopt)),
    modifiers(&BearerAuth),
    security(("token" = []))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document, as JSON.
pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default()
}

pub fn router(server: Arc<Server>, token: String) -> Router {
    let token = Arc::new(token);
    let admin = Router::new()
        .route("/api/v1/vdisks", get(list_vdisks).post(create_vdisk))
        .route(
            "/api/v1/vdisks/:name",
            get(show_vdisk).patch(set_vdisk).delete(delete_vdisk),
        )
        .route(
            "/api/v1/vdisks/:name/content",
            get(content::export_vdisk).put(content::import_vdisk),
        )
        .route(
            "/api/v1/vdisks/:name/versions",
            get(versions::list_versions).post(versions::new_version),
        )
        .route(
            "/api/v1/vdisks/:name/versions/:version",
            axum::routing::delete(versions::delete_version),
        )
        .route(
            "/api/v1/vdisks/:name/versions/:version/promote",
            post(versions::promote),
        )
        .route("/api/v1/vdisks/:name/rollback", post(versions::rollback))
        .route(
            "/api/v1/vdisks/:name/boot/cmdline",
            axum::routing::put(boot::set_cmdline),
        )
        .route(
            "/api/v1/vdisks/:name/boot/:file",
            axum::routing::put(boot::upload),
        )
        .route("/api/v1/vdisks/:name/merge", post(versions::merge))
        .route("/api/v1/devices", get(list_devices).post(add_device))
        .route(
            "/api/v1/devices/:name",
            get(show_device).patch(set_device).delete(remove_device),
        )
        .route("/api/v1/devices/:name/reset", post(reset_device))
        .route("/api/v1/servers", get(farm::list_servers))
        .route(
            "/api/v1/stores",
            get(stores::list_stores).post(stores::add_store),
        )
        .route(
            "/api/v1/stores/:name",
            axum::routing::delete(stores::remove_store),
        )
        .route("/api/v1/farm/rebalance", post(farm::rebalance))
        .route("/api/v1/quarantine", get(crate::quarantine::list))
        .route(
            "/api/v1/quarantine/:name",
            axum::routing::delete(crate::quarantine::remove),
        )
        .route(
            "/api/v1/quarantine/:name/adopt",
            post(crate::quarantine::adopt),
        )
        .route("/api/v1/replication", get(farm::replication_status))
        .route("/api/v1/replication/start", post(farm::replication_start))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(token, require_token));
    Router::new()
        .route(
            "/api/v1/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], openapi_json()) }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/api/v1/login", post(farm::login))
        .route("/api/v1/cache-report", post(farm::cache_report))
        .merge(crate::boot::routes())
        .merge(admin)
        .merge(crate::replication::peer::routes(server.clone()))
        .with_state(server)
}

async fn require_token(State(token): State<Arc<String>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !constant_time_eq(given.trim().as_bytes(), token.as_bytes()) {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "a valid admin token is required (Authorization: Bearer ...)",
        )
        .into_response();
    }
    next.run(req).await
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn metrics(State(server): Shared) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        server.metrics.render(
            &[
                &server.replication.metrics()[..],
                &server.boot.metrics()[..],
                &server.membership.metrics()[..],
            ]
            .concat(),
        ),
    )
}

/// Everything `vdisk show` reports about one vDisk.
pub(crate) async fn vdisk_info(server: &Arc<Server>, vdisk: VDisk) -> Result<VDiskInfo, ApiError> {
    let connected = server.connected_to(&vdisk.name);
    let srv = server.clone();
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

async fn get_vdisk(server: &Server, name: &str) -> Result<VDisk, ApiError> {
    server
        .farm
        .get_vdisk(name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("vDisk {name} does not exist")))
}

#[utoipa::path(get, path = "/api/v1/vdisks", responses((status = 200, body = [VDiskInfo])))]
async fn list_vdisks(State(server): Shared) -> Result<Json<Vec<VDiskInfo>>, ApiError> {
    let mut out = Vec::new();
    for v in server.farm.list_vdisks().await? {
        // One broken vDisk must not hide the others: list it with its problem.
        let info = match vdisk_info(&server, v.clone()).await {
            Ok(info) => info,
            // A farm vDisk this server does not hold (yet).
            Err(_) if !server.store.exists(&v.name) => VDiskInfo {
                connected: server.connected_to(&v.name),
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
                connected: server.connected_to(&v.name),
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
async fn create_vdisk(
    State(server): Shared,
    Json(req): Json<CreateVDisk>,
) -> Result<(StatusCode, Json<VDiskInfo>), ApiError> {
    vstream_farm::validate_name(&req.name)?;
    let _lock = server.lock_vdisk(&req.name).await;
    server.quarantine.check_free(&req.name)?;
    if server.farm.get_vdisk(&req.name).await?.is_some() {
        return Err(ApiError::conflict(format!(
            "vDisk {} already exists",
            req.name
        )));
    }
    let created = now_unix();
    let store = req.store.unwrap_or_else(vstream_api::default_store);
    stores::prepare(&server, &req.name, &store).await?;
    let (srv, name, size) = (server.clone(), req.name.clone(), req.size);
    tokio::task::spawn_blocking(move || srv.store.create(&name, size, created)).await??;
    // Hashed as it was made: verified as it stands.
    if let Some(h) = server
        .store
        .properties(&req.name)?
        .version(1)
        .and_then(|v| v.content_hash.clone())
    {
        crate::farm::verified_here(&server, &req.name, 1, &h);
    }
    let vdisk = register_vdisk(&server, &req.name, req.size, created, &store).await?;
    Ok((StatusCode::CREATED, Json(vdisk_info(&server, vdisk).await?)))
}

/// Records a vDisk that is now in the store in the farm state; undoes the store on failure.
pub(crate) async fn register_vdisk(
    server: &Arc<Server>,
    name: &str,
    size: u64,
    created: u64,
    store: &str,
) -> Result<VDisk, ApiError> {
    let vdisk = VDisk {
        name: name.to_owned(),
        size,
        mode: Default::default(),
        cache_type: Default::default(),
        cache_limit: None,
        created_unix: created,
        store: store.to_owned(),
        boot: Default::default(),
    };
    match server.farm.create_vdisk(vdisk).await {
        Ok(v) => Ok(v),
        Err(e) => {
            let _ = server.store.delete(name);
            Err(e.into())
        }
    }
}

#[utoipa::path(get, path = "/api/v1/vdisks/{name}", params(("name" = String, Path)),
    responses((status = 200, body = VDiskInfo), (status = 404, body = ErrorBody)))]
async fn show_vdisk(
    State(server): Shared,
    Path(name): Path<String>,
) -> Result<Json<VDiskInfo>, ApiError> {
    let v = get_vdisk(&server, &name).await?;
    Ok(Json(vdisk_info(&server, v).await?))
}

#[utoipa::path(patch, path = "/api/v1/vdisks/{name}", params(("name" = String, Path)), request_body = SetVDisk,
    responses((status = 200, body = VDiskInfo), (status = 409, body = ErrorBody)))]
async fn set_vdisk(
    State(server): Shared,
    Path(name): Path<String>,
    Json(req): Json<SetVDisk>,
) -> Result<Json<VDiskInfo>, ApiError> {
    let _lock = server.lock_vdisk(&name).await;
    if req.mode.is_none() && req.cache_limit.is_none() && req.cache_type.is_none() {
        return Err(ApiError::bad_request(
            "nothing to change: give a mode, a cache type or a cache limit",
        ));
    }
    let connected = server.farm_devices_on(&name, None);
    if !connected.is_empty() {
        return Err(ApiError::conflict(format!(
            "vDisk {name} cannot change while devices are connected to it: {}",
            connected.join(", ")
        )));
    }
    let before = get_vdisk(&server, &name).await?;
    let v = server
        .farm
        .update_vdisk(&name, |v| {
            if let Some(m) = req.mode {
                v.mode = m;
            }
            if let Some(t) = req.cache_type {
                v.cache_type = t;
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
    server.replication.wake.notify_one();
    if v.mode != before.mode {
        // Write caches were made over the old content: a device must not see
        // them laid over whatever the vDisk holds next.
        for d in server.farm.devices_using(&name).await? {
            server.store.discard_cache(&d.name)?;
        }
    }
    Ok(Json(vdisk_info(&server, v).await?))
}

#[utoipa::path(delete, path = "/api/v1/vdisks/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 409, body = ErrorBody)))]
async fn delete_vdisk(
    State(server): Shared,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let _lock = server.lock_vdisk(&name).await;
    let connected = server.connected_to(&name);
    if !connected.is_empty() {
        return Err(ApiError::conflict(format!(
            "vDisk {name} is in use: devices {} are connected to it",
            connected.join(", ")
        )));
    }
    // With its catalog, leaving a tombstone: every other server removes its
    // copy once no device uses it.
    server.farm.delete_vdisk(&name).await?;
    let srv = server.clone();
    tokio::task::spawn_blocking(move || srv.store.delete(&name)).await??;
    Ok(StatusCode::NO_CONTENT)
}

async fn get_device(server: &Server, name: &str) -> Result<Device, ApiError> {
    server
        .farm
        .find_device(name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("device {name} does not exist")))
}

#[utoipa::path(get, path = "/api/v1/devices", responses((status = 200, body = [DeviceInfo])))]
async fn list_devices(State(server): Shared) -> Result<Json<Vec<DeviceInfo>>, ApiError> {
    let devices = server.farm.list_devices().await?;
    Ok(Json(
        devices.into_iter().map(|d| server.device_info(d)).collect(),
    ))
}

#[utoipa::path(post, path = "/api/v1/devices", request_body = CreateDevice,
    responses((status = 201, body = DeviceInfo), (status = 409, body = ErrorBody)))]
async fn add_device(
    State(server): Shared,
    Json(req): Json<CreateDevice>,
) -> Result<(StatusCode, Json<DeviceInfo>), ApiError> {
    let mac = vstream_api::parse_mac(&req.mac).map_err(ApiError::bad_request)?;
    let d = server
        .farm
        .create_device(Device {
            name: req.name,
            mac,
            vdisk: req.vdisk,
            created_unix: now_unix(),
            kind: req.kind,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(server.device_info(d))))
}

#[utoipa::path(get, path = "/api/v1/devices/{name}", params(("name" = String, Path, description = "name or MAC")),
    responses((status = 200, body = DeviceInfo), (status = 404, body = ErrorBody)))]
async fn show_device(
    State(server): Shared,
    Path(name): Path<String>,
) -> Result<Json<DeviceInfo>, ApiError> {
    let d = get_device(&server, &name).await?;
    Ok(Json(server.device_info(d)))
}

#[utoipa::path(delete, path = "/api/v1/devices/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 409, body = ErrorBody)))]
async fn remove_device(
    State(server): Shared,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let d = get_device(&server, &name).await?;
    let _lock = server.lock_vdisk(&d.vdisk).await;
    // Connected here, or to another server of the farm.
    let live = server.device_info(d.clone());
    if live.connected {
        let at = live
            .server
            .map(|s| format!(" to server {s}"))
            .unwrap_or_default();
        return Err(ApiError::conflict(format!(
            "device {} is connected{at}; remove it once it disconnects",
            d.name
        )));
    }
    // Its caches on the other servers go when they next tidy (they find
    // the device gone from the farm state).
    server.farm.delete_device(&d.name).await?;
    server.store.discard_cache(&d.name)?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(patch, path = "/api/v1/devices/{name}", params(("name" = String, Path)),
    request_body = vstream_api::SetDevice,
    responses((status = 200, body = DeviceInfo), (status = 404, body = ErrorBody)))]
async fn set_device(
    State(server): Shared,
    Path(name): Path<String>,
    Json(req): Json<vstream_api::SetDevice>,
) -> Result<Json<DeviceInfo>, ApiError> {
    let d = get_device(&server, &name).await?;
    let Some(kind) = req.kind else {
        return Err(ApiError::bad_request("nothing to change: give a type"));
    };
    // A connected device keeps what it booted; the type counts from its next boot.
    let d = server
        .farm
        .update_device(&d.name, |d| {
            d.kind = kind;
            Ok(())
        })
        .await?;
    Ok(Json(server.device_info(d)))
}

#[derive(Debug, Default, serde::Deserialize)]
struct ResetQuery {
    /// Disconnect a connected device first.
    #[serde(default)]
    force: bool,
}

/// How long `reset --force` waits for a device's connections to close.
const RESET_DISCONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

#[utoipa::path(post, path = "/api/v1/devices/{name}/reset",
    params(("name" = String, Path), ("force" = Option<bool>, Query, description = "disconnect a connected device first")),
    responses((status = 200, body = DeviceInfo), (status = 409, body = ErrorBody)))]
async fn reset_device(
    State(server): Shared,
    Path(name): Path<String>,
    Query(q): Query<ResetQuery>,
) -> Result<Json<DeviceInfo>, ApiError> {
    let d = get_device(&server, &name).await?;
    // Held throughout: no new connection of the device's vDisk starts until
    // its cache is gone.
    let _lock = server.lock_vdisk(&d.vdisk).await;
    if server.is_connected(&d.name) {
        if !q.force {
            return Err(ApiError::conflict(format!(
                "device {} is connected; its write cache can be reset once it disconnects, \
                 or now with `vstream device reset --force {}` (which disconnects it)",
                d.name, d.name
            )));
        }
        server.disconnect_device(&d.name);
        let deadline = tokio::time::Instant::now() + RESET_DISCONNECT_WAIT;
        while server.is_connected(&d.name) {
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::conflict(format!(
                    "device {} is still connected {} s after it was told to disconnect; \
                     its write cache is unchanged",
                    d.name,
                    RESET_DISCONNECT_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        tracing::info!(device = %d.name, "device disconnected for a reset");
    }
    server.store.discard_cache(&d.name)?;
    tracing::info!(device = %d.name, "write cache reset");
    Ok(Json(server.device_info(d)))
}
