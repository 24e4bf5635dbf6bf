//! What the farm state keeps about its servers, device boots and
//! rebalancing.

use serde::{Deserialize, Serialize};

use crate::VersionState;

/// A version a server holds in its local store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeldVersion {
    pub vdisk: String,
    pub number: u32,
    pub state: VersionState,
    /// blake3 content hash, hex; empty while the version's hashes are stale.
    pub content_hash: String,
    /// The version can still be written (a maintenance version, or a
    /// Private-mode version 1 before its first promote).
    pub writable: bool,
    /// Every layer is present and its block hashes were checked against its data.
    pub verified: bool,
    /// Its layer files, bottom first: peers pull them from servers holding them verified.
    #[serde(default)]
    pub layers: Vec<String>,
    /// This server's boot set of the version.
    #[serde(flatten)]
    pub boot_set: BootSetState,
}

/// A server's boot set of a version as its last check found it. In the
/// JSON its fields sit beside those of the record that holds it, each left
/// out while 0 (false).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BootSetState {
    /// Bytes of the set the server reads ahead of a boot storm (0: none,
    /// or not a version devices boot).
    #[serde(rename = "boot_set_bytes", default, skip_serializing_if = "is_zero")]
    pub bytes: u64,
    /// Of them, bytes that were not in the page cache at the last check
    /// (read again then, unless over the budget).
    #[serde(
        rename = "boot_set_uncached_bytes",
        default,
        skip_serializing_if = "is_zero"
    )]
    pub uncached: u64,
    /// The set did not fit in what was left of the server's boot-set
    /// budget: it is not read ahead (its uncached bytes are counted only).
    #[serde(
        rename = "boot_set_over_budget",
        default,
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub over_budget: bool,
}

/// For fields left out of the JSON while they are 0.
pub fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A device connected to a server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SessionInfo {
    pub device: String,
    pub vdisk: String,
    pub version: u32,
    pub since_unix: u64,
    /// It keeps its write cache itself (through `vstream target`).
    pub device_cache: bool,
    /// Bytes in its write cache, as its agent last reported them.
    #[serde(default)]
    pub cache_bytes: u64,
}

/// What a live server publishes, about once a second, under a lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ServerStatus {
    pub name: String,
    /// Where its API (and device logins) answer, as a URL.
    pub api: String,
    /// Where its HTTPS API answers (`--api-tls`), as a URL: on a farm with
    /// TLS, devices log in and enroll there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_tls: Option<String>,
    /// Where its NBD service answers, as HOST:PORT.
    pub nbd: String,
    /// Its NBD listeners' TLS mode, `on` or `require`; none when TLS is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_tls: Option<String>,
    /// Where its iSCSI portal answers, as HOST:PORT, if it serves iSCSI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iscsi: Option<String>,
    /// Relative capacity, 0.1 to 1000 (PVS's power rating); load is devices ÷ power.
    pub power: f64,
    /// Subnets (CIDR) whose devices it serves first (subnet affinity).
    #[serde(default)]
    pub subnets: Vec<String>,
    /// Connected devices.
    pub devices: u32,
    /// Devices whose session started less than the boot window ago.
    pub booting: u32,
    /// Most devices booting from it at once (PVS's "maximum devices
    /// booting"); logins beyond it wait. 0: no limit.
    #[serde(default)]
    pub max_booting: u32,
    /// Bytes read from it per second, over the last interval.
    pub read_bytes_per_s: u64,
    pub versions: Vec<HeldVersion>,
    /// The devices connected to it.
    #[serde(default)]
    pub sessions: Vec<SessionInfo>,
    /// Versions it is copying from its peers, or holds corrupt.
    #[serde(default)]
    pub replication: Vec<crate::ReplicaProgress>,
    /// Where it keeps each named store, and what is wrong there.
    #[serde(default)]
    pub stores: Vec<crate::StoreHere>,
    /// vDisks in its store that the farm does not list: kept, never served,
    /// until an admin adopts or removes them (`vstream quarantine`).
    #[serde(default)]
    pub quarantined: Vec<Quarantined>,
    pub started_unix: u64,
    pub updated_unix: u64,
}

impl ServerStatus {
    /// A server that holds nothing and serves nobody, power 1.
    pub fn idle(name: &str, api: &str, nbd: &str) -> ServerStatus {
        ServerStatus {
            name: name.into(),
            api: api.into(),
            api_tls: None,
            nbd: nbd.into(),
            nbd_tls: None,
            iscsi: None,
            power: 1.0,
            subnets: vec![],
            devices: 0,
            booting: 0,
            max_booting: 0,
            read_bytes_per_s: 0,
            versions: vec![],
            sessions: vec![],
            replication: vec![],
            stores: vec![],
            quarantined: vec![],
            started_unix: 0,
            updated_unix: 0,
        }
    }
}

/// A vDisk a server holds that the farm does not list (its record is gone,
/// or was never in this farm state), and no tombstone proves deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Quarantined {
    pub vdisk: String,
    /// The server holding it.
    pub server: String,
    /// Virtual size in bytes.
    pub size: u64,
    pub created_unix: u64,
    /// Its live versions.
    pub versions: Vec<u32>,
    /// Bytes its layer files take.
    pub bytes: u64,
    /// Why it is here: what the farm says of its name.
    pub reason: String,
}

/// A device's current boot, as the farm state keeps it (`boots/DEVICE`).
/// Every server ends a session of the device begun in an older boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BootRecord {
    /// The boot identity: minted by the boot script, or sent by the device.
    pub token: String,
    /// Counts the device's boots: a session begun at a lower number is over.
    pub seq: u64,
    pub since_unix: u64,
    /// Who announced it: `ipxe` (the boot script), `login` (the agent), or
    /// `nbd` (an NBD client's export name).
    pub source: String,
}

/// The longest boot identity.
pub const BOOT_TOKEN_MAX: usize = 64;

/// Checks a boot identity: 1 to 64 ASCII letters, digits and `-`.
pub fn check_boot_token(token: &str) -> Result<(), String> {
    if token.is_empty()
        || token.len() > BOOT_TOKEN_MAX
        || !token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(format!(
            "boot identity {token:?} is not 1 to {BOOT_TOKEN_MAX} letters, digits and '-'"
        ));
    }
    Ok(())
}

/// A rebalance request as the farm state holds it; every server acts on a
/// new one once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RebalanceRequest {
    pub id: u64,
    pub trigger_pct: f64,
    pub requested_unix: u64,
}
