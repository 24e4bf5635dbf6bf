//! The publish loop of this server as a farm member: about once a second it
//! publishes its status and reads the farm state into its [`Membership`]
//! view, so that logins and device exports go on from that state while the
//! farm store (etcd) is away.
//!
//! ```text
//!   every PUBLISH_INTERVAL:  status (sessions, bytes/s, held versions) --put_ephemeral--> live/NAME
//!                            devices/, vdisks/, live/, boots/ --list--> View (kept on failure: degraded)
//!                            View.boots --> end this server's sessions of earlier boots
//!                            a rebalance request --> let this server's share of devices go
//!                            a device moved elsewhere --> let it go (crate::moves)
//!   every etcd_history_secs:  compact etcd's history to the revision seen one period ago
//! ```

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vstream_api::{HeldVersion, ServerStatus};
use vstream_farm::FarmStore;
use vstream_image::{Store, VersionState};

use crate::clock::now_unix;
use crate::config::{Config, FarmConfig};
use crate::membership::{
    is_replica, Membership, View, BOOT_WINDOW_SECS, LIVE_TTL, PUBLISH_INTERVAL, STALE_AFTER_SECS,
};
use crate::quarantine::Quarantine;
use crate::replication::state::Replication;
use crate::sessions::Sessions;
use crate::stores::Stores;
use vstream_service::metrics::Metrics;

/// The handles the publish loop takes: all it reports on.
pub struct Handles {
    pub config: Arc<Config>,
    pub store: Store,
    pub farm: FarmStore,
    pub metrics: Arc<Metrics>,
    pub membership: Arc<Membership>,
    pub sessions: Arc<Sessions>,
    pub replication: Arc<Replication>,
    pub quarantine: Arc<Quarantine>,
    pub stores: Arc<Stores>,
}

/// The versions this server holds, with their content hashes.
pub fn held_versions(server: &Handles) -> Vec<HeldVersion> {
    let mut out = Vec::new();
    let view = server.membership.view();
    for name in server.store.list().unwrap_or_default() {
        if server.quarantine.contains(&name) {
            continue; // never served
        }
        let Ok(props) = server.store.properties(&name) else {
            continue;
        };
        for v in props.versions.iter().filter(|v| v.is_live()) {
            let hash = if v.is_sealed() {
                v.content_hash.clone().unwrap_or_default()
            } else if v.state == VersionState::Maintenance {
                String::new()
            } else {
                // An unsealed production version 1: its hash while no one
                // writes it, from the open layer or its header; never by
                // opening the layer, which reads its bitmap, every second.
                server
                    .store
                    .recorded_hash(&name, v)
                    .ok()
                    .flatten()
                    .map(|h| vstream_image::hash::to_hex(&h))
                    .unwrap_or_default()
            };
            let verified = !hash.is_empty()
                && (server.membership.is_verified(&name, v.number, &hash)
                    || (is_replica(&view, &name, v.is_sealed())
                        && server.membership.offer_if_recorded(&name, v.number, &hash)))
                && !server.replication.is_corrupt(&name, &v.layers);
            let set = server
                .sessions
                .boot_sets
                .warm_of(&name, v.number)
                .unwrap_or_default();
            out.push(HeldVersion {
                vdisk: name.clone(),
                number: v.number,
                state: v.state,
                content_hash: hash,
                writable: !v.is_sealed(),
                verified,
                layers: v.layers.clone(),
                boot_set: set,
            });
        }
    }
    out
}

/// This server's status now.
pub fn status(server: &Handles, versions: Vec<HeldVersion>) -> ServerStatus {
    let m = &server.membership;
    let read = server.metrics.read_bytes.load(Ordering::Relaxed);
    let before = m.last_read_bytes.swap(read, Ordering::Relaxed);
    let (devices, booting) = server.sessions.session_counts(BOOT_WINDOW_SECS);
    server.sessions.check_caches();
    ServerStatus {
        name: server.config.name.clone(),
        api: server.config.advertise_api.clone(),
        api_tls: server.config.advertise_api_tls.clone(),
        nbd: server.config.advertise_nbd.clone(),
        nbd_tls: (server.config.tls != vstream_service::TlsMode::Off)
            .then(|| server.config.tls.to_string()),
        iscsi: server.config.advertise_iscsi.clone(),
        power: server.config.power,
        subnets: server.config.subnets.clone(),
        devices,
        booting,
        max_booting: server.config.max_booting,
        read_bytes_per_s: read.saturating_sub(before) / PUBLISH_INTERVAL.as_secs().max(1),
        replication: server.replication.published(&versions),
        versions,
        sessions: server.sessions.sessions(),
        stores: server.stores.status(&server.membership.view()),
        quarantined: server.quarantine.list(),
        started_unix: m.started_unix.load(Ordering::Relaxed),
        updated_unix: now_unix(),
    }
}

/// Publishes and refreshes until `shutdown`; then withdraws the live record.
pub async fn run(server: Arc<Handles>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    server
        .membership
        .started_unix
        .store(now_unix(), Ordering::Relaxed);
    let verifier = tokio::spawn(server.membership.clone().verify_loop(shutdown.clone()));
    let compactor = match (&server.config.farm, server.config.etcd_history_secs) {
        (FarmConfig::Etcd(_), secs) if secs > 0 => Some(tokio::spawn(compact_loop(
            server.farm.clone(),
            std::time::Duration::from_secs(secs),
            shutdown.clone(),
        ))),
        _ => None,
    };
    let mut tick = tokio::time::interval(PUBLISH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = server.membership.publish_now.notified() => {}
            _ = shutdown.wait_for(|s| *s) => break,
        }
        server.membership.ticks.fetch_add(1, Ordering::Relaxed);
        let s = server.clone();
        let versions = tokio::task::spawn_blocking(move || held_versions(&s))
            .await
            .unwrap_or_default();
        server.membership.held.lock().clone_from(&versions);
        let status = status(&server, versions);
        let result = publish_and_read(&server, &status).await;
        let was = server
            .membership
            .connected
            .swap(result.is_ok(), Ordering::SeqCst);
        match result {
            Ok(mut view) => {
                if !view.servers.iter().any(|s| s.name == status.name) {
                    view.servers.push(status);
                }
                view.index();
                rebalance_if_asked(&server, &view);
                move_if_asked(&server, &view);
                // A device that booted through another server: its sessions
                // here are over.
                server.sessions.follow_boots(&view.boots);
                if server.membership.ticks.load(Ordering::Relaxed) % TIDY_TICKS == 1 {
                    tidy_caches(&server, &view).await;
                }
                let view = Arc::new(view);
                let (s, v) = (server.clone(), view.clone());
                let _ = tokio::task::spawn_blocking(move || s.stores.follow(&v)).await;
                let first = server.membership.view().vdisks.is_empty() && !view.vdisks.is_empty();
                *server.membership.view.write() = view;
                if first {
                    // The vDisks' modes are known now: a Standard-mode version
                    // not sealed yet is offered from its record at once, not
                    // at the next tick.
                    server.membership.publish_now.notify_one();
                }
                if !was {
                    tracing::info!(server = %server.config.name, "farm state reachable");
                }
            }
            Err(e) => {
                // Keep serving from the last known state, with our own status fresh.
                let mut shared = server.membership.view.write();
                let mut view = View::clone(&shared);
                view.servers.retain(|s| s.name != status.name);
                view.servers.push(status);
                *shared = Arc::new(view);
                let tick = server.membership.ticks.load(Ordering::Relaxed);
                if was || tick.is_multiple_of(10) {
                    tracing::warn!(error = %e, "farm state unreachable: degraded, serving from the last known state");
                }
            }
        }
    }
    verifier.abort();
    if let Some(compactor) = compactor {
        compactor.abort();
    }
    if let Err(e) = server.farm.withdraw_server(&server.config.name).await {
        tracing::warn!(error = %e, "could not withdraw from the farm at shutdown");
    }
}

/// Keeps the farm state's history in etcd to about `keep`: every `keep`,
/// compacts it to the revision seen one period before, so between one and
/// two periods of history remain for readers pinned to a revision (a paged
/// list starts over if its revision goes). etcd keeps every earlier value
/// of every key until compacted, and each server writes its status every
/// second: left alone, etcd grows until its quota refuses every write.
/// Every server does this; a revision another one compacted past already
/// is no error.
async fn compact_loop(
    farm: FarmStore,
    keep: std::time::Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(keep);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen: Option<u64> = None;
    let mut compacted_once = false;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => break,
        }
        if let Some(revision) = seen {
            match farm.compact(revision).await {
                Ok(()) => {
                    if !compacted_once || failing {
                        tracing::info!(
                            revision,
                            every_secs = keep.as_secs(),
                            "etcd history compacted: only the last period's earlier values are kept"
                        );
                    }
                    compacted_once = true;
                    failing = false;
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, revision, "could not compact etcd's history; trying again next period");
                    }
                    failing = true;
                }
            }
        }
        // On a failed read the older revision stays: compacting to it keeps
        // more history, never less.
        if let Ok(now) = farm.revision().await {
            seen = Some(now);
        }
    }
}

async fn publish_and_read(
    server: &Handles,
    status: &ServerStatus,
) -> Result<View, vstream_farm::FarmError> {
    server.farm.publish_server(status, LIVE_TTL).await?;
    let now = now_unix();
    let servers = server
        .farm
        .live_servers()
        .await?
        .into_iter()
        .filter(|s| s.updated_unix + STALE_AFTER_SECS >= now)
        .collect();
    Ok(View {
        devices: server.farm.list_devices().await?,
        vdisks: server.farm.list_vdisks().await?,
        stores: server.farm.list_stores().await?,
        servers,
        rebalance: server.farm.rebalance_request().await?,
        boots: server.farm.list_boots().await?.into_iter().collect(),
        ..View::default()
    })
}

/// How often, in publish intervals, a server discards the write caches no
/// device can use any more.
const TIDY_TICKS: u64 = 10;

/// Discards the write caches of devices that have booted since or that the
/// farm no longer has: a device is taken as gone only if the farm state,
/// asked again, says so.
async fn tidy_caches(server: &Arc<Handles>, view: &View) {
    let mut gone = Vec::new();
    let cached = {
        let s = server.clone();
        tokio::task::spawn_blocking(move || s.store.cached_devices())
            .await
            .unwrap_or_default()
    };
    for device in cached {
        if view.device(&device).is_none()
            && matches!(server.farm.get_device(&device).await, Ok(None))
        {
            gone.push(device);
        }
    }
    let (s, boots) = (server.clone(), view.boots.clone());
    let _ = tokio::task::spawn_blocking(move || s.sessions.tidy_caches(&boots, &gone)).await;
}

/// How often, in publish intervals, a server with auto-rebalance checks its load.
const AUTO_REBALANCE_TICKS: u64 = 5;

/// Acts on a new rebalance request, and on auto-rebalance: releases this
/// server's share of devices in the plan.
fn rebalance_if_asked(server: &Handles, view: &View) {
    let m = &server.membership;
    let tick = m.ticks.load(Ordering::Relaxed);
    let requested = view.rebalance.as_ref().map(|r| r.id);
    let trigger = {
        let mut handled = m.handled_rebalance.lock();
        match *handled {
            // At start, requests made before this server ran are history.
            None => {
                *handled = Some(requested);
                None
            }
            Some(last) if last != requested => {
                *handled = Some(requested);
                view.rebalance.as_ref().map(|r| r.trigger_pct)
            }
            Some(_) => None,
        }
    };
    let trigger = match (trigger, server.config.auto_rebalance) {
        (Some(t), _) => Some(t),
        (None, Some(t)) if tick.is_multiple_of(AUTO_REBALANCE_TICKS) => {
            let (devices, booting) = server.sessions.session_counts(BOOT_WINDOW_SECS);
            let booting_share = f64::from(booting) / f64::from(devices.max(1));
            (booting_share <= crate::rebalance::BOOTING_SHARE_LIMIT).then_some(t)
        }
        _ => None,
    };
    let Some(trigger) = trigger else { return };
    let me = &server.config.name;
    for (name, n) in crate::rebalance::plan(&view.servers, trigger) {
        if &name == me {
            let moved = server.sessions.release_devices(n as usize);
            tracing::info!(devices = ?moved, trigger_pct = trigger, "rebalance: letting devices go to less loaded servers");
        }
    }
}

/// Lets go of the devices an operator moved to another server, once per
/// move: their agents log in again, and the login sends them there.
fn move_if_asked(server: &Handles, view: &View) {
    let devices = {
        let mut handled = server.membership.handled_moves.lock();
        crate::moves::to_release(view, &server.config.name, now_unix(), &mut handled)
    };
    for device in devices {
        if server.sessions.release_device(&device) {
            tracing::info!(
                device,
                "move: letting the device go to the server it was moved to"
            );
        }
    }
}
