//! The server as an iSCSI front door: which initiator is which device, the
//! CHAP secrets it proves, and the disk it opens (the same as its `device/`
//! NBD export, through [`Sessions`]). [`vstream_service::iscsi`] does the
//! protocol.
//!
//! Every device has one target, `PREFIX:device.NAME`, with its disk at LUN
//! 0, and logs in to it with its own initiator name and CHAP secret: no
//! other initiator, and no wrong secret, opens it. Discovery shows an
//! initiator its own device's target only.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use parking_lot::Mutex;
use vstream_api::{Device, IscsiSecrets, VDisk};
use vstream_farm::FarmStore;
use vstream_iscsi::login::{status, LoginFailure};
use vstream_iscsi::scsi::Identity;
use vstream_service::iscsi::{Chap, Lu, Stats, Target, Targets};
use vstream_service::{Client, OpenError};

use crate::clock::now_unix;
use crate::config::Config;
use crate::sessions::Sessions;

/// The iSCSI targets of one server.
pub struct IscsiTargets {
    config: Arc<Config>,
    farm: FarmStore,
    sessions: Arc<Sessions>,
    stats: Stats,
    /// One logical unit per target, shared by its sessions (reservations
    /// hold across them). Kept while the server runs, with no session on
    /// it too: persistent reservations outlive the sessions that made
    /// them, and a server start is the logical unit's power-on.
    lus: Mutex<HashMap<String, Arc<Lu>>>,
    /// The CHAP secrets last read per device: a login while the farm state
    /// is away goes on with them.
    known: Mutex<HashMap<String, IscsiSecrets>>,
    /// When this server last sent each device elsewhere: a device back
    /// within [`REDIRECT_HOLD`] (the other server saw the farm otherwise)
    /// is taken here, so two servers never bounce it between them.
    redirected: Mutex<HashMap<String, Instant>>,
    /// When each device's disk was last opened here: a device back within
    /// [`BOOT_HOLD`] stays (see [`IscsiTargets::redirect`]).
    served: Mutex<HashMap<String, Instant>>,
}

/// How long a device whose disk was opened here is served here again
/// without a placement: iPXE's `sanboot` session, then the OS's initiator
/// from the iBFT, are one boot (about 15 s apart under TCG here; minutes on
/// a slow firmware).
const BOOT_HOLD: Duration = Duration::from_secs(120);

/// How long a device redirected from here is taken here if it comes back.
const REDIRECT_HOLD: Duration = Duration::from_secs(30);

/// How long a redirection waits for the pick's portal to take a TCP
/// connection before the login is served here instead.
const PORTAL_PROBE: Duration = Duration::from_secs(1);

/// True if `portal` (`HOST:PORT`) takes a TCP connection within
/// [`PORTAL_PROBE`]; the connection closes at once, before any login PDU
/// (which a target takes as an initiator gone, not as an error).
async fn portal_answers(portal: &str) -> bool {
    matches!(
        tokio::time::timeout(PORTAL_PROBE, tokio::net::TcpStream::connect(portal)).await,
        Ok(Ok(_))
    )
}

impl IscsiTargets {
    pub fn new(config: Arc<Config>, farm: FarmStore, sessions: Arc<Sessions>) -> IscsiTargets {
        IscsiTargets {
            config,
            farm,
            sessions,
            stats: Stats::default(),
            lus: Mutex::default(),
            known: Mutex::default(),
            redirected: Mutex::default(),
            served: Mutex::default(),
        }
    }

    /// Where `device`'s login belongs if not here: the portal of the
    /// server the login placement picks for it (load, subnets, the server
    /// holding a Private vDisk), as a redirection. None: here (it is
    /// connected here already, this server is the pick, nobody else can
    /// serve it, its disk was opened here within [`BOOT_HOLD`], it was just
    /// sent away and came back, or the pick's portal does not answer).
    async fn redirect(&self, device: &Device, client: &Client) -> Option<LoginFailure> {
        self.config.advertise_iscsi.as_ref()?;
        if self.sessions.is_connected(&device.name) {
            return None;
        }
        // Its boot began here: the OS's initiator takes over iPXE's disk
        // where the iBFT says, and the boot's write cache is here. Placed
        // anew, its own login of moments ago would count against this
        // server and send it away.
        {
            let mut served = self.served.lock();
            served.retain(|_, at| at.elapsed() < BOOT_HOLD);
            if served.contains_key(&device.name) {
                tracing::info!(device = %device.name, "device back within its boot: served here");
                return None;
            }
        }
        let ip = client
            .addr
            .parse::<std::net::SocketAddr>()
            .ok()
            .map(|a| a.ip());
        let order = self.sessions.iscsi_order(&device.mac, ip);
        let (server, portal) = order.first()?;
        if *server == self.config.name {
            return None;
        }
        {
            let mut redirected = self.redirected.lock();
            redirected.retain(|_, at| at.elapsed() < REDIRECT_HOLD);
            if redirected.contains_key(&device.name) {
                tracing::info!(device = %device.name, placed = %server, "device back after a redirection: served here");
                return None;
            }
        }
        // A sanboot script lists the portals in this same order, so a
        // device logging in here has usually just failed to reach the pick:
        // a server that died within its farm lease, or a portal the network
        // does not let through. Sending it back there would fail its boot
        // (iPXE gives up that `sanboot` and waits for a new script).
        if !portal_answers(portal).await {
            tracing::info!(device = %device.name, placed = %server, %portal, "the placed server's iSCSI portal does not answer: served here");
            return None;
        }
        self.redirected
            .lock()
            .insert(device.name.clone(), Instant::now());
        Some(LoginFailure::moved(
            format!("{portal},{}", vstream_service::iscsi::TPGT),
            format!("device {} is placed on server {server}", device.name),
        ))
    }

    /// The device target `target` names, with its vDisk.
    async fn device_of(&self, target: &str) -> Result<(Device, VDisk), LoginFailure> {
        let not_found = |why: String| LoginFailure::new(status::NOT_FOUND, why);
        let prefix = format!("{}:device.", self.config.iqn_prefix);
        let lower = target.to_ascii_lowercase();
        let name = lower.strip_prefix(&prefix).ok_or_else(|| {
            not_found(format!(
                "no target {target:?} here: device targets are {prefix}NAME"
            ))
        })?;
        if vstream_farm::validate_name(name).is_err() || vstream_api::looks_like_mac(name) {
            return Err(not_found(format!("no device target {target:?}")));
        }
        // Target names are lower-case; a device's name may not be.
        let exact = self.sessions.device_and_vdisk(name).await;
        let found = match exact {
            Err(OpenError::Unknown(_)) => {
                let devices = self.devices().await;
                match devices.iter().find(|d| d.name.eq_ignore_ascii_case(name)) {
                    Some(d) => self.sessions.device_and_vdisk(&d.name).await,
                    None => exact,
                }
            }
            other => other,
        };
        found.map_err(|e| match e {
            OpenError::Unknown(_) => not_found(format!("no device for target {target:?}")),
            other => LoginFailure::new(status::SERVICE_UNAVAILABLE, other.to_string()),
        })
    }

    /// Every device, from the farm state, or as last known while it is away.
    async fn devices(&self) -> Vec<Device> {
        match self.farm.list_devices().await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "farm state unreachable; iSCSI uses the last known devices");
                self.sessions.known_devices()
            }
        }
    }

    /// Device `device`'s CHAP secrets, made now if it has none yet (a
    /// device made before iSCSI); while the farm state is away, the last
    /// ones read.
    async fn secrets(&self, device: &str) -> Result<IscsiSecrets, LoginFailure> {
        match self.farm.iscsi_secrets(device, fresh_secrets()).await {
            Ok(s) => {
                self.known.lock().insert(device.to_owned(), s.clone());
                Ok(s)
            }
            Err(e) => match self.known.lock().get(device) {
                Some(s) => {
                    tracing::warn!(device, error = %e, "farm state unreachable; CHAP checks the device's last known secret");
                    Ok(s.clone())
                }
                None => Err(LoginFailure::new(
                    status::SERVICE_UNAVAILABLE,
                    format!("the CHAP secrets of device {device} cannot be read: {e}"),
                )),
            },
        }
    }

    /// What `device` proves, and what the target proves back.
    async fn chap(&self, device: &Device) -> Result<Chap, LoginFailure> {
        let s = self.secrets(&device.name).await?;
        Ok(Chap {
            user: device.name.clone(),
            secret: s.chap_secret.into_bytes(),
            target: Some((self.target_of(device), s.target_secret.into_bytes())),
        })
    }

    fn target_of(&self, device: &Device) -> String {
        vstream_api::device_target(&self.config.iqn_prefix, &device.name)
    }

    /// Refuses `initiator` unless it is `device`'s.
    fn check_initiator(&self, initiator: &str, device: &Device) -> Result<(), LoginFailure> {
        let own = device.initiator(&self.config.iqn_prefix);
        if initiator.eq_ignore_ascii_case(&own) {
            return Ok(());
        }
        Err(LoginFailure::new(
            status::AUTHORIZATION_FAILURE,
            format!(
                "initiator {initiator:?} is not device {}'s ({own}); set it with \
                 `vstream device set {} --iqn {initiator}` if it is",
                device.name, device.name
            ),
        ))
    }

    /// The logical unit of `target`, shared by its sessions.
    fn lu(&self, target: &str) -> Arc<Lu> {
        self.lus
            .lock()
            .entry(target.to_owned())
            .or_default()
            .clone()
    }
}

impl Targets for IscsiTargets {
    fn authorize<'a>(
        &'a self,
        initiator: &'a str,
        target: &'a str,
        client: &'a Client,
    ) -> BoxFuture<'a, Result<Option<Chap>, LoginFailure>> {
        Box::pin(async move {
            let (device, _) = self.device_of(target).await?;
            self.check_initiator(initiator, &device)?;
            // Redirected before any secret is asked: the initiator proves
            // itself to the server that serves it.
            if let Some(moved) = self.redirect(&device, client).await {
                return Err(moved);
            }
            self.chap(&device).await.map(Some)
        })
    }

    fn discovery_chap<'a>(
        &'a self,
        initiator: &'a str,
        _client: &'a Client,
    ) -> BoxFuture<'a, Result<Option<Chap>, LoginFailure>> {
        Box::pin(async move {
            let prefix = &self.config.iqn_prefix;
            let devices = self.devices().await;
            let Some(device) = devices
                .iter()
                .find(|d| d.initiator(prefix).eq_ignore_ascii_case(initiator))
            else {
                return Err(LoginFailure::new(
                    status::AUTHORIZATION_FAILURE,
                    format!("initiator {initiator:?} is no device's: discovery refused"),
                ));
            };
            self.chap(device).await.map(Some)
        })
    }

    fn open<'a>(
        self: Arc<Self>,
        initiator: &'a str,
        target: &'a str,
        client: &'a Client,
    ) -> BoxFuture<'a, Result<Target, LoginFailure>> {
        Box::pin(async move {
            let (device, vdisk) = self.device_of(target).await?;
            self.check_initiator(initiator, &device)?;
            let export = self
                .sessions
                .open_iscsi(&device.name, &client.addr)
                .await
                .map_err(|e| {
                    let status = match &e {
                        OpenError::Unknown(_) => status::NOT_FOUND,
                        OpenError::Denied(..) => status::AUTHORIZATION_FAILURE,
                        OpenError::Invalid(..) | OpenError::Failed(_) => status::TARGET_ERROR,
                        OpenError::Refused(_) => status::SERVICE_UNAVAILABLE,
                    };
                    LoginFailure::new(status, e.to_string())
                })?;
            self.served
                .lock()
                .insert(device.name.clone(), Instant::now());
            let version = self.sessions.session_version(&device.name).unwrap_or(0);
            let name = self.target_of(&device);
            Ok(Target {
                export,
                identity: identity(&vdisk, version),
                physical_exponent: vdisk.physical_exponent(),
                lu: self.lu(&name),
            })
        })
    }

    fn discover<'a>(
        &'a self,
        initiator: &'a str,
        _client: &'a Client,
        local: &'a str,
    ) -> BoxFuture<'a, Vec<(String, Vec<String>)>> {
        Box::pin(async move {
            let prefix = &self.config.iqn_prefix;
            let portal = format!(
                "{},{}",
                discovery_portal(&self.config, local),
                vstream_service::iscsi::TPGT
            );
            self.devices()
                .await
                .iter()
                .filter(|d| d.initiator(prefix).eq_ignore_ascii_case(initiator))
                .map(|d| (self.target_of(d), vec![portal.clone()]))
                .collect()
        })
    }

    fn stats(&self) -> &Stats {
        &self.stats
    }

    fn keepalive(&self) -> vstream_service::tcp::Keepalive {
        self.config.keepalive
    }
}

/// The portal a SendTargets answer names: the address devices reach this
/// server at when the admin gave one that is not a portal it listens on
/// (`--advertise-iscsi`, behind NAT), as the boot scripts and redirections
/// do; else `local`, the address the discovery connection came in on (right
/// for a portal on a wildcard address too).
fn discovery_portal<'a>(config: &'a Config, local: &'a str) -> &'a str {
    match &config.advertise_iscsi {
        Some(a) if !config.iscsi.iter().any(|l| l.to_string() == *a) => a,
        _ => local,
    }
}

/// A device's CHAP secrets, new: 16 letters and digits each (Windows takes
/// 12 to 16 characters).
pub fn fresh_secrets() -> IscsiSecrets {
    IscsiSecrets {
        chap_secret: secret(),
        target_secret: secret(),
        created_unix: now_unix(),
    }
}

fn secret() -> String {
    // No look-alikes (0/O, 1/l/I): an admin may type it into a firmware.
    const CHARS: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    (0..16)
        .map(|_| CHARS[rand::random::<u32>() as usize % CHARS.len()] as char)
        .collect()
}

/// What the disk of `vdisk`'s version `version` says of itself: the same on
/// every server of the farm (it comes from the farm state's names and
/// times), and another for every other vDisk or version. The NAA name is
/// an IEEE Registered Extended one (first nibble 6) whose other 124 bits
/// are a digest: vstream has no OUI of its own, and Windows and Linux
/// compare the name whole.
pub fn identity(vdisk: &VDisk, version: u32) -> Identity {
    let mut h = blake3::Hasher::new();
    h.update(b"vstream SCSI identity\0");
    h.update(vdisk.name.as_bytes());
    h.update(b"\0");
    h.update(&vdisk.created_unix.to_be_bytes());
    h.update(&version.to_be_bytes());
    let digest = h.finalize();
    let digest = digest.as_bytes();
    let mut naa = [0u8; 16];
    naa.copy_from_slice(&digest[..16]);
    naa[0] = 0x60 | (naa[0] & 0x0f);
    let serial: String = digest[16..24].iter().map(|b| format!("{b:02x}")).collect();
    Identity {
        vendor: "VSTREAM".into(),
        product: "vDisk".into(),
        revision: {
            let r = format!("{version:04}");
            r[r.len() - 4..].to_owned()
        },
        serial,
        naa,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vdisk(name: &str, created: u64) -> VDisk {
        VDisk {
            mode: vstream_api::Mode::Standard,
            ..VDisk::new(name, 1 << 30, created)
        }
    }

    #[test]
    fn a_version_has_one_identity_and_no_other_shares_it() {
        let a = identity(&vdisk("win10", 100), 3);
        assert_eq!(a, identity(&vdisk("win10", 100), 3));
        assert_eq!(a.naa[0] >> 4, 6, "NAA IEEE Registered Extended");
        assert_eq!(a.serial.len(), 16);
        assert_eq!(a.revision, "0003");
        let others = [
            identity(&vdisk("win10", 100), 4),
            identity(&vdisk("win11", 100), 3),
            // The same name made again later.
            identity(&vdisk("win10", 101), 3),
        ];
        for o in &others {
            assert_ne!(o.naa, a.naa);
            assert_ne!(o.serial, a.serial);
        }
        assert_eq!(identity(&vdisk("x", 1), 123_456).revision, "3456");
    }

    #[test]
    fn secrets_are_16_characters_and_differ() {
        let a = fresh_secrets();
        let b = fresh_secrets();
        for s in [&a.chap_secret, &a.target_secret, &b.chap_secret] {
            assert_eq!(s.len(), 16);
            assert!(s.chars().all(|c| c.is_ascii_alphanumeric()), "{s}");
        }
        assert_ne!(a.chap_secret, a.target_secret);
        assert_ne!(a.chap_secret, b.chap_secret);
    }
}
