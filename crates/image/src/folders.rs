//! Which folders are vstream's, and which files in them vstream wrote.
//!
//! vstream deletes only inside folders it made. A store's folder (the data
//! folder, or a named store's folder) carries a marker file, [`MARKER`],
//! naming its store. A folder becomes a store's folder only if it does not
//! exist yet, is empty, or already carries that store's marker (or, for a
//! store held before markers existed, holds nothing but vstream's own
//! layout). It may not overlap (equal, contain or lie inside) the data
//! folder or another store's folder, and `/` is never one.
//!
//! Inside `tmp/`, only names vstream gives its own work files are removed
//! ([`is_own_tmp_entry`]); anything else found there stays.

use std::fs;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::ImageError;
use crate::layer::sync_dir;

/// The marker file in every store folder vstream made or took.
pub const MARKER: &str = ".vstream-store";

/// The entries vstream makes in a store folder: a folder holding nothing
/// else (and at least `vdisks/`) is taken as one made before markers.
const LAYOUT: [&str; 5] = ["vdisks", "cache", "tmp", "replication", "boot"];

#[derive(Serialize, Deserialize)]
struct Marker {
    store: String,
}

/// The store named by the marker in `dir`, if it has one.
pub fn marker_of(dir: &Path) -> Result<Option<String>, ImageError> {
    let path = dir.join(MARKER);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(ImageError::Invalid(format!(
                "cannot read {}: {e}",
                path.display()
            )))
        }
    };
    let marker: Marker = toml::from_str(&text).map_err(|e| {
        ImageError::Invalid(format!(
            "{} is not a vstream marker file: {}",
            path.display(),
            e.message()
        ))
    })?;
    Ok(Some(marker.store))
}

/// Writes the marker naming `store` into `dir` (which exists), durably.
fn write_marker(dir: &Path, store: &str) -> Result<(), ImageError> {
    let path = dir.join(MARKER);
    let werr = |source| ImageError::Write {
        path: path.clone(),
        source,
    };
    let body = toml::to_string(&Marker {
        store: store.to_owned(),
    })
    .map_err(|e| ImageError::Invalid(e.to_string()))?;
    let mut f = fs::File::create(&path).map_err(werr)?;
    f.write_all(
        b"# This folder is a vstream store. vstream deletes in it only what it wrote.\n\
          # Keep this file: without it, vstream will not take the folder again.\n",
    )
    .map_err(werr)?;
    f.write_all(body.as_bytes()).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    sync_dir(dir).map_err(werr)?;
    Ok(())
}

/// `path` made absolute, with the symbolic links of the part that exists
/// resolved, so that two spellings of one folder compare equal.
pub fn resolve(path: &Path) -> PathBuf {
    let absolute = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut head = absolute.clone();
    let mut tail = Vec::new();
    loop {
        if let Ok(real) = fs::canonicalize(&head) {
            let mut out = real;
            out.extend(tail.iter().rev());
            return out;
        }
        match (head.file_name(), head.parent()) {
            (Some(name), Some(parent)) => {
                tail.push(name.to_owned());
                head = parent.to_owned();
            }
            _ => return absolute,
        }
    }
}

/// How `a` lies against `b`, if they overlap.
fn overlap(a: &Path, b: &Path) -> Option<&'static str> {
    if a == b {
        Some("is")
    } else if a.starts_with(b) {
        Some("is inside")
    } else if b.starts_with(a) {
        Some("contains")
    } else {
        None
    }
}

/// Refuses a store path that is not absolute, has a `..`, is `/`, or
/// overlaps one of `others` (each with what it is, for the message).
pub fn check_store_path(path: &Path, others: &[(String, PathBuf)]) -> Result<(), ImageError> {
    if !path.is_absolute() {
        return Err(ImageError::Invalid(format!(
            "a store's path is absolute: {}",
            path.display()
        )));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(ImageError::Invalid(format!(
            "a store's path has no \"..\": {}",
            path.display()
        )));
    }
    let real = resolve(path);
    if real.parent().is_none() {
        return Err(ImageError::Invalid(format!(
            "{} is the root of the file system, not a store folder; name a folder of its own",
            path.display()
        )));
    }
    for (what, other) in others {
        if let Some(how) = overlap(&real, &resolve(other)) {
            return Err(ImageError::Invalid(format!(
                "{} {how} {what} ({}): a store's folder overlaps no other store and not the data folder",
                path.display(),
                other.display()
            )));
        }
    }
    Ok(())
}

/// Refuses `path` as store `store`'s folder unless it does not exist, is
/// empty, carries `store`'s marker, or holds only vstream's layout.
pub fn check_store_folder(store: &str, path: &Path) -> Result<(), ImageError> {
    let entries = match fs::read_dir(path) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(ImageError::Invalid(format!(
                "cannot read folder {}: {e}",
                path.display()
            )))
        }
    };
    let mut names = Vec::new();
    for e in entries {
        let e = e.map_err(|e| {
            ImageError::Invalid(format!("cannot read folder {}: {e}", path.display()))
        })?;
        names.push(e.file_name().to_string_lossy().into_owned());
    }
    if names.is_empty() {
        return Ok(());
    }
    if names.iter().any(|n| n == MARKER) {
        return match marker_of(path)? {
            Some(s) if s == store => Ok(()),
            Some(other) => Err(ImageError::Invalid(format!(
                "{} is the folder of store {other:?} (its {MARKER} says so), not of store {store:?}",
                path.display()
            ))),
            None => Ok(()),
        };
    }
    let legacy = names.iter().all(|n| LAYOUT.contains(&n.as_str())) && path.join("vdisks").is_dir();
    if legacy {
        return Ok(());
    }
    names.sort();
    let shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
    let more = if names.len() > 5 { ", ..." } else { "" };
    Err(ImageError::Invalid(format!(
        "{} holds files vstream did not make ({}{more}); a store's folder must be new, empty, \
         or one vstream made (with its {MARKER} file)",
        path.display(),
        shown.join(", ")
    )))
}

/// Makes `path` store `store`'s folder: creates it if needed and writes the
/// marker if it has none. Call after [`check_store_folder`].
pub fn claim(store: &str, path: &Path) -> Result<(), ImageError> {
    fs::create_dir_all(path).map_err(|source| ImageError::Write {
        path: path.to_owned(),
        source,
    })?;
    if marker_of(path)?.is_none() {
        write_marker(path, store)?;
    }
    Ok(())
}

/// True if `name` (an entry of a store's `tmp/`, a directory if `is_dir`)
/// is one vstream writes there: an import being written
/// (`import-NAME-xxxxxxxx.layer`), a discarded write cache being deleted
/// (`discarded-DEVICE-N`), a vDisk folder being committed (`dir-NAME`) or
/// one being deleted (`deleted-NAME-N`).
pub fn is_own_tmp_entry(name: &str, is_dir: bool) -> bool {
    let valid = |n: &str| crate::store::is_valid_name(n);
    let numbered = |rest: &str| {
        rest.rsplit_once('-').is_some_and(|(name, n)| {
            valid(name) && !n.is_empty() && n.chars().all(|c| c.is_ascii_digit())
        })
    };
    if !is_dir {
        if let Some(rest) = name.strip_prefix("discarded-") {
            return numbered(rest);
        }
        let Some(rest) = name
            .strip_prefix("import-")
            .and_then(|r| r.strip_suffix(".layer"))
        else {
            return false;
        };
        return rest.rsplit_once('-').is_some_and(|(vdisk, tag)| {
            valid(vdisk) && tag.len() == 8 && tag.chars().all(|c| c.is_ascii_hexdigit())
        });
    }
    if let Some(vdisk) = name.strip_prefix("dir-") {
        return valid(vdisk);
    }
    if let Some(rest) = name.strip_prefix("deleted-") {
        return numbered(rest);
    }
    false
}

/// Deletes `path` on a thread of its own, soon: freeing the blocks of a
/// large file takes the filesystem a while (an unlink of 2 GiB took 424 ms
/// on this project's test machine), which a caller on a connection's task
/// must not wait for. A failure is logged; a file left behind in a store's
/// `tmp/` is cleared at the next start ([`clear_tmp`]).
pub fn remove_later(path: PathBuf) {
    static REAPER: std::sync::OnceLock<Option<std::sync::mpsc::Sender<PathBuf>>> =
        std::sync::OnceLock::new();
    let sender = REAPER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<PathBuf>();
        let started = std::thread::Builder::new()
            .name("vstream-reaper".into())
            .spawn(move || {
                for path in rx {
                    remove_now(&path);
                }
            });
        match started {
            Ok(_) => Some(tx),
            Err(e) => {
                tracing::warn!(error = %e, "no thread for deleting files; they are deleted by their caller");
                None
            }
        }
    });
    match sender {
        Some(tx) => {
            if let Err(std::sync::mpsc::SendError(path)) = tx.send(path) {
                remove_now(&path);
            }
        }
        None => remove_now(&path),
    }
}

fn remove_now(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "could not delete a discarded file; the next start will")
        }
    }
}

/// True for a layer file name as the store makes them
/// (`v3-0a1b2c3d.layer`): no paths, not hidden.
pub fn is_layer_name(file: &str) -> bool {
    file.ends_with(".layer")
        && !file.starts_with('.')
        && file
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// True if `path` is a regular file that starts with a vstream layer
/// header (a write cache or layer file vstream wrote).
pub fn is_layer_file(path: &Path) -> bool {
    use std::io::Read;
    let Ok(meta) = fs::symlink_metadata(path) else {
        return false;
    };
    if !meta.is_file() {
        return false;
    }
    let mut header = vec![0u8; crate::layer::HEADER_LEN as usize];
    fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .is_ok()
        && crate::layer::decode_header(&header).is_ok()
}

/// Removes from `tmp` what vstream left there (see [`is_own_tmp_entry`]);
/// everything else, and every symbolic link, stays.
pub fn clear_tmp(tmp: &Path) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(kind) = e.file_type() else { continue };
        let name = e.file_name().to_string_lossy().into_owned();
        let result = if kind.is_dir() && is_own_tmp_entry(&name, true) {
            fs::remove_dir_all(e.path())
        } else if kind.is_file() && is_own_tmp_entry(&name, false) {
            fs::remove_file(e.path())
        } else {
            tracing::debug!(path = %e.path().display(), "left alone: vstream did not write it");
            continue;
        };
        if let Err(err) = result {
            tracing::warn!(path = %e.path().display(), error = %err, "could not remove a leftover");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_tmp_names() {
        assert!(is_own_tmp_entry("import-win-10-0a1b2c3d.layer", false));
        assert!(!is_own_tmp_entry("import-win-10-0a1b2c3d.layer", true));
        assert!(!is_own_tmp_entry("import-win-xyz.layer", false));
        assert!(!is_own_tmp_entry("import-.hidden-0a1b2c3d.layer", false));
        assert!(is_own_tmp_entry("dir-win10", true));
        assert!(!is_own_tmp_entry("dir-win10", false));
        assert!(is_own_tmp_entry("deleted-a-b-123", true));
        assert!(is_own_tmp_entry("discarded-pc-7-4711", false));
        assert!(!is_own_tmp_entry("discarded-pc-7-4711", true));
        assert!(!is_own_tmp_entry("discarded-pc", false));
        assert!(!is_own_tmp_entry("discarded-.x-1", false));
        assert!(!is_own_tmp_entry("deleted-ab", true));
        assert!(!is_own_tmp_entry("systemd-private-xyz", true));
        assert!(!is_own_tmp_entry(".X11-unix", true));
        assert!(!is_own_tmp_entry("notes.txt", false));
    }

    #[test]
    fn layer_files() {
        let d = tempfile::tempdir().unwrap();
        let layer = d.path().join("c.layer");
        drop(crate::Layer::create(&layer, 1 << 20).unwrap());
        assert!(is_layer_file(&layer));
        let other = d.path().join("fstab");
        fs::write(&other, vec![b'#'; 8192]).unwrap();
        assert!(!is_layer_file(&other));
        assert!(!is_layer_file(d.path()));
        assert!(!is_layer_file(&d.path().join("absent")));
        assert!(is_layer_name("v3-0a1b2c3d.layer"));
        assert!(!is_layer_name("../x.layer") && !is_layer_name(".x.layer"));
    }

    #[test]
    fn overlaps() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        let others = vec![("the data folder".to_string(), data.clone())];
        assert!(check_store_path(Path::new("/"), &others).is_err());
        assert!(check_store_path(&data, &others).is_err());
        assert!(check_store_path(&data.join("a/b"), &others).is_err());
        assert!(check_store_path(d.path(), &others).is_err());
        assert!(check_store_path(&d.path().join("data2"), &others).is_ok());
        assert!(check_store_path(&d.path().join("x/../data"), &others).is_err());
        assert!(check_store_path(Path::new("rel"), &others).is_err());
        // Another spelling of the same folder, through a symbolic link.
        fs::create_dir_all(&data).unwrap();
        std::os::unix::fs::symlink(&data, d.path().join("link")).unwrap();
        assert!(check_store_path(&d.path().join("link/s"), &others).is_err());
    }

    #[test]
    fn folder_states() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        assert!(check_store_folder("s", &p).is_ok(), "a new folder");
        fs::create_dir(&p).unwrap();
        assert!(check_store_folder("s", &p).is_ok(), "an empty folder");
        fs::write(p.join("notes.txt"), "mine").unwrap();
        let e = check_store_folder("s", &p).unwrap_err().to_string();
        assert!(e.contains("notes.txt"), "{e}");
        write_marker(&p, "s").unwrap();
        assert!(check_store_folder("s", &p).is_ok(), "its own marker");
        let e = check_store_folder("t", &p).unwrap_err().to_string();
        assert!(e.contains("store \"s\""), "{e}");
        let old = d.path().join("old");
        fs::create_dir_all(old.join("vdisks")).unwrap();
        fs::create_dir_all(old.join("tmp")).unwrap();
        assert!(
            check_store_folder("old", &old).is_ok(),
            "a store from before markers"
        );
        claim("old", &old).unwrap();
        assert_eq!(marker_of(&old).unwrap().as_deref(), Some("old"));
    }
}
