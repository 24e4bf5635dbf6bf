//! Boot sets: what devices read while they boot, learned per version from
//! their sessions here and read into the page cache before the next boot
//! storm (`vstream_image::bootset`).
//!
//! ```text
//!   device session starts ──► recorder(vdisk, version, boot): its reads
//!                             until boot_window_secs after the device's boot
//!                             began (or the session, if no boot is known) go
//!                             into the version's set
//!   every 30 s (and at stop) ─► changed sets saved: vdisks/NAME/boot-vN.set
//!   at start, then every 30 s ─► the versions devices boot (production, test)
//!                             not warmed in the last 5 minutes: what the
//!                             kernel does not hold of their set read through
//!                             the version's layers, at the lowest best-effort
//!                             I/O priority, within the budget. Each is first
//!                             merged with the other live servers' sets
//!                             (GET /peer/v1/vdisks/NAME/boot-sets/N); a
//!                             version no server booted takes the nearest
//!                             older version's set here.
//! ```
//!
//! A morning's boot storm after a server restart, or after a new version
//! was promoted overnight, then finds the boot set in memory instead of
//! reading it from the store's disk device by device. So does a server that
//! joined the farm, or whose devices all booted elsewhere yesterday. A set
//! is a hint: a lost, damaged or wrong one costs time, never bytes. A
//! version deleted or merged away takes its set with it; an administrator's
//! clear (a stamp on the version) takes it from every server.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::header;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::Router;
use parking_lot::Mutex;
use vstream_api::DeviceType;
use vstream_image::bootset::{self, boot_set_file, BootRecorder, BootSet};
use vstream_image::Store;

use vstream_service::metrics::Metrics;

use crate::auth::require_peer;
use crate::clock::now_unix;
use crate::error::ApiError;
use crate::membership::Membership;
use crate::replication::peer::{self, Peer, PeerClient};
use crate::replication::state::Replication;

/// How often changed sets are saved and new versions warmed.
const PERIOD: Duration = Duration::from_secs(30);
/// How long a version no other server had a set of waits before they are
/// asked again.
const ASK_AGAIN: Duration = Duration::from_secs(300);
/// How often a warmed version's set is checked, and what the kernel evicted
/// of it read again: a server warmed at midnight is still warm at eight.
const REWARM: Duration = Duration::from_secs(300);
/// In its first minute a server may not know its peers yet (the farm's view
/// is read after the start): a pass that found none is made again this soon.
const NO_PEER_YET: Duration = Duration::from_secs(2);

/// A version's set at its last read-ahead (or count, if over the budget).
pub use vstream_api::BootSetState as SetState;

/// When a version's set was last read ahead or counted, and what it was.
#[derive(Debug, Clone, Copy)]
struct Warm {
    at: Instant,
    state: SetState,
}

/// What a server needs to ask the farm's other servers for sets.
pub struct Peers {
    pub replication: Arc<Replication>,
    pub membership: Arc<Membership>,
    /// This server's name.
    pub me: String,
    /// In an etcd farm; else there is no other server.
    pub in_farm: bool,
}

/// The set asked of the farm's other servers: version `version` of
/// `vdisk` (of `size` bytes), learned after the version's last clear.
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    pub vdisk: &'a str,
    pub version: u32,
    pub size: u64,
    /// The version's `boot_set_cleared_unix` (0: never cleared).
    pub cleared: u64,
}

/// What the farm's other servers gave when asked for a version's set.
pub enum FromPeers {
    /// No other server to ask (alone, or no farm view yet).
    NoPeer,
    /// None had one, or none answered.
    NoneHad,
    /// The union of the sets of servers `peers`.
    Got { peers: Vec<String>, set: BootSet },
}

/// The boot sets of this server's versions.
pub struct BootSets {
    store: Store,
    window: Duration,
    /// Most bytes of sets read ahead and kept warm at once (an atomic for
    /// `/metrics`).
    budget: AtomicU64,
    sets: Mutex<HashMap<(String, u32), Arc<BootSet>>>,
    /// Versions whose set was read into the page cache, and how it went.
    warmed: Mutex<HashMap<(String, u32), Warm>>,
    /// How often a warmed version is checked again ([`REWARM`]).
    rewarm: Duration,
    /// Set files found unusable (said once), until a save replaces them.
    refused: Mutex<HashSet<PathBuf>>,
    /// Versions no other server had a set of, and when they were asked.
    asked: Mutex<HashMap<(String, u32), Instant>>,
    /// A version lacked a set and there was no other server to ask.
    met_no_peer: AtomicBool,
    /// Versions read ahead, and their bytes: all, and those from the disk.
    read_ahead_versions: AtomicU64,
    read_ahead_bytes: AtomicU64,
    read_ahead_disk_bytes: AtomicU64,
}

impl BootSets {
    /// Boot sets learned for `window` from each session's start, at most
    /// `budget` bytes of them read ahead; none learned or warmed if
    /// `window` is zero.
    pub fn new(store: Store, window: Duration, budget: u64) -> BootSets {
        BootSets {
            store,
            window,
            budget: AtomicU64::new(budget),
            sets: Mutex::new(HashMap::new()),
            warmed: Mutex::new(HashMap::new()),
            rewarm: REWARM,
            refused: Mutex::new(HashSet::new()),
            asked: Mutex::new(HashMap::new()),
            met_no_peer: AtomicBool::new(false),
            read_ahead_versions: AtomicU64::new(0),
            read_ahead_bytes: AtomicU64::new(0),
            read_ahead_disk_bytes: AtomicU64::new(0),
        }
    }

    /// Prometheus rows for `/metrics`.
    pub fn metrics(&self) -> [(&'static str, &'static str, &'static str, &AtomicU64); 4] {
        [
            (
                "vstream_boot_set_read_ahead_versions_total",
                "counter",
                "versions whose boot set was read into the page cache ahead of their devices",
                &self.read_ahead_versions,
            ),
            (
                "vstream_boot_set_read_ahead_bytes_total",
                "counter",
                "bytes of boot sets read into the page cache ahead of their devices",
                &self.read_ahead_bytes,
            ),
            (
                "vstream_boot_set_read_ahead_disk_bytes_total",
                "counter",
                "bytes of boot sets that were not cached and were read from the disk, at start and at each later check",
                &self.read_ahead_disk_bytes,
            ),
            (
                "vstream_boot_set_budget_bytes",
                "gauge",
                "most bytes of boot sets read ahead and kept warm at once (--boot-set-budget)",
                &self.budget,
            ),
        ]
    }

    /// Whether sets are learned and warmed at all.
    pub fn enabled(&self) -> bool {
        !self.window.is_zero()
    }

    /// A recorder for a new session of a device booting version `version`
    /// of vDisk `vdisk` (of `size` bytes), whose boot began at
    /// `boot_since_unix` if the farm knows it: the window runs from the
    /// boot, so a session that begins later in it (a failover, a
    /// reconnect) records only the rest, and one that begins after it
    /// records nothing. `None` when learning is off or the window is over.
    /// Reads the version's saved set the first time (a small file).
    pub fn recorder(
        &self,
        vdisk: &str,
        version: u32,
        size: u64,
        boot_since_unix: Option<u64>,
    ) -> Option<Arc<BootRecorder>> {
        let past = boot_since_unix.map_or(0, |since| now_unix().saturating_sub(since));
        let left = self.window.saturating_sub(Duration::from_secs(past));
        if left.is_zero() {
            return None;
        }
        let set = self.set(vdisk, version, size)?;
        Some(Arc::new(BootRecorder::new(set, left)))
    }

    /// Version `version`'s set: the one in memory, else the saved one, else
    /// a new, empty one. `None` if the vDisk has no folder here.
    fn set(&self, vdisk: &str, version: u32, size: u64) -> Option<Arc<BootSet>> {
        if let Some(set) = self.existing(vdisk, version, size) {
            return Some(set);
        }
        let cleared = self.stamp(vdisk, version)?;
        let mut sets = self.sets.lock();
        let set = sets
            .entry((vdisk.to_owned(), version))
            .or_insert_with(|| Arc::new(BootSet::after_clear(size, cleared)));
        if set.size() != size || set.cleared() != cleared {
            *set = Arc::new(BootSet::after_clear(size, cleared));
        }
        Some(set.clone())
    }

    /// When version `version`'s set was last cleared (0: never); `None` if
    /// the version is not live here.
    fn stamp(&self, vdisk: &str, version: u32) -> Option<u64> {
        let props = self.store.properties(vdisk).ok()?;
        let v = props.version(version).filter(|v| v.is_live())?;
        Some(v.boot_set_cleared_unix.unwrap_or(0))
    }

    /// Version `version`'s set if one is in memory or saved (then kept in
    /// memory); nothing is made for a version without one.
    fn existing(&self, vdisk: &str, version: u32, size: u64) -> Option<Arc<BootSet>> {
        let key = (vdisk.to_owned(), version);
        if let Some(set) = self.sets.lock().get(&key) {
            if set.size() == size {
                return Some(set.clone());
            }
        }
        let path = self
            .store
            .vdisk_path(vdisk)
            .ok()?
            .join(boot_set_file(version));
        if self.refused.lock().contains(&path) {
            return None;
        }
        let Some(loaded) = BootSet::load(&path, size) else {
            if path.exists() {
                // Said in the log once; the next save replaces it.
                self.refused.lock().insert(path);
            }
            return None;
        };
        if Some(loaded.cleared()) != self.stamp(vdisk, version) {
            // Learned before an administrator cleared the version's set.
            tracing::info!(%vdisk, version, "a boot set learned before its version's set was cleared is removed");
            let _ = std::fs::remove_file(&path);
            return None;
        }
        let loaded = Arc::new(loaded);
        let mut sets = self.sets.lock();
        let set = sets.entry(key).or_insert_with(|| loaded.clone());
        if set.size() != size {
            *set = loaded;
        }
        Some(set.clone())
    }

    /// Version `version`'s set in its file's form, for a peer: `None` if
    /// this server has none, or does not hold the version live.
    pub fn served(&self, vdisk: &str, version: u32) -> Option<Vec<u8>> {
        let props = self.store.properties(vdisk).ok()?;
        let v = props.version(version).filter(|v| v.is_live())?;
        let set = self.existing(vdisk, version, props.size)?;
        let current = set.cleared() == v.boot_set_cleared_unix.unwrap_or(0);
        (current && !set.is_empty()).then(|| set.to_bytes())
    }

    /// Forgets what is kept of versions no longer live here (deleted,
    /// merged away, or their vDisk deleted), so that no save writes their
    /// sets again: the store removed their files. A set learned before its
    /// version's set was cleared (here, or on another server and then in
    /// the catalog) is forgotten too, and its file removed.
    pub fn forget_stale(&self) {
        let mut keys: Vec<(String, u32)> = self.sets.lock().keys().cloned().collect();
        keys.extend(self.warmed.lock().keys().cloned());
        keys.extend(self.asked.lock().keys().cloned());
        keys.sort_unstable();
        keys.dedup();
        for key in keys {
            let (vdisk, version) = (&key.0, key.1);
            let stamp = match self.store.properties(vdisk) {
                Ok(props) => props
                    .version(version)
                    .filter(|v| v.is_live())
                    .map(|v| v.boot_set_cleared_unix.unwrap_or(0)),
                // A failed read of a vDisk that is there forgets nothing.
                Err(_) if self.store.exists(vdisk) => continue,
                Err(_) => None,
            };
            let held = self.sets.lock().get(&key).map(|s| s.cleared());
            let cleared = match (stamp, held) {
                (None, _) => false,
                (Some(stamp), Some(held)) if stamp != held => true,
                (Some(_), _) => continue,
            };
            self.sets.lock().remove(&key);
            self.warmed.lock().remove(&key);
            self.asked.lock().remove(&key);
            if cleared {
                if let Ok(dir) = self.store.vdisk_path(vdisk) {
                    let _ = std::fs::remove_file(dir.join(boot_set_file(version)));
                }
                tracing::info!(%vdisk, version, "boot set cleared; it is learned again from the next boots");
            }
        }
    }

    /// Saves every set a session changed since the last save. A set that
    /// cannot be saved (a full disk, a vDisk deleted meanwhile) is said in
    /// the log and tried again at the next save.
    pub fn save_changed(&self) {
        self.forget_stale();
        let changed: Vec<((String, u32), Arc<BootSet>)> = self
            .sets
            .lock()
            .iter()
            .filter(|(_, s)| s.take_changed())
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        for ((vdisk, version), set) in changed {
            let saved = self
                .store
                .vdisk_path(&vdisk)
                .map(|dir| dir.join(boot_set_file(version)))
                .map_err(|e| e.to_string())
                .and_then(|path| {
                    set.save(&path).map_err(|e| e.to_string())?;
                    self.refused.lock().remove(&path);
                    Ok(())
                });
            match saved {
                Ok(()) => tracing::debug!(%vdisk, version, bytes = set.bytes(), "boot set saved"),
                Err(e) => {
                    if self.store.properties(&vdisk).is_ok() {
                        tracing::warn!(%vdisk, version, error = %e, "cannot save a boot set; trying again later");
                        set.mark_changed();
                    } else {
                        // The vDisk is gone: so is its set.
                        self.sets.lock().remove(&(vdisk, version));
                    }
                }
            }
        }
    }

    /// Reads into the page cache the boot set of each version that devices
    /// boot (each vDisk's newest production and test versions) and that was
    /// not warmed in the last 5 minutes. A version never booted here takes the
    /// set another server learned, which `peers` asks for, else the set of
    /// the nearest older version that has one here: a new version changes
    /// little of where its disk's boot reads fall.
    ///
    /// The sets read ahead add up to at most the budget, production
    /// versions' first: a set that does not fit in what is left is not read
    /// (said once in the log), only its uncached bytes counted. Returns
    /// what it read ahead.
    pub fn warm_due(
        &self,
        peers: &dyn Fn(&Wanted) -> FromPeers,
    ) -> Vec<(String, u32, bootset::Warmed)> {
        let mut done = Vec::new();
        if !self.enabled() {
            return done;
        }
        let mut due: Vec<(bool, vstream_image::Properties, u32)> = Vec::new();
        for vdisk in self.store.list().unwrap_or_default() {
            let Ok(props) = self.store.properties(&vdisk) else {
                continue;
            };
            for kind in [DeviceType::Production, DeviceType::Test] {
                let Ok(version) = props.version_for(kind) else {
                    continue;
                };
                if !due.iter().any(|(_, p, v)| p.name == vdisk && *v == version) {
                    due.push((kind == DeviceType::Production, props.clone(), version));
                }
            }
        }
        // Production first (a stable sort keeps the store's order within).
        due.sort_by_key(|(production, ..)| !production);
        let budget = self.budget.load(Ordering::Relaxed);
        let mut left = budget;
        for (_, props, version) in due {
            let vdisk = &props.name;
            let key = (vdisk.clone(), version);
            let before = self.warmed.lock().get(&key).copied();
            if let Some(w) = before.filter(|w| w.at.elapsed() < self.rewarm) {
                if !w.state.over_budget {
                    left = left.saturating_sub(w.state.bytes);
                }
                continue;
            }
            let Some((from, set)) = self.to_warm(&props, version, peers) else {
                continue;
            };
            let over = set.bytes() > left;
            let walked = self
                .store
                .chain(vdisk, version)
                .map_err(|e| std::io::Error::other(e.to_string()))
                .and_then(|chain| {
                    let disk = chain.read_only();
                    if over {
                        bootset::uncached(&disk, &set)
                    } else {
                        bootset::warm(&disk, &set)
                    }
                });
            let w = match walked {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(%vdisk, version, error = %e, "cannot read a boot set into the page cache; trying again later");
                    continue;
                }
            };
            let was_over = before.is_some_and(|b| b.state.over_budget);
            if over {
                if !was_over {
                    tracing::warn!(
                        %vdisk, version, set_of = from, bytes = w.bytes, budget_left = left, budget,
                        "a boot set is larger than what is left of the boot-set budget: it is not read ahead. \
                         If a device read more than its boot (a disk scan in its first minutes), clear it \
                         (`vstream version clear-boot-set`); else raise --boot-set-budget"
                    );
                }
            } else {
                left = left.saturating_sub(w.bytes);
                if before.is_none() || was_over {
                    tracing::info!(
                        %vdisk, version, set_of = from, bytes = w.bytes, from_disk = w.from_disk,
                        secs = w.took.as_secs_f64(), "boot set read into the page cache"
                    );
                    Metrics::add(&self.read_ahead_versions, 1);
                    Metrics::add(&self.read_ahead_bytes, w.bytes);
                } else if w.from_disk > 0 {
                    tracing::info!(
                        %vdisk, version, set_of = from, bytes = w.bytes, from_disk = w.from_disk,
                        secs = w.took.as_secs_f64(), "boot set partly evicted; read into the page cache again"
                    );
                }
                Metrics::add(&self.read_ahead_disk_bytes, w.from_disk);
            }
            let state = SetState {
                bytes: w.bytes,
                uncached: w.from_disk,
                over_budget: over,
            };
            self.warmed.lock().insert(
                key,
                Warm {
                    at: Instant::now(),
                    state,
                },
            );
            if !over {
                done.push((vdisk.clone(), version, w));
            }
        }
        done
    }

    /// Version `version` of `vdisk`'s set as last read ahead or counted.
    pub fn warm_of(&self, vdisk: &str, version: u32) -> Option<SetState> {
        let warmed = self.warmed.lock();
        Some(warmed.get(&(vdisk.to_owned(), version))?.state)
    }

    /// Per version read ahead or counted: `{vdisk="…",version="…"}` and
    /// its set's state at the last check.
    pub fn gauges(&self) -> Vec<(String, SetState)> {
        let mut rows: Vec<(String, SetState)> = self
            .warmed
            .lock()
            .iter()
            .map(|((vdisk, version), w)| {
                let vdisk = vdisk.replace(['"', '\\', '\n'], "_");
                (
                    format!("{{vdisk=\"{vdisk}\",version=\"{version}\"}}"),
                    w.state,
                )
            })
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        rows
    }

    /// The set to warm version `version` with, and the version it is of:
    /// its own with what other servers learned of it added, else that of
    /// the nearest older version with one.
    fn to_warm(
        &self,
        props: &vstream_image::Properties,
        version: u32,
        peers: &dyn Fn(&Wanted) -> FromPeers,
    ) -> Option<(u32, Arc<BootSet>)> {
        let own = self.existing(&props.name, version, props.size);
        if let Some(set) = self.with_peers(&props.name, version, props.size, peers) {
            return Some((version, set));
        }
        if let Some(set) = own.filter(|s| !s.is_empty()) {
            return Some((version, set));
        }
        let mut older: Vec<u32> = props
            .versions
            .iter()
            .filter(|v| v.number < version)
            .map(|v| v.number)
            .collect();
        older.sort_unstable_by(|a, b| b.cmp(a));
        older.into_iter().find_map(|n| {
            let set = self.existing(&props.name, n, props.size)?;
            (!set.is_empty()).then_some((n, set))
        })
    }

    /// This server's set of version `version` with what the farm's other
    /// servers learned of it added (which is saved): each server sees the
    /// boots of only the devices that logged in to it, and the farm's
    /// devices fail over to any. `None` if no other server added anything
    /// or none had a set within the last [`ASK_AGAIN`].
    fn with_peers(
        &self,
        vdisk: &str,
        version: u32,
        size: u64,
        peers: &dyn Fn(&Wanted) -> FromPeers,
    ) -> Option<Arc<BootSet>> {
        let key = (vdisk.to_owned(), version);
        if self
            .asked
            .lock()
            .get(&key)
            .is_some_and(|t| t.elapsed() < ASK_AGAIN)
        {
            return None;
        }
        let cleared = self.stamp(vdisk, version)?;
        let wanted = Wanted {
            vdisk,
            version,
            size,
            cleared,
        };
        match peers(&wanted) {
            FromPeers::NoPeer => {
                self.met_no_peer.store(true, Ordering::Relaxed);
                None
            }
            FromPeers::NoneHad => {
                self.asked.lock().insert(key, Instant::now());
                None
            }
            FromPeers::Got { peers, set } => {
                let ours = self.set(vdisk, version, size)?;
                let before = ours.bytes();
                // A set learned under another clear adds nothing.
                ours.union(&set);
                let added = ours.bytes().saturating_sub(before);
                if added == 0 {
                    return None;
                }
                let peers = peers.join(",");
                if before == 0 {
                    tracing::info!(%vdisk, version, %peers, bytes = added, "boot set copied from peers");
                } else {
                    tracing::info!(%vdisk, version, %peers, added, bytes = ours.bytes(), "boot set merged with peers' sets");
                }
                Some(ours)
            }
        }
    }
}

/// Asks each of the farm's other live servers for the set `wanted`, over
/// the peer protocol, and gives the union of those it got. A set that
/// cannot be used (damaged on the way, made for another size) is said in
/// the log and passed over; so is one learned under another clear.
pub fn ask_peers(farm: &Peers, wanted: &Wanted) -> FromPeers {
    let Wanted {
        vdisk,
        version,
        size,
        cleared,
    } = *wanted;
    let Some(secret) = farm.replication.secret() else {
        return FromPeers::NoPeer;
    };
    let me = &farm.me;
    let tls = farm.replication.peer_tls().is_some();
    let peers: Vec<Peer> = farm
        .membership
        .view()
        .servers
        .iter()
        .filter(|s| &s.name != me)
        .map(|s| Peer::of(s, tls))
        .collect();
    if peers.is_empty() {
        return FromPeers::NoPeer;
    }
    let agent = peer::agent(&farm.replication);
    let (mut got, mut from): (Option<BootSet>, Vec<String>) = (None, Vec::new());
    for p in &peers {
        let answer = PeerClient::new(&agent, p, &secret, me)
            .and_then(|c| c.boot_set(vdisk, version, BootSet::encoded_len(size) + 1));
        match answer.map(|bytes| BootSet::from_bytes(&bytes, size)) {
            Ok(Ok(set)) if set.cleared() != cleared => {
                // One of the two has not followed the catalog yet.
                tracing::debug!(%vdisk, version, peer = %p.name, theirs = set.cleared(), ours = cleared,
                    "a peer's boot set was learned under another clear of the version's set")
            }
            Ok(Ok(set)) if !set.is_empty() => {
                match &got {
                    Some(all) => all.union(&set),
                    None => got = Some(set),
                }
                from.push(p.name.clone());
            }
            Ok(Ok(_)) => {}
            Ok(Err(why)) => {
                tracing::warn!(%vdisk, version, peer = %p.name, %why, "a peer's boot set cannot be used")
            }
            Err(e) => tracing::debug!(%vdisk, version, error = %e, "no boot set from a peer"),
        }
    }
    match got {
        Some(set) => FromPeers::Got { peers: from, set },
        None => FromPeers::NoneHad,
    }
}

/// The boot-set route of the peer protocol, behind the farm's peer secret.
pub fn peer_routes(sets: Arc<BootSets>, replication: Arc<Replication>) -> Router {
    Router::new()
        .route(
            "/peer/v1/vdisks/:name/boot-sets/:version",
            axum::routing::get(peer_set),
        )
        .layer(middleware::from_fn_with_state(replication, require_peer))
        .with_state(sets)
}

/// `GET /peer/v1/vdisks/NAME/boot-sets/VERSION`: this server's set of the
/// version, in its file's form (checksummed), or 404.
async fn peer_set(
    State(sets): State<Arc<BootSets>>,
    Path((vdisk, version)): Path<(String, u32)>,
) -> Response {
    let (name, s) = (vdisk.clone(), sets.clone());
    match tokio::task::spawn_blocking(move || s.served(&name, version)).await {
        Ok(Some(bytes)) => {
            ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response()
        }
        _ => ApiError::not_found(format!(
            "this server has no boot set of version {version} of vDisk {vdisk}"
        ))
        .into_response(),
    }
}

/// Warms due versions at start and every 30 s, asking `farm`'s other
/// servers for sets this server lacks, and saves changed sets every period
/// and once more at shutdown.
pub async fn run(
    sets: Arc<BootSets>,
    farm: Arc<Peers>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    if !sets.enabled() {
        return;
    }
    let started = Instant::now();
    loop {
        let (s, f) = (sets.clone(), farm.clone());
        let _ = tokio::task::spawn_blocking(move || {
            s.save_changed();
            // Behind the devices' own reads, as the scrub is.
            let _low = crate::io::LowIo::enter();
            s.warm_due(&|wanted| ask_peers(&f, wanted));
        })
        .await;
        let early = started.elapsed() < Duration::from_secs(60) && farm.in_farm;
        let again = if early && sets.met_no_peer.swap(false, Ordering::Relaxed) {
            NO_PEER_YET
        } else {
            PERIOD
        };
        tokio::select! {
            _ = tokio::time::sleep(again) => {}
            _ = shutdown.changed() => break,
        }
    }
    let _ = tokio::task::spawn_blocking(move || sets.save_changed()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn alone(_: &Wanted) -> FromPeers {
        FromPeers::NoPeer
    }

    fn store_with(dir: &std::path::Path) -> Store {
        let store = Store::open(dir).unwrap();
        store.create("d", 16 * MIB, 0).unwrap();
        store
    }

    #[test]
    fn a_session_s_reads_are_saved_and_found_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(dir.path());
        let sets = BootSets::new(store.clone(), Duration::from_secs(60), u64::MAX);
        let rec = sets.recorder("d", 1, 16 * MIB, None).unwrap();
        rec.note(3 * MIB, 4096);
        sets.save_changed();
        let file = store.vdisk_path("d").unwrap().join(boot_set_file(1));
        assert!(file.exists());
        // A new server (a restart) finds it.
        let again = BootSets::new(store.clone(), Duration::from_secs(60), u64::MAX);
        let set = again.set("d", 1, 16 * MIB).unwrap();
        assert_eq!(set.runs(), vec![(3 * MIB, bootset::BOOT_BLOCK)]);
        // The window runs from the device's boot: a session begun late in
        // it records the rest, one begun after it nothing.
        let late = sets
            .recorder("d", 1, 16 * MIB, Some(now_unix() - 50))
            .unwrap();
        assert!(late.is_open());
        assert!(sets
            .recorder("d", 1, 16 * MIB, Some(now_unix() - 61))
            .is_none());
        // Off: no recorder, nothing warmed.
        let off = BootSets::new(store, Duration::ZERO, u64::MAX);
        assert!(off.recorder("d", 1, 16 * MIB, None).is_none());
        assert!(off.warm_due(&alone).is_empty());
    }

    #[test]
    fn the_versions_devices_boot_are_warmed_once_with_the_nearest_set() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(dir.path());
        let sets = BootSets::new(store.clone(), Duration::from_secs(60), u64::MAX);
        assert!(sets.warm_due(&alone).is_empty(), "no set learned yet");
        sets.recorder("d", 1, 16 * MIB, None)
            .unwrap()
            .note(MIB, 2 * MIB);
        let done = sets.warm_due(&alone);
        assert_eq!(done.len(), 1, "{done:?}");
        assert_eq!((done[0].0.as_str(), done[0].1), ("d", 1));
        assert_eq!(done[0].2.bytes, 2 * MIB);
        assert!(sets.warm_due(&alone).is_empty(), "warmed once");
        // A new version in test: warmed with version 1's set.
        store.new_version("d", 1).unwrap();
        store
            .promote("d", 2, vstream_image::VersionState::Test, 2)
            .unwrap();
        let done = sets.warm_due(&alone);
        assert_eq!(done.len(), 1, "{done:?}");
        assert_eq!((done[0].1, done[0].2.bytes), (2, 2 * MIB));
        // A damaged set file is no set.
        sets.save_changed();
        let file = store.vdisk_path("d").unwrap().join(boot_set_file(1));
        std::fs::write(&file, b"VSBOOTS1 and then rubbish").unwrap();
        let fresh = BootSets::new(store.clone(), Duration::from_secs(60), u64::MAX);
        assert!(fresh.warm_due(&alone).is_empty());
        assert!(
            fresh.refused.lock().contains(&file),
            "said once, then skipped"
        );
        assert!(fresh.warm_due(&alone).is_empty());
        // A session's set replaces it, and is read ahead at the next pass,
        // for version 1 and (its nearest) version 2.
        fresh.recorder("d", 1, 16 * MIB, None).unwrap().note(0, 1);
        fresh.save_changed();
        assert!(fresh.refused.lock().is_empty());
        assert_eq!(fresh.warm_due(&alone).len(), 2);
        let count = |s: &BootSets| {
            s.metrics()
                .map(|(_, _, _, v)| v.load(std::sync::atomic::Ordering::Relaxed))
        };
        assert_eq!(count(&sets)[..2], [2, 4 * MIB]);
        assert_eq!(count(&fresh)[..2], [2, 2 * bootset::BOOT_BLOCK]);
    }

    #[test]
    fn sets_past_the_budget_are_counted_not_read_production_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(dir.path());
        store.new_version("d", 1).unwrap();
        store
            .promote("d", 2, vstream_image::VersionState::Test, 2)
            .unwrap();
        store.create("e", 16 * MIB, 0).unwrap();
        let mut sets = BootSets::new(store.clone(), Duration::from_secs(60), 3 * MIB);
        let learn = |vdisk, version, offset, len| {
            sets.recorder(vdisk, version, 16 * MIB, None)
                .unwrap()
                .note(offset, len)
        };
        learn("d", 2, 4 * MIB, 2 * MIB); // test: 2 MiB
        learn("d", 1, 0, 2 * MIB); // production: 2 MiB
        learn("e", 1, 0, MIB); // production: 1 MiB
        let read = |sets: &BootSets| -> Vec<(String, u32)> {
            let done = sets.warm_due(&alone);
            done.into_iter().map(|(d, v, _)| (d, v)).collect()
        };
        let owned = |d: &str, v| (d.to_owned(), v);
        assert_eq!(read(&sets), [owned("d", 1), owned("e", 1)]);
        let over = sets.warm_of("d", 2).unwrap();
        assert!(over.over_budget && over.bytes == 2 * MIB, "{over:?}");
        assert!(!sets.warm_of("d", 1).unwrap().over_budget);
        let rows = sets.gauges();
        let flagged: Vec<&str> = rows
            .iter()
            .filter(|(_, s)| s.over_budget)
            .map(|(l, _)| l.as_str())
            .collect();
        assert_eq!(flagged, ["{vdisk=\"d\",version=\"2\"}"]);
        // Within REWARM the sets read ahead still hold their share.
        sets.budget.store(5 * MIB, Ordering::Relaxed);
        assert!(read(&sets).is_empty(), "nothing due yet");
        // Once it fits, it is read ahead at its next check.
        sets.rewarm = Duration::ZERO;
        assert_eq!(read(&sets).len(), 3);
        assert!(!sets.warm_of("d", 2).unwrap().over_budget);
        // A budget of nothing reads nothing ahead, and counts everything.
        sets.budget.store(0, Ordering::Relaxed);
        assert!(read(&sets).is_empty());
        assert!(sets.gauges().iter().all(|(_, s)| s.over_budget));
    }

    #[test]
    fn a_cleared_set_is_dropped_everywhere_and_learned_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(dir.path());
        let sets = BootSets::new(store.clone(), Duration::from_secs(60), u64::MAX);
        let learn = |sets: &BootSets, offset| {
            sets.recorder("d", 1, 16 * MIB, None)
                .unwrap()
                .note(offset, 1)
        };
        learn(&sets, 0);
        sets.save_changed();
        let file = store.vdisk_path("d").unwrap().join(boot_set_file(1));
        assert!(file.exists());
        assert_eq!(sets.warm_due(&alone).len(), 1);
        // Cleared (here, or elsewhere and then through the catalog), while
        // a session still notes into the old set: no save brings it back.
        store.clear_boot_set("d", 1, 100).unwrap();
        learn(&sets, 8 * MIB);
        sets.save_changed();
        assert!(!file.exists());
        assert!(sets.warm_of("d", 1).is_none() && sets.served("d", 1).is_none());
        // A peer that has not followed yet offers its old set: not taken.
        let old = BootSet::new(16 * MIB);
        old.note(3 * MIB, 1);
        let stale = |w: &Wanted| {
            assert_eq!(w.cleared, 100);
            FromPeers::Got {
                peers: vec!["s2".into()],
                set: BootSet::from_bytes(&old.to_bytes(), w.size).unwrap(),
            }
        };
        assert!(sets.warm_due(&stale).is_empty());
        assert!(sets
            .sets
            .lock()
            .get(&("d".to_owned(), 1))
            .is_none_or(|s| s.is_empty()));
        // Nor a file from before the clear (a server that had not
        // followed, a backup restored): it is removed when found.
        old.save(&file).unwrap();
        let fresh = BootSets::new(store.clone(), Duration::from_secs(60), u64::MAX);
        assert!(fresh.warm_due(&alone).is_empty());
        assert!(!file.exists());
        // The next boots learn it again, under the clear.
        learn(&fresh, 4 * MIB);
        fresh.save_changed();
        assert_eq!(BootSet::load(&file, 16 * MIB).unwrap().cleared(), 100);
        let served = BootSet::from_bytes(&fresh.served("d", 1).unwrap(), 16 * MIB).unwrap();
        assert_eq!(
            (served.cleared(), served.runs()),
            (100, vec![(4 * MIB, bootset::BOOT_BLOCK)])
        );
    }

    #[test]
    fn a_version_never_booted_here_takes_a_peer_s_set_first() {
        use std::cell::Cell;
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(dir.path());
        let sets = BootSets::new(store.clone(), Duration::from_secs(60), u64::MAX);
        sets.recorder("d", 1, 16 * MIB, None).unwrap().note(0, 1);
        store.new_version("d", 1).unwrap();
        store
            .promote("d", 2, vstream_image::VersionState::Test, 2)
            .unwrap();
        // Version 2 was booted on another server only.
        let theirs = BootSet::new(16 * MIB);
        theirs.note(5 * MIB, 3 * bootset::BOOT_BLOCK);
        let bytes = theirs.to_bytes();
        let asked = Cell::new(0);
        let peer = |w: &Wanted| {
            asked.set(asked.get() + 1);
            assert_eq!((w.vdisk, w.size, w.cleared), ("d", 16 * MIB, 0));
            if w.version != 2 {
                return FromPeers::NoneHad;
            }
            FromPeers::Got {
                peers: vec!["s2".into()],
                set: BootSet::from_bytes(&bytes, w.size).unwrap(),
            }
        };
        let done: Vec<(u32, u64)> = sets
            .warm_due(&peer)
            .iter()
            .map(|(_, n, w)| (*n, w.bytes))
            .collect();
        assert_eq!(
            done,
            [(1, bootset::BOOT_BLOCK), (2, 3 * bootset::BOOT_BLOCK)],
            "version 2 with the peer's set, not version 1's"
        );
        assert_eq!(asked.get(), 2, "both asked: version 1's to be merged");
        // Kept as version 2's own: saved, and served to others.
        sets.save_changed();
        let file = |n| store.vdisk_path("d").unwrap().join(boot_set_file(n));
        assert!(file(2).exists());
        let served = sets.served("d", 2).expect("served");
        let back = BootSet::from_bytes(&served, 16 * MIB).unwrap();
        assert_eq!(back.runs(), theirs.runs());
        assert!(sets.served("d", 3).is_none() && sets.served("e", 1).is_none());

        // A vDisk no server booted: asked once within ASK_AGAIN, and
        // again at once when there was nobody to ask.
        store.create("e", 16 * MIB, 0).unwrap();
        asked.set(0);
        let none_had = |w: &Wanted| {
            asked.set(asked.get() + u32::from(w.vdisk == "e"));
            FromPeers::NoneHad
        };
        assert!(sets.warm_due(&none_had).is_empty());
        assert!(sets.warm_due(&none_had).is_empty());
        assert_eq!(asked.get(), 1, "asked once");
        let fresh = BootSets::new(store.clone(), Duration::from_secs(60), u64::MAX);
        let no_peer = |w: &Wanted| {
            asked.set(asked.get() + u32::from(w.vdisk == "e"));
            FromPeers::NoPeer
        };
        fresh.warm_due(&no_peer);
        fresh.warm_due(&no_peer);
        assert_eq!(asked.get(), 3, "e@1 asked at each pass");

        // A deleted vDisk's sets are forgotten, not saved again into a new
        // vDisk of the same name.
        sets.recorder("d", 2, 16 * MIB, None)
            .unwrap()
            .note(9 * MIB, 1);
        store.delete("d").unwrap();
        store.create("d", 16 * MIB, 0).unwrap();
        sets.save_changed();
        assert!(!file(2).exists());
        assert!(!sets.sets.lock().contains_key(&("d".to_owned(), 2)));
        assert!(!sets.warmed.lock().contains_key(&("d".to_owned(), 2)));
    }

    #[test]
    fn a_set_here_gains_what_peers_learned_of_the_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(dir.path());
        let mut sets = BootSets::new(store.clone(), Duration::from_secs(60), u64::MAX);
        sets.recorder("d", 1, 16 * MIB, None).unwrap().note(0, 1);
        // s2's devices (another subnet, other hardware) read elsewhere too.
        let theirs = BootSet::new(16 * MIB);
        theirs.note(0, 1);
        theirs.note(7 * MIB, 1);
        let peer = |w: &Wanted| FromPeers::Got {
            peers: vec!["s2".into(), "s3".into()],
            set: BootSet::from_bytes(&theirs.to_bytes(), w.size).unwrap(),
        };
        let done = sets.warm_due(&peer);
        assert_eq!(done.len(), 1);
        assert_eq!(
            done[0].2.bytes,
            2 * bootset::BOOT_BLOCK,
            "merged, then read ahead"
        );
        let set = sets.existing("d", 1, 16 * MIB).unwrap();
        assert_eq!(
            set.runs(),
            [(0, bootset::BOOT_BLOCK), (7 * MIB, bootset::BOOT_BLOCK)]
        );
        assert!(set.take_changed(), "merged, so saved");
        // At the next check the peers add nothing: nothing to save.
        sets.rewarm = Duration::ZERO;
        assert_eq!(sets.warm_due(&peer).len(), 1);
        assert!(!set.take_changed());
    }

    #[test]
    fn a_warmed_set_is_checked_again_and_what_was_evicted_read_again() {
        use std::os::unix::io::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let staging = store.begin_import("d", 16 * MIB).unwrap();
        let data: Vec<u8> = (0..4 * MIB).map(|i| (i % 251) as u8).collect();
        staging.disk().write(&data, 0, false).unwrap();
        store.commit_import(staging, 0).unwrap();
        let mut sets = BootSets::new(store.clone(), Duration::from_secs(60), u64::MAX);
        sets.recorder("d", 1, 16 * MIB, None)
            .unwrap()
            .note(MIB, 2 * MIB);
        assert_eq!(sets.warm_due(&alone).len(), 1);
        assert!(sets.warm_due(&alone).is_empty(), "not again within REWARM");

        sets.rewarm = Duration::ZERO;
        let again = sets.warm_due(&alone);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].2.from_disk, 0, "all still cached: only copied");
        let label = "{vdisk=\"d\",version=\"1\"}".to_owned();
        assert_eq!(
            sets.gauges(),
            [(
                label.clone(),
                SetState {
                    bytes: 2 * MIB,
                    ..Default::default()
                }
            )]
        );
        let disk_bytes = || {
            sets.metrics()[2]
                .3
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let before = disk_bytes();
        // The kernel evicts the vDisk's pages.
        for f in std::fs::read_dir(store.vdisk_path("d").unwrap()).unwrap() {
            let f = std::fs::File::open(f.unwrap().path()).unwrap();
            // SAFETY: plain advice on a descriptor held open.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
        let again = sets.warm_due(&alone);
        let uncached = again[0].2.from_disk;
        assert!(uncached > 0, "read again from the disk: {again:?}");
        assert_eq!(
            sets.gauges(),
            [(
                label,
                SetState {
                    bytes: 2 * MIB,
                    uncached,
                    over_budget: false
                }
            )]
        );
        assert_eq!(disk_bytes() - before, uncached);
    }
}
