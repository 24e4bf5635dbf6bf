//! Sessions: export opening and the live device sessions, with the
//! per-vDisk locks that keep a version operation and a session start apart.
//!
//! Every connection to the same vDisk shares one set of open layers (the
//! store hands out one object per layer file), so that a read-only view sees a
//! Private-mode device's writes, and so that a FLUSH on one connection covers
//! the writes of all of them (hence CAN_MULTI_CONN).
//!
//! Which version a device gets is decided when its session starts and kept
//! until the session ends: nothing changes under a running OS.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use vstream_api::{BootRecord, Device, DeviceInfo, DeviceType, Mode, VDisk};
use vstream_farm::{DeviceKey, FarmStore};
use vstream_image::{
    BootRecorder, Chain, Disk, ImageError, Layer, Properties, Store, VersionState,
};
use vstream_pipeline::Local;

use crate::bootsets::BootSets;
use crate::clock::now_unix;
use crate::config::Config;
use crate::membership::Membership;
use crate::quarantine::Quarantine;
use crate::replication::state::Replication;
use access::{Claim, Holder, Wants};
use vstream_service::metrics::Metrics;
use vstream_service::Client;

mod access;

/// The sessions of one server, with the handles opening an export takes.
pub struct Sessions {
    pub(crate) config: Arc<Config>,
    pub(crate) store: Store,
    farm: FarmStore,
    pub(crate) metrics: Arc<Metrics>,
    membership: Arc<Membership>,
    quarantine: Arc<Quarantine>,
    /// Which layers failed their scrub (a base export of one is refused).
    replication: Arc<Replication>,
    /// Whether NBD connections may or must use TLS, with the credentials.
    pub(crate) tls: vstream_service::Tls,
    sessions: Mutex<HashMap<String, Session>>,
    /// The next [`Session::id`].
    next_session: AtomicU64,
    /// Connects, disconnects, refusals and full caches of devices.
    pub events: crate::events::Events,
    /// Per-vDisk lock: a version operation and a device session starting on
    /// the same vDisk never overlap, so "is it in use?" stays true while acted on.
    vdisk_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// What devices read while they boot, per version (`crate::bootsets`).
    pub boot_sets: Arc<BootSets>,
}

/// The front door a device's session came through: a device is never
/// connected by NBD and iSCSI at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    Nbd,
    Iscsi,
}

impl std::fmt::Display for Door {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Door::Nbd => "NBD",
            Door::Iscsi => "iSCSI",
        })
    }
}

/// A device's live session: one or more connections to its disk, all
/// through one front door.
struct Session {
    door: Door,
    vdisk: String,
    version: u32,
    kind: DeviceType,
    mode: Mode,
    connections: usize,
    since: u64,
    peer: String,
    disk: Arc<Disk>,
    /// The device keeps its write cache itself; only its base streams from
    /// here. Turning this true lets it go (it moves to another server).
    release: Option<tokio::sync::watch::Sender<bool>>,
    /// Turning this true closes the session's connections (`device reset
    /// --force`); a device-side-cache session watches `release` instead.
    kick: tokio::sync::watch::Sender<bool>,
    /// Bytes in its device-side cache, as its agent reports them.
    reported_cache: u64,
    /// Tells this session from a later one of the same device.
    id: u64,
    /// The number of the device's boot it belongs to (0: none recorded).
    boot_seq: u64,
    /// A newer boot of the device began: the session ends as soon as its
    /// connections have closed, and a Standard-mode cache goes with it.
    superseded: bool,
    /// Its last connection has closed and its end is being done (flush,
    /// cache discarded): no connection joins it, a new one waits.
    ending: bool,
    /// How full its write cache was last seen: 0, 80 (%) or 100.
    cache_seen: u8,
    /// Notes its boot's reads into its version's boot set.
    boot: Option<Arc<BootRecorder>>,
}

/// How long a device's new connection waits for a session that is ending
/// (a previous boot's, kicked): a little over the TCP user timeout, which
/// bounds a reply stuck on a dead peer.
const ENDING_WAIT: Duration = Duration::from_secs(40);

pub use vstream_service::{Export, OpenError};

/// Held by each connection of a device session.
pub struct SessionGuard {
    sessions: Arc<Sessions>,
    device: String,
    /// The session's [`Session::id`].
    id: u64,
    /// Set when the client ended with NBD_CMD_DISC: a Standard-mode cache is then discarded.
    pub clean: bool,
    release: Option<tokio::sync::watch::Receiver<bool>>,
}

impl vstream_service::SessionEnd for SessionGuard {
    fn ended_cleanly(&mut self) {
        self.clean = true;
    }
    fn released(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        self.release.clone()
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.sessions
            .end_connection(&self.device, self.id, self.clean);
    }
}

/// Refuses a connection of `device` through `door` while its session `s`
/// came through the other one.
fn other_door(device: &str, s: &Session, door: Door) -> Result<(), OpenError> {
    if s.door == door {
        return Ok(());
    }
    Err(OpenError::Refused(format!(
        "device {device} is connected over {} from {}; a device is never connected by NBD \
         and iSCSI at once: its {door} connection waits until that session ends",
        s.door, s.peer
    )))
}

/// A fresh boot identity: 128 random bits in hex.
pub fn new_boot_token() -> String {
    (0..16)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// Refusal of a connection while the device's session of an earlier boot,
/// or its last one, is still closing.
fn still_ending(device: &str) -> OpenError {
    OpenError::Refused(format!(
        "device {device}'s previous session is still closing; try again in a moment"
    ))
}

/// Refuses, as [`OpenError::Invalid`], an export name that no export can
/// have, before anything is looked up: `device/KEY` and `base/KEY@N/HASH`
/// need a device name or a device's MAC address, `VDISK[@N]` a valid vDisk
/// name and a number. A well-formed name that names nothing is left to the
/// lookup ([`OpenError::Unknown`]).
/// Splits a device's export name into the name and the boot identity it
/// names: `device/KEY;boot=TOKEN`, `base/DEVICE@N/HASH;boot=TOKEN`.
pub fn split_boot(name: &str) -> Result<(&str, Option<&str>), OpenError> {
    let Some((bare, query)) = name.split_once(';') else {
        return Ok((name, None));
    };
    let invalid = |why: String| OpenError::Invalid(name.to_owned(), why);
    if !bare.starts_with("device/") && !bare.starts_with("base/") {
        return Err(invalid("only a device's export names a boot".into()));
    }
    let token = query
        .strip_prefix("boot=")
        .ok_or_else(|| invalid("the one thing after ';' is boot=TOKEN".into()))?;
    vstream_api::check_boot_token(token).map_err(invalid)?;
    Ok((bare, Some(token)))
}

fn check_export_name(name: &str) -> Result<(), OpenError> {
    let invalid = |why: String| OpenError::Invalid(name.to_owned(), why);
    let (name, _) = split_boot(name)?;
    if let Some(key) = name.strip_prefix("device/") {
        DeviceKey::parse(key).map_err(|e| invalid(e.to_string()))?;
    } else if let Some(rest) = name.strip_prefix("base/") {
        let (key, _, _) = crate::login::parse_base_export(rest)
            .ok_or_else(|| invalid("a base export is base/DEVICE@VERSION/HASH".into()))?;
        DeviceKey::parse(key).map_err(|e| invalid(e.to_string()))?;
    } else {
        let (vdisk, version) = match name.split_once('@') {
            Some((v, n)) => (v, Some(n)),
            None => (name, None),
        };
        vstream_farm::validate_name(vdisk).map_err(|e| invalid(e.to_string()))?;
        if version.is_some_and(|n| n.parse::<u32>().is_err()) {
            return Err(invalid(
                "a version export is VDISK@VERSION, VERSION a number".into(),
            ));
        }
    }
    Ok(())
}

fn describe(device: &Device, vdisk: &VDisk, version: u32) -> String {
    format!(
        "device {} ({}) on vDisk {} version {version} ({} mode)",
        device.name, device.kind, vdisk.name, vdisk.mode
    )
}

/// The content hash a server serves `chain` as: the recorded one of a
/// sealed version, else its top layer's while no one writes it.
fn served_hash(chain: &Chain) -> Option<String> {
    chain
        .version
        .content_hash
        .clone()
        .filter(|_| chain.version.is_sealed())
        .or_else(|| {
            chain
                .layers
                .last()
                .and_then(|l| l.content_hash())
                .map(|h| vstream_image::hash::to_hex(&h))
        })
}

impl Sessions {
    pub fn new(
        config: Arc<Config>,
        store: Store,
        farm: FarmStore,
        metrics: Arc<Metrics>,
        membership: Arc<Membership>,
        quarantine: Arc<Quarantine>,
        replication: Arc<Replication>,
    ) -> Sessions {
        Sessions {
            events: crate::events::Events::new(farm.clone(), config.name.clone()),
            boot_sets: Arc::new(BootSets::new(
                store.clone(),
                Duration::from_secs(config.boot_window_secs),
                config.boot_set_budget,
            )),
            config,
            store,
            farm,
            metrics,
            membership,
            quarantine,
            replication,
            tls: vstream_service::Tls::off(),
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            vdisk_locks: Mutex::new(HashMap::new()),
        }
    }

    /// Serves its NBD connections with `tls`.
    pub fn with_tls(mut self, tls: vstream_service::Tls) -> Sessions {
        self.tls = tls;
        self
    }

    /// The lock of vDisk `name` (see `vdisk_locks`).
    fn vdisk_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.vdisk_locks
            .lock()
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// Takes the lock of vDisk `name`.
    pub async fn lock_vdisk(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        self.vdisk_lock(name).lock_owned().await
    }

    /// Takes the lock of vDisk `name` if it is free now.
    pub fn try_lock_vdisk(&self, name: &str) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        self.vdisk_lock(name).try_lock_owned().ok()
    }

    /// The newest production version of vDisk `name`.
    pub fn production(&self, name: &str) -> Result<Chain, ImageError> {
        let props = self.store.properties(name)?;
        let v = props.newest(VersionState::Production).ok_or_else(|| {
            ImageError::Invalid(format!("vDisk {name} has no production version"))
        })?;
        self.store.chain(name, v.number)
    }

    /// Resolves an export name for a new connection (`go`) or for a query.
    /// `client` opens only what its identity lets it (the `access` module).
    pub async fn open_export(
        self: &Arc<Self>,
        name: &str,
        client: &Client,
        go: bool,
    ) -> Result<Export, OpenError> {
        check_export_name(name)?;
        let (bare, boot) = split_boot(name)?;
        let holder = self.holder(client).await?;
        let peer = client.addr.as_str();
        if let Some(dev) = bare.strip_prefix("device/") {
            let opened = match self.admit(&holder, Wants::Device(bare, dev)).await {
                Ok(()) => self.open_device(dev, boot, peer, go, Door::Nbd).await,
                Err(e) => Err(e),
            };
            if go {
                self.note_refusal(dev, &opened);
            }
            return opened;
        }
        if let Some(rest) = bare.strip_prefix("base/") {
            if let Some((key, _, _)) = crate::login::parse_base_export(rest) {
                self.admit(&holder, Wants::Device(bare, key)).await?;
            }
            return self.open_base(rest, boot, peer, go).await;
        }
        let (vdisk, version) = match name.split_once('@') {
            Some((v, n)) => (
                v,
                Some(
                    n.parse::<u32>()
                        .map_err(|_| OpenError::Unknown(name.to_owned()))?,
                ),
            ),
            None => (name, None),
        };
        if vdisk.is_empty() || vdisk.contains('/') || !self.store.exists(vdisk) {
            return Err(OpenError::Unknown(name.to_owned()));
        }
        self.admit(&holder, Wants::VDisk(vdisk)).await?;
        let chain = match version {
            Some(n) => self
                .store
                .chain(vdisk, n)
                .map_err(|_| OpenError::Unknown(name.to_owned()))?,
            None => self
                .production(vdisk)
                .map_err(|e| OpenError::Failed(format!("opening vDisk {vdisk}: {e}")))?,
        };
        Ok(Export {
            name: name.to_owned(),
            description: format!("vDisk {vdisk} version {} (read-only)", chain.version.number),
            backend: Local::new(Arc::new(chain.read_only())),
            session: None,
        })
    }

    /// Who `client` is: the device its certificate names, checked against
    /// the farm state now (so a removed or revoked device is refused at once).
    async fn holder(&self, client: &Client) -> Result<Holder, OpenError> {
        match access::claim(self.tls.mode, client)? {
            Claim::Known(holder) => Ok(holder),
            Claim::Device(name, cert) => {
                access::device_holder(name, cert, self.device_and_vdisk(name).await)
            }
        }
    }

    /// Refuses `wants` unless `holder` may open it.
    async fn admit(&self, holder: &Holder, wants: Wants<'_>) -> Result<(), OpenError> {
        let anonymous_read = match &wants {
            Wants::VDisk(name) if access::asks_anonymous_read(holder, &wants) => {
                self.anonymous_read(name).await
            }
            _ => false,
        };
        access::admit(holder, wants, anonymous_read)
    }

    /// Whether vDisk `name` is open to anonymous readers, by the farm state
    /// (the last known one while it is away).
    async fn anonymous_read(&self, name: &str) -> bool {
        if self.membership.is_connected() {
            if let Ok(found) = self.farm.get_vdisk(name).await {
                return found.is_some_and(|v| v.anonymous_read);
            }
        }
        self.membership
            .view()
            .vdisk(name)
            .is_some_and(|v| v.anonymous_read)
    }

    /// The exports NBD_OPT_LIST shows `client`: what it may open, by the
    /// farm state now.
    pub(crate) async fn listed(&self, client: &Client) -> Vec<(String, String)> {
        let Ok(holder) = self.holder(client).await else {
            // Names no device (or a revoked one): nothing opens for it.
            return Vec::new();
        };
        let mut list = Vec::new();
        if let Holder::Device(d) = &holder {
            let name = &d.0.name;
            list.push((format!("device/{name}"), format!("device {name}'s disk")));
        }
        for n in self.store.list().unwrap_or_default() {
            if self.admit(&holder, Wants::VDisk(&n)).await.is_ok() {
                let description = format!("vDisk {n} (read-only)");
                list.push((n, description));
            }
        }
        list
    }

    /// Refuses a vDisk whose local copy is quarantined: it is not the farm's.
    fn not_quarantined(&self, vdisk: &str) -> Result<(), OpenError> {
        if self.quarantine.contains(vdisk) {
            return Err(OpenError::Refused(format!(
                "this server's copy of vDisk {vdisk} is quarantined (not the farm's vDisk {vdisk}); \
                 see `vstream quarantine list`"
            )));
        }
        Ok(())
    }

    /// A device or its vDisk, from the farm view (so it works while the farm
    /// store is away), else from the farm store.
    pub(crate) async fn device_and_vdisk(&self, key: &str) -> Result<(Device, VDisk), OpenError> {
        // Checked by `check_export_name` already; the farm store and the view
        // must read the key the same way: a MAC if it is written as one.
        let parsed = DeviceKey::parse(key)
            .map_err(|e| OpenError::Invalid(format!("device/{key}"), e.to_string()))?;
        let from_farm = async {
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
            Ok((device, vdisk))
        };
        if self.membership.is_connected() || self.membership.view().devices.is_empty() {
            match from_farm.await {
                Err(OpenError::Failed(e)) => {
                    tracing::warn!(error = %e, "farm state unreachable; using the last known state")
                }
                other => return other,
            }
        }
        // Degraded, or the store just failed: the last known state answers.
        let view = self.membership.view();
        let cached = view
            .find_device(&parsed)
            .and_then(|d| Some((d.clone(), view.vdisk(&d.vdisk)?.clone())));
        cached.ok_or_else(|| {
            OpenError::Failed(format!(
                "device {key} is not in the last known farm state, and the farm state is unreachable"
            ))
        })
    }

    /// `base/DEVICE@N/HASH`: version N of the device's vDisk, read-only, for
    /// an agent that keeps the device's write cache itself. Refused unless
    /// this server holds exactly those bytes.
    async fn open_base(
        self: &Arc<Self>,
        rest: &str,
        token: Option<&str>,
        peer: &str,
        go: bool,
    ) -> Result<Export, OpenError> {
        let name = format!("base/{rest}");
        let (key, number, hash) = crate::login::parse_base_export(rest)
            .ok_or_else(|| OpenError::Unknown(name.clone()))?;
        let (device, vdisk) = self.device_and_vdisk(key).await?;
        self.not_quarantined(&vdisk.name)?;
        if vdisk.mode != Mode::Standard {
            return Err(OpenError::Refused(format!(
                "vDisk {} is in {} mode; device {} opens device/{}",
                vdisk.name, vdisk.mode, device.name, device.name
            )));
        }
        let chain = self
            .store
            .chain(&vdisk.name, number)
            .map_err(|e| OpenError::Refused(format!("this server cannot serve {name}: {e}")))?;
        let held = served_hash(&chain);
        if held.as_deref() != Some(hash) {
            return Err(OpenError::Refused(format!(
                "this server's version {number} of vDisk {} is not content {hash}",
                vdisk.name
            )));
        }
        if self
            .replication
            .is_corrupt(&vdisk.name, &chain.version.layers)
        {
            return Err(OpenError::Refused(format!(
                "this server's copy of version {number} of vDisk {} failed its scrub and is being repaired",
                vdisk.name
            )));
        }
        // This server's own check, whatever another server's view said.
        self.membership
            .ensure_verified(&vdisk.name, number, hash)
            .await
            .map_err(OpenError::Refused)?;
        let description = format!("{} (base, read-only)", describe(&device, &vdisk, number));
        let disk = Arc::new(chain.read_only());
        if !go {
            return Ok(Export {
                name,
                description,
                backend: Local::new(disk),
                session: None,
            });
        }
        let boot = self.session_boot(&device.name, token).await?;
        let boot_seq = boot.as_ref().map_or(0, |b| b.seq);
        let recorder =
            self.boot_sets
                .recorder(&vdisk.name, number, vdisk.size, boot.map(|b| b.since_unix));
        let release;
        let id;
        let new_session;
        let boot_reads;
        {
            let mut sessions = self.sessions.lock();
            if let Some(s) = sessions.get(&device.name) {
                if s.ending || s.superseded {
                    return Err(still_ending(&device.name));
                }
                other_door(&device.name, s, Door::Nbd)?;
            }
            new_session = !sessions.contains_key(&device.name);
            let s = sessions
                .entry(device.name.clone())
                .or_insert_with(|| Session {
                    door: Door::Nbd,
                    vdisk: vdisk.name.clone(),
                    version: number,
                    kind: device.kind,
                    mode: vdisk.mode,
                    connections: 0,
                    since: now_unix(),
                    peer: peer.to_owned(),
                    disk: disk.clone(),
                    release: Some(tokio::sync::watch::channel(false).0),
                    kick: tokio::sync::watch::channel(false).0,
                    reported_cache: 0,
                    id: self.next_session.fetch_add(1, Ordering::Relaxed),
                    boot_seq,
                    superseded: false,
                    ending: false,
                    cache_seen: 0,
                    boot: recorder,
                });
            if s.release.as_ref().is_some_and(|r| *r.borrow()) {
                // Released, and back (no other server could take it): a new
                // signal, so this connection is not let go at once.
                s.release = Some(tokio::sync::watch::channel(false).0);
            }
            s.connections += 1;
            release = s.release.as_ref().map(|r| r.subscribe());
            id = s.id;
            boot_reads = s.boot.clone();
        }
        tracing::info!(device = %device.name, vdisk = %vdisk.name, version = number, %peer, "device streaming its base");
        if new_session {
            self.events.record(
                &device.name,
                vstream_api::EventKind::Connect,
                format!("over NBD from {peer}, version {number}, its cache on the device"),
            );
        }
        Ok(Export {
            name,
            description,
            backend: Local::recording(disk, boot_reads),
            session: Some(Box::new(SessionGuard {
                sessions: self.clone(),
                device: device.name.clone(),
                id,
                clean: false,
                release,
            })),
        })
    }

    /// Device `device`'s current boot, once `token` (the boot its client
    /// names, if any) is recorded farm-wide; a token other than the
    /// device's current one starts its next boot. Sessions of the device's
    /// earlier boots here are ended (see [`Sessions::end_earlier_boots`]).
    /// `None`: no boot of the device was ever recorded, and `token` is none.
    /// While the farm state is unreachable, a new token is a new boot on
    /// this server only.
    pub async fn boot_of(
        &self,
        device: &str,
        token: Option<&str>,
        source: &str,
    ) -> Option<BootRecord> {
        let farm = match (self.membership.is_connected(), token) {
            (false, _) => None,
            (true, Some(t)) => Some(
                self.farm
                    .announce_boot(device, t, source, now_unix())
                    .await
                    .map(|(boot, new)| {
                        if new {
                            tracing::info!(device, boot = boot.seq, source, "device booted");
                        }
                        Some(boot)
                    }),
            ),
            (true, None) => Some(self.farm.get_boot(device).await),
        };
        let boot = match farm {
            Some(Ok(boot)) => boot,
            failed => {
                if let Some(Err(e)) = failed {
                    tracing::warn!(device, error = %e, "farm state unreachable; the device's boot is judged from the last known state");
                }
                let known = self.membership.view().boots.get(device).cloned();
                match (token, known) {
                    (Some(t), known) if known.as_ref().is_none_or(|k| k.token != t) => {
                        let seq = known.map_or(1, |k| k.seq + 1);
                        tracing::info!(
                            device,
                            boot = seq,
                            source,
                            "device booted (recorded on this server only)"
                        );
                        Some(BootRecord {
                            token: t.to_owned(),
                            seq,
                            since_unix: now_unix(),
                            source: source.to_owned(),
                        })
                    }
                    (_, known) => known,
                }
            }
        };
        if let Some(b) = &boot {
            self.end_earlier_boots(device, b);
        }
        boot
    }

    /// Ends device `device`'s session here if it began in a boot before
    /// `boot`: its connections are closed (they belong to a machine that
    /// has since started again), a Private vDisk it holds is let go, and a
    /// Standard-mode cache on this server is discarded once they have.
    pub fn end_earlier_boots(&self, device: &str, boot: &BootRecord) {
        let mut sessions = self.sessions.lock();
        let Some(s) = sessions.get_mut(device) else {
            return;
        };
        if s.boot_seq >= boot.seq || s.superseded {
            return;
        }
        s.superseded = true;
        s.kick.send_replace(true);
        if let Some(r) = &s.release {
            r.send_replace(true);
        }
        tracing::info!(
            device,
            boot = boot.seq,
            session_boot = s.boot_seq,
            connections = s.connections,
            "device booted again: ending its session of an earlier boot"
        );
    }

    /// Ends the sessions of devices that have booted since, as the farm
    /// state says (a boot seen by another server).
    pub fn follow_boots(&self, boots: &HashMap<String, BootRecord>) {
        let stale: Vec<(String, BootRecord)> = self
            .sessions
            .lock()
            .iter()
            .filter_map(|(d, s)| {
                let b = boots.get(d)?;
                (s.boot_seq < b.seq && !s.superseded).then(|| (d.clone(), b.clone()))
            })
            .collect();
        for (device, boot) in stale {
            self.end_earlier_boots(&device, &boot);
        }
    }

    /// Discards the server-side caches no device can use any more: of a
    /// device that has booted since (`boots`), or of one the farm no
    /// longer has (`gone`, each confirmed absent from the farm state by
    /// the caller). A device with a session here keeps its cache; a cache
    /// whose boot was never recorded is kept.
    pub fn tidy_caches(&self, boots: &HashMap<String, BootRecord>, gone: &[String]) {
        for device in self.store.cached_devices() {
            // Under the sessions lock, as a session's cache is made: no
            // session of the device can start and open it meanwhile.
            let sessions = self.sessions.lock();
            if sessions.contains_key(&device) {
                continue;
            }
            let why = if gone.contains(&device) {
                "the device no longer exists"
            } else {
                let stale = match (boots.get(&device), self.store.cache_tags(&device)) {
                    (Some(b), Some((_, Some(tag)))) => tag != b.token,
                    _ => false,
                };
                if !stale {
                    continue;
                }
                "the device has booted since"
            };
            match self.store.discard_cache(&device) {
                Ok(()) => tracing::info!(device, reason = why, "write cache discarded"),
                Err(e) => {
                    tracing::warn!(device, error = %e, "discarding a stale write cache failed")
                }
            }
            drop(sessions);
        }
    }

    /// The boot a new connection of device `device` belongs to (see
    /// [`Sessions::boot_of`]), once any session of its earlier boots here has
    /// ended.
    async fn session_boot(
        &self,
        device: &str,
        token: Option<&str>,
    ) -> Result<Option<BootRecord>, OpenError> {
        let boot = self.boot_of(device, token, "nbd").await;
        let deadline = Instant::now() + ENDING_WAIT;
        while self
            .sessions
            .lock()
            .get(device)
            .is_some_and(|s| s.ending || s.superseded)
        {
            if Instant::now() > deadline {
                return Err(still_ending(device));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(boot)
    }

    /// The farm's IQN prefix.
    pub fn iqn_prefix(&self) -> &str {
        &self.config.iqn_prefix
    }

    /// The iSCSI portals of the live servers (this one's first).
    pub fn iscsi_portals(&self) -> Vec<String> {
        let mut portals: Vec<String> = self.config.advertise_iscsi.iter().cloned().collect();
        for s in &self.membership.view().servers {
            if let Some(p) = &s.iscsi {
                if s.name != self.config.name && !portals.contains(p) {
                    portals.push(p.clone());
                }
            }
        }
        portals
    }

    /// The servers (and their portals) a device with `mac` at `client`
    /// should log in to over iSCSI, best first.
    pub fn iscsi_order(
        &self,
        mac: &str,
        client: Option<std::net::IpAddr>,
    ) -> Vec<(String, String)> {
        crate::login::iscsi_order(
            &self.membership.view(),
            mac,
            &self.membership.recent_logins(),
            client,
        )
    }

    /// The version device `device`'s live session here runs.
    pub fn session_version(&self, device: &str) -> Option<u32> {
        self.sessions.lock().get(device).map(|s| s.version)
    }

    /// Every device as this server last knew the farm state.
    pub fn known_devices(&self) -> Vec<Device> {
        self.membership.view().devices.clone()
    }

    /// Opens device `key`'s disk for an iSCSI session from `peer`: the same
    /// view as its `device/` export. Its boot is the one its last boot
    /// script began (an initiator carries no boot token), so a reconnect
    /// within that boot keeps a Standard-mode cache, and a new boot starts
    /// clean.
    pub async fn open_iscsi(self: &Arc<Self>, key: &str, peer: &str) -> Result<Export, OpenError> {
        let opened = self.open_device(key, None, peer, true, Door::Iscsi).await;
        self.note_refusal(key, &opened);
        opened
    }

    /// A device event for a connection of device `key` refused.
    fn note_refusal(&self, key: &str, opened: &Result<Export, OpenError>) {
        let why = match opened {
            Err(OpenError::Refused(why)) | Err(OpenError::Denied(_, why)) => why,
            _ => return,
        };
        let name = match DeviceKey::parse(key) {
            Ok(DeviceKey::Mac(mac)) => match self.membership.view().device_by_mac(&mac) {
                Some(d) => d.name.clone(),
                None => return,
            },
            _ => key.to_owned(),
        };
        self.events
            .record(&name, vstream_api::EventKind::Refusal, why.clone());
    }

    /// Notes each connected device whose write cache passed 80 % of its
    /// limit, or reached it, once per session and level.
    pub fn check_caches(&self) {
        let fill = self.cache_fill();
        let mut crossed = Vec::new();
        {
            let mut sessions = self.sessions.lock();
            for (device, used, limit) in fill {
                let Some(s) = sessions.get_mut(&device) else {
                    continue;
                };
                let level = match used.saturating_mul(100) / limit.max(1) {
                    p if p >= 100 => 100,
                    p if p >= 80 => 80,
                    _ => 0,
                };
                if level > s.cache_seen {
                    crossed.push((device, used, limit, level));
                }
                s.cache_seen = s.cache_seen.max(level);
            }
        }
        for (device, used, limit, level) in crossed {
            let what = match level {
                100 => "full: its writes fail with ENOSPC",
                _ => "over 80 % of its limit",
            };
            self.events.record(
                &device,
                vstream_api::EventKind::CacheFull,
                format!("its write cache is {what} ({used} of {limit} bytes)"),
            );
        }
    }

    async fn open_device(
        self: &Arc<Self>,
        key: &str,
        token: Option<&str>,
        peer: &str,
        go: bool,
        door: Door,
    ) -> Result<Export, OpenError> {
        let (device, vdisk) = self.device_and_vdisk(key).await?;
        self.not_quarantined(&vdisk.name)?;
        let export_name = format!("device/{key}");
        let boot = match go {
            true => self.session_boot(&device.name, token).await?,
            false => None,
        };
        let _vdisk_lock = self.lock_vdisk(&vdisk.name).await;
        let writes_vdisk = device.kind == DeviceType::Maintenance || vdisk.mode == Mode::Private;
        if !writes_vdisk && !self.is_connected(&device.name) {
            // A shared version under a server-side cache: served only once
            // this server has verified its copy.
            let chain = self
                .store
                .properties(&vdisk.name)
                .map_err(|e| e.to_string())
                .and_then(|p| p.version_for(device.kind))
                .and_then(|n| self.store.chain(&vdisk.name, n).map_err(|e| e.to_string()))
                .map_err(OpenError::Failed)?;
            if let Some(hash) = served_hash(&chain) {
                self.membership
                    .ensure_verified(&vdisk.name, chain.version.number, &hash)
                    .await
                    .map_err(OpenError::Refused)?;
            }
        }
        let mut sessions = self.sessions.lock();
        if let Some(s) = sessions.get_mut(&device.name) {
            // Another connection of the same device (a reconnect, or multi-conn):
            // it keeps the version its session started with.
            let description = describe(&device, &vdisk, s.version);
            if !go {
                return Ok(Export {
                    name: export_name,
                    description,
                    backend: Local::new(s.disk.clone()),
                    session: None,
                });
            }
            if s.ending || s.superseded {
                // It ended or was ended while this connection waited for the
                // vDisk's lock.
                return Err(still_ending(&device.name));
            }
            other_door(&device.name, s, door)?;
            s.connections += 1;
            s.peer = peer.to_owned();
            let disk = s.disk.clone();
            let boot = s.boot.clone();
            let kick = s.kick.subscribe();
            let id = s.id;
            drop(sessions);
            let guard = SessionGuard {
                sessions: self.clone(),
                device: device.name.clone(),
                id,
                clean: false,
                release: Some(kick),
            };
            return Ok(Export {
                name: export_name,
                description,
                backend: Local::recording(disk, boot),
                session: Some(Box::new(guard)),
            });
        }
        if writes_vdisk {
            if let Some((other, _)) = sessions.iter().find(|(_, s)| {
                s.vdisk == vdisk.name
                    && ((device.kind == DeviceType::Maintenance
                        && s.kind == DeviceType::Maintenance)
                        || (device.kind != DeviceType::Maintenance
                            && s.kind != DeviceType::Maintenance
                            && s.mode == Mode::Private))
            }) {
                let what = if device.kind == DeviceType::Maintenance {
                    format!(
                        "maintenance device {other} has the maintenance version of vDisk {} open",
                        vdisk.name
                    )
                } else {
                    format!(
                        "vDisk {} is in Private mode and device {other} has it open",
                        vdisk.name
                    )
                };
                return Err(OpenError::Refused(format!(
                    "{what}; device {} must wait until it disconnects",
                    device.name
                )));
            }
        }
        let props = self
            .store
            .properties(&vdisk.name)
            .map_err(|e| OpenError::Failed(e.to_string()))?;
        let version = match self.same_boot_version(&device, &vdisk, &props, boot.as_ref()) {
            Some(n) => n,
            None => props.version_for(device.kind).map_err(OpenError::Refused)?,
        };
        let chain = self
            .store
            .chain(&vdisk.name, version)
            .map_err(|e| OpenError::Failed(e.to_string()))?;
        let disk = self
            .device_disk(&device, &vdisk, chain, boot.as_ref())
            .map_err(OpenError::Refused)?;
        let description = describe(&device, &vdisk, version);
        let disk = Arc::new(disk);
        if !go {
            return Ok(Export {
                name: export_name,
                description,
                backend: Local::new(disk),
                session: None,
            });
        }
        let kick = tokio::sync::watch::channel(false).0;
        let kicked = kick.subscribe();
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        // A maintenance device's reads are its work on a version being made.
        let boot_reads = (device.kind != DeviceType::Maintenance)
            .then(|| {
                let since = boot.as_ref().map(|b| b.since_unix);
                self.boot_sets
                    .recorder(&vdisk.name, version, vdisk.size, since)
            })
            .flatten();
        sessions.insert(
            device.name.clone(),
            Session {
                door,
                vdisk: vdisk.name.clone(),
                version,
                kind: device.kind,
                mode: vdisk.mode,
                connections: 1,
                since: now_unix(),
                peer: peer.to_owned(),
                disk: disk.clone(),
                release: None,
                kick,
                reported_cache: 0,
                id,
                boot_seq: boot.as_ref().map_or(0, |b| b.seq),
                superseded: false,
                ending: false,
                cache_seen: 0,
                boot: boot_reads.clone(),
            },
        );
        drop(sessions);
        tracing::info!(device = %device.name, vdisk = %vdisk.name, version, kind = %device.kind, mode = %vdisk.mode, boot = boot.as_ref().map_or(0, |b| b.seq), %peer, %door, "device session started");
        self.events.record(
            &device.name,
            vstream_api::EventKind::Connect,
            format!(
                "over {door} from {peer}, version {version} of vDisk {}",
                vdisk.name
            ),
        );
        let guard = SessionGuard {
            sessions: self.clone(),
            device: device.name.clone(),
            id,
            clean: false,
            release: Some(kicked),
        };
        Ok(Export {
            name: export_name,
            description,
            backend: Local::recording(disk, boot_reads),
            session: Some(Box::new(guard)),
        })
    }

    /// The version a Standard-mode device's reconnect within its boot goes
    /// on with: the one its cache here lies over. A running OS never sees
    /// its disk change under it, even when its session ended meanwhile (a
    /// network cut longer than the keepalive time, a server restart).
    fn same_boot_version(
        &self,
        device: &Device,
        vdisk: &VDisk,
        props: &Properties,
        boot: Option<&BootRecord>,
    ) -> Option<u32> {
        if device.kind == DeviceType::Maintenance || vdisk.mode != Mode::Standard {
            return None;
        }
        let (base, cache_boot) = self.store.cache_tags(&device.name)?;
        if cache_boot.as_deref() != Some(boot?.token.as_str()) {
            return None;
        }
        let number: u32 = base
            .strip_prefix(&format!("{}@", vdisk.name))?
            .split('/')
            .next()?
            .parse()
            .ok()?;
        props
            .versions
            .iter()
            .any(|v| v.number == number)
            .then_some(number)
    }

    /// The disk a device sees: the maintenance version read/write, its version
    /// itself (Private), or its version under its own write cache (Standard).
    fn device_disk(
        &self,
        device: &Device,
        vdisk: &VDisk,
        chain: Chain,
        boot: Option<&BootRecord>,
    ) -> Result<Disk, String> {
        let number = chain.version.number;
        if device.kind == DeviceType::Maintenance || vdisk.mode == Mode::Private {
            if !chain.is_writable() {
                return Err(format!(
                    "version {number} of vDisk {} is sealed and cannot be written in Private mode; \
                     set the vDisk to Standard mode, or boot a maintenance device on a new version (vstream version new {})",
                    vdisk.name, vdisk.name
                ));
            }
            return chain
                .writable()
                .map_err(|e| format!("vDisk {}: {e}", vdisk.name));
        }
        // The version's own layer file is unique: a cache is never laid over
        // other content, even if the vDisk was deleted and made again.
        let base = format!(
            "{}@{number}/{}",
            vdisk.name,
            chain.version.own_layer().unwrap_or_default()
        );
        let cache = self
            .store
            .open_cache(
                &device.name,
                &base,
                boot.map(|b| b.token.as_str()),
                vdisk.size,
            )
            .map_err(|e| format!("opening the write cache of device {}: {e}", device.name))?;
        let limit = vdisk.cache_limit.unwrap_or(vdisk.size);
        chain
            .under_cache(cache, Some(limit))
            .map_err(|e| e.to_string())
    }

    fn end_connection(&self, device: &str, id: u64, clean: bool) {
        let mut sessions = self.sessions.lock();
        let Some(s) = sessions.get_mut(device) else {
            return;
        };
        if s.id != id {
            // A later session of the device: this connection's ended before.
            return;
        }
        s.connections -= 1;
        if s.connections > 0 {
            return;
        }
        // The session stays listed, ending, until its cache is dealt with:
        // a new connection of the device waits rather than open a cache
        // about to be discarded.
        s.ending = true;
        let disk = s.disk.clone();
        let discard = (clean || s.superseded)
            && s.mode == Mode::Standard
            && s.kind != DeviceType::Maintenance
            && s.release.is_none();
        let superseded = s.superseded;
        drop(sessions);
        if let Err(e) = disk.flush() {
            tracing::error!(device, error = %e, "flushing at the end of a session failed");
        }
        drop(disk);
        let why = match superseded {
            true => "the device booted again",
            false => "session ended cleanly",
        };
        if discard {
            match self.store.discard_cache(device) {
                Ok(()) => tracing::info!(device, "{why}; write cache discarded"),
                Err(e) => tracing::error!(device, error = %e, "discarding the write cache failed"),
            }
        } else {
            tracing::info!(device, clean, superseded, "device session ended");
        }
        let how = match (superseded, clean) {
            (true, _) => "its session ended: the device booted again",
            (false, true) => "its session ended cleanly",
            (false, false) => "its connection was cut off (power loss, network, or let go)",
        };
        self.events
            .record(device, vstream_api::EventKind::Disconnect, how);
        let mut sessions = self.sessions.lock();
        if sessions.get(device).is_some_and(|s| s.id == id) {
            sessions.remove(device);
        }
    }

    /// Devices connected to version `version` of vDisk `vdisk` now.
    pub fn devices_on(&self, vdisk: &str, version: u32) -> Vec<String> {
        let mut v: Vec<String> = self
            .sessions
            .lock()
            .iter()
            .filter(|(_, s)| s.vdisk == vdisk && s.version == version)
            .map(|(d, _)| d.clone())
            .collect();
        v.sort();
        v
    }

    /// Devices on version `version` (`None`: any version) of vDisk `vdisk`
    /// anywhere in the farm: this server's sessions, and the ones every other
    /// live server last published (named with their server).
    pub fn farm_devices_on(&self, vdisk: &str, version: Option<u32>) -> Vec<String> {
        let on = |v: &str, n: u32| v == vdisk && version.is_none_or(|want| n == want);
        let mut devices: Vec<String> = self
            .sessions
            .lock()
            .iter()
            .filter(|(_, s)| on(&s.vdisk, s.version))
            .map(|(d, _)| d.clone())
            .collect();
        let view = self.membership.view();
        for srv in view.servers.iter().filter(|s| s.name != self.config.name) {
            devices.extend(
                srv.sessions
                    .iter()
                    .filter(|s| on(&s.vdisk, s.version))
                    .map(|s| format!("{} (on server {})", s.device, srv.name)),
            );
        }
        devices.sort();
        devices.dedup();
        devices
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

    /// Lets up to `n` devices that keep their own caches go to other
    /// servers, the most recently started first; returns their names.
    pub fn release_devices(&self, n: usize) -> Vec<String> {
        let sessions = self.sessions.lock();
        let mut movable: Vec<(&String, &Session)> = sessions
            .iter()
            .filter(|(_, s)| s.release.as_ref().is_some_and(|r| !*r.borrow()))
            .collect();
        movable.sort_by_key(|(name, s)| (std::cmp::Reverse(s.since), (*name).clone()));
        movable
            .into_iter()
            .take(n)
            .map(|(name, s)| {
                if let Some(r) = &s.release {
                    r.send_replace(true);
                }
                name.clone()
            })
            .collect()
    }

    /// Lets device `device` go to another server if it keeps its own cache
    /// and is not let go already (a move); false if it has no such session.
    pub fn release_device(&self, device: &str) -> bool {
        let sessions = self.sessions.lock();
        match sessions.get(device).and_then(|s| s.release.as_ref()) {
            Some(r) if !*r.borrow() => {
                r.send_replace(true);
                true
            }
            _ => false,
        }
    }

    /// Devices connected now, and how many of them started within `window_secs`.
    pub fn session_counts(&self, window_secs: u64) -> (u32, u32) {
        let now = now_unix();
        let sessions = self.sessions.lock();
        let booting = sessions
            .values()
            .filter(|s| s.since + window_secs > now)
            .count();
        (sessions.len() as u32, booting as u32)
    }

    /// Closes every connection of `device`'s session here (each answers the
    /// requests it has taken first); false if it has none. The session ends
    /// as an unclean disconnect does, once its last connection has closed.
    pub fn disconnect_device(&self, device: &str) -> bool {
        let sessions = self.sessions.lock();
        let Some(s) = sessions.get(device) else {
            return false;
        };
        s.kick.send_replace(true);
        if let Some(r) = &s.release {
            r.send_replace(true);
        }
        tracing::info!(
            device,
            connections = s.connections,
            "disconnecting the device"
        );
        true
    }

    pub fn is_connected(&self, device: &str) -> bool {
        self.sessions.lock().contains_key(device)
    }

    /// Records an agent's report of its device's cache use; false if the
    /// device has no device-cache session here.
    pub fn report_cache(&self, device: &str, bytes: u64) -> bool {
        match self.sessions.lock().get_mut(device) {
            Some(s) if s.release.is_some() => {
                s.reported_cache = bytes;
                true
            }
            _ => false,
        }
    }

    /// The devices connected here, by name.
    pub fn sessions(&self) -> Vec<vstream_api::SessionInfo> {
        let mut out: Vec<vstream_api::SessionInfo> = self
            .sessions
            .lock()
            .iter()
            .map(|(name, s)| vstream_api::SessionInfo {
                device: name.clone(),
                vdisk: s.vdisk.clone(),
                version: s.version,
                since_unix: s.since,
                device_cache: s.release.is_some(),
                cache_bytes: s.reported_cache,
            })
            .collect();
        out.sort_by(|a, b| a.device.cmp(&b.device));
        out
    }

    /// Each write cache of a device connected here: its device, the bytes
    /// in it and its limit (Standard mode only; a device-side cache as its
    /// agent reports it).
    pub fn cache_fill(&self) -> Vec<(String, u64, u64)> {
        let view = self.membership.view();
        let sessions = self.sessions.lock();
        let mut out: Vec<(String, u64, u64)> = sessions
            .iter()
            .filter(|(_, s)| s.mode == Mode::Standard && s.kind != DeviceType::Maintenance)
            .filter_map(|(name, s)| {
                let vdisk = view.vdisk(&s.vdisk)?;
                let limit = vdisk.cache_limit.unwrap_or(vdisk.size).max(1);
                let used = match s.release.is_some() {
                    true => s.reported_cache,
                    false => s.disk.top_bytes(),
                };
                Some((name.clone(), used, limit))
            })
            .collect();
        out.sort();
        out
    }

    /// A device with its live state: here, or on another server of the farm.
    pub fn device_info(&self, device: Device) -> DeviceInfo {
        let sessions = self.sessions.lock();
        let s = sessions.get(&device.name);
        if s.is_none() {
            let view = self.membership.view();
            let elsewhere = view.servers.iter().find_map(|srv| {
                srv.sessions
                    .iter()
                    .find(|x| x.device == device.name)
                    .map(|x| (srv.name.clone(), x.clone()))
            });
            if let Some((server, x)) = elsewhere {
                return DeviceInfo {
                    connected: true,
                    connected_since: Some(x.since_unix),
                    peer: None,
                    cache_bytes: x.cache_bytes,
                    server: Some(server),
                    version: Some(x.version),
                    device_cache: x.device_cache,
                    protocol: None,
                    iscsi_initiator: Some(device.initiator(&self.config.iqn_prefix)),
                    iscsi_target: Some(vstream_api::device_target(
                        &self.config.iqn_prefix,
                        &device.name,
                    )),
                    failovers: 0,
                    retries: 0,
                    last_failover_ms: None,
                    last_retry_ms: None,
                    device,
                };
            }
        }
        let cache_bytes = match s {
            Some(s) if s.release.is_some() => s.reported_cache,
            Some(s) if s.mode == Mode::Standard && s.kind != DeviceType::Maintenance => {
                s.disk.top_bytes()
            }
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
            server: s.map(|_| self.config.name.clone()),
            version: s.map(|s| s.version),
            device_cache: s.is_some_and(|s| s.release.is_some()),
            protocol: s.map(|s| s.door.to_string()),
            iscsi_initiator: Some(device.initiator(&self.config.iqn_prefix)),
            iscsi_target: Some(vstream_api::device_target(
                &self.config.iqn_prefix,
                &device.name,
            )),
            failovers: 0,
            retries: 0,
            last_failover_ms: None,
            last_retry_ms: None,
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
