//! Named stores on this server: each farm store is a folder here, at the
//! farm's path unless `--store-path NAME=PATH` overrides it, and every vDisk
//! lives in the store its record names. The image store routes each vDisk
//! to its folder (`Store::add_area`, `Store::place`).

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use std::sync::Arc;

use parking_lot::Mutex;
use vstream_api::{StoreDef, StoreHere, VDisk};
use vstream_farm::FarmStore;
use vstream_image::Store;

use crate::config::Config;
use crate::membership::View;

/// This server's named stores.
pub struct Stores {
    config: Arc<Config>,
    store: Store,
    farm: FarmStore,
    /// What went wrong with each store on this self.
    problems: Mutex<HashMap<String, String>>,
}

impl Stores {
    pub fn new(config: Arc<Config>, store: Store, farm: FarmStore) -> Stores {
        Stores {
            config,
            store,
            farm,
            problems: Mutex::default(),
        }
    }

    /// This server's data folder, which no store may overlap.
    pub fn data_folder(&self) -> &std::path::Path {
        &self.config.data
    }

    /// Vdisk `name` will be made in store `store` (see `Store::place`).
    pub fn place_new(&self, name: &str, store: &str) -> Result<(), vstream_image::ImageError> {
        self.store.place(name, store)
    }

    /// Where this server keeps store `def`.
    pub fn path_here(&self, def: &StoreDef) -> PathBuf {
        self.config
            .store_paths
            .get(&def.name)
            .cloned()
            .unwrap_or_else(|| PathBuf::from(&def.path))
    }

    /// The stores this server held, remembered in its data folder so that a
    /// restart while etcd is away still finds their vDisks.
    fn remembered(&self) -> PathBuf {
        self.config.data.join("stores.json")
    }

    /// Holds again the stores this server held before it stopped.
    pub fn hold_remembered(&self) {
        let Ok(text) = std::fs::read_to_string(self.remembered()) else {
            return;
        };
        let held: HashMap<String, PathBuf> = match serde_json::from_str(&text) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring an unreadable stores.json");
                return;
            }
        };
        for (name, path) in held {
            if let Err(e) = self.store.add_area(&name, &path) {
                tracing::warn!(store = %name, path = %path.display(), error = %e, "cannot hold the store again");
            }
        }
    }

    /// Writes the stores held now to `stores.json` (through a temporary file).
    fn remember(&self) -> std::io::Result<()> {
        let held: HashMap<String, PathBuf> = self.store.areas().into_iter().collect();
        let mut tmp = tempfile::NamedTempFile::new_in(&self.config.data)?;
        tmp.write_all(&serde_json::to_vec_pretty(&held)?)?;
        tmp.as_file().sync_all()?;
        tmp.persist(self.remembered()).map_err(|e| e.error)?;
        Ok(())
    }

    /// Holds store `def` here from now on; an error says why it cannot.
    pub fn hold(&self, def: &StoreDef) -> Result<(), String> {
        let path = self.path_here(def);
        let result = self
            .store
            .add_area(&def.name, &path)
            .map_err(|e| format!("store {} at {}: {e}", def.name, path.display()));
        if result == Ok(true) {
            tracing::info!(store = %def.name, path = %path.display(), "holding the store");
            if let Err(e) = self.remember() {
                tracing::warn!(error = %e, "could not remember the stores held");
            }
        }
        let result = result.map(drop);
        let mut problems = self.problems.lock();
        match &result {
            Ok(()) => {
                problems.remove(&def.name);
            }
            Err(why) => {
                if problems.get(&def.name) != Some(why) {
                    tracing::warn!(store = %def.name, reason = %why, "cannot hold the store");
                }
                problems.insert(def.name.clone(), why.clone());
            }
        }
        result
    }

    /// Follows the farm view: holds every store, and places every vDisk in its
    /// store before anything makes its folder here.
    pub fn follow(&self, view: &View) {
        for def in &view.stores {
            let _ = self.hold(def);
        }
        for v in &view.vdisks {
            self.place(v);
        }
    }

    /// Places vDisk `v` in its store here; a vDisk already elsewhere stays.
    fn place(&self, v: &VDisk) {
        if let Err(e) = self.store.place(&v.name, &v.store) {
            tracing::debug!(vdisk = %v.name, store = %v.store, error = %e, "vDisk not placed");
        }
    }

    /// Whether vDisk `name` may be made here: it is here already, or its store
    /// is held here and it is placed in it.
    pub fn ready_for(&self, view: &View, name: &str) -> Result<(), String> {
        if self.store.exists(name) {
            return Ok(());
        }
        let record = view
            .vdisk(name)
            .ok_or_else(|| format!("vDisk {name} is not in this server's view of the farm yet"))?;
        self.placed(record)
    }

    /// Whether vDisk `record` is placed in its store here; if not, why.
    fn placed(&self, record: &VDisk) -> Result<(), String> {
        if self.store.store_of(&record.name) == record.store {
            return Ok(());
        }
        let problem = self.problems.lock().get(&record.store).cloned();
        Err(problem.unwrap_or_else(|| {
            format!("store {} is not available on this server yet", record.store)
        }))
    }

    /// As [`Stores::ready_for`], but a vDisk this server's view does not show yet (made
    /// a moment ago elsewhere: the view catches up within a second) is read from
    /// the farm state and placed now, so that its copy starts when its maker
    /// pokes, not a second later.
    pub async fn make_ready(&self, view: &View, name: &str) -> Result<(), String> {
        let why = match self.ready_for(view, name) {
            Ok(()) => return Ok(()),
            Err(why) if view.vdisk(name).is_some() => return Err(why),
            Err(why) => why,
        };
        let Ok(Some(record)) = self.farm.get_vdisk(name).await else {
            return Err(why);
        };
        self.place(&record);
        self.placed(&record)
    }

    /// This server's copy of each of the farm's stores, for its status.
    pub fn status(&self, view: &View) -> Vec<StoreHere> {
        let problems = self.problems.lock();
        view.stores
            .iter()
            .map(|def| StoreHere {
                store: def.name.clone(),
                server: self.config.name.clone(),
                path: self.path_here(def).display().to_string(),
                problem: problems.get(&def.name).cloned(),
            })
            .collect()
    }
}
