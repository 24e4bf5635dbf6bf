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

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use vstream_api::{BootFile, BootFileKind, Device, VDisk};
use vstream_netboot::ipxe::{self, BootScript};
use vstream_netboot::proxy_dhcp::{ProxyDhcp, ProxyDhcpConfig, ProxyDhcpStats};
use vstream_netboot::tftp::{TftpServer, TftpStats};

use crate::api::ApiError;
use crate::metrics::Metrics;
use crate::state::{now_unix, Server};

/// Largest kernel or initrd a vDisk may carry.
pub const MAX_BOOT_FILE: u64 = 2 << 30;
/// How often a server looks for boot files it lacks.
const SYNC_INTERVAL: Duration = Duration::from_secs(2);

/// What the boot services did, for `/metrics`.
#[derive(Default)]
pub struct Stats {
    scripts: AtomicU64,
    refusals: AtomicU64,
    file_bytes: AtomicU64,
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

/// The device-facing routes: no admin token, as with login.
pub fn routes() -> Router<Arc<Server>> {
    Router::new()
        .route("/boot/ipxe", axum::routing::get(script))
        .route("/boot/:mac/:file", axum::routing::get(file))
}

/// Where this server keeps boot file `hash` of `vdisk`.
pub fn file_path(server: &Server, vdisk: &str, hash: &str) -> PathBuf {
    server
        .store
        .root_of(vdisk)
        .join("boot")
        .join(vdisk)
        .join(hash)
}

fn valid_hash(hash: &str) -> bool {
    hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The live servers' HTTP base URLs, this one first.
fn servers(server: &Server) -> Vec<String> {
    let me = server.config.advertise_api.trim_end_matches('/').to_owned();
    let mut out = vec![me.clone()];
    for s in &server.membership.view().servers {
        let api = s.api.trim_end_matches('/').to_owned();
        if !out.contains(&api) {
            out.push(api);
        }
    }
    out
}

#[derive(Deserialize)]
struct ScriptQuery {
    mac: Option<String>,
}

fn ipxe_script(text: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
}

/// `GET /boot/ipxe?mac=M`: the device's boot script, or a message for its
/// console saying why it cannot boot. Always a script: iPXE shows nothing
/// useful of an HTTP error.
async fn script(State(server): State<Arc<Server>>, Query(q): Query<ScriptQuery>) -> Response {
    let servers = servers(&server);
    let raw = q.mac.unwrap_or_default();
    let Ok(mac) = vstream_api::parse_mac(&raw) else {
        return ipxe_script(ipxe::refusal(
            &format!("{raw:?} is not a MAC address"),
            "chain to /boot/ipxe?mac=${net0/mac}",
            // Asked again with the NIC's own MAC, which iPXE fills in.
            "${net0/mac}",
            &servers,
        ));
    };
    let stats = &server.boot;
    match boot_target(&server, &mac, true).await {
        Ok((device, vdisk)) => {
            let Some(kernel) = &vdisk.boot.kernel else {
                Metrics::add(&stats.refusals, 1);
                return ipxe_script(ipxe::refusal(
                    &format!(
                        "vDisk {} has no kernel to network-boot (device {})",
                        vdisk.name, device.name
                    ),
                    &format!(
                        "set one: vstream vdisk set {} --kernel FILE --initrd FILE",
                        vdisk.name
                    ),
                    &mac,
                    &servers,
                ));
            };
            // The device asks for its script as it starts: a new boot. Its
            // sessions of the last one end wherever they are, and the token
            // reaches its agent (or initramfs) on the kernel command line.
            let token = crate::state::new_boot_token();
            let boot = server.boot_of(&device.name, Some(&token), "ipxe").await;
            tracing::info!(device = %device.name, %mac, vdisk = %vdisk.name, kernel = %kernel.name, boot = boot.map_or(0, |b| b.seq), "boot script");
            Metrics::add(&stats.scripts, 1);
            ipxe_script(
                BootScript {
                    device: &device.name,
                    mac: &mac,
                    vdisk: &vdisk.name,
                    servers: &servers,
                    cmdline: &vdisk.boot.cmdline,
                    has_initrd: vdisk.boot.initrd.is_some(),
                    boot: &token,
                }
                .render(),
            )
        }
        Err(why) => {
            tracing::info!(%mac, reason = %why.0, "boot script refused");
            Metrics::add(&stats.refusals, 1);
            ipxe_script(ipxe::refusal(&why.0, &why.1, &mac, &servers))
        }
    }
}

/// Why a device cannot boot, and what an administrator can do about it.
struct Refusal(String, String);

/// The device with `mac` and its vDisk, from the farm state, or from the
/// last view of it while the farm state is unreachable. An unknown device is
/// registered first if `may_add` and auto-add is on: only the script adds,
/// never a file request.
async fn boot_target(
    server: &Arc<Server>,
    mac: &str,
    may_add: bool,
) -> Result<(Device, VDisk), Refusal> {
    let view = server.membership.view();
    let live = server.membership.is_connected();
    let found = match live {
        true => server.farm.find_device(mac).await.ok().flatten(),
        false => None,
    };
    let device = match found.or_else(|| view.device_by_mac(mac).cloned()) {
        Some(d) => d,
        None => auto_add(server, mac, may_add).await?,
    };
    let fresh = match live {
        true => server.farm.get_vdisk(&device.vdisk).await.ok().flatten(),
        false => None,
    };
    let vdisk = fresh
        .or_else(|| view.vdisk(&device.vdisk).cloned())
        .ok_or_else(|| {
            Refusal(
                format!(
                    "device {} is assigned vDisk {}, which does not exist",
                    device.name, device.vdisk
                ),
                format!("vstream device set {} --vdisk VDISK", device.name),
            )
        })?;
    Ok((device, vdisk))
}

/// PVS's Auto-Add: an unknown MAC becomes device `auto-<MAC digits>` on the
/// configured vDisk, if `may_add`.
async fn auto_add(server: &Arc<Server>, mac: &str, may_add: bool) -> Result<Device, Refusal> {
    let unknown = || {
        Refusal(
            format!("this device ({mac}) is not registered in the farm"),
            format!("register it: vstream device add NAME --mac {mac} --vdisk VDISK"),
        )
    };
    let Some(vdisk) = server.config.netboot.auto_add.as_ref().filter(|_| may_add) else {
        return Err(unknown());
    };
    let name = format!("auto-{}", mac.replace(':', ""));
    let device = Device {
        name: name.clone(),
        mac: mac.to_owned(),
        vdisk: vdisk.clone(),
        created_unix: now_unix(),
        kind: Default::default(),
    };
    match server.farm.create_device(device).await {
        Ok(d) => {
            tracing::info!(device = %d.name, %mac, vdisk = %d.vdisk, "auto-added a device");
            Ok(d)
        }
        // Two servers (or two requests) raced: the other one added it.
        Err(e) => match server.farm.find_device(mac).await {
            Ok(Some(d)) => Ok(d),
            _ => Err(Refusal(
                format!("auto-adding this device ({mac}) failed: {e}"),
                String::new(),
            )),
        },
    }
}

/// `GET /boot/MAC/kernel|initrd`: the device's own vDisk's boot file.
async fn file(
    State(server): State<Arc<Server>>,
    UrlPath((mac, which)): UrlPath<(String, String)>,
) -> Result<Response, ApiError> {
    let which: BootFileKind = which.parse().map_err(ApiError::not_found)?;
    let mac = vstream_api::parse_mac(&mac.replace('-', ":")).map_err(ApiError::bad_request)?;
    let (_, vdisk) = boot_target(&server, &mac, false)
        .await
        .map_err(|r| ApiError::not_found(r.0))?;
    let f = vdisk.boot.get(which).ok_or_else(|| {
        ApiError::not_found(format!("vDisk {} has no {which} to boot", vdisk.name))
    })?;
    let path = file_path(&server, &vdisk.name, &f.blake3);
    let sent = serve_file(&path, f.size).await.map_err(|e| {
        ApiError::not_found(format!(
            "this server does not hold the {which} of vDisk {} yet: {e}",
            vdisk.name
        ))
    })?;
    Metrics::add(&server.boot.file_bytes, f.size);
    Ok(sent)
}

/// `GET /peer/v1/vdisks/NAME/boot/HASH` (peers only): a boot file this
/// server holds.
pub(crate) async fn peer_file(
    State(server): State<Arc<Server>>,
    UrlPath((vdisk, hash)): UrlPath<(String, String)>,
) -> Result<Response, ApiError> {
    vstream_farm::validate_name(&vdisk)?;
    if !valid_hash(&hash) {
        return Err(ApiError::bad_request(
            "a boot file is named by its blake3 hash",
        ));
    }
    let path = file_path(&server, &vdisk, &hash);
    let size = std::fs::metadata(&path)
        .map_err(|_| ApiError::not_found(format!("no boot file {hash} of vDisk {vdisk} here")))?
        .len();
    serve_file(&path, size)
        .await
        .map_err(|e| ApiError::internal(format!("reading boot file {hash}: {e}")))
}

/// Streams a file in 256 KiB pieces.
async fn serve_file(path: &Path, size: u64) -> std::io::Result<Response> {
    let mut f = std::fs::File::open(path)?;
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; 256 << 10];
        loop {
            match f.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if tx
                        .blocking_send(Ok(Bytes::copy_from_slice(&buf[..n])))
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, size)
        .body(Body::from_stream(stream))
        .map_err(std::io::Error::other)
}

/// Writes what `read` yields to `vdisk`'s boot folder under its blake3 hash:
/// through a temporary file, synced, then renamed, so a boot file is never
/// seen half written. Checks the hash when one is `expected`.
pub fn store_file(
    server: &Server,
    vdisk: &str,
    name: &str,
    read: &mut dyn Read,
    expected: Option<&BootFile>,
) -> std::io::Result<BootFile> {
    let dir = server.store.root_of(vdisk).join("boot").join(vdisk);
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
fn tidy(server: &Server) {
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
fn sync_once(server: &Server) {
    let view = server.membership.view();
    let Some(secret) = server.replication.secret() else {
        return;
    };
    let me = &server.config.name;
    for vdisk in &view.vdisks {
        for f in vdisk.boot.files() {
            if !valid_hash(&f.blake3) || file_path(server, &vdisk.name, &f.blake3).exists() {
                continue;
            }
            let peers = view.servers.iter().filter(|s| &s.name != me);
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

fn fetch(
    server: &Server,
    api: &str,
    secret: &str,
    vdisk: &str,
    f: &BootFile,
) -> Result<(), String> {
    let resp = vstream_client::Agent::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .client(api)
        .and_then(|c| {
            c.with_token(secret)
                .as_server(&server.config.name)
                .boot_file(vdisk, &f.blake3)
        })
        .map_err(|e| e.http_text())?;
    let mut body = resp.take(MAX_BOOT_FILE + 1);
    store_file(server, vdisk, &f.name, &mut body, Some(f))
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
    pub async fn bind(config: &crate::Config) -> anyhow::Result<Services> {
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
pub async fn run(server: Arc<Server>, services: Services, mut shutdown: watch::Receiver<bool>) {
    if let Some(t) = services.tftp {
        let _ = server.boot.tftp.set(t.stats());
        tokio::spawn(t.run(shutdown.clone()));
    }
    if let Some(p) = services.proxy_dhcp {
        let _ = server.boot.dhcp.set(p.stats());
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
