//! `vstream target`: the agent a diskless device (or its VM host) runs.
//!
//! It logs in through the bootstrap servers, streams the device's vDisk
//! version from the server login chose, keeps the device's write cache, fails
//! over when that server dies, and serves the OS a local NBD export. The work
//! is in the `vstream-target` crate; this module parses flags and runs it.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use vstream_service::Listen;
use vstream_target::{CacheSpec, Options};

#[derive(Debug, Args)]
pub struct TargetArgs {
    /// The servers' API addresses, tried in order until one answers
    /// (HOST:PORT[,HOST:PORT...]; as many as you like).
    #[arg(
        long,
        value_name = "HOST:PORT,...",
        value_delimiter = ',',
        required = true
    )]
    pub bootstrap: Vec<String>,
    /// This device's MAC address, as registered with `vstream device add`.
    #[arg(long, value_name = "MAC", value_parser = vstream_api::parse_mac)]
    pub mac: String,
    /// This boot's identity (1 to 64 letters, digits and '-'): the servers
    /// end the device's sessions of any other boot, and discard a
    /// Standard-mode write cache they keep for it. Default: vstream.boot=
    /// from the kernel command line (the boot script's), else the kernel's
    /// boot id. Give a new one each time the disk's OS starts when the agent
    /// serves a VM (--listen).
    #[arg(long, value_name = "ID", value_parser = parse_boot_id)]
    pub boot_id: Option<String>,
    /// Where the OS reaches its disk: unix:PATH, or a loopback HOST:PORT;
    /// repeat for both.
    #[arg(
        long,
        value_name = "unix:PATH|HOST:PORT",
        required_unless_present = "attach"
    )]
    pub listen: Vec<String>,
    /// Connect this kernel NBD device (`modprobe nbd` first) to the disk, as
    /// nbd-client does: what an initramfs uses for its root filesystem. The
    /// agent never detaches a mounted device.
    #[arg(long, value_name = "/dev/nbdN")]
    pub attach: Option<std::path::PathBuf>,
    /// The write cache: ram:SIZE, disk:PATH:SIZE, or ram:SIZE,disk:PATH:SIZE
    /// (RAM first, overflowing to the disk file).
    #[arg(long, value_name = "SPEC", default_value = "ram:1GiB")]
    pub cache: CacheSpec,
    /// Milliseconds a server may leave a read unanswered before the agent
    /// moves to another.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub deadline_ms: u64,
    /// Seconds a connection to a server may be idle before TCP keepalive
    /// probes it (every half of it); 0: no keepalive.
    #[arg(long, value_name = "SECS", default_value_t = vstream_service::tcp::DEFAULT_KEEPALIVE_SECS)]
    pub tcp_keepalive_secs: u64,
    /// Seconds a connection to a server may go unacknowledged (data or
    /// keepalive probes) before the agent drops it and fails over; 0: the
    /// kernel's default.
    #[arg(long, value_name = "SECS", default_value_t = vstream_service::tcp::DEFAULT_USER_TIMEOUT_SECS)]
    pub tcp_user_timeout_secs: u64,
    /// Stream over TLS with the device's credentials in DIR: ca-cert.pem
    /// (the farm's CA, which must have signed each server's certificate)
    /// and client-cert.pem with client-key.pem (the device's own; see
    /// docs/security.md).
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<std::path::PathBuf>,
    /// The name each server's certificate must carry, instead of the host
    /// of the address the agent dials (one name for the whole farm).
    #[arg(long, value_name = "NAME", requires = "tls_certificates")]
    pub tls_hostname: Option<String>,
    /// A one-time enrollment token to trade for the device's certificate
    /// when the TLS folder has only ca-cert.pem (a netbooted device): the
    /// certificate is held in memory and renewed at half its life. Default:
    /// vstream.enroll= on the kernel command line (the boot script's).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "VSTREAM_ENROLL_TOKEN",
        hide_env_values = true,
        requires = "tls_certificates"
    )]
    pub enroll_token: Option<String>,
}

fn parse_boot_id(s: &str) -> Result<String, String> {
    vstream_api::check_boot_token(s).map(|()| s.to_owned())
}

pub fn run(args: TargetArgs) -> Result<()> {
    let listen = args
        .listen
        .iter()
        .map(|l| l.parse::<Listen>().map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()?;
    let keepalive = vstream_service::tcp::Keepalive {
        idle_secs: args.tcp_keepalive_secs,
        user_timeout_secs: args.tcp_user_timeout_secs,
    };
    keepalive.check().map_err(anyhow::Error::msg)?;
    let tls = args
        .tls_certificates
        .as_deref()
        .map(|dir| vstream_service::ClientTls::load(dir, args.tls_hostname.clone()))
        .transpose()
        .context("loading the device's TLS credentials")?;
    let enroll = args.enroll_token.or_else(|| {
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        vstream_target::enroll::token_from_cmdline(&cmdline).map(str::to_owned)
    });
    let opts = Options {
        keepalive,
        enroll: enroll.filter(|_| tls.as_ref().is_some_and(|t| !t.has_credential())),
        tls,
        bootstrap: args.bootstrap,
        mac: args.mac,
        boot: match args.boot_id {
            Some(id) => id,
            None => vstream_target::boot_identity()?,
        },
        listen,
        attach: args.attach,
        cache: args.cache,
        deadline: Duration::from_millis(args.deadline_ms.max(1)),
    };
    crate::logging::init_logging(false)?;
    // One thread: every request crosses the local socket, the agent and the
    // upstream socket, and wake-ups between worker threads cost more than the
    // work (perf: a third of the agent's CPU was in task switches).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            vstream_service::wait_for_signal().await;
            tracing::info!("stopping");
            let _ = tx.send(true);
        });
        vstream_target::run(opts, rx).await
    })
}
