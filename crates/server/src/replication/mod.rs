//! Replication: every server's store follows the farm's catalog of versions
//! by itself, pulling the layer files it lacks from its peers.
//!
//! ```text
//!   version op on server A --apply_change--> catalog/NAME (etcd, revision-compared)
//!   every second, on every server:
//!     catalog/NAME --plan--> versions whose layers are here: into vdisk.toml
//!                            layers missing: transfer (window, override, slots, throttle)
//!   transfer:  peers holding the layer verified --GET meta, GET data(segment)--> replication/NAME/FILE.partial
//!              all layers here --verify every block, the content hash--> moved into the store
//!   scrub:     every held layer re-read against its hashes; a bad block is fetched again
//! ```
//!
//! Pull only: a server never accepts data pushed at it, and every byte it
//! takes is checked against hashes from the catalog's content hash. Peers
//! must present the farm's peer secret (see `peer.rs`).

pub mod catalog;
mod follow;
pub mod handles;
pub mod peer;
pub mod quarantine;
pub mod routes;
mod scrub;
pub mod state;
mod transfer;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use vstream_api::{Catalog, ReplicaProgress, ReplicaState, ServerStatus};
use vstream_farm::FarmError;
use vstream_image::{Properties, VersionState};

use crate::clock::now_unix;
use follow::{follow, follow_blocking};
pub use handles::Handles;
use state::Key;
pub use state::Replication;

/// How often a server compares its store with the catalog.
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(1);

/// Applies an operation's change of vDisk `name` (`before` → `after` in
/// this server's store) to the farm's catalog.
pub async fn publish_change(
    server: &Handles,
    name: &str,
    before: &Properties,
    after: &Properties,
) -> Result<(), FarmError> {
    let me = server.config.name.clone();
    server
        .farm
        .update_catalog(name, |cat| {
            catalog::apply_change(cat, before, after, &me)
                .map(Some)
                .map_err(FarmError::Conflict)
        })
        .await?;
    Ok(())
}

/// Where a store operation's "before" waits until its change is in the
/// catalog: an operation that completed in the store but not in the farm
/// (a crash, etcd away) is published at the next reconcile, not undone.
/// It lives in the vDisk's folder, whose sync by the operation's own
/// properties write makes its name durable too.
fn pending_path(server: &Handles, name: &str) -> std::path::PathBuf {
    server
        .store
        .vdisk_path(name)
        .map(|d| d.join(".pending.json"))
        .unwrap_or_default()
}

/// Records, durably, that an operation on vDisk `name` starts from `before`.
pub fn begin_change(server: &Handles, name: &str, before: &Properties) -> std::io::Result<()> {
    let path = pending_path(server, name);
    if path.exists() {
        // An older change still waits: it covers this one too.
        return Ok(());
    }
    // A torn file (a crash while writing it) is dropped when read back:
    // the operation had not started then.
    let file = std::fs::File::create(&path)?;
    std::io::Write::write_all(&mut &file, &serde_json::to_vec(before)?)?;
    file.sync_data()
}

/// Publishes what changed in vDisk `name` since [`begin_change`].
pub async fn finish_change(server: &Handles, name: &str) -> Result<(), FarmError> {
    let path = pending_path(server, name);
    let Ok(bytes) = std::fs::read(&path) else {
        return Ok(());
    };
    // Counted before the catalog changes: a reconcile that read the
    // catalogs before this point sees the count moved and skips the vDisk.
    server.replication.changes.fetch_add(1, Ordering::SeqCst);
    let before: Properties = match serde_json::from_slice(&bytes) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(vdisk = %name, error = %e, "an unreadable pending change is dropped");
            let _ = std::fs::remove_file(&path);
            return Ok(());
        }
    };
    let Ok(after) = server.store.properties(name) else {
        let _ = std::fs::remove_file(&path);
        return Ok(());
    };
    match publish_change(server, name, &before, &after).await {
        Ok(()) => peer::poke_peers(
            &server.replication,
            &server.config.name,
            &server.membership.view(),
        ),
        Err(FarmError::Conflict(why)) => {
            tracing::error!(vdisk = %name, error = %why, "this server's change lost to the farm's; its store follows the catalog");
        }
        Err(e) => return Err(e),
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Publishes every change still pending (see [`begin_change`]).
async fn publish_pending(server: &Handles) -> Result<(), FarmError> {
    for name in server.store.list().unwrap_or_default() {
        if !pending_path(server, &name).exists() {
            continue;
        }
        let Some(_lock) = server.sessions.try_lock_vdisk(&name) else {
            continue;
        };
        finish_change(server, &name).await?;
        tracing::info!(vdisk = %name, "a change made before a restart is now in the catalog");
    }
    Ok(())
}

/// Brings vDisk `name` in this store up to the catalog before a version
/// operation, and says why the operation cannot run here, if it cannot.
/// The caller holds the vDisk's lock.
pub async fn before_operation(
    server: &Arc<Handles>,
    name: &str,
    creates: bool,
) -> Result<(), OperationRefused> {
    let cat = server
        .farm
        .catalog(name)
        .await
        .map_err(OperationRefused::FarmAway)?;
    let Some(cat) = cat else { return Ok(()) };
    let local = follow(server, &cat, &[])
        .await
        .map_err(|e| OperationRefused::Store(e.to_string()))?;
    if creates {
        if let Some(why) = local
            .as_ref()
            .and_then(|p| catalog::foreign_maintenance(&cat, p, &server.config.name))
        {
            return Err(OperationRefused::Elsewhere(why));
        }
    }
    Ok(())
}

/// Why a version operation cannot run on this server now.
#[derive(Debug, thiserror::Error)]
pub enum OperationRefused {
    #[error("the farm's catalog is out of reach ({0}); version operations wait for it")]
    FarmAway(FarmError),
    #[error("{0}")]
    Elsewhere(String),
    #[error("this store cannot follow the farm's catalog: {0}")]
    Store(String),
}

impl OperationRefused {
    /// The HTTP status that says it.
    pub fn status(&self) -> axum::http::StatusCode {
        match self {
            OperationRefused::FarmAway(_) => axum::http::StatusCode::SERVICE_UNAVAILABLE,
            OperationRefused::Elsewhere(_) => axum::http::StatusCode::CONFLICT,
            OperationRefused::Store(_) => axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Reconciles until `shutdown`.
pub async fn run(server: Arc<Handles>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let scrubber = tokio::spawn(scrub::run(server.clone(), shutdown.clone()));
    let rechecker = tokio::spawn(scrub::recheck(server.clone(), shutdown.clone()));
    let mut tick = tokio::time::interval(RECONCILE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = server.replication.wake.notified() => {}
            _ = shutdown.wait_for(|s| *s) => break,
        }
        if let Err(e) = reconcile(&server).await {
            tracing::debug!(error = %e, "replication waits for the farm state");
        }
    }
    scrubber.abort();
    rechecker.abort();
}

async fn reconcile(server: &Arc<Handles>) -> Result<(), FarmError> {
    let r = &server.replication;
    if r.secret().is_none() {
        let fresh: String = (0..32)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        let secret = server.farm.peer_secret(&fresh).await?;
        *r.secret.write() = Some(secret);
    }
    publish_pending(server).await?;
    let changes = r.changes.load(Ordering::SeqCst);
    let catalogs = server.farm.catalogs().await?;
    *r.order.write() = server.farm.replication_override().await?;
    *r.catalogs.write() = Arc::new(catalogs.clone());
    let unlisted = quarantine::reconcile(server, &catalogs).await?;
    let view = server.membership.view();
    let mut wanted: HashSet<Key> = HashSet::new();
    let mut needed: HashSet<(String, String)> = HashSet::new();
    for cat in catalogs.iter().filter(|c| !unlisted.contains(&c.vdisk)) {
        // A vDisk looked at next time keeps its partial copies meanwhile.
        let keep = |needed: &mut HashSet<(String, String)>| {
            needed.extend(
                cat.versions
                    .iter()
                    .flat_map(|v| v.version.layers.iter())
                    .map(|f| (cat.vdisk.clone(), f.clone())),
            )
        };
        // A long operation (an import, a merge) holds the lock: next time.
        let Some(_lock) = server.sessions.try_lock_vdisk(&cat.vdisk) else {
            keep(&mut needed);
            continue;
        };
        // A change made here since the catalogs were read (a promote, a new
        // version) would be undone by following them: next round, soon.
        if r.changes.load(Ordering::SeqCst) != changes {
            keep(&mut needed);
            r.wake.notify_one();
            continue;
        }
        // A vDisk lands in its named store: not before that store is here.
        if let Err(why) = server.stores.make_ready(&view, &cat.vdisk).await {
            keep(&mut needed);
            for v in cat.versions.iter().filter(|v| v.is_replicated()) {
                let key = (cat.vdisk.clone(), v.version.number);
                r.set_progress(&key, ReplicaState::Missing, Some(why.clone()));
                wanted.insert(key);
            }
            continue;
        }
        let s = server.clone();
        let c = cat.clone();
        let outcome = tokio::task::spawn_blocking(move || follow_blocking(&s, &c, &[])).await;
        let (local, plan) = match outcome {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                tracing::warn!(vdisk = %cat.vdisk, error = %e, "cannot follow the catalog");
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "replication task failed");
                continue;
            }
        };
        drop(_lock);
        seal_for_peers(server, cat, local.as_ref(), view.servers.len()).await;
        for (number, missing) in plan.fetch {
            let key = (cat.vdisk.clone(), number);
            wanted.insert(key.clone());
            needed.extend(missing.iter().map(|f| (cat.vdisk.clone(), f.clone())));
            if r.running.lock().contains(&key) {
                continue;
            }
            let peers = transfer::peers_for(server, &view.servers, &cat.vdisk, &missing);
            if let Err(why) = &peers {
                r.set_progress(&key, ReplicaState::Missing, Some(why.clone()));
                continue;
            }
            if let Err(why) = r.may_copy(&key) {
                r.set_progress(&key, ReplicaState::Queued, Some(why));
                continue;
            }
            if r.running.lock().len() >= r.max_transfers {
                let note = format!("waiting for a transfer slot ({} at once)", r.max_transfers);
                r.set_progress(&key, ReplicaState::Queued, Some(note));
                continue;
            }
            r.running.lock().insert(key.clone());
            r.set_progress(&key, ReplicaState::Copying, None);
            tokio::spawn(transfer::run(server.clone(), cat.clone(), number, missing));
        }
    }
    let running = r.running.lock().clone();
    r.progress
        .lock()
        .retain(|k, _| wanted.contains(k) || running.contains(k));
    if running.is_empty() {
        let s = server.clone();
        let _ = tokio::task::spawn_blocking(move || tidy(&s, &needed)).await;
    }
    Ok(())
}

/// Removes received and partial files no planned copy needs any more (a
/// version deleted or merged away before it arrived).
fn tidy(server: &Handles, needed: &HashSet<(String, String)>) {
    let dirs = server
        .store
        .replication_dirs()
        .into_iter()
        .filter_map(|root| std::fs::read_dir(root).ok())
        .flat_map(|d| d.flatten());
    for dir in dirs {
        let vdisk = dir.file_name().to_string_lossy().into_owned();
        let Ok(files) = std::fs::read_dir(dir.path()) else {
            continue;
        };
        let mut left = 0;
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            let layer = name
                .trim_end_matches(".journal")
                .trim_end_matches(".journal.tmp")
                .trim_end_matches(".partial")
                .to_owned();
            // Only what replication writes here: a layer, its partial copy
            // and that copy's journal.
            let ours = vstream_image::folders::is_layer_name(&layer)
                && f.file_type().is_ok_and(|t| t.is_file());
            if !ours || needed.contains(&(vdisk.clone(), layer)) {
                left += 1;
            } else if std::fs::remove_file(f.path()).is_ok() {
                tracing::info!(vdisk = %vdisk, file = %name, "removed a copy no version needs any more");
            }
        }
        if left == 0 {
            let _ = std::fs::remove_dir(dir.path());
        }
    }
}

/// Publishes the catalog of each local vDisk the farm knows but has no
/// catalog for (stores from before replication, and a new import); removes
/// local vDisks the farm deleted, once no device uses them.
/// A Standard-mode vDisk's version 1, imported here and not yet sealed, is
/// sealed once another server could take it: only sealed layers travel.
async fn seal_for_peers(
    server: &Arc<Handles>,
    cat: &Catalog,
    local: Option<&Properties>,
    live: usize,
) {
    if live < 2 {
        return;
    }
    let Some(local) = local else { return };
    let Some(v) = local.versions.iter().find(|v| {
        v.state == VersionState::Production && !v.is_sealed() && v.content_hash.is_some()
    }) else {
        return;
    };
    // The record itself, not the view: a mode just set counts at once.
    let standard = matches!(
        server.farm.get_vdisk(&cat.vdisk).await,
        Ok(Some(v)) if v.mode == vstream_api::Mode::Standard
    );
    if !standard {
        return;
    }
    if !server.sessions.devices_on(&cat.vdisk, v.number).is_empty() {
        return;
    }
    let number = v.number;
    let Some(_lock) = server.sessions.try_lock_vdisk(&cat.vdisk) else {
        return;
    };
    let s = server.clone();
    let name = cat.vdisk.clone();
    let before = local.clone();
    let sealed = tokio::task::spawn_blocking(move || {
        begin_change(&s, &name, &before)
            .map_err(|e| vstream_image::ImageError::Invalid(e.to_string()))?;
        s.store.seal_version(&name, number, now_unix())
    })
    .await;
    match sealed {
        Ok(Ok(v)) => {
            tracing::info!(vdisk = %cat.vdisk, version = number, "sealed so that other servers can copy it");
            if let Some(h) = &v.content_hash {
                server.membership.verified_here(&cat.vdisk, number, h);
            }
            if let Err(e) = finish_change(server, &cat.vdisk).await {
                tracing::warn!(vdisk = %cat.vdisk, error = %e, "could not record the seal in the catalog");
            }
        }
        Ok(Err(e)) => {
            tracing::warn!(vdisk = %cat.vdisk, error = %e, "could not seal for replication")
        }
        Err(e) => tracing::error!(error = %e, "seal task failed"),
    }
}

/// Server status rows for `vstream replication status`: every replicated
/// version of every catalog, on every member.
pub fn status_rows(
    catalogs: &[Catalog],
    members: &[ServerStatus],
    live: &HashSet<String>,
) -> Vec<vstream_api::ReplicaRow> {
    let mut rows = Vec::new();
    for cat in catalogs {
        for v in cat.versions.iter().filter(|v| v.is_replicated()) {
            for m in members {
                let up = live.contains(&m.name);
                let reported = m
                    .replication
                    .iter()
                    .find(|p| p.vdisk == cat.vdisk && p.version == v.version.number);
                let held = m.versions.iter().find(|h| {
                    h.vdisk == cat.vdisk
                        && h.number == v.version.number
                        && Some(&h.content_hash) == v.version.content_hash.as_ref()
                });
                let progress = match (reported, held) {
                    (Some(p), _) => p.clone(),
                    (None, Some(h)) => ReplicaProgress {
                        vdisk: cat.vdisk.clone(),
                        version: v.version.number,
                        state: if h.verified {
                            ReplicaState::Verified
                        } else {
                            ReplicaState::Queued
                        },
                        bytes_done: 0,
                        bytes_total: 0,
                        rate: 0,
                        note: (!h.verified).then(|| "held; being checked".to_string()),
                    },
                    (None, None) => ReplicaProgress {
                        vdisk: cat.vdisk.clone(),
                        version: v.version.number,
                        state: ReplicaState::Missing,
                        bytes_done: 0,
                        bytes_total: 0,
                        rate: 0,
                        note: None,
                    },
                };
                let eta_s =
                    (progress.state == ReplicaState::Copying && progress.rate > 0).then(|| {
                        progress.bytes_total.saturating_sub(progress.bytes_done) / progress.rate
                    });
                rows.push(vstream_api::ReplicaRow {
                    server: m.name.clone(),
                    up,
                    progress,
                    eta_s,
                    boot_set: held.map(|h| h.boot_set).unwrap_or_default(),
                });
            }
        }
    }
    rows
}
