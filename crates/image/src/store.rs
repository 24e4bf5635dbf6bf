//! A server's local store: one folder per vDisk, holding its layer files and
//! a human-readable properties file, plus the server-side write caches.
//!
//! ```text
//!   DIR/vdisks/NAME/vdisk.toml     properties (our .pvp)
//!   DIR/vdisks/NAME/base.layer     the base layer
//!   DIR/cache/DEVICE.layer         a Standard-mode device's server-side write cache
//!   DIR/tmp/                       imports in progress; emptied at start
//! ```
//!
//! Anything that appears under `vdisks/` appears whole: imports are written in
//! `tmp/` and renamed into place, and the properties file is replaced by rename.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::disk::Disk;
use crate::error::ImageError;
use crate::hash::{self, Hash};
use crate::layer::{sync_dir, Layer};

const PROPERTIES: &str = "vdisk.toml";
const BASE: &str = "base.layer";

/// The properties file of a vDisk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Properties {
    /// Format of this folder.
    pub format: u32,
    pub name: String,
    /// Virtual size in bytes.
    pub size: u64,
    pub created_unix: u64,
    /// Layer files, bottom first, relative to the vDisk folder.
    pub layers: Vec<String>,
}

/// The store folder of one server.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// An import being written; dropped without commit, it leaves nothing behind.
pub struct Staging {
    name: String,
    path: PathBuf,
    disk: Disk,
}

impl Staging {
    pub fn disk(&self) -> &Disk {
        &self.disk
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

impl Store {
    /// Opens (creating if needed) the store under `root`, and clears `tmp/`.
    pub fn open(root: &Path) -> Result<Store, ImageError> {
        for sub in ["vdisks", "cache", "tmp"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(|source| ImageError::Write {
                path: p.clone(),
                source,
            })?;
        }
        let tmp = root.join("tmp");
        if let Ok(entries) = fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let _ = if e.path().is_dir() {
                    fs::remove_dir_all(e.path())
                } else {
                    fs::remove_file(e.path())
                };
            }
        }
        Ok(Store {
            root: root.to_owned(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn vdisk_dir(&self, name: &str) -> Result<PathBuf, ImageError> {
        check_name(name)?;
        Ok(self.root.join("vdisks").join(name))
    }

    /// Names of the vDisks in the store.
    pub fn list(&self) -> Result<Vec<String>, ImageError> {
        let mut names = Vec::new();
        for e in fs::read_dir(self.root.join("vdisks"))? {
            let e = e?;
            if e.path().join(PROPERTIES).is_file() {
                names.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    pub fn exists(&self, name: &str) -> bool {
        self.vdisk_dir(name)
            .map(|d| d.join(PROPERTIES).is_file())
            .unwrap_or(false)
    }

    pub fn properties(&self, name: &str) -> Result<Properties, ImageError> {
        let path = self.vdisk_dir(name)?.join(PROPERTIES);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImageError::NoSuchVDisk(name.into()))
            }
            Err(source) => return Err(ImageError::ReadProperties { path, source }),
        };
        let props: Properties = toml::from_str(&text).map_err(|e| ImageError::BadProperties {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if props.format != 1 || props.layers.is_empty() {
            return Err(ImageError::BadProperties {
                path,
                reason: "unsupported format or no layers".into(),
            });
        }
        Ok(props)
    }

    /// Creates an empty vDisk of `size` bytes.
    pub fn create(&self, name: &str, size: u64, created_unix: u64) -> Result<(), ImageError> {
        let staging = self.begin_import(name, size)?;
        self.commit_import(staging, created_unix)?;
        Ok(())
    }

    /// Starts an import: a new layer in `tmp/` that becomes vDisk `name` on commit.
    pub fn begin_import(&self, name: &str, size: u64) -> Result<Staging, ImageError> {
        if self.exists(name) {
            return Err(ImageError::VDiskExists(name.into()));
        }
        let path = self.root.join("tmp").join(format!(
            "import-{name}-{}.layer",
            std::process::id() ^ rand_u32()
        ));
        let layer = Arc::new(Layer::create(&path, size)?);
        let disk =
            Disk::writable(vec![layer], None).map_err(|e| ImageError::Invalid(e.to_string()))?;
        Ok(Staging {
            name: name.into(),
            path,
            disk,
        })
    }

    /// Hashes the imported data, makes it durable and moves it into place.
    pub fn commit_import(&self, staging: Staging, created_unix: u64) -> Result<Hash, ImageError> {
        staging.disk.flush()?;
        let hashes = hash::hash_disk(&staging.disk)?;
        staging.disk.layers()[0].store_hashes(&hashes.touched, hashes.content, false)?;
        let dir = self.vdisk_dir(&staging.name)?;
        let tmp_dir = self.root.join("tmp").join(format!("dir-{}", staging.name));
        let werr = |path: &Path| {
            let path = path.to_owned();
            move |source| ImageError::Write { path, source }
        };
        fs::create_dir_all(&tmp_dir).map_err(werr(&tmp_dir))?;
        fs::rename(&staging.path, tmp_dir.join(BASE)).map_err(werr(&tmp_dir))?;
        let props = Properties {
            format: 1,
            name: staging.name.clone(),
            size: staging.disk.size(),
            created_unix,
            layers: vec![BASE.into()],
        };
        write_properties(&tmp_dir, &props)?;
        sync_dir(&tmp_dir).map_err(werr(&tmp_dir))?;
        if self.exists(&staging.name) {
            return Err(ImageError::VDiskExists(staging.name.clone()));
        }
        fs::rename(&tmp_dir, &dir).map_err(werr(&dir))?;
        sync_dir(&self.root.join("vdisks")).map_err(werr(&dir))?;
        Ok(hashes.content)
    }

    /// Opens the layers of vDisk `name`, bottom first; the top one writable if asked.
    pub fn open_layers(
        &self,
        name: &str,
        writable_top: bool,
    ) -> Result<Vec<Arc<Layer>>, ImageError> {
        let props = self.properties(name)?;
        let dir = self.vdisk_dir(name)?;
        let n = props.layers.len();
        let mut layers = Vec::with_capacity(n);
        for (i, file) in props.layers.iter().enumerate() {
            let layer = Layer::open(&dir.join(file), writable_top && i + 1 == n)?;
            if layer.size() != props.size {
                return Err(ImageError::SizeMismatch {
                    path: dir.join(file),
                    found: layer.size(),
                    expected: props.size,
                });
            }
            layers.push(Arc::new(layer));
        }
        Ok(layers)
    }

    /// Removes vDisk `name` and its layer files.
    pub fn delete(&self, name: &str) -> Result<(), ImageError> {
        let dir = self.vdisk_dir(name)?;
        if !dir.exists() {
            return Err(ImageError::NoSuchVDisk(name.into()));
        }
        // Rename first so that a crash never leaves a half-deleted vDisk in place.
        let trash = self
            .root
            .join("tmp")
            .join(format!("deleted-{name}-{}", rand_u32()));
        fs::rename(&dir, &trash).map_err(|source| ImageError::Write {
            path: dir.clone(),
            source,
        })?;
        sync_dir(&self.root.join("vdisks"))?;
        fs::remove_dir_all(&trash)?;
        Ok(())
    }

    pub fn cache_path(&self, device: &str) -> Result<PathBuf, ImageError> {
        check_name(device)?;
        Ok(self.root.join("cache").join(format!("{device}.layer")))
    }

    /// Opens device `device`'s server-side write cache, creating it if absent or
    /// if it was made for a disk of another size.
    pub fn open_cache(&self, device: &str, size: u64) -> Result<Arc<Layer>, ImageError> {
        let path = self.cache_path(device)?;
        if path.exists() {
            match Layer::open(&path, true) {
                Ok(l) if l.size() == size => return Ok(Arc::new(l)),
                Ok(_) | Err(_) => {
                    tracing::warn!(path = %path.display(), "discarding a write cache that does not fit its vDisk");
                    fs::remove_file(&path)?;
                }
            }
        }
        Ok(Arc::new(Layer::create(&path, size)?))
    }

    /// Deletes device `device`'s write cache, if any.
    pub fn discard_cache(&self, device: &str) -> Result<(), ImageError> {
        match fs::remove_file(self.cache_path(device)?) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

fn write_properties(dir: &Path, props: &Properties) -> Result<(), ImageError> {
    let text = toml::to_string_pretty(props).map_err(|e| ImageError::Invalid(e.to_string()))?;
    let tmp = dir.join(".vdisk.toml.tmp");
    let werr = |source| ImageError::Write {
        path: tmp.clone(),
        source,
    };
    let mut f = fs::File::create(&tmp).map_err(werr)?;
    f.write_all(
        b"# vstream vDisk properties. Written by vstream; read freely, edit with the CLI.\n",
    )
    .map_err(werr)?;
    f.write_all(text.as_bytes()).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    fs::rename(&tmp, dir.join(PROPERTIES)).map_err(werr)?;
    Ok(())
}

/// Refuses names that could escape the store folder.
fn check_name(name: &str) -> Result<(), ImageError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ImageError::Invalid(format!("{name:?} is not a valid name")))
    }
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.subsec_nanos() ^ (t.as_secs() as u32).rotate_left(7)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_import_open_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.create("empty", 1 << 20, 1).unwrap();
        assert!(matches!(
            store.create("empty", 1 << 20, 1),
            Err(ImageError::VDiskExists(_))
        ));
        let staging = store.begin_import("data", 1 << 20).unwrap();
        staging.disk().write(&[9u8; 5000], 100_000, false).unwrap();
        let h = store.commit_import(staging, 2).unwrap();
        assert_ne!(h, hash::zero_content_hash(1 << 20));
        assert_eq!(
            store.list().unwrap(),
            vec!["data".to_string(), "empty".to_string()]
        );
        let layers = store.open_layers("data", false).unwrap();
        assert_eq!(layers[0].content_hash(), Some(h));
        let mut b = [0u8; 5000];
        Disk::read_only(layers)
            .read(&mut b, 100_000, false)
            .unwrap();
        assert_eq!(b, [9u8; 5000]);
        store.delete("data").unwrap();
        assert!(!store.exists("data"));
        assert!(matches!(
            store.properties("data"),
            Err(ImageError::NoSuchVDisk(_))
        ));
        assert!(store.properties("../etc").is_err());
    }

    #[test]
    fn abandoned_import_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        drop(store.begin_import("x", 1 << 20).unwrap());
        assert!(!store.exists("x"));
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn caches_come_and_go() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let c = store.open_cache("dev1", 1 << 20).unwrap();
        c.set_allocated(0, 1);
        c.flush().unwrap();
        drop(c);
        assert_eq!(
            store
                .open_cache("dev1", 1 << 20)
                .unwrap()
                .allocated_chunks(),
            1
        );
        assert_eq!(
            store
                .open_cache("dev1", 2 << 20)
                .unwrap()
                .allocated_chunks(),
            0
        );
        store.discard_cache("dev1").unwrap();
        store.discard_cache("dev1").unwrap();
        assert!(!store.cache_path("dev1").unwrap().exists());
    }
}
