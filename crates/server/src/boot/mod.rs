//! Network boot: what a device gets before its agent runs.
//!
//! ```text
//!   firmware --DHCP--> LAN's DHCP server (address)   + our ProxyDHCP (boot file)   --proxy-dhcp IFACE
//!   firmware --TFTP--> undionly.kpxe / snponly.efi from --tftp-root               --tftp HOST[:PORT]
//!   iPXE --HTTP GET /boot/ipxe?mac=M--> any server: a script naming every live server
//!   iPXE --HTTP GET /boot/M/kernel, /boot/M/initrd--> each server in turn until one answers
//!   initramfs: vstream target --bootstrap <every server> --mac M --attach /dev/nbd0
//! ```
//!
//! A vDisk's kernel and initrd are stored in every server's store under
//! `boot/VDISK/BLAKE3` and copied between servers by content hash (`sync`),
//! so any server can boot any device. All of it reads the farm view this
//! server last saw, so booting goes on while etcd is away.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::watch;
use vstream_api::BootFile;
use vstream_farm::FarmStore;
use vstream_image::Store;
use vstream_netboot::proxy_dhcp::{ProxyDhcp, ProxyDhcpConfig, ProxyDhcpStats};
use vstream_netboot::tftp::{TftpServer, TftpStats};

use crate::config::Config;
use crate::membership::Membership;
use crate::replication::state::Replication;
use crate::sessions::Sessions;

pub mod routes;

/// The boot subsystem: its counters, and the handles its routes and its
/// boot file sync take.
pub struct Boot {
    pub config: Arc<Config>,
    pub store: Store,
    pub farm: FarmStore,
    pub membership: Arc<Membership>,
    pub sessions: Arc<Sessions>,
    /// For the farm's peer secret, which boot file sync presents.
    pub replication: Arc<Replication>,
    /// Hands a netbooting device its enrollment token.
    pub enrollment: Arc<crate::enroll::Enrollment>,
    pub stats: Stats,
}

/// Largest kernel or initrd a vDisk may carry.
pub const MAX_BOOT_FILE: u64 = 2 << 30;
/// How often a server looks for boot files it lacks.
const SYNC_INTERVAL: Duration = Duration::from_secs(2);

/// What the boot services did, for `/metrics`.
#[derive(Default)]
pub struct Stats {
    pub(crate) scripts: AtomicU64,
    pub(crate) refusals: AtomicU64,
    pub(crate) file_bytes: AtomicU64,
    tftp: OnceLock<Arc<TftpStats>>,
    dhcp: OnceLock<Arc<ProxyDhcpStats>>,
}

type Row<'a> = (&'static str, &'static str, &'static str, &'a AtomicU64);

impl Stats {
    pub fn metrics(&self) -> Vec<Row<'_>> {
        let mut rows: Vec<Row<'_>> = vec![
            (
                "vstream_boot_scripts_total",
                "counter",
                "iPXE boot scripts served",
                &self.scripts,
            ),
            (
                "vstream_boot_refusals_total",
                "counter",
                "boot scripts that told a device why it cannot boot (unknown MAC, no kernel)",
                &self.refusals,
            ),
            (
                "vstream_boot_file_sent_bytes_total",
                "counter",
                "kernel and initrd bytes sent to devices",
                &self.file_bytes,
            ),
        ];
        if let Some(t) = self.tftp.get() {
            rows.extend([
                (
                    "vstream_tftp_transfers_total",
                    "counter",
                    "TFTP transfers completed",
                    &t.transfers_completed,
                ),
                (
                    "vstream_tftp_failures_total",
                    "counter",
                    "TFTP transfers that timed out or failed",
                    &t.transfers_failed,
                ),
                (
                    "vstream_tftp_refused_total",
                    "counter",
                    "TFTP requests refused (not found, outside the folder, writes)",
                    &t.requests_refused,
                ),
                (
                    "vstream_tftp_sent_bytes_total",
                    "counter",
                    "bytes sent over TFTP",
                    &t.bytes_sent,
                ),
            ]);
        }
        if let Some(d) = self.dhcp.get() {
            rows.extend([
                (
                    "vstream_proxy_dhcp_offers_total",
                    "counter",
                    "ProxyDHCP offers sent to PXE clients",
                    &d.offers,
                ),
                (
                    "vstream_proxy_dhcp_acks_total",
                    "counter",
                    "ProxyDHCP acks sent (port 4011)",
                    &d.acks,
                ),
                (
                    "vstream_proxy_dhcp_ignored_total",
                    "counter",
                    "DHCP packets left unanswered (not PXE, not for us)",
                    &d.ignored,
                ),
            ]);
        }
        rows
    }
}

/// Where this server keeps boot file `hash` of `vdisk`.
pub fn file_path(store: &Store, vdisk: &str, hash: &str) -> PathBuf {
    store.root_of(vdisk).join("boot").join(vdisk).join(hash)
}

pub(crate) fn valid_hash(hash: &str) -> bool {
    hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Writes what `read` yields to `vdisk`'s boot folder under its blake3 hash:
/// through a temporary file, synced, then renamed, so a boot file is never
/// seen half written. Checks the hash when one is `expected`.
pub fn store_file(
    store: &Store,
    vdisk: &str,
    name: &str,
    read: &mut dyn Read,
    expected: Option<&BootFile>,
) -> std::io::Result<BootFile> {
    let dir = store.root_of(vdisk).join("boot").join(vdisk);
    std::fs::create_dir_all(&dir)?;
    // Removed if anything fails before the rename.
    let mut tmp = tempfile::Builder::new()
        .prefix(".upload-")
        .tempfile_in(&dir)?;
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = read.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        if size > MAX_BOOT_FILE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("a boot file may be at most {} bytes", MAX_BOOT_FILE),
            ));
        }
        hasher.update(&buf[..n]);
        tmp.write_all(&buf[..n])?;
    }
    if size == 0 {
        // No kernel or initrd is empty: a request that forgot its body.
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the boot file is empty",
        ));
    }
    let hash = hasher.finalize().to_hex().to_string();
    if let Some(e) = expected {
        if e.blake3 != hash || e.size != size {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "boot file {} arrived as {size} bytes with hash {hash}; the farm has {} bytes, {}",
                    e.name, e.size, e.blake3
                ),
            ));
        }
    }
    tmp.as_file().sync_all()?;
    tmp.persist(dir.join(&hash)).map_err(|e| e.error)?;
    std::fs::File::open(&dir)?.sync_all()?;
    Ok(BootFile {
        name: name.to_owned(),
        size,
        blake3: hash,
    })
}

/// How old a boot file no vDisk record names must be before it goes: an
/// upload is renamed into place a moment before its record names it.
const STALE_AFTER: Duration = Duration::from_secs(600);

/// Removes the boot files no vDisk names any more (a kernel replaced, a
/// vDisk deleted), and what a crash left of uploads. Only with a fresh
/// view of the farm: an old one would not know the newest files.
fn tidy(server: &Boot) {
    if !server.membership.is_connected() {
        return;
    }
    let view = server.membership.view();
    let roots = server.store.roots();
    for dir in roots
        .iter()
        .filter_map(|r| std::fs::read_dir(r.join("boot")).ok())
    {
        for vdisk_dir in dir.flatten() {
            let vdisk = vdisk_dir.file_name().to_string_lossy().into_owned();
            let wanted: Vec<&str> = view
                .vdisk(&vdisk)
                .map(|v| v.boot.files().map(|f| f.blake3.as_str()).collect())
                .unwrap_or_default();
            let Ok(files) = std::fs::read_dir(vdisk_dir.path()) else {
                continue;
            };
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                let old = f
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > STALE_AFTER);
                // Only what uploads write here: files named by their hash,
                // and the temporary files of uploads.
                let ours = (is_hash_name(&name) || name.starts_with(".upload-"))
                    && f.file_type().is_ok_and(|t| t.is_file());
                if ours
                    && old
                    && !wanted.contains(&name.as_str())
                    && std::fs::remove_file(f.path()).is_ok()
                {
                    tracing::info!(vdisk = %vdisk, file = %name, "removed a boot file no vDisk names");
                }
            }
            // Gone only once empty.
            let _ = std::fs::remove_dir(vdisk_dir.path());
        }
    }
}

/// True for a boot file's name in the store: its BLAKE3 hash, in hex.
fn is_hash_name(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Copies the boot files of the farm's vDisks that this server lacks from
/// the peers that have them, checking each against its hash.
fn sync_once(server: &Boot) {
    let view = server.membership.view();
    let Some(secret) = server.replication.secret() else {
        return;
    };
    let me = &server.config.name;
    for vdisk in &view.vdisks {
        for f in vdisk.boot.files() {
            if !valid_hash(&f.blake3) || file_path(&server.store, &vdisk.name, &f.blake3).exists() {
                continue;
            }
            let tls = server.replication.peer_tls().is_some();
            let peers = view
                .servers
                .iter()
                .filter(|s| &s.name != me)
                .map(|s| crate::replication::peer::Peer::of(s, tls));
            let mut last = String::from("no other live server");
            for p in peers {
                match fetch(server, p.api.as_str(), &secret, &vdisk.name, f) {
                    Ok(()) => {
                        tracing::info!(vdisk = %vdisk.name, file = %f.name, bytes = f.size, from = %p.name, "boot file copied");
                        last.clear();
                        break;
                    }
                    Err(e) => last = format!("{}: {e}", p.name),
                }
            }
            if !last.is_empty() {
                tracing::debug!(vdisk = %vdisk.name, file = %f.name, reason = %last, "boot file not copied yet");
            }
        }
    }
}

fn fetch(server: &Boot, api: &str, secret: &str, vdisk: &str, f: &BootFile) -> Result<(), String> {
    let mut agent = vstream_client::Agent::builder().timeout(Duration::from_secs(60));
    if let Some(tls) = server.replication.peer_tls() {
        agent = agent.tls_config(tls.config());
    }
    let resp = agent
        .build()
        .client(api)
        .and_then(|c| {
            c.with_token(secret)
                .as_server(&server.config.name)
                .boot_file(vdisk, &f.blake3)
        })
        .map_err(|e| e.http_text())?;
    let mut body = resp.take(MAX_BOOT_FILE + 1);
    store_file(&server.store, vdisk, &f.name, &mut body, Some(f))
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The boot services this server was asked to run, bound at start so that
/// a port in use or a missing interface stops the server with a clear error.
#[derive(Default)]
pub struct Services {
    tftp: Option<TftpServer>,
    proxy_dhcp: Option<ProxyDhcp>,
}

impl Services {
    pub async fn bind(config: &Config) -> anyhow::Result<Services> {
        use anyhow::Context;
        let net = &config.netboot;
        let mut services = Services::default();
        if let Some(addr) = net.tftp {
            let root = match &net.tftp_root {
                Some(r) => r.clone(),
                None => default_tftp_root(&config.data)?,
            };
            let t = TftpServer::bind(addr, root.clone())
                .await
                .with_context(|| format!("binding TFTP to {addr} (folder {})", root.display()))?;
            tracing::info!(addr = %t.local_addr(), root = %root.display(), "TFTP listening");
            services.tftp = Some(t);
        }
        if let Some(iface) = &net.proxy_dhcp {
            let url = format!(
                "{}/boot/ipxe?mac={}",
                config.advertise_api.trim_end_matches('/'),
                vstream_netboot::proxy_dhcp::MAC_PLACEHOLDER
            );
            let p = ProxyDhcp::bind(ProxyDhcpConfig::new(iface.clone(), url))
                .await
                .with_context(|| format!("starting ProxyDHCP on {iface}"))?;
            tracing::info!(interface = %iface, ip = %p.server_ip(), "ProxyDHCP answering PXE clients");
            services.proxy_dhcp = Some(p);
        }
        Ok(services)
    }
}

/// `DATA/tftp`, with a copy of each iPXE binary of Debian's `ipxe` package
/// it lacks. Copies, not links: TFTP serves nothing outside its folder, and
/// Debian's ipxe.efi is a link to /boot.
fn default_tftp_root(data: &Path) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    let root = data.join("tftp");
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let mut missing = Vec::new();
    for name in crate::config::IPXE_FILES {
        let (from, to) = (
            Path::new(crate::config::IPXE_DIR).join(name),
            root.join(name),
        );
        if to.exists() {
            continue;
        }
        if !from.exists() {
            missing.push(name);
            continue;
        }
        tempfile::NamedTempFile::new_in(&root)
            .and_then(|mut tmp| {
                std::io::copy(&mut std::fs::File::open(&from)?, &mut tmp)?;
                tmp.persist(&to).map_err(|e| e.error)
            })
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        tracing::info!(file = name, from = %from.display(), "iPXE binary copied into the TFTP folder");
    }
    if !missing.is_empty() {
        tracing::warn!(files = ?missing, folder = %root.display(),
            "no iPXE binaries to serve: apt-get install ipxe, or put them in the TFTP folder");
    }
    Ok(root)
}

/// Runs the boot services, and keeps the boot files in step with the farm.
pub async fn run(server: Arc<Boot>, services: Services, mut shutdown: watch::Receiver<bool>) {
    if let Some(t) = services.tftp {
        let _ = server.stats.tftp.set(t.stats());
        tokio::spawn(t.run(shutdown.clone()));
    }
    if let Some(p) = services.proxy_dhcp {
        let _ = server.stats.dhcp.set(p.stats());
        tokio::spawn(p.run(shutdown.clone()));
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SYNC_INTERVAL) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let s = server.clone();
        let _ = tokio::task::spawn_blocking(move || {
            sync_once(&s);
            tidy(&s);
        })
        .await;
    }
}
