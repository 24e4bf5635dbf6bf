//! The farm's catalog of vDisk versions, and what servers report about
//! copying them between their stores.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::VersionState;

/// One version of a vDisk, as the whole farm knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CatalogVersion {
    pub number: u32,
    pub state: VersionState,
    /// Layer files, bottom first; empty once retired. A sealed layer file's
    /// name stands for one content farm-wide.
    pub layers: Vec<String>,
    pub created_unix: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_unix: Option<u64>,
    /// Hex content hash, once sealed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_hash: Option<String>,
    /// The server that made this version; while it is unsealed, the only one
    /// holding it.
    pub server: String,
}

impl CatalogVersion {
    /// Sealed and not retired: every server of the farm should hold it.
    pub fn is_replicated(&self) -> bool {
        self.sealed_unix.is_some()
            && self.content_hash.is_some()
            && self.state != VersionState::Retired
            && !self.layers.is_empty()
    }
}

/// Every version of one vDisk: the farm's truth, which each server's store
/// follows (`catalog/NAME` in the farm state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Catalog {
    pub vdisk: String,
    pub size: u64,
    pub created_unix: u64,
    /// The highest version number ever given farm-wide.
    pub last_number: u32,
    pub versions: Vec<CatalogVersion>,
}

impl Catalog {
    pub fn version(&self, number: u32) -> Option<&CatalogVersion> {
        self.versions.iter().find(|v| v.number == number)
    }
}

/// Where one server stands with one version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    /// Not held, and not yet planned (another transfer runs, or no peer has it).
    Missing,
    /// Planned, waiting for its time window or a transfer slot.
    Queued,
    Copying,
    /// Held, and every block checked against its hash.
    Verified,
    /// Held, but a block failed its hash: not offered to devices until repaired.
    Corrupt,
}

impl std::fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReplicaState::Missing => "missing",
            ReplicaState::Queued => "queued",
            ReplicaState::Copying => "copying",
            ReplicaState::Verified => "verified",
            ReplicaState::Corrupt => "corrupt",
        })
    }
}

/// What a server publishes about one version it is copying or holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReplicaProgress {
    pub vdisk: String,
    pub version: u32,
    pub state: ReplicaState,
    /// Data bytes of the missing layers received so far, and in all.
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Bytes received per second over the last few seconds.
    pub rate: u64,
    /// Why it waits or failed, for the administrator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One row of `vstream replication status`: a version on a server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReplicaRow {
    pub server: String,
    /// The server is up (its lease is alive).
    pub up: bool,
    #[serde(flatten)]
    pub progress: ReplicaProgress,
    /// Seconds left at the current rate, while copying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<u64>,
}

/// `POST /api/v1/replication/start`: copy now, outside the time windows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReplicationStart {
    /// Only this vDisk (default: every vDisk).
    #[serde(default)]
    pub vdisk: Option<String>,
    /// Only this version of it.
    #[serde(default)]
    pub version: Option<u32>,
}

/// A "replicate now" order, kept in the farm state (`replication/now`) until
/// it expires; every server copies what it names outside its windows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReplicationOverride {
    /// (vDisk, version) pairs resolved from the catalog when it was given.
    pub versions: Vec<(String, u32)>,
    pub created_unix: u64,
    pub expires_unix: u64,
}
