//! Copying one version's missing layers from peers.
//!
//! Each layer is received into `replication/NAME/FILE.partial` in segments
//! of 16 MiB of logical disk, by workers (4, spread over up to
//! [`peer::MAX_PEERS`] peers) taking segments from a shared queue, so several
//! peers serve one transfer at once. A segment is recorded in the journal once its
//! data is durable; after a crash or a cut the transfer resumes with the
//! segments not recorded. A peer that fails hands its segment back and
//! drops out; the others finish. When every layer is here, the whole
//! version is read against its block hashes and the catalog's content hash
//! before the store takes it.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use vstream_api::{Catalog, ServerStatus};
use vstream_image::hash;
use vstream_image::replica::{Incoming, SEGMENT_CHUNKS};
use vstream_image::{verify_layers_where, ImageError, LayerCheck};

use super::handles::Handles;
use super::peer::{self, Peer};
use super::state::Key;
use vstream_service::metrics::Metrics;

/// Requests in flight for one layer, spread over its peers.
const STREAMS: usize = 4;
/// How often received segments are made durable and journalled.
const COMMIT_EVERY: Duration = Duration::from_millis(500);

/// The live peers holding verified copies of each of `files`; an error
/// names a file no live peer holds.
pub fn peers_for(
    server: &Handles,
    servers: &[ServerStatus],
    vdisk: &str,
    files: &[String],
) -> Result<Vec<Peer>, String> {
    let mut all = Vec::new();
    for f in files {
        let holders = holders(server, servers, vdisk, f);
        if holders.is_empty() {
            return Err(format!(
                "no live server holds layer {f} verified; waiting for one"
            ));
        }
        for p in holders {
            if !all.contains(&p) {
                all.push(p);
            }
        }
    }
    Ok(all)
}

/// Live servers that published `file` of `vdisk` verified; failing that, the
/// live servers that made a version using it (a version just sealed, before
/// its maker's next status).
fn holders(server: &Handles, servers: &[ServerStatus], vdisk: &str, file: &str) -> Vec<Peer> {
    let tls = server.replication.peer_tls().is_some();
    let peer = |s: &ServerStatus| Peer::of(s, tls);
    let others = servers.iter().filter(|s| s.name != server.config.name);
    let verified: Vec<Peer> = others
        .clone()
        .filter(|s| {
            s.versions
                .iter()
                .any(|v| v.vdisk == vdisk && v.verified && v.layers.iter().any(|l| l == file))
        })
        .map(peer)
        .collect();
    if !verified.is_empty() {
        return verified;
    }
    let catalogs = server.replication.catalogs();
    let makers: Vec<&str> = catalogs
        .iter()
        .filter(|c| c.vdisk == vdisk)
        .flat_map(|c| c.versions.iter())
        .filter(|v| v.is_replicated() && v.version.layers.iter().any(|l| l == file))
        .map(|v| v.server.as_str())
        .collect();
    others
        .filter(|s| makers.contains(&s.name.as_str()))
        .map(peer)
        .collect()
}

/// Copies version `number` of `cat` (whose layers `missing` are not here),
/// then lets the store take it.
pub async fn run(server: Arc<Handles>, cat: Catalog, number: u32, missing: Vec<String>) {
    let key: Key = (cat.vdisk.clone(), number);
    let r = &server.replication;
    let s = server.clone();
    let c = cat.clone();
    let files = missing.clone();
    let copied = tokio::task::spawn_blocking(move || copy_version(&s, &c, number, &files)).await;
    let outcome = match copied {
        Ok(Ok(())) => {
            let _lock = server.sessions.lock_vdisk(&cat.vdisk).await;
            // The catalog as it is now, not as it was when the copy began: a
            // change made here meanwhile (a promote) must not be undone.
            match server.farm.catalog(&cat.vdisk).await {
                Ok(Some(now)) => super::follow::follow(&server, &now, &missing)
                    .await
                    .map_err(|e| e.to_string()),
                Ok(None) => Err(format!("vDisk {} left the farm's catalog", cat.vdisk)),
                Err(e) => Err(format!("reading the farm's catalog: {e}")),
            }
        }
        Ok(Err(e)) => Err(e),
        Err(e) => Err(format!("the transfer task failed: {e}")),
    };
    match outcome {
        Ok(_) => {
            let hash = cat
                .version(number)
                .and_then(|v| v.version.content_hash.clone())
                .unwrap_or_default();
            server.membership.verified_here(&cat.vdisk, number, &hash);
            tracing::info!(vdisk = %cat.vdisk, version = number, "replica copied and verified");
            r.progress.lock().remove(&key);
            server.membership.publish_now.notify_one();
        }
        Err(e) => {
            tracing::warn!(vdisk = %cat.vdisk, version = number, error = %e, "replication stopped; it resumes where it stopped");
            r.set_progress(&key, vstream_api::ReplicaState::Queued, Some(e));
            // Not straight back at a failing peer.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    r.running.lock().remove(&key);
}

fn copy_version(
    server: &Handles,
    cat: &Catalog,
    number: u32,
    missing: &[String],
) -> Result<(), String> {
    let _low_io = crate::io::LowIo::enter();
    let name = &cat.vdisk;
    let version = &cat
        .version(number)
        .ok_or_else(|| format!("version {number} left the catalog"))?
        .version;
    let dir = server.store.replication_dir(name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let key: Key = (name.clone(), number);
    let started = Instant::now();
    let done_before = Arc::new(Mutex::new(0u64));
    for file in missing {
        // Another version's transfer may be receiving it: then it waits,
        // and finds the file here.
        let _claim = server.replication.claim_layer(name, file);
        let in_store = server
            .store
            .layer_path(name, file)
            .is_ok_and(|p| p.exists());
        if in_store || dir.join(file).exists() {
            continue;
        }
        let view = server.membership.view();
        let peers: Vec<Peer> = holders(server, &view.servers, name, file)
            .into_iter()
            .take(peer::MAX_PEERS)
            .collect();
        if peers.is_empty() {
            return Err(format!("no live server holds layer {file} verified"));
        }
        let from: Vec<&str> = peers.iter().map(|p| p.name.as_str()).collect();
        tracing::info!(vdisk = %name, version = number, layer = %file, peers = ?from, "copying a layer");
        // The layer's own content hash, when a version has it as its top;
        // a layer that tops a one-layer version is checked as it arrives.
        let own = cat
            .versions
            .iter()
            .find(|v| v.version.layers.last() == Some(file));
        let target = Target {
            file,
            expected: own
                .and_then(|v| v.version.content_hash.as_deref())
                .and_then(hash::from_hex),
            bottom: own.is_some_and(|v| v.version.layers.len() == 1),
        };
        copy_layer(server, &key, &peers, &dir, &target, started, &done_before)?;
    }
    tracing::info!(vdisk = %name, version = number, "every layer here: checking the version");
    // Every layer here: check the whole version before the store takes it.
    let expected = version
        .content_hash
        .clone()
        .ok_or_else(|| format!("version {number} has no content hash"))?;
    let layers = version
        .layers
        .iter()
        .map(|f| {
            let in_store = server
                .store
                .layer_path(name, f)
                .map_err(|e| e.to_string())?;
            let path = if in_store.exists() {
                in_store
            } else {
                dir.join(f)
            };
            server
                .store
                .open_layer_at(&path, cat.size)
                .map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, String>>()?;
    // Layers of versions verified here were checked before: only the new
    // ones are read (a delta costs its own size), then the whole tree.
    let checked_here = |f: &String| {
        server.store.properties(name).is_ok_and(|p| {
            p.versions.iter().any(|v| {
                v.layers.contains(f)
                    && v.content_hash
                        .as_deref()
                        .is_some_and(|h| server.membership.is_verified(name, v.number, h))
            })
        })
    };
    let check: Vec<LayerCheck> = version
        .layers
        .iter()
        .map(|f| {
            if missing.contains(f) {
                LayerCheck::Partial
            } else if checked_here(f) {
                LayerCheck::Skip
            } else {
                LayerCheck::Full
            }
        })
        .collect();
    if let Err(e) = verify_layers_where(&layers, &expected, |i| check[i]) {
        // A received file that fails is dropped, to be fetched again.
        for f in missing {
            let _ = std::fs::remove_file(dir.join(f));
        }
        return Err(format!("the copy failed verification, fetching again: {e}"));
    }
    Ok(())
}

/// Data one request asks for at most: consecutive segments with little
/// data in them (a delta) go in one request, not one each.
const BATCH_BYTES: u64 = 4 << 20;

/// Takes the next segments to ask for: the first in the queue, and the
/// ones right after it while their data stays under [`BATCH_BYTES`].
fn take_batch(queue: &Mutex<VecDeque<usize>>, inc: &Incoming) -> Vec<usize> {
    let mut q = queue.lock();
    let Some(first) = q.pop_front() else {
        return Vec::new();
    };
    let (from, to) = inc.segment(first);
    let mut bytes = inc.data_len(from, to);
    let mut segs = vec![first];
    let most = (peer::MAX_REQUEST_CHUNKS / SEGMENT_CHUNKS) as usize;
    while let Some(&next) = q.front() {
        let (from, to) = inc.segment(next);
        let more = inc.data_len(from, to);
        if next != first + segs.len() || segs.len() >= most || bytes + more > BATCH_BYTES {
            break;
        }
        q.pop_front();
        bytes += more;
        segs.push(next);
    }
    segs
}

/// A layer to receive.
struct Target<'a> {
    file: &'a str,
    /// The content hash its header must carry, when the catalog says.
    expected: Option<hash::Hash>,
    /// Nothing lies below it in its version.
    bottom: bool,
}

/// Receives one layer, resuming a partial file, from `peers` at once.
fn copy_layer(
    server: &Handles,
    key: &Key,
    peers: &[Peer],
    dir: &Path,
    target: &Target,
    started: Instant,
    done_before: &Arc<Mutex<u64>>,
) -> Result<(), String> {
    let file = target.file;
    let r = &server.replication;
    let secret = r
        .secret()
        .ok_or("the farm's peer secret is not known yet")?;
    let me = &server.config.name;
    let agent = peer::agent(r);
    let mut meta = Err(String::from("no peer"));
    for p in peers {
        meta = peer::PeerClient::new(&agent, p, &secret, me).and_then(|c| c.meta(&key.0, file));
        if meta.is_ok() {
            break;
        }
    }
    let meta = meta?;
    Metrics::add(&r.received_bytes, meta.len() as u64);
    let partial = dir.join(format!("{file}.partial"));
    let mut inc = Incoming::open(&partial, &meta, target.expected).map_err(|e| e.to_string())?;
    inc.set_bottom(target.bottom);
    let queue: Mutex<VecDeque<usize>> = Mutex::new(inc.missing().into());
    let (already, total) = inc.progress();
    if already > 0 {
        tracing::info!(vdisk = %key.0, layer = %file, bytes = already, "resuming a partial copy");
    }
    let base = *done_before.lock();
    let received = Mutex::new(already);
    let inc = RwLock::new(inc);
    let pending: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    let last_commit = Mutex::new(Instant::now());
    let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let commit = |force: bool| -> Result<(), String> {
        // One commit at a time; the others go back to receiving.
        let mut last = match last_commit.try_lock() {
            Some(l) => l,
            None if !force => return Ok(()),
            None => last_commit.lock(),
        };
        if !force && last.elapsed() < COMMIT_EVERY {
            return Ok(());
        }
        let segs: Vec<usize> = std::mem::take(&mut *pending.lock());
        // The sync under a shared lock: the other workers keep writing.
        inc.read().sync().map_err(|e| e.to_string())?;
        inc.write().record(&segs).map_err(|e| e.to_string())?;
        *last = Instant::now();
        Ok(())
    };
    // Several requests in flight per peer, so that the network, the
    // sender's reads and our writes overlap.
    let per_peer = (STREAMS / peers.len()).max(1);
    std::thread::scope(|scope| {
        for p in peers.iter().flat_map(|p| std::iter::repeat_n(p, per_peer)) {
            let (queue, inc, received, pending, failures) =
                (&queue, &inc, &received, &pending, &failures);
            let commit = &commit;
            let agent = agent.clone();
            let secret = secret.clone();
            scope.spawn(move || {
                let _low_io = crate::io::LowIo::enter();
                loop {
                    let segs = take_batch(queue, &inc.read());
                    let (Some(&first), Some(&last)) = (segs.first(), segs.last()) else {
                        return;
                    };
                    let from = inc.read().segment(first).0;
                    let to = inc.read().segment(last).1;
                    let len = inc.read().data_len(from, to);
                    if len > 0 {
                        r.throttle.take(len);
                        let got = peer::PeerClient::new(&agent, p, &secret, me).and_then(|c| {
                            c.data(&key.0, file, (from, to), |body| {
                                inc.read()
                                    .read_range(from, to, body)
                                    .map_err(|e| e.to_string())
                            })
                        });
                        if let Err(e) = got {
                            queue.lock().extend(segs);
                            tracing::warn!(peer = %p.name, layer = %file, error = %e, "a peer failed; the others go on");
                            failures.lock().push(e);
                            return;
                        }
                        Metrics::add(&r.received_bytes, len);
                        tracing::debug!(peer = %p.name, layer = %file, bytes = len, segments = segs.len(), "received");
                    }
                    pending.lock().extend(segs);
                    let now = {
                        let mut n = received.lock();
                        *n += len;
                        *n
                    };
                    let secs = started.elapsed().as_secs_f64().max(0.001);
                    r.update_bytes(key, base + now, base + total, ((base + now) as f64 / secs) as u64);
                    if let Err(e) = commit(false) {
                        failures.lock().push(e);
                        return;
                    }
                }
            });
        }
    });
    let mut inc = inc.into_inner();
    let last: Vec<usize> = std::mem::take(&mut *pending.lock());
    let arrived = inc.missing().iter().all(|i| last.contains(i));
    if arrived {
        // Complete: `finish` makes it durable as a whole.
        inc.mark_arrived(&last);
    } else {
        inc.commit(&last).map_err(|e| e.to_string())?;
    }
    if !inc.missing().is_empty() {
        let why = failures.lock().join("; ");
        return Err(format!(
            "{} segments of layer {file} could not be fetched: {why}",
            inc.missing().len()
        ));
    }
    inc.finish(&dir.join(file))
        .map_err(|e: ImageError| e.to_string())?;
    *done_before.lock() += total;
    Ok(())
}
