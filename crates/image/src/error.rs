//! Errors of the image crate.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("opening layer file {path}")]
    OpenLayer {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("layer file {path} is corrupt: {reason}")]
    CorruptLayer { path: PathBuf, reason: String },
    #[error("layer file {path} has size {found}, the vDisk has size {expected}")]
    SizeMismatch {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("reading properties file {path}")]
    ReadProperties {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("properties file {path} is invalid: {reason}")]
    BadProperties { path: PathBuf, reason: String },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("vDisk {0} does not exist in this store")]
    NoSuchVDisk(String),
    #[error("vDisk {0} already exists in this store")]
    VDiskExists(String),
    #[error("{0}")]
    Invalid(String),
    #[error("I/O error")]
    Io(#[from] io::Error),
}

/// Why a write to a disk failed: the device sees ENOSPC for the first, EIO otherwise.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("write cache limit of {limit} bytes reached")]
    CacheFull { limit: u64 },
    #[error("disk is read-only")]
    ReadOnly,
    #[error("request past the end of the disk")]
    OutOfRange,
    #[error("no space left on the store's file system")]
    NoSpace,
    #[error("I/O error")]
    Io(#[source] io::Error),
}

impl WriteError {
    /// A write's failure as a server (or any base below a disk) answered it:
    /// EPERM and EROFS mean a read-only disk.
    pub fn from_answer(e: io::Error) -> WriteError {
        match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EROFS) => WriteError::ReadOnly,
            _ => e.into(),
        }
    }
}

impl From<io::Error> for WriteError {
    fn from(e: io::Error) -> Self {
        if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
            WriteError::NoSpace
        } else {
            WriteError::Io(e)
        }
    }
}
