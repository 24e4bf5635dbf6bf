//! The local vDisks the farm's catalogs do not list: published, removed
//! when a tombstone proves them deleted, else quarantined (see
//! `crate::quarantine`).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use vstream_api::Quarantined;
use vstream_farm::FarmError;
use vstream_image::Properties;

use super::catalog;
use super::handles::Handles;

fn describe(server: &Handles, props: &Properties, reason: String) -> Quarantined {
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

async fn judge(server: &Handles, props: &Properties) -> Result<Verdict, FarmError> {
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
    server: &Arc<Handles>,
    catalogs: &[vstream_api::Catalog],
) -> Result<HashSet<String>, FarmError> {
    let listed: BTreeMap<&str, u64> = catalogs
        .iter()
        .map(|c| (c.vdisk.as_str(), c.created_unix))
        .collect();
    let mut found = BTreeMap::new();
    let mut skip = HashSet::new();
    for name in server.store.list().unwrap_or_default() {
        let Some(_lock) = server.sessions.try_lock_vdisk(&name) else {
            // An operation (an import, a merge) holds it: as it was.
            if let Some(q) = server.quarantine.get(&name) {
                found.insert(name.clone(), q);
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
            Verdict::Buried if server.sessions.connected_to(&name).is_empty() => {
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
