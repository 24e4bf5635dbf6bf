//! This server's replication state: throttles, schedule, what is being
//! copied and received, the catalogs as last read, and the layers found
//! corrupt. The loops that act on it are the rest of `replication`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex, RwLock};
use vstream_api::{Catalog, HeldVersion, ReplicaProgress, ReplicaState, ReplicationOverride};

use crate::config::ReplicationConfig;
use crate::schedule::{self, Clock, Schedule, Throttle};

/// Most peer requests a server serves at once.
pub const MAX_SERVING: usize = 4;

/// A version of a vDisk.
pub(crate) type Key = (String, u32);

/// This server's replication state.
pub struct Replication {
    pub clock: Arc<dyn Clock>,
    /// Bytes pulled from peers, all transfers and repairs together.
    pub throttle: Arc<Throttle>,
    /// Bytes the scrub reads.
    pub scrub_throttle: Arc<Throttle>,
    pub schedule: Schedule,
    pub max_transfers: usize,
    pub scrub_interval: Duration,
    pub(super) secret: RwLock<Option<String>>,
    /// On a farm with TLS: this server's certificate, shown to its peers
    /// (mutual TLS), and the farm's CA, which every peer's must chain to.
    peer_tls: std::sync::OnceLock<vstream_service::ClientTls>,
    /// Peer requests served at once: the rest wait, so that peers never
    /// take the blocking threads device reads need.
    pub serving: Arc<tokio::sync::Semaphore>,
    /// Wakes the reconcile loop before its next tick.
    pub wake: tokio::sync::Notify,
    /// Changes this server made to its vDisks and published (see
    /// [`super::finish_change`]): a catalog read before one of them is stale for
    /// that vDisk and must not be followed.
    pub(super) changes: AtomicU64,
    pub(super) catalogs: RwLock<Arc<Vec<Catalog>>>,
    pub(super) order: RwLock<Option<ReplicationOverride>>,
    pub(super) progress: Mutex<BTreeMap<Key, ReplicaProgress>>,
    pub(super) running: Mutex<HashSet<Key>>,
    /// Layer files being received, by (vDisk, file): two versions that lack
    /// the same layer (a base and a version above it) take turns, so that
    /// it travels once and one partial file has one writer.
    pub(super) receiving: Mutex<HashSet<(String, String)>>,
    pub(super) received: Condvar,
    /// Layer files that failed a check, by (vDisk, file): the reason.
    pub(super) corrupt: Mutex<HashMap<(String, String), String>>,
    pub received_bytes: AtomicU64,
    pub sent_bytes: AtomicU64,
    pub scrubbed_bytes: AtomicU64,
    pub corrupt_blocks: AtomicU64,
    pub repaired_blocks: AtomicU64,
}

/// A layer being received by one transfer (see [`Replication::claim_layer`]).
pub(crate) struct LayerClaim<'a> {
    owner: &'a Replication,
    key: (String, String),
}

impl Drop for LayerClaim<'_> {
    fn drop(&mut self) {
        self.owner.receiving.lock().remove(&self.key);
        self.owner.received.notify_all();
    }
}

impl Replication {
    pub fn new(config: &ReplicationConfig) -> Replication {
        let clock = schedule::clock_from_env();
        let windows = config
            .windows
            .iter()
            .filter_map(|w| w.parse().ok())
            .collect();
        Replication {
            throttle: Arc::new(Throttle::new(config.rate, clock.clone())),
            scrub_throttle: Arc::new(Throttle::new(config.scrub_rate, clock.clone())),
            schedule: Schedule::new(windows, schedule::local_utc_offset_secs()),
            max_transfers: config.max_transfers.max(1),
            scrub_interval: Duration::from_secs(config.scrub_interval_secs.max(1)),
            clock,
            secret: RwLock::new(None),
            peer_tls: std::sync::OnceLock::new(),
            serving: Arc::new(tokio::sync::Semaphore::new(MAX_SERVING)),
            wake: tokio::sync::Notify::new(),
            changes: AtomicU64::new(0),
            catalogs: RwLock::default(),
            order: RwLock::new(None),
            progress: Mutex::default(),
            running: Mutex::default(),
            receiving: Mutex::default(),
            received: Condvar::new(),
            corrupt: Mutex::default(),
            received_bytes: AtomicU64::new(0),
            sent_bytes: AtomicU64::new(0),
            scrubbed_bytes: AtomicU64::new(0),
            corrupt_blocks: AtomicU64::new(0),
            repaired_blocks: AtomicU64::new(0),
        }
    }

    /// Prometheus rows for `/metrics`.
    pub fn metrics(&self) -> [(&'static str, &'static str, &'static str, &AtomicU64); 5] {
        [
            (
                "vstream_replication_received_bytes_total",
                "counter",
                "bytes pulled from peers (layer metadata and data, repairs included)",
                &self.received_bytes,
            ),
            (
                "vstream_replication_sent_bytes_total",
                "counter",
                "bytes served to peers",
                &self.sent_bytes,
            ),
            (
                "vstream_scrub_read_bytes_total",
                "counter",
                "bytes the scrub checked",
                &self.scrubbed_bytes,
            ),
            (
                "vstream_scrub_corrupt_blocks_total",
                "counter",
                "blocks the scrub found not matching their hashes",
                &self.corrupt_blocks,
            ),
            (
                "vstream_scrub_repaired_blocks_total",
                "counter",
                "blocks fetched again from a peer and checked",
                &self.repaired_blocks,
            ),
        ]
    }

    /// Talks to peers over HTTPS with `tls` from now on, and asks the same
    /// of them (set once, at start).
    pub fn set_peer_tls(&self, tls: vstream_service::ClientTls) {
        let _ = self.peer_tls.set(tls);
    }

    /// This server's TLS towards its peers, on a farm with TLS.
    pub fn peer_tls(&self) -> Option<&vstream_service::ClientTls> {
        self.peer_tls.get()
    }

    /// The farm's peer secret, once this server has read it.
    pub fn secret(&self) -> Option<String> {
        self.secret.read().clone()
    }

    /// The catalogs as last read.
    pub fn catalogs(&self) -> Arc<Vec<Catalog>> {
        self.catalogs.read().clone()
    }

    /// Claims layer `file` of `vdisk` for receiving, waiting while another
    /// transfer has it; the claim ends when the guard drops.
    pub(crate) fn claim_layer(&self, vdisk: &str, file: &str) -> LayerClaim<'_> {
        let key = (vdisk.to_owned(), file.to_owned());
        let mut receiving = self.receiving.lock();
        while receiving.contains(&key) {
            self.received.wait(&mut receiving);
        }
        receiving.insert(key.clone());
        LayerClaim { owner: self, key }
    }

    /// True if any of `layers` of vDisk `vdisk` failed a check here.
    pub fn is_corrupt(&self, vdisk: &str, layers: &[String]) -> bool {
        let corrupt = self.corrupt.lock();
        layers
            .iter()
            .any(|f| corrupt.contains_key(&(vdisk.to_owned(), f.clone())))
    }

    pub(crate) fn mark_corrupt(&self, vdisk: &str, file: &str, reason: String) {
        self.corrupt
            .lock()
            .insert((vdisk.to_owned(), file.to_owned()), reason);
    }

    pub(crate) fn clear_corrupt(&self, vdisk: &str, file: &str) -> bool {
        self.corrupt
            .lock()
            .remove(&(vdisk.to_owned(), file.to_owned()))
            .is_some()
    }

    pub(super) fn set_progress(&self, key: &Key, state: ReplicaState, note: Option<String>) {
        let mut progress = self.progress.lock();
        let p = progress
            .entry(key.clone())
            .or_insert_with(|| ReplicaProgress {
                vdisk: key.0.clone(),
                version: key.1,
                state,
                bytes_done: 0,
                bytes_total: 0,
                rate: 0,
                note: None,
            });
        p.state = state;
        p.note = note;
    }

    pub(crate) fn update_bytes(&self, key: &Key, done: u64, total: u64, rate: u64) {
        if let Some(p) = self.progress.lock().get_mut(key) {
            p.bytes_done = done;
            p.bytes_total = total;
            p.rate = rate;
        }
    }

    /// What this server publishes: versions it copies or waits for, and
    /// versions it holds corrupt.
    pub fn published(&self, held: &[HeldVersion]) -> Vec<ReplicaProgress> {
        let mut out: Vec<ReplicaProgress> = self.progress.lock().values().cloned().collect();
        for v in held {
            if self.is_corrupt(&v.vdisk, &v.layers) {
                out.retain(|p| !(p.vdisk == v.vdisk && p.version == v.number));
                let reason = v
                    .layers
                    .iter()
                    .find_map(|f| {
                        self.corrupt
                            .lock()
                            .get(&(v.vdisk.clone(), f.clone()))
                            .cloned()
                    })
                    .unwrap_or_default();
                out.push(ReplicaProgress {
                    vdisk: v.vdisk.clone(),
                    version: v.number,
                    state: ReplicaState::Corrupt,
                    bytes_done: 0,
                    bytes_total: 0,
                    rate: 0,
                    note: Some(reason),
                });
            }
        }
        out
    }

    /// Whether `key` may be copied now: inside a window, or ordered now.
    pub(super) fn may_copy(&self, key: &Key) -> Result<(), String> {
        let now = self.clock.now_unix();
        if self.schedule.is_open(now) {
            return Ok(());
        }
        let ordered = self.order.read().as_ref().is_some_and(|o| {
            o.expires_unix as f64 > now
                && o.versions.iter().any(|(d, n)| d == &key.0 && *n == key.1)
        });
        if ordered {
            return Ok(());
        }
        let next = self
            .schedule
            .next_open(now)
            .map(|t| schedule::format_rfc3339(t, self.schedule.utc_offset_secs()))
            .unwrap_or_else(|| "never".into());
        Err(format!(
            "outside the replication windows ({}); next opens {next}; `vstream replication start` copies now",
            self.schedule.describe()
        ))
    }
}
