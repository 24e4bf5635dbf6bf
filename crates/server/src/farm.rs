//! This server as a farm member: it publishes its status about once a second
//! and keeps the last farm state it read, so that logins and device exports
//! go on from that state while the farm store (etcd) is away.
//!
//! ```text
//!   every PUBLISH_INTERVAL:  status (sessions, bytes/s, held versions) --put_ephemeral--> live/NAME
//!                            devices/, vdisks/, live/, boots/ --list--> View (kept on failure: degraded)
//!                            View.boots --> end this server's sessions of earlier boots
//!   at start:                each held version whose verification record holds --> verified set
//!                            (files unchanged since checked: offered at once, re-read in the background)
//!   in the background:       each held version not yet verified --Store::check--> verified set
//! ```

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use vstream_api::{Device, HeldVersion, Mode, RebalanceRequest, ServerStatus, VDisk};
use vstream_image::{ImageError, Trust, VersionState};

use crate::metrics::Metrics;
use crate::state::{now_unix, Server};

/// How often a server publishes its status and re-reads the farm state.
pub const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);
/// A published status lives this long without renewal.
pub const LIVE_TTL: Duration = Duration::from_secs(3);
/// A status older than this is taken as down even if its key is still there
/// (the embedded store has no leases).
pub const STALE_AFTER_SECS: u64 = 10;
/// A device session younger than this counts as booting.
pub const BOOT_WINDOW_SECS: u64 = 60;

/// The farm state as last read.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub devices: Vec<Device>,
    pub vdisks: Vec<VDisk>,
    /// The farm's named stores.
    pub stores: Vec<vstream_api::StoreDef>,
    /// Live servers, this one included once it has published.
    pub servers: Vec<ServerStatus>,
    /// The newest rebalance request.
    pub rebalance: Option<RebalanceRequest>,
    /// Each device's current boot.
    pub boots: HashMap<String, vstream_api::BootRecord>,
    /// Device positions by MAC, for logins.
    pub(crate) macs: HashMap<String, usize>,
}

impl View {
    pub fn device_by_mac(&self, mac: &str) -> Option<&Device> {
        match self.macs.get(mac) {
            Some(&i) => self.devices.get(i),
            None if self.macs.is_empty() => self.devices.iter().find(|d| d.mac == mac),
            None => None,
        }
    }

    /// Builds the MAC index (after the devices change).
    pub fn index(&mut self) {
        self.macs = self
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| (d.mac.clone(), i))
            .collect();
    }
    /// The device a lookup names: by MAC if the key is one, else by name
    /// (as [`vstream_farm::FarmStore::find_device`] does).
    pub fn find_device(&self, key: &vstream_farm::DeviceKey) -> Option<&Device> {
        match key {
            vstream_farm::DeviceKey::Mac(mac) => self.device_by_mac(mac),
            vstream_farm::DeviceKey::Name(name) => self.device(name),
        }
    }
    pub fn device(&self, name: &str) -> Option<&Device> {
        self.devices.iter().find(|d| d.name == name)
    }
    pub fn vdisk(&self, name: &str) -> Option<&VDisk> {
        self.vdisks.iter().find(|v| v.name == name)
    }
}

/// A version with its content: (vDisk, number, content hash).
pub(crate) type VersionKey = (String, u32, String);

/// Membership state of this server.
#[derive(Default)]
pub struct Membership {
    /// Shared, not copied: a login reads it while the next one is built.
    view: RwLock<Arc<View>>,
    /// Whether the last publish and read reached the farm store.
    connected: AtomicBool,
    /// Versions whose layers were checked.
    verified: Mutex<HashSet<VersionKey>>,
    /// The versions found in the store at the last publish.
    held: Mutex<Vec<HeldVersion>>,
    /// Versions that failed the check; not tried again until restart.
    failed: Mutex<HashSet<VersionKey>>,
    /// Versions whose verification record was looked at (once each).
    record_tried: Mutex<HashSet<VersionKey>>,
    /// Versions offered on the strength of their record, in part or whole,
    /// waiting to be read again in the background.
    recheck: Mutex<BTreeSet<VersionKey>>,
    /// Wakes the background re-check.
    pub recheck_now: tokio::sync::Notify,
    /// Bytes the checks before offering read.
    pub check_read_bytes: AtomicU64,
    /// Versions offered from their verification record, unread.
    pub recorded_versions: AtomicU64,
    /// Bytes the background re-check read.
    pub recheck_read_bytes: AtomicU64,
    /// Versions the background re-check took out of service.
    pub recheck_failures: AtomicU64,
    /// One check of a version at a time.
    checking: Mutex<HashMap<VersionKey, Arc<tokio::sync::Mutex<()>>>>,
    /// Logins sent to each server recently, not yet in its published count.
    recent: Mutex<HashMap<String, Vec<Instant>>>,
    last_read_bytes: AtomicU64,
    started_unix: AtomicU64,
    /// The rebalance request acted on last (`Some(None)`: none at start).
    handled_rebalance: Mutex<Option<Option<u64>>>,
    ticks: AtomicU64,
    /// Wakes the publish loop before its next tick (a replica just verified).
    pub publish_now: tokio::sync::Notify,
}

impl Membership {
    pub fn view(&self) -> Arc<View> {
        self.view.read().clone()
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// The versions this server held at the last publish.
    pub fn held(&self) -> Vec<HeldVersion> {
        self.held.lock().clone()
    }

    /// Records a version as verified (replication checked it as it arrived).
    pub fn mark_verified(&self, vdisk: &str, number: u32, hash: &str) {
        self.verified
            .lock()
            .insert((vdisk.to_owned(), number, hash.to_owned()));
    }

    pub fn is_verified(&self, vdisk: &str, number: u32, hash: &str) -> bool {
        self.verified
            .lock()
            .contains(&(vdisk.to_owned(), number, hash.to_owned()))
    }

    /// True if this server's copy failed a check (and is not offered).
    pub fn has_failed(&self, vdisk: &str, number: u32, hash: &str) -> bool {
        self.failed
            .lock()
            .contains(&(vdisk.to_owned(), number, hash.to_owned()))
    }

    /// The next version to read again in the background, if any.
    pub(crate) fn next_recheck(&self) -> Option<VersionKey> {
        self.recheck.lock().pop_first()
    }

    /// Prometheus rows for `/metrics`.
    pub fn metrics(&self) -> [(&'static str, &'static str, &'static str, &AtomicU64); 4] {
        [
            (
                "vstream_verify_read_bytes_total",
                "counter",
                "bytes read to check versions before they were offered",
                &self.check_read_bytes,
            ),
            (
                "vstream_verify_recorded_versions_total",
                "counter",
                "versions offered unread: files unchanged since their recorded check",
                &self.recorded_versions,
            ),
            (
                "vstream_recheck_read_bytes_total",
                "counter",
                "bytes the background re-check of versions offered from their record read",
                &self.recheck_read_bytes,
            ),
            (
                "vstream_recheck_failures_total",
                "counter",
                "versions the background re-check took out of service",
                &self.recheck_failures,
            ),
        ]
    }

    /// Counts a login just sent to `server`.
    pub fn note_login(&self, server: &str) {
        self.recent
            .lock()
            .entry(server.to_owned())
            .or_default()
            .push(Instant::now());
    }

    /// Logins sent to each server within the last two publish intervals.
    pub fn recent_logins(&self) -> HashMap<String, u32> {
        let mut recent = self.recent.lock();
        let horizon = PUBLISH_INTERVAL * 2;
        recent.retain(|_, v| {
            v.retain(|t| t.elapsed() < horizon);
            !v.is_empty()
        });
        recent
            .iter()
            .map(|(k, v)| (k.clone(), v.len() as u32))
            .collect()
    }
}

/// The versions this server holds, with their content hashes.
pub fn held_versions(server: &Server) -> Vec<HeldVersion> {
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
                        && offer_if_recorded(server, &name, v.number, &hash)))
                && !server.replication.is_corrupt(&name, &v.layers);
            out.push(HeldVersion {
                vdisk: name.clone(),
                number: v.number,
                state: v.state,
                content_hash: hash,
                writable: !v.is_sealed(),
                verified,
                layers: v.layers.clone(),
            });
        }
    }
    out
}

/// This server's status now.
pub fn status(server: &Server, versions: Vec<HeldVersion>) -> ServerStatus {
    let m = &server.membership;
    let read = server.metrics.read_bytes.load(Ordering::Relaxed);
    let before = m.last_read_bytes.swap(read, Ordering::Relaxed);
    let (devices, booting) = server.session_counts(BOOT_WINDOW_SECS);
    ServerStatus {
        name: server.config.name.clone(),
        api: server.config.advertise_api.clone(),
        nbd: server.config.advertise_nbd.clone(),
        power: server.config.power,
        subnets: server.config.subnets.clone(),
        devices,
        booting,
        max_booting: server.config.max_booting,
        read_bytes_per_s: read.saturating_sub(before) / PUBLISH_INTERVAL.as_secs().max(1),
        versions,
        sessions: server.sessions(),
        replication: server.replication.published(server),
        stores: crate::stores::status(server, &server.membership.view()),
        quarantined: server.quarantine.list(),
        started_unix: m.started_unix.load(Ordering::Relaxed),
        updated_unix: now_unix(),
    }
}

/// Publishes and refreshes until `shutdown`; then withdraws the live record.
pub async fn run(server: Arc<Server>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    server
        .membership
        .started_unix
        .store(now_unix(), Ordering::Relaxed);
    let verifier = tokio::spawn(verify_loop(server.clone(), shutdown.clone()));
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
                // A device that booted through another server: its sessions
                // here are over.
                server.follow_boots(&view.boots);
                if server.membership.ticks.load(Ordering::Relaxed) % TIDY_TICKS == 1 {
                    tidy_caches(&server, &view).await;
                }
                let view = Arc::new(view);
                let (s, v) = (server.clone(), view.clone());
                let _ = tokio::task::spawn_blocking(move || crate::stores::follow(&s, &v)).await;
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
    if let Err(e) = server.farm.withdraw_server(&server.config.name).await {
        tracing::warn!(error = %e, "could not withdraw from the farm at shutdown");
    }
}

async fn publish_and_read(
    server: &Server,
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
async fn tidy_caches(server: &Arc<Server>, view: &View) {
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
    let _ = tokio::task::spawn_blocking(move || s.tidy_caches(&boots, &gone)).await;
}

/// How often, in publish intervals, a server with auto-rebalance checks its load.
const AUTO_REBALANCE_TICKS: u64 = 5;

/// Acts on a new rebalance request, and on auto-rebalance: releases this
/// server's share of devices in the plan.
fn rebalance_if_asked(server: &Server, view: &View) {
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
            let (devices, booting) = server.session_counts(BOOT_WINDOW_SECS);
            let booting_share = f64::from(booting) / f64::from(devices.max(1));
            (booting_share <= crate::rebalance::BOOTING_SHARE_LIMIT).then_some(t)
        }
        _ => None,
    };
    let Some(trigger) = trigger else { return };
    let me = &server.config.name;
    for (name, n) in crate::rebalance::plan(&view.servers, trigger) {
        if &name == me {
            let moved = server.release_devices(n as usize);
            tracing::info!(devices = ?moved, trigger_pct = trigger, "rebalance: letting devices go to less loaded servers");
        }
    }
}

/// True if a version of vDisk `name` is a replica, the same bytes on every
/// server holding it: sealed, or (an imported version 1 not sealed yet) of
/// a vDisk known to be in Standard mode. A Private-mode version a device may
/// be writing is none: it is neither checked nor re-checked as one.
fn is_replica(view: &View, name: &str, sealed: bool) -> bool {
    sealed || view.vdisk(name).is_some_and(|d| d.mode == Mode::Standard)
}

/// Marks version `number` of vDisk `name` (content `hash`) verified if its
/// verification record holds: every layer file unchanged since this server
/// checked it. It is offered at once, and read again in the background at
/// the scrub's pace. Looks at the record once per version and content;
/// reads metadata only.
fn offer_if_recorded(server: &Server, name: &str, number: u32, hash: &str) -> bool {
    let m = &server.membership;
    let key = (name.to_owned(), number, hash.to_owned());
    if m.failed.lock().contains(&key) || !m.record_tried.lock().insert(key.clone()) {
        return false;
    }
    match server.store.is_recorded(name, number, hash) {
        Ok(true) => {
            m.verified.lock().insert(key.clone());
            m.recheck.lock().insert(key);
            Metrics::add(&m.recorded_versions, 1);
            m.recheck_now.notify_one();
            tracing::info!(vdisk = %name, version = number, "replica verified by its record: its files are as they were checked; offered now, read again in the background");
            true
        }
        Ok(false) => false,
        Err(e) => {
            tracing::debug!(vdisk = %name, version = number, error = %e, "no verification record to go by");
            false
        }
    }
}

/// Records version `number` of vDisk `name` as verified here: it was hashed
/// from its data just now (an import, a seal, a replica checked as it
/// arrived). Its verification record is written in the background.
pub fn verified_here(server: &Arc<Server>, name: &str, number: u32, hash: &str) {
    server.membership.mark_verified(name, number, hash);
    let s = server.clone();
    let (n, h) = (name.to_owned(), hash.to_owned());
    tokio::task::spawn_blocking(move || record_check(&s, &n, number, &h));
}

/// [`verified_here`] from a blocking thread: the record is written before
/// it returns.
pub fn verified_here_blocking(server: &Server, name: &str, number: u32, hash: &str) {
    server.membership.mark_verified(name, number, hash);
    record_check(server, name, number, hash);
}

fn record_check(server: &Server, name: &str, number: u32, hash: &str) {
    if let Err(e) = server.store.record_checked(name, number, hash) {
        tracing::warn!(vdisk = %name, version = number, error = %e, "could not record the check; the version is read in full at the next start");
    }
}

/// The content hash version `number` of vDisk `name` has now, as
/// [`held_versions`] finds it.
pub(crate) fn current_hash(server: &Server, name: &str, number: u32) -> Option<String> {
    let props = server.store.properties(name).ok()?;
    let v = props.version(number).filter(|v| v.is_live())?;
    if v.is_sealed() {
        return v.content_hash.clone();
    }
    server
        .store
        .recorded_hash(name, v)
        .ok()
        .flatten()
        .map(|h| vstream_image::hash::to_hex(&h))
}

/// The layer files of version `number` of vDisk `name` here.
fn layers_of(server: &Server, name: &str, number: u32) -> Vec<String> {
    server
        .store
        .properties(name)
        .ok()
        .and_then(|p| p.version(number).map(|v| v.layers.clone()))
        .unwrap_or_default()
}

/// The layer files a failed check blames: the corrupt one, else every
/// layer of the version.
fn blamed(server: &Server, name: &str, number: u32, e: &ImageError) -> Vec<String> {
    if let ImageError::CorruptLayer { path, .. } = e {
        if let Some(f) = path.file_name() {
            return vec![f.to_string_lossy().into_owned()];
        }
    }
    layers_of(server, name, number)
}

/// Checks version `number` of vDisk `name` before it is offered: from its
/// record if that holds, else reading what neither this process read nor
/// the record covers. A failure with recorded layers skipped is checked
/// again reading those too, so that the bad layer is the one blamed.
fn check_now(
    server: &Server,
    name: &str,
    number: u32,
    hash: &str,
) -> Result<vstream_image::CheckReport, ImageError> {
    let m = &server.membership;
    if server.store.is_recorded(name, number, hash)? {
        Metrics::add(&m.recorded_versions, 1);
        return Ok(vstream_image::CheckReport {
            read: Vec::new(),
            recorded: layers_of(server, name, number),
        });
    }
    let mut pace = |n| {
        Metrics::add(&m.check_read_bytes, n);
        true
    };
    match server
        .store
        .check(name, number, hash, Trust::Recorded, &mut pace)
    {
        Ok(r) => Ok(r),
        Err(_) => server
            .store
            .check(name, number, hash, Trust::Read, &mut pace),
    }
}

/// Verifies version `number` of vDisk `name` with content `hash` unless
/// this server has already (one check of a version at a time): every layer
/// present, each block's data matching its stored hash, the block hashes
/// giving the content hash. Layer files unchanged since this server checked
/// them (its verification record) are not read again now, but later, in the
/// background. A version that failed stays failed until restart.
pub async fn ensure_verified(
    server: &Arc<Server>,
    name: &str,
    number: u32,
    hash: &str,
) -> Result<(), String> {
    let m = &server.membership;
    let key = (name.to_owned(), number, hash.to_owned());
    let one = m.checking.lock().entry(key.clone()).or_default().clone();
    let _one = one.lock().await;
    let outcome = if m.verified.lock().contains(&key) {
        Ok(())
    } else if m.failed.lock().contains(&key) {
        Err(format!(
            "this server's copy of version {number} of vDisk {name} failed verification"
        ))
    } else {
        let s = server.clone();
        let (n, h) = (name.to_owned(), hash.to_owned());
        match tokio::task::spawn_blocking(move || check_now(&s, &n, number, &h)).await {
            Ok(Ok(report)) => {
                if report.read.is_empty() && !report.recorded.is_empty() {
                    tracing::info!(vdisk = %name, version = number, "replica verified by its record: its files are as they were checked; offered now, read again in the background");
                } else {
                    tracing::info!(vdisk = %name, version = number, read = ?report.read, recorded = ?report.recorded, "replica verified");
                }
                m.verified.lock().insert(key.clone());
                if !report.recorded.is_empty() {
                    m.recheck.lock().insert(key.clone());
                    m.recheck_now.notify_one();
                }
                m.publish_now.notify_one();
                Ok(())
            }
            Ok(Err(e)) if current_hash(server, name, number).as_deref() != Some(hash) => {
                // Written while it was read (a Private-mode device): another
                // content now, and no replica; nothing failed.
                tracing::info!(vdisk = %name, version = number, error = %e, "version changed while it was checked; not a replica");
                Err(format!(
                    "version {number} of vDisk {name} changed while it was checked"
                ))
            }
            Ok(Err(e)) => {
                tracing::error!(vdisk = %name, version = number, error = %e, "replica failed verification; not offered to devices");
                m.failed.lock().insert(key.clone());
                let files = blamed(server, name, number, &e);
                let (s, n) = (server.clone(), name.to_owned());
                let forgot =
                    tokio::task::spawn_blocking(move || s.store.forget_checked(&n, &files)).await;
                if let Ok(Err(e)) = forgot {
                    tracing::warn!(vdisk = %name, error = %e, "could not forget the failed check in the verification record");
                }
                Err(format!(
                    "this server's copy of version {number} of vDisk {name} failed verification: {e}"
                ))
            }
            Err(e) => Err(format!("verification task failed: {e}")),
        }
    };
    m.checking.lock().remove(&key);
    outcome
}

/// Takes version `key` out of service after the background re-check found
/// it bad: not offered for login (logins choose another server), base
/// exports refused, its record forgotten; so is every other version of the
/// vDisk this server offers built on the layer blamed.
pub(crate) fn withdraw(server: &Server, key: &VersionKey, error: &ImageError) {
    let m = &server.membership;
    let (name, number, _) = key;
    let files = blamed(server, name, *number, error);
    let offered: Vec<VersionKey> = m.verified.lock().iter().cloned().collect();
    let hit: Vec<VersionKey> = offered
        .into_iter()
        .filter(|k| {
            k == key
                || (k.0 == *name
                    && layers_of(server, name, k.1)
                        .iter()
                        .any(|f| files.contains(f)))
        })
        .collect();
    for k in &hit {
        m.verified.lock().remove(k);
        m.recheck.lock().remove(k);
        m.failed.lock().insert(k.clone());
        Metrics::add(&m.recheck_failures, 1);
        tracing::error!(vdisk = %k.0, version = k.1, error = %error, layers = ?files, "replica failed its re-check; taken out of service, not offered to devices");
    }
    if let Err(e) = server.store.forget_checked(name, &files) {
        tracing::warn!(vdisk = %name, error = %e, "could not forget the failed check in the verification record");
    }
    m.publish_now.notify_one();
}

/// Checks each held version once (as the last publish found them): every
/// layer present, block hashes right. A version that can still be written
/// is checked only if its vDisk is known to be in Standard mode: in Private
/// mode a device may be writing it, and it is no replica.
async fn verify_loop(server: Arc<Server>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        let held = server.membership.held.lock().clone();
        let view = server.membership.view();
        for v in held.into_iter().filter(|v| {
            !v.verified && !v.content_hash.is_empty() && is_replica(&view, &v.vdisk, !v.writable)
        }) {
            let _ = ensure_verified(&server, &v.vdisk, v.number, &v.content_hash).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(PUBLISH_INTERVAL) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vstream_farm::DeviceKey;

    fn device(name: &str, mac: &str) -> Device {
        Device {
            name: name.into(),
            mac: mac.into(),
            vdisk: "v".into(),
            created_unix: 0,
            kind: Default::default(),
        }
    }

    /// The last known state reads a key as the farm store does: text written
    /// as a MAC finds the device with that MAC, even beside a device (made by
    /// an older version) named so.
    #[test]
    fn the_view_finds_devices_by_mac_before_names() {
        let mut view = View {
            devices: vec![
                device("52-54-00-dd-00-bb", "52:54:00:ee:00:01"),
                device("d", "52:54:00:dd:00:bb"),
            ],
            ..View::default()
        };
        view.index();
        let find = |key: &str| {
            view.find_device(&DeviceKey::parse(key).expect("key"))
                .map(|d| d.name.clone())
        };
        assert_eq!(find("52-54-00-dd-00-bb").as_deref(), Some("d"));
        assert_eq!(
            find("52:54:00:ee:00:01").as_deref(),
            Some("52-54-00-dd-00-bb")
        );
        assert_eq!(find("d").as_deref(), Some("d"));
        assert_eq!(find("ghost"), None);
    }
}
