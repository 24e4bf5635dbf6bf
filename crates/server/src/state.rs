//! What a running server shares between its NBD connections and its API: the
//! store, the farm state, the open vDisks and the live device sessions.
//!
//! Every connection to the same vDisk shares one set of open layers, so that a
//! read-only view sees a Private-mode device's writes, and so that a FLUSH on
//! one connection covers the writes of all of them (hence CAN_MULTI_CONN).

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use vstream_api::{Device, DeviceInfo, Mode, VDisk};
use vstream_farm::FarmStore;
use vstream_image::{Disk, Layer, Store};

use crate::config::Config;
use crate::metrics::Metrics;

/// The shared state of one server.
pub struct Server {
    pub config: Config,
    pub store: Store,
    pub farm: FarmStore,
    pub metrics: Metrics,
    /// Layers in use, by vDisk: shared while any connection holds them.
    open: Mutex<HashMap<String, Vec<Weak<Layer>>>>,
    sessions: Mutex<HashMap<String, Session>>,
}

/// A device's live session: one or more NBD connections to its `device/` export.
struct Session {
    vdisk: String,
    mode: Mode,
    connections: usize,
    since: u64,
    peer: String,
    disk: Arc<Disk>,
}

/// Why a device cannot open its export.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no export named {0:?}; exports are a vDisk name or device/DEVICE")]
    Unknown(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}

/// An export resolved for one connection.
pub struct Export {
    pub name: String,
    pub description: String,
    pub disk: Arc<Disk>,
    /// Present for `device/...` exports; ends the session's connection on drop.
    pub session: Option<SessionGuard>,
}

/// Held by each connection of a device session.
pub struct SessionGuard {
    server: Arc<Server>,
    device: String,
    /// Set when the client ended with NBD_CMD_DISC: a Standard-mode cache is then discarded.
    pub clean: bool,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.server.end_connection(&self.device, self.clean);
    }
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Server {
    pub fn new(config: Config, store: Store, farm: FarmStore) -> Server {
        Server {
            config,
            store,
            farm,
            metrics: Metrics::default(),
            open: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// The layers of vDisk `name`, shared with every other user of it.
    pub fn layers(&self, name: &str) -> Result<Vec<Arc<Layer>>, vstream_image::ImageError> {
        let mut open = self.open.lock();
        if let Some(weak) = open.get(name) {
            let live: Option<Vec<Arc<Layer>>> = weak.iter().map(Weak::upgrade).collect();
            if let Some(layers) = live.filter(|l| !l.is_empty()) {
                return Ok(layers);
            }
        }
        let layers = self.store.open_layers(name, true)?;
        open.insert(name.to_owned(), layers.iter().map(Arc::downgrade).collect());
        Ok(layers)
    }

    /// Forgets open layers of a vDisk that was deleted or replaced.
    pub fn forget(&self, name: &str) {
        self.open.lock().remove(name);
    }

    /// Resolves an export name for a new connection (`go`) or for a query.
    pub async fn open_export(
        self: &Arc<Self>,
        name: &str,
        peer: &str,
        go: bool,
    ) -> Result<Export, OpenError> {
        if let Some(dev) = name.strip_prefix("device/") {
            return self.open_device(dev, peer, go).await;
        }
        if name.is_empty() || name.contains('/') || !self.store.exists(name) {
            return Err(OpenError::Unknown(name.to_owned()));
        }
        let layers = self
            .layers(name)
            .map_err(|e| OpenError::Failed(format!("opening vDisk {name}: {e}")))?;
        Ok(Export {
            name: name.to_owned(),
            description: format!("vDisk {name} (read-only)"),
            disk: Arc::new(Disk::read_only(layers)),
            session: None,
        })
    }

    async fn open_device(
        self: &Arc<Self>,
        key: &str,
        peer: &str,
        go: bool,
    ) -> Result<Export, OpenError> {
        let device = self
            .farm
            .find_device(key)
            .await
            .map_err(|e| OpenError::Failed(e.to_string()))?
            .ok_or_else(|| OpenError::Unknown(format!("device/{key}")))?;
        let vdisk = self
            .farm
            .get_vdisk(&device.vdisk)
            .await
            .map_err(|e| OpenError::Failed(e.to_string()))?
            .ok_or_else(|| {
                OpenError::Failed(format!(
                    "device {} is assigned vDisk {}, which does not exist",
                    device.name, device.vdisk
                ))
            })?;
        let export_name = format!("device/{key}");
        let description = format!(
            "device {} on vDisk {} ({} mode)",
            device.name, vdisk.name, vdisk.mode
        );
        let mut sessions = self.sessions.lock();
        if let Some(s) = sessions.get_mut(&device.name) {
            // Another connection of the same device (a reconnect, or multi-conn).
            if !go {
                return Ok(Export {
                    name: export_name,
                    description,
                    disk: s.disk.clone(),
                    session: None,
                });
            }
            s.connections += 1;
            s.peer = peer.to_owned();
            let disk = s.disk.clone();
            drop(sessions);
            let guard = SessionGuard {
                server: self.clone(),
                device: device.name.clone(),
                clean: false,
            };
            return Ok(Export {
                name: export_name,
                description,
                disk,
                session: Some(guard),
            });
        }
        if vdisk.mode == Mode::Private {
            if let Some((other, _)) = sessions
                .iter()
                .find(|(_, s)| s.vdisk == vdisk.name && s.mode == Mode::Private)
            {
                return Err(OpenError::Refused(format!(
                    "vDisk {} is in Private mode and device {other} has it open; device {} must wait until it disconnects",
                    vdisk.name, device.name
                )));
            }
        }
        let disk = self
            .device_disk(&device, &vdisk)
            .map_err(OpenError::Failed)?;
        if !go {
            return Ok(Export {
                name: export_name,
                description,
                disk: Arc::new(disk),
                session: None,
            });
        }
        let disk = Arc::new(disk);
        sessions.insert(
            device.name.clone(),
            Session {
                vdisk: vdisk.name.clone(),
                mode: vdisk.mode,
                connections: 1,
                since: now_unix(),
                peer: peer.to_owned(),
                disk: disk.clone(),
            },
        );
        drop(sessions);
        tracing::info!(device = %device.name, vdisk = %vdisk.name, mode = %vdisk.mode, %peer, "device session started");
        let guard = SessionGuard {
            server: self.clone(),
            device: device.name.clone(),
            clean: false,
        };
        Ok(Export {
            name: export_name,
            description,
            disk,
            session: Some(guard),
        })
    }

    /// The disk a device sees: its vDisk itself (Private) or the vDisk under its write cache (Standard).
    fn device_disk(&self, device: &Device, vdisk: &VDisk) -> Result<Disk, String> {
        let layers = self
            .layers(&vdisk.name)
            .map_err(|e| format!("opening vDisk {}: {e}", vdisk.name))?;
        match vdisk.mode {
            Mode::Private => {
                Disk::writable(layers, None).map_err(|e| format!("vDisk {}: {e}", vdisk.name))
            }
            Mode::Standard => {
                let cache = self
                    .store
                    .open_cache(&device.name, vdisk.size)
                    .map_err(|e| {
                        format!("opening the write cache of device {}: {e}", device.name)
                    })?;
                let mut stack = layers;
                stack.push(cache);
                let limit = vdisk.cache_limit.unwrap_or(vdisk.size);
                Disk::writable(stack, Some(limit)).map_err(|e| e.to_string())
            }
        }
    }

    fn end_connection(&self, device: &str, clean: bool) {
        let mut sessions = self.sessions.lock();
        let Some(s) = sessions.get_mut(device) else {
            return;
        };
        s.connections -= 1;
        if s.connections > 0 {
            return;
        }
        let s = sessions.remove(device).expect("session present");
        drop(sessions);
        if let Err(e) = s.disk.flush() {
            tracing::error!(device, error = %e, "flushing at the end of a session failed");
        }
        if clean && s.mode == Mode::Standard {
            drop(s.disk);
            match self.store.discard_cache(device) {
                Ok(()) => tracing::info!(device, "session ended cleanly; write cache discarded"),
                Err(e) => tracing::error!(device, error = %e, "discarding the write cache failed"),
            }
        } else {
            tracing::info!(device, clean, "device session ended");
        }
    }

    /// Devices connected to vDisk `name` now.
    pub fn connected_to(&self, vdisk: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .sessions
            .lock()
            .iter()
            .filter(|(_, s)| s.vdisk == vdisk)
            .map(|(d, _)| d.clone())
            .collect();
        v.sort();
        v
    }

    pub fn is_connected(&self, device: &str) -> bool {
        self.sessions.lock().contains_key(device)
    }

    /// A device with its live state.
    pub fn device_info(&self, device: Device) -> DeviceInfo {
        let sessions = self.sessions.lock();
        let s = sessions.get(&device.name);
        let cache_bytes = match s {
            Some(s) if s.mode == Mode::Standard => s.disk.top_bytes(),
            Some(_) => 0,
            None => self
                .store
                .cache_path(&device.name)
                .ok()
                .and_then(|p| Layer::open(&p, false).ok())
                .map_or(0, |l| l.allocated_bytes()),
        };
        DeviceInfo {
            connected: s.is_some(),
            connected_since: s.map(|s| s.since),
            peer: s.map(|s| s.peer.clone()),
            cache_bytes,
            device,
        }
    }

    /// Flushes every open session; used at shutdown.
    pub fn flush_all(&self) {
        let disks: Vec<Arc<Disk>> = self
            .sessions
            .lock()
            .values()
            .map(|s| s.disk.clone())
            .collect();
        for d in disks {
            if let Err(e) = d.flush() {
                tracing::error!(error = %e, "flush at shutdown failed");
            }
        }
    }
}
