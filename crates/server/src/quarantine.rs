//! vDisks a server holds that the farm does not list.
//!
//! A server removes a local vDisk only when the farm proves it deleted: a
//! tombstone (written by `vdisk delete`) naming the vDisk's creation time.
//! Anything else the farm does not list (a moved `farm.redb`, a new or
//! rewound etcd, a vDisk of the same name made after this copy) is
//! **quarantined**: kept, never served, reported in the status (`server
//! list`, `vstream quarantine list`) and in the log, until an admin adopts
//! it into the farm or removes it (`POST /api/v1/quarantine/NAME/adopt`,
//! `DELETE /api/v1/quarantine/NAME`, on the server holding it).
//!
//! The set is kept here; replication's reconcile fills it
//! (`replication/quarantine.rs`) and the API acts on it (`api/quarantine.rs`).

use std::collections::{BTreeMap, HashSet};

use parking_lot::Mutex;
use vstream_api::Quarantined;

use crate::error::ApiError;

/// This server's quarantined vDisks.
#[derive(Default)]
pub struct Quarantine {
    held: Mutex<BTreeMap<String, Quarantined>>,
    /// Names already logged, so each is logged once while it stays.
    logged: Mutex<HashSet<String>>,
}

impl Quarantine {
    /// The quarantined vDisks, by name.
    pub fn list(&self) -> Vec<Quarantined> {
        self.held.lock().values().cloned().collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.held.lock().contains_key(name)
    }

    /// Refuses to make vDisk `name` here while a quarantined copy holds the name.
    pub fn check_free(&self, name: &str) -> Result<(), ApiError> {
        if self.contains(name) {
            return Err(ApiError::conflict(format!(
                "this server holds a quarantined vDisk {name}; adopt or remove it first \
                 (vstream quarantine list)"
            )));
        }
        Ok(())
    }

    /// Quarantined vDisk `name`, if this server holds it so.
    pub fn get(&self, name: &str) -> Option<Quarantined> {
        self.held.lock().get(name).cloned()
    }

    /// Takes vDisk `name` out (adopted into the farm, or removed).
    pub fn take(&self, name: &str) {
        self.held.lock().remove(name);
    }

    /// Replaces the set with what the last reconcile found.
    pub(crate) fn set(&self, found: BTreeMap<String, Quarantined>) {
        self.logged.lock().retain(|n| found.contains_key(n));
        *self.held.lock() = found;
    }

    pub(crate) fn log_once(&self, q: &Quarantined) {
        if self.logged.lock().insert(q.vdisk.clone()) {
            tracing::warn!(
                vdisk = %q.vdisk,
                size = q.size,
                versions = ?q.versions,
                reason = %q.reason,
                "vDisk kept in quarantine: the farm does not list it and no tombstone proves it deleted; \
                 `vstream quarantine adopt` brings it into the farm, `vstream quarantine remove` deletes it"
            );
        }
    }
}
