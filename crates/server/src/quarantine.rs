//! vDisks a server holds that the farm does not list.
//!
//! A server removes a local vDisk only when the farm proves it deleted: a
//! tombstone (written by `vdisk delete`) naming the vDisk's creation time.
//! Anything else the farm does not list (a moved `farm.redb`, a new or
//! rewound etcd, a vDisk of the same name made after this copy) is
//! **quarantined**: kept, never served, reported in the status (`server
//! list`, `vstream quarantine list`) and in the log, until an admin adopts
//! it into the farm or removes it (`POST /api/v1/quarantine/NAME/adopt`,
//! `DELETE /api/v1/quarantine/NAME`, on the server holding it).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use parking_lot::Mutex;
use vstream_api::{Adopt, ErrorBody, Quarantined, VDisk};
use vstream_farm::FarmError;
use vstream_image::Properties;

use crate::api::ApiError;
use crate::replication::catalog;
use crate::state::Server;

/// This server's quarantined vDisks.
#[derive(Default)]
pub struct Quarantine {
    held: Mutex<BTreeMap<String, Quarantined>>,
    /// Names already logged, so each is logged once while it stays.
    logged: Mutex<HashSet<String>>,
}

impl Quarantine {
    /// The quarantined vDisks, by name.
    pub fn list(&self) -> Vec<Quarantined> {
        self.held.lock().values().cloned().collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.held.lock().contains_key(name)
    }

    /// Refuses to make vDisk `name` here while a quarantined copy holds the name.
    pub fn check_free(&self, name: &str) -> Result<(), ApiError> {
        if self.contains(name) {
            return Err(ApiError::conflict(format!(
                "this server holds a quarantined vDisk {name}; adopt or remove it first \
                 (vstream quarantine list)"
            )));
        }
        Ok(())
    }

    /// Replaces the set with what the last reconcile found.
    fn set(&self, found: BTreeMap<String, Quarantined>) {
        self.logged.lock().retain(|n| found.contains_key(n));
        *self.held.lock() = found;
    }

    fn log_once(&self, q: &Quarantined) {
        if self.logged.lock().insert(q.vdisk.clone()) {
            tracing::warn!(
                vdisk = %q.vdisk,
                size = q.size,
                versions = ?q.versions,
                reason = %q.reason,
                "vDisk kept in quarantine: the farm does not list it and no tombstone proves it deleted; \
                 `vstream quarantine adopt` brings it into the farm, `vstream quarantine remove` deletes it"
            );
        }
    }
}

fn describe(server: &Server, props: &Properties, reason: String) -> Quarantined {
    let bytes = server
        .store
        .vdisk_path(&props.name)
        .ok()
        .and_then(|dir| std::fs::read_dir(dir).ok())
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .sum()
        })
        .unwrap_or(0);
    Quarantined {
        vdisk: props.name.clone(),
        server: server.config.name.clone(),
        size: props.size,
        created_unix: props.created_unix,
        versions: props
            .versions
            .iter()
            .filter(|v| v.is_live())
            .map(|v| v.number)
            .collect(),
        bytes,
        reason,
    }
}

/// What to do with local vDisk `props`, which the farm's catalogs do not list.
enum Verdict {
    /// The farm has its record: publish its catalog from this copy.
    Publish,
    /// A tombstone names this very vDisk: remove the copy.
    Buried,
    Quarantine(String),
}

async fn judge(server: &Server, props: &Properties) -> Result<Verdict, FarmError> {
    let name = &props.name;
    if let Some(record) = server.farm.get_vdisk(name).await? {
        // Only the vDisk the record describes; another of the same name waits.
        return Ok(if record.size == props.size {
            Verdict::Publish
        } else {
            Verdict::Quarantine(format!(
                "the farm's vDisk {name} is {} bytes, this copy {}: another vDisk of the same name",
                record.size, props.size
            ))
        });
    }
    Ok(match server.farm.tombstone(name).await? {
        Some(t) if t.buries(props.created_unix) => Verdict::Buried,
        Some(_) => Verdict::Quarantine(format!(
            "the farm deleted a vDisk named {name}, but not this one (made at {})",
            props.created_unix
        )),
        None => Verdict::Quarantine(format!("the farm has no vDisk named {name}")),
    })
}

/// Handles the local vDisks the catalogs do not list (see the module docs),
/// and a listed name whose local copy is another vDisk (made at another
/// time): publishes, removes what a tombstone buries, quarantines the rest.
/// Answers the names to leave alone this time (quarantined or removed).
pub async fn reconcile(
    server: &Arc<Server>,
    catalogs: &[vstream_api::Catalog],
) -> Result<HashSet<String>, FarmError> {
    let listed: BTreeMap<&str, u64> = catalogs
        .iter()
        .map(|c| (c.vdisk.as_str(), c.created_unix))
        .collect();
    let mut found = BTreeMap::new();
    let mut skip = HashSet::new();
    for name in server.store.list().unwrap_or_default() {
        let Some(_lock) = server.try_lock_vdisk(&name) else {
            // An operation (an import, a merge) holds it: as it was.
            if let Some(q) = server.quarantine.held.lock().get(&name) {
                found.insert(name.clone(), q.clone());
                skip.insert(name);
            }
            continue;
        };
        let Ok(props) = server.store.properties(&name) else {
            continue;
        };
        let verdict = match listed.get(name.as_str()) {
            Some(created) if *created == props.created_unix => continue,
            Some(created) => match server.farm.tombstone(&name).await? {
                Some(t) if t.buries(props.created_unix) => Verdict::Buried,
                _ => Verdict::Quarantine(format!(
                    "the farm's vDisk {name} was made at {created}, this copy at {}: another vDisk",
                    props.created_unix
                )),
            },
            None => judge(server, &props).await?,
        };
        match verdict {
            Verdict::Publish => {
                let me = server.config.name.clone();
                server
                    .farm
                    .update_catalog(&name, |cat| {
                        Ok(Some(
                            cat.unwrap_or_else(|| catalog::from_props(&props, &me)),
                        ))
                    })
                    .await?;
            }
            Verdict::Buried if server.connected_to(&name).is_empty() => {
                tracing::info!(vdisk = %name, created_unix = props.created_unix, "the farm deleted this vDisk (its tombstone names it): removing the local copy");
                let s = server.clone();
                let n = name.clone();
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || s.store.delete(&n)).await {
                    tracing::warn!(vdisk = %name, error = %e, "could not remove the local copy");
                }
                skip.insert(name);
            }
            Verdict::Buried => {
                skip.insert(name);
            }
            Verdict::Quarantine(reason) => {
                let q = describe(server, &props, reason);
                server.quarantine.log_once(&q);
                found.insert(name.clone(), q);
                skip.insert(name);
            }
        }
    }
    server.quarantine.set(found);
    Ok(skip)
}

fn held_here(server: &Server, name: &str) -> Result<Quarantined, ApiError> {
    server
        .quarantine
        .held
        .lock()
        .get(name)
        .cloned()
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "this server ({}) holds no quarantined vDisk {name}; `vstream quarantine list` shows where each is",
                server.config.name
            ))
        })
}

/// This server's quarantined vDisks.
#[utoipa::path(get, path = "/api/v1/quarantine", responses((status = 200, body = [Quarantined])))]
pub async fn list(State(server): State<Arc<Server>>) -> Json<Vec<Quarantined>> {
    Json(server.quarantine.list())
}

/// Makes quarantined vDisk `name` a vDisk of the farm again, from this copy.
#[utoipa::path(post, path = "/api/v1/quarantine/{name}/adopt", params(("name" = String, Path)),
    request_body = Adopt,
    responses((status = 200, body = Quarantined), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn adopt(
    State(server): State<Arc<Server>>,
    Path(name): Path<String>,
    Json(req): Json<Adopt>,
) -> Result<Json<Quarantined>, ApiError> {
    vstream_farm::validate_name(&name)?;
    let _lock = server.lock_vdisk(&name).await;
    let q = held_here(&server, &name)?;
    if let Some(other) = server.farm.get_vdisk(&name).await? {
        return Err(ApiError::conflict(format!(
            "the farm has a vDisk {name} already ({} bytes, made at {}); remove it, or this copy, first",
            other.size, other.created_unix
        )));
    }
    let props = server.store.properties(&name)?;
    let store = server.store.store_of(&name);
    let record = VDisk {
        name: name.clone(),
        size: props.size,
        mode: req.mode.unwrap_or_default(),
        cache_type: req.cache_type.unwrap_or_default(),
        cache_limit: None,
        created_unix: props.created_unix,
        store,
        boot: Default::default(),
    };
    server.farm.create_vdisk(record).await?;
    let me = server.config.name.clone();
    server
        .farm
        .update_catalog(&name, |_| Ok(Some(catalog::from_props(&props, &me))))
        .await?;
    server.quarantine.held.lock().remove(&name);
    server.replication.wake.notify_one();
    tracing::info!(vdisk = %name, versions = ?q.versions, "quarantined vDisk adopted into the farm");
    Ok(Json(q))
}

/// Deletes quarantined vDisk `name` from this server's store.
#[utoipa::path(delete, path = "/api/v1/quarantine/{name}", params(("name" = String, Path)),
    responses((status = 200, body = Quarantined), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn remove(
    State(server): State<Arc<Server>>,
    Path(name): Path<String>,
) -> Result<Json<Quarantined>, ApiError> {
    vstream_farm::validate_name(&name)?;
    let _lock = server.lock_vdisk(&name).await;
    let q = held_here(&server, &name)?;
    // Still unlisted now, not only at the last reconcile.
    let listed = server
        .farm
        .catalog(&name)
        .await?
        .is_some_and(|c| c.created_unix == q.created_unix);
    if listed {
        return Err(ApiError::conflict(format!(
            "vDisk {name} is in the farm again; it is not removed"
        )));
    }
    let srv = server.clone();
    let n = name.clone();
    tokio::task::spawn_blocking(move || srv.store.delete(&n)).await??;
    server.quarantine.held.lock().remove(&name);
    tracing::info!(vdisk = %name, versions = ?q.versions, bytes = q.bytes, "quarantined vDisk removed by an admin");
    Ok(Json(q))
}
