//! A store following the farm's catalog: the versions whose layers are
//! here go into the vDisk's properties (see `catalog::plan`).

use std::sync::Arc;

use vstream_api::Catalog;
use vstream_image::Properties;

use super::catalog;
use super::handles::Handles;

/// Makes this store follow `cat` as far as the layers here (and the
/// verified files `ready`, received into the replication folder) allow.
/// Returns the properties the store has afterwards. The caller holds the
/// vDisk's lock.
pub(super) async fn follow(
    server: &Arc<Handles>,
    cat: &Catalog,
    ready: &[String],
) -> Result<Option<Properties>, vstream_image::ImageError> {
    let s = server.clone();
    let cat = cat.clone();
    let ready = ready.to_vec();
    tokio::task::spawn_blocking(move || follow_blocking(&s, &cat, &ready))
        .await
        .map_err(|e| vstream_image::ImageError::Invalid(e.to_string()))?
        .map(|(props, _)| props)
}

pub(super) fn follow_blocking(
    server: &Handles,
    cat: &Catalog,
    ready: &[String],
) -> Result<(Option<Properties>, catalog::Plan), vstream_image::ImageError> {
    let name = &cat.vdisk;
    let store = &server.store;
    let local = store.properties(name).ok();
    let present = |f: &str| {
        ready.iter().any(|r| r == f)
            || store
                .layer_path(name, f)
                .map(|p| p.exists())
                .unwrap_or(false)
    };
    // Anywhere in the farm: a device on another server may fail over here.
    let in_use = |n: u32| !server.sessions.farm_devices_on(name, Some(n)).is_empty();
    let plan = catalog::plan(local.as_ref(), cat, present, in_use);
    let Some(props) = plan.properties(cat, local.as_ref()) else {
        return Ok((local, plan));
    };
    if local.as_ref().map(|l| &l.versions) != Some(&props.versions) {
        let dir = store.replication_dir(name);
        store.follow(
            name,
            props.size,
            props.created_unix,
            props.last_number,
            props.versions.clone(),
            &dir,
        )?;
        tracing::info!(vdisk = %name, versions = ?props.versions.iter().map(|v| v.number).collect::<Vec<_>>(), "store follows the farm's catalog");
        return Ok((Some(props), plan));
    }
    Ok((local, plan))
}
