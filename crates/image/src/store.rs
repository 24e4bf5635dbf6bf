//! A server's local store: one folder per vDisk, holding its layer files and
//! a human-readable properties file, plus the server-side write caches.
//!
//! ```text
//!   DIR/vdisks/NAME/vdisk.toml        properties and versions (our .pvp)
//!   DIR/vdisks/NAME/v1-1a2b3c4d.layer one file per layer
//!   DIR/vdisks/NAME/verified.json     what this server checked of them (see `record`)
//!   DIR/cache/DEVICE.layer            a Standard-mode device's server-side write cache
//!   DIR/tmp/                          imports in progress; vstream's leftovers removed at start
//!   DIR/.vstream-store                the marker: this folder is vstream's
//!   DIR/replication/                  layers being received from peers
//! ```
//!
//! DIR is the server's data folder for the default store. A named store
//! (an "area" here) is another such folder, elsewhere (another disk), with
//! its own `vdisks/`, `tmp/` and `replication/`, so that every rename stays
//! within one filesystem; each vDisk lives in exactly one of them, and the
//! store finds it by name.
//!
//! The properties file is the one truth about versions. Every operation first
//! makes its new files durable, then replaces the properties file by rename,
//! then removes the files nothing references any more. A crash therefore
//! leaves the old state or the new one; leftovers are removed at the next open.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock};
use vstream_model::DEFAULT_STORE;

use crate::disk::{ChainIndex, Disk};
use crate::error::{ImageError, WriteError};
use crate::folders;
use crate::hash::{self, Hash};
use crate::layer::{next_allocated, size_text, sync_dir, Layer, CHUNK, MAX_NEW_SIZE};
use crate::record::{FileId, Record};
use crate::versions::{Properties, Version, VersionState};

const PROPERTIES: &str = "vdisk.toml";

/// The store folder of one server. Clones share the open layers.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// Layer files open now, by path: every user of a layer shares one object,
    /// so that its in-memory allocation bitmap is the same for all.
    open: Arc<Mutex<HashMap<PathBuf, Weak<Layer>>>>,
    /// Serialises the version operations.
    ops: Arc<Mutex<()>>,
    /// Chain indexes in use, by the sealed layer files they cover.
    indexes: Arc<Mutex<HashMap<Vec<PathBuf>, Weak<ChainIndex>>>>,
    /// The named stores this server holds, and which vDisk lives in which.
    areas: Arc<RwLock<Areas>>,
    /// Layer files this process read in full and found matching their
    /// hashes, by path: the file as it was then, and the layers read through.
    read: Arc<Mutex<HashMap<PathBuf, ReadLayer>>>,
    /// Serialises the updates of the verification records.
    records: Arc<Mutex<()>>,
    /// Properties files as last parsed, by path, with the identity of the
    /// file then: a read that finds the same file (inode, size, times)
    /// takes the parse instead of reading and parsing it again. Each
    /// device session reads its vDisk's properties several times.
    parsed: Arc<Mutex<HashMap<PathBuf, (FileId, Properties)>>>,
}

/// A layer file as it was when this process read it in full: its identity,
/// and the layers read through.
type ReadLayer = (FileId, Vec<String>);

/// What [`Store::check`] takes as checked without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// The layers this process read in full since their files last changed.
    Read,
    /// Those, and the layers whose verification record holds.
    Recorded,
}

/// What [`Store::check`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Layers read in full now.
    pub read: Vec<String>,
    /// Layers taken from the verification record: not read by this process.
    pub recorded: Vec<String>,
}

#[derive(Debug, Default)]
struct Areas {
    /// Named store -> its folder on this server.
    roots: HashMap<String, PathBuf>,
    /// vDisk -> the named store it lives in (absent: the default store).
    placement: HashMap<String, String>,
}

/// Creates the folders of a store root and removes from its `tmp/` what
/// vstream left there (nothing else: see [`folders::clear_tmp`]).
fn prepare_root(root: &Path) -> Result<(), ImageError> {
    for sub in ["vdisks", "cache", "tmp", "replication"] {
        let p = root.join(sub);
        fs::create_dir_all(&p).map_err(|source| ImageError::Write {
            path: p.clone(),
            source,
        })?;
    }
    folders::clear_tmp(&root.join("tmp"));
    Ok(())
}

/// The vDisks in `root/vdisks`.
fn list_root(root: &Path) -> Result<Vec<String>, ImageError> {
    let mut names = Vec::new();
    for e in fs::read_dir(root.join("vdisks"))? {
        let e = e?;
        if e.path().join(PROPERTIES).is_file() {
            names.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    Ok(names)
}

/// A version opened for reading (and writing, if its top layer is unsealed).
pub struct Chain {
    pub version: Version,
    pub layers: Vec<Arc<Layer>>,
    /// Owners of the chunks of the sealed layers, for chains of 3 or more.
    pub index: Option<Arc<ChainIndex>>,
}

impl Chain {
    /// True if the top layer takes writes (a maintenance version, or an
    /// unsealed production version in Private mode).
    pub fn is_writable(&self) -> bool {
        !self.version.is_sealed()
    }

    fn indexed(&self, disk: Disk) -> Disk {
        match &self.index {
            Some(i) => disk.with_index(i.clone()),
            None => disk,
        }
    }

    /// The version, read-only.
    pub fn read_only(self) -> Disk {
        let disk = Disk::read_only(self.layers.clone());
        self.indexed(disk)
    }

    /// The version with writes going to its own (unsealed) top layer.
    pub fn writable(self) -> Result<Disk, WriteError> {
        let disk = Disk::writable(self.layers.clone(), None)?;
        Ok(self.indexed(disk))
    }

    /// The version, read-only, under `cache`, which takes the writes.
    pub fn under_cache(self, cache: Arc<Layer>, limit: Option<u64>) -> Result<Disk, WriteError> {
        let mut stack = self.layers.clone();
        stack.push(cache);
        let disk = Disk::writable(stack, limit)?;
        Ok(self.indexed(disk))
    }
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

/// Aborts the process at a named step when `VSTREAM_CRASH_AT` names it: the
/// crash-injection tests use it to stop an operation at each of its steps.
///
/// A test hook: compiled into debug builds only (the tests run those). A
/// release build has no trace of it and ignores the variable.
pub fn crash_point(step: &str) {
    #[cfg(debug_assertions)]
    {
        static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        if AT
            .get_or_init(|| std::env::var("VSTREAM_CRASH_AT").ok())
            .as_deref()
            == Some(step)
        {
            eprintln!("crash injected at {step}");
            std::process::abort();
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = step;
}

impl Store {
    /// Opens (creating if needed) the store under `root`, the data folder,
    /// marking it as vstream's, and clears what vstream left in `tmp/`. A
    /// named store's folder is refused.
    pub fn open(root: &Path) -> Result<Store, ImageError> {
        if let Some(store) = folders::marker_of(root)?.filter(|s| s != DEFAULT_STORE) {
            return Err(ImageError::Invalid(format!(
                "{} is the folder of store {store:?}, not a data folder",
                root.display()
            )));
        }
        folders::claim(DEFAULT_STORE, root)?;
        prepare_root(root)?;
        let store = Store {
            root: root.to_owned(),
            open: Arc::default(),
            ops: Arc::default(),
            indexes: Arc::default(),
            areas: Arc::default(),
            read: Arc::default(),
            records: Arc::default(),
            parsed: Arc::default(),
        };
        for name in store.list()? {
            if let Err(e) = store.collect_garbage(&name) {
                tracing::warn!(vdisk = %name, error = %e, "could not tidy the vDisk folder");
            }
        }
        Ok(store)
    }

    /// The data folder: the default store's root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Holds the named store `store` at `root` from now on (creating its
    /// folders, clearing what vstream left in its `tmp/`); the vDisks
    /// already there are found. True if it was not held before. A store
    /// already held at another folder is an error: vDisks do not move. So
    /// is a folder vstream did not make, or one that overlaps the data
    /// folder or another store's (see [`folders`]).
    pub fn add_area(&self, store: &str, root: &Path) -> Result<bool, ImageError> {
        check_name(store)?;
        if store == DEFAULT_STORE {
            return Err(ImageError::Invalid(format!(
                "{DEFAULT_STORE:?} is the data folder's own store"
            )));
        }
        if let Some(at) = self.areas.read().roots.get(store) {
            if at == root {
                return Ok(false);
            }
            return Err(ImageError::Invalid(format!(
                "store {store} is at {} on this server already, not {}",
                at.display(),
                root.display()
            )));
        }
        let others: Vec<(String, PathBuf)> = {
            let areas = self.areas.read();
            std::iter::once(("the data folder".to_owned(), self.root.clone()))
                .chain(
                    areas
                        .roots
                        .iter()
                        .filter(|(name, _)| name.as_str() != store)
                        .map(|(name, p)| (format!("the folder of store {name}"), p.clone())),
                )
                .collect()
        };
        folders::check_store_path(root, &others)?;
        folders::check_store_folder(store, root)?;
        folders::claim(store, root)?;
        prepare_root(root)?;
        let found = list_root(root)?;
        {
            let mut areas = self.areas.write();
            areas.roots.insert(store.to_owned(), root.to_owned());
            for name in &found {
                areas.placement.insert(name.clone(), store.to_owned());
            }
        }
        for name in found {
            if let Err(e) = self.collect_garbage(&name) {
                tracing::warn!(vdisk = %name, error = %e, "could not tidy the vDisk folder");
            }
        }
        Ok(true)
    }

    /// The named stores held here, with their folders.
    pub fn areas(&self) -> Vec<(String, PathBuf)> {
        let mut v: Vec<_> = self
            .areas
            .read()
            .roots
            .iter()
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect();
        v.sort();
        v
    }

    /// Says vDisk `name` lives in `store`, before it is made (imported,
    /// created, replicated here). A vDisk already in another store stays
    /// there (an error); a store not held here is an error too.
    pub fn place(&self, name: &str, store: &str) -> Result<(), ImageError> {
        check_name(name)?;
        let now = self.store_of(name);
        if now == store {
            return Ok(());
        }
        if self.exists(name) {
            return Err(ImageError::Invalid(format!(
                "vDisk {name} is in store {now} on this server, not {store}"
            )));
        }
        let mut areas = self.areas.write();
        if store == DEFAULT_STORE {
            areas.placement.remove(name);
        } else if areas.roots.contains_key(store) {
            areas.placement.insert(name.to_owned(), store.to_owned());
        } else {
            return Err(ImageError::Invalid(format!(
                "store {store} is not available on this server"
            )));
        }
        Ok(())
    }

    /// The store vDisk `name` lives in.
    pub fn store_of(&self, name: &str) -> String {
        self.areas
            .read()
            .placement
            .get(name)
            .cloned()
            .unwrap_or_else(|| DEFAULT_STORE.to_owned())
    }

    /// The root of the store vDisk `name` lives in.
    pub fn root_of(&self, name: &str) -> PathBuf {
        let areas = self.areas.read();
        areas
            .placement
            .get(name)
            .and_then(|s| areas.roots.get(s))
            .cloned()
            .unwrap_or_else(|| self.root.clone())
    }

    fn vdisk_dir(&self, name: &str) -> Result<PathBuf, ImageError> {
        check_name(name)?;
        Ok(self.root_of(name).join("vdisks").join(name))
    }

    /// The folder of every store held here: the data folder's first.
    pub fn roots(&self) -> Vec<PathBuf> {
        let mut v = vec![self.root.clone()];
        v.extend(self.areas.read().roots.values().cloned());
        v
    }

    /// Names of the vDisks in every store held here.
    pub fn list(&self) -> Result<Vec<String>, ImageError> {
        let mut names = Vec::new();
        for r in self.roots() {
            names.extend(list_root(&r)?);
        }
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// True if vDisk `name` is here, in its store.
    pub fn exists(&self, name: &str) -> bool {
        self.vdisk_dir(name)
            .map(|d| d.join(PROPERTIES).is_file())
            .unwrap_or(false)
    }

    /// The properties (and versions) of vDisk `name`.
    pub fn properties(&self, name: &str) -> Result<Properties, ImageError> {
        use std::io::Read;
        let path = self.vdisk_dir(name)?.join(PROPERTIES);
        let mut file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImageError::NoSuchVDisk(name.into()))
            }
            Err(source) => return Err(ImageError::ReadProperties { path, source }),
        };
        let id = match file.metadata() {
            Ok(m) => FileId::from_metadata(&m),
            Err(source) => return Err(ImageError::ReadProperties { path, source }),
        };
        if let Some((seen, props)) = self.parsed.lock().get(&path) {
            if *seen == id {
                return Ok(props.clone());
            }
        }
        let mut text = String::new();
        if let Err(source) = file.read_to_string(&mut text) {
            return Err(ImageError::ReadProperties { path, source });
        }
        let bad = |reason: String| ImageError::BadProperties {
            path: path.clone(),
            reason,
        };
        let props: Properties = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        props.check().map_err(bad)?;
        self.parsed.lock().insert(path, (id, props.clone()));
        Ok(props)
    }

    fn save(&self, props: &Properties) -> Result<(), ImageError> {
        props.check().map_err(ImageError::Invalid)?;
        let dir = self.vdisk_dir(&props.name)?;
        let written = write_properties(&dir, props);
        // A later save in the same tick of the file system's clock could
        // leave a file of the same size and times on this one's freed
        // inode: no parse outlives the file it was made from.
        self.parsed.lock().remove(&dir.join(PROPERTIES));
        written?;
        sync_dir(&dir)?;
        Ok(())
    }

    /// Removes layer files of `name` that no version references, and the
    /// boot sets of versions no longer live.
    fn collect_garbage(&self, name: &str) -> Result<(), ImageError> {
        let props = self.properties(name)?;
        let keep = props.referenced_files();
        let dir = self.vdisk_dir(name)?;
        for e in fs::read_dir(&dir)?.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            let stale_layer = file.ends_with(".layer") && !keep.contains(&file);
            // The boot set of a version deleted or merged away.
            let stale_set = crate::bootset::boot_set_version(&file)
                .is_some_and(|n| !props.version(n).is_some_and(|v| v.is_live()));
            if stale_layer || stale_set || file.starts_with(".tmp") {
                // Devices still reading it keep their open descriptor.
                fs::remove_file(e.path())?;
                self.open.lock().remove(&e.path());
            }
        }
        sync_dir(&dir)?;
        Ok(())
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
        if size > MAX_NEW_SIZE {
            return Err(ImageError::Invalid(format!(
                "a vDisk size must be at most {}, not {}",
                size_text(MAX_NEW_SIZE),
                size_text(size)
            )));
        }
        let path = self
            .root_of(name)
            .join("tmp")
            .join(format!("import-{name}-{:08x}.layer", rand_u32()));
        let layer = Arc::new(Layer::create(&path, size)?);
        let disk =
            Disk::writable(vec![layer], None).map_err(|e| ImageError::Invalid(e.to_string()))?;
        Ok(Staging {
            name: name.into(),
            path,
            disk,
        })
    }

    /// Hashes the imported data, makes it durable and moves it into place as
    /// version 1, in production, not sealed (Private mode may write it).
    pub fn commit_import(&self, staging: Staging, created_unix: u64) -> Result<Hash, ImageError> {
        staging.disk.flush()?;
        let hashes = hash::hash_disk(&staging.disk)?;
        staging.disk.layers()[0].store_hashes(&hashes, false)?;
        let dir = self.vdisk_dir(&staging.name)?;
        let root = self.root_of(&staging.name);
        let tmp_dir = root.join("tmp").join(format!("dir-{}", staging.name));
        let werr = |path: &Path| {
            let path = path.to_owned();
            move |source| ImageError::Write { path, source }
        };
        fs::create_dir_all(&tmp_dir).map_err(werr(&tmp_dir))?;
        let file = layer_file_name("v1");
        fs::rename(&staging.path, tmp_dir.join(&file)).map_err(werr(&tmp_dir))?;
        let props = Properties {
            format: 2,
            name: staging.name.clone(),
            size: staging.disk.size(),
            created_unix,
            last_number: 1,
            versions: vec![Version {
                number: 1,
                state: VersionState::Production,
                layers: vec![file],
                created_unix,
                sealed_unix: None,
                content_hash: Some(hash::to_hex(&hashes.content)),
                boot_set_cleared_unix: None,
            }],
        };
        write_properties(&tmp_dir, &props)?;
        sync_dir(&tmp_dir).map_err(werr(&tmp_dir))?;
        if self.exists(&staging.name) {
            return Err(ImageError::VDiskExists(staging.name.clone()));
        }
        fs::rename(&tmp_dir, &dir).map_err(werr(&dir))?;
        sync_dir(&root.join("vdisks")).map_err(werr(&dir))?;
        Ok(hashes.content)
    }

    /// Opens one layer file of `name`, shared with every other user of it.
    fn layer(
        &self,
        name: &str,
        file: &str,
        size: u64,
        writable: bool,
    ) -> Result<Arc<Layer>, ImageError> {
        let path = self.vdisk_dir(name)?.join(file);
        let mut open = self.open.lock();
        if let Some(l) = open.get(&path).and_then(Weak::upgrade) {
            if l.is_writable() || !writable {
                return Ok(l);
            }
        }
        let layer = Layer::open(&path, writable)?;
        if layer.size() != size {
            return Err(ImageError::SizeMismatch {
                path,
                found: layer.size(),
                expected: size,
            });
        }
        let layer = Arc::new(layer);
        open.insert(path, Arc::downgrade(&layer));
        Ok(layer)
    }

    /// The content hash recorded with version `v`'s own layer, if its hashes
    /// are current: from the layer if it is open, else from its file's header
    /// alone. Costs the same for any size: nothing is opened or read in
    /// proportion to it (the status published every second asks this).
    pub fn recorded_hash(&self, name: &str, v: &Version) -> Result<Option<Hash>, ImageError> {
        let Some(file) = v.own_layer() else {
            return Ok(None);
        };
        let path = self.layer_path(name, file)?;
        let open = self.open.lock().get(&path).and_then(Weak::upgrade);
        match open {
            Some(layer) => Ok(layer.content_hash()),
            None => Layer::recorded_content_hash(&path),
        }
    }

    /// Checks version `number` of vDisk `name` as a replica (see [`verify_layers`]).
    pub fn verify(&self, name: &str, number: u32, expected: &str) -> Result<(), ImageError> {
        let chain = self.chain(name, number)?;
        verify_layers(&chain.layers, expected).map_err(|e| name_version(e, name, number))
    }

    /// True if version `number` of vDisk `name` is in its verification
    /// record with content hash `expected`, and every layer file of it is as
    /// recorded, over the same layers: it was checked, and has not changed
    /// since. Reads the record and the files' metadata, nothing else.
    pub fn is_recorded(&self, name: &str, number: u32, expected: &str) -> Result<bool, ImageError> {
        let props = self.properties(name)?;
        let Some(version) = props.version(number).filter(|v| v.is_live()) else {
            return Ok(false);
        };
        if version
            .content_hash
            .as_deref()
            .is_some_and(|h| version.is_sealed() && h != expected)
        {
            return Ok(false);
        }
        let dir = self.vdisk_dir(name)?;
        let record = Record::load(&dir);
        if !record.version_holds(&version.layers, expected) {
            return Ok(false);
        }
        for (i, file) in version.layers.iter().enumerate() {
            let Ok(id) = FileId::of(&dir.join(file)) else {
                return Ok(false);
            };
            if !record.layer_holds(file, &version.layers[..i], &id) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Checks version `number` of vDisk `name` as [`Store::verify`] does,
    /// reading only the layers `trust` does not cover (a base shared by many
    /// versions is read once), calling `pace(bytes)` after each block read;
    /// `pace` returning false stops the check (an `Interrupted` I/O error).
    /// Then records what it read, and the version, in the verification
    /// record, unless a file changed while it was read.
    pub fn check(
        &self,
        name: &str,
        number: u32,
        expected: &str,
        trust: Trust,
        pace: &mut dyn FnMut(u64) -> bool,
    ) -> Result<CheckReport, ImageError> {
        let chain = self.chain(name, number)?;
        let dir = self.vdisk_dir(name)?;
        let files = chain.version.layers.clone();
        let ids = |layers: &[Arc<Layer>]| -> Result<Vec<FileId>, ImageError> {
            layers
                .iter()
                .map(|l| {
                    l.file_id().map_err(|source| ImageError::OpenLayer {
                        path: l.path().to_owned(),
                        source,
                    })
                })
                .collect()
        };
        let before = ids(&chain.layers)?;
        let record = match trust {
            Trust::Recorded => Record::load(&dir),
            Trust::Read => Record::default(),
        };
        let mut report = CheckReport::default();
        let mut full = vec![true; files.len()];
        {
            let read = self.read.lock();
            for (i, file) in files.iter().enumerate() {
                let below = &files[..i];
                let path = chain.layers[i].path();
                if read
                    .get(path)
                    .is_some_and(|(id, b)| *id == before[i] && b == below)
                {
                    full[i] = false;
                } else if record.layer_holds(file, below, &before[i]) {
                    full[i] = false;
                    report.recorded.push(file.clone());
                } else {
                    report.read.push(file.clone());
                }
            }
        }
        verify_layers_paced(
            &chain.layers,
            expected,
            |i| {
                if full[i] {
                    LayerCheck::Full
                } else {
                    LayerCheck::Skip
                }
            },
            pace,
        )
        .map_err(|e| name_version(e, name, number))?;
        // What was read stood still while it was read: recorded.
        let after = ids(&chain.layers)?;
        let stable: Vec<bool> = before.iter().zip(&after).map(|(a, b)| a == b).collect();
        {
            let mut read = self.read.lock();
            for i in (0..files.len()).filter(|&i| full[i] && stable[i]) {
                read.insert(
                    chain.layers[i].path().to_owned(),
                    (after[i], files[..i].to_vec()),
                );
            }
        }
        let now = now_unix();
        self.update_record(name, |r| {
            for i in (0..files.len()).filter(|&i| full[i] && stable[i]) {
                r.set_layer(&files[i], &files[..i], after[i], now);
            }
            if stable.iter().all(|&s| s) {
                r.set_version(&files, expected, now);
            }
        });
        Ok(report)
    }

    /// Records version `number` of vDisk `name`, with content hash
    /// `expected`, and its layer files as they are now, as checked: for
    /// what was hashed from its data just now (an import, a seal, a replica
    /// checked as it arrived).
    pub fn record_checked(
        &self,
        name: &str,
        number: u32,
        expected: &str,
    ) -> Result<(), ImageError> {
        let props = self.properties(name)?;
        let version = props
            .version(number)
            .filter(|v| v.is_live())
            .ok_or_else(|| ImageError::Invalid(format!("vDisk {name} has no version {number}")))?;
        let dir = self.vdisk_dir(name)?;
        let files = &version.layers;
        let mut ids = Vec::with_capacity(files.len());
        for f in files {
            let path = dir.join(f);
            let id = FileId::of(&path).map_err(|source| ImageError::OpenLayer { path, source })?;
            ids.push(id);
        }
        {
            let mut read = self.read.lock();
            for (i, f) in files.iter().enumerate() {
                read.insert(dir.join(f), (ids[i], files[..i].to_vec()));
            }
        }
        let now = now_unix();
        self.update_record(name, |r| {
            for (i, f) in files.iter().enumerate() {
                r.set_layer(f, &files[..i], ids[i], now);
            }
            r.set_version(files, expected, now);
        });
        Ok(())
    }

    /// Forgets that layers `files` of vDisk `name` (and the layers read
    /// through them, and the versions made with them) were checked, here and
    /// in the verification record: they are read in full before they are
    /// offered again after a restart.
    pub fn forget_checked(&self, name: &str, files: &[String]) -> Result<(), ImageError> {
        let dir = self.vdisk_dir(name)?;
        self.read.lock().retain(|path, (_, below)| {
            let own = path.parent() == Some(dir.as_path())
                && path
                    .file_name()
                    .is_some_and(|f| files.iter().any(|x| f == x.as_str()));
            let through =
                path.parent() == Some(dir.as_path()) && below.iter().any(|b| files.contains(b));
            !own && !through
        });
        let _one = self.records.lock();
        let before = Record::load(&dir);
        let mut record = before.clone();
        record.forget(files);
        if record == before {
            return Ok(());
        }
        record.save(&dir)
    }

    /// Applies `change` to the verification record of `name` and writes it.
    /// A record that cannot be written costs a full check at the next start,
    /// nothing else: said in the log, not an error.
    fn update_record(&self, name: &str, change: impl FnOnce(&mut Record)) {
        let Ok(dir) = self.vdisk_dir(name) else {
            return;
        };
        let _one = self.records.lock();
        let mut record = Record::load(&dir);
        change(&mut record);
        if let Ok(props) = self.properties(name) {
            record.prune(&props.referenced_files());
        }
        if let Err(e) = record.save(&dir) {
            tracing::warn!(vdisk = %name, error = %e, "could not write the verification record; the vDisk is checked in full at the next start");
        }
    }

    /// The folder of vDisk `name`.
    pub fn vdisk_path(&self, name: &str) -> Result<PathBuf, ImageError> {
        self.vdisk_dir(name)
    }

    /// Where replication keeps the layers of vDisk `name` being received
    /// (in its store, kept across restarts).
    pub fn replication_dir(&self, name: &str) -> PathBuf {
        self.root_of(name).join("replication").join(name)
    }

    /// The replication folders of every store held here.
    pub fn replication_dirs(&self) -> Vec<PathBuf> {
        self.roots()
            .into_iter()
            .map(|r| r.join("replication"))
            .collect()
    }

    /// The path of layer `file` of vDisk `name` in the store.
    pub fn layer_path(&self, name: &str, file: &str) -> Result<PathBuf, ImageError> {
        check_file_name(file)?;
        Ok(self.vdisk_dir(name)?.join(file))
    }

    /// Opens layer `file` of vDisk `name` read-only, wherever it is: in the
    /// store, or (while replication assembles a version) at `path`.
    pub fn open_layer_at(&self, path: &Path, size: u64) -> Result<Arc<Layer>, ImageError> {
        let mut open = self.open.lock();
        if let Some(l) = open.get(path).and_then(Weak::upgrade) {
            return Ok(l);
        }
        let layer = Layer::open(path, false)?;
        if layer.size() != size {
            return Err(ImageError::SizeMismatch {
                path: path.to_owned(),
                found: layer.size(),
                expected: size,
            });
        }
        let layer = Arc::new(layer);
        open.insert(path.to_owned(), Arc::downgrade(&layer));
        Ok(layer)
    }

    /// Makes vDisk `name` hold exactly `versions` (creating the vDisk if it
    /// is new here): layer files it lacks are moved in from `ready`, the
    /// properties file is replaced, and files no version uses are removed.
    /// Replication uses it to follow the farm's catalog.
    pub fn follow(
        &self,
        name: &str,
        size: u64,
        created_unix: u64,
        last_number: u32,
        versions: Vec<Version>,
        ready: &Path,
    ) -> Result<(), ImageError> {
        let _ops = self.ops.lock();
        let dir = self.vdisk_dir(name)?;
        let werr = |path: &Path| {
            let path = path.to_owned();
            move |source| ImageError::Write { path, source }
        };
        let (created_unix, last_number) = match self.properties(name) {
            Ok(p) if p.size != size => {
                return Err(ImageError::Invalid(format!(
                    "vDisk {name} is {} bytes here and {size} in the farm",
                    p.size
                )))
            }
            Ok(p) => (p.created_unix, p.last_number.max(last_number)),
            Err(ImageError::NoSuchVDisk(_)) => {
                fs::create_dir_all(&dir).map_err(werr(&dir))?;
                sync_dir(&self.root_of(name).join("vdisks")).map_err(werr(&dir))?;
                (created_unix, last_number)
            }
            Err(e) => return Err(e),
        };
        for file in versions.iter().flat_map(|v| v.layers.iter()) {
            check_file_name(file)?;
            let dest = dir.join(file);
            if !dest.exists() {
                let src = ready.join(file);
                fs::rename(&src, &dest).map_err(werr(&src))?;
            }
        }
        let props = Properties {
            format: 2,
            name: name.to_owned(),
            size,
            created_unix,
            last_number,
            versions,
        };
        self.save(&props)?;
        self.collect_garbage(name)
    }

    /// Bytes of data in version `v`'s own layer, without opening the chain.
    pub fn own_bytes(&self, props: &Properties, v: &Version) -> Result<u64, ImageError> {
        let Some(file) = v.own_layer() else {
            return Ok(0);
        };
        let layer = self.layer(&props.name, file, props.size, false)?;
        Ok(layer.allocated_bytes())
    }

    /// Opens version `number` of vDisk `name`.
    pub fn chain(&self, name: &str, number: u32) -> Result<Chain, ImageError> {
        let props = self.properties(name)?;
        let version = props
            .version(number)
            .filter(|v| v.is_live())
            .ok_or_else(|| ImageError::Invalid(format!("vDisk {name} has no version {number}")))?
            .clone();
        self.open_chain(&props, version, true)
    }

    /// True if version `number` is still unsealed in the properties file
    /// while no version operation runs: a sealed top layer is then left from
    /// a seal that crashed before writing the file. (While an operation
    /// runs, it may have sealed the layer and not yet written the file.)
    fn seal_was_lost(&self, props: &Properties, number: u32) -> bool {
        let Some(_op) = self.ops.try_lock() else {
            return false;
        };
        self.properties(&props.name)
            .is_ok_and(|p| p.version(number).is_some_and(|v| !v.is_sealed()))
    }

    /// Opens the layers of `version`; with `build_index`, builds the chain
    /// index if no open chain shares it yet (costs a pass over every layer's
    /// bitmap, so one-off operations that touch little take only a cached one).
    fn open_chain(
        &self,
        props: &Properties,
        version: Version,
        build_index: bool,
    ) -> Result<Chain, ImageError> {
        let n = version.layers.len();
        let mut layers = Vec::with_capacity(n);
        for (i, file) in version.layers.iter().enumerate() {
            let top_writable = i + 1 == n && !version.is_sealed();
            let layer = self.layer(&props.name, file, props.size, top_writable)?;
            if top_writable && layer.is_sealed() && self.seal_was_lost(props, version.number) {
                // A seal whose operation never reached the properties file.
                layer.unseal()?;
            }
            layers.push(layer);
        }
        let sealed = if version.is_sealed() {
            n
        } else {
            n.saturating_sub(1)
        };
        let index = if sealed >= 3 {
            self.index(&props.name, &layers[..sealed], build_index)
        } else {
            None
        };
        Ok(Chain {
            version,
            layers,
            index,
        })
    }

    /// The shared index of sealed `layers`, built on first use if `build`.
    fn index(&self, name: &str, layers: &[Arc<Layer>], build: bool) -> Option<Arc<ChainIndex>> {
        let key: Vec<PathBuf> = layers.iter().map(|l| l.path().to_owned()).collect();
        let mut indexes = self.indexes.lock();
        if let Some(i) = indexes.get(&key).and_then(Weak::upgrade) {
            return Some(i);
        }
        if !build {
            return None;
        }
        indexes.retain(|_, w| w.strong_count() > 0);
        let index = ChainIndex::build(layers)?;
        tracing::debug!(vdisk = name, layers = layers.len(), "chain index built");
        let index = Arc::new(index);
        indexes.insert(key, Arc::downgrade(&index));
        Some(index)
    }

    /// Removes vDisk `name` and its layer files.
    pub fn delete(&self, name: &str) -> Result<(), ImageError> {
        let _op = self.ops.lock();
        let dir = self.vdisk_dir(name)?;
        if !dir.exists() {
            return Err(ImageError::NoSuchVDisk(name.into()));
        }
        // Rename first so that a crash never leaves a half-deleted vDisk in place.
        let root = self.root_of(name);
        let trash = trash_path(&root, "deleted", name);
        fs::rename(&dir, &trash).map_err(|source| ImageError::Write {
            path: dir.clone(),
            source,
        })?;
        sync_dir(&root.join("vdisks"))?;
        fs::remove_dir_all(&trash)?;
        self.open.lock().retain(|p, _| !p.starts_with(&dir));
        self.read.lock().retain(|p, _| !p.starts_with(&dir));
        self.parsed.lock().retain(|p, _| !p.starts_with(&dir));
        Ok(())
    }

    /// Seals `version`'s own layer: hashes what it holds and makes it immutable.
    fn seal(&self, props: &Properties, version: &mut Version, now: u64) -> Result<(), ImageError> {
        if version.is_sealed() {
            return Ok(());
        }
        let chain = self.open_chain(props, version.clone(), false)?;
        let mut disk = Disk::read_only(chain.layers.clone());
        if let Some(index) = chain.index.clone() {
            disk = disk.with_index(index);
        }
        disk.layers().last().map(|l| l.flush()).transpose()?;
        let top = chain
            .layers
            .last()
            .ok_or_else(|| ImageError::Invalid("a version without layers".into()))?;
        // Hashes still valid (an import no one wrote since): sealed as they are.
        if let (Some(epoch), Some(content)) = (top.quiet_epoch(), top.content_hash()) {
            crash_point("seal:hashed");
            if top.seal_as_hashed(epoch)? {
                crash_point("seal:layer-sealed");
                version.sealed_unix = Some(now);
                version.content_hash = Some(hash::to_hex(&content));
                return Ok(());
            }
        }
        let hashes = if chain.layers.len() == 1 && chain.layers[0].content_hash().is_none() {
            hash::hash_disk(&disk)?
        } else {
            hash::hash_top(&disk)?
        };
        crash_point("seal:hashed");
        let top = chain
            .layers
            .last()
            .ok_or_else(|| ImageError::Invalid("a version without layers".into()))?;
        top.store_hashes(&hashes, true)?;
        crash_point("seal:layer-sealed");
        version.sealed_unix = Some(now);
        version.content_hash = Some(hash::to_hex(&hashes.content));
        Ok(())
    }

    /// Opens a maintenance version on top of the newest version, sealing that
    /// one first if it is not sealed yet.
    pub fn new_version(&self, name: &str, now: u64) -> Result<Version, ImageError> {
        let _op = self.ops.lock();
        let mut props = self.properties(name)?;
        if let Some(m) = props.newest(VersionState::Maintenance) {
            return Err(ImageError::Invalid(format!(
                "vDisk {name} already has maintenance version {}; promote or delete it first",
                m.number
            )));
        }
        let mut base = props
            .head()
            .cloned()
            .ok_or_else(|| ImageError::Invalid(format!("vDisk {name} has no version")))?;
        self.seal(&props, &mut base, now)?;
        *props
            .version_mut(base.number)
            .ok_or_else(|| ImageError::Invalid("version vanished".into()))? = base.clone();
        let number = props.next_number();
        let file = layer_file_name(&format!("v{number}"));
        let path = self.vdisk_dir(name)?.join(&file);
        drop(Layer::create(&path, props.size)?);
        crash_point("new:layer-created");
        let mut layers = base.layers.clone();
        layers.push(file);
        let version = Version {
            number,
            state: VersionState::Maintenance,
            layers,
            created_unix: now,
            sealed_unix: None,
            content_hash: None,
            boot_set_cleared_unix: None,
        };
        props.versions.push(version.clone());
        props.last_number = number;
        self.save(&props)?;
        crash_point("new:saved");
        Ok(version)
    }

    /// Promotes maintenance or test version `number` to `to` (test or production).
    pub fn promote(
        &self,
        name: &str,
        number: u32,
        to: VersionState,
        now: u64,
    ) -> Result<Version, ImageError> {
        let _op = self.ops.lock();
        let mut props = self.properties(name)?;
        let mut version = props
            .version(number)
            .filter(|v| v.is_live())
            .ok_or_else(|| ImageError::Invalid(format!("vDisk {name} has no version {number}")))?
            .clone();
        let allowed = matches!(
            (version.state, to),
            (VersionState::Maintenance, VersionState::Test)
                | (VersionState::Maintenance, VersionState::Production)
                | (VersionState::Test, VersionState::Production)
        );
        if !allowed {
            return Err(ImageError::Invalid(format!(
                "version {number} of vDisk {name} is {}; it cannot be promoted to {to}",
                version.state
            )));
        }
        self.seal(&props, &mut version, now)?;
        version.state = to;
        *props
            .version_mut(number)
            .ok_or_else(|| ImageError::Invalid("version vanished".into()))? = version.clone();
        self.save(&props)?;
        crash_point("promote:saved");
        Ok(version)
    }

    /// Clears version `number`'s boot set: its file here goes, and the
    /// version's stamp (`boot_set_cleared_unix`, later than any before it)
    /// tells every server, through the catalog, to drop a set learned
    /// before it.
    pub fn clear_boot_set(&self, name: &str, number: u32, now: u64) -> Result<Version, ImageError> {
        let _op = self.ops.lock();
        let mut props = self.properties(name)?;
        let version = props
            .version_mut(number)
            .filter(|v| v.is_live())
            .ok_or_else(|| ImageError::Invalid(format!("vDisk {name} has no version {number}")))?;
        let stamp = now.max(version.boot_set_cleared_unix.map_or(0, |t| t + 1));
        version.boot_set_cleared_unix = Some(stamp);
        let version = version.clone();
        self.save(&props)?;
        let file = self
            .vdisk_dir(name)?
            .join(crate::bootset::boot_set_file(number));
        match fs::remove_file(&file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(version),
        }
    }

    /// Seals version `number` where it stands (an imported version 1 that
    /// no device writes), so that it can be replicated.
    pub fn seal_version(&self, name: &str, number: u32, now: u64) -> Result<Version, ImageError> {
        let _op = self.ops.lock();
        let mut props = self.properties(name)?;
        let mut version = props
            .version(number)
            .filter(|v| v.is_live() && v.state != VersionState::Maintenance)
            .ok_or_else(|| {
                ImageError::Invalid(format!("vDisk {name} has no version {number} to seal"))
            })?
            .clone();
        if version.is_sealed() {
            return Ok(version);
        }
        self.seal(&props, &mut version, now)?;
        *props
            .version_mut(number)
            .ok_or_else(|| ImageError::Invalid("version vanished".into()))? = version.clone();
        self.save(&props)?;
        Ok(version)
    }

    /// Makes the previous production version production again; the newest one
    /// goes back to test. Returns the version now in production.
    pub fn rollback(&self, name: &str) -> Result<Version, ImageError> {
        let _op = self.ops.lock();
        let mut props = self.properties(name)?;
        let newest = props.newest(VersionState::Production).map(|v| v.number);
        let previous = props
            .versions
            .iter()
            .filter(|v| {
                v.state == VersionState::Production && v.is_live() && Some(v.number) != newest
            })
            .max_by_key(|v| v.number)
            .cloned();
        let (Some(newest), Some(previous)) = (newest, previous) else {
            return Err(ImageError::Invalid(format!(
                "vDisk {name} has no earlier production version to roll back to"
            )));
        };
        if let Some(v) = props.version_mut(newest) {
            v.state = VersionState::Test;
        }
        self.save(&props)?;
        crash_point("rollback:saved");
        Ok(previous)
    }

    /// Deletes version `number`, unless another version is built on it or it
    /// is the last production version. `in_use` says whether devices use it.
    pub fn delete_version(&self, name: &str, number: u32, in_use: bool) -> Result<(), ImageError> {
        let _op = self.ops.lock();
        let mut props = self.properties(name)?;
        let version = props
            .version(number)
            .ok_or_else(|| ImageError::Invalid(format!("vDisk {name} has no version {number}")))?
            .clone();
        if in_use {
            return Err(ImageError::Invalid(format!(
                "version {number} of vDisk {name} is in use by devices"
            )));
        }
        if let Some(own) = version.own_layer() {
            if let Some(dep) = props
                .versions
                .iter()
                .find(|v| v.number != number && v.layers.iter().any(|f| f == own))
            {
                return Err(ImageError::Invalid(format!(
                    "version {} of vDisk {name} is built on version {number}; delete it or merge first",
                    dep.number
                )));
            }
        }
        props.versions.retain(|v| v.number != number);
        if props.newest(VersionState::Production).is_none() {
            return Err(ImageError::Invalid(format!(
                "version {number} is the last production version of vDisk {name}"
            )));
        }
        self.save(&props)?;
        crash_point("delete:saved");
        self.collect_garbage(name)
    }

    /// Builds one layer with the content of version `upto` (default: the newest
    /// production version) and puts it under every version built on it.
    /// Versions older than `upto` are retired, except the newest production
    /// and newest test versions, which keep their layers.
    pub fn merge(&self, name: &str, upto: Option<u32>) -> Result<Version, ImageError> {
        let _op = self.ops.lock();
        let mut props = self.properties(name)?;
        let upto = match upto {
            Some(n) => n,
            None => props
                .newest(VersionState::Production)
                .map(|v| v.number)
                .unwrap_or(0),
        };
        let target = props
            .version(upto)
            .filter(|v| v.is_live())
            .ok_or_else(|| ImageError::Invalid(format!("vDisk {name} has no version {upto}")))?
            .clone();
        if !target.is_sealed() {
            return Err(ImageError::Invalid(format!(
                "version {upto} of vDisk {name} is not sealed; promote it before merging"
            )));
        }
        if target.layers.len() == 1 {
            return Ok(target); // already one layer: nothing to merge
        }
        let expected = target.content_hash.as_deref().and_then(hash::from_hex);
        let chain = self.open_chain(&props, target.clone(), true)?;
        let file = layer_file_name(&format!("m{upto}"));
        let dir = self.vdisk_dir(name)?;
        let tmp_path = dir.join(format!(".tmp-{file}"));
        let merged = Arc::new(Layer::create(&tmp_path, props.size)?);
        copy_chain_into(&chain.layers, &merged)?;
        merged.flush()?;
        let mut touched: Vec<(u64, Hash)> = Vec::new();
        let (_, tree) = hash::stored_chain_tree(props.size, &chain.layers, true, |b, h| {
            if merged.touches_block(b) {
                touched.push((b, *h));
            }
        })?;
        let tree =
            tree.ok_or_else(|| ImageError::Invalid("the merged tree was not kept".into()))?;
        let content = tree.content(props.size);
        if expected.is_some_and(|e| e != content) {
            return Err(ImageError::Invalid(format!(
                "version {upto} of vDisk {name} does not match its recorded content hash; not merging"
            )));
        }
        merged.store_hashes(
            &hash::DiskHashes {
                touched,
                tree,
                content,
            },
            true,
        )?;
        drop(merged);
        fs::rename(&tmp_path, dir.join(&file)).map_err(|source| ImageError::Write {
            path: tmp_path.clone(),
            source,
        })?;
        sync_dir(&dir)?;
        crash_point("merge:layer-written");
        let old = target.layers.clone();
        let retired = props.retired_by_merge(upto);
        for v in props.versions.iter_mut() {
            if v.layers.starts_with(&old) {
                v.layers.splice(..old.len(), [file.clone()]);
            } else if retired.contains(&v.number) {
                v.state = VersionState::Retired;
                v.layers.clear();
            }
        }
        self.save(&props)?;
        crash_point("merge:saved");
        self.collect_garbage(name)?;
        props
            .version(upto)
            .cloned()
            .ok_or_else(|| ImageError::Invalid("version vanished".into()))
    }

    pub fn cache_path(&self, device: &str) -> Result<PathBuf, ImageError> {
        check_name(device)?;
        Ok(self.root.join("cache").join(format!("{device}.layer")))
    }

    /// Opens device `device`'s server-side write cache, creating it if absent.
    /// `base` names what the cache lies over (vDisk and version): a cache made
    /// over anything else is discarded, never laid over other content.
    /// `boot` names the device's boot the cache belongs to (`None`: none
    /// known): a cache of another boot is discarded too, for a device starts
    /// every boot clean. A cache whose boot was never recorded (made before
    /// boots were) is taken over by the boot that opens it.
    ///
    /// Both tags are the label in the cache's own header ([`Layer::label`]),
    /// so a cache is one file: a boot storm's first connections make one
    /// file per device. A cache an older server made keeps its tags in
    /// files beside it (`D.base`, and its boot on the second line or in
    /// `D.boot`), which are read when the header has none.
    pub fn open_cache(
        &self,
        device: &str,
        base: &str,
        boot: Option<&str>,
        size: u64,
    ) -> Result<Arc<Layer>, ImageError> {
        let path = self.cache_path(device)?;
        let tag = path.with_extension("base");
        let boot_tag = path.with_extension("boot");
        if path.exists() {
            let layer = Layer::open(&path, true);
            let tags = match &layer {
                Ok(l) if !l.label().is_empty() => Some(parse_label(l.label())),
                _ => tag_files(&path),
            };
            let same_base = tags.as_ref().is_some_and(|(b, _)| b == base);
            let recorded = tags.as_ref().and_then(|(_, b)| b.clone());
            let same_boot = match (boot, &recorded) {
                (Some(b), Some(r)) => b == r,
                (None, _) | (_, None) => true,
            };
            match layer {
                Ok(l) if l.size() == size && same_base && same_boot => {
                    if let (Some(b), None) = (boot, &recorded) {
                        // An older server's cache from before boots were
                        // recorded: its tags stay in its files.
                        write_synced(&boot_tag, b)?;
                    }
                    return Ok(Arc::new(l));
                }
                Ok(_) | Err(_) if !same_boot => {
                    tracing::info!(path = %path.display(), boot = boot.unwrap_or_default(), "discarding the write cache of an earlier boot");
                    self.discard_cache_file(device, &path)?;
                }
                Ok(_) | Err(_) => {
                    tracing::info!(path = %path.display(), %base, "discarding a write cache made over other content");
                    self.discard_cache_file(device, &path)?;
                }
            }
        }
        // An older server's tag files would be read again by an older server
        // (after a downgrade) beside a cache they do not describe.
        for stale in [&tag, &boot_tag] {
            match fs::remove_file(stale) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(ImageError::Write {
                        path: stale.clone(),
                        source: e,
                    })
                }
                _ => {}
            }
        }
        // The label is in the header the cache's first flush syncs (with the
        // file and its folder) before it syncs any data
        // (Layer::create_unsynced): no flush is acknowledged while a power cut
        // could still leave the cache without its label, which would discard
        // it with every write that flush covered. Before that first flush
        // nothing in the cache was promised: a cut then leaves a layer that
        // does not open or has no label, and either way it is discarded above.
        // No disk round trip while a device connects: a boot storm's hundreds
        // of caches cost no fsync each.
        let label = format_tags(base, boot.unwrap_or_default());
        Ok(Arc::new(Layer::create_unsynced(
            &path,
            size,
            label.as_bytes(),
        )?))
    }

    /// The devices with a server-side write cache in this store.
    pub fn cached_devices(&self) -> Vec<String> {
        let Ok(dir) = fs::read_dir(self.root.join("cache")) else {
            return Vec::new();
        };
        let mut out: Vec<String> = dir
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                let device = name.strip_suffix(".layer")?;
                check_name(device).ok().map(|()| device.to_owned())
            })
            .collect();
        out.sort();
        out
    }

    /// What device `device`'s write cache lies over and the boot it belongs
    /// to (as given to [`Store::open_cache`]), if it has a cache.
    pub fn cache_tags(&self, device: &str) -> Option<(String, Option<String>)> {
        let path = self.cache_path(device).ok()?;
        if !path.exists() {
            return None;
        }
        match Layer::recorded_label(&path) {
            Ok(label) if !label.is_empty() => Some(parse_label(&label)),
            _ => tag_files(&path),
        }
    }

    /// Deletes device `device`'s write cache, if any. It leaves its name at
    /// once, renamed into the store's `tmp/`, and its blocks are freed on a
    /// thread of its own ([`folders::remove_later`]): a session ends on its
    /// connection's task, and a day's cache of gigabytes takes the
    /// filesystem a while to free. A crash before that leaves it in `tmp/`,
    /// which the next start clears.
    pub fn discard_cache(&self, device: &str) -> Result<(), ImageError> {
        self.discard_cache_file(device, &self.cache_path(device)?)
    }

    /// Takes write cache `path` of `device` out of its place at once and
    /// deletes it on the reaper's thread (see [`Store::discard_cache`]);
    /// nothing there is no error.
    fn discard_cache_file(&self, device: &str, path: &Path) -> Result<(), ImageError> {
        let trash = trash_path(&self.root, "discarded", device);
        match fs::rename(path, &trash) {
            Ok(()) => {
                folders::remove_later(trash);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ImageError::Write {
                path: path.to_owned(),
                source: e,
            }),
        }
    }
}

/// A write cache's tag file: what the cache lies over, then the boot it
/// belongs to (empty if none was given), a line each.
fn format_tags(base: &str, boot: &str) -> String {
    format!("{base}\n{boot}\n")
}

/// A tag file's base and, if it records one, its boot: a file of one line
/// (made before the boot joined it) leaves the boot to the `.boot` file.
fn parse_tags(text: &str) -> (String, Option<String>) {
    let text = text.strip_suffix('\n').unwrap_or(text);
    match text.split_once('\n') {
        Some((base, boot)) => (base.trim().to_owned(), Some(boot.trim().to_owned())),
        None => (text.trim().to_owned(), None),
    }
}

/// A cache's label: its base and its boot (`None` if the label is not text).
fn parse_label(label: &[u8]) -> (String, Option<String>) {
    match std::str::from_utf8(label) {
        Ok(text) => parse_tags(text),
        Err(_) => (String::new(), None),
    }
}

/// The tags an older server kept in files beside the cache at `path`: the
/// base, and the boot on the base file's second line or in a file of its
/// own. `None` if the base file cannot be read; a boot file that cannot be
/// read records a boot no device has.
fn tag_files(path: &Path) -> Option<(String, Option<String>)> {
    let (base, boot) = parse_tags(&fs::read_to_string(path.with_extension("base")).ok()?);
    let boot = match boot {
        Some(b) => Some(b),
        None => match fs::read_to_string(path.with_extension("boot")) {
            Ok(t) => Some(t.trim().to_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(_) => Some(String::new()),
        },
    };
    Some((base, boot))
}

/// Writes `text` to the file at `path` and syncs it (not its folder).
fn write_synced(path: &Path, text: &str) -> Result<(), ImageError> {
    let werr = |source| ImageError::Write {
        path: path.to_owned(),
        source,
    };
    let mut f = fs::File::create(path).map_err(werr)?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(werr)
}

/// A new layer file name: `PREFIX-xxxxxxxx.layer`, unique within the folder.
fn layer_file_name(prefix: &str) -> String {
    format!("{prefix}-{:08x}.layer", rand_u32())
}

/// Copies every allocated chunk of the chain (as a reader sees it) into `dst`,
/// run by run, inside the kernel.
fn copy_chain_into(layers: &[Arc<Layer>], dst: &Layer) -> Result<(), ImageError> {
    let chunks = dst.chunks();
    let size = dst.size();
    let owner = |c: u64| layers.iter().rposition(|l| l.is_allocated(c));
    let mut c = 0;
    while c < chunks {
        let Some(o) = owner(c) else {
            c = next_allocated(layers, c + 1, chunks);
            continue;
        };
        let mut e = c + 1;
        while e < chunks && owner(e) == Some(o) && e - c < 2048 {
            e += 1;
        }
        let start = c * CHUNK;
        let end = (e * CHUNK).min(size);
        layers[o].copy_data_to(dst, start, end - start)?;
        dst.set_allocated(c, e);
        c = e;
    }
    Ok(())
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

/// Names the version in a content-hash mismatch.
fn name_version(e: ImageError, name: &str, number: u32) -> ImageError {
    match e {
        ImageError::Invalid(reason) => {
            ImageError::Invalid(format!("version {number} of vDisk {name}: {reason}"))
        }
        other => other,
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Checks the verification of a version made of `layers`: every layer opens,
/// the data of every block each layer holds hashes to the block hash stored
/// with it, and the block hashes give content hash `expected` (hex). Costs a
/// read of every layer's data.
pub fn verify_layers(layers: &[Arc<Layer>], expected: &str) -> Result<(), ImageError> {
    verify_layers_where(layers, expected, |_| LayerCheck::Full)
}

/// How much of a layer's data [`verify_layers_where`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCheck {
    /// Every block it touches.
    Full,
    /// The blocks it touches but does not hold whole: the others were
    /// checked from its own data as it arrived (see `replica`).
    Partial,
    /// None: it was checked before.
    Skip,
}

/// Like [`verify_layers`], reading of layer `i` what `check(i)` says; the
/// block hashes of all of them still have to give `expected`.
pub fn verify_layers_where(
    layers: &[Arc<Layer>],
    expected: &str,
    check: impl Fn(usize) -> LayerCheck,
) -> Result<(), ImageError> {
    verify_layers_paced(layers, expected, check, &mut |_| true)
}

/// Like [`verify_layers_where`], calling `pace(bytes)` after each block
/// read (to count or throttle the reading); `pace` returning false stops
/// the check with an `Interrupted` I/O error.
pub fn verify_layers_paced(
    layers: &[Arc<Layer>],
    expected: &str,
    check: impl Fn(usize) -> LayerCheck,
    pace: &mut dyn FnMut(u64) -> bool,
) -> Result<(), ImageError> {
    if let Some((layer, block)) = first_bad_block_where(layers, check, pace)? {
        return Err(ImageError::CorruptLayer {
            path: layer.path().to_owned(),
            reason: format!("block {block} does not match its stored hash"),
        });
    }
    let Some(bottom) = layers.first() else {
        return Err(ImageError::Invalid("a version without layers".into()));
    };
    let size = bottom.size();
    let content = hash::to_hex(&hash::stored_content_hash(size, layers)?);
    if content != expected {
        return Err(ImageError::Invalid(format!(
            "hashes to {content}, not {expected}"
        )));
    }
    Ok(())
}

/// The lowest layer (and its block) whose data does not match its stored
/// block hashes, checking bottom up, so a bad block is blamed on the layer
/// that holds it.
pub fn first_bad_block(layers: &[Arc<Layer>]) -> Result<Option<(Arc<Layer>, u64)>, ImageError> {
    first_bad_block_where(layers, |_| LayerCheck::Full, &mut |_| true)
}

fn first_bad_block_where(
    layers: &[Arc<Layer>],
    check: impl Fn(usize) -> LayerCheck,
    pace: &mut dyn FnMut(u64) -> bool,
) -> Result<Option<(Arc<Layer>, u64)>, ImageError> {
    for i in 0..layers.len() {
        let layer = &layers[i];
        if layer.content_hash().is_none() {
            return Err(ImageError::CorruptLayer {
                path: layer.path().to_owned(),
                reason: "its hashes are not current".into(),
            });
        }
        let only_unheld = match check(i) {
            LayerCheck::Skip => continue,
            LayerCheck::Partial if i == 0 => continue,
            LayerCheck::Partial => true,
            LayerCheck::Full => false,
        };
        let disk = Disk::read_only(layers[..=i].to_vec());
        let mut bad = None;
        let mut stopped = false;
        hash::scan_top_where(
            &disk,
            |b| !only_unheld || !layer.holds_block(b),
            |block, good| {
                if !good {
                    bad = Some(block);
                }
                stopped = !pace(crate::HASH_BLOCK);
                good && !stopped
            },
        )?;
        if stopped && bad.is_none() {
            return Err(ImageError::Io(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "the check was stopped",
            )));
        }
        if let Some(block) = bad {
            return Ok(Some((layer.clone(), block)));
        }
    }
    Ok(None)
}

/// A layer file name as the store makes them (`v3-0a1b2c3d.layer`): no paths.
fn check_file_name(file: &str) -> Result<(), ImageError> {
    if !folders::is_layer_name(file) {
        return Err(ImageError::Invalid(format!(
            "{file:?} is not a layer file name"
        )));
    }
    Ok(())
}

/// True for a name the store accepts for a vDisk, store or device.
pub(crate) fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn check_name(name: &str) -> Result<(), ImageError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(ImageError::Invalid(format!("{name:?} is not a valid name")))
    }
}

/// A new name in `root`'s `tmp/` for `name` on its way out (`KIND-NAME-N`,
/// which [`folders::clear_tmp`] knows as vstream's): unique within the
/// process, and unlikely to meet a leftover of an earlier one.
fn trash_path(root: &Path, kind: &str, name: &str) -> PathBuf {
    static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    root.join("tmp")
        .join(format!("{kind}-{name}-{}{n}", rand_u32()))
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
        let layers = store.chain("data", 1).unwrap().layers;
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

    /// Clearing a boot set removes its file and stamps the version, a later
    /// stamp each time; a version that is not there is refused.
    #[test]
    fn clearing_a_boot_set_stamps_its_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.create("d", 1 << 20, 1).unwrap();
        let file = store
            .vdisk_path("d")
            .unwrap()
            .join(crate::bootset::boot_set_file(1));
        let set = crate::bootset::BootSet::new(1 << 20);
        set.note(0, 1);
        set.save(&file).unwrap();
        let v = store.clear_boot_set("d", 1, 50).unwrap();
        assert_eq!(v.boot_set_cleared_unix, Some(50));
        assert!(!file.exists());
        let props = store.properties("d").unwrap();
        assert_eq!(props.version(1).unwrap().boot_set_cleared_unix, Some(50));
        // Twice in one second, or with a clock gone back: still later.
        assert_eq!(
            store
                .clear_boot_set("d", 1, 50)
                .unwrap()
                .boot_set_cleared_unix,
            Some(51)
        );
        assert_eq!(
            store
                .clear_boot_set("d", 1, 7)
                .unwrap()
                .boot_set_cleared_unix,
            Some(52)
        );
        assert!(matches!(
            store.clear_boot_set("d", 2, 60),
            Err(ImageError::Invalid(_))
        ));
        assert!(store.clear_boot_set("nope", 1, 60).is_err());
    }

    /// A properties file read again unchanged is not parsed again; one
    /// changed by a save, or by hand, is.
    #[test]
    fn properties_are_parsed_again_only_when_their_file_changed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.create("d", 1 << 20, 1).unwrap();
        let path = store.vdisk_path("d").unwrap().join(PROPERTIES);
        let first = store.properties("d").unwrap();
        assert!(store.parsed.lock().contains_key(&path));
        assert_eq!(store.properties("d").unwrap(), first);
        // Saves in quick succession, of the same size: each one is seen.
        for stamp in [10, 11, 12] {
            store.clear_boot_set("d", 1, stamp).unwrap();
            let v = store.properties("d").unwrap();
            assert_eq!(v.version(1).unwrap().boot_set_cleared_unix, Some(stamp));
        }
        // An edit by hand, in place (a new size; one of the same size is
        // seen by its times, unless made in the save's clock tick).
        let text = fs::read_to_string(&path).unwrap();
        let edited = text.replace("boot_set_cleared_unix = 12", "boot_set_cleared_unix = 1900");
        fs::write(&path, edited).unwrap();
        let v = store.properties("d").unwrap();
        assert_eq!(v.version(1).unwrap().boot_set_cleared_unix, Some(1900));
        // A damaged file is refused, not served from the last parse.
        fs::write(&path, "format = ").unwrap();
        assert!(matches!(
            store.properties("d"),
            Err(ImageError::BadProperties { .. })
        ));
        store.delete("d").unwrap();
        assert!(store.parsed.lock().is_empty());
        assert!(matches!(
            store.properties("d"),
            Err(ImageError::NoSuchVDisk(_))
        ));
    }

    fn read_all(store: &Store, name: &str, version: u32) -> Vec<u8> {
        let disk = store.chain(name, version).unwrap().read_only();
        let mut b = vec![0u8; disk.size() as usize];
        disk.read(&mut b, 0, false).unwrap();
        b
    }

    fn write(store: &Store, name: &str, version: u32, data: &[u8], at: u64) {
        let chain = store.chain(name, version).unwrap();
        assert!(chain.is_writable());
        chain.writable().unwrap().write(data, at, false).unwrap();
    }

    /// new, write, promote, rollback, merge and delete, against flat copies.
    #[test]
    fn versions_life_cycle() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let size = 2 << 20;
        store.create("d", size, 1).unwrap();
        write(&store, "d", 1, &[1u8; 70_000], 0);
        let v1 = read_all(&store, "d", 1);
        let v2 = store.new_version("d", 2).unwrap();
        assert_eq!(v2.number, 2);
        assert!(store
            .properties("d")
            .unwrap()
            .version(1)
            .unwrap()
            .is_sealed());
        assert!(
            store.new_version("d", 2).is_err(),
            "two maintenance versions"
        );
        write(&store, "d", 2, &[2u8; 5000], 65_000);
        let p2 = store.promote("d", 2, VersionState::Test, 3).unwrap();
        assert!(p2.is_sealed());
        assert!(!store.chain("d", 2).unwrap().is_writable());
        let mut want2 = v1.clone();
        want2[65_000..70_000].fill(2);
        assert_eq!(read_all(&store, "d", 2), want2);
        assert_eq!(read_all(&store, "d", 1), v1, "version 1 changed");
        // Same content, same hash, whatever the layering.
        let staging = store.begin_import("flat", size).unwrap();
        staging.disk().write(&want2, 0, false).unwrap();
        let flat = store.commit_import(staging, 4).unwrap();
        assert_eq!(
            p2.content_hash.as_deref(),
            Some(hash::to_hex(&flat).as_str())
        );

        store.promote("d", 2, VersionState::Production, 5).unwrap();
        assert!(store.promote("d", 2, VersionState::Production, 5).is_err());
        assert_eq!(store.rollback("d").unwrap().number, 1);
        assert_eq!(
            store
                .properties("d")
                .unwrap()
                .newest(VersionState::Production)
                .unwrap()
                .number,
            1
        );
        store.promote("d", 2, VersionState::Production, 6).unwrap();
        assert!(store
            .delete_version("d", 1, false)
            .unwrap_err()
            .to_string()
            .contains("built on"));

        // A maintenance version on top, then merge under it.
        store.new_version("d", 7).unwrap();
        write(&store, "d", 3, &[3u8; 10], 0);
        let set_file = |n| {
            dir.path()
                .join("vdisks/d")
                .join(crate::bootset::boot_set_file(n))
        };
        for n in 1..=3 {
            fs::write(set_file(n), b"a boot set").unwrap();
        }
        let merged = store.merge("d", Some(2)).unwrap();
        assert_eq!(merged.layers.len(), 1);
        assert_eq!(merged.content_hash, p2.content_hash);
        assert_eq!(read_all(&store, "d", 2), want2);
        let mut want3 = want2.clone();
        want3[..10].fill(3);
        assert_eq!(read_all(&store, "d", 3), want3);
        let props = store.properties("d").unwrap();
        assert_eq!(props.version(1).unwrap().state, VersionState::Retired);
        assert_eq!(props.version(3).unwrap().layers.len(), 2);
        let files = fs::read_dir(dir.path().join("vdisks/d")).unwrap().count();
        assert_eq!(
            files, 5,
            "properties, merged layer, maintenance layer, two boot sets"
        );
        assert!(!set_file(1).exists(), "a retired version's boot set");
        store.delete_version("d", 3, false).unwrap();
        assert!(!set_file(3).exists(), "a deleted version's boot set");
        assert!(set_file(2).exists());
        assert!(store
            .delete_version("d", 2, false)
            .unwrap_err()
            .to_string()
            .contains("last production"));
        assert!(store.delete_version("d", 2, true).is_err());
        assert_eq!(
            store.new_version("d", 9).unwrap().number,
            4,
            "version 3's number was reused"
        );
    }

    /// A version is recorded checked with its files as they are; a file
    /// changed since (one flipped byte) is no longer, and its check fails.
    /// A base shared by two versions is read once.
    #[test]
    fn the_verification_record_holds_until_a_file_changes() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let size = 2 << 20;
        store.create("d", size, 1).unwrap();
        write(&store, "d", 1, &[7u8; 300_000], 0);
        store.new_version("d", 2).unwrap();
        write(&store, "d", 2, &[8u8; 5000], 70_000);
        let v2 = store.promote("d", 2, VersionState::Production, 3).unwrap();
        let v1 = store.properties("d").unwrap().version(1).unwrap().clone();
        let (h1, h2) = (v1.content_hash.unwrap(), v2.content_hash.unwrap());
        assert!(
            !store.is_recorded("d", 1, &h1).unwrap(),
            "nothing recorded yet"
        );

        // Version 1 read in full; version 2 then reads its own layer only.
        let r1 = store
            .check("d", 1, &h1, Trust::Read, &mut |_| true)
            .unwrap();
        assert_eq!(r1.read, v1.layers);
        let mut bytes = 0;
        let r2 = store
            .check("d", 2, &h2, Trust::Read, &mut |n| {
                bytes += n;
                true
            })
            .unwrap();
        assert_eq!(
            r2.read,
            vec![v2.layers[1].clone()],
            "the base was read again"
        );
        assert_eq!(
            bytes,
            crate::HASH_BLOCK,
            "one block of version 2's own layer"
        );
        assert!(store.is_recorded("d", 1, &h1).unwrap());
        assert!(store.is_recorded("d", 2, &h2).unwrap());
        assert!(
            !store.is_recorded("d", 2, &h1).unwrap(),
            "another content hash"
        );

        // A new process trusts the record, and reads nothing for it.
        let again = Store::open(dir.path()).unwrap();
        let r = again
            .check("d", 2, &h2, Trust::Recorded, &mut |_| true)
            .unwrap();
        assert_eq!(r.recorded, v2.layers);
        assert!(r.read.is_empty());

        // One byte of the base flipped: no longer recorded; the check fails.
        let base = dir.path().join("vdisks/d").join(&v1.layers[0]);
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&base)
            .unwrap();
        let at = f.metadata().unwrap().len() - size + 1000;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 1], at).unwrap();
        drop(f);
        let fresh = Store::open(dir.path()).unwrap();
        assert!(!fresh.is_recorded("d", 1, &h1).unwrap());
        assert!(!fresh.is_recorded("d", 2, &h2).unwrap());
        let err = fresh
            .check("d", 2, &h2, Trust::Recorded, &mut |_| true)
            .unwrap_err();
        assert!(
            matches!(&err, ImageError::CorruptLayer { path, .. } if *path == base),
            "{err}"
        );
        // Forgotten: the base, and what was read through it.
        fresh.forget_checked("d", &v1.layers).unwrap();
        let record = Record::load(&dir.path().join("vdisks/d"));
        assert!(
            record.layers.is_empty() && record.versions.is_empty(),
            "{record:?}"
        );
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
        let c = store.open_cache("dev1", "v@1", None, 1 << 20).unwrap();
        c.set_allocated(0, 1);
        c.flush().unwrap();
        drop(c);
        assert_eq!(
            store
                .open_cache("dev1", "v@1", None, 1 << 20)
                .unwrap()
                .allocated_chunks(),
            1
        );
        assert_eq!(
            store
                .open_cache("dev1", "v@1", None, 2 << 20)
                .unwrap()
                .allocated_chunks(),
            0
        );
        let c = store.open_cache("dev1", "v@1", None, 2 << 20).unwrap();
        c.set_allocated(0, 1);
        drop(c);
        let other = store.open_cache("dev1", "v@2", None, 2 << 20).unwrap();
        assert_eq!(
            other.allocated_chunks(),
            0,
            "a cache over version 1 was laid over version 2"
        );
        other.set_allocated(0, 1);
        drop(other);
        // Boots: a cache from before boots were recorded is taken over by
        // the first; the next boot starts clean, a reconnect in it does not.
        let same = |boot| {
            store
                .open_cache("dev1", "v@2", boot, 2 << 20)
                .unwrap()
                .allocated_chunks()
        };
        // Both tags are in the cache's header: one file.
        let path = store.cache_path("dev1").unwrap();
        let tag = path.with_extension("base");
        assert_eq!(
            Layer::recorded_label(&path).unwrap(),
            b"v@2\n\n",
            "both tags in the header"
        );
        assert_eq!(
            fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1,
            "one file"
        );
        // A cache as an older server left it: no label, its tags in files
        // beside it. From before boots were recorded: one line, no boot.
        let legacy = |tags: &[(&Path, &str)]| {
            store.discard_cache("dev1").unwrap();
            Layer::create(&path, 2 << 20).unwrap().set_allocated(0, 1);
            for (file, text) in tags {
                fs::write(file, text).unwrap();
            }
        };
        legacy(&[(&tag, "v@2")]);
        assert_eq!(same(Some("b1")), 1, "an untagged cache was not taken over");
        assert_eq!(same(Some("b1")), 1, "a reconnect lost the cache");
        assert_eq!(
            store.cache_tags("dev1"),
            Some(("v@2".to_owned(), Some("b1".to_owned())))
        );
        assert_eq!(store.cached_devices(), ["dev1"]);
        assert_eq!(same(None), 1, "no boot known lost the cache");
        assert_eq!(same(Some("b2")), 0, "a new boot kept the cache of the last");
        store.discard_cache("dev1").unwrap();
        store
            .open_cache("dev1", "v@2", None, 2 << 20)
            .unwrap()
            .set_allocated(0, 1);
        assert_eq!(
            same(Some("b3")),
            0,
            "a cache made with no boot known was kept by a boot"
        );
        // A cache an older server made: its boot in a tag file of its own.
        let boot_tag = tag.with_extension("boot");
        legacy(&[(&tag, "v@2"), (&boot_tag, "b4")]);
        assert_eq!(
            store.cache_tags("dev1"),
            Some(("v@2".to_owned(), Some("b4".to_owned())))
        );
        assert_eq!(same(Some("b4")), 1, "an older server's cache was lost");
        assert_eq!(
            same(Some("b5")),
            0,
            "an older server's cache outlived its boot"
        );
        assert_eq!(
            store.cache_tags("dev1"),
            Some(("v@2".to_owned(), Some("b5".to_owned())))
        );
        assert!(
            !tag.exists() && !boot_tag.exists(),
            "an older server's tag files outlived its cache"
        );
        // Both tags in its base tag file, as the last server before labels
        // kept them.
        legacy(&[(&tag, "v@2\nb6\n")]);
        assert_eq!(
            store.cache_tags("dev1"),
            Some(("v@2".to_owned(), Some("b6".to_owned())))
        );
        assert_eq!(same(Some("b6")), 1, "an older server's cache was lost");
        assert_eq!(same(Some("b7")), 0, "it outlived its boot");
        store.discard_cache("dev1").unwrap();
        store.discard_cache("dev1").unwrap();
        assert!(!store.cache_path("dev1").unwrap().exists());
    }

    /// A discarded cache leaves its name at once and is deleted soon after,
    /// off the caller's thread; one left in `tmp/` by a crash in between
    /// is cleared at the next open, and nothing else there is touched.
    #[test]
    fn a_discarded_cache_goes_at_once_and_its_file_soon() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cache = store.open_cache("pc", "v@1", None, 1 << 20).unwrap();
        cache.write_data(&[1u8; 8192], 0).unwrap();
        drop(cache);
        let tmp = dir.path().join("tmp");
        let in_tmp = || {
            fs::read_dir(&tmp)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect::<Vec<_>>()
        };
        store.discard_cache("pc").unwrap();
        assert!(
            !store.cache_path("pc").unwrap().exists(),
            "still at its name"
        );
        assert_eq!(store.cached_devices(), Vec::<String>::new());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !in_tmp().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "never deleted: {:?}",
                in_tmp()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // A crash between the rename and the delete: the next open clears it.
        fs::write(tmp.join("discarded-pc-123"), b"old cache").unwrap();
        fs::write(tmp.join("notes.txt"), b"an admin's").unwrap();
        drop(store);
        let _store = Store::open(dir.path()).unwrap();
        assert_eq!(in_tmp(), vec!["notes.txt".to_owned()]);
    }
}
