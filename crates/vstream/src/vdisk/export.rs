//! `vstream vdisk export NAME[@VERSION] FILE`: downloads a vDisk into an
//! image file.
//!
//! ```text
//!   GET /api/v1/vdisks/NAME/content --> ExtentReader (decodes as it reads)
//!       --write_extent--> ImageWriter (raw or VHD) --finish--> FILE
//! ```
//!
//! Memory stays at one frame. A FILE this command created is removed again
//! if the export fails; one that existed before is left as it is by then.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use vstream_api::extents::ExtentReader;
use vstream_image::formats::{create_writer, ExportFormat, ImageWriter};

use crate::client::Client;
use crate::output::{human_size, print, progress_bar};

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The vDisk, optionally at a version: NAME or NAME@VERSION.
    pub name: String,
    /// The image file to write (replaced if it exists).
    pub file: PathBuf,
    /// Image format: raw or vhd [default: vhd for a .vhd FILE, raw otherwise].
    #[arg(long, value_name = "raw|vhd")]
    pub format: Option<String>,
}

pub fn run(client: &Client, a: ExportArgs) -> Result<()> {
    check_vdisk_ref(&a.name)?;
    let format_name = format_name(a.format.as_deref(), &a.file);
    let format: ExportFormat = format_name
        .parse()
        .map_err(|e| anyhow!("--format {format_name:?}: {e}"))?;
    let file = a.file.display().to_string();

    let body = client.export(&a.name)?;
    let mut reader = ExtentReader::new(body)
        .with_context(|| format!("receiving the content of vDisk {}", a.name))?;
    let size = reader.virtual_size();

    let existed = a.file.symlink_metadata().is_ok();
    // The image writer's errors name the file already.
    let mut writer = create_writer(&a.file, format, size)?;
    let bar = progress_bar(size);
    let copied = copy_frames(&mut reader, writer.as_mut(), &bar, &a.name)
        .and_then(|n| Ok(writer.finish().map(|()| n)?));
    bar.finish_and_clear();
    let data_bytes = match copied {
        Ok(n) => n,
        Err(e) => {
            if !existed {
                // Best effort: the export's own error is the one to report.
                let _ = std::fs::remove_file(&a.file);
            }
            return Err(e);
        }
    };
    print(&format!(
        "exported vDisk {} ({}, {} of data) to {file} ({format})\n",
        a.name,
        human_size(size),
        human_size(data_bytes)
    ))
}

/// Copies every frame into `writer`; returns the data bytes copied.
fn copy_frames<R: std::io::Read>(
    reader: &mut ExtentReader<R>,
    writer: &mut dyn ImageWriter,
    bar: &indicatif::ProgressBar,
    name: &str,
) -> Result<u64> {
    let mut total = 0u64;
    while let Some((offset, data)) = reader
        .next_frame()
        .with_context(|| format!("receiving the content of vDisk {name}"))?
    {
        writer.write_extent(offset, data)?;
        total += data.len() as u64;
        bar.set_position(offset + data.len() as u64);
    }
    Ok(total)
}

/// The format to write: the one asked for, else `vhd` for a `.vhd` file and
/// `raw` for anything else.
fn format_name(asked: Option<&str>, file: &Path) -> String {
    match asked {
        Some(f) => f.to_ascii_lowercase(),
        None => match file.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("vhd") => "vhd".to_string(),
            _ => "raw".to_string(),
        },
    }
}

/// Checks the shape of `NAME` or `NAME@VERSION`; the whole string goes to the
/// server as one path segment, which decides what a version is.
fn check_vdisk_ref(s: &str) -> Result<()> {
    let (name, version) = match s.split_once('@') {
        Some((n, v)) => (n, Some(v)),
        None => (s, None),
    };
    if name.is_empty() {
        bail!("{s:?} names no vDisk: expected NAME or NAME@VERSION");
    }
    if let Some(v) = version {
        if v.is_empty() || v.contains('@') {
            bail!("{s:?} is not NAME@VERSION");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::api_path;

    #[test]
    fn vdisk_refs() {
        for ok in ["win10", "win10@3", "win10@2024-05-01", "a"] {
            assert!(check_vdisk_ref(ok).is_ok(), "{ok}");
        }
        for bad in ["", "@3", "win10@", "a@b@c"] {
            assert!(check_vdisk_ref(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn versions_travel_in_one_segment() {
        assert_eq!(
            api_path(&["vdisks", "win10@3", "content"]),
            "/api/v1/vdisks/win10%403/content"
        );
    }

    #[test]
    fn format_from_flag_or_extension() {
        assert_eq!(format_name(Some("VHD"), Path::new("x.img")), "vhd");
        assert_eq!(format_name(Some("raw"), Path::new("x.vhd")), "raw");
        assert_eq!(format_name(None, Path::new("/tmp/x.VHD")), "vhd");
        assert_eq!(format_name(None, Path::new("/tmp/x.img")), "raw");
        assert_eq!(format_name(None, Path::new("/dev/sdb")), "raw");
    }
}
