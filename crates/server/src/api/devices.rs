//! Device endpoints: list, add, show, set, remove, reset, move.

use std::sync::Arc;

use super::extract::Json;
use super::extract::{Path, Query};
use axum::extract::State;
use axum::http::StatusCode;
use vstream_api::{CreateDevice, Device, DeviceInfo, ErrorBody};
use vstream_farm::FarmStore;
use vstream_image::Store;

use crate::clock::now_unix;
use crate::error::ApiError;
use crate::sessions::Sessions;

async fn get_device(farm: &FarmStore, name: &str) -> Result<Device, ApiError> {
    farm.find_device(name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("device {name} does not exist")))
}

#[utoipa::path(get, path = "/api/v1/devices", responses((status = 200, body = [DeviceInfo])))]
pub(super) async fn list_devices(
    State(farm): State<FarmStore>,
    State(sessions): State<Arc<Sessions>>,
) -> Result<Json<Vec<DeviceInfo>>, ApiError> {
    let devices = farm.list_devices().await?;
    // Every device's event counts in one read, not one per device.
    let counts = farm.device_event_counts().await?;
    Ok(Json(
        devices
            .into_iter()
            .map(|d| {
                let c = counts.get(&d.name);
                sessions.device_info(d).with_counts(c)
            })
            .collect(),
    ))
}

/// Device `d` with its live state and its event counts.
async fn info(farm: &FarmStore, sessions: &Sessions, d: Device) -> Result<DeviceInfo, ApiError> {
    let counts = farm.device_event_count(&d.name).await?;
    Ok(sessions.device_info(d).with_counts(Some(&counts)))
}

#[utoipa::path(post, path = "/api/v1/devices", request_body = CreateDevice,
    responses((status = 201, body = DeviceInfo), (status = 409, body = ErrorBody)))]
pub(super) async fn add_device(
    State(farm): State<FarmStore>,
    State(sessions): State<Arc<Sessions>>,
    Json(req): Json<CreateDevice>,
) -> Result<(StatusCode, Json<DeviceInfo>), ApiError> {
    let mac = vstream_api::parse_mac(&req.mac).map_err(ApiError::bad_request)?;
    let iqn = match req.iqn.as_deref() {
        Some(iqn) => Some(unused_iqn(&farm, &sessions, iqn, &req.name).await?),
        None => None,
    };
    let d = farm
        .create_device(Device {
            kind: req.kind,
            iqn,
            ..Device::new(req.name, mac, req.vdisk, now_unix())
        })
        .await?;
    // Its CHAP secrets, made now so that `device show --secrets` has them
    // before its first login.
    farm.iscsi_secrets(&d.name, crate::iscsi::fresh_secrets())
        .await?;
    Ok((StatusCode::CREATED, Json(info(&farm, &sessions, d).await?)))
}

#[utoipa::path(get, path = "/api/v1/devices/{name}", params(("name" = String, Path, description = "name or MAC")),
    responses((status = 200, body = DeviceInfo), (status = 404, body = ErrorBody)))]
pub(super) async fn show_device(
    State(farm): State<FarmStore>,
    State(sessions): State<Arc<Sessions>>,
    Path(name): Path<String>,
) -> Result<Json<DeviceInfo>, ApiError> {
    let d = get_device(&farm, &name).await?;
    Ok(Json(info(&farm, &sessions, d).await?))
}

#[utoipa::path(delete, path = "/api/v1/devices/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 409, body = ErrorBody)))]
pub(super) async fn remove_device(
    State(store): State<Store>,
    State(farm): State<FarmStore>,
    State(sessions): State<Arc<Sessions>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let d = get_device(&farm, &name).await?;
    let _lock = sessions.lock_vdisk(&d.vdisk).await;
    // Connected here, or to another server of the farm.
    let live = sessions.device_info(d.clone());
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
    farm.delete_device(&d.name).await?;
    farm.drop_enroll_token(&d.name).await?;
    store.discard_cache(&d.name)?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(patch, path = "/api/v1/devices/{name}", params(("name" = String, Path)),
    request_body = vstream_api::SetDevice,
    responses((status = 200, body = DeviceInfo), (status = 404, body = ErrorBody)))]
pub(super) async fn set_device(
    State(farm): State<FarmStore>,
    State(sessions): State<Arc<Sessions>>,
    Path(name): Path<String>,
    Json(req): Json<vstream_api::SetDevice>,
) -> Result<Json<DeviceInfo>, ApiError> {
    let d = get_device(&farm, &name).await?;
    if req.kind.is_none() && req.iqn.is_none() {
        return Err(ApiError::bad_request(
            "nothing to change: give a type or an iqn",
        ));
    }
    let iqn = match req.iqn.as_deref() {
        Some("default") => Some(None),
        Some(iqn) => Some(Some(unused_iqn(&farm, &sessions, iqn, &d.name).await?)),
        None => None,
    };
    // A connected device keeps what it booted; the type counts from its
    // next boot, the initiator name from its next iSCSI login.
    let d = farm
        .update_device(&d.name, |d| {
            if let Some(kind) = req.kind {
                d.kind = kind;
            }
            if let Some(iqn) = &iqn {
                d.iqn = iqn.clone();
            }
            Ok(())
        })
        .await?;
    Ok(Json(info(&farm, &sessions, d).await?))
}

/// Checks initiator name `iqn` for device `device`: a valid one that no
/// other device is known by (its own or the one its MAC makes). Lower-cased,
/// as iSCSI compares names.
async fn unused_iqn(
    farm: &FarmStore,
    sessions: &Sessions,
    iqn: &str,
    device: &str,
) -> Result<String, ApiError> {
    vstream_api::check_iqn(iqn).map_err(ApiError::bad_request)?;
    let iqn = iqn.to_ascii_lowercase();
    let prefix = sessions.iqn_prefix();
    if let Some(other) = farm
        .list_devices()
        .await?
        .into_iter()
        .find(|d| d.name != device && d.initiator(prefix) == iqn)
    {
        return Err(ApiError::conflict(format!(
            "device {} is known by initiator name {iqn} already",
            other.name
        )));
    }
    Ok(iqn)
}

/// The device's iSCSI names, CHAP secrets and the portals that serve it.
#[utoipa::path(get, path = "/api/v1/devices/{name}/iscsi", params(("name" = String, Path)),
    responses((status = 200, body = vstream_api::IscsiAccess), (status = 404, body = ErrorBody)))]
pub(super) async fn iscsi_access(
    State(farm): State<FarmStore>,
    State(sessions): State<Arc<Sessions>>,
    Path(name): Path<String>,
) -> Result<Json<vstream_api::IscsiAccess>, ApiError> {
    let d = get_device(&farm, &name).await?;
    let secrets = farm
        .iscsi_secrets(&d.name, crate::iscsi::fresh_secrets())
        .await?;
    tracing::info!(device = %d.name, "iSCSI secrets read");
    Ok(Json(access(&sessions, &d, secrets)))
}

/// New CHAP secrets for the device: the old ones open nothing from its next
/// login on (a session logged in now goes on).
#[utoipa::path(post, path = "/api/v1/devices/{name}/iscsi/rotate", params(("name" = String, Path)),
    responses((status = 200, body = vstream_api::IscsiAccess), (status = 404, body = ErrorBody)))]
pub(super) async fn rotate_iscsi(
    State(farm): State<FarmStore>,
    State(sessions): State<Arc<Sessions>>,
    Path(name): Path<String>,
) -> Result<Json<vstream_api::IscsiAccess>, ApiError> {
    let d = get_device(&farm, &name).await?;
    let secrets = crate::iscsi::fresh_secrets();
    farm.rotate_iscsi_secrets(&d.name, &secrets).await?;
    tracing::info!(device = %d.name, "iSCSI secrets rotated");
    Ok(Json(access(&sessions, &d, secrets)))
}

fn access(
    sessions: &Sessions,
    d: &Device,
    secrets: vstream_api::IscsiSecrets,
) -> vstream_api::IscsiAccess {
    let prefix = sessions.iqn_prefix();
    let target = vstream_api::device_target(prefix, &d.name);
    vstream_api::IscsiAccess {
        device: d.name.clone(),
        initiator: d.initiator(prefix),
        chap_user: d.name.clone(),
        chap_secret: secrets.chap_secret,
        chap_target_user: target.clone(),
        chap_target_secret: secrets.target_secret,
        created_unix: secrets.created_unix,
        portals: sessions.iscsi_portals(),
        target,
    }
}

/// Revokes every credential the device holds now: a client certificate of
/// the device that became valid up to this second opens nothing any more,
/// from its next connection on, on every server (each checks the farm state
/// when a client connects). Connections open now go on until they end.
#[utoipa::path(post, path = "/api/v1/devices/{name}/revoke", params(("name" = String, Path)),
    responses((status = 200, body = DeviceInfo), (status = 404, body = ErrorBody)))]
pub(super) async fn revoke_device(
    State(farm): State<FarmStore>,
    State(sessions): State<Arc<Sessions>>,
    Path(name): Path<String>,
) -> Result<Json<DeviceInfo>, ApiError> {
    let d = get_device(&farm, &name).await?;
    let now = now_unix();
    let d = farm
        .update_device(&d.name, |d| {
            // Never earlier than a revocation already made.
            d.credentials_revoked_unix =
                Some(d.credentials_revoked_unix.map_or(now, |t| t.max(now)));
            Ok(())
        })
        .await?;
    // A token its last boot script handed out would enroll it again.
    farm.drop_enroll_token(&d.name).await?;
    tracing::info!(device = %d.name, revoked_unix = now, "device credentials revoked");
    Ok(Json(info(&farm, &sessions, d).await?))
}

/// A credential for the device, ahead of time, for a holder with a disk to
/// keep its key on (a VM, a host): the certificate for the key of the
/// request, signed by this server's enrollment CA. Revoking the device
/// ends it, as any other.
#[utoipa::path(post, path = "/api/v1/devices/{name}/credential", params(("name" = String, Path)),
    request_body = vstream_api::CredentialRequest,
    responses((status = 200, body = vstream_api::CredentialReply), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn issue_credential(
    State(farm): State<FarmStore>,
    State(enrollment): State<Arc<crate::enroll::Enrollment>>,
    Path(name): Path<String>,
    Json(req): Json<vstream_api::CredentialRequest>,
) -> Result<Json<vstream_api::CredentialReply>, ApiError> {
    let d = get_device(&farm, &name).await?;
    let reply = enrollment.credential(&d, &req.csr, req.hours)?;
    tracing::info!(device = %d.name, serial = %reply.serial, not_after = reply.not_after_unix, "device credential issued");
    Ok(Json(reply))
}

#[derive(Debug, Default, serde::Deserialize)]
pub(super) struct ResetQuery {
    /// Disconnect a connected device first.
    #[serde(default)]
    force: bool,
}

/// How long `reset --force` waits for a device's connections to close.
const RESET_DISCONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

#[utoipa::path(post, path = "/api/v1/devices/{name}/reset",
    params(("name" = String, Path), ("force" = Option<bool>, Query, description = "disconnect a connected device first")),
    responses((status = 200, body = DeviceInfo), (status = 409, body = ErrorBody)))]
pub(super) async fn reset_device(
    State(store): State<Store>,
    State(farm): State<FarmStore>,
    State(sessions): State<Arc<Sessions>>,
    Path(name): Path<String>,
    Query(q): Query<ResetQuery>,
) -> Result<Json<DeviceInfo>, ApiError> {
    let d = get_device(&farm, &name).await?;
    // Held throughout: no new connection of the device's vDisk starts until
    // its cache is gone.
    let _lock = sessions.lock_vdisk(&d.vdisk).await;
    if sessions.is_connected(&d.name) {
        if !q.force {
            return Err(ApiError::conflict(format!(
                "device {} is connected; its write cache can be reset once it disconnects, \
                 or now with `vstream device reset --force {}` (which disconnects it)",
                d.name, d.name
            )));
        }
        sessions.disconnect_device(&d.name);
        let deadline = tokio::time::Instant::now() + RESET_DISCONNECT_WAIT;
        while sessions.is_connected(&d.name) {
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
    store.discard_cache(&d.name)?;
    tracing::info!(device = %d.name, "write cache reset");
    Ok(Json(info(&farm, &sessions, d).await?))
}

/// The device's recent events (connects, disconnects, failovers, retries,
/// refusals, full caches), oldest first, from every server.
#[utoipa::path(get, path = "/api/v1/devices/{name}/events", params(("name" = String, Path)),
    responses((status = 200, body = [vstream_api::DeviceEvent]), (status = 404, body = ErrorBody)))]
pub(super) async fn device_events(
    State(farm): State<FarmStore>,
    Path(name): Path<String>,
) -> Result<Json<Vec<vstream_api::DeviceEvent>>, ApiError> {
    let d = get_device(&farm, &name).await?;
    Ok(Json(farm.device_events(&d.name).await?))
}

/// Moves a connected device to another server of the farm: the server it
/// streams from lets it go, and its agent logs in again at `server` (see
/// [`crate::moves`]). Answered once the move is recorded; the device is
/// there within a few seconds (`vstream device move` waits for it).
#[utoipa::path(post, path = "/api/v1/devices/{name}/move", params(("name" = String, Path, description = "name or MAC")),
    request_body = vstream_api::MoveDevice,
    responses((status = 202, body = DeviceInfo, description = "the move is recorded (`moved`); the device is on its way"),
        (status = 400, body = ErrorBody, description = "no server named, or one the farm does not know"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the device is not connected, is on that server already, or cannot move while it runs; the server is down or holds no verified copy of its version")))]
#[allow(clippy::too_many_arguments)]
pub(super) async fn move_device(
    State(config): State<Arc<crate::config::Config>>,
    State(farm): State<FarmStore>,
    State(sessions): State<Arc<Sessions>>,
    State(membership): State<Arc<crate::membership::Membership>>,
    caller: Option<axum::Extension<crate::access::Caller>>,
    Path(name): Path<String>,
    Json(req): Json<vstream_api::MoveDevice>,
) -> Result<(StatusCode, Json<DeviceInfo>), ApiError> {
    let d = get_device(&farm, &name).await?;
    let live = sessions.device_info(d.clone());
    let members: Vec<String> = farm.members().await?.into_iter().map(|m| m.name).collect();
    let view = membership.view();
    let m = crate::moves::check(&view, &members, &d, &live, &req.server, now_unix())?;
    let d = farm
        .update_device(&d.name, |d| {
            d.moved = Some(m.clone());
            Ok(())
        })
        .await?;
    let who = caller.map_or_else(|| "-".to_owned(), |c| c.0.name);
    sessions.events.record(
        &d.name,
        vstream_api::EventKind::Move,
        format!("moved from {} to {} by {who}", m.from, m.server),
    );
    tracing::info!(device = %d.name, from = %m.from, to = %m.server, %who, "device move asked");
    // The server it streams from lets it go at its next look at the farm
    // state: this one at once.
    if m.from == config.name {
        membership.publish_now.notify_one();
    }
    Ok((StatusCode::ACCEPTED, Json(info(&farm, &sessions, d).await?)))
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, FileConfig, FlagConfig};
    use crate::membership::View;
    use crate::state::Server;
    use axum::Extension;
    use vstream_api::{
        CacheType, EventKind, HeldVersion, Mode, MoveDevice, ServerStatus, SessionInfo, VDisk,
        VersionState,
    };

    /// Server s1 of a farm on its embedded store; s2 and s3 are members too.
    async fn s1(dir: &std::path::Path) -> Server {
        let flags = FlagConfig {
            data: Some(dir.to_owned()),
            name: Some("s1".into()),
            ..Default::default()
        };
        let config = Config::resolve(FileConfig::default(), flags).unwrap();
        let store = Store::open(dir).unwrap();
        let farm = FarmStore::embedded(dir.join("farm.redb")).unwrap();
        farm.create_vdisk(VDisk {
            mode: Mode::Standard,
            cache_type: CacheType::Device,
            ..VDisk::new("g", 1 << 20, 0)
        })
        .await
        .unwrap();
        for (name, mac) in [("pc1", "52:54:00:00:30:01"), ("pc2", "52:54:00:00:30:02")] {
            farm.create_device(Device::new(name, mac, "g", 0))
                .await
                .unwrap();
        }
        for s in ["s1", "s2", "s3"] {
            farm.publish_server(
                &ServerStatus::idle(s, "", ""),
                std::time::Duration::from_secs(60),
            )
            .await
            .unwrap();
        }
        Server::new(
            config,
            store,
            farm,
            vstream_service::Tls::off(),
            Default::default(),
        )
    }

    /// The farm as s1 sees it: pc1 streams version 2 of g from s2, which
    /// s1 holds verified too; s3 is down.
    fn view(server: &Server, verified_here: bool) {
        let v2 = |verified| HeldVersion {
            vdisk: "g".into(),
            number: 2,
            state: VersionState::Production,
            content_hash: "bb".into(),
            writable: false,
            verified,
            layers: vec![],
            boot_set: Default::default(),
        };
        let mut s2 = ServerStatus {
            versions: vec![v2(true)],
            ..ServerStatus::idle("s2", "", "")
        };
        s2.sessions = vec![SessionInfo {
            device: "pc1".into(),
            vdisk: "g".into(),
            version: 2,
            since_unix: 1,
            device_cache: true,
            cache_bytes: 0,
        }];
        let s1 = ServerStatus {
            versions: vec![v2(verified_here)],
            ..ServerStatus::idle("s1", "", "")
        };
        *server.membership.view.write() = Arc::new(View {
            servers: vec![s1, s2],
            ..View::default()
        });
    }

    async fn move_to(
        server: &Server,
        device: &str,
        to: &str,
    ) -> Result<(StatusCode, DeviceInfo), ApiError> {
        let caller = crate::access::Caller {
            name: "ops".into(),
            role: vstream_api::Role::Operator,
        };
        let (status, Json(info)) = move_device(
            State(server.config.clone()),
            State(server.farm.clone()),
            State(server.sessions.clone()),
            State(server.membership.clone()),
            Some(Extension(caller)),
            Path(device.into()),
            Json(MoveDevice { server: to.into() }),
        )
        .await?;
        Ok((status, info))
    }

    fn refused(r: Result<(StatusCode, DeviceInfo), ApiError>, status: StatusCode, says: &str) {
        let e = r.map(|(s, _)| s).expect_err(says);
        assert_eq!(e.status, status, "{}", e.message);
        assert!(e.message.contains(says), "{:?} lacks {says:?}", e.message);
    }

    #[tokio::test]
    async fn the_move_route_records_a_move_it_can_make_and_refuses_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let server = s1(dir.path()).await;
        view(&server, false);
        refused(
            move_to(&server, "pc1", "s1").await,
            StatusCode::CONFLICT,
            "server s1 holds no verified copy of vDisk g version 2, which device pc1 runs; \
             no other server that is up does",
        );
        refused(
            move_to(&server, "pc1", "s3").await,
            StatusCode::CONFLICT,
            "server s3 is down",
        );
        refused(
            move_to(&server, "pc1", "s7").await,
            StatusCode::BAD_REQUEST,
            "server s7 is not a server of this farm (its servers: s1, s2, s3)",
        );
        refused(
            move_to(&server, "pc1", "s2").await,
            StatusCode::CONFLICT,
            "streams from server s2 already",
        );
        refused(
            move_to(&server, "pc2", "s1").await,
            StatusCode::CONFLICT,
            "device pc2 is not connected",
        );
        refused(
            move_to(&server, "pc9", "s1").await,
            StatusCode::NOT_FOUND,
            "device pc9 does not exist",
        );
        let device = |name: &str| {
            let farm = server.farm.clone();
            let name = name.to_owned();
            async move { farm.get_device(&name).await.unwrap().unwrap() }
        };
        assert_eq!(device("pc1").await.moved, None, "a refusal records nothing");

        // Verified here now: pc1 moves to s1.
        view(&server, true);
        let (status, info) = move_to(&server, "52-54-00-00-30-01", "s1").await.unwrap();
        assert_eq!(status, StatusCode::ACCEPTED);
        let m = info.device.moved.clone().expect("the move in the answer");
        assert_eq!((m.server.as_str(), m.from.as_str()), ("s1", "s2"));
        assert_eq!(info.server.as_deref(), Some("s2"), "not there yet");
        assert_eq!(device("pc1").await.moved, Some(m.clone()));
        // Recorded as its event (in the background), and counted.
        for _ in 0..200 {
            if server.farm.device_event_count("pc1").await.unwrap().moves == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let events = server.farm.device_events("pc1").await.unwrap();
        let e = events
            .iter()
            .find(|e| e.kind == EventKind::Move)
            .expect("a move event");
        assert_eq!(
            (e.server.as_str(), e.detail.as_str()),
            ("s1", "moved from s2 to s1 by ops")
        );
        // The server it leaves lets it go once; the one it goes to, never.
        let mut view = View::clone(&server.membership.view());
        view.devices = server.farm.list_devices().await.unwrap();
        let now = now_unix();
        let mut handled = Default::default();
        assert_eq!(
            crate::moves::to_release(&view, "s2", now, &mut handled),
            ["pc1"]
        );
        assert!(crate::moves::to_release(&view, "s1", now, &mut Default::default()).is_empty());
    }

    #[tokio::test]
    async fn the_device_list_counts_each_devices_retries_and_failovers() {
        let dir = tempfile::tempdir().unwrap();
        let server = s1(dir.path()).await;
        let event = |at_ms, kind| vstream_api::DeviceEvent {
            at_ms,
            kind,
            server: "s2".into(),
            detail: String::new(),
        };
        for (at, kind) in [
            (1, EventKind::Retry),
            (2, EventKind::Retry),
            (3, EventKind::Connect),
            (4, EventKind::Failover),
            (5, EventKind::Retry),
        ] {
            server
                .farm
                .add_device_event("pc1", &event(at, kind), 2)
                .await
                .unwrap();
        }
        let Json(list) = list_devices(State(server.farm.clone()), State(server.sessions.clone()))
            .await
            .unwrap();
        let pc = |name: &str| list.iter().find(|d| d.device.name == name).unwrap().clone();
        let pc1 = pc("pc1");
        assert_eq!(
            (pc1.retries, pc1.failovers),
            (3, 1),
            "more than the 2 events kept"
        );
        assert_eq!(
            (pc1.last_retry_ms, pc1.last_failover_ms),
            (Some(5), Some(4))
        );
        let pc2 = pc("pc2");
        assert_eq!(
            (pc2.retries, pc2.failovers, pc2.last_retry_ms),
            (0, 0, None)
        );
        let json = serde_json::to_value(&pc1).unwrap();
        assert_eq!(
            (json["retries"].as_u64(), json["failovers"].as_u64()),
            (Some(3), Some(1))
        );
        let Json(one) = show_device(
            State(server.farm.clone()),
            State(server.sessions.clone()),
            Path("pc1".into()),
        )
        .await
        .unwrap();
        assert_eq!((one.retries, one.failovers), (3, 1));
    }
}
