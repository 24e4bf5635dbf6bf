//! The admin HTTP API: JSON over `/api/v1`, a bearer token on every call but
//! the OpenAPI document and the health check.

mod boot;
mod content;
mod devices;
mod doc;
mod extract;
mod farm;
mod quarantine;
mod stores;
mod tokens;
mod vdisks;
mod versions;
mod whoami;

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use utoipa::OpenApi;
use vstream_api::{
    CreateDevice, CreateVDisk, Device, DeviceInfo, ErrorBody, SetVDisk, VDisk, VDiskInfo,
};

use crate::bootsets::SetState;
use crate::config::Config;
use crate::membership::Membership;
use crate::sessions::Sessions;
use crate::state::Server;
use devices::{add_device, list_devices, remove_device, reset_device, set_device, show_device};
use doc::Shared as SharedAnswers;
use vdisks::{create_vdisk, delete_vdisk, list_vdisks, set_vdisk, show_vdisk};

#[derive(OpenApi)]
#[openapi(
    info(title = "vstream admin API", description = "Manage the vDisks and devices of a vstream server."),
    paths(
        vdisks::list_vdisks, vdisks::create_vdisk, vdisks::show_vdisk, vdisks::set_vdisk, vdisks::delete_vdisk,
        content::import_vdisk, content::export_vdisk,
        devices::list_devices, devices::add_device, devices::show_device, devices::set_device,
        devices::remove_device, devices::reset_device, devices::revoke_device, devices::issue_credential,
        devices::iscsi_access, devices::rotate_iscsi, devices::device_events, devices::move_device,
        tokens::create_token, tokens::list_tokens, tokens::revoke_token, tokens::audit,
        versions::list_versions, versions::new_version, versions::promote, versions::rollback,
        versions::merge, versions::delete_version, versions::clear_boot_set, farm::login, farm::enroll, farm::renew, farm::list_servers, farm::rebalance, farm::cache_report,
        farm::replication_status, farm::replication_start, boot::upload, boot::set_cmdline,
        stores::list_stores, stores::add_store, stores::remove_store,
        quarantine::list, quarantine::adopt, quarantine::remove, whoami::whoami
    ),
    components(schemas(VDisk, VDiskInfo, CreateVDisk, SetVDisk, Device, DeviceInfo, CreateDevice, ErrorBody,
        vstream_api::IscsiAccess, vstream_api::CreateToken, vstream_api::TokenInfo,
        vstream_api::NewToken, vstream_api::AuditEntry, vstream_api::Role,
        vstream_api::DeviceEvent, vstream_api::EventKind, vstream_api::DeviceMove, vstream_api::MoveDevice,
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
        vstream_api::Quarantined, vstream_api::Adopt, vstream_api::EnrollRequest,
        vstream_api::CredentialRequest, vstream_api::CredentialReply, vstream_api::RenewRequest,
        vstream_api::Whoami)),
    modifiers(&BearerAuth, &SharedAnswers),
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

/// The status each route answers on success (its first 2xx in the OpenAPI
/// document), by method (upper case) and axum route (`/api/v1/devices/:name`).
/// The audit trail drafts a change's entry with it before the change runs.
pub(crate) fn success_status(method: &str, route: &str) -> Option<u16> {
    static STATUSES: std::sync::OnceLock<std::collections::HashMap<(String, String), u16>> =
        std::sync::OnceLock::new();
    let statuses = STATUSES.get_or_init(|| {
        let doc: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap_or_default();
        let mut map = std::collections::HashMap::new();
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            let route = path.replace('{', ":").replace('}', "");
            for (method, op) in item.as_object().into_iter().flatten() {
                let first_2xx = op["responses"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter_map(|(code, _)| code.parse::<u16>().ok())
                    .filter(|code| (200..300).contains(code))
                    .min();
                if let Some(code) = first_2xx {
                    map.insert((method.to_ascii_uppercase(), route.clone()), code);
                }
            }
        }
        map
    });
    statuses
        .get(&(method.to_owned(), route.to_owned()))
        .copied()
}

/// `/metrics` alone, without a token, for `--metrics HOST:PORT`: a
/// Prometheus on a monitoring network scrapes it there, and the admin API
/// stays behind its tokens.
pub fn metrics_router(server: Server) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(server)
}

pub fn router(server: Server, tokens: Arc<crate::admin_tokens::AdminTokens>) -> Router {
    let access = Arc::new(
        crate::access::Access::new(tokens, server.farm.clone(), server.config.name.clone())
            .with_audit(server.config.audit),
    );
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
        .route(
            "/api/v1/vdisks/:name/versions/:version/boot-set",
            axum::routing::delete(versions::clear_boot_set),
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
        .route("/api/v1/devices/:name/move", post(devices::move_device))
        .route("/api/v1/devices/:name/revoke", post(devices::revoke_device))
        .route("/api/v1/devices/:name/iscsi", get(devices::iscsi_access))
        .route("/api/v1/devices/:name/events", get(devices::device_events))
        .route(
            "/api/v1/devices/:name/iscsi/rotate",
            post(devices::rotate_iscsi),
        )
        .route(
            "/api/v1/devices/:name/credential",
            post(devices::issue_credential),
        )
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
        .route("/api/v1/quarantine", get(quarantine::list))
        .route(
            "/api/v1/quarantine/:name",
            axum::routing::delete(quarantine::remove),
        )
        .route("/api/v1/quarantine/:name/adopt", post(quarantine::adopt))
        .route("/api/v1/replication", get(farm::replication_status))
        .route("/api/v1/replication/start", post(farm::replication_start))
        .route(
            "/api/v1/tokens",
            get(tokens::list_tokens).post(tokens::create_token),
        )
        .route(
            "/api/v1/tokens/:name",
            axum::routing::delete(tokens::revoke_token),
        )
        .route("/api/v1/audit", get(tokens::audit))
        .route("/api/v1/whoami", get(whoami::whoami))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn(crate::console::etag))
        .layer(middleware::from_fn_with_state(access, crate::access::guard));
    Router::new()
        .route(
            "/api/v1/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], openapi_json()) }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(crate::console::routes())
        .route("/api/v1/login", post(farm::login))
        .route("/api/v1/enroll", post(farm::enroll))
        .route("/api/v1/renew", post(farm::renew))
        .route("/api/v1/cache-report", post(farm::cache_report))
        .merge(admin)
        .with_state(server.clone())
        .merge(crate::boot::routes::routes(server.boot.clone()))
        .merge(crate::replication::routes::routes(
            server.replicator.clone(),
        ))
        .merge(crate::boot::routes::peer_routes(server.boot.clone()))
        .merge(crate::bootsets::peer_routes(
            server.sessions.boot_sets.clone(),
            server.replication.clone(),
        ))
}

async fn metrics(State(server): State<Server>) -> impl IntoResponse {
    use vstream_service::iscsi::Targets;
    let s = &server;
    let mut text = s.metrics.render(
        &[
            &s.replication.metrics()[..],
            &s.boot.stats.metrics()[..],
            &s.membership.metrics()[..],
            &s.sessions.boot_sets.metrics()[..],
            &s.enrollment.stats.metrics()[..],
            &s.login_guard.metrics()[..],
            &s.iscsi.stats().rows()[..],
        ]
        .concat(),
    );
    text.push_str(&gauges(&s.config, &s.membership, &s.sessions));
    text.push_str(&s.sessions.events.render());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

/// The gauges: the farm state's reach, this server's replicas by state,
/// its devices, and each connected device's write-cache fill. The
/// per-device series are one per device connected here (at most
/// `--max-connections`), and go when it disconnects.
fn gauges(config: &Config, membership: &Membership, sessions: &Sessions) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, rows: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (labels, v) in rows {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    gauge(
        "vstream_farm_state_connected",
        "1 while this server reaches the farm state (etcd), else 0",
        &[(
            String::new(),
            f64::from(u8::from(membership.is_connected())),
        )],
    );
    let view = membership.view();
    let me = view.servers.iter().find(|s| s.name == config.name);
    let states = ["missing", "queued", "copying", "verified", "corrupt"];
    let rows: Vec<(String, f64)> = states
        .iter()
        .map(|st| {
            let n = me.map_or(0, |m| {
                m.replication
                    .iter()
                    .filter(|p| p.state.to_string() == *st)
                    .count()
            });
            (format!("{{state=\"{st}\"}}"), n as f64)
        })
        .collect();
    gauge(
        "vstream_replicas",
        "versions of the farm this server should hold, by state as last published",
        &rows,
    );
    let fill = sessions.cache_fill();
    gauge(
        "vstream_devices_connected",
        "devices with a session on this server",
        &[(String::new(), sessions.sessions().len() as f64)],
    );
    let rows: Vec<(String, f64)> = fill
        .iter()
        .map(|(d, used, limit)| {
            (
                format!("{{device=\"{}\"}}", d.replace(['"', '\\', '\n'], "_")),
                (*used as f64 / *limit as f64 * 1000.0).round() / 1000.0,
            )
        })
        .collect();
    gauge(
        "vstream_device_cache_fill_ratio",
        "a connected Standard-mode device's write cache over its limit (0 to 1)",
        &rows,
    );
    let sets = sessions.boot_sets.gauges();
    type Pick = fn(&SetState) -> f64;
    let picks: [(&str, &str, Pick); 3] = [
        (
            "vstream_boot_set_bytes",
            "bytes of the boot set of a version devices boot, read ahead unless over the budget",
            |s| s.bytes as f64,
        ),
        (
            "vstream_boot_set_uncached_bytes",
            "of a version's boot set, bytes that were not in the page cache at the last check \
             (every 5 minutes; read again then): the first morning after a restart, or too little memory",
            |s| s.uncached as f64,
        ),
        (
            "vstream_boot_set_over_budget",
            "1 if a version's boot set did not fit in what was left of the boot-set budget \
             at the last check, and was not read ahead",
            |s| f64::from(u8::from(s.over_budget)),
        ),
    ];
    for (name, help, pick) in picks {
        let rows: Vec<(String, f64)> = sets.iter().map(|(l, s)| (l.clone(), pick(s))).collect();
        gauge(name, help, &rows);
    }
    out
}
