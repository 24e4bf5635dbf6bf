//! Moving a connected device to another server of the farm (`vstream device
//! move NAME --to SERVER`, the console's Move), with the machinery a
//! rebalance and a failed server already use: the server the device streams
//! from lets its session go, and its agent logs in again, avoiding that
//! server. What a move adds is where that login goes.
//!
//! ```text
//!   POST /api/v1/devices/NAME/move {"server": "s2"}     at any server
//!     check: the device is connected, keeps its write cache itself, is not on s2,
//!            and s2 is up and holds a verified copy of the version it runs
//!     devices/NAME.moved = {server: s2, from: s1, requested_unix}    the farm state
//!     a `move` event of the device
//!   s1, at once if it answered, else at its next publish tick (≤ 1 s):
//!     lets the device's session go (once per move)
//!   the agent logs in again avoiding s1 (a `failover` event)
//!     login: within DeviceMove::HONOURED_SECS of the move, s2 if it can serve it
//! ```
//!
//! A device whose writes go to its server (a Private-mode vDisk, a
//! maintenance version, a write cache on the server) never fails over, so it
//! cannot move while it runs: the route refuses it. After the move window
//! its logins are placed by load again (its next boot, a rebalance).

use vstream_api::{Device, DeviceInfo, DeviceMove, ServerStatus};

use crate::error::ApiError;
use crate::membership::View;

/// The servers of `view` that hold a verified copy of version `version` of
/// vDisk `vdisk` with content `hash` (any content if `hash` is empty), by
/// name.
pub fn holders(view: &View, vdisk: &str, version: u32, hash: &str) -> Vec<String> {
    view.servers
        .iter()
        .filter(|s| holds(s, vdisk, version, hash))
        .map(|s| s.name.clone())
        .collect()
}

fn holds(s: &ServerStatus, vdisk: &str, version: u32, hash: &str) -> bool {
    s.versions.iter().any(|v| {
        v.vdisk == vdisk
            && v.number == version
            && v.verified
            && !v.writable
            && (hash.is_empty() || v.content_hash == hash)
    })
}

/// Checks a move of device `device` (live now as `live`) to server `to`:
/// the move to record, or why not, as the API answers it. `members` are the
/// names of every server the farm has known, up or down; `view` holds the
/// live ones.
pub fn check(
    view: &View,
    members: &[String],
    device: &Device,
    live: &DeviceInfo,
    to: &str,
    now_unix: u64,
) -> Result<DeviceMove, ApiError> {
    let name = &device.name;
    let to = to.trim();
    if to.is_empty() {
        return Err(ApiError::bad_request(
            "name the server to move the device to: {\"server\": \"NAME\"}",
        ));
    }
    let (true, Some(from), Some(version)) = (live.connected, live.server.as_deref(), live.version)
    else {
        return Err(ApiError::conflict(format!(
            "device {name} is not connected: only a running device moves; when it boots, \
             it logs in at the least loaded server holding its version"
        )));
    };
    let up: Vec<&str> = view.servers.iter().map(|s| s.name.as_str()).collect();
    if !up.contains(&to) {
        if members.iter().any(|m| m == to) {
            return Err(ApiError::conflict(format!(
                "server {to} is down: device {name} can move only to a server that is up \
                 (up now: {})",
                up.join(", ")
            )));
        }
        return Err(ApiError::bad_request(format!(
            "server {to} is not a server of this farm (its servers: {})",
            if members.is_empty() {
                up.join(", ")
            } else {
                members.join(", ")
            }
        )));
    }
    if from == to {
        return Err(ApiError::conflict(format!(
            "device {name} streams from server {to} already"
        )));
    }
    if !live.device_cache {
        return Err(ApiError::conflict(format!(
            "device {name} cannot move while it runs: its writes go to server {from} \
             (a Private-mode vDisk, a maintenance version, or a write cache on the server), \
             so it stays there until it boots again"
        )));
    }
    // The content it runs, as the server it streams from holds it.
    let hash = view
        .servers
        .iter()
        .find(|s| s.name == from)
        .and_then(|s| {
            s.versions
                .iter()
                .find(|v| v.vdisk == device.vdisk && v.number == version)
        })
        .map(|v| v.content_hash.clone())
        .unwrap_or_default();
    let target = view.servers.iter().find(|s| s.name == to);
    if !target.is_some_and(|s| holds(s, &device.vdisk, version, &hash)) {
        let others: Vec<String> = holders(view, &device.vdisk, version, &hash)
            .into_iter()
            .filter(|s| s != from)
            .collect();
        return Err(ApiError::conflict(format!(
            "server {to} holds no verified copy of vDisk {} version {version}, which device \
             {name} runs; {}",
            device.vdisk,
            if others.is_empty() {
                "no other server that is up does".to_owned()
            } else {
                format!("it can move to {}", others.join(", "))
            }
        )));
    }
    Ok(DeviceMove {
        server: to.to_owned(),
        from: from.to_owned(),
        requested_unix: now_unix,
    })
}

/// The moves of `view` this server (`me`) should act on now: devices whose
/// move is still honoured, asked away from here (to another server), and
/// not acted on yet; `handled` remembers the moves acted on, by device and
/// time asked. Acting on one is letting the device's session go; a device
/// that comes back (its move's server could not take it) stays.
pub fn to_release(
    view: &View,
    me: &str,
    now_unix: u64,
    handled: &mut std::collections::HashMap<String, u64>,
) -> Vec<String> {
    handled.retain(|_, at| {
        DeviceMove {
            server: String::new(),
            from: String::new(),
            requested_unix: *at,
        }
        .honoured_at(now_unix)
    });
    view.devices
        .iter()
        .filter_map(|d| {
            let m = d.moved.as_ref()?;
            let fresh = m.honoured_at(now_unix) && m.server != me;
            let new = handled.get(&d.name) != Some(&m.requested_unix);
            (fresh && new).then(|| {
                handled.insert(d.name.clone(), m.requested_unix);
                d.name.clone()
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use vstream_api::{HeldVersion, SessionInfo, VersionState};

    fn held(number: u32, hash: &str, verified: bool) -> HeldVersion {
        HeldVersion {
            vdisk: "g".into(),
            number,
            state: VersionState::Production,
            content_hash: hash.into(),
            writable: false,
            verified,
            layers: vec![],
            boot_set: Default::default(),
        }
    }

    fn server(name: &str, versions: Vec<HeldVersion>) -> ServerStatus {
        ServerStatus {
            versions,
            ..ServerStatus::idle(name, "", "")
        }
    }

    fn device() -> Device {
        Device::new("pc1", "52:54:00:00:00:01", "g", 0)
    }

    fn live(server: Option<&str>, device_cache: bool) -> DeviceInfo {
        DeviceInfo {
            device: device(),
            connected: server.is_some(),
            connected_since: server.map(|_| 1),
            peer: None,
            cache_bytes: 0,
            server: server.map(str::to_owned),
            version: server.map(|_| 2),
            device_cache,
            protocol: None,
            iscsi_initiator: None,
            iscsi_target: None,
            failovers: 0,
            retries: 0,
            last_failover_ms: None,
            last_retry_ms: None,
        }
    }

    /// s1 runs pc1 on version 2 ("bb"); s2 holds it verified, s3 only
    /// version 1, s4 version 2 unverified, s5 version 2 of other content;
    /// s9 is down.
    fn farm() -> (View, Vec<String>) {
        let mut s1 = server("s1", vec![held(2, "bb", true)]);
        s1.sessions = vec![SessionInfo {
            device: "pc1".into(),
            vdisk: "g".into(),
            version: 2,
            since_unix: 1,
            cache_bytes: 0,
            device_cache: true,
        }];
        let view = View {
            devices: vec![device()],
            servers: vec![
                s1,
                server("s2", vec![held(1, "aa", true), held(2, "bb", true)]),
                server("s3", vec![held(1, "aa", true)]),
                server("s4", vec![held(2, "bb", false)]),
                server("s5", vec![held(2, "cc", true)]),
            ],
            ..View::default()
        };
        let members = ["s1", "s2", "s3", "s4", "s5", "s9"]
            .map(str::to_owned)
            .to_vec();
        (view, members)
    }

    fn refused(r: Result<DeviceMove, ApiError>, status: StatusCode, says: &str) {
        let e = r.expect_err(says);
        assert_eq!(e.status, status, "{}", e.message);
        assert!(e.message.contains(says), "{:?} lacks {says:?}", e.message);
    }

    #[test]
    fn a_running_device_moves_to_a_verified_holder_only() {
        let (view, members) = farm();
        let d = device();
        let on_s1 = live(Some("s1"), true);
        let m = check(&view, &members, &d, &on_s1, " s2 ", 77).unwrap();
        assert_eq!(
            m,
            DeviceMove {
                server: "s2".into(),
                from: "s1".into(),
                requested_unix: 77
            }
        );
        refused(
            check(&view, &members, &d, &on_s1, "s3", 77),
            StatusCode::CONFLICT,
            "server s3 holds no verified copy of vDisk g version 2, which device pc1 runs; \
             it can move to s2",
        );
        refused(
            check(&view, &members, &d, &on_s1, "s4", 77),
            StatusCode::CONFLICT,
            "server s4 holds no verified copy",
        );
        refused(
            check(&view, &members, &d, &on_s1, "s5", 77),
            StatusCode::CONFLICT,
            "server s5 holds no verified copy",
        );
        refused(
            check(&view, &members, &d, &on_s1, "s9", 77),
            StatusCode::CONFLICT,
            "server s9 is down",
        );
        refused(
            check(&view, &members, &d, &on_s1, "nope", 77),
            StatusCode::BAD_REQUEST,
            "server nope is not a server of this farm (its servers: s1, s2, s3, s4, s5, s9)",
        );
        refused(
            check(&view, &members, &d, &on_s1, "", 77),
            StatusCode::BAD_REQUEST,
            "name the server",
        );
        refused(
            check(&view, &members, &d, &on_s1, "s1", 77),
            StatusCode::CONFLICT,
            "streams from server s1 already",
        );
        refused(
            check(&view, &members, &d, &live(None, false), "s2", 77),
            StatusCode::CONFLICT,
            "device pc1 is not connected",
        );
        refused(
            check(&view, &members, &d, &live(Some("s1"), false), "s2", 77),
            StatusCode::CONFLICT,
            "its writes go to server s1",
        );
        assert_eq!(holders(&view, "g", 2, "bb"), ["s1", "s2"]);
        assert_eq!(holders(&view, "g", 2, ""), ["s1", "s2", "s5"]);
    }

    #[test]
    fn each_move_is_acted_on_once_by_the_servers_it_leaves() {
        let (mut view, _) = farm();
        view.devices[0].moved = Some(DeviceMove {
            server: "s2".into(),
            from: "s1".into(),
            requested_unix: 1_000,
        });
        let mut handled = Default::default();
        assert!(to_release(&view, "s2", 1_000, &mut handled).is_empty());
        assert_eq!(to_release(&view, "s1", 1_001, &mut handled), ["pc1"]);
        // Back at s1 (s2 could not take it): not let go again.
        assert!(to_release(&view, "s1", 1_002, &mut handled).is_empty());
        // A new move is.
        view.devices[0].moved.as_mut().unwrap().requested_unix = 1_010;
        assert_eq!(to_release(&view, "s1", 1_011, &mut handled), ["pc1"]);
        // An old one is history.
        let late = 1_010 + DeviceMove::HONOURED_SECS;
        view.devices[0].moved.as_mut().unwrap().requested_unix = 1_020;
        assert!(to_release(&view, "s1", late + 10, &mut handled).is_empty());
        assert!(handled.is_empty(), "{handled:?}");
    }
}
