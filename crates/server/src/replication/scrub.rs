//! The scrub: every `scrub_interval`, each layer of each version held here
//! is read again (at most `scrub_rate` bytes/s, lowest I/O priority) against its
//! stored block hashes, bottom layer first. A block that fails marks its
//! layer corrupt: versions using it are no longer offered to devices or
//! peers. Its chunks are then fetched again from a peer holding the layer
//! verified, written in place, and checked; once every bad block of the
//! layer checks, it is offered again. While a layer is corrupt the repair
//! is retried every few seconds.
//!
//! The re-check, at the same pace and priority (the two share the scrub's
//! throttle): a version offered at start from its verification record,
//! unread, is read again in full soon after; one that fails is taken out
//! of service.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vstream_image::replica::Incoming;
use vstream_image::{hash, Disk, ImageError, Layer, Trust, CHUNK, HASH_BLOCK};

use super::handles::Handles;
use super::peer;
use crate::io::LowIo;
use vstream_service::metrics::Metrics;

const REPAIR_RETRY: Duration = Duration::from_secs(3);

pub async fn run(server: Arc<Handles>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut last_scrub = Instant::now();
    loop {
        let due = last_scrub.elapsed() >= server.replication.scrub_interval;
        let s = server.clone();
        let job = tokio::task::spawn_blocking(move || {
            if due {
                scrub_all(&s);
            }
            repair_all(&s);
        });
        if due {
            last_scrub = Instant::now();
        }
        let _ = job.await;
        tokio::select! {
            _ = tokio::time::sleep(REPAIR_RETRY.min(server.replication.scrub_interval)) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Reads again, one at a time, the versions offered from their verification
/// record (see `farm::ensure_verified`), until `shutdown`.
pub async fn recheck(server: Arc<Handles>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        match server.membership.next_recheck() {
            Some(key) => {
                let (s, stop) = (server.clone(), shutdown.clone());
                let _ = tokio::task::spawn_blocking(move || recheck_one(&s, &key, &stop)).await;
            }
            None => tokio::select! {
                _ = server.membership.recheck_now.notified() => {}
                _ = tokio::time::sleep(REPAIR_RETRY) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            },
        }
    }
}

/// Reads version `key` again in full, at the scrub's pace and priority: every
/// layer not read by this process since it last changed (a base shared with
/// a version checked before is not read twice). Stops at once on `stop`:
/// a server shutting down does not wait for it.
fn recheck_one(
    server: &Handles,
    key: &crate::membership::VersionKey,
    stop: &tokio::sync::watch::Receiver<bool>,
) {
    let (name, number, hash) = key;
    let m = &server.membership;
    if !m.is_verified(name, *number, hash) {
        return; // failed or gone meanwhile
    }
    let _low_io = LowIo::enter();
    let throttle = &server.replication.scrub_throttle;
    let mut pace = |n| {
        if *stop.borrow() {
            return false;
        }
        throttle.take(n);
        Metrics::add(&m.recheck_read_bytes, n);
        true
    };
    match server
        .store
        .check(name, *number, hash, Trust::Read, &mut pace)
    {
        Ok(report) => {
            tracing::info!(vdisk = %name, version = number, read = ?report.read, "replica re-checked: read again in full and found right");
        }
        Err(ImageError::NoSuchVDisk(_)) => {}
        Err(ImageError::Io(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
        // Deleted, or written (another content now): nothing failed.
        Err(_) if server.membership.current_hash(name, *number).as_deref() != Some(hash) => {}
        Err(e) => server.membership.withdraw(key, &e),
    }
}

/// The chain of layers of each verified version held, by vDisk.
fn held_chains(server: &Handles) -> Vec<(String, Vec<String>)> {
    server
        .membership
        .held()
        .into_iter()
        .filter(|v| v.verified)
        .map(|v| (v.vdisk, v.layers))
        .collect()
}

fn open_chain(server: &Handles, vdisk: &str, files: &[String]) -> Option<Vec<Arc<Layer>>> {
    let size = server.store.properties(vdisk).ok()?.size;
    files
        .iter()
        .map(|f| {
            let path = server.store.layer_path(vdisk, f).ok()?;
            server.store.open_layer_at(&path, size).ok()
        })
        .collect()
}

/// Bad blocks of layer `i` of `chain`, reading through the layers below.
fn bad_blocks(server: &Handles, chain: &[Arc<Layer>], i: usize) -> std::io::Result<Vec<u64>> {
    let disk = Disk::read_only(chain[..=i].to_vec());
    let mut bad = Vec::new();
    let r = &server.replication;
    hash::scan_top(&disk, |block, good| {
        r.scrub_throttle.take(HASH_BLOCK);
        Metrics::add(&r.scrubbed_bytes, HASH_BLOCK);
        if !good {
            bad.push(block);
        }
        true
    })?;
    Ok(bad)
}

fn scrub_all(server: &Handles) {
    let _low_io = LowIo::enter();
    let mut seen = BTreeSet::new();
    for (vdisk, files) in held_chains(server) {
        let Some(chain) = open_chain(server, &vdisk, &files) else {
            continue;
        };
        for (i, file) in files.iter().enumerate() {
            if !seen.insert((vdisk.clone(), file.clone())) {
                continue;
            }
            match bad_blocks(server, &chain, i) {
                Ok(bad) if bad.is_empty() => {}
                Ok(bad) => {
                    Metrics::add(&server.replication.corrupt_blocks, bad.len() as u64);
                    let reason = format!(
                        "scrub: {} block(s) of layer {file} do not match their hashes (first: block {})",
                        bad.len(),
                        bad[0]
                    );
                    tracing::error!(vdisk = %vdisk, layer = %file, blocks = ?bad, "{reason}; not offered until repaired");
                    server.replication.mark_corrupt(&vdisk, file, reason);
                    forget(server, &vdisk, file);
                    server.membership.publish_now.notify_one();
                    // Layers above read through this one: check them once it is repaired.
                    break;
                }
                Err(e) => {
                    tracing::error!(vdisk = %vdisk, layer = %file, error = %e, "scrub could not read the layer");
                    server.replication.mark_corrupt(
                        &vdisk,
                        file,
                        format!("scrub: unreadable: {e}"),
                    );
                    forget(server, &vdisk, file);
                    break;
                }
            }
        }
    }
}

/// A layer found corrupt is no longer taken as checked: after a restart it
/// is read in full before it is offered, repaired or not.
fn forget(server: &Handles, vdisk: &str, file: &str) {
    if let Err(e) = server.store.forget_checked(vdisk, &[file.to_owned()]) {
        tracing::warn!(vdisk = %vdisk, layer = %file, error = %e, "could not forget the layer's check in the verification record");
    }
}

/// Tries to repair every corrupt layer from a peer.
fn repair_all(server: &Handles) {
    let corrupt: Vec<(String, String)> =
        server.replication.corrupt.lock().keys().cloned().collect();
    if corrupt.is_empty() {
        return;
    }
    let _low_io = LowIo::enter();
    for (vdisk, file) in corrupt {
        match repair(server, &vdisk, &file) {
            Ok(n) => {
                Metrics::add(&server.replication.repaired_blocks, n);
                server.replication.clear_corrupt(&vdisk, &file);
                server.membership.publish_now.notify_one();
                tracing::info!(vdisk = %vdisk, layer = %file, blocks = n, "layer repaired from a peer; offered again");
            }
            Err(e) => {
                tracing::warn!(vdisk = %vdisk, layer = %file, error = %e, "repair waits")
            }
        }
    }
}

/// Fetches the bad blocks of layer `file` again; the number repaired.
fn repair(server: &Handles, vdisk: &str, file: &str) -> Result<u64, String> {
    // The chain of a held version that has this layer, up to it.
    let held = server.membership.held();
    let files = held
        .iter()
        .find(|v| v.vdisk == vdisk && v.layers.iter().any(|l| l == file))
        .map(|v| v.layers.clone())
        .ok_or("no held version uses the layer any more")?;
    let i = files.iter().position(|l| l == file).unwrap_or(0);
    let chain = open_chain(server, vdisk, &files[..=i]).ok_or("the layers cannot be opened")?;
    let bad = bad_blocks(server, &chain, i).map_err(|e| e.to_string())?;
    if bad.is_empty() {
        return Ok(0);
    }
    let view = server.membership.view();
    let peers = super::transfer::peers_for(server, &view.servers, vdisk, &[file.to_owned()])?;
    let secret = server
        .replication
        .secret()
        .ok_or("the farm's peer secret is not known yet")?;
    let path = server
        .store
        .layer_path(vdisk, file)
        .map_err(|e| e.to_string())?;
    let target = Incoming::repair(&path).map_err(|e| e.to_string())?;
    let agent = peer::agent(&server.replication);
    let per = HASH_BLOCK / CHUNK;
    for &block in &bad {
        let (from, to) = (block * per, (block + 1) * per);
        let mut last = String::new();
        let mut fixed = false;
        for p in &peers {
            let got = peer::PeerClient::new(&agent, p, &secret, &server.config.name)
                .and_then(|c| c.data_vec(vdisk, file, (from, to)));
            match got {
                Ok(data) => {
                    Metrics::add(&server.replication.received_bytes, data.len() as u64);
                    target
                        .write_range(from, to, &data)
                        .map_err(|e| e.to_string())?;
                    fixed = true;
                    break;
                }
                Err(e) => last = e,
            }
        }
        if !fixed {
            return Err(format!("no peer gave block {block}: {last}"));
        }
    }
    std::fs::File::open(&path)
        .and_then(|f| f.sync_all())
        .map_err(|e| e.to_string())?;
    let still = bad_blocks(server, &chain, i).map_err(|e| e.to_string())?;
    if !still.is_empty() {
        return Err(format!("blocks {still:?} still fail after the repair"));
    }
    Ok(bad.len() as u64)
}
