//! The types the vstream admin API speaks, shared by the server, the CLI and
//! (later) the web console. Nothing here touches a socket or a file by itself.

pub mod extents;
pub mod farm;
pub mod replication;

pub use farm::*;
pub use replication::*;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// How devices use a vDisk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One device reads and writes the vDisk itself.
    #[default]
    Private,
    /// Many devices share the read-only vDisk; each writes to its own cache.
    Standard,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "private" => Ok(Mode::Private),
            "standard" => Ok(Mode::Standard),
            _ => Err(format!("unknown mode {s:?}: expected private or standard")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Private => "private",
            Mode::Standard => "standard",
        })
    }
}

/// Where a Standard-mode device's writes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CacheType {
    /// A file per device in the server's store.
    #[default]
    Server,
    /// Kept by the device's agent (`vstream target --cache`): in its RAM, on
    /// its disk, or in RAM with overflow to disk. The device can then fail
    /// over to any server holding its version.
    Device,
}

impl std::str::FromStr for CacheType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "server" => Ok(CacheType::Server),
            "device" => Ok(CacheType::Device),
            _ => Err(format!(
                "unknown cache type {s:?}: expected server or device"
            )),
        }
    }
}

impl std::fmt::Display for CacheType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CacheType::Server => "server",
            CacheType::Device => "device",
        })
    }
}

/// A vDisk as the farm knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VDisk {
    pub name: String,
    /// Virtual size in bytes.
    pub size: u64,
    pub mode: Mode,
    pub cache_type: CacheType,
    /// Largest write cache a device may fill, in bytes; `None` means the vDisk size.
    pub cache_limit: Option<u64>,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
    /// The named store that holds it on every server (`default`: each
    /// server's data folder).
    #[serde(default = "default_store", skip_serializing_if = "is_default_store")]
    pub store: String,
    /// What a device network-boots before it streams this vDisk.
    #[serde(default, skip_serializing_if = "BootFiles::is_empty")]
    pub boot: BootFiles,
}

/// The store of a vDisk made without naming one: each server's data folder.
pub const DEFAULT_STORE: &str = "default";

pub fn default_store() -> String {
    DEFAULT_STORE.to_owned()
}

fn is_default_store(s: &str) -> bool {
    s == DEFAULT_STORE
}

/// A named store: a folder that every server of the farm holds locally, at
/// the same path unless a server overrides it (`vstream server --store-path
/// NAME=PATH`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StoreDef {
    pub name: String,
    /// The folder, the same on every server that does not override it.
    pub path: String,
}

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

/// One server's copy of a store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StoreHere {
    pub store: String,
    pub server: String,
    pub path: String,
    /// Why the server cannot use it (the folder cannot be made, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// The kernel, initrd and kernel command line a device boots by network
/// (`/boot/ipxe`). The files live in each server's store, named by content
/// hash, and replication copies them with the vDisk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BootFiles {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<BootFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<BootFile>,
    /// Kernel command line words; vstream adds the bootstrap list and the MAC.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cmdline: String,
}

impl BootFiles {
    pub fn is_empty(&self) -> bool {
        self.kernel.is_none() && self.initrd.is_none() && self.cmdline.is_empty()
    }

    pub fn get(&self, which: BootFileKind) -> Option<&BootFile> {
        match which {
            BootFileKind::Kernel => self.kernel.as_ref(),
            BootFileKind::Initrd => self.initrd.as_ref(),
        }
    }

    pub fn files(&self) -> impl Iterator<Item = &BootFile> {
        self.kernel.iter().chain(self.initrd.iter())
    }
}

/// One boot file, known by its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BootFile {
    /// The name it was uploaded under, for people.
    pub name: String,
    pub size: u64,
    /// blake3 of its bytes, hex: also its file name in each store.
    pub blake3: String,
}

/// Which boot file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BootFileKind {
    Kernel,
    Initrd,
}

impl std::str::FromStr for BootFileKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kernel" => Ok(BootFileKind::Kernel),
            "initrd" => Ok(BootFileKind::Initrd),
            _ => Err(format!(
                "unknown boot file {s:?}: expected kernel or initrd"
            )),
        }
    }
}

impl std::fmt::Display for BootFileKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BootFileKind::Kernel => "kernel",
            BootFileKind::Initrd => "initrd",
        })
    }
}

/// A new kernel command line for a vDisk's network boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SetBootCmdline {
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
}

/// Which version of its vDisk a device boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Device {
    pub name: String,
    /// Lower-case, colon-separated.
    pub mac: String,
    pub vdisk: String,
    pub created_unix: u64,
    #[serde(default, rename = "type")]
    pub kind: DeviceType,
}

/// Changes to a device.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct SetDevice {
    #[serde(rename = "type")]
    pub kind: Option<DeviceType>,
}

/// The state of a vDisk version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VersionState {
    Maintenance,
    Test,
    Production,
    Retired,
}

impl std::fmt::Display for VersionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VersionState::Maintenance => "maintenance",
            VersionState::Test => "test",
            VersionState::Production => "production",
            VersionState::Retired => "retired",
        })
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
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateDevice {
    pub name: String,
    pub mac: String,
    pub vdisk: String,
    #[serde(default, rename = "type")]
    pub kind: DeviceType,
}

/// Every API error carries a sentence.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
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
