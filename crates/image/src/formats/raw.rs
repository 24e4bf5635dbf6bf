//! Raw images: the disk's bytes as they are, in a (usually sparse) file.
//!
//! Reading asks the filesystem where data is (`SEEK_DATA`/`SEEK_HOLE`) so
//! holes cost nothing; filesystems without that support look fully
//! allocated and zero detection does the rest. The same reader serves fixed
//! VHDs (whose data is raw, followed by a footer) and qemu-img's scratch
//! output. Writing makes a sparse file of the right size and stores only
//! non-zero runs.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::scan::{Regions, Scanned, Scanner};
use super::{check_extent, for_each_nonzero_run, FormatError, ImageWriter};

/// The data of `file` from 0 to `limit`, as regions.
pub(crate) struct RawRegions {
    file: File,
    path: PathBuf,
    limit: u64,
    /// Cleared when the filesystem does not support `SEEK_DATA`.
    seek_data: bool,
}

impl RawRegions {
    pub(crate) fn new(file: File, path: &Path, limit: u64) -> Self {
        RawRegions {
            file,
            path: path.to_owned(),
            limit,
            seek_data: true,
        }
    }
}

/// A source over the first `len` bytes of `file`.
pub(crate) fn open(file: File, path: &Path, len: u64, name: &'static str) -> Scanned<RawRegions> {
    Scanned {
        regions: RawRegions::new(file, path, len),
        scanner: Scanner::default(),
        size: len,
        name,
        _keep: None,
    }
}

enum Seek {
    At(u64),
    /// `SEEK_DATA` found no data after the offset.
    NoData,
    /// The filesystem (or file type) does not support it.
    Unsupported,
}

fn lseek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Seek> {
    let Ok(off) = libc::off_t::try_from(offset) else {
        return Ok(Seek::NoData);
    };
    // SAFETY: lseek only moves the file position of a descriptor we own; the
    // reads here use pread, which ignores that position.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r >= 0 {
        return Ok(Seek::At(r as u64));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENXIO) => Ok(Seek::NoData),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(libc::ESPIPE) => Ok(Seek::Unsupported),
        _ => Err(err),
    }
}

impl Regions for RawRegions {
    fn next_region(&mut self, from: u64) -> io::Result<Option<(u64, u64)>> {
        if from >= self.limit {
            return Ok(None);
        }
        if !self.seek_data {
            return Ok(Some((from, self.limit)));
        }
        let start = match lseek(&self.file, from, libc::SEEK_DATA)
            .map_err(|e| io_context(&self.path, from, e))?
        {
            Seek::At(s) => s,
            Seek::NoData => return Ok(None),
            Seek::Unsupported => {
                self.seek_data = false;
                return Ok(Some((from, self.limit)));
            }
        };
        if start >= self.limit {
            return Ok(None);
        }
        let end = match lseek(&self.file, start, libc::SEEK_HOLE)
            .map_err(|e| io_context(&self.path, start, e))?
        {
            Seek::At(h) if h > start => h.min(self.limit),
            _ => self.limit,
        };
        Ok(Some((start.max(from), end)))
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| io_context(&self.path, offset, e))
    }
}

/// Wraps an I/O error so its message names the file and offset, keeping
/// the original as its source.
pub(crate) fn io_context(path: &Path, offset: u64, source: io::Error) -> io::Error {
    let kind = match source.kind() {
        // The file was shorter than its headers promised (or shrank).
        io::ErrorKind::UnexpectedEof => io::ErrorKind::InvalidData,
        k => k,
    };
    io::Error::new(
        kind,
        FormatError::Read {
            path: path.to_owned(),
            offset,
            source,
        },
    )
}

/// Writes a raw image: a sparse file of the disk's size.
pub(crate) struct RawWriter {
    file: File,
    path: PathBuf,
    size: u64,
    next_min: u64,
}

impl RawWriter {
    pub(crate) fn create(path: &Path, size: u64) -> Result<Self, FormatError> {
        let create = |source| FormatError::Create {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(create)?;
        file.set_len(size).map_err(create)?;
        Ok(RawWriter {
            file,
            path: path.to_owned(),
            size,
            next_min: 0,
        })
    }
}

impl ImageWriter for RawWriter {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn write_extent(&mut self, offset: u64, data: &[u8]) -> Result<(), FormatError> {
        let end = check_extent(&self.path, offset, data.len(), self.next_min, self.size)?;
        let file = &self.file;
        for_each_nonzero_run(offset, data, 4096, |off, run| file.write_all_at(run, off)).map_err(
            |source| FormatError::Write {
                path: self.path.clone(),
                source,
            },
        )?;
        self.next_min = end;
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<(), FormatError> {
        self.file.sync_all().map_err(|source| FormatError::Write {
            path: self.path.clone(),
            source,
        })
    }
}
