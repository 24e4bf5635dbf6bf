//! vDisk storage: layer files, stacked disks, content hashes, the store folder
//! and import/export formats.

pub mod disk;
pub mod error;
pub mod layer;

pub use disk::{Disk, Extent};
pub use error::{ImageError, WriteError};
pub use layer::{Layer, CHUNK, HASH_BLOCK};
