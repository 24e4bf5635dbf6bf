//! vstream-target: the agent a diskless device runs (`vstream target`).
//!
//! ```text
//!   OS / QEMU / nbd-client --NBD (unix socket, or TCP loopback)--> local export
//!       local export = Overlay [ write cache: Local, layers in RAM or on a local disk ]
//!                      over Remote (a backend: the base, with failover)
//!                      or, for a device whose writes are its server's, Remote alone
//!       Remote --NBD base/DEVICE@N/HASH--> the server login chose  (upstream.rs)
//!              `-- on a reset or a silent server: log in again, same version, replay (remote.rs)
//!   login: POST /api/v1/login to the first bootstrap server that answers   (login.rs)
//! ```
//!
//! Writes never leave the device: they land in its write cache, and reads of
//! written blocks come from there. Only reads of blocks the device never
//! wrote go to the farm, and those are safe to send again to any server
//! holding the same content hash. The local NBD service is the server's own
//! (`vstream_service`), serving this one export.

mod attach;
mod cache;
pub mod enroll;
mod login;
mod remote;
mod upstream;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::future::BoxFuture;
use tokio::sync::watch;
use vstream_api::{LoginReply, LoginRequest, Pin};
use vstream_pipeline::{Backend, Local, Overlay};
use vstream_service::metrics::Metrics;
use vstream_service::Listen;
use vstream_service::{self as nbd, Exports};
use vstream_service::{Export, OpenError};

pub use cache::CacheSpec;
pub use login::LoginFailure;

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The servers' API addresses (HOST:PORT or URLs), tried in order.
    pub bootstrap: Vec<String>,
    pub mac: String,
    /// This boot's identity (see [`boot_identity`]): the same across the
    /// agent's failovers, new at every boot of the device.
    pub boot: String,
    /// Where the OS reaches its disk.
    pub listen: Vec<Listen>,
    /// A kernel NBD device (`/dev/nbd0`) to connect to the export.
    pub attach: Option<std::path::PathBuf>,
    pub cache: CacheSpec,
    /// How long a server may leave a read unanswered before the agent moves.
    pub deadline: Duration,
    /// How its connections to servers find a vanished server.
    pub keepalive: vstream_service::tcp::Keepalive,
    /// NBD over TLS to the servers, with the device's certificate.
    pub tls: Option<vstream_service::ClientTls>,
    /// A one-time enrollment token to trade for the device's certificate
    /// when `tls` has none (a netbooted device; see [`enroll`]).
    pub enroll: Option<String>,
}

/// The one export the agent serves.
struct Device {
    name: String,
    description: String,
    backend: Arc<dyn Backend>,
    metrics: Metrics,
}

impl Exports for Device {
    fn open<'a>(
        self: Arc<Self>,
        name: &'a str,
        _client: &'a vstream_service::Client,
        _go: bool,
    ) -> BoxFuture<'a, Result<Export, OpenError>> {
        Box::pin(async move {
            // The device's own name, or the default export (nbd-client sends "").
            if !name.is_empty() && name != self.name {
                return Err(OpenError::Unknown(name.to_owned()));
            }
            Ok(Export {
                name: self.name.clone(),
                description: self.description.clone(),
                backend: self.backend.clone(),
                session: None,
            })
        })
    }
    fn list<'a>(
        &'a self,
        _client: &'a vstream_service::Client,
    ) -> BoxFuture<'a, Vec<(String, String)>> {
        let one = vec![(self.name.clone(), self.description.clone())];
        Box::pin(async move { one })
    }
    fn structured_replies(&self) -> bool {
        true
    }
    fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(10)
    }
    fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// The device's boot identity when none is given: `vstream.boot=` on the
/// kernel command line (the boot script's token: the servers saw this boot
/// begin), else the kernel's own boot id, new at every boot of this machine.
pub fn boot_identity() -> Result<String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if let Some(token) = boot_from_cmdline(&cmdline) {
        return Ok(token.to_owned());
    }
    let path = "/proc/sys/kernel/random/boot_id";
    let id = std::fs::read_to_string(path)
        .with_context(|| format!("reading {path} for the boot identity (or give --boot-id)"))?;
    let id = id.trim().to_owned();
    vstream_api::check_boot_token(&id).map_err(anyhow::Error::msg)?;
    Ok(id)
}

/// The `vstream.boot=` word of a kernel command line.
fn boot_from_cmdline(cmdline: &str) -> Option<&str> {
    cmdline
        .split_whitespace()
        .rev()
        .find_map(|w| w.strip_prefix("vstream.boot="))
        .filter(|t| vstream_api::check_boot_token(t).is_ok())
}

/// Logs in until a server takes the device; waits (and says why) meanwhile.
async fn first_login(opts: &Options) -> Result<LoginReply> {
    // Nothing waits on the device yet: up to 5 s between refused logins.
    let mut backoff = remote::Backoff::new(Duration::from_secs(5));
    loop {
        let req = LoginRequest {
            mac: opts.mac.clone(),
            avoid: vec![],
            pin: None,
            boot: Some(opts.boot.clone()),
        };
        let (bootstrap, deadline, tls) = (opts.bootstrap.clone(), opts.deadline, opts.tls.clone());
        let asked = move || login::login(&bootstrap, &req, deadline, tls.as_ref());
        match tokio::task::spawn_blocking(asked).await? {
            Ok(reply) => return Ok(reply),
            Err(e) => {
                let why = e.to_string();
                if backoff.failed(&why) {
                    tracing::warn!(reason = %why, "login: waiting for a server to take the device");
                }
            }
        }
        backoff.wait().await;
    }
}

/// Pins the agent's memory and keeps the OOM killer away: it serves the
/// root filesystem, so paging it out or killing it would hang the OS.
fn protect_memory() {
    // Reply buffers come and go by the thousand per second. Kept in the heap
    // rather than mapped and unmapped (or the heap trimmed) each time, since
    // with every page locked each new mapping is faulted in whole.
    // SAFETY: mallopt only tunes glibc's allocator.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
    // SAFETY: plain syscall; failure is reported, not fatal.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "could not lock the agent's memory (mlockall)");
    }
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "-1000") {
        tracing::warn!(error = %e, "could not exempt the agent from the OOM killer");
    }
}

/// How often the agent tells its server how full the write cache is.
const REPORT_EVERY: Duration = Duration::from_secs(2);

/// Tells the server streaming now how many bytes the device's write cache
/// holds, when that changes or the server does (`vstream device list`).
async fn report_cache(
    cache: Arc<Overlay>,
    remote: Arc<remote::Remote>,
    mac: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last: Option<(String, u64)> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(REPORT_EVERY) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let disk = cache.cache().disk();
        let bytes = disk.top_bytes() + disk.overflow_bytes().unwrap_or(0);
        let now = (remote.api(), bytes);
        if last.as_ref() == Some(&now) {
            continue;
        }
        let body = vstream_api::CacheReport {
            mac: mac.clone(),
            cache_bytes: bytes,
        };
        let api = now.0.clone();
        let sent = tokio::task::spawn_blocking(move || {
            vstream_client::Agent::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .client(&api)
                .and_then(|c| c.cache_report(&body))
                .map_err(|e| e.http_text())
        })
        .await;
        match sent {
            Ok(Ok(())) => last = Some(now),
            Ok(Err(e)) => tracing::debug!(error = %e, "could not report the cache use"),
            Err(e) => tracing::debug!(error = %e, "cache report task failed"),
        }
    }
}

/// Runs the agent until `shutdown`.
pub async fn run(opts: Options, shutdown: watch::Receiver<bool>) -> Result<()> {
    if opts.bootstrap.is_empty() {
        bail!("give at least one bootstrap server (--bootstrap HOST:PORT)");
    }
    if opts.listen.is_empty() && opts.attach.is_none() {
        bail!("give --listen, --attach, or both: the OS needs a way to its disk");
    }
    protect_memory();
    if let Some(tls) = opts.tls.as_ref().filter(|t| !t.has_credential()) {
        let Some(token) = &opts.enroll else {
            bail!(
                "the TLS folder has no client-cert.pem and there is no enrollment token \
                 (vstream.enroll= on the kernel command line, or --enroll-token)"
            );
        };
        let reply = enroll::enroll(&opts.bootstrap, &opts.mac, token, tls, opts.deadline)
            .await
            .context("enrolling the device for its certificate")?;
        tracing::info!(device = %reply.device, serial = %reply.serial, not_after = reply.not_after_unix, "device certificate from enrollment");
        tokio::spawn(enroll::keep_renewed(
            opts.bootstrap.clone(),
            tls.clone(),
            opts.deadline,
            shutdown.clone(),
        ));
    }
    let reply = first_login(&opts).await?;
    // A device-side cache over shared bytes may move between servers; a
    // device whose writes belong to one server (Private mode, maintenance,
    // a server-side cache) stays with it.
    let stays = !reply.failover;
    if stays {
        tracing::info!(device = %reply.device, vdisk = %reply.vdisk, mode = %reply.mode, cache = %reply.cache_type, server = %reply.server,
            "writes go to the server; this device waits for it rather than fail over");
    }
    let first = upstream::Connection::open(
        &reply,
        opts.deadline * 5,
        &opts.keepalive,
        opts.tls.as_ref(),
    )
    .await
    .with_context(|| {
        format!(
            "opening {} on {} ({})",
            reply.export, reply.server, reply.nbd
        )
    })?;
    tracing::info!(device = %reply.device, vdisk = %reply.vdisk, version = reply.version,
        server = %reply.server, hash = %reply.content_hash, "logged in");
    let pin = Pin {
        vdisk: reply.vdisk.clone(),
        version: reply.version,
        content_hash: reply.content_hash.clone(),
    };
    let remote = Arc::new(remote::Remote::new(
        &opts,
        reply.size,
        pin,
        first,
        shutdown.clone(),
        stays.then(|| reply.clone()),
    ));
    // A connection the server closes is left at once, not at the next read.
    tokio::spawn(remote.clone().follow());
    // The pipeline: the remote disk itself for a device whose writes are
    // its server's; else the device's write cache over it.
    let (backend, cache): (Arc<dyn Backend>, Option<Arc<Overlay>>) = if stays {
        (remote.clone(), None)
    } else {
        let disk = opts.cache.disk(reply.size, reply.cache_limit)?;
        let overlay = Arc::new(Overlay::new(Local::new(Arc::new(disk)), remote.clone()));
        (overlay.clone(), Some(overlay))
    };
    let device = Arc::new(Device {
        name: reply.device.clone(),
        description: format!(
            "vDisk {} version {} through vstream target ({})",
            reply.vdisk,
            reply.version,
            if stays {
                format!("{} mode, writes on server {}", reply.mode, reply.server)
            } else {
                format!("{} write cache", opts.cache)
            }
        ),
        backend,
        metrics: Metrics::default(),
    });
    if let Some(cache) = cache {
        tokio::spawn(report_cache(
            cache,
            remote.clone(),
            opts.mac.clone(),
            shutdown.clone(),
        ));
    }
    let conns = nbd::Limits::new(64, 64);
    let mut tasks = tokio::task::JoinSet::new();
    for addr in &opts.listen {
        let listener = nbd::Listener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        tracing::info!(addr = %listener.local_addr(), export = %reply.device, "serving the device's disk");
        tasks.spawn(nbd::serve(
            listener,
            device.clone() as Arc<dyn Exports>,
            conns.clone(),
            shutdown.clone(),
        ));
    }
    if let Some(path) = &opts.attach {
        let attached = attach::attach(path, &reply.device, device.clone() as Arc<dyn Exports>)
            .await
            .with_context(|| format!("attaching {}", path.display()))?;
        let mut stop = shutdown.clone();
        let _ = stop.wait_for(|s| *s).await;
        if attached.is_mounted() {
            tracing::warn!(device = %attached.device().display(),
                "the device is mounted: the agent stays to serve it (unmount it first, or kill -9 the agent)");
            std::future::pending::<()>().await;
        }
        attached.detach().await;
    }
    while tasks.join_next().await.is_some() {}
    remote.disconnect().await;
    tracing::info!(failovers = remote.failovers.load(std::sync::atomic::Ordering::Relaxed), server = %remote.server(), "agent stopped; the write cache is discarded");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_identity_comes_from_the_last_vstream_boot_word() {
        assert_eq!(
            boot_from_cmdline("ro vstream.boot=aa-1 quiet vstream.boot=bb-2\n"),
            Some("bb-2")
        );
        assert_eq!(boot_from_cmdline("ro quiet"), None);
        assert_eq!(boot_from_cmdline("vstream.boot=a/b"), None);
        assert_eq!(boot_from_cmdline("vstream.boot="), None);
        // On this machine: a kernel boot id, well formed.
        let id = boot_identity().unwrap();
        assert!(vstream_api::check_boot_token(&id).is_ok(), "{id}");
    }
}
