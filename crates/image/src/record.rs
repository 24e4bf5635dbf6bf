//! The verification record of a vDisk: which of its layer files this server
//! has read in full and found matching their stored block hashes, and which
//! versions' content hashes those block hashes gave, each with what tells a
//! file's bytes changed without reading them (size, modification and change
//! times in ns, inode, device). Kept beside the layers, so that a restart
//! offers unchanged versions at once instead of reading them again.
//!
//! ```text
//!   DIR/vdisks/NAME/verified.json        this record (replaced by rename, synced)
//!   DIR/vdisks/NAME/.verified.json.tmp   the next one being written
//! ```
//!
//! A layer is recorded with the layers it lies on (its blocks were read
//! through them): the record holds for a version only if every layer of it
//! is recorded over exactly the layers below it there, and every file is as
//! recorded. Anything else (no record, another file, a record this code
//! cannot read) means "not checked": the version is read in full, as if the
//! record were not there. Deleting the record therefore costs one full
//! check, never correctness. It records only what this server checked
//! itself; the farm knows nothing of it.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ImageError;
use crate::layer::sync_dir;

/// The record's file name in a vDisk folder.
pub const RECORD_FILE: &str = "verified.json";
/// The file the next record is written to before it replaces the record.
const RECORD_TMP: &str = ".verified.json.tmp";
/// The record's format; another number is read as no record.
const FORMAT: u32 = 1;

/// What identifies a file's bytes without reading them. A write through the
/// file system changes the modification time or the change time (which
/// `touch` cannot set back), a replaced file has another inode, a moved
/// store another device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub dev: u64,
}

fn ns(secs: i64, nsec: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsec)
}

impl FileId {
    /// The identity of the file at `path` now.
    pub fn of(path: &Path) -> io::Result<FileId> {
        Ok(FileId::from_metadata(&fs::metadata(path)?))
    }

    /// The identity of the file `m` describes.
    pub fn from_metadata(m: &fs::Metadata) -> FileId {
        FileId {
            size: m.len(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
            ino: m.ino(),
            dev: m.dev(),
        }
    }
}

/// A layer file read in full and found matching its stored block hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub file: String,
    /// The layers it was read through, bottom first.
    pub below: Vec<String>,
    #[serde(flatten)]
    pub id: FileId,
    pub checked_unix: u64,
}

/// A version whose layers' stored block hashes gave `content_hash`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// Its layer files, bottom first.
    pub layers: Vec<String>,
    pub content_hash: String,
    pub checked_unix: u64,
}

/// The verification record of one vDisk (see the module documentation).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub format: u32,
    #[serde(default)]
    pub layers: Vec<LayerRecord>,
    #[serde(default)]
    pub versions: Vec<VersionRecord>,
}

impl Record {
    /// The record in vDisk folder `dir`. No record, or one that cannot be
    /// read or is of another format, reads as an empty one (said in the log
    /// when it exists): nothing is taken as checked.
    pub fn load(dir: &Path) -> Record {
        let path = dir.join(RECORD_FILE);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Record::default(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the verification record; its versions are checked in full");
                return Record::default();
            }
        };
        match serde_json::from_slice::<Record>(&text) {
            Ok(r) if r.format == FORMAT => r,
            Ok(r) => {
                tracing::warn!(path = %path.display(), format = r.format, "verification record of another format; its versions are checked in full");
                Record::default()
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "verification record unreadable; its versions are checked in full");
                Record::default()
            }
        }
    }

    /// Writes the record to `dir` durably: a temporary file, synced, renamed
    /// over the record, and the folder synced.
    pub fn save(&self, dir: &Path) -> Result<(), ImageError> {
        let tmp = dir.join(RECORD_TMP);
        let werr = |source| ImageError::Write {
            path: tmp.clone(),
            source,
        };
        let mut text = serde_json::to_vec_pretty(&Record {
            format: FORMAT,
            ..self.clone()
        })
        .map_err(|e| ImageError::Invalid(format!("encoding the verification record: {e}")))?;
        text.push(b'\n');
        let mut f = fs::File::create(&tmp).map_err(werr)?;
        f.write_all(&text).map_err(werr)?;
        f.sync_all().map_err(werr)?;
        drop(f);
        fs::rename(&tmp, dir.join(RECORD_FILE)).map_err(werr)?;
        sync_dir(dir).map_err(|source| ImageError::Write {
            path: dir.to_owned(),
            source,
        })?;
        Ok(())
    }

    /// The record of layer `file` if it was read through exactly `below` and
    /// is still the file `id` names.
    pub fn layer_holds(&self, file: &str, below: &[String], id: &FileId) -> bool {
        self.layers
            .iter()
            .any(|l| l.file == file && l.below == below && l.id == *id)
    }

    /// True if the version made of `layers` is recorded with `content_hash`.
    pub fn version_holds(&self, layers: &[String], content_hash: &str) -> bool {
        self.versions
            .iter()
            .any(|v| v.layers == layers && v.content_hash == content_hash)
    }

    /// Records layer `file`, read through `below`, as the file `id` names.
    pub fn set_layer(&mut self, file: &str, below: &[String], id: FileId, now: u64) {
        self.layers.retain(|l| l.file != file);
        self.layers.push(LayerRecord {
            file: file.to_owned(),
            below: below.to_vec(),
            id,
            checked_unix: now,
        });
    }

    /// Records the version made of `layers` with `content_hash`.
    pub fn set_version(&mut self, layers: &[String], content_hash: &str, now: u64) {
        self.versions.retain(|v| v.layers != layers);
        self.versions.push(VersionRecord {
            layers: layers.to_vec(),
            content_hash: content_hash.to_owned(),
            checked_unix: now,
        });
    }

    /// Forgets layers `files`, the layers read through them, and every
    /// version made with one of them.
    pub fn forget(&mut self, files: &[String]) {
        self.layers
            .retain(|l| !files.contains(&l.file) && !l.below.iter().any(|f| files.contains(f)));
        self.versions
            .retain(|v| !v.layers.iter().any(|f| files.contains(f)));
    }

    /// Drops what names a layer file the vDisk no longer has.
    pub fn prune(&mut self, referenced: &BTreeSet<String>) {
        self.layers.retain(|l| {
            referenced.contains(&l.file) && l.below.iter().all(|f| referenced.contains(f))
        });
        self.versions
            .retain(|v| v.layers.iter().all(|f| referenced.contains(f)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> FileId {
        FileId {
            size: n,
            mtime_ns: 1,
            ctime_ns: 2,
            ino: 3,
            dev: 4,
        }
    }

    #[test]
    fn a_record_holds_only_for_the_same_files_over_the_same_layers() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Record::load(dir.path()), Record::default(), "no record");
        let mut r = Record::default();
        let below = vec!["v1-00000001.layer".to_string()];
        r.set_layer("v1-00000001.layer", &[], id(1), 10);
        r.set_layer("v2-00000002.layer", &below, id(2), 10);
        let chain = vec![below[0].clone(), "v2-00000002.layer".to_string()];
        r.set_version(&chain, "ab", 10);
        r.save(dir.path()).unwrap();
        let r = Record::load(dir.path());
        assert!(r.layer_holds("v1-00000001.layer", &[], &id(1)));
        assert!(!r.layer_holds("v1-00000001.layer", &[], &id(9)), "changed");
        assert!(r.layer_holds("v2-00000002.layer", &below, &id(2)));
        assert!(
            !r.layer_holds("v2-00000002.layer", &[], &id(2)),
            "read through other layers"
        );
        assert!(r.version_holds(&chain, "ab"));
        assert!(!r.version_holds(&chain, "cd"));
        let mut f = r.clone();
        f.forget(&below);
        assert!(f.layers.is_empty() && f.versions.is_empty(), "{f:?}");
        let mut p = r.clone();
        p.prune(&["v1-00000001.layer".to_string()].into_iter().collect());
        assert_eq!(p.layers.len(), 1);
        assert!(p.versions.is_empty());
    }

    #[test]
    fn an_unreadable_record_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(RECORD_FILE), b"{ not json").unwrap();
        assert_eq!(Record::load(dir.path()), Record::default());
        fs::write(
            dir.path().join(RECORD_FILE),
            br#"{"format": 99, "layers": [], "versions": []}"#,
        )
        .unwrap();
        assert_eq!(Record::load(dir.path()), Record::default());
    }

    #[test]
    fn a_write_changes_the_identity_even_when_the_mtime_is_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, b"abc").unwrap();
        let before = FileId::of(&p).unwrap();
        let m = fs::metadata(&p).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&p, b"abd").unwrap();
        // As `touch -r` would: the old modification time set back.
        let times = [
            libc::timespec {
                tv_sec: m.atime(),
                tv_nsec: m.atime_nsec(),
            },
            libc::timespec {
                tv_sec: m.mtime(),
                tv_nsec: m.mtime_nsec(),
            },
        ];
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path and an array of two timespecs.
        let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) };
        assert_eq!(rc, 0);
        let after = FileId::of(&p).unwrap();
        assert_eq!(after.mtime_ns, before.mtime_ns);
        assert_ne!(after, before, "the change time gives it away");
    }
}
