//! Who may do what through the admin API: the roles of API tokens, the
//! tokens the farm keeps (as digests), and the audit trail of changes.

use serde::{Deserialize, Serialize};

/// What a token may do. Each role may do what the ones below it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `/metrics` only.
    Metrics,
    /// Reads everything but secrets; changes nothing.
    Viewer,
    /// A viewer that also acts on devices (add, set, reset, remove,
    /// revoke), rebalances and starts replication; no vDisk, version,
    /// store or token changes.
    Operator,
    /// Everything.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Metrics, Role::Viewer, Role::Operator, Role::Admin];

    /// Whether a token of this role may do what `needed` allows.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "operator" => Ok(Role::Operator),
            "viewer" => Ok(Role::Viewer),
            "metrics" => Ok(Role::Metrics),
            _ => Err(format!(
                "unknown role {s:?}: expected admin, operator, viewer or metrics"
            )),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
            Role::Metrics => "metrics",
        })
    }
}

/// An API token of the farm (`tokens/NAME` in the farm state): every server
/// accepts it. Only the SHA-256 of the token is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApiToken {
    pub name: String,
    /// SHA-256 of the token, in hex.
    pub sha256: String,
    pub role: Role,
    pub created_unix: u64,
    /// After this second the token is refused; `None`: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix: Option<u64>,
    /// The token name that created it.
    #[serde(default)]
    pub created_by: String,
}

/// One change, or one refusal, made through the admin API (`audit/...` in
/// the farm state), from any server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditEntry {
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The token's name, or `-` for a request without a valid token.
    pub who: String,
    /// Its role, if its token was valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// The client's address.
    pub from: String,
    /// The server that answered.
    pub server: String,
    pub method: String,
    /// The request's path.
    pub path: String,
    /// What it acts on, such as `device/pc1` or `vdisk/win10`.
    pub object: String,
    /// A summary of the change: the request body's fields (no secrets).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub summary: String,
    /// The HTTP status of the answer.
    pub status: u16,
    /// `ok`, or the error sentence.
    pub result: String,
}

/// What happened to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A session began (NBD or iSCSI).
    Connect,
    /// Its session ended: cleanly, cut off, superseded by a new boot, or
    /// let go.
    Disconnect,
    /// It logged in again avoiding a server that failed it.
    Failover,
    /// A login it will retry: nothing could serve it yet.
    Retry,
    /// A connection or login of it was refused.
    Refusal,
    /// Its write cache passed 80 % of its limit, or reached it.
    CacheFull,
    /// An operator moved it to another server (`vstream device move`).
    Move,
}

impl EventKind {
    pub const ALL: [EventKind; 7] = [
        EventKind::Connect,
        EventKind::Disconnect,
        EventKind::Failover,
        EventKind::Retry,
        EventKind::Refusal,
        EventKind::CacheFull,
        EventKind::Move,
    ];
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EventKind::Connect => "connect",
            EventKind::Disconnect => "disconnect",
            EventKind::Failover => "failover",
            EventKind::Retry => "retry",
            EventKind::Refusal => "refusal",
            EventKind::CacheFull => "cache_full",
            EventKind::Move => "move",
        })
    }
}

/// One event of a device (`events/DEVICE` keeps its recent ones).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceEvent {
    pub at_ms: u64,
    pub kind: EventKind,
    /// The server it happened at.
    pub server: String,
    /// What, in a sentence: the reason of a refusal or failover, how a
    /// session ended.
    pub detail: String,
}
