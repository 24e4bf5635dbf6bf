//! The types the vstream admin API speaks, shared by the server, the CLI and
//! (later) the web console. Nothing here touches a socket or a file by itself.
//!
//! The records the farm keeps and the stores hold (vDisks, devices,
//! versions, the catalog, server status) are `vstream-model`'s domain types,
//! re-exported here; this crate adds what only the HTTP API speaks.

pub mod extents;
pub mod farm;
pub mod replication;

pub use farm::*;
pub use replication::*;
pub use vstream_model::{
    check_iqn, default_initiator, default_physical_sector, default_store, device_target,
    looks_like_mac, parse_mac, ApiToken, AuditEntry, BootFile, BootFileKind, BootFiles, BootMethod,
    BootSetState, CacheType, Device, DeviceEvent, DeviceEventCounts, DeviceMove, DeviceType,
    EnrollToken, EventKind, IscsiSecrets, Mode, Role, StoreDef, StoreHere, VDisk, Version,
    VersionState, DEFAULT_STORE, PHYSICAL_SECTORS,
};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A store as the farm holds it: where each live server keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StoreInfo {
    #[serde(flatten)]
    pub store: StoreDef,
    /// The vDisks in it.
    pub vdisks: Vec<String>,
    /// Each live server's folder for it, and what is wrong there, if anything.
    pub servers: Vec<StoreHere>,
}

/// `POST /api/v1/tokens`: a token for the farm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreateToken {
    pub name: String,
    pub role: Role,
    /// Seconds it stays good; none: until revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub expires_secs: Option<u64>,
}

/// A token of the farm, as listed (its digest stays on the servers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    pub name: String,
    pub role: Role,
    pub created_unix: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix: Option<u64>,
    pub created_by: String,
}

/// A token just made: the one time the token itself is shown.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct NewToken {
    #[serde(flatten)]
    pub info: TokenInfo,
    pub token: String,
}

impl std::fmt::Debug for NewToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewToken")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// A new kernel command line for a vDisk's network boot.
/// Who a token is, as the server that answers sees it: what the web
/// console shows, and which of its actions it offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Whoami {
    /// The token's name (an admin token of the server's own: its file name).
    pub name: String,
    pub role: Role,
    /// The server that answered.
    pub server: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SetBootCmdline {
    /// One line of printable ASCII.
    #[schema(max_length = 2048, pattern = "^[ -~]*$")]
    pub cmdline: String,
}

/// A vDisk with what the server observes about it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VDiskInfo {
    #[serde(flatten)]
    pub vdisk: VDisk,
    /// blake3 content hash of the logical disk, hex.
    pub content_hash: String,
    /// Bytes of the vDisk that hold data.
    pub allocated: u64,
    /// Names of the devices connected to it now.
    pub connected: Vec<String>,
    /// Why the vDisk cannot be served, when its files are unreadable or corrupt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// This server's store does not hold it (yet): replication copies it.
    #[serde(default)]
    pub not_here: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateVDisk {
    pub name: String,
    /// Bytes: a multiple of 512, up to 2^50 (1 PiB).
    #[schema(minimum = 512, maximum = 1125899906842624_u64, multiple_of = 512)]
    pub size: u64,
    /// The named store to make it in (default: the data folder's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct SetVDisk {
    pub mode: Option<Mode>,
    pub cache_limit: Option<u64>,
    #[serde(default)]
    pub cache_type: Option<CacheType>,
    /// Whether clients without a device's certificate may read its
    /// versions on a server with TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous_read: Option<bool>,
    /// How its devices network-boot: `kernel` or `sanboot`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootMethod>,
    /// The physical sector its disks report, in bytes: 512 (512n) or 4096
    /// (512e).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 512, maximum = 4096)]
    pub physical_sector: Option<u32>,
}

/// Changes to a device.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct SetDevice {
    #[serde(rename = "type")]
    pub kind: Option<DeviceType>,
    /// Its iSCSI initiator name; `default` gives it back the one its MAC
    /// makes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iqn: Option<String>,
}

/// `POST /api/v1/devices/{name}/move`: the server a connected device moves to.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MoveDevice {
    /// A server of the farm that is up and holds a verified copy of the
    /// version the device runs.
    pub server: String,
}

/// What a device needs to reach its disk over iSCSI: its names, its CHAP
/// secrets and the portals that serve it (admins only: the secrets open the
/// device's disk).
#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct IscsiAccess {
    pub device: String,
    /// The initiator name it must log in with.
    pub initiator: String,
    /// Its target, LUN 0.
    pub target: String,
    /// The CHAP name it proves its secret under.
    pub chap_user: String,
    pub chap_secret: String,
    /// The name and secret the target proves itself with (mutual CHAP).
    pub chap_target_user: String,
    pub chap_target_secret: String,
    /// When these secrets were made (Unix seconds).
    pub created_unix: u64,
    /// The live servers' iSCSI portals, HOST:PORT.
    pub portals: Vec<String>,
}

impl std::fmt::Debug for IscsiAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IscsiAccess")
            .field("device", &self.device)
            .field("initiator", &self.initiator)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// One version of a vDisk.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VersionInfo {
    pub number: u32,
    pub state: VersionState,
    pub created_unix: u64,
    pub sealed_unix: Option<u64>,
    /// Bytes held by the version's own layer.
    pub own_bytes: u64,
    /// Layers in its chain.
    pub layers: usize,
    /// Hex content hash, once sealed.
    pub content_hash: Option<String>,
    /// Devices connected to it now.
    pub devices: Vec<String>,
    /// When its boot set was last cleared (`vstream version clear-boot-set`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_set_cleared_unix: Option<u64>,
    /// This server's boot set of the version, if it reads one ahead (a
    /// version devices boot).
    #[serde(flatten)]
    pub boot_set: BootSetState,
}

/// `POST .../versions/{n}/promote`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Promote {
    /// `test` or `production`.
    pub to: VersionState,
}

/// `POST .../merge`
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct Merge {
    /// Merge up to this version (default: the newest production version).
    pub upto: Option<u32>,
}

/// A device with its live state on this server.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeviceInfo {
    #[serde(flatten)]
    pub device: Device,
    pub connected: bool,
    /// Seconds since the Unix epoch when its current session began.
    pub connected_since: Option<u64>,
    /// Remote address of its NBD connection.
    pub peer: Option<String>,
    /// Bytes in its server-side write cache.
    pub cache_bytes: u64,
    /// The server it streams from, in a farm.
    #[serde(default)]
    pub server: Option<String>,
    /// The version it booted.
    #[serde(default)]
    pub version: Option<u32>,
    /// Whether it keeps its write cache itself (through `vstream target`).
    #[serde(default)]
    pub device_cache: bool,
    /// The front door of its session here: `NBD` or `iSCSI`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// The initiator name it is known by on iSCSI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iscsi_initiator: Option<String>,
    /// Its iSCSI target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iscsi_target: Option<String>,
    /// Its failovers since it was added: logins again avoiding a server
    /// that failed it or let it go (a move, a rebalance).
    #[serde(default)]
    pub failovers: u64,
    /// Its retries since it was added: logins refused for now because no
    /// server could serve it yet.
    #[serde(default)]
    pub retries: u64,
    /// When its last failover was, in ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failover_ms: Option<u64>,
    /// When its last retry was, in ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_retry_ms: Option<u64>,
}

impl DeviceInfo {
    /// Fills in the device's event counts.
    pub fn with_counts(mut self, counts: Option<&DeviceEventCounts>) -> DeviceInfo {
        if let Some(c) = counts {
            self.failovers = c.failovers;
            self.retries = c.retries;
            self.last_failover_ms = c.last_failover_ms;
            self.last_retry_ms = c.last_retry_ms;
        }
        self
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateDevice {
    pub name: String,
    pub mac: String,
    pub vdisk: String,
    #[serde(default, rename = "type")]
    pub kind: DeviceType,
    /// Its iSCSI initiator name, if not the one its MAC makes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iqn: Option<String>,
}

/// Every API error carries a sentence.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

/// Parses sizes such as `8GiB`, `512M`, `4096`, `1.5G` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("{s:?}: unknown size unit {unit:?}")),
    };
    let value: f64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let bytes = value * mult as f64;
    if !(0.0..=(u64::MAX as f64)).contains(&bytes) || bytes.fract() != 0.0 {
        return Err(format!("{s:?} is not a whole number of bytes"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("0.3").is_err());
    }
}
