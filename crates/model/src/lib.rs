//! vstream's domain model: the records the farm state keeps (vDisks,
//! devices, the version catalog, server status, boots) and the versions a
//! store's properties file holds.
//!
//! Plain data with serde forms, and the pure checks that go with it
//! (MAC addresses, boot identities). No HTTP and no I/O: the storage crate
//! (`vstream-image`) and the farm state (`vstream-farm`) build on it without
//! knowing the API; `vstream-api` re-exports it and adds what only the HTTP
//! API speaks. With the `openapi` feature every type also derives utoipa's
//! `ToSchema`.
//!
//! The serde forms are on-disk and on-the-wire formats: renaming a field or
//! changing a default breaks data folders and farms made by older builds.

mod access;
mod catalog;
mod device;
mod server;
mod vdisk;
mod version;

pub use access::{ApiToken, AuditEntry, DeviceEvent, EventKind, Role};
pub use catalog::{Catalog, CatalogVersion, ReplicaProgress, ReplicaState, ReplicationOverride};
pub use device::{
    check_iqn, default_initiator, device_target, looks_like_mac, parse_mac, Device,
    DeviceEventCounts, DeviceMove, DeviceType, EnrollToken, IscsiSecrets,
};
pub use server::{
    check_boot_token, is_zero, BootRecord, BootSetState, HeldVersion, Quarantined,
    RebalanceRequest, ServerStatus, SessionInfo, BOOT_TOKEN_MAX,
};
pub use vdisk::{
    default_physical_sector, default_store, BootFile, BootFileKind, BootFiles, BootMethod,
    CacheType, Mode, StoreDef, StoreHere, VDisk, DEFAULT_STORE, LOGICAL_SECTOR, PHYSICAL_SECTORS,
};
pub use version::{Version, VersionState};
