//! Device login: which version a device streams, and from which server.
//!
//! The decision is a function of the farm view alone ([`choose`]), so any
//! server answers it the same way, and keeps answering from its last known
//! view while the farm store is away.
//!
//! * The version: a re-login names the version it booted (a pin) and gets
//!   exactly those bytes; a first login gets the newest version in the state
//!   its device type asks for (maintenance; test, else production; production)
//!   among the versions live servers hold.
//! * The server: for a shared read-only version (Standard mode with a cache on
//!   the device), the live server with the lowest load (devices ÷ power, with
//!   logins just sent counted) among those holding a verified replica of that
//!   content hash; for a short while after an operator moved the device
//!   (`vstream device move`, see [`crate::moves`]), the server it was moved
//!   to, if it is among those. A writable version (Private mode,
//!   maintenance) is served by the server holding its writable layer, and
//!   does not fail over.

use std::collections::HashMap;
use std::net::IpAddr;

use vstream_api::{
    CacheType, Device, DeviceType, HeldVersion, LoginReply, LoginRequest, Mode, ServerStatus,
    VersionState,
};

use crate::cidr::in_cidr;
use crate::membership::View;

/// Why a login gets no server.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoginError {
    #[error("no device has MAC {0}; add it with `vstream device add`")]
    UnknownDevice(String),
    #[error("{0}")]
    Misconfigured(String),
    /// The request's MAC is none a device can have: the request is bad.
    #[error("{0}")]
    BadMac(String),
    /// Nothing to serve now; the device should wait and ask again.
    #[error("{0}")]
    Unavailable(String),
    /// The version a device is pinned to is gone from the farm (retired or
    /// deleted), and no version has its content: it can only reboot.
    #[error("{0}")]
    Gone(String),
}

/// Whether the version `pin` names is gone from the farm: the vDisk's
/// catalog has no live version with its content hash. `catalogs` must be
/// the farm's current ones (not empty for want of reading them).
pub fn pin_gone(pin: &vstream_api::Pin, catalogs: &[vstream_api::Catalog]) -> Option<String> {
    let cat = catalogs.iter().find(|c| c.vdisk == pin.vdisk)?;
    let live = cat.versions.iter().any(|v| {
        v.version.state != VersionState::Retired
            && !v.version.layers.is_empty()
            && v.version.content_hash.as_deref() == Some(pin.content_hash.as_str())
    });
    (!live).then(|| {
        format!(
            "version {} of vDisk {} (content {}) is gone from the farm (retired or deleted), \
             and no version has its content: the device must reboot",
            pin.version,
            pin.vdisk,
            &pin.content_hash[..pin.content_hash.len().min(16)]
        )
    })
}

/// The export name a device-side-cache device opens: the read-only version,
/// named by device, version and content hash so the server can check all three.
pub fn base_export(device: &str, version: u32, hash: &str) -> String {
    format!("base/{device}@{version}/{hash}")
}

/// How an export names `device`: by name, unless an older version let in a
/// name that reads as a MAC address, which would name another device (see
/// [`vstream_farm::DeviceKey`]); then by its own MAC.
fn export_key(device: &Device) -> &str {
    if vstream_api::looks_like_mac(&device.name) {
        &device.mac
    } else {
        &device.name
    }
}

/// Parses [`base_export`]'s form.
pub fn parse_base_export(rest: &str) -> Option<(&str, u32, &str)> {
    let (device, rest) = rest.split_once('@')?;
    let (version, hash) = rest.split_once('/')?;
    Some((device, version.parse().ok()?, hash))
}

/// Decides a login from the farm `view` for a device at `client`; `recent` counts logins just sent
/// to each server that its published status does not show yet.
pub fn choose(
    view: &View,
    req: &LoginRequest,
    recent: &HashMap<String, u32>,
    client: Option<IpAddr>,
) -> Result<LoginReply, LoginError> {
    let mac = vstream_api::parse_mac(&req.mac).map_err(LoginError::BadMac)?;
    let device = view
        .device_by_mac(&mac)
        .ok_or_else(|| LoginError::UnknownDevice(mac.clone()))?;
    let vdisk = view.vdisk(&device.vdisk).ok_or_else(|| {
        LoginError::Misconfigured(format!(
            "device {} is assigned vDisk {}, which the farm does not know",
            device.name, device.vdisk
        ))
    })?;
    let servers: Vec<&ServerStatus> = view
        .servers
        .iter()
        .filter(|s| !req.avoid.contains(&s.name))
        .collect();
    let held = |s: &'_ ServerStatus| -> Vec<HeldVersion> {
        s.versions
            .iter()
            .filter(|v| v.vdisk == vdisk.name && (v.writable || !v.content_hash.is_empty()))
            .cloned()
            .collect()
    };
    let writes = device.kind == DeviceType::Maintenance || vdisk.mode == Mode::Private;
    // The version: pinned, or the newest in the wanted state.
    let (number, hash) = match &req.pin {
        Some(pin) if pin.vdisk != vdisk.name => {
            return Err(LoginError::Misconfigured(format!(
                "device {} booted vDisk {} but is now assigned {}; reboot it",
                device.name, pin.vdisk, vdisk.name
            )))
        }
        Some(pin) => {
            // The same bytes under another number (a merge rewrote the
            // layers, a rollback renumbered) serve as well.
            let all: Vec<HeldVersion> = view.servers.iter().flat_map(&held).collect();
            let serves = |v: &HeldVersion| v.verified && v.content_hash == pin.content_hash;
            let number = if writes || all.iter().any(|v| v.number == pin.version && serves(v)) {
                pin.version
            } else {
                all.iter()
                    .filter(|v| serves(v) && !v.writable)
                    .map(|v| v.number)
                    .max()
                    .unwrap_or(pin.version)
            };
            (number, pin.content_hash.clone())
        }
        None => {
            let wanted: &[VersionState] = match device.kind {
                DeviceType::Maintenance => &[VersionState::Maintenance],
                DeviceType::Test => &[VersionState::Test, VersionState::Production],
                DeviceType::Production => &[VersionState::Production],
            };
            let all: Vec<HeldVersion> = view.servers.iter().flat_map(&held).collect();
            let pick = wanted.iter().find_map(|state| {
                all.iter()
                    .filter(|v| v.state == *state)
                    .max_by_key(|v| (v.number, v.verified))
            });
            let Some(v) = pick else {
                return Err(LoginError::Unavailable(format!(
                    "no live server holds a {} version of vDisk {}",
                    wanted
                        .iter()
                        .map(|s| s.to_string())
                        .collect::<Vec<_>>()
                        .join(" or "),
                    vdisk.name
                )));
            };
            (v.number, v.content_hash.clone())
        }
    };
    let holds = |s: &&ServerStatus| {
        held(s).iter().any(|v| {
            v.number == number
                && if writes {
                    v.writable
                } else {
                    v.verified && v.content_hash == hash
                }
        })
    };
    // An operator moved the device a moment ago: the server it was moved
    // to, if that one can serve it (it may have gone since).
    let moved_to = device
        .moved
        .as_ref()
        .filter(|m| !writes && m.honoured_at(crate::clock::now_unix()))
        .and_then(|m| servers.iter().find(|s| s.name == m.server && holds(s)));
    let chosen = if moved_to.is_some() {
        moved_to
    } else if writes {
        // The writable layer lives on one server: the first holding it, by name.
        servers
            .iter()
            .filter(|s| holds(s))
            .min_by(|a, b| a.name.cmp(&b.name))
    } else {
        let load = |s: &ServerStatus| {
            f64::from(s.devices + recent.get(&s.name).copied().unwrap_or(0)) / s.power.max(0.1)
        };
        let recent_to = |s: &ServerStatus| recent.get(&s.name).copied().unwrap_or(0);
        let holders: Vec<&&ServerStatus> = servers.iter().filter(|s| holds(s)).collect();
        let open: Vec<&&ServerStatus> = holders
            .iter()
            .copied()
            .filter(|s| s.max_booting == 0 || s.booting + recent_to(s) < s.max_booting)
            .collect();
        if open.is_empty() && !holders.is_empty() {
            return Err(LoginError::Unavailable(format!(
                "every server holding vDisk {} version {number} has its most devices booting; \
                 logins are paced, ask again shortly",
                vdisk.name
            )));
        }
        // Subnet affinity: servers of the device's subnet first, if any can take it.
        let near: Vec<&&ServerStatus> = open
            .iter()
            .copied()
            .filter(|s| client.is_some_and(|ip| s.subnets.iter().any(|n| in_cidr(ip, n))))
            .collect();
        let open = if near.is_empty() { open } else { near };
        open.into_iter().min_by(|a, b| {
            load(a)
                .total_cmp(&load(b))
                .then_with(|| a.name.cmp(&b.name))
        })
    };
    let Some(server) = chosen else {
        return Err(LoginError::Unavailable(format!(
            "no live server{} holds a verified copy of vDisk {} version {number} ({})",
            if req.avoid.is_empty() {
                String::new()
            } else {
                format!(" other than {}", req.avoid.join(", "))
            },
            vdisk.name,
            &hash[..hash.len().min(16)]
        )));
    };
    let device_cache = !writes && vdisk.cache_type == CacheType::Device;
    Ok(LoginReply {
        device: device.name.clone(),
        kind: device.kind,
        vdisk: vdisk.name.clone(),
        version: number,
        content_hash: hash.clone(),
        size: vdisk.size,
        mode: vdisk.mode,
        cache_type: vdisk.cache_type,
        cache_limit: vdisk.cache_limit.unwrap_or(vdisk.size),
        server: server.name.clone(),
        api: server.api.clone(),
        nbd: server.nbd.clone(),
        export: if device_cache {
            base_export(export_key(device), number, &hash)
        } else {
            format!("device/{}", export_key(device))
        },
        failover: device_cache,
    })
}

/// The iSCSI portals a device should log in at, best first, by server:
/// the login placement asked again and again, each time avoiding the
/// servers already listed and every server without a portal. Empty when no
/// server with a portal can serve it now.
pub fn iscsi_order(
    view: &View,
    mac: &str,
    recent: &HashMap<String, u32>,
    client: Option<IpAddr>,
) -> Vec<(String, String)> {
    let mut req = LoginRequest {
        mac: mac.to_owned(),
        avoid: view
            .servers
            .iter()
            .filter(|s| s.iscsi.is_none())
            .map(|s| s.name.clone())
            .collect(),
        pin: None,
        boot: None,
    };
    let mut order = Vec::new();
    while let Ok(reply) = choose(view, &req, recent, client) {
        let portal = view
            .servers
            .iter()
            .find(|s| s.name == reply.server)
            .and_then(|s| s.iscsi.clone());
        let Some(portal) = portal else { break };
        req.avoid.push(reply.server.clone());
        order.push((reply.server, portal));
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use vstream_api::{Device, Pin, VDisk};

    fn version(number: u32, state: VersionState, hash: &str, verified: bool) -> HeldVersion {
        HeldVersion {
            vdisk: "win".into(),
            number,
            state,
            content_hash: hash.into(),
            writable: false,
            verified,
            layers: vec![],
            boot_set: Default::default(),
        }
    }

    fn server(name: &str, devices: u32, power: f64, versions: Vec<HeldVersion>) -> ServerStatus {
        ServerStatus {
            devices,
            power,
            versions,
            ..ServerStatus::idle(name, &format!("http://{name}"), &format!("{name}:10809"))
        }
    }

    fn view(kind: DeviceType, servers: Vec<ServerStatus>) -> View {
        View {
            devices: vec![Device {
                kind,
                ..Device::new("pc1", "52:54:00:00:00:01", "win", 0)
            }],
            vdisks: vec![VDisk {
                mode: Mode::Standard,
                cache_type: CacheType::Device,
                ..VDisk::new("win", 1 << 30, 0)
            }],
            servers,
            ..View::default()
        }
    }

    fn login(avoid: &[&str], pin: Option<Pin>) -> LoginRequest {
        LoginRequest {
            mac: "52-54-00-00-00-01".into(),
            avoid: avoid.iter().map(|s| s.to_string()).collect(),
            pin,
            boot: None,
        }
    }

    #[test]
    fn least_loaded_verified_holder_of_the_newest_production() {
        let p1 = version(1, VersionState::Production, "aa", true);
        let p2 = version(2, VersionState::Production, "bb", true);
        let v = view(
            DeviceType::Production,
            vec![
                server("s1", 0, 1.0, vec![p1.clone()]),
                server("s2", 5, 1.0, vec![p1.clone(), p2.clone()]),
                server("s3", 8, 4.0, vec![p2.clone()]),
                server(
                    "s4",
                    0,
                    1.0,
                    vec![version(2, VersionState::Production, "bb", false)],
                ),
            ],
        );
        let r = choose(&v, &login(&[], None), &HashMap::new(), None).unwrap();
        assert_eq!((r.version, r.content_hash.as_str()), (2, "bb"));
        // s3: 8 / 4 = 2 beats s2: 5; s4 is not verified, s1 holds only version 1.
        assert_eq!(r.server, "s3");
        assert_eq!(r.export, "base/pc1@2/bb");
        assert!(r.failover);
        // Logins just sent count: three more on s3 make it 11 / 4 > 5.
        let recent = HashMap::from([("s3".to_string(), 13)]);
        assert_eq!(
            choose(&v, &login(&[], None), &recent, None).unwrap().server,
            "s2"
        );
        assert_eq!(
            choose(&v, &login(&["s3"], None), &HashMap::new(), None)
                .unwrap()
                .server,
            "s2"
        );
    }

    #[test]
    fn a_moved_device_logs_in_at_the_server_it_was_moved_to() {
        let p1 = version(1, VersionState::Production, "aa", true);
        let mut v = view(
            DeviceType::Production,
            vec![
                server("s1", 0, 1.0, vec![p1.clone()]),
                server("s2", 9, 1.0, vec![p1.clone()]),
                server("s3", 0, 1.0, vec![]),
            ],
        );
        v.servers[1].booting = 4;
        v.servers[1].max_booting = 4;
        let pin = Pin {
            vdisk: "win".into(),
            version: 1,
            content_hash: "aa".into(),
        };
        let at = |v: &View, avoid: &[&str]| {
            choose(v, &login(avoid, Some(pin.clone())), &HashMap::new(), None).map(|r| r.server)
        };
        assert_eq!(at(&v, &[]).unwrap(), "s1", "by load");
        let now = crate::clock::now_unix();
        v.devices[0].moved = Some(vstream_api::DeviceMove {
            server: "s2".into(),
            from: "s1".into(),
            requested_unix: now,
        });
        // Moved to s2: busier, at its most devices booting, yet chosen.
        assert_eq!(at(&v, &["s1"]).unwrap(), "s2");
        assert_eq!(at(&v, &[]).unwrap(), "s2");
        // s2 failed it since: placed by load among the others.
        assert_eq!(at(&v, &["s2"]).unwrap(), "s1");
        // Moved to a server without its version: by load.
        v.devices[0].moved.as_mut().unwrap().server = "s3".into();
        assert_eq!(at(&v, &[]).unwrap(), "s1");
        // A move long ago: by load.
        let m = v.devices[0].moved.as_mut().unwrap();
        m.server = "s2".into();
        m.requested_unix = now - vstream_api::DeviceMove::HONOURED_SECS - 1;
        assert_eq!(at(&v, &[]).unwrap(), "s1");
    }

    #[test]
    fn subnet_affinity_prefers_the_devices_own_subnet() {
        let p1 = version(1, VersionState::Production, "aa", true);
        let mut near = server("near", 5, 1.0, vec![p1.clone()]);
        near.subnets = vec!["10.1.0.0/16".into()];
        let far = server("far", 0, 1.0, vec![p1]);
        let v = view(DeviceType::Production, vec![near, far]);
        let at = |ip: &str| {
            choose(
                &v,
                &login(&[], None),
                &HashMap::new(),
                Some(ip.parse().unwrap()),
            )
        };
        assert_eq!(
            at("10.1.7.9").unwrap().server,
            "near",
            "its subnet wins over load"
        );
        assert_eq!(
            at("10.2.0.1").unwrap().server,
            "far",
            "elsewhere: least loaded"
        );
        assert_eq!(at("::ffff:10.1.0.3").unwrap().server, "near");
        assert!(
            crate::cidr::parse_cidr("10.0.0.0/33").is_none()
                && crate::cidr::parse_cidr("x/8").is_none()
        );
        assert!(in_cidr("10.9.9.9".parse().unwrap(), "0.0.0.0/0"));
    }

    #[test]
    fn logins_are_paced_by_the_most_devices_booting() {
        let p1 = version(1, VersionState::Production, "aa", true);
        let mut busy = server("s1", 0, 1.0, vec![p1.clone()]);
        busy.booting = 2;
        busy.max_booting = 2;
        let mut free = server("s2", 40, 1.0, vec![p1]);
        free.max_booting = 2;
        let v = view(DeviceType::Production, vec![busy, free]);
        // s1 is less loaded but at its limit of devices booting.
        assert_eq!(
            choose(&v, &login(&[], None), &HashMap::new(), None)
                .unwrap()
                .server,
            "s2"
        );
        let recent = HashMap::from([("s2".to_string(), 2)]);
        let err = choose(&v, &login(&[], None), &recent, None).unwrap_err();
        assert!(
            matches!(err, LoginError::Unavailable(ref m) if m.contains("paced")),
            "{err}"
        );
    }

    #[test]
    fn a_pin_keeps_the_version_and_waits_when_nobody_has_it() {
        let p1 = version(1, VersionState::Production, "aa", true);
        let p2 = version(2, VersionState::Production, "bb", true);
        let v = view(
            DeviceType::Production,
            vec![
                server("s1", 0, 1.0, vec![p1]),
                server("s2", 0, 1.0, vec![p2]),
            ],
        );
        let pin = Pin {
            vdisk: "win".into(),
            version: 1,
            content_hash: "aa".into(),
        };
        let r = choose(&v, &login(&[], Some(pin.clone())), &HashMap::new(), None).unwrap();
        assert_eq!((r.server.as_str(), r.version), ("s1", 1));
        let err = choose(&v, &login(&["s1"], Some(pin)), &HashMap::new(), None).unwrap_err();
        assert!(
            matches!(err, LoginError::Unavailable(ref m) if m.contains("other than s1")),
            "{err}"
        );
    }

    #[test]
    fn test_devices_fall_back_to_production_and_unknown_macs_are_refused() {
        let v = view(
            DeviceType::Test,
            vec![server(
                "s1",
                0,
                1.0,
                vec![version(1, VersionState::Production, "aa", true)],
            )],
        );
        assert_eq!(
            choose(&v, &login(&[], None), &HashMap::new(), None)
                .unwrap()
                .version,
            1
        );
        let mut req = login(&[], None);
        req.mac = "52:54:00:00:00:99".into();
        assert!(matches!(
            choose(&v, &req, &HashMap::new(), None),
            Err(LoginError::UnknownDevice(_))
        ));
        for bad in [
            "nonsense",
            "ff:ff:ff:ff:ff:ff",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
        ] {
            req.mac = bad.into();
            assert!(
                matches!(
                    choose(&v, &req, &HashMap::new(), None),
                    Err(LoginError::BadMac(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn writable_versions_stay_on_the_server_holding_them() {
        let mut m = version(3, VersionState::Maintenance, "", false);
        m.writable = true;
        let mut v = view(
            DeviceType::Maintenance,
            vec![
                server(
                    "s1",
                    0,
                    1.0,
                    vec![version(3, VersionState::Maintenance, "cc", true)],
                ),
                server("s2", 9, 1.0, vec![m]),
            ],
        );
        let r = choose(&v, &login(&[], None), &HashMap::new(), None).unwrap();
        assert_eq!((r.server.as_str(), r.export.as_str()), ("s2", "device/pc1"));
        assert!(!r.failover);
        v.vdisks[0].cache_type = CacheType::Server;
        v.devices[0].kind = DeviceType::Production;
        v.servers[0].versions[0].state = VersionState::Production;
        let r = choose(&v, &login(&[], None), &HashMap::new(), None).unwrap();
        assert_eq!((r.export.as_str(), r.failover), ("device/pc1", false));
        // A device an older version let be named like a MAC is sent to its
        // own MAC: its name would open the device with that MAC.
        v.devices[0].name = "52-54-00-dd-00-bb".into();
        v.index();
        let r = choose(&v, &login(&[], None), &HashMap::new(), None).unwrap();
        assert_eq!(r.device, "52-54-00-dd-00-bb");
        assert_eq!(r.export, "device/52:54:00:00:00:01");
        v.vdisks[0].cache_type = CacheType::Device;
        v.vdisks[0].mode = Mode::Standard;
        let r = choose(&v, &login(&[], None), &HashMap::new(), None).unwrap();
        assert!(
            r.export.starts_with("base/52:54:00:00:00:01@3/"),
            "{}",
            r.export
        );
        assert_eq!(parse_base_export("pc1@2/bb"), Some(("pc1", 2, "bb")));
        assert_eq!(parse_base_export("pc1@x/bb"), None);
    }
}
