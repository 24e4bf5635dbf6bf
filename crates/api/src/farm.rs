//! What servers publish about themselves, and the device login exchange.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use vstream_model::{
    check_boot_token, BootRecord, HeldVersion, Quarantined, RebalanceRequest, ServerStatus,
    SessionInfo, BOOT_TOKEN_MAX,
};

use crate::{CacheType, DeviceType, Mode};

/// An agent's report of its device's write cache (no admin token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CacheReport {
    pub mac: String,
    pub cache_bytes: u64,
}

/// A netbooted device trades its one-time enrollment token (from its boot
/// script) for a certificate: `POST /api/v1/enroll`, over HTTPS, with no
/// admin token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EnrollRequest {
    pub mac: String,
    /// The token, as the boot script gave it (`vstream.enroll=`).
    pub token: String,
    /// A PKCS#10 signing request (PEM) for the key the device made: only
    /// its key is used; the certificate always names the device.
    pub csr: String,
}

/// A device renews its certificate before it ends: `POST /api/v1/renew`
/// over HTTPS, showing the certificate it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RenewRequest {
    /// A PKCS#10 signing request (PEM) for a new key of the device's.
    pub csr: String,
}

/// An administrator asks for a device's credential ahead of time:
/// `POST /api/v1/devices/{name}/credential`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CredentialRequest {
    /// A PKCS#10 signing request (PEM) for the holder's key.
    pub csr: String,
    /// Hours it stays valid [default: 720, at most 2160].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hours: Option<u64>,
}

/// A device certificate, as the enrollment and credential routes answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CredentialReply {
    /// The device it names.
    pub device: String,
    /// The certificate, then its issuer's (the server's enrollment CA):
    /// `client-cert.pem`.
    pub chain_pem: String,
    /// The farm's CA, which every server's certificate chains to:
    /// `ca-cert.pem`.
    pub ca_pem: String,
    pub not_after_unix: i64,
    /// Its serial number, in hex.
    pub serial: String,
}

/// What `POST /api/v1/quarantine/{name}/adopt` takes: the settings of the
/// farm record made for the vDisk (defaults as `vdisk create`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Adopt {
    #[serde(default)]
    pub mode: Option<crate::Mode>,
    #[serde(default)]
    pub cache_type: Option<crate::CacheType>,
}

/// A farm member as `server list` shows it: its last status and whether it is up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ServerInfo {
    #[serde(flatten)]
    pub status: ServerStatus,
    /// Its lease in the farm state is alive.
    pub up: bool,
    /// Load: devices ÷ power.
    pub load: f64,
    /// For the server answering: whether it reaches the farm state now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub farm_connected: Option<bool>,
}

/// A version pinned by a device: failover must land on exactly these bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Pin {
    pub vdisk: String,
    pub version: u32,
    pub content_hash: String,
}

/// A device asks where to stream from. Needs no admin token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LoginRequest {
    pub mac: String,
    /// Servers not to send it to (the one that just failed it).
    #[serde(default)]
    pub avoid: Vec<String>,
    /// The version it booted, on a re-login: it never switches mid-boot.
    #[serde(default)]
    pub pin: Option<Pin>,
    /// Its boot identity: new on every boot, the same across failovers and
    /// reconnects within one boot (see [`BootRecord`]). A login with a boot
    /// identity other than the device's last starts a new boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<String>,
}

/// Where and what a device streams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LoginReply {
    pub device: String,
    #[serde(rename = "type")]
    pub kind: DeviceType,
    pub vdisk: String,
    pub version: u32,
    pub content_hash: String,
    pub size: u64,
    pub mode: Mode,
    pub cache_type: CacheType,
    /// Largest write cache, in bytes.
    pub cache_limit: u64,
    /// The server to stream from, its NBD address and the export to open.
    pub server: String,
    /// That server's API URL: a failed server's goes last in the next login.
    pub api: String,
    pub nbd: String,
    pub export: String,
    /// Whether the device may move to another server holding the same bytes.
    pub failover: bool,
}

/// `vstream farm rebalance`: spread the devices again.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Rebalance {
    /// Move devices off servers above the average load plus this percent
    /// (default 25), 0 to 1000.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1000)]
    pub trigger_pct: Option<f64>,
}

/// How many devices each server lets go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PlannedMove {
    pub server: String,
    pub devices: u32,
}

/// The answer to a rebalance: the plan, as the answering server sees the farm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RebalancePlan {
    pub id: u64,
    pub trigger_pct: f64,
    pub moves: Vec<PlannedMove>,
}

#[cfg(test)]
mod tests {
    use super::Rebalance;

    /// A number just past a documented maximum is read past it, so the
    /// server refuses it (schemathesis sent 1000.0000000000001 for a
    /// maximum of 1000, which a parse that is not correctly rounded read as
    /// 1000.0 and let through): serde_json's `float_roundtrip`.
    #[test]
    fn a_number_just_past_a_maximum_is_read_past_it() {
        let r: Rebalance =
            serde_json::from_str(r#"{"trigger_pct": 1000.0000000000001}"#).expect("JSON");
        assert!(r.trigger_pct.expect("given") > 1000.0);
    }
}
