//! Target devices as the farm records them, and their MAC addresses.

use serde::{Deserialize, Serialize};

/// Which version of its vDisk a device boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum DeviceType {
    /// The maintenance version, read/write; one such device at a time.
    Maintenance,
    /// The newest test version (the production version if there is none).
    Test,
    /// The newest production version.
    #[default]
    Production,
}

impl std::str::FromStr for DeviceType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "maintenance" => Ok(DeviceType::Maintenance),
            "test" => Ok(DeviceType::Test),
            "production" => Ok(DeviceType::Production),
            _ => Err(format!(
                "unknown device type {s:?}: expected maintenance, test or production"
            )),
        }
    }
}

impl std::fmt::Display for DeviceType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceType::Maintenance => "maintenance",
            DeviceType::Test => "test",
            DeviceType::Production => "production",
        })
    }
}

/// A target device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Device {
    pub name: String,
    /// Lower-case, colon-separated.
    pub mac: String,
    pub vdisk: String,
    pub created_unix: u64,
    #[serde(default, rename = "type")]
    pub kind: DeviceType,
    /// Set by `vstream device revoke`: every client certificate of the
    /// device that became valid at or before this time (seconds since the
    /// Unix epoch) is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_revoked_unix: Option<u64>,
    /// The iSCSI initiator name an admin gave it; without one, it is known
    /// on iSCSI by the name its MAC gives ([`default_initiator`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iqn: Option<String>,
    /// The last move an operator asked for (`vstream device move`): its
    /// logins within [`DeviceMove::HONOURED_SECS`] of it go to that server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved: Option<DeviceMove>,
}

/// An operator's move of a connected device to another server of the farm
/// (`POST /api/v1/devices/NAME/move`). The server it streamed from lets it
/// go, and its agent logs in again: for a short while, logins of the device
/// go to the server named here, if it can serve it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceMove {
    /// The server it moves to.
    pub server: String,
    /// The server it streamed from when the move was asked.
    pub from: String,
    /// When the move was asked, in seconds since the Unix epoch.
    pub requested_unix: u64,
}

impl DeviceMove {
    /// How long after a move the device's logins go to its server. A
    /// device's agent logs in again within a second or two of being let go;
    /// after this, logins place it by load again.
    pub const HONOURED_SECS: u64 = 120;

    /// Whether logins at `now_unix` go to the move's server.
    pub fn honoured_at(&self, now_unix: u64) -> bool {
        now_unix < self.requested_unix.saturating_add(Self::HONOURED_SECS)
    }
}

/// How many events of each kind a device has had since it was added
/// (`eventcounts/DEVICE` in the farm state, written with its recent events,
/// which keep only the newest few). A device added by an older build counts
/// from the recent events it had then.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceEventCounts {
    #[serde(default)]
    pub connects: u64,
    #[serde(default)]
    pub disconnects: u64,
    /// Logins again avoiding a server that failed it (or let it go).
    #[serde(default)]
    pub failovers: u64,
    /// Logins refused for now, that it retries: nothing could serve it yet.
    #[serde(default)]
    pub retries: u64,
    #[serde(default)]
    pub refusals: u64,
    /// Times its write cache passed 80 % of its limit, or reached it.
    #[serde(default)]
    pub cache_full: u64,
    /// Moves an operator made.
    #[serde(default)]
    pub moves: u64,
    /// When its last failover was, in ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failover_ms: Option<u64>,
    /// When its last retry was, in ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_retry_ms: Option<u64>,
}

impl DeviceEventCounts {
    /// Counts `event` in.
    pub fn add(&mut self, event: &crate::DeviceEvent) {
        use crate::EventKind;
        let at = Some(event.at_ms);
        match event.kind {
            EventKind::Connect => self.connects += 1,
            EventKind::Disconnect => self.disconnects += 1,
            EventKind::Failover => {
                self.failovers += 1;
                self.last_failover_ms = self.last_failover_ms.max(at);
            }
            EventKind::Retry => {
                self.retries += 1;
                self.last_retry_ms = self.last_retry_ms.max(at);
            }
            EventKind::Refusal => self.refusals += 1,
            EventKind::CacheFull => self.cache_full += 1,
            EventKind::Move => self.moves += 1,
        }
    }
}

impl Device {
    /// A production device record of vDisk `vdisk`, with no initiator name
    /// of its own, no revoked credentials and no move under way.
    pub fn new(
        name: impl Into<String>,
        mac: impl Into<String>,
        vdisk: impl Into<String>,
        created_unix: u64,
    ) -> Device {
        Device {
            name: name.into(),
            mac: mac.into(),
            vdisk: vdisk.into(),
            created_unix,
            kind: DeviceType::default(),
            credentials_revoked_unix: None,
            iqn: None,
            moved: None,
        }
    }

    /// Why a certificate of this device that became valid at `not_before`
    /// (Unix seconds) no longer opens anything, if it does not.
    pub fn revoked(&self, not_before: i64) -> Option<String> {
        let at = self.credentials_revoked_unix?;
        (not_before <= at as i64).then(|| {
            format!(
                "device {}'s credentials were revoked at {at} (Unix time); this certificate \
                 became valid at {not_before}",
                self.name
            )
        })
    }
}

/// The iSCSI target of device `name` under the farm's IQN prefix: one
/// target per device, its disk at LUN 0. iSCSI names are case-insensitive
/// and compared lower-cased (RFC 3722), so the name is written so.
pub fn device_target(prefix: &str, name: &str) -> String {
    format!("{prefix}:device.{name}").to_ascii_lowercase()
}

/// The initiator name a device is known by when an admin gave it none:
/// `PREFIX:mac.` and its MAC as 12 lower-case hex digits. The boot script
/// sets it (iPXE's `initiator-iqn`), and Windows takes it over from the iBFT.
pub fn default_initiator(prefix: &str, mac: &str) -> String {
    let hex: String = mac.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    format!("{prefix}:mac.{hex}").to_ascii_lowercase()
}

impl Device {
    /// The initiator name this device is known by on iSCSI.
    pub fn initiator(&self, prefix: &str) -> String {
        match &self.iqn {
            Some(iqn) => iqn.to_ascii_lowercase(),
            None => default_initiator(prefix, &self.mac),
        }
    }
}

/// Checks an initiator name an admin gives a device: an `iqn.` or `eui.`
/// name (RFC 3720 3.2.6.3) of letters, digits, '.', '-' and ':', at most
/// 223 bytes.
pub fn check_iqn(iqn: &str) -> Result<(), String> {
    let lower = iqn.to_ascii_lowercase();
    let ok_chars = lower
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | ':'));
    let ok_form = (lower.starts_with("iqn.") && lower.len() > 12)
        || (lower.starts_with("eui.")
            && lower.len() == 20
            && lower[4..].chars().all(|c| c.is_ascii_hexdigit()));
    if !ok_chars || !ok_form || iqn.len() > 223 {
        return Err(format!(
            "{iqn:?} is not an iSCSI initiator name: use iqn.YYYY-MM.REVERSED.DOMAIN[:ANY] \
             (letters, digits, '.', '-', ':'), or eui. and 16 hex digits"
        ));
    }
    Ok(())
}

/// A device's CHAP secrets for iSCSI, kept apart from the device record
/// (`iscsi/DEVICE` in the farm state) so that no device listing carries
/// them. The initiator proves `chap_secret` under the device's name; the
/// target proves `target_secret` to an initiator that asks (mutual CHAP).
/// Windows wants 12 to 16 characters: both have 16.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IscsiSecrets {
    pub chap_secret: String,
    pub target_secret: String,
    pub created_unix: u64,
}

impl std::fmt::Debug for IscsiSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IscsiSecrets")
            .field("created_unix", &self.created_unix)
            .finish_non_exhaustive()
    }
}

/// A one-time enrollment token the boot script handed a netbooted device
/// (`enroll/DEVICE` in the farm state, one outstanding per device): the
/// device trades it, once, for a short-lived client certificate. The farm
/// keeps only the token's SHA-256, so a reader of the farm state cannot
/// enroll with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollToken {
    /// SHA-256 of the token, in hex.
    pub sha256: String,
    /// The MAC of the device it was handed to: lower-case, colon-separated.
    pub mac: String,
    /// The address that asked for the boot script.
    pub from: String,
    pub created_unix: u64,
    /// After this second the token is refused.
    pub expires_unix: u64,
}

/// The six octets of a MAC address in one of its usual spellings, any case:
/// `aa:bb:cc:dd:ee:ff`, `aa-bb-cc-dd-ee-ff`, `aabb.ccdd.eeff` or `aabbccddeeff`.
/// Any address, whether or not a device can have it.
fn mac_octets(s: &str) -> Option<[u8; 6]> {
    let groups: Vec<&str> = match s.len() {
        17 if s.contains(':') => s.split(':').collect(),
        17 => s.split('-').collect(),
        14 => s.split('.').collect(),
        12 => vec![s],
        _ => return None,
    };
    let width = 12 / groups.len();
    if groups
        .iter()
        .any(|g| g.len() != width || !g.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return None;
    }
    let hex = groups.concat();
    let mut octets = [0u8; 6];
    for (i, o) in octets.iter_mut().enumerate() {
        *o = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(octets)
}

/// True if `s` is written as a MAC address ([`parse_mac`]'s spellings),
/// even one no device can have. Device names never are: a name or MAC
/// lookup must never be ambiguous.
pub fn looks_like_mac(s: &str) -> bool {
    mac_octets(s).is_some()
}

/// Normalises a device's MAC address (`AA-BB-CC-DD-EE-FF`, `aa:bb:..`,
/// `aabb.ccdd.eeff` or `aabbccddeeff`) to `aa:bb:cc:dd:ee:ff`. Refuses the
/// addresses no network card has: broadcast, multicast (the low bit of the
/// first octet set) and all-zero.
pub fn parse_mac(s: &str) -> Result<String, String> {
    let Some(o) = mac_octets(s) else {
        return Err(format!(
            "{s:?} is not a MAC address (write it as aa:bb:cc:dd:ee:ff)"
        ));
    };
    let mac = o
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    if o == [0xff; 6] {
        return Err(format!(
            "{mac} is the broadcast address, not a device's MAC address"
        ));
    }
    if o[0] & 1 == 1 {
        return Err(format!(
            "{mac} is a multicast address (the low bit of its first octet is set), \
             not a device's MAC address"
        ));
    }
    if o == [0; 6] {
        return Err(format!(
            "{mac} is the all-zero address, not a device's MAC address"
        ));
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_normalise() {
        assert_eq!(parse_mac("AA-BB-CC-00-11-22").unwrap(), "aa:bb:cc:00:11:22");
        assert_eq!(parse_mac("aabbcc001122").unwrap(), "aa:bb:cc:00:11:22");
        assert_eq!(parse_mac("AABB.CC00.1122").unwrap(), "aa:bb:cc:00:11:22");
        for bad in [
            "aa:bb",
            "zz:bb:cc:00:11:22",
            "aa:bb-cc:00:11:22",
            "a:b:c:0:1:2",
            "aabbcc:001122",
            "aa.bb.cc.00.11.22",
            ":aabbcc001122",
            "aabbcc0011223",
            "20240115-0930",
        ] {
            let err = parse_mac(bad).expect_err(bad);
            assert!(err.contains("is not a MAC address"), "{bad}: {err}");
            assert!(!looks_like_mac(bad), "{bad}");
        }
        assert!(looks_like_mac("ff-ff-ff-ff-ff-ff"));
    }

    #[test]
    fn macs_of_no_device_are_refused() {
        for (mac, why) in [
            ("ff:ff:ff:ff:ff:ff", "broadcast"),
            ("FF-FF-FF-FF-FF-FF", "broadcast"),
            ("01:00:5e:00:00:fb", "multicast"),
            ("33:33:00:00:00:01", "multicast"),
            ("03:00:00:00:00:00", "multicast"),
            ("00:00:00:00:00:00", "all-zero"),
        ] {
            let err = parse_mac(mac).expect_err(mac);
            assert!(err.contains(why), "{mac}: {err}");
        }
        for good in [
            "52:54:00:12:34:56",
            "02:00:00:00:00:01",
            "00:00:00:00:00:01",
            "fe:ff:ff:ff:ff:ff",
        ] {
            assert_eq!(parse_mac(good).as_deref(), Ok(good));
        }
    }
}
