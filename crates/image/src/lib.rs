//! vDisk storage: layer files, stacked disks, content hashes, the store folder
//! and import/export formats.

pub mod bootset;
pub mod disk;
pub mod error;
pub mod folders;
pub mod formats;
pub mod hash;
pub mod layer;
pub mod record;
pub mod replica;
mod residency;
pub mod store;
pub mod versions;

pub use bootset::{BootRecorder, BootSet};
pub use disk::{ChainIndex, Disk, Extent, LocalRead};
pub use error::{ImageError, WriteError};
pub use layer::{Layer, CHUNK, HASH_BLOCK};
pub use store::{
    crash_point, first_bad_block, verify_layers, verify_layers_paced, verify_layers_where, Chain,
    CheckReport, LayerCheck, Staging, Store, Trust,
};
pub use versions::{Properties, Version, VersionState};
