//! Disk image files for import and export.
//!
//! `vstream vdisk import NAME FILE` and `vstream vdisk export NAME FILE
//! [--format raw|vhd]` move a vDisk's content between the store and a file in
//! some image format. This module is the file side of that; the wire side
//! (the extents stream framing of the admin API) is not storage's business
//! and lives with the API's types.
//!
//! # Import
//!
//! [`open_source`] looks at the file's content (never its name) and returns a
//! [`SourceImage`]: an iterator over the *data extents* of the disk, that is
//! `(offset, bytes)` pieces of at most [`MAX_EXTENT`] bytes in increasing
//! order, leaving out holes (unallocated parts of sparse files or VHD blocks)
//! and runs of zeros aligned to [`ZERO_GRANULE`], so an import only writes
//! what holds data. Formats:
//!
//! * raw: anything not recognised below. Holes are found with
//!   `SEEK_DATA`/`SEEK_HOLE`.
//! * VHD, fixed and dynamic, read natively (`vhd.rs`). Every header field that
//!   drives a read is checked first, so a corrupt file gives a
//!   [`FormatError`], never a panic or a huge allocation. Differencing VHDs are
//!   refused.
//! * qcow2 (and qcow), VHDX, VMDK and VDI: `qemu-img convert` turns them into
//!   a sparse raw scratch file in the caller's scratch folder, read as raw and
//!   deleted when the source is dropped (`qemu.rs`).
//!
//! The sizes of extents are bounded; memory use is constant apart from a
//! dynamic VHD's block allocation table (4 bytes per block).
//!
//! # Export
//!
//! [`create_writer`] makes an [`ImageWriter`] for a file in an
//! [`ExportFormat`]; the caller hands it the vDisk's extents in increasing
//! order, then calls [`ImageWriter::finish`]. Raw output is a sparse file; VHD
//! output is a dynamic VHD that allocates blocks only where data is not zero.
//! Only the VHD block table is held in memory.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

mod qemu;
mod raw;
mod scan;
mod vhd;

#[cfg(test)]
mod tests;

/// The largest extent [`SourceImage::next_extent`] returns (4 MiB), equal to
/// the largest frame of an extent stream.
pub const MAX_EXTENT: usize = 4 << 20;

/// Zero detection works on runs of this many bytes (64 KiB), aligned to
/// multiples of it within the disk: such a run that is all zeros is left out.
pub const ZERO_GRANULE: u64 = 64 << 10;

/// A disk image opened for import: its content as data extents.
pub trait SourceImage: Send {
    /// Size of the disk in bytes.
    fn virtual_size(&self) -> u64;

    /// Clears `buf`, fills it with the next data extent (1 to [`MAX_EXTENT`]
    /// bytes) and returns that extent's offset, or returns `None` when no data
    /// is left. Offsets increase and extents do not overlap; what they do not
    /// cover is zeros.
    fn next_extent(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<u64>>;

    /// What the file was recognised as: `raw`, `vhd-fixed`, `vhd-dynamic`,
    /// `qcow2`, `qcow`, `vhdx`, `vmdk` or `vdi`.
    fn format_name(&self) -> &'static str;
}

/// Formats [`create_writer`] can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ExportFormat {
    /// A flat, sparse file: byte `n` of the disk at offset `n`.
    #[default]
    Raw,
    /// A dynamic VHD (Virtual Hard Disk 1.0) with 2 MiB blocks, as Hyper-V,
    /// Windows, VirtualBox and qemu read it.
    Vhd,
}

impl FromStr for ExportFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "raw" | "img" => Ok(ExportFormat::Raw),
            "vhd" | "vpc" => Ok(ExportFormat::Vhd),
            _ => Err(format!("unknown image format {s:?}: expected raw or vhd")),
        }
    }
}

impl fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ExportFormat::Raw => "raw",
            ExportFormat::Vhd => "vhd",
        })
    }
}

/// An image file being written by an export.
pub trait ImageWriter: Send {
    /// The virtual size of the image as written. Equal to the size given to
    /// [`create_writer`], except that a VHD may be up to a few MiB larger:
    /// its size is rounded up to a whole CHS geometry so that every VHD reader
    /// sees the whole disk (the added tail reads as zeros).
    fn virtual_size(&self) -> u64;

    /// Writes `data` at `offset`. Calls must come in increasing offset order
    /// without overlapping, within the size given to [`create_writer`]. Zeros
    /// need not be written (and zero runs in `data` are not stored).
    fn write_extent(&mut self, offset: u64, data: &[u8]) -> Result<(), FormatError>;

    /// Completes the file (for VHD: block table and footers) and flushes it
    /// to stable storage. Until this returns the file is not a valid image.
    fn finish(self: Box<Self>) -> Result<(), FormatError>;
}

/// Why an image could not be read or written. Messages name the file; the
/// underlying I/O error, if any, is the [`source`](std::error::Error::source).
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("cannot open {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {} at byte {offset}", path.display())]
    Read {
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot create {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} is a corrupt VHD: its {what} checksum is {stored:#010x} but its content sums \
         to {computed:#010x}",
        path.display()
    )]
    VhdChecksum {
        path: PathBuf,
        what: &'static str,
        stored: u32,
        computed: u32,
    },
    #[error("{} is not a valid VHD: {reason}", path.display())]
    InvalidVhd { path: PathBuf, reason: String },
    #[error(
        "{} is a differencing VHD, which is not supported: merge it into its parent first \
         (e.g. with Hyper-V's Merge-VHD or `qemu-img convert -O vpc`)",
        path.display()
    )]
    DifferencingVhd { path: PathBuf },
    #[error(
        "{} is a {format} image; importing it needs qemu-img (apt-get install qemu-utils)",
        path.display()
    )]
    QemuImgMissing { path: PathBuf, format: &'static str },
    #[error("cannot run qemu-img to convert the {format} image {}", path.display())]
    QemuImgRun {
        path: PathBuf,
        format: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("qemu-img could not convert the {format} image {} ({status}): {stderr}", path.display())]
    QemuImgFailed {
        path: PathBuf,
        format: &'static str,
        status: String,
        stderr: String,
    },
    #[error("cannot create a scratch file in {}", dir.display())]
    Scratch {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {}: a {size}-byte disk is larger than a VHD can be ({max} bytes)", path.display())]
    TooLargeForVhd { path: PathBuf, size: u64, max: u64 },
    #[error(
        "{}: extent at offset {offset} starts before the end of the previous one \
         ({previous_end}); extents must come in increasing order",
        path.display()
    )]
    ExtentOutOfOrder {
        path: PathBuf,
        offset: u64,
        previous_end: u64,
    },
    #[error(
        "{}: extent at offset {offset} with {len} bytes runs past the end of the \
         {size}-byte disk",
        path.display()
    )]
    ExtentPastEnd {
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
}

/// What [`detect`] found in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Detected {
    Raw,
    /// A VHD footer at the start and/or the end.
    Vhd,
    /// A format left to `qemu-img`, by its qemu driver name.
    Qemu(&'static str),
}

/// Opens a disk image for import, recognising its format by content.
///
/// `scratch_dir` is where formats read through `qemu-img` are converted to a
/// sparse raw file, which needs as much free space as the image holds data;
/// the file is deleted when the returned source is dropped.
pub fn open_source(path: &Path, scratch_dir: &Path) -> Result<Box<dyn SourceImage>, FormatError> {
    let file = File::open(path).map_err(|source| FormatError::Open {
        path: path.to_owned(),
        source,
    })?;
    let len = file_len(&file).map_err(|source| FormatError::Open {
        path: path.to_owned(),
        source,
    })?;
    let mut head = [0u8; 512];
    let head_len = read_up_to(&file, 0, &mut head).map_err(|source| FormatError::Read {
        path: path.to_owned(),
        offset: 0,
        source,
    })?;
    let mut tail = [0u8; 512];
    let tail_start = len.saturating_sub(512);
    let tail_len =
        read_up_to(&file, tail_start, &mut tail).map_err(|source| FormatError::Read {
            path: path.to_owned(),
            offset: tail_start,
            source,
        })?;
    let detected = detect(&head[..head_len], &tail[..tail_len]);
    tracing::debug!(path = %path.display(), ?detected, len, "detected image format");
    match detected {
        Detected::Raw => Ok(Box::new(raw::open(file, path, len, "raw"))),
        Detected::Vhd => vhd::open(file, path, len),
        Detected::Qemu(format) => {
            drop(file);
            qemu::open(path, scratch_dir, format, qemu::QEMU_IMG)
        }
    }
}

/// Recognises a format from the first and last (up to) 512 bytes of a file.
fn detect(head: &[u8], tail: &[u8]) -> Detected {
    if head.starts_with(b"QFI\xfb") {
        // Big-endian version at byte 4: 1 is the old qcow, 2 and 3 qcow2.
        return Detected::Qemu(if head.get(4..8) == Some(&[0, 0, 0, 1]) {
            "qcow"
        } else {
            "qcow2"
        });
    }
    if head.starts_with(b"vhdxfile") {
        return Detected::Qemu("vhdx");
    }
    if head.starts_with(b"KDMV")
        || head.starts_with(b"COWD")
        || head.starts_with(b"# Disk DescriptorFile")
    {
        return Detected::Qemu("vmdk");
    }
    // VDI: little-endian signature 0xbeda107f at byte 64.
    if head.get(64..68) == Some(&[0x7f, 0x10, 0xda, 0xbe]) {
        return Detected::Qemu("vdi");
    }
    if head.starts_with(vhd::COOKIE) || vhd::footer_in_tail(tail).is_some() {
        return Detected::Vhd;
    }
    Detected::Raw
}

/// Length of a regular file or block device.
fn file_len(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "it is a directory",
        ));
    }
    if meta.file_type().is_block_device() {
        use std::io::Seek;
        let mut f = file;
        return f.seek(io::SeekFrom::End(0));
    }
    Ok(meta.len())
}

/// Reads into `buf` from `offset` until it is full or the file ends; returns
/// how much was read.
fn read_up_to(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Creates (or truncates) `path` as an image of `virtual_size` bytes in
/// `format`, to be filled with [`ImageWriter::write_extent`].
pub fn create_writer(
    path: &Path,
    format: ExportFormat,
    virtual_size: u64,
) -> Result<Box<dyn ImageWriter>, FormatError> {
    match format {
        ExportFormat::Raw => Ok(Box::new(raw::RawWriter::create(path, virtual_size)?)),
        ExportFormat::Vhd => Ok(Box::new(vhd::VhdWriter::create(path, virtual_size)?)),
    }
}

/// The ordering and bounds checks every writer applies to an extent.
fn check_extent(
    path: &Path,
    offset: u64,
    len: usize,
    previous_end: u64,
    size: u64,
) -> Result<u64, FormatError> {
    if offset < previous_end {
        return Err(FormatError::ExtentOutOfOrder {
            path: path.to_owned(),
            offset,
            previous_end,
        });
    }
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(end),
        _ => Err(FormatError::ExtentPastEnd {
            path: path.to_owned(),
            offset,
            len: len as u64,
            size,
        }),
    }
}

/// Whether `data` is all zeros.
pub(crate) fn is_zero(data: &[u8]) -> bool {
    // OR-folding fixed-size chunks vectorises well and still stops early.
    data.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Calls `f(offset, run)` for each maximal run of `data` (which belongs at
/// `offset`) that is not zero, judged in pieces of `align` bytes aligned to
/// multiples of `align` within the disk. Writers use it to keep files sparse.
fn for_each_nonzero_run(
    offset: u64,
    data: &[u8],
    align: u64,
    mut f: impl FnMut(u64, &[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let mut run_start: Option<usize> = None;
    let mut i = 0usize;
    while i < data.len() {
        let pos = offset + i as u64;
        let next_boundary = (pos / align).saturating_add(1).saturating_mul(align);
        let piece_end = (next_boundary - offset).min(data.len() as u64) as usize;
        let zero = is_zero(&data[i..piece_end]);
        match (zero, run_start) {
            (false, None) => run_start = Some(i),
            (true, Some(s)) => {
                f(offset + s as u64, &data[s..i])?;
                run_start = None;
            }
            _ => {}
        }
        i = piece_end;
    }
    if let Some(s) = run_start {
        f(offset + s as u64, &data[s..])?;
    }
    Ok(())
}
