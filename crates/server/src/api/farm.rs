//! Farm endpoints: device login (no admin token), the server list, rebalance
//! and replication.

use std::sync::Arc;

use std::net::SocketAddr;

use super::extract::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use vstream_api::{
    CacheReport, ErrorBody, LoginReply, LoginRequest, PlannedMove, Rebalance, RebalancePlan,
    RebalanceRequest, ReplicaRow, ReplicationOverride, ReplicationStart, ServerInfo,
};

use vstream_farm::FarmStore;

use crate::clock::now_unix;
use crate::config::Config;
use crate::error::ApiError;
use crate::http::PeerCertificate;
use crate::login::{choose, LoginError};
use crate::login_guard::LoginGuard;
use crate::membership::{Membership, View, STALE_AFTER_SECS};
use crate::replication::Replication;
use crate::sessions::Sessions;
use vstream_service::metrics::Metrics;
use vstream_service::Certificate;

/// A device asks where to stream from. Answered from this server's last
/// known farm state, so it works while the farm store is away.
#[utoipa::path(post, path = "/api/v1/login", request_body = LoginRequest, security(()),
    responses((status = 200, body = LoginReply), (status = 400, body = ErrorBody, description = "a MAC or boot identity not well formed"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the device or its vDisk is set up wrong, or it booted another vDisk than it is assigned now: reboot it"),
        (status = 410, body = ErrorBody, description = "the version the device is pinned to is gone from the farm: reboot it"),
        (status = 429, body = ErrorBody, description = "too many refused requests from this address or MAC; Retry-After says when to ask again"),
        (status = 503, body = ErrorBody, description = "nothing to serve it now; ask again")))]
#[allow(clippy::too_many_arguments)]
pub(super) async fn login(
    State(config): State<Arc<Config>>,
    State(farm): State<FarmStore>,
    State(membership): State<Arc<Membership>>,
    State(sessions): State<Arc<Sessions>>,
    State(replication): State<Arc<Replication>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    certificate: Option<axum::Extension<PeerCertificate>>,
    State(guard): State<Arc<LoginGuard>>,
    Json(req): Json<LoginRequest>,
) -> Result<Json<LoginReply>, ApiError> {
    // A device that shows a certificate of the farm is not held back for
    // failures in its MAC's name: nobody locks it out by failing for it.
    let mac = certificate.is_none().then(|| req.mac.clone());
    let certificate = certificate.map(|c| c.0);
    let answer = answer_login(
        &config,
        &farm,
        &membership,
        &sessions,
        &replication,
        peer,
        certificate.as_ref(),
        req,
    );
    guarded(&guard, peer, mac.as_deref(), answer).await
}

#[allow(clippy::too_many_arguments)]
async fn answer_login(
    config: &Config,
    farm: &FarmStore,
    membership: &Membership,
    sessions: &Sessions,
    replication: &Replication,
    peer: SocketAddr,
    certificate: Option<&PeerCertificate>,
    req: LoginRequest,
) -> Result<Json<LoginReply>, ApiError> {
    if let Some(token) = &req.boot {
        vstream_api::check_boot_token(token).map_err(ApiError::bad_request)?;
    }
    let view = fresh_records(membership, farm, &req.mac)
        .await
        .unwrap_or_else(|| membership.view());
    if config.tls != vstream_service::TlsMode::Off {
        let shown = certificate.map(|c| &c.0);
        if let Err(why) = certified(&view, &req.mac, shown) {
            tracing::info!(mac = %req.mac, %peer, reason = %why, "login refused");
            return Err(ApiError::new(StatusCode::FORBIDDEN, why).logged());
        }
    }
    // A boot identity other than the device's last: it booted again, and
    // its sessions of the earlier boot end wherever in the farm they are.
    let device = vstream_api::parse_mac(&req.mac)
        .ok()
        .and_then(|mac| view.device_by_mac(&mac).map(|d| d.name.clone()));
    if let (Some(device), Some(token)) = (&device, &req.boot) {
        sessions.boot_of(device, Some(token), "login").await;
    }
    let recent = membership.recent_logins();
    let mut answer = choose(&view, &req, &recent, Some(peer.ip()));
    // The view holds this server's status as last published (up to a second
    // old): a copy found corrupt since is not offered, whatever it says.
    if let Ok(reply) = &answer {
        let me = &config.name;
        let corrupt_here = reply.server == *me
            && membership.held().iter().any(|v| {
                v.vdisk == reply.vdisk
                    && v.number == reply.version
                    && (replication.is_corrupt(&v.vdisk, &v.layers)
                        || membership.has_failed(&v.vdisk, v.number, &v.content_hash))
            });
        if corrupt_here {
            let mut again = req.clone();
            again.avoid.push(me.clone());
            answer = choose(&view, &again, &recent, Some(peer.ip()));
        }
    }
    if let (Err(LoginError::Unavailable(_)), Some(pin)) = (&answer, &req.pin) {
        let catalogs = replication.catalogs();
        if let Some(why) = crate::login::pin_gone(pin, &catalogs) {
            answer = Err(LoginError::Gone(why));
        }
    }
    match answer {
        Ok(mut reply) => {
            if let Some(token) = req.boot.as_ref().filter(|_| !reply.export.contains(';')) {
                // Its connections name the boot: the server it streams
                // from tells this boot from the last by them too.
                reply.export = format!("{};boot={token}", reply.export);
            }
            membership.note_login(&reply.server);
            Metrics::add(&membership.logins, 1);
            if !req.avoid.is_empty() {
                Metrics::add(&membership.failover_logins, 1);
                let moved = view
                    .device(&reply.device)
                    .and_then(|d| d.moved.as_ref())
                    .is_some_and(|m| m.server == reply.server && m.honoured_at(now_unix()));
                sessions.events.record(
                    &reply.device,
                    vstream_api::EventKind::Failover,
                    format!(
                        "logged in again avoiding {}; sent to {}{}",
                        req.avoid.join(", "),
                        reply.server,
                        if moved {
                            ", the server it was moved to"
                        } else {
                            ""
                        }
                    ),
                );
            }
            tracing::info!(device = %reply.device, vdisk = %reply.vdisk, version = reply.version, server = %reply.server, avoid = ?req.avoid, "login");
            Ok(Json(reply))
        }
        Err(e) => {
            let status = match e {
                LoginError::UnknownDevice(_) => StatusCode::NOT_FOUND,
                LoginError::Misconfigured(_) => StatusCode::CONFLICT,
                LoginError::BadMac(_) => StatusCode::BAD_REQUEST,
                LoginError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                LoginError::Gone(_) => StatusCode::GONE,
            };
            tracing::info!(mac = %req.mac, reason = %e, "login refused");
            if let (LoginError::Unavailable(why), Some(d)) = (&e, &device) {
                sessions
                    .events
                    .record(d, vstream_api::EventKind::Retry, why.clone());
            }
            // One line per refusal: not "API request failed" again for a 503.
            Err(ApiError::new(status, e.to_string()).logged())
        }
    }
}

/// Runs a device route under the failure budgets of `guard`: 429 with
/// Retry-After at once, before anything is looked up, while the client's
/// address (or `mac`) is over its budget; each refusal it answers (400,
/// 403, 404) counts against both.
async fn guarded<T>(
    guard: &LoginGuard,
    peer: SocketAddr,
    mac: Option<&str>,
    route: impl std::future::Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    if let Err(held) = guard.admit(peer.ip(), mac) {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many refused requests for {}: ask again in {} s",
                held.key, held.retry_after
            ),
        )
        .retry_after(held.retry_after)
        .logged());
    }
    let answer = route.await;
    if let Err(e) = &answer {
        if matches!(
            e.status,
            StatusCode::BAD_REQUEST | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND
        ) {
            guard.failed(peer.ip(), mac);
        }
    }
    answer
}

/// A netbooted device trades the one-time token of its boot script for a
/// short-lived certificate naming it (see [`crate::enroll`]). HTTPS only:
/// the token and the certificate never cross the wire in clear.
#[utoipa::path(post, path = "/api/v1/enroll", request_body = vstream_api::EnrollRequest, security(()),
    responses((status = 200, body = vstream_api::CredentialReply),
        (status = 400, body = ErrorBody, description = "a MAC or signing request not well formed"),
        (status = 403, body = ErrorBody, description = "no such device, or a wrong, spent, late or revoked token"),
        (status = 429, body = ErrorBody, description = "too many refused requests from this address or MAC; Retry-After says when to ask again"),
        (status = 503, body = ErrorBody, description = "this server does not enroll devices")))]
pub(super) async fn enroll(
    State(config): State<Arc<Config>>,
    State(farm): State<FarmStore>,
    State(enrollment): State<Arc<crate::enroll::Enrollment>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    https: Option<axum::Extension<crate::http::Https>>,
    State(guard): State<Arc<LoginGuard>>,
    Json(req): Json<vstream_api::EnrollRequest>,
) -> Result<Json<vstream_api::CredentialReply>, ApiError> {
    // Per address only: a token cannot be guessed, and a budget per MAC
    // would let anyone hold a device's enrollment back by failing for it.
    let answer = answer_enroll(&config, &farm, &enrollment, peer, https.is_some(), req);
    guarded(&guard, peer, None, answer).await
}

async fn answer_enroll(
    config: &Config,
    farm: &FarmStore,
    enrollment: &crate::enroll::Enrollment,
    peer: SocketAddr,
    https: bool,
    req: vstream_api::EnrollRequest,
) -> Result<Json<vstream_api::CredentialReply>, ApiError> {
    if !https {
        tracing::info!(mac = %req.mac, %peer, reason = "plain HTTP", "enrollment refused");
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "enrollment runs over HTTPS only (the server's --api-tls address)",
        )
        .logged());
    }
    match enrollment
        .enroll(config, farm, &req.mac, &req.token, &req.csr)
        .await
    {
        Ok(reply) => {
            tracing::info!(device = %reply.device, mac = %req.mac, %peer, serial = %reply.serial, "device enrolled");
            Ok(Json(reply))
        }
        Err(e) => {
            let e = ApiError::from(e);
            tracing::info!(mac = %req.mac, %peer, reason = %e.message, "enrollment refused");
            Err(e.logged())
        }
    }
}

/// A device renews its certificate with the one it holds: a new one for
/// the key of its request, valid --device-cert-hours, as long as the device
/// exists and its credentials are not revoked.
#[utoipa::path(post, path = "/api/v1/renew", request_body = vstream_api::RenewRequest, security(()),
    responses((status = 200, body = vstream_api::CredentialReply),
        (status = 400, body = ErrorBody, description = "a signing request not well formed"),
        (status = 403, body = ErrorBody, description = "no certificate shown, no such device, or revoked"),
        (status = 429, body = ErrorBody, description = "too many refused requests from this address or MAC; Retry-After says when to ask again"),
        (status = 503, body = ErrorBody, description = "this server does not enroll devices")))]
pub(super) async fn renew(
    State(config): State<Arc<Config>>,
    State(farm): State<FarmStore>,
    State(enrollment): State<Arc<crate::enroll::Enrollment>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    certificate: Option<axum::Extension<PeerCertificate>>,
    State(guard): State<Arc<LoginGuard>>,
    Json(req): Json<vstream_api::RenewRequest>,
) -> Result<Json<vstream_api::CredentialReply>, ApiError> {
    let certificate = certificate.map(|c| c.0 .0);
    let answer = answer_renew(&config, &farm, &enrollment, peer, certificate, req);
    guarded(&guard, peer, None, answer).await
}

async fn answer_renew(
    config: &Config,
    farm: &FarmStore,
    enrollment: &crate::enroll::Enrollment,
    peer: SocketAddr,
    certificate: Option<Certificate>,
    req: vstream_api::RenewRequest,
) -> Result<Json<vstream_api::CredentialReply>, ApiError> {
    let refused = |why: String| {
        tracing::info!(%peer, reason = %why, "renewal refused");
        ApiError::new(StatusCode::FORBIDDEN, why).logged()
    };
    let Some(cert) = certificate else {
        return Err(refused(
            "a device renews over HTTPS with the certificate it holds".into(),
        ));
    };
    let name = cert.name.clone().unwrap_or_default();
    let device = farm.find_device(&name).await?.ok_or_else(|| {
        refused(format!(
            "the certificate names {name:?}, which is no device"
        ))
    })?;
    if let Some(why) = device.revoked(cert.not_before) {
        return Err(refused(why));
    }
    let reply = enrollment.renew(config, &device, &req.csr)?;
    tracing::info!(device = %reply.device, %peer, serial = %reply.serial, "device certificate renewed");
    Ok(Json(reply))
}

/// On a farm with TLS, a device logs in with its own certificate: one that
/// names the device with MAC `mac`, and is not revoked.
fn certified(view: &View, mac: &str, shown: Option<&Certificate>) -> Result<(), String> {
    let Some(cert) = shown else {
        return Err(
            "this farm has TLS: a device logs in over HTTPS (the server's \
                    --api-tls address) with its client certificate"
                .into(),
        );
    };
    let name = cert.name.as_deref().unwrap_or_default();
    let device = vstream_api::parse_mac(mac)
        .ok()
        .and_then(|m| view.device_by_mac(&m));
    match (device, vstream_farm::DeviceKey::parse(name)) {
        (Some(d), Ok(key)) if key.names(d) => d.revoked(cert.not_before).map_or(Ok(()), Err),
        _ => Err(format!(
            "the client certificate names {name:?}, not the device with MAC {mac}"
        )),
    }
}

/// An agent reports its device's write-cache use (no admin token): shown
/// by `vstream device list`.
#[utoipa::path(post, path = "/api/v1/cache-report", request_body = CacheReport, security(()),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub(super) async fn cache_report(
    State(membership): State<Arc<Membership>>,
    State(sessions): State<Arc<Sessions>>,
    Json(req): Json<CacheReport>,
) -> Result<StatusCode, ApiError> {
    let mac = vstream_api::parse_mac(&req.mac).map_err(ApiError::bad_request)?;
    let view = membership.view();
    let device = view
        .device_by_mac(&mac)
        .ok_or_else(|| ApiError::not_found(format!("no device has MAC {mac}")))?;
    if sessions.report_cache(&device.name, req.cache_bytes) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!(
            "device {} does not stream its base from this server",
            device.name
        )))
    }
}

/// The device's and its vDisk's records as the farm store holds them now,
/// with the live servers of the last view: a login right after an admin
/// change sees the change. `None` (use the last view) while the store is away.
async fn fresh_records(membership: &Membership, farm: &FarmStore, mac: &str) -> Option<Arc<View>> {
    if !membership.is_connected() {
        return None;
    }
    let device = farm.find_device(mac).await.ok()??;
    let vdisk = farm.get_vdisk(&device.vdisk).await.ok()??;
    let last = membership.view();
    Some(Arc::new(View {
        devices: vec![device],
        vdisks: vec![vdisk],
        servers: last.servers.clone(),
        rebalance: None,
        ..View::default()
    }))
}

/// Every server of the farm, up or down, with its last status.
#[utoipa::path(get, path = "/api/v1/servers", responses((status = 200, body = [ServerInfo])))]
pub(super) async fn list_servers(
    State(config): State<Arc<Config>>,
    State(farm): State<FarmStore>,
    State(membership): State<Arc<Membership>>,
) -> Result<Json<Vec<ServerInfo>>, ApiError> {
    let view = membership.view();
    let connected = membership.is_connected();
    let members = if connected {
        farm.members().await.unwrap_or_default()
    } else {
        Vec::new()
    };
    let now = now_unix();
    let mut out: Vec<ServerInfo> = members
        .into_iter()
        .filter(|m| !view.servers.iter().any(|s| s.name == m.name))
        .chain(view.servers.iter().cloned())
        .map(|status| {
            let up = view.servers.iter().any(|s| s.name == status.name)
                && status.updated_unix + STALE_AFTER_SECS >= now;
            let me = status.name == config.name;
            ServerInfo {
                up,
                load: f64::from(status.devices) / status.power.max(0.1),
                farm_connected: me.then_some(connected),
                status,
            }
        })
        .collect();
    out.sort_by(|a, b| a.status.name.cmp(&b.status.name));
    Ok(Json(out))
}

/// Asks every server to let go of its devices above the average load plus
/// the trigger; they move to less loaded servers holding their version.
#[utoipa::path(post, path = "/api/v1/farm/rebalance", request_body = Rebalance,
    responses((status = 200, body = RebalancePlan), (status = 503, body = ErrorBody)))]
pub(super) async fn rebalance(
    State(farm): State<FarmStore>,
    State(membership): State<Arc<Membership>>,
    Json(req): Json<Rebalance>,
) -> Result<Json<RebalancePlan>, ApiError> {
    let trigger_pct = req.trigger_pct.unwrap_or(25.0);
    if !(0.0..=1000.0).contains(&trigger_pct) {
        return Err(ApiError::bad_request("the trigger is a percent, 0 to 1000"));
    }
    let request = RebalanceRequest {
        id: rand::random(),
        trigger_pct,
        requested_unix: now_unix(),
    };
    farm.request_rebalance(&request).await?;
    let view = membership.view();
    let moves = crate::rebalance::plan(&view.servers, trigger_pct)
        .into_iter()
        .map(|(server, devices)| PlannedMove { server, devices })
        .collect();
    tracing::info!(trigger_pct, "rebalance requested");
    Ok(Json(RebalancePlan {
        id: request.id,
        trigger_pct,
        moves,
    }))
}

/// Every replicated version on every member: missing, queued, copying,
/// verified or corrupt.
#[utoipa::path(get, path = "/api/v1/replication",
    responses((status = 200, body = [ReplicaRow]), (status = 503, body = ErrorBody)))]
pub(super) async fn replication_status(
    State(member): State<Arc<crate::farm::Handles>>,
    State(config): State<Arc<Config>>,
    State(farm): State<FarmStore>,
    State(membership): State<Arc<Membership>>,
    State(replication): State<Arc<Replication>>,
) -> Result<Json<Vec<ReplicaRow>>, ApiError> {
    let view = membership.view();
    let catalogs = farm.catalogs().await?;
    let mut members = farm.members().await?;
    let now = now_unix();
    let live: std::collections::HashSet<String> = view
        .servers
        .iter()
        .filter(|s| s.updated_unix + STALE_AFTER_SECS >= now)
        .map(|s| s.name.clone())
        .collect();
    // The others as they last published; our own versions as they are now.
    for s in view.servers.iter() {
        if let Some(m) = members.iter_mut().find(|m| m.name == s.name) {
            *m = s.clone();
        }
    }
    let m = member.clone();
    let held = tokio::task::spawn_blocking(move || crate::farm::held_versions(&m)).await?;
    if let Some(me) = members.iter_mut().find(|m| m.name == config.name) {
        me.replication = replication.published(&held);
        me.versions = held;
    }
    members.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(crate::replication::status_rows(
        &catalogs, &members, &live,
    )))
}

/// Copies now, outside the time windows: every version of every vDisk, of
/// one vDisk, or one version.
#[utoipa::path(post, path = "/api/v1/replication/start", request_body = ReplicationStart,
    responses((status = 200, body = ReplicationOverride), (status = 404, body = ErrorBody)))]
pub(super) async fn replication_start(
    State(farm): State<FarmStore>,
    Json(req): Json<ReplicationStart>,
) -> Result<Json<ReplicationOverride>, ApiError> {
    let catalogs = farm.catalogs().await?;
    let mut versions = Vec::new();
    for cat in &catalogs {
        if req.vdisk.as_ref().is_some_and(|n| n != &cat.vdisk) {
            continue;
        }
        for v in cat.versions.iter().filter(|v| v.is_replicated()) {
            if req.version.is_none_or(|n| n == v.version.number) {
                versions.push((cat.vdisk.clone(), v.version.number));
            }
        }
    }
    if versions.is_empty() {
        return Err(ApiError::not_found(match (&req.vdisk, req.version) {
            (Some(d), Some(n)) => format!("vDisk {d} has no sealed version {n} to replicate"),
            (Some(d), None) => format!("vDisk {d} has no sealed version to replicate"),
            _ => "the farm has no sealed version to replicate".to_string(),
        }));
    }
    let now = now_unix();
    let order = ReplicationOverride {
        versions,
        created_unix: now,
        expires_unix: now + OVERRIDE_SECS,
    };
    farm.set_replication_override(&order).await?;
    tracing::info!(versions = ?order.versions, "replication ordered now, outside the windows");
    Ok(Json(order))
}

/// How long a "replicate now" order holds.
const OVERRIDE_SECS: u64 = 24 * 3600;
