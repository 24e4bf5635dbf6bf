//! vstream-farm: the farm state store.
//!
//! The farm's state (vDisk records and device records) lives behind the
//! [`Backend`] trait, a key-value store with etcd's revision semantics
//! ([`backend`]). [`Embedded`] is the redb adapter for a single-server farm.
//! [`FarmStore`] is the typed handle the server uses: each operation is an
//! optimistic transaction (read with revisions, then write if nothing changed
//! since), retried when another writer got there first.
//!
//! Keys, records stored as JSON:
//!
//! * `vdisks/NAME` → [`VDisk`]
//! * `devices/NAME` → [`Device`] (MAC normalised by [`parse_mac`])
//! * `members/NAME`, `live/NAME` → [`vstream_model::ServerStatus`] (see `servers.rs`)
//! * `catalog/NAME`, `replication/now`, `secrets/peer` (see `catalog.rs`)
//! * `identity`, `tombstones/NAME` (see `identity.rs`)
//! * `events/NAME`, `eventcounts/NAME`: a device's recent events and its
//!   counts of them (see `access.rs`, `counts.rs`)
//! * `macs/MAC` → the name of the device with that MAC (UTF-8), kept in the
//!   same transactions as the device records, so MACs are unique.
//!
//! Invariant: every transaction that points a device at a vDisk (creating it,
//! or reassigning it) also rewrites that vDisk's record unchanged, so the vDisk's
//! revision moves. [`FarmStore::delete_vdisk`] checks that no device uses the
//! vDisk and compares on that revision, so a device created meanwhile makes the
//! delete retry (and be refused) instead of leaving the device dangling.

pub mod access;
pub mod backend;
mod boots;
mod catalog;
#[cfg(any(test, feature = "contract"))]
pub mod contract;
mod counts;
pub mod embedded;
mod enroll;
mod error;
pub mod etcd;
mod identity;
mod iscsi;
pub mod rider;
mod servers;
mod stores;

use std::path::Path;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
pub use vstream_model::{looks_like_mac, parse_mac, Device, VDisk};

pub use backend::{Backend, Compare, Op, Versioned};
pub use embedded::Embedded;
pub use error::{ErrorCategory, FarmError, RecordKind};
pub use identity::{FarmIdentity, Tombstone};

/// How often an operation re-reads and retries when another writer changed
/// its records between its read and its write.
pub const MAX_ATTEMPTS: usize = 32;

const VDISKS: &str = "vdisks/";
const DEVICES: &str = "devices/";
const MACS: &str = "macs/";

fn vdisk_key(name: &str) -> String {
    format!("{VDISKS}{name}")
}

fn device_key(name: &str) -> String {
    format!("{DEVICES}{name}")
}

fn mac_key(mac: &str) -> String {
    format!("{MACS}{mac}")
}

/// Checks a vDisk or device name: 1 to 64 characters of ASCII letters, digits,
/// `.`, `_` and `-`, not starting with `.` or `-`.
pub fn validate_name(name: &str) -> Result<(), FarmError> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if name.is_empty() || name.len() > 64 || !ok_chars || name.starts_with(['.', '-']) {
        return Err(FarmError::Invalid(format!(
            "{name:?} is not a valid name: use 1 to 64 letters, digits, '.', '_' or '-', \
             not starting with '.' or '-'"
        )));
    }
    Ok(())
}

/// How a lookup names a device: text written as a MAC address names the
/// device with that MAC, and only that device; other text names a device by
/// name. Device names that read as MAC addresses are refused when a device is
/// created, so the two never collide. (A device given such a name by an older
/// version is still found by its own MAC.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceKey {
    /// A normalised MAC address ([`parse_mac`]).
    Mac(String),
    /// A valid device name ([`validate_name`]).
    Name(String),
}

impl DeviceKey {
    /// Reads `text` as a MAC address or a device name; [`FarmError::Invalid`]
    /// if it is neither, or a MAC address no device can have.
    pub fn parse(text: &str) -> Result<DeviceKey, FarmError> {
        if looks_like_mac(text) {
            return parse_mac(text)
                .map(DeviceKey::Mac)
                .map_err(FarmError::Invalid);
        }
        if validate_name(text).is_ok() {
            return Ok(DeviceKey::Name(text.to_owned()));
        }
        Err(FarmError::Invalid(format!(
            "{text:?} is neither a device name nor a MAC address"
        )))
    }

    /// True if this key names `device`.
    pub fn names(&self, device: &Device) -> bool {
        match self {
            DeviceKey::Mac(mac) => device.mac == *mac,
            DeviceKey::Name(name) => device.name == *name,
        }
    }
}

fn checked_name(kind: RecordKind, name: &str) -> Result<(), FarmError> {
    validate_name(name).map_err(|e| FarmError::Invalid(format!("invalid {kind} name: {e}")))
}

fn encode<T: Serialize>(key: &str, record: &T) -> Result<Vec<u8>, FarmError> {
    serde_json::to_vec(record).map_err(|e| FarmError::backend(format!("encoding {key}"), e))
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, FarmError> {
    serde_json::from_slice(bytes)
        .map_err(|e| FarmError::backend(format!("record {key} is unreadable"), e))
}

fn decode_name(key: &str, bytes: &[u8]) -> Result<String, FarmError> {
    String::from_utf8(bytes.to_vec())
        .map_err(|e| FarmError::backend(format!("index entry {key} is unreadable"), e))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A random pause before retry `attempt` (none before the first try) of
/// an operation another writer beat, up to 0.4 ms for the first retry and
/// doubling to 12.8 ms: writers that collided and retried at once would
/// collide again (device adds to one vDisk from several servers).
async fn contention_pause(attempt: usize) {
    if attempt == 0 {
        return;
    }
    let cap_us = 200u64 << attempt.min(6);
    let us = rand::random::<u64>() % cap_us;
    tokio::time::sleep(std::time::Duration::from_micros(us)).await;
}

fn gave_up(what: impl std::fmt::Display) -> FarmError {
    FarmError::Conflict(format!(
        "gave up {what} after {MAX_ATTEMPTS} attempts: other writers kept changing it; try again"
    ))
}

/// The typed farm state store. Cheap to clone; clones share the backend.
#[derive(Clone)]
pub struct FarmStore {
    backend: Arc<dyn Backend>,
    /// Held by [`FarmStore::create_device`] through its read and write:
    /// every add to a vDisk moves the vDisk's revision, so this process's
    /// adds, run at once, would only beat each other; in turn, each
    /// succeeds at its first try. Other servers' adds still collide, and
    /// retry after a pause.
    device_adds: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for FarmStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FarmStore").finish_non_exhaustive()
    }
}

impl FarmStore {
    /// A store over any adapter. Its transactions carry the audit entry
    /// of the request they run for ([`rider`]).
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        FarmStore {
            backend: Arc::new(rider::Riding(backend)),
            device_adds: Arc::default(),
        }
    }

    /// A store over the redb database file at `path` (created if missing).
    /// Its operations must run inside a tokio runtime.
    pub fn embedded(path: impl AsRef<Path>) -> Result<Self, FarmError> {
        Ok(FarmStore::new(Arc::new(Embedded::open(path)?)))
    }

    /// A store over the etcd cluster at `endpoints` (such as
    /// `http://127.0.0.1:2379`), every key under `prefix` (such as
    /// `/vstream/farm/`); fails if etcd does not answer. See [`etcd::Etcd`].
    pub async fn etcd(endpoints: &[String], prefix: &str) -> Result<Self, FarmError> {
        Ok(FarmStore::new(Arc::new(
            etcd::Etcd::connect(endpoints, prefix).await?,
        )))
    }

    /// The adapter underneath.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The farm state's revision now (see [`Backend::revision`]).
    pub async fn revision(&self) -> Result<u64, FarmError> {
        self.backend.revision().await
    }

    /// Forgets the farm state's history before `revision`
    /// (see [`Backend::compact`]).
    pub async fn compact(&self, revision: u64) -> Result<(), FarmError> {
        self.backend.compact(revision).await
    }

    /// The record at `key`, decoded, if there is one.
    async fn get_record<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, FarmError> {
        match self.backend.get(key).await? {
            Some(v) => Ok(Some(decode(key, &v.value)?)),
            None => Ok(None),
        }
    }

    async fn list_records<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>, FarmError> {
        self.backend
            .list(prefix)
            .await?
            .iter()
            .map(|(key, v)| decode(key, &v.value))
            .collect()
    }

    // ---- vDisks -------------------------------------------------------------

    /// Every vDisk, sorted by name.
    pub async fn list_vdisks(&self) -> Result<Vec<VDisk>, FarmError> {
        self.list_records(VDISKS).await
    }

    /// The vDisk called `name`, if there is one.
    pub async fn get_vdisk(&self, name: &str) -> Result<Option<VDisk>, FarmError> {
        checked_name(RecordKind::VDisk, name)?;
        self.get_record(&vdisk_key(name)).await
    }

    /// Stores a new vDisk; [`FarmError::AlreadyExists`] if the name is taken,
    /// [`FarmError::NotFound`] if its named store is not.
    pub async fn create_vdisk(&self, vdisk: VDisk) -> Result<VDisk, FarmError> {
        checked_name(RecordKind::VDisk, &vdisk.name)?;
        let key = vdisk_key(&vdisk.name);
        let value = encode(&key, &vdisk)?;
        let mut compares = vec![Compare::absent(&key)];
        let mut ops = vec![Op::put(key, value)];
        // In the same transaction: the store is still there, and touching it
        // makes a concurrent `delete_store` (which compares it) fail.
        let (store_compare, store_touch) = self.store_guard(&vdisk.store).await?;
        compares.extend(store_compare);
        ops.extend(store_touch);
        let ok = self.backend.txn(compares, ops).await?;
        if !ok {
            return Err(FarmError::AlreadyExists {
                kind: RecordKind::VDisk,
                name: vdisk.name,
            });
        }
        Ok(vdisk)
    }

    /// Changes the vDisk called `name` with `f` and stores the result, which it
    /// returns. `f` may run more than once (once per attempt, on a fresh copy).
    /// An error from `f` aborts without writing. The name cannot change.
    pub async fn update_vdisk<F>(&self, name: &str, f: F) -> Result<VDisk, FarmError>
    where
        F: Fn(&mut VDisk) -> Result<(), FarmError>,
    {
        checked_name(RecordKind::VDisk, name)?;
        let key = vdisk_key(name);
        for _ in 0..MAX_ATTEMPTS {
            let Some(current) = self.backend.get(&key).await? else {
                return Err(FarmError::NotFound {
                    kind: RecordKind::VDisk,
                    name: name.to_string(),
                });
            };
            let old: VDisk = decode(&key, &current.value)?;
            let mut new = old.clone();
            f(&mut new)?;
            if new.name != old.name {
                return Err(FarmError::Invalid(format!(
                    "vDisk {name} cannot be renamed to {}",
                    new.name
                )));
            }
            if new == old {
                return Ok(new);
            }
            let value = encode(&key, &new)?;
            let compares = vec![Compare::revision(&key, current.revision)];
            if self
                .backend
                .txn(compares, vec![Op::put(&key, value)])
                .await?
            {
                return Ok(new);
            }
        }
        Err(gave_up(format_args!("updating vDisk {name}")))
    }

    /// Deletes the vDisk called `name`, with its catalog, leaves its tombstone,
    /// and returns its last record. Refused with [`FarmError::InUse`] while any
    /// device is assigned to it.
    pub async fn delete_vdisk(&self, name: &str) -> Result<VDisk, FarmError> {
        checked_name(RecordKind::VDisk, name)?;
        let key = vdisk_key(name);
        for _ in 0..MAX_ATTEMPTS {
            let Some(current) = self.backend.get(&key).await? else {
                return Err(FarmError::NotFound {
                    kind: RecordKind::VDisk,
                    name: name.to_string(),
                });
            };
            let users = self.devices_using(name).await?;
            if !users.is_empty() {
                let names: Vec<&str> = users.iter().map(|d| d.name.as_str()).collect();
                let noun = if names.len() == 1 {
                    "device"
                } else {
                    "devices"
                };
                return Err(FarmError::InUse(format!(
                    "vDisk {name} is assigned to {noun} {}; delete them or assign them \
                     another vDisk first",
                    names.join(", ")
                )));
            }
            // In the same transaction: the catalog goes, and a tombstone
            // tells every server holding a copy of this vDisk (by its
            // creation time) that it may remove it.
            let record: VDisk = decode(&key, &current.value)?;
            let cat_key = catalog::catalog_key(name);
            let cat = self.backend.get(&cat_key).await?;
            let created = match &cat {
                Some(c) => decode::<vstream_model::Catalog>(&cat_key, &c.value)?.created_unix,
                None => record.created_unix,
            };
            let grave_key = identity::tombstone_key(name);
            let grave = self.backend.get(&grave_key).await?;
            let compares = vec![
                Compare::revision(&key, current.revision),
                Compare::revision(&cat_key, cat.as_ref().map_or(0, |c| c.revision)),
                Compare::revision(&grave_key, grave.as_ref().map_or(0, |g| g.revision)),
            ];
            let ops = vec![
                Op::delete(&key),
                Op::delete(&cat_key),
                identity::bury(grave.as_ref(), name, created, unix_now())?,
            ];
            if self.backend.txn(compares, ops).await? {
                return Ok(record);
            }
        }
        Err(gave_up(format_args!("deleting vDisk {name}")))
    }

    // ---- devices ------------------------------------------------------------

    /// Every device, sorted by name.
    pub async fn list_devices(&self) -> Result<Vec<Device>, FarmError> {
        self.list_records(DEVICES).await
    }

    /// The devices assigned to the vDisk called `vdisk`, sorted by name.
    pub async fn devices_using(&self, vdisk: &str) -> Result<Vec<Device>, FarmError> {
        let mut devices = self.list_devices().await?;
        devices.retain(|d| d.vdisk == vdisk);
        Ok(devices)
    }

    /// The device called `name`, if there is one.
    pub async fn get_device(&self, name: &str) -> Result<Option<Device>, FarmError> {
        checked_name(RecordKind::Device, name)?;
        self.get_record(&device_key(name)).await
    }

    /// The device named `name_or_mac`, or, if it is written as a MAC address
    /// (in any form [`parse_mac`] accepts), the device with that MAC: see
    /// [`DeviceKey`]. [`FarmError::Invalid`] if the text is neither a valid
    /// name nor a device's MAC address.
    pub async fn find_device(&self, name_or_mac: &str) -> Result<Option<Device>, FarmError> {
        match DeviceKey::parse(name_or_mac)? {
            DeviceKey::Mac(mac) => self.device_by_mac(&mac).await,
            DeviceKey::Name(name) => self.get_device(&name).await,
        }
    }

    /// The device holding the normalised `mac`, following the index.
    async fn device_by_mac(&self, mac: &str) -> Result<Option<Device>, FarmError> {
        let key = mac_key(mac);
        let Some(entry) = self.backend.get(&key).await? else {
            return Ok(None);
        };
        let name = decode_name(&key, &entry.value)?;
        // Index and device are written together; check anyway so a mismatch
        // can never hand out the wrong device.
        Ok(self
            .get_device(&name)
            .await?
            .filter(|device| device.mac == mac))
    }

    /// Stores a new device and returns it as stored (MAC normalised). The name
    /// must be free ([`FarmError::AlreadyExists`]) and not read as a MAC
    /// address, the MAC unused by other devices ([`FarmError::InUse`] naming
    /// the device that has it), and the vDisk must exist ([`FarmError::Invalid`]).
    pub async fn create_device(&self, mut device: Device) -> Result<Device, FarmError> {
        checked_name(RecordKind::Device, &device.name)?;
        if looks_like_mac(&device.name) {
            return Err(FarmError::Invalid(format!(
                "invalid device name: {:?} reads as a MAC address, and a device is looked \
                 up by name or MAC; choose a name that is not a MAC address",
                device.name
            )));
        }
        device.mac = parse_mac(&device.mac).map_err(FarmError::Invalid)?;
        checked_name(RecordKind::VDisk, &device.vdisk)?;
        let key = device_key(&device.name);
        let mkey = mac_key(&device.mac);
        let vkey = vdisk_key(&device.vdisk);
        let value = encode(&key, &device)?;
        let _turn = self.device_adds.lock().await;
        for attempt in 0..MAX_ATTEMPTS {
            // Every add to a vDisk moves its revision: concurrent adds to one
            // vDisk collide, and must not retry in step.
            contention_pause(attempt).await;
            if self.backend.get(&key).await?.is_some() {
                return Err(FarmError::AlreadyExists {
                    kind: RecordKind::Device,
                    name: device.name,
                });
            }
            if let Some(holder) = self.backend.get(&mkey).await? {
                return Err(mac_taken(&device.mac, &decode_name(&mkey, &holder.value)?));
            }
            let Some(vdisk) = self.backend.get(&vkey).await? else {
                return Err(missing_vdisk(&device.vdisk));
            };
            let compares = vec![
                Compare::absent(&key),
                Compare::absent(&mkey),
                Compare::revision(&vkey, vdisk.revision),
            ];
            let ops = vec![
                Op::put(&key, value.clone()),
                Op::put(&mkey, device.name.clone()),
                // Moves the vDisk's revision; see the crate docs.
                Op::put(&vkey, vdisk.value),
            ];
            if self.backend.txn(compares, ops).await? {
                return Ok(device);
            }
        }
        Err(gave_up(format_args!("creating device {}", device.name)))
    }

    /// Changes the device called `name` with `f` and stores the result, which it
    /// returns (MAC normalised). `f` may run more than once (once per attempt,
    /// on a fresh copy); an error from it aborts without writing. The name
    /// cannot change; a new MAC must be unused, a new vDisk must exist.
    pub async fn update_device<F>(&self, name: &str, f: F) -> Result<Device, FarmError>
    where
        F: Fn(&mut Device) -> Result<(), FarmError>,
    {
        checked_name(RecordKind::Device, name)?;
        let key = device_key(name);
        for _ in 0..MAX_ATTEMPTS {
            let Some(current) = self.backend.get(&key).await? else {
                return Err(FarmError::NotFound {
                    kind: RecordKind::Device,
                    name: name.to_string(),
                });
            };
            let old: Device = decode(&key, &current.value)?;
            let mut new = old.clone();
            f(&mut new)?;
            if new.name != old.name {
                return Err(FarmError::Invalid(format!(
                    "device {name} cannot be renamed to {}",
                    new.name
                )));
            }
            // A MAC recorded by an older version that refused less stays as it
            // is until it is changed; a new one must be a device's.
            if new.mac != old.mac {
                new.mac = parse_mac(&new.mac).map_err(FarmError::Invalid)?;
            }
            if new == old {
                return Ok(new);
            }
            let mut compares = vec![Compare::revision(&key, current.revision)];
            let mut ops = vec![Op::put(&key, encode(&key, &new)?)];
            if new.mac != old.mac {
                let mkey = mac_key(&new.mac);
                if let Some(holder) = self.backend.get(&mkey).await? {
                    return Err(mac_taken(&new.mac, &decode_name(&mkey, &holder.value)?));
                }
                compares.push(Compare::absent(&mkey));
                ops.push(Op::put(mkey, name));
                ops.push(Op::delete(mac_key(&old.mac)));
            }
            if new.vdisk != old.vdisk {
                checked_name(RecordKind::VDisk, &new.vdisk)?;
                let vkey = vdisk_key(&new.vdisk);
                let Some(vdisk) = self.backend.get(&vkey).await? else {
                    return Err(missing_vdisk(&new.vdisk));
                };
                compares.push(Compare::revision(&vkey, vdisk.revision));
                // Moves the vDisk's revision; see the crate docs.
                ops.push(Op::put(vkey, vdisk.value));
            }
            if self.backend.txn(compares, ops).await? {
                return Ok(new);
            }
        }
        Err(gave_up(format_args!("updating device {name}")))
    }

    /// Deletes the device called `name` (freeing its MAC) and returns its last record.
    pub async fn delete_device(&self, name: &str) -> Result<Device, FarmError> {
        checked_name(RecordKind::Device, name)?;
        let key = device_key(name);
        for _ in 0..MAX_ATTEMPTS {
            let Some(current) = self.backend.get(&key).await? else {
                return Err(FarmError::NotFound {
                    kind: RecordKind::Device,
                    name: name.to_string(),
                });
            };
            let device: Device = decode(&key, &current.value)?;
            // The index entry changes only together with this record, so the
            // compare on the record's revision covers it too.
            let compares = vec![Compare::revision(&key, current.revision)];
            // Its boot record goes with it: a device made again later under
            // this name starts from its own first boot.
            let ops = vec![
                Op::delete(&key),
                Op::delete(mac_key(&device.mac)),
                Op::delete(boots::boot_key(name)),
                Op::delete(iscsi::iscsi_key(name)),
                Op::delete(access::events_key(name)),
                Op::delete(counts::counts_key(name)),
            ];
            if self.backend.txn(compares, ops).await? {
                return Ok(device);
            }
        }
        Err(gave_up(format_args!("deleting device {name}")))
    }
}

fn mac_taken(mac: &str, holder: &str) -> FarmError {
    FarmError::InUse(format!(
        "MAC address {mac} is already used by device {holder}"
    ))
}

fn missing_vdisk(name: &str) -> FarmError {
    FarmError::Invalid(format!("vDisk {name} does not exist"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "pc-01", "Base_2024.1", "9", &"x".repeat(64)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".hidden",
            "-flag",
            "a/b",
            "a b",
            "é",
            "aa:bb",
            &"x".repeat(65),
        ] {
            let err = validate_name(bad).expect_err(bad);
            assert!(matches!(err, FarmError::Invalid(_)));
            assert!(err.to_string().contains("not a valid name"), "{err}");
        }
    }

    /// An embedded farm state in `dir` holding vDisk `base`.
    pub(crate) async fn farm_with_base(dir: &Path) -> FarmStore {
        let farm = FarmStore::embedded(dir.join("farm.redb")).expect("open");
        farm.create_vdisk(a_vdisk("base")).await.expect("vdisk");
        farm
    }

    pub(crate) fn a_vdisk(name: &str) -> VDisk {
        VDisk::new(name, 1 << 30, 1_700_000_000)
    }

    pub(crate) fn a_device(name: &str, mac: &str) -> Device {
        Device::new(name, mac, "base", 1_700_000_100)
    }

    /// A storm of adds to one vDisk from one process: each gets through
    /// (bench/audit.py once saw 409 "gave up after 32 attempts" here).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_adds_to_one_vdisk_all_land() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = farm_with_base(dir.path()).await;
        let adds: Vec<_> = (0..200u32)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mac = format!("52:54:00:00:{:02x}:{:02x}", i >> 8, i & 255);
                    store.create_device(a_device(&format!("d{i}"), &mac)).await
                })
            })
            .collect();
        for a in adds {
            a.await.expect("task").expect("device added");
        }
        assert_eq!(store.list_devices().await.expect("list").len(), 200);
    }

    /// A device name that reads as a MAC address is refused; a lookup by a
    /// MAC-shaped key goes by MAC only, so a device named so before this rule
    /// cannot take another device's lookups.
    #[tokio::test]
    async fn device_names_and_macs_cannot_collide() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = farm_with_base(dir.path()).await;
        let d = store
            .create_device(a_device("d", "52:54:00:dd:00:bb"))
            .await
            .expect("device d");
        for name in [
            "52-54-00-dd-00-bb",
            "525400dd00bb",
            "5254.00dd.00bb",
            "FF-FF-FF-FF-FF-FF",
        ] {
            let err = store
                .create_device(a_device(name, "52:54:00:dd:00:01"))
                .await
                .expect_err(name);
            assert_eq!(err.category(), ErrorCategory::Invalid, "{name}: {err}");
            assert!(err.to_string().contains("MAC address"), "{name}: {err}");
        }
        // Names that only look a little like MACs stay good names.
        for name in ["20240115-0930", "cafe-01", "d-52-54-00-dd-00-bb"] {
            store
                .create_device(a_device(
                    name,
                    &format!("52:54:00:00:{:02x}:01", name.len()),
                ))
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }

        // A record an older version let in: named like d's MAC, with its own MAC.
        let legacy = a_device("52-54-00-dd-00-bb", "52:54:00:ee:00:01");
        let key = device_key(&legacy.name);
        let ok = store
            .backend()
            .txn(
                vec![Compare::absent(&key)],
                vec![
                    Op::put(&key, encode(&key, &legacy).expect("encode")),
                    Op::put(mac_key(&legacy.mac), legacy.name.clone()),
                ],
            )
            .await
            .expect("txn");
        assert!(ok);
        assert_eq!(
            store.find_device("52-54-00-dd-00-bb").await.expect("find"),
            Some(d.clone()),
            "the device with that MAC, not the one with that name"
        );
        assert_eq!(
            store.find_device("52:54:00:ee:00:01").await.expect("find"),
            Some(legacy),
            "the old record is still found by its own MAC"
        );
    }

    /// Broadcast, multicast and all-zero MACs are no device's.
    #[tokio::test]
    async fn non_unicast_macs_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = farm_with_base(dir.path()).await;
        for mac in [
            "ff:ff:ff:ff:ff:ff",
            "01:00:5e:00:00:01",
            "33-33-00-00-00-01",
            "000000000000",
        ] {
            let err = store
                .create_device(a_device("m", mac))
                .await
                .expect_err(mac);
            assert_eq!(err.category(), ErrorCategory::Invalid, "{mac}: {err}");
            let err = store.find_device(mac).await.expect_err(mac);
            assert_eq!(err.category(), ErrorCategory::Invalid, "{mac}: {err}");
        }
        store
            .create_device(a_device("m", "52:54:00:00:00:01"))
            .await
            .expect("a unicast MAC");
        let err = store
            .update_device("m", |d| {
                d.mac = "ff:ff:ff:ff:ff:ff".into();
                Ok(())
            })
            .await
            .expect_err("broadcast");
        assert_eq!(err.category(), ErrorCategory::Invalid, "{err}");
        // Locally administered unicast addresses are devices' too.
        store
            .create_device(a_device("l", "02:00:00:00:00:01"))
            .await
            .expect("a locally administered MAC");

        // A record an older version let in keeps working by name.
        let legacy = a_device("old", "01:00:5e:00:00:09");
        let key = device_key(&legacy.name);
        let ops = vec![
            Op::put(&key, encode(&key, &legacy).expect("encode")),
            Op::put(mac_key(&legacy.mac), legacy.name.clone()),
        ];
        assert!(store.backend().txn(vec![], ops).await.expect("txn"));
        assert_eq!(store.find_device("old").await.expect("find"), Some(legacy));
        let changed = store
            .update_device("old", |d| {
                d.kind = vstream_model::DeviceType::Test;
                Ok(())
            })
            .await
            .expect("a type change keeps the old MAC");
        assert_eq!(changed.mac, "01:00:5e:00:00:09");
        store.delete_device("old").await.expect("delete by name");
    }

    #[test]
    fn futures_are_send() {
        fn assert_send<T: Send>(_: T) {}
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FarmStore::embedded(dir.path().join("f.redb")).expect("open");
        // Never polled: this only checks the types.
        assert_send(store.list_vdisks());
        assert_send(store.update_vdisk("a", |v| {
            v.size = 1;
            Ok(())
        }));
        assert_send(store.update_device("a", |_| Ok(())));
        assert_send(store.find_device("a"));
        assert_send(store.delete_vdisk("a"));
        assert_send(store.create_device(Device::new("a", "aabbccddeeff", "b", 0)));
    }
}
