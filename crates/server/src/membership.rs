//! This server as a farm member: the farm state as last read (the
//! [`View`] logins and device exports go on from while the farm store is
//! away), and the versions of its store it has verified and so offers.
//!
//! ```text
//!   at start:           each held version whose verification record holds --> verified set
//!                       (files unchanged since checked: offered at once, re-read in the background)
//!   in the background:  each held version not yet verified --Store::check--> verified set
//! ```
//!
//! The publish loop that fills the view is `farm.rs`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use vstream_api::{Device, HeldVersion, Mode, RebalanceRequest, ServerStatus, VDisk};
use vstream_image::{ImageError, Store, Trust};

use vstream_service::metrics::Metrics;

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

/// This server as a farm member: the last farm state it read, and the
/// versions it has verified and offers.
pub struct Membership {
    /// The store whose versions are verified.
    store: Store,
    /// Shared, not copied: a login reads it while the next one is built.
    pub(crate) view: RwLock<Arc<View>>,
    /// Whether the last publish and read reached the farm store.
    pub(crate) connected: AtomicBool,
    /// Versions whose layers were checked.
    verified: Mutex<HashSet<VersionKey>>,
    /// The versions found in the store at the last publish.
    pub(crate) held: Mutex<Vec<HeldVersion>>,
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
    /// Logins answered here, and those that asked to avoid a server (a
    /// device retrying after its server failed it).
    pub logins: AtomicU64,
    pub failover_logins: AtomicU64,
    /// One check of a version at a time.
    checking: Mutex<HashMap<VersionKey, Arc<tokio::sync::Mutex<()>>>>,
    /// Logins sent to each server recently, not yet in its published count.
    recent: Mutex<HashMap<String, Vec<Instant>>>,
    pub(crate) last_read_bytes: AtomicU64,
    pub(crate) started_unix: AtomicU64,
    /// The rebalance request acted on last (`Some(None)`: none at start).
    pub(crate) handled_rebalance: Mutex<Option<Option<u64>>>,
    /// The device moves acted on (let go from here), by device: when each
    /// was asked (see [`crate::moves::to_release`]).
    pub(crate) handled_moves: Mutex<HashMap<String, u64>>,
    pub(crate) ticks: AtomicU64,
    /// Wakes the publish loop before its next tick (a replica just verified).
    pub publish_now: tokio::sync::Notify,
}

impl Membership {
    pub fn new(store: Store) -> Membership {
        Membership {
            store,
            view: Default::default(),
            connected: Default::default(),
            verified: Default::default(),
            held: Default::default(),
            failed: Default::default(),
            record_tried: Default::default(),
            recheck: Default::default(),
            recheck_now: Default::default(),
            check_read_bytes: Default::default(),
            recorded_versions: Default::default(),
            recheck_read_bytes: Default::default(),
            recheck_failures: Default::default(),
            logins: Default::default(),
            failover_logins: Default::default(),
            checking: Default::default(),
            recent: Default::default(),
            last_read_bytes: Default::default(),
            started_unix: Default::default(),
            handled_rebalance: Default::default(),
            handled_moves: Default::default(),
            ticks: Default::default(),
            publish_now: Default::default(),
        }
    }

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
    pub fn metrics(&self) -> [(&'static str, &'static str, &'static str, &AtomicU64); 6] {
        [
            (
                "vstream_logins_total",
                "counter",
                "device logins answered with a server",
                &self.logins,
            ),
            (
                "vstream_login_failovers_total",
                "counter",
                "device logins that asked to avoid a server (retries after a failure)",
                &self.failover_logins,
            ),
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

impl Membership {
    /// Marks version `number` of vDisk `name` (content `hash`) verified if its
    /// verification record holds: every layer file unchanged since this server
    /// checked it. It is offered at once, and read again in the background at
    /// the scrub's pace. Looks at the record once per version and content;
    /// reads metadata only.
    pub(crate) fn offer_if_recorded(&self, name: &str, number: u32, hash: &str) -> bool {
        let m = self;
        let key = (name.to_owned(), number, hash.to_owned());
        if m.failed.lock().contains(&key) || !m.record_tried.lock().insert(key.clone()) {
            return false;
        }
        match self.store.is_recorded(name, number, hash) {
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
    pub fn verified_here(self: &Arc<Self>, name: &str, number: u32, hash: &str) {
        self.mark_verified(name, number, hash);
        let s = self.clone();
        let (n, h) = (name.to_owned(), hash.to_owned());
        tokio::task::spawn_blocking(move || s.record_check(&n, number, &h));
    }

    /// [`Membership::verified_here`] from a blocking thread: the record is written before
    /// it returns.
    pub fn verified_here_blocking(&self, name: &str, number: u32, hash: &str) {
        self.mark_verified(name, number, hash);
        self.record_check(name, number, hash);
    }

    fn record_check(&self, name: &str, number: u32, hash: &str) {
        if let Err(e) = self.store.record_checked(name, number, hash) {
            tracing::warn!(vdisk = %name, version = number, error = %e, "could not record the check; the version is read in full at the next start");
        }
    }

    /// The content hash version `number` of vDisk `name` has now, as
    /// [`crate::farm::held_versions`] finds it.
    pub(crate) fn current_hash(&self, name: &str, number: u32) -> Option<String> {
        let props = self.store.properties(name).ok()?;
        let v = props.version(number).filter(|v| v.is_live())?;
        if v.is_sealed() {
            return v.content_hash.clone();
        }
        self.store
            .recorded_hash(name, v)
            .ok()
            .flatten()
            .map(|h| vstream_image::hash::to_hex(&h))
    }

    /// The layer files of version `number` of vDisk `name` here.
    fn layers_of(&self, name: &str, number: u32) -> Vec<String> {
        self.store
            .properties(name)
            .ok()
            .and_then(|p| p.version(number).map(|v| v.layers.clone()))
            .unwrap_or_default()
    }

    /// The layer files a failed check blames: the corrupt one, else every
    /// layer of the version.
    fn blamed(&self, name: &str, number: u32, e: &ImageError) -> Vec<String> {
        if let ImageError::CorruptLayer { path, .. } = e {
            if let Some(f) = path.file_name() {
                return vec![f.to_string_lossy().into_owned()];
            }
        }
        self.layers_of(name, number)
    }

    /// Checks version `number` of vDisk `name` before it is offered: from its
    /// record if that holds, else reading what neither this process read nor
    /// the record covers. A failure with recorded layers skipped is checked
    /// again reading those too, so that the bad layer is the one blamed.
    fn check_now(
        &self,
        name: &str,
        number: u32,
        hash: &str,
    ) -> Result<vstream_image::CheckReport, ImageError> {
        let m = self;
        if self.store.is_recorded(name, number, hash)? {
            Metrics::add(&m.recorded_versions, 1);
            return Ok(vstream_image::CheckReport {
                read: Vec::new(),
                recorded: self.layers_of(name, number),
            });
        }
        let mut pace = |n| {
            Metrics::add(&m.check_read_bytes, n);
            true
        };
        match self
            .store
            .check(name, number, hash, Trust::Recorded, &mut pace)
        {
            Ok(r) => Ok(r),
            Err(_) => self.store.check(name, number, hash, Trust::Read, &mut pace),
        }
    }

    /// Verifies version `number` of vDisk `name` with content `hash` unless
    /// this server has already (one check of a version at a time): every layer
    /// present, each block's data matching its stored hash, the block hashes
    /// giving the content hash. Layer files unchanged since this server checked
    /// them (its verification record) are not read again now, but later, in the
    /// background. A version that failed stays failed until restart.
    pub async fn ensure_verified(
        self: &Arc<Self>,
        name: &str,
        number: u32,
        hash: &str,
    ) -> Result<(), String> {
        let m = self;
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
            let s = self.clone();
            let (n, h) = (name.to_owned(), hash.to_owned());
            match tokio::task::spawn_blocking(move || s.check_now(&n, number, &h)).await {
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
                Ok(Err(e)) if self.current_hash(name, number).as_deref() != Some(hash) => {
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
                    let files = self.blamed(name, number, &e);
                    let (s, n) = (self.clone(), name.to_owned());
                    let forgot =
                        tokio::task::spawn_blocking(move || s.store.forget_checked(&n, &files))
                            .await;
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
    pub(crate) fn withdraw(&self, key: &VersionKey, error: &ImageError) {
        let m = self;
        let (name, number, _) = key;
        let files = self.blamed(name, *number, error);
        let offered: Vec<VersionKey> = m.verified.lock().iter().cloned().collect();
        let hit: Vec<VersionKey> = offered
            .into_iter()
            .filter(|k| {
                k == key
                    || (k.0 == *name && self.layers_of(name, k.1).iter().any(|f| files.contains(f)))
            })
            .collect();
        for k in &hit {
            m.verified.lock().remove(k);
            m.recheck.lock().remove(k);
            m.failed.lock().insert(k.clone());
            Metrics::add(&m.recheck_failures, 1);
            tracing::error!(vdisk = %k.0, version = k.1, error = %error, layers = ?files, "replica failed its re-check; taken out of service, not offered to devices");
        }
        if let Err(e) = self.store.forget_checked(name, &files) {
            tracing::warn!(vdisk = %name, error = %e, "could not forget the failed check in the verification record");
        }
        m.publish_now.notify_one();
    }

    /// Checks each held version once (as the last publish found them): every
    /// layer present, block hashes right. A version that can still be written
    /// is checked only if its vDisk is known to be in Standard mode: in Private
    /// mode a device may be writing it, and it is no replica.
    pub async fn verify_loop(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            let held = self.held.lock().clone();
            let view = self.view();
            for v in held.into_iter().filter(|v| {
                !v.verified
                    && !v.content_hash.is_empty()
                    && is_replica(&view, &v.vdisk, !v.writable)
            }) {
                let _ = self
                    .ensure_verified(&v.vdisk, v.number, &v.content_hash)
                    .await;
            }
            tokio::select! {
                _ = tokio::time::sleep(PUBLISH_INTERVAL) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }
}

/// True if a version of vDisk `name` is a replica, the same bytes on every
/// server holding it: sealed, or (an imported version 1 not sealed yet) of
/// a vDisk known to be in Standard mode. A Private-mode version a device may
/// be writing is none: it is neither checked nor re-checked as one.
pub(crate) fn is_replica(view: &View, name: &str, sealed: bool) -> bool {
    sealed || view.vdisk(name).is_some_and(|d| d.mode == Mode::Standard)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vstream_farm::DeviceKey;

    fn device(name: &str, mac: &str) -> Device {
        Device::new(name, mac, "v", 0)
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
