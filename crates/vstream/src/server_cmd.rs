//! `vstream server`: runs a provisioning server.
//!
//! ```text
//!   flags (ServerArgs) --> FlagConfig ┐
//!   --config FILE      --> FileConfig ┴--> Config::resolve --> Config
//!   Config --> tracing to stderr (text or JSON) --> tokio runtime
//!          --> vstream_server::run(config)
//! ```
//!
//! Flags override the file, the file overrides the defaults; the defaults and
//! the checks live in `vstream_server::config`, not here.

use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use vstream_api::ServerInfo;

use crate::args::ListArgs;
use crate::client::{api_path, connect, ClientArgs};
use crate::output::{human_size, print, print_json, render_table};
use vstream_server::config::{Config, FileConfig, FlagConfig, LogFormat};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ServerArgs {
    #[command(subcommand)]
    pub command: Option<ServerCommand>,
    /// Folder holding the vDisk store and the farm database
    /// [default: /var/lib/vstream].
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Where the NBD service listens; repeat for several listeners
    /// [default: 127.0.0.1:10809].
    #[arg(long, value_name = "HOST:PORT|unix:PATH")]
    pub nbd: Vec<String>,
    /// Serve iSCSI here (port 3260 unless given); repeat for several
    /// portals. Off unless given: each device gets its own target,
    /// `PREFIX:device.NAME`, over the same disk as its NBD export.
    #[arg(long, value_name = "HOST[:PORT]")]
    pub iscsi: Vec<String>,
    /// The farm's IQN prefix, the same on every server
    /// [default: iqn.2026-12.org.vstream].
    #[arg(long, value_name = "IQN")]
    pub iqn_prefix: Option<String>,
    /// The iSCSI HOST:PORT devices reach this server at, in boot scripts
    /// [default: the first --iscsi].
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise_iscsi: Option<String>,
    /// Where the admin and device HTTP API listens [default: 127.0.0.1:7080].
    #[arg(long, value_name = "HOST:PORT")]
    pub api: Option<String>,
    /// TOML file with the same settings; flags win over it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log lines as text or JSON, on stderr (RUST_LOG filters; default info)
    /// [default: text].
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormatArg>,
    /// Most NBD connections served at once; lowered at start to fit the
    /// open-file limit [default: 4096].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Seconds an NBD connection may be idle before TCP keepalive probes its
    /// peer (every half of it); 0: no keepalive [default: 10].
    #[arg(long, value_name = "SECS")]
    pub tcp_keepalive_secs: Option<u64>,
    /// Seconds an NBD connection may go unacknowledged (data or keepalive
    /// probes) before it is ended, with its device's session: how soon a
    /// device that lost power is let go; 0: the kernel's default [default: 30].
    #[arg(long, value_name = "SECS")]
    pub tcp_user_timeout_secs: Option<u64>,
    /// Most NBD connections from one client address, and most API
    /// connections from one address; a NAT or relay with more devices than
    /// this behind one address needs a higher value [default: 256].
    #[arg(long, value_name = "N")]
    pub max_connections_per_peer: Option<usize>,
    /// Close an NBD connection that is not a device's (a tool reading a
    /// vDisk) after SECS without a request; 0: never. A device's own
    /// connection is never closed for idling [default: 600].
    #[arg(long = "idle-timeout", value_name = "SECS")]
    pub idle_timeout_secs: Option<u64>,
    /// NBD over TLS: `off`, `on` (TLS if the client asks) or `require` (no
    /// export without TLS) [default: require with --tls-certificates, else
    /// off].
    #[arg(long, value_name = "off|on|require")]
    pub tls: Option<String>,
    /// The server's TLS credentials: a folder with ca-cert.pem,
    /// server-cert.pem, server-key.pem and optionally ca-crl.pem (the layout
    /// nbdkit and QEMU use).
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,
    /// Ask every TLS client for a certificate signed by ca-cert.pem (and not
    /// revoked by ca-crl.pem); without one its handshake fails.
    #[arg(long)]
    pub tls_verify_peer: bool,
    /// Serve the API over HTTPS too, on HOST:PORT, with --tls-certificates:
    /// where devices log in with their certificate once the farm has TLS.
    #[arg(long, value_name = "HOST:PORT")]
    pub api_tls: Option<String>,
    /// The HTTPS API's URL as devices and other servers reach it (device
    /// enrollment and logins go there) [default: https:// and --api-tls].
    #[arg(long, value_name = "URL")]
    pub advertise_api_tls: Option<String>,
    /// Seconds an enrollment token from the boot script stays good, 1 to 3600
    /// [default: 300].
    #[arg(long, value_name = "SECS")]
    pub enroll_token_ttl: Option<u64>,
    /// Refused device logins, enrollments and renewals allowed per minute
    /// from one client address before it gets 429; 0: no limit [default: 30].
    #[arg(long, value_name = "N")]
    pub login_failures_per_address: Option<u32>,
    /// The same per MAC, whatever the address; a device showing its own
    /// certificate is never held back by it; 0: no limit [default: 10].
    #[arg(long, value_name = "N")]
    pub login_failures_per_mac: Option<u32>,
    /// Hours a device certificate this server signs stays valid, 1 to 2160;
    /// the agent renews it at half [default: 12].
    #[arg(long, value_name = "HOURS")]
    pub device_cert_hours: Option<u64>,
    /// Where the farm state lives: `embedded` (a one-server farm, in the data
    /// folder) or etcd://HOST:PORT[,HOST:PORT...] [default: embedded].
    #[arg(long, value_name = "embedded|etcd://HOST:PORT,...")]
    pub farm: Option<String>,
    /// This server's name in the farm [default: the host name].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Relative capacity for load balancing, 0.1 to 1000 [default: 1].
    #[arg(long, value_name = "RATING")]
    pub power: Option<f64>,
    /// The API URL devices and servers reach this one at
    /// [default: http:// and the --api address].
    #[arg(long, value_name = "URL")]
    pub advertise_api: Option<String>,
    /// The NBD HOST:PORT devices reach this one at [default: the first TCP --nbd].
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise_nbd: Option<String>,
    /// Move devices off this server by itself when it carries more than the
    /// farm's average load plus PCT percent (skipped while more than 20 % of
    /// its devices are booting) [default: off].
    #[arg(long, value_name = "PCT")]
    pub auto_rebalance: Option<f64>,
    /// Most devices booting from this server at once (their first minute);
    /// further logins go to other servers or wait. 0: no limit [default: 500].
    #[arg(long, value_name = "N")]
    pub max_booting: Option<u32>,
    /// A subnet (CIDR) whose devices this server serves first, when it can
    /// take them (subnet affinity); repeat for several.
    #[arg(long = "subnet", value_name = "CIDR")]
    pub subnets: Vec<String>,
    /// Most bytes per second this server pulls from its peers when it
    /// replicates versions (50M, 1G; default: no limit).
    #[arg(long, value_name = "RATE")]
    pub replication_rate: Option<String>,
    /// When this server may replicate: `22:00-06:00` or `mon-fri 22:00-06:00`
    /// (UTC, or the offset in VSTREAM_UTC_OFFSET); repeat for several.
    /// Default: any time. `vstream replication start` copies at once.
    #[arg(long = "replication-window", value_name = "[DAYS] HH:MM-HH:MM")]
    pub replication_windows: Vec<String>,
    /// Most versions copied at once (default 2).
    #[arg(long, value_name = "N")]
    pub replication_max_transfers: Option<usize>,
    /// Most bytes per second the background scrub reads (default 64M; `off`: no limit).
    #[arg(long, value_name = "RATE")]
    pub scrub_rate: Option<String>,
    /// Seconds between two scrubs of everything this server holds (default: a week).
    #[arg(long, value_name = "SECS")]
    pub scrub_interval: Option<u64>,
    /// Serve the iPXE binaries over TFTP here (HOST, or HOST:PORT; port 69
    /// by default). Off unless given.
    #[arg(long, value_name = "HOST[:PORT]")]
    pub tftp: Option<String>,
    /// The folder TFTP serves, and nothing outside it (default DATA/tftp,
    /// which gets copies of the iPXE binaries of Debian's ipxe package).
    #[arg(long, value_name = "DIR")]
    pub tftp_root: Option<PathBuf>,
    /// Answer PXE clients on this network interface, beside the LAN's own
    /// DHCP server (ProxyDHCP). Off unless given.
    #[arg(long, value_name = "IFACE")]
    pub proxy_dhcp: Option<String>,
    /// Register a device that network-boots with an unknown MAC, assigned
    /// this vDisk (PVS's Auto-Add). Off unless given.
    #[arg(long, value_name = "VDISK")]
    pub auto_add: Option<String>,
    /// Keep the named store NAME in PATH on this server instead of the path
    /// the farm gives it (`vstream store add`); repeat for several.
    #[arg(long = "store-path", value_name = "NAME=PATH")]
    pub store_paths: Vec<String>,
    /// Start even though the data folder belongs to another farm than the
    /// one --farm names (it is told why otherwise): the folder joins this
    /// farm, and the vDisks the farm does not list are kept in quarantine
    /// (`vstream quarantine`), never deleted.
    #[arg(long)]
    pub adopt_data: bool,
    /// Serve /metrics here too, without a token (for a Prometheus on a
    /// monitoring network); on the API it needs a token of role metrics or
    /// more.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<String>,
    /// Days the farm's audit trail keeps an entry [default: 90].
    #[arg(long, value_name = "DAYS")]
    pub audit_retention_days: Option<u64>,
    /// `off` records nothing in the audit trail: for measuring what the
    /// trail costs, never for a farm in use [default: on].
    #[arg(long, value_name = "on|off", value_parser = ["on", "off"])]
    pub audit: Option<String>,
    /// How much of the farm state's history an etcd farm keeps: every SECS
    /// each server compacts etcd to the revision it saw SECS ago, so etcd
    /// does not grow until its quota stops it; 0: never, for an etcd that
    /// compacts itself (`--auto-compaction-retention`) [default: 300].
    #[arg(long = "etcd-history", value_name = "SECS")]
    pub etcd_history_secs: Option<u64>,
    /// How long after a device's boot starts (as the farm recorded it; else
    /// its session's start) its reads count as its boot: they are learned
    /// into the version's boot set, which the server reads into the page
    /// cache before devices boot (at start, when a version becomes
    /// production or test, and every 5 minutes); 0: neither [default: 120].
    #[arg(long = "boot-window", value_name = "SECS")]
    pub boot_window_secs: Option<u64>,
    /// Most bytes of boot sets read ahead and kept warm at once, the
    /// production versions' sets first; a set that does not fit in what is
    /// left is not read ahead (the log, /metrics and `replication status`
    /// say so) [default: a quarter of the machine's memory].
    #[arg(long = "boot-set-budget", value_name = "SIZE")]
    pub boot_set_budget: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// List the farm's servers: up or down, load, power, versions held.
    List(ServerListArgs),
}

#[derive(Debug, Args)]
pub struct ServerListArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(flatten)]
    pub list: ListArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(f: LogFormatArg) -> LogFormat {
        match f {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

pub fn run(args: ServerArgs) -> Result<()> {
    if let Some(ServerCommand::List(a)) = args.command {
        return list(a);
    }
    let config = resolve(args)?;
    crate::logging::init_logging(config.log_format == LogFormat::Json)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(vstream_server::run(config))
}

/// The checked configuration from the file (if any) and the flags.
fn resolve(args: ServerArgs) -> Result<Config> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path).map_err(|e| anyhow!("config file: {e}"))?,
        None => FileConfig::default(),
    };
    let flags = FlagConfig {
        data: args.data,
        nbd: args.nbd,
        iscsi: args.iscsi,
        iqn_prefix: args.iqn_prefix,
        advertise_iscsi: args.advertise_iscsi,
        api: args.api,
        log_format: args.log_format.map(LogFormat::from),
        max_connections: args.max_connections,
        tcp_keepalive_secs: args.tcp_keepalive_secs,
        tcp_user_timeout_secs: args.tcp_user_timeout_secs,
        max_connections_per_peer: args.max_connections_per_peer,
        idle_timeout_secs: args.idle_timeout_secs,
        tls: args.tls,
        tls_certificates: args.tls_certificates,
        tls_verify_peer: args.tls_verify_peer,
        api_tls: args.api_tls,
        advertise_api_tls: args.advertise_api_tls,
        enroll_token_ttl_secs: args.enroll_token_ttl,
        device_cert_hours: args.device_cert_hours,
        login_failures_per_address: args.login_failures_per_address,
        login_failures_per_mac: args.login_failures_per_mac,
        farm: args.farm,
        name: args.name,
        power: args.power,
        advertise_api: args.advertise_api,
        advertise_nbd: args.advertise_nbd,
        auto_rebalance: args.auto_rebalance,
        max_booting: args.max_booting,
        subnets: args.subnets,
        replication_rate: args.replication_rate,
        replication_windows: args.replication_windows,
        replication_max_transfers: args.replication_max_transfers,
        scrub_rate: args.scrub_rate,
        scrub_interval_secs: args.scrub_interval,
        tftp: args.tftp,
        tftp_root: args.tftp_root,
        proxy_dhcp: args.proxy_dhcp,
        auto_add: args.auto_add,
        store_paths: args.store_paths,
        adopt_data: args.adopt_data,
        audit_retention_days: args.audit_retention_days,
        audit: args.audit,
        metrics: args.metrics,
        etcd_history_secs: args.etcd_history_secs,
        boot_window_secs: args.boot_window_secs,
        boot_set_budget: args.boot_set_budget,
    };
    Config::resolve(file, flags).map_err(|e| anyhow!("invalid server configuration: {e}"))
}

fn list(a: ServerListArgs) -> Result<()> {
    let client = connect(&a.client)?;
    let path = api_path(&["servers"]);
    if a.list.json {
        return print_json(&client.get(&path)?);
    }
    let servers = client.servers()?;
    print(&server_table(&servers))
}

fn server_table(servers: &[ServerInfo]) -> String {
    let rows: Vec<Vec<String>> = servers
        .iter()
        .map(|i| {
            let s = &i.status;
            let held: Vec<String> = s
                .versions
                .iter()
                .map(|v| {
                    format!(
                        "{}@{}{}",
                        v.vdisk,
                        v.number,
                        if v.verified { "" } else { " (unverified)" }
                    )
                })
                .collect();
            vec![
                s.name.clone(),
                if i.up { "up" } else { "down" }.to_string(),
                format!("{:.2}", i.load),
                format!("{}", s.power),
                s.devices.to_string(),
                format!("{}/s", human_size(s.read_bytes_per_s)),
                match i.farm_connected {
                    Some(true) => "connected".to_string(),
                    Some(false) => "DEGRADED".to_string(),
                    None => "-".to_string(),
                },
                s.nbd.clone(),
                if held.is_empty() {
                    "-".to_string()
                } else {
                    held.join(" ")
                },
            ]
        })
        .collect();
    render_table(
        &[
            "NAME", "STATE", "LOAD", "POWER", "DEVICES", "READ", "FARM", "NBD", "VERSIONS",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::io::Write;
    use vstream_server::config::Listen;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        server: ServerArgs,
    }

    fn args(line: &[&str]) -> ServerArgs {
        Cli::try_parse_from(std::iter::once("server").chain(line.iter().copied()))
            .unwrap()
            .server
    }

    #[test]
    fn flags_become_config() {
        let c = resolve(args(&[
            "--data",
            "/srv/vs",
            "--nbd",
            "0.0.0.0:10809",
            "--nbd",
            "unix:/run/vs.sock",
            "--api",
            "127.0.0.1:9000",
            "--log-format",
            "json",
            "--max-connections",
            "7",
        ]))
        .unwrap();
        assert_eq!(c.data, PathBuf::from("/srv/vs"));
        assert_eq!(
            c.nbd,
            vec![
                Listen::Tcp("0.0.0.0:10809".parse().unwrap()),
                Listen::Unix("/run/vs.sock".into())
            ]
        );
        assert_eq!(c.api.port(), 9000);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.max_connections, 7);
    }

    #[test]
    fn flags_win_over_the_file() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            "data = \"/from/file\"\nmax_connections = 3\nlog_format = \"json\""
        )
        .unwrap();
        let path = f.path().to_str().unwrap();
        let c = resolve(args(&["--config", path, "--max-connections", "9"])).unwrap();
        assert_eq!(c.data, PathBuf::from("/from/file"));
        assert_eq!(c.max_connections, 9);
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn bad_settings_are_explained() {
        let e = resolve(args(&["--api", "localhost"]))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("invalid server configuration: "), "{e}");
        let e = resolve(args(&["--config", "/nonexistent/vstream.toml"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/vstream.toml"), "{e}");
        assert!(Cli::try_parse_from(["server", "--log-format", "xml"]).is_err());
    }
}
