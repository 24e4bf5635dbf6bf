//! vDisks as the farm records them, the stores that hold them, and the files
//! a device network-boots before streaming one.

use serde::{Deserialize, Serialize};

/// How devices use a vDisk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// On a server with TLS, clients without a device's certificate (tools)
    /// may read its versions; devices of other vDisks may too. Off by
    /// default: a golden image holds secrets.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub anonymous_read: bool,
    /// The physical sector its disks report, in bytes: 512 (512n, the
    /// default) or 4096 (512e: 512-byte logical blocks, eight to a physical
    /// one, as a layer's 4 KiB chunks are). iSCSI says it in READ CAPACITY
    /// (16); Windows aligns to it.
    #[serde(
        default = "default_physical_sector",
        skip_serializing_if = "is_default_physical_sector"
    )]
    pub physical_sector: u32,
}

/// The logical block every vDisk has, in bytes.
pub const LOGICAL_SECTOR: u32 = 512;
/// The physical sectors a vDisk may report, in bytes.
pub const PHYSICAL_SECTORS: [u32; 2] = [512, 4096];

pub fn default_physical_sector() -> u32 {
    LOGICAL_SECTOR
}

fn is_default_physical_sector(s: &u32) -> bool {
    *s == LOGICAL_SECTOR
}

impl VDisk {
    /// A vDisk record with every setting at its default: Private mode, its
    /// write caches on the server with no limit, in the default store, no
    /// boot files, 512n.
    pub fn new(name: impl Into<String>, size: u64, created_unix: u64) -> VDisk {
        VDisk {
            name: name.into(),
            size,
            mode: Mode::default(),
            cache_type: CacheType::default(),
            cache_limit: None,
            created_unix,
            store: default_store(),
            boot: BootFiles::default(),
            anonymous_read: false,
            physical_sector: default_physical_sector(),
        }
    }

    /// Logical blocks per physical sector, as a power of 2 (READ CAPACITY
    /// (16)'s LBPPBE): 0 for 512n, 3 for 512e.
    pub fn physical_exponent(&self) -> u8 {
        (self.physical_sector.max(LOGICAL_SECTOR) / LOGICAL_SECTOR).trailing_zeros() as u8
    }
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StoreDef {
    pub name: String,
    /// The folder, the same on every server that does not override it.
    pub path: String,
}

/// One server's copy of a store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BootFiles {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<BootFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<BootFile>,
    /// Kernel command line words; vstream adds the bootstrap list and the MAC.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cmdline: String,
    /// How its devices network-boot.
    #[serde(default, skip_serializing_if = "BootMethod::is_kernel")]
    pub method: BootMethod,
}

/// How a vDisk's devices network-boot from the boot script.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum BootMethod {
    /// iPXE loads the vDisk's kernel and initrd, which stream the disk over
    /// NBD (through `vstream target`, or the initramfs hook).
    #[default]
    Kernel,
    /// iPXE `sanboot`s the device's iSCSI target: the disk's own boot loader
    /// runs, and the OS takes the disk over from the iBFT (Windows, ESXi,
    /// the BSDs, a Linux with open-iscsi in its initramfs).
    Sanboot,
}

impl BootMethod {
    pub fn is_kernel(&self) -> bool {
        *self == BootMethod::Kernel
    }
}

impl std::str::FromStr for BootMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kernel" => Ok(BootMethod::Kernel),
            "sanboot" => Ok(BootMethod::Sanboot),
            _ => Err(format!(
                "unknown boot method {s:?}: expected kernel or sanboot"
            )),
        }
    }
}

impl std::fmt::Display for BootMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BootMethod::Kernel => "kernel",
            BootMethod::Sanboot => "sanboot",
        })
    }
}

impl BootFiles {
    pub fn is_empty(&self) -> bool {
        self.kernel.is_none()
            && self.initrd.is_none()
            && self.cmdline.is_empty()
            && self.method.is_kernel()
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BootFile {
    /// The name it was uploaded under, for people.
    pub name: String,
    pub size: u64,
    /// blake3 of its bytes, hex: also its file name in each store.
    pub blake3: String,
}

/// Which boot file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_without_a_physical_sector_is_512n() {
        let old = r#"{"name":"w","size":1048576,"mode":"private","cache_type":"server",
                      "cache_limit":null,"created_unix":1}"#;
        let mut v: VDisk = serde_json::from_str(old).unwrap();
        assert_eq!((v.physical_sector, v.physical_exponent()), (512, 0));
        assert!(!serde_json::to_string(&v)
            .unwrap()
            .contains("physical_sector"));
        v.physical_sector = 4096;
        assert_eq!(v.physical_exponent(), 3);
        let back: VDisk = serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
        assert_eq!(back, v);
    }
}
