//! Boot sets: what devices read while they boot, learned per version from
//! their sessions here and read into the page cache before the next boot
//! storm (`vstream_image::bootset`).
//!
//! ```text
//!   device session starts ──► recorder(vdisk, version): its reads for
//!                             boot_window_secs go into the version's set
//!   every 30 s (and at stop) ─► changed sets saved: vdisks/NAME/boot-vN.set
//!   at start, then every 30 s ─► the versions devices boot (production, test)
//!                             not yet warmed: their set (or, for a version
//!                             never booted here, the nearest older one's) read
//!                             through the version's layers, at the lowest
//!                             best-effort I/O priority
//! ```
//!
//! A morning's boot storm after a server restart, or after a new version
//! was promoted overnight, then finds the boot set in memory instead of
//! reading it from the store's disk device by device. A set is a hint: a
//! lost, damaged or wrong one costs time, never bytes.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use vstream_api::DeviceType;
use vstream_image::bootset::{self, boot_set_file, BootRecorder, BootSet};
use vstream_image::Store;

use vstream_service::metrics::Metrics;

use crate::sessions::pick_version;

/// How often changed sets are saved and new versions warmed.
const PERIOD: Duration = Duration::from_secs(30);

/// The boot sets of this server's versions.
pub struct BootSets {
    store: Store,
    window: Duration,
    sets: Mutex<HashMap<(String, u32), Arc<BootSet>>>,
    /// Versions whose set was read into the page cache since the start.
    warmed: Mutex<HashSet<(String, u32)>>,
    /// Set files found unusable (said once), until a save replaces them.
    refused: Mutex<HashSet<PathBuf>>,
    /// Versions read ahead, and their bytes: all, and those from the disk.
    read_ahead_versions: AtomicU64,
    read_ahead_bytes: AtomicU64,
    read_ahead_disk_bytes: AtomicU64,
}

impl BootSets {
    /// Boot sets learned for `window` from each session's start; none
    /// learned or warmed if `window` is zero.
    pub fn new(store: Store, window: Duration) -> BootSets {
        BootSets {
            store,
            window,
            sets: Mutex::new(HashMap::new()),
            warmed: Mutex::new(HashSet::new()),
            refused: Mutex::new(HashSet::new()),
            read_ahead_versions: AtomicU64::new(0),
            read_ahead_bytes: AtomicU64::new(0),
            read_ahead_disk_bytes: AtomicU64::new(0),
        }
    }

    /// Prometheus rows for `/metrics`.
    pub fn metrics(&self) -> [(&'static str, &'static str, &'static str, &AtomicU64); 3] {
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
                "of those, bytes that were not cached and came from the disk",
                &self.read_ahead_disk_bytes,
            ),
        ]
    }

    /// Whether sets are learned and warmed at all.
    pub fn enabled(&self) -> bool {
        !self.window.is_zero()
    }

    /// A recorder for a new session of a device booting version `version`
    /// of vDisk `vdisk` (of `size` bytes); `None` when learning is off.
    /// Reads the version's saved set the first time (a small file).
    pub fn recorder(&self, vdisk: &str, version: u32, size: u64) -> Option<Arc<BootRecorder>> {
        if !self.enabled() {
            return None;
        }
        let set = self.set(vdisk, version, size)?;
        Some(Arc::new(BootRecorder::new(set, self.window)))
    }

    /// Version `version`'s set: the one in memory, else the saved one, else
    /// a new, empty one. `None` if the vDisk has no folder here.
    fn set(&self, vdisk: &str, version: u32, size: u64) -> Option<Arc<BootSet>> {
        if let Some(set) = self.existing(vdisk, version, size) {
            return Some(set);
        }
        self.store.vdisk_path(vdisk).ok()?;
        let mut sets = self.sets.lock();
        let set = sets
            .entry((vdisk.to_owned(), version))
            .or_insert_with(|| Arc::new(BootSet::new(size)));
        if set.size() != size {
            *set = Arc::new(BootSet::new(size));
        }
        Some(set.clone())
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
        let loaded = Arc::new(loaded);
        let mut sets = self.sets.lock();
        let set = sets.entry(key).or_insert_with(|| loaded.clone());
        if set.size() != size {
            *set = loaded;
        }
        Some(set.clone())
    }

    /// Saves every set a session changed since the last save. A set that
    /// cannot be saved (a full disk, a vDisk deleted meanwhile) is said in
    /// the log and tried again at the next save.
    pub fn save_changed(&self) {
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
    /// not warmed since the start. A version never booted here takes the
    /// set of the nearest older version that has one: a new version changes
    /// little of where its disk's boot reads fall. Returns what it warmed.
    pub fn warm_due(&self) -> Vec<(String, u32, bootset::Warmed)> {
        let mut done = Vec::new();
        if !self.enabled() {
            return done;
        }
        for vdisk in self.store.list().unwrap_or_default() {
            let Ok(props) = self.store.properties(&vdisk) else {
                continue;
            };
            let mut due: Vec<u32> = [DeviceType::Production, DeviceType::Test]
                .into_iter()
                .filter_map(|kind| pick_version(&props, kind).ok())
                .collect();
            due.dedup();
            for version in due {
                if self.warmed.lock().contains(&(vdisk.clone(), version)) {
                    continue;
                }
                let Some((from, set)) = self.nearest(&props, version) else {
                    continue;
                };
                let warmed = self
                    .store
                    .chain(&vdisk, version)
                    .map_err(|e| std::io::Error::other(e.to_string()))
                    .and_then(|chain| bootset::warm(&chain.read_only(), &set));
                match warmed {
                    Ok(w) => {
                        tracing::info!(
                            %vdisk, version, set_of = from, bytes = w.bytes, from_disk = w.from_disk,
                            secs = w.took.as_secs_f64(), "boot set read into the page cache"
                        );
                        self.warmed.lock().insert((vdisk.clone(), version));
                        Metrics::add(&self.read_ahead_versions, 1);
                        Metrics::add(&self.read_ahead_bytes, w.bytes);
                        Metrics::add(&self.read_ahead_disk_bytes, w.from_disk);
                        done.push((vdisk.clone(), version, w));
                    }
                    Err(e) => {
                        tracing::warn!(%vdisk, version, error = %e, "cannot read a boot set into the page cache; trying again later")
                    }
                }
            }
        }
        done
    }

    /// The set to warm version `version` with: its own if it has one that
    /// is not empty, else that of the nearest older version with one.
    fn nearest(
        &self,
        props: &vstream_image::Properties,
        version: u32,
    ) -> Option<(u32, Arc<BootSet>)> {
        let mut older: Vec<u32> = props
            .versions
            .iter()
            .filter(|v| v.number <= version)
            .map(|v| v.number)
            .collect();
        older.sort_unstable_by(|a, b| b.cmp(a));
        older.into_iter().find_map(|n| {
            let set = self.existing(&props.name, n, props.size)?;
            (!set.is_empty()).then_some((n, set))
        })
    }
}

/// Warms due versions at start and every 30 s, and saves changed
/// sets every period and once more at shutdown.
pub async fn run(sets: Arc<BootSets>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    if !sets.enabled() {
        return;
    }
    loop {
        let s = sets.clone();
        let _ = tokio::task::spawn_blocking(move || {
            s.save_changed();
            // Behind the devices' own reads, as the scrub is.
            let _low = crate::io::LowIo::enter();
            s.warm_due();
        })
        .await;
        tokio::select! {
            _ = tokio::time::sleep(PERIOD) => {}
            _ = shutdown.changed() => break,
        }
    }
    let _ = tokio::task::spawn_blocking(move || sets.save_changed()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn store_with(dir: &std::path::Path) -> Store {
        let store = Store::open(dir).unwrap();
        store.create("d", 16 * MIB, 0).unwrap();
        store
    }

    #[test]
    fn a_session_s_reads_are_saved_and_found_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(dir.path());
        let sets = BootSets::new(store.clone(), Duration::from_secs(60));
        let rec = sets.recorder("d", 1, 16 * MIB).unwrap();
        rec.note(3 * MIB, 4096);
        sets.save_changed();
        let file = store.vdisk_path("d").unwrap().join(boot_set_file(1));
        assert!(file.exists());
        // A new server (a restart) finds it.
        let again = BootSets::new(store.clone(), Duration::from_secs(60));
        let set = again.set("d", 1, 16 * MIB).unwrap();
        assert_eq!(set.runs(), vec![(3 * MIB, bootset::BOOT_BLOCK)]);
        // Off: no recorder, nothing warmed.
        let off = BootSets::new(store, Duration::ZERO);
        assert!(off.recorder("d", 1, 16 * MIB).is_none());
        assert!(off.warm_due().is_empty());
    }

    #[test]
    fn the_versions_devices_boot_are_warmed_once_with_the_nearest_set() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(dir.path());
        let sets = BootSets::new(store.clone(), Duration::from_secs(60));
        assert!(sets.warm_due().is_empty(), "no set learned yet");
        sets.recorder("d", 1, 16 * MIB).unwrap().note(MIB, 2 * MIB);
        let done = sets.warm_due();
        assert_eq!(done.len(), 1, "{done:?}");
        assert_eq!((done[0].0.as_str(), done[0].1), ("d", 1));
        assert_eq!(done[0].2.bytes, 2 * MIB);
        assert!(sets.warm_due().is_empty(), "warmed once");
        // A new version in test: warmed with version 1's set.
        store.new_version("d", 1).unwrap();
        store
            .promote("d", 2, vstream_image::VersionState::Test, 2)
            .unwrap();
        let done = sets.warm_due();
        assert_eq!(done.len(), 1, "{done:?}");
        assert_eq!((done[0].1, done[0].2.bytes), (2, 2 * MIB));
        // A damaged set file is no set.
        sets.save_changed();
        let file = store.vdisk_path("d").unwrap().join(boot_set_file(1));
        std::fs::write(&file, b"VSBOOTS1 and then rubbish").unwrap();
        let fresh = BootSets::new(store.clone(), Duration::from_secs(60));
        assert!(fresh.warm_due().is_empty());
        assert!(
            fresh.refused.lock().contains(&file),
            "said once, then skipped"
        );
        assert!(fresh.warm_due().is_empty());
        // A session's set replaces it, and is read ahead at the next pass,
        // for version 1 and (its nearest) version 2.
        fresh.recorder("d", 1, 16 * MIB).unwrap().note(0, 1);
        fresh.save_changed();
        assert!(fresh.refused.lock().is_empty());
        assert_eq!(fresh.warm_due().len(), 2);
        let count = |s: &BootSets| {
            s.metrics()
                .map(|(_, _, _, v)| v.load(std::sync::atomic::Ordering::Relaxed))
        };
        assert_eq!(count(&sets)[..2], [2, 4 * MIB]);
        assert_eq!(count(&fresh)[..2], [2, 2 * bootset::BOOT_BLOCK]);
    }
}
