//! Formats read through `qemu-img`: qcow2 (and qcow), VHDX, VMDK and VDI.
//!
//! `qemu-img convert -O raw` writes the disk into a sparse scratch file (only
//! data takes space), which is then read like any raw image and deleted when
//! the source is dropped. Backing files of the image, if any, are merged in
//! by qemu-img, so the import gets the whole disk.

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::raw::RawRegions;
use super::scan::{Scanned, Scanner};
use super::{file_len, FormatError, SourceImage};

/// The program run, looked up on `PATH`.
pub(crate) const QEMU_IMG: &str = "qemu-img";

/// How much of qemu-img's error output goes into an error message.
const MAX_STDERR: usize = 2000;

/// Converts `path` (in qemu's `format`) with `qemu_img` into a scratch file
/// in `scratch_dir` and opens that as the source.
pub(crate) fn open(
    path: &Path,
    scratch_dir: &Path,
    format: &'static str,
    qemu_img: &str,
) -> Result<Box<dyn SourceImage>, FormatError> {
    let scratch = tempfile::Builder::new()
        .prefix(".vstream-import-")
        .suffix(".raw")
        .tempfile_in(scratch_dir)
        .map_err(|source| FormatError::Scratch {
            dir: scratch_dir.to_owned(),
            source,
        })?
        .into_temp_path();

    let output = Command::new(qemu_img)
        .arg("convert")
        .arg("-q")
        .args(["-f", format, "-O", "raw"])
        .arg(plain_path(path))
        .arg(plain_path(&scratch))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    let output = match output {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(FormatError::QemuImgMissing {
                path: path.to_owned(),
                format,
            })
        }
        Err(source) => {
            return Err(FormatError::QemuImgRun {
                path: path.to_owned(),
                format,
                source,
            })
        }
    };
    if !output.status.success() {
        let text = String::from_utf8_lossy(&output.stderr);
        let text = text.trim();
        let mut cut = text.len().saturating_sub(MAX_STDERR);
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        return Err(FormatError::QemuImgFailed {
            path: path.to_owned(),
            format,
            status: output.status.to_string(),
            stderr: text[cut..].to_owned(),
        });
    }

    // qemu-img may have replaced the file, so open it by name afterwards.
    let open_err = |source| FormatError::Open {
        path: scratch.to_path_buf(),
        source,
    };
    let file = File::open(&scratch).map_err(open_err)?;
    let len = file_len(&file).map_err(open_err)?;
    tracing::debug!(
        path = %path.display(),
        scratch = %scratch.display(),
        format,
        len,
        "converted image with qemu-img"
    );
    Ok(Box::new(Scanned {
        regions: RawRegions::new(file, &scratch, len),
        scanner: Scanner::default(),
        size: len,
        name: format,
        _keep: Some(scratch),
    }))
}

/// A spelling of `path` that qemu takes as a plain file name: qemu reads
/// `name:rest` (no slash before the colon) as a protocol such as `nbd:`, and
/// a leading `-` would be an option.
fn plain_path(path: &Path) -> PathBuf {
    let bytes = path.as_os_str().as_encoded_bytes();
    let has_slash_first = match bytes.iter().position(|&b| b == b'/' || b == b':') {
        Some(i) => bytes[i] == b'/',
        None => true,
    };
    if path.is_absolute() || (has_slash_first && !bytes.starts_with(b"-")) {
        path.to_owned()
    } else {
        Path::new(OsStr::new(".")).join(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths() {
        assert_eq!(plain_path(Path::new("/a/b:c")), Path::new("/a/b:c"));
        assert_eq!(plain_path(Path::new("disk.qcow2")), Path::new("disk.qcow2"));
        assert_eq!(plain_path(Path::new("dir/x:y")), Path::new("dir/x:y"));
        assert_eq!(plain_path(Path::new("nbd:host")), Path::new("./nbd:host"));
        assert_eq!(plain_path(Path::new("-x.img")), Path::new("./-x.img"));
    }
}
