//! The checked configuration of `vstream server`: a TOML file, then flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use vstream_service::Listen;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Where a farm keeps its keys in etcd.
pub const ETCD_PREFIX: &str = "/vstream/farm/";

/// The settings a server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The store and the embedded farm database live here.
    pub data: PathBuf,
    /// NBD listeners (at least one).
    pub nbd: Vec<Listen>,
    /// iSCSI portals; none unless configured.
    pub iscsi: Vec<SocketAddr>,
    /// The IQN prefix of the farm's iSCSI names: the targets
    /// `PREFIX:device.NAME` and the initiators `PREFIX:mac.HEX`.
    pub iqn_prefix: String,
    /// The iSCSI portal (HOST:PORT) devices reach this server at; `None`:
    /// it serves no iSCSI.
    pub advertise_iscsi: Option<String>,
    /// Admin/device HTTP API.
    pub api: SocketAddr,
    /// The same API over HTTPS, with the TLS certificates (device logins
    /// with their certificate go here).
    pub api_tls: Option<SocketAddr>,
    /// The HTTPS API's URL as devices and other servers reach it (defaults
    /// to `https://` and `api_tls`).
    pub advertise_api_tls: Option<String>,
    /// Seconds an enrollment token from the boot script stays good.
    pub enroll_token_ttl_secs: u64,
    /// Hours a device certificate this server signs stays valid.
    pub device_cert_hours: u64,
    /// Refused device logins, enrollments and renewals allowed per minute
    /// per client address, and per MAC, before 429 (0: no limit).
    pub login_failures: crate::login_guard::Budgets,
    pub log_format: LogFormat,
    /// Most concurrent NBD connections.
    pub max_connections: usize,
    /// Most NBD connections from one peer address (and, separately, most
    /// API connections from one address).
    pub max_connections_per_peer: usize,
    /// Seconds a client may take to finish the handshake.
    pub handshake_timeout_secs: u64,
    /// How NBD connections find a device that vanished (see `vstream_service::tcp`).
    pub keepalive: vstream_service::tcp::Keepalive,
    /// Seconds an NBD connection that is not a device's may go without a
    /// request before it is closed; 0: never.
    pub idle_timeout_secs: u64,
    /// Seconds an API client may take to send a request's headers.
    pub api_header_timeout_secs: u64,
    /// Seconds an API connection may stay open with no request running and
    /// no byte either way.
    pub api_idle_timeout_secs: u64,
    /// Offer structured replies; off, every client gets simple replies as the
    /// Linux kernel does (for measuring that path, like nbdkit's `--no-sr`).
    pub structured_replies: bool,
    /// NBD over TLS: off, on (if the client asks) or require (FORCEDTLS).
    pub tls: vstream_service::TlsMode,
    /// The folder with ca-cert.pem, server-cert.pem, server-key.pem and
    /// optionally ca-crl.pem (nbdkit's and QEMU's layout).
    pub tls_certificates: Option<PathBuf>,
    /// Ask every TLS client for a certificate from the farm's CA.
    pub tls_verify_peer: bool,
    /// Where the farm state lives.
    pub farm: FarmConfig,
    /// This server's name in the farm.
    pub name: String,
    /// Relative capacity for load balancing (0.1 to 1000).
    pub power: f64,
    /// The API URL and NBD HOST:PORT other servers and devices reach us at.
    pub advertise_api: String,
    pub advertise_nbd: String,
    /// Move devices off this server on its own when it carries more than the
    /// farm's average load plus this percent; `None`: only when asked.
    pub auto_rebalance: Option<f64>,
    /// Most devices booting from this server at once; 0: no limit.
    pub max_booting: u32,
    /// Subnets (CIDR) whose devices this server serves first.
    pub subnets: Vec<String>,
    pub replication: ReplicationConfig,
    pub netboot: NetbootConfig,
    /// Named stores kept here at another folder than the farm's path.
    pub store_paths: std::collections::HashMap<String, PathBuf>,
    /// Let the data folder join the farm even though it belongs to another
    /// one (see `identity.rs`); its unlisted vDisks are quarantined.
    pub adopt_data: bool,
    /// Days the audit trail keeps an entry.
    pub audit_retention_days: u64,
    /// Seconds of the farm state's history (earlier values of its keys) an
    /// etcd farm keeps: every so long, each server compacts etcd's history
    /// to the revision it saw that long ago; 0: never (etcd's own
    /// `--auto-compaction-retention` must then do it).
    pub etcd_history_secs: u64,
    /// Seconds from the start of a device's boot (as the farm recorded it;
    /// else of its session) during which its reads are its boot, learned
    /// into its version's boot set (saved beside the version's layers); the
    /// server reads the boot sets of the versions devices boot into the
    /// page cache ahead of them. 0: neither.
    pub boot_window_secs: u64,
    /// Most bytes of boot sets read ahead and kept warm at once, production
    /// versions' first; a set that does not fit is left out, and said (a
    /// device that read its whole disk in its window, say): by default a
    /// quarter of the machine's memory.
    pub boot_set_budget: u64,
    /// Whether changes and refusals go into the farm's audit trail (on
    /// unless `--audit off`, which is for measuring what it costs).
    pub audit: bool,
    /// Serve `/metrics` here too, without a token.
    pub metrics: Option<SocketAddr>,
}

/// The network boot services: all off unless asked for.
#[derive(Debug, Clone, Default)]
pub struct NetbootConfig {
    /// Serve TFTP here (port 69 unless given).
    pub tftp: Option<SocketAddr>,
    /// The folder TFTP serves, and nothing outside it; `None`: `DATA/tftp`,
    /// which the server fills with the iPXE binaries of Debian's `ipxe`.
    pub tftp_root: Option<PathBuf>,
    /// Answer PXE clients on this interface, beside the LAN's DHCP server.
    pub proxy_dhcp: Option<String>,
    /// Register unknown devices that network-boot, assigned this vDisk.
    pub auto_add: Option<String>,
}

/// Where Debian's `ipxe` package puts undionly.kpxe, ipxe.efi and snponly.efi
/// (ipxe.efi as a symlink to /boot, outside any folder TFTP may serve).
pub const IPXE_DIR: &str = "/usr/lib/ipxe";
/// The iPXE binaries the default TFTP folder gets from [`IPXE_DIR`].
pub const IPXE_FILES: [&str; 3] = ["undionly.kpxe", "ipxe.efi", "snponly.efi"];

/// How this server copies versions from its peers, and checks what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicationConfig {
    /// Most bytes per second it pulls from peers, all transfers together.
    pub rate: Option<u64>,
    /// When it may copy (see `replication::schedule`); none: any time.
    pub windows: Vec<String>,
    /// Most versions it copies at once.
    pub max_transfers: usize,
    /// Most bytes per second the scrub reads.
    pub scrub_rate: Option<u64>,
    /// Seconds between the starts of two scrubs of everything held.
    pub scrub_interval_secs: u64,
}

pub const DEFAULT_SCRUB_RATE: u64 = 64 << 20;
pub const DEFAULT_SCRUB_INTERVAL_SECS: u64 = 7 * 24 * 3600;

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            rate: None,
            windows: vec![],
            max_transfers: 2,
            scrub_rate: Some(DEFAULT_SCRUB_RATE),
            scrub_interval_secs: DEFAULT_SCRUB_INTERVAL_SECS,
        }
    }
}

/// Where the farm state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FarmConfig {
    /// The embedded store in the data folder: a one-server farm.
    Embedded,
    /// etcd, at these endpoints.
    Etcd(Vec<String>),
}

impl std::str::FromStr for FarmConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<FarmConfig, String> {
        if s == "embedded" {
            return Ok(FarmConfig::Embedded);
        }
        let Some(rest) = s.strip_prefix("etcd://") else {
            return Err(format!(
                "--farm {s:?} is neither `embedded` nor etcd://HOST:PORT[,HOST:PORT...]"
            ));
        };
        let endpoints: Vec<String> = rest
            .split(',')
            .map(|e| e.trim().trim_start_matches("etcd://").to_string())
            .collect();
        if endpoints.iter().any(|e| e.is_empty() || !e.contains(':')) {
            return Err(format!(
                "--farm {s:?}: every etcd endpoint must be HOST:PORT"
            ));
        }
        Ok(FarmConfig::Etcd(
            endpoints
                .into_iter()
                .map(|e| format!("http://{e}"))
                .collect(),
        ))
    }
}

/// PVS's default for "maximum devices booting" per server.
pub const DEFAULT_MAX_BOOTING: u32 = 500;
/// An enrollment token is good for five minutes: enough for a slow
/// firmware to load the kernel and start the agent, short for a thief.
pub const DEFAULT_ENROLL_TOKEN_TTL_SECS: u64 = 300;
/// A device certificate lasts twelve hours; the agent renews it at half.
pub const DEFAULT_DEVICE_CERT_HOURS: u64 = 12;
pub const DEFAULT_DATA: &str = "/var/lib/vstream";
pub const DEFAULT_NBD: &str = "127.0.0.1:10809";
/// The IQN prefix of a farm that names none.
pub const DEFAULT_IQN_PREFIX: &str = "iqn.2026-12.org.vstream";
/// The iSCSI port (RFC 7143).
pub const ISCSI_PORT: u16 = 3260;
pub const DEFAULT_API: &str = "127.0.0.1:7080";
/// Generous for a NAT or a relay with many devices behind one address (an
/// agent holds one connection): 256 devices behind one address need more.
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: usize = 256;
/// Ten minutes without a request closes a tool's connection to a vDisk.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 600;
/// How much of etcd's history a farm keeps by default: five minutes, as
/// Kubernetes' API server keeps of its etcd.
pub const DEFAULT_ETCD_HISTORY_SECS: u64 = 300;
/// A boot's reads are those of its session's first two minutes.
pub const DEFAULT_BOOT_WINDOW_SECS: u64 = 120;

/// The config file: every key optional; flags override it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data: Option<PathBuf>,
    pub nbd: Option<Vec<String>>,
    pub iscsi: Option<Vec<String>>,
    pub iqn_prefix: Option<String>,
    pub advertise_iscsi: Option<String>,
    pub api: Option<String>,
    pub log_format: Option<LogFormat>,
    pub max_connections: Option<usize>,
    pub max_connections_per_peer: Option<usize>,
    pub handshake_timeout_secs: Option<u64>,
    pub tcp_keepalive_secs: Option<u64>,
    pub tcp_user_timeout_secs: Option<u64>,
    pub idle_timeout_secs: Option<u64>,
    pub api_header_timeout_secs: Option<u64>,
    pub api_idle_timeout_secs: Option<u64>,
    pub structured_replies: Option<bool>,
    pub tls: Option<String>,
    pub tls_certificates: Option<PathBuf>,
    pub tls_verify_peer: Option<bool>,
    pub api_tls: Option<String>,
    pub advertise_api_tls: Option<String>,
    pub enroll_token_ttl_secs: Option<u64>,
    pub device_cert_hours: Option<u64>,
    pub login_failures_per_address: Option<u32>,
    pub login_failures_per_mac: Option<u32>,
    pub farm: Option<String>,
    pub name: Option<String>,
    pub power: Option<f64>,
    pub advertise_api: Option<String>,
    pub advertise_nbd: Option<String>,
    pub auto_rebalance: Option<f64>,
    pub max_booting: Option<u32>,
    pub subnets: Option<Vec<String>>,
    pub replication_rate: Option<String>,
    pub replication_windows: Option<Vec<String>>,
    pub replication_max_transfers: Option<usize>,
    pub scrub_rate: Option<String>,
    pub scrub_interval_secs: Option<u64>,
    pub tftp: Option<String>,
    pub tftp_root: Option<PathBuf>,
    pub proxy_dhcp: Option<String>,
    pub auto_add: Option<String>,
    pub store_paths: Option<std::collections::HashMap<String, PathBuf>>,
    pub audit_retention_days: Option<u64>,
    pub audit: Option<String>,
    pub metrics: Option<String>,
    pub etcd_history_secs: Option<u64>,
    pub boot_window_secs: Option<u64>,
    pub boot_set_budget: Option<String>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// Raw settings from flags; `None` means "not given".
#[derive(Debug, Default, Clone)]
pub struct FlagConfig {
    pub data: Option<PathBuf>,
    pub nbd: Vec<String>,
    pub iscsi: Vec<String>,
    pub iqn_prefix: Option<String>,
    pub advertise_iscsi: Option<String>,
    pub api: Option<String>,
    pub log_format: Option<LogFormat>,
    pub max_connections: Option<usize>,
    pub tcp_keepalive_secs: Option<u64>,
    pub tcp_user_timeout_secs: Option<u64>,
    pub max_connections_per_peer: Option<usize>,
    pub idle_timeout_secs: Option<u64>,
    pub tls: Option<String>,
    pub tls_certificates: Option<PathBuf>,
    pub tls_verify_peer: bool,
    pub api_tls: Option<String>,
    pub advertise_api_tls: Option<String>,
    pub enroll_token_ttl_secs: Option<u64>,
    pub device_cert_hours: Option<u64>,
    pub login_failures_per_address: Option<u32>,
    pub login_failures_per_mac: Option<u32>,
    pub farm: Option<String>,
    pub name: Option<String>,
    pub power: Option<f64>,
    pub advertise_api: Option<String>,
    pub advertise_nbd: Option<String>,
    pub auto_rebalance: Option<f64>,
    pub max_booting: Option<u32>,
    pub subnets: Vec<String>,
    pub replication_rate: Option<String>,
    pub replication_windows: Vec<String>,
    pub replication_max_transfers: Option<usize>,
    pub scrub_rate: Option<String>,
    pub scrub_interval_secs: Option<u64>,
    pub tftp: Option<String>,
    pub tftp_root: Option<PathBuf>,
    pub proxy_dhcp: Option<String>,
    pub auto_add: Option<String>,
    pub store_paths: Vec<String>,
    pub adopt_data: bool,
    pub audit_retention_days: Option<u64>,
    pub audit: Option<String>,
    pub metrics: Option<String>,
    pub etcd_history_secs: Option<u64>,
    pub boot_window_secs: Option<u64>,
    pub boot_set_budget: Option<String>,
}

/// A quarter of the machine's memory (1 GiB if it cannot be told).
fn default_boot_set_budget() -> u64 {
    // SAFETY: a struct of integers, for which all zeroes is a valid value.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: sysinfo only fills the struct it is given, which lives here.
    let failed = unsafe { libc::sysinfo(&mut info) } != 0;
    if failed || info.totalram == 0 {
        return 1 << 30;
    }
    (info.totalram as u64).saturating_mul(u64::from(info.mem_unit.max(1))) / 4
}

/// A rate: bytes per second with an optional K/M/G suffix (`50M`), or `0`/`off` for none.
fn parse_rate(what: &str, s: &str) -> Result<Option<u64>, String> {
    if s == "0" || s.eq_ignore_ascii_case("off") || s.eq_ignore_ascii_case("unlimited") {
        return Ok(None);
    }
    vstream_api::parse_size(s.trim_end_matches("/s"))
        .map(Some)
        .map_err(|e| format!("{what} {s:?}: {e}"))
}

/// An iSCSI portal: `HOST:PORT`, or a bare `HOST` for port 3260.
fn parse_portal(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| {
            s.trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, ISCSI_PORT))
        })
        .map_err(|_| format!("--iscsi {s:?} is not HOST or HOST:PORT (an IP address)"))
}

/// Checks the farm's IQN prefix: an `iqn.` name (RFC 3720 3.2.6.3), with
/// no `:` of its own (the names under it add one).
fn check_iqn_prefix(s: &str) -> Result<String, String> {
    let lower = s.to_ascii_lowercase();
    let valid =
        vstream_api::check_iqn(&lower).is_ok() && lower.starts_with("iqn.") && !lower.contains(':');
    if !valid {
        return Err(format!(
            "--iqn-prefix {s:?} is not an IQN prefix: use iqn.YYYY-MM.REVERSED.DOMAIN \
             (letters, digits, '.' and '-'), e.g. {DEFAULT_IQN_PREFIX}"
        ));
    }
    Ok(lower)
}

/// `HOST:PORT`, or a bare `HOST` for the standard port 69.
fn parse_tftp(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| {
            s.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 69))
        })
        .map_err(|_| format!("--tftp {s:?} is not HOST or HOST:PORT"))
}

impl Config {
    /// Merges defaults, the file and the flags, and checks the result.
    pub fn resolve(file: FileConfig, flags: FlagConfig) -> Result<Config, String> {
        let nbd_raw = if !flags.nbd.is_empty() {
            flags.nbd
        } else {
            file.nbd.unwrap_or_else(|| vec![DEFAULT_NBD.to_string()])
        };
        let nbd = nbd_raw
            .iter()
            .map(|s| s.parse())
            .collect::<Result<Vec<Listen>, _>>()?;
        if nbd.is_empty() {
            return Err("at least one NBD listen address is needed".into());
        }
        let iscsi = if !flags.iscsi.is_empty() {
            flags.iscsi
        } else {
            file.iscsi.unwrap_or_default()
        }
        .iter()
        .map(|s| parse_portal(s))
        .collect::<Result<Vec<SocketAddr>, _>>()?;
        let iqn_prefix = check_iqn_prefix(
            flags
                .iqn_prefix
                .as_deref()
                .or(file.iqn_prefix.as_deref())
                .unwrap_or(DEFAULT_IQN_PREFIX),
        )?;
        let advertise_iscsi = match flags.advertise_iscsi.or(file.advertise_iscsi) {
            Some(_) if iscsi.is_empty() => {
                return Err("advertise_iscsi without an --iscsi portal to serve it".into())
            }
            Some(a) => Some(a),
            None => iscsi.first().map(|a| a.to_string()),
        };
        let api_raw = flags
            .api
            .or(file.api)
            .unwrap_or_else(|| DEFAULT_API.to_string());
        let api = api_raw
            .parse()
            .map_err(|e| format!("--api {api_raw:?} is not HOST:PORT: {e}"))?;
        let max_connections = flags
            .max_connections
            .or(file.max_connections)
            .unwrap_or(4096);
        if max_connections == 0 {
            return Err("max_connections must be at least 1".into());
        }
        let keepalive = vstream_service::tcp::Keepalive {
            idle_secs: flags
                .tcp_keepalive_secs
                .or(file.tcp_keepalive_secs)
                .unwrap_or(vstream_service::tcp::DEFAULT_KEEPALIVE_SECS),
            user_timeout_secs: flags
                .tcp_user_timeout_secs
                .or(file.tcp_user_timeout_secs)
                .unwrap_or(vstream_service::tcp::DEFAULT_USER_TIMEOUT_SECS),
        };
        keepalive.check()?;
        let max_connections_per_peer = flags
            .max_connections_per_peer
            .or(file.max_connections_per_peer)
            .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_PEER);
        if max_connections_per_peer == 0 {
            return Err("max_connections_per_peer must be at least 1".into());
        }
        let api_header_timeout_secs = file.api_header_timeout_secs.unwrap_or(10);
        let api_idle_timeout_secs = file.api_idle_timeout_secs.unwrap_or(60);
        if api_header_timeout_secs == 0 || api_idle_timeout_secs == 0 {
            return Err(
                "api_header_timeout_secs and api_idle_timeout_secs must be at least 1".into(),
            );
        }
        let tls_certificates = flags.tls_certificates.or(file.tls_certificates);
        // A server with certificates requires TLS unless told otherwise.
        let tls = match flags.tls.or(file.tls) {
            Some(t) => t.parse::<vstream_service::TlsMode>()?,
            None if tls_certificates.is_some() => vstream_service::TlsMode::Require,
            None => vstream_service::TlsMode::Off,
        };
        if tls != vstream_service::TlsMode::Off && tls_certificates.is_none() {
            return Err(format!(
                "--tls {tls} needs the server's certificates: --tls-certificates DIR \
                 (ca-cert.pem, server-cert.pem, server-key.pem)"
            ));
        }
        let tls_verify_peer = flags.tls_verify_peer || file.tls_verify_peer.unwrap_or(false);
        let api_tls = match flags.api_tls.or(file.api_tls) {
            None => None,
            Some(_) if tls_certificates.is_none() => {
                return Err(
                    "--api-tls needs the server's certificates: --tls-certificates DIR".into(),
                )
            }
            Some(a) => Some(
                a.parse()
                    .map_err(|e| format!("--api-tls {a:?} is not HOST:PORT: {e}"))?,
            ),
        };
        let advertise_api_tls = match (flags.advertise_api_tls.or(file.advertise_api_tls), api_tls)
        {
            (Some(_), None) => return Err("--advertise-api-tls needs --api-tls".into()),
            (Some(url), Some(_)) if !url.starts_with("https://") => {
                return Err(format!(
                    "--advertise-api-tls {url:?} is not an https:// URL"
                ))
            }
            (url, a) => url.or_else(|| a.map(|a| format!("https://{a}"))),
        };
        let enroll_token_ttl_secs = flags
            .enroll_token_ttl_secs
            .or(file.enroll_token_ttl_secs)
            .unwrap_or(DEFAULT_ENROLL_TOKEN_TTL_SECS);
        let device_cert_hours = flags
            .device_cert_hours
            .or(file.device_cert_hours)
            .unwrap_or(DEFAULT_DEVICE_CERT_HOURS);
        if !(1..=3600).contains(&enroll_token_ttl_secs) {
            return Err(format!(
                "enroll_token_ttl_secs {enroll_token_ttl_secs} is outside 1 to 3600"
            ));
        }
        if !(1..=24 * 90).contains(&device_cert_hours) {
            return Err(format!(
                "device_cert_hours {device_cert_hours} is outside 1 to 2160 (90 days)"
            ));
        }
        let defaults = crate::login_guard::Budgets::default();
        let login_failures = crate::login_guard::Budgets {
            per_address: flags
                .login_failures_per_address
                .or(file.login_failures_per_address)
                .unwrap_or(defaults.per_address),
            per_mac: flags
                .login_failures_per_mac
                .or(file.login_failures_per_mac)
                .unwrap_or(defaults.per_mac),
        };
        let farm = flags
            .farm
            .or(file.farm)
            .map(|f| f.parse())
            .transpose()?
            .unwrap_or(FarmConfig::Embedded);
        if matches!(farm, FarmConfig::Etcd(_)) && tls_certificates.is_some() && api_tls.is_none() {
            return Err(
                "a farm server with --tls-certificates needs --api-tls: its peers \
                        reach it over HTTPS, each showing its server certificate"
                    .into(),
            );
        }
        let name = flags.name.or(file.name).unwrap_or_else(default_name);
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(format!(
                "server name {name:?} must be letters, digits, '-', '_' or '.'"
            ));
        }
        let power = flags.power.or(file.power).unwrap_or(1.0);
        if !(0.1..=1000.0).contains(&power) {
            return Err(format!("power {power} is outside 0.1 to 1000"));
        }
        let advertise_api = flags
            .advertise_api
            .or(file.advertise_api)
            .unwrap_or_else(|| format!("http://{api}"));
        let advertise_nbd = match flags.advertise_nbd.or(file.advertise_nbd) {
            Some(a) => a,
            None => nbd
                .iter()
                .find_map(|l| match l {
                    Listen::Tcp(a) => Some(a.to_string()),
                    Listen::Unix(_) => None,
                })
                .unwrap_or_default(),
        };
        let auto_rebalance = flags.auto_rebalance.or(file.auto_rebalance);
        if auto_rebalance.is_some_and(|t| !(0.0..=1000.0).contains(&t)) {
            return Err("auto_rebalance is a trigger percent, 0 to 1000".into());
        }
        let subnets = if flags.subnets.is_empty() {
            file.subnets.unwrap_or_default()
        } else {
            flags.subnets
        };
        for net in &subnets {
            crate::cidr::parse_cidr(net)
                .ok_or_else(|| format!("subnet {net:?} is not ADDRESS/PREFIX (10.1.0.0/16)"))?;
        }
        let mut replication = ReplicationConfig::default();
        if let Some(r) = flags.replication_rate.or(file.replication_rate) {
            replication.rate = parse_rate("replication rate", &r)?;
        }
        replication.windows = if flags.replication_windows.is_empty() {
            file.replication_windows.unwrap_or_default()
        } else {
            flags.replication_windows
        };
        for w in &replication.windows {
            w.parse::<crate::schedule::Window>()?;
        }
        if let Some(n) = flags
            .replication_max_transfers
            .or(file.replication_max_transfers)
        {
            if n == 0 {
                return Err("replication_max_transfers must be at least 1".into());
            }
            replication.max_transfers = n;
        }
        if let Some(r) = flags.scrub_rate.or(file.scrub_rate) {
            replication.scrub_rate = parse_rate("scrub rate", &r)?;
        }
        if let Some(s) = flags.scrub_interval_secs.or(file.scrub_interval_secs) {
            replication.scrub_interval_secs = s.max(1);
        }
        let tftp = flags
            .tftp
            .or(file.tftp)
            .map(|t| parse_tftp(&t))
            .transpose()?;
        let auto_add = flags.auto_add.or(file.auto_add);
        if let Some(v) = &auto_add {
            vstream_farm::validate_name(v).map_err(|e| format!("auto_add: {e}"))?;
        }
        let netboot = NetbootConfig {
            tftp,
            tftp_root: flags.tftp_root.or(file.tftp_root),
            proxy_dhcp: flags.proxy_dhcp.or(file.proxy_dhcp),
            auto_add,
        };
        let mut store_paths = file.store_paths.unwrap_or_default();
        for entry in &flags.store_paths {
            let (name, path) = entry
                .split_once('=')
                .ok_or_else(|| format!("--store-path {entry:?} is not NAME=PATH"))?;
            store_paths.insert(name.to_owned(), PathBuf::from(path));
        }
        for (name, path) in &store_paths {
            vstream_farm::validate_name(name).map_err(|e| format!("store path {name:?}: {e}"))?;
            if name == vstream_api::DEFAULT_STORE || !path.is_absolute() {
                return Err(format!(
                    "store path {name}={}: name a store other than {:?}, at an absolute path",
                    path.display(),
                    vstream_api::DEFAULT_STORE
                ));
            }
        }
        Ok(Config {
            adopt_data: flags.adopt_data,
            metrics: match flags.metrics.or(file.metrics) {
                Some(m) => Some(
                    m.parse()
                        .map_err(|e| format!("--metrics {m:?} is not HOST:PORT: {e}"))?,
                ),
                None => None,
            },
            audit: match flags.audit.or(file.audit).as_deref() {
                None | Some("on") => true,
                Some("off") => false,
                Some(other) => return Err(format!("audit is on or off, not {other:?}")),
            },
            etcd_history_secs: flags
                .etcd_history_secs
                .or(file.etcd_history_secs)
                .unwrap_or(DEFAULT_ETCD_HISTORY_SECS),
            boot_window_secs: flags
                .boot_window_secs
                .or(file.boot_window_secs)
                .unwrap_or(DEFAULT_BOOT_WINDOW_SECS),
            boot_set_budget: match flags.boot_set_budget.or(file.boot_set_budget) {
                Some(b) => vstream_api::parse_size(&b)
                    .map_err(|e| format!("boot_set_budget {b:?}: {e}"))?,
                None => default_boot_set_budget(),
            },
            audit_retention_days: match flags
                .audit_retention_days
                .or(file.audit_retention_days)
                .unwrap_or(90)
            {
                0 => return Err("audit_retention_days must be at least 1".into()),
                d => d,
            },
            store_paths,
            netboot,
            replication,
            subnets,
            auto_rebalance,
            max_booting: flags
                .max_booting
                .or(file.max_booting)
                .unwrap_or(DEFAULT_MAX_BOOTING),
            farm,
            name,
            power,
            advertise_api,
            advertise_nbd,
            data: flags
                .data
                .or(file.data)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA)),
            nbd,
            iscsi,
            iqn_prefix,
            advertise_iscsi,
            api,
            log_format: flags.log_format.or(file.log_format).unwrap_or_default(),
            max_connections,
            keepalive,
            max_connections_per_peer,
            handshake_timeout_secs: file.handshake_timeout_secs.unwrap_or(10),
            idle_timeout_secs: flags
                .idle_timeout_secs
                .or(file.idle_timeout_secs)
                .unwrap_or(DEFAULT_IDLE_TIMEOUT_SECS),
            api_header_timeout_secs,
            api_idle_timeout_secs,
            structured_replies: file.structured_replies.unwrap_or(true),
            tls,
            tls_certificates,
            tls_verify_peer,
            api_tls,
            advertise_api_tls,
            enroll_token_ttl_secs,
            device_cert_hours,
            login_failures,
        })
    }
}

/// The host name, or `vstream` if there is none.
fn default_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "vstream".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file() {
        let file: FileConfig =
            toml::from_str("data = \"/srv/a\"\nnbd = [\"0.0.0.0:1\"]\napi = \"127.0.0.1:2\"")
                .unwrap();
        let flags = FlagConfig {
            nbd: vec!["unix:/tmp/s".into()],
            ..Default::default()
        };
        let c = Config::resolve(file, flags).unwrap();
        assert_eq!(c.data, PathBuf::from("/srv/a"));
        assert_eq!(c.nbd, vec![Listen::Unix("/tmp/s".into())]);
        assert_eq!(c.api.port(), 2);
    }

    #[test]
    fn bad_values_are_explained() {
        let flags = FlagConfig {
            api: Some("localhost".into()),
            ..Default::default()
        };
        assert!(Config::resolve(FileConfig::default(), flags)
            .unwrap_err()
            .contains("--api"));
        assert!(toml::from_str::<FileConfig>("bogus = 1").is_err());
        let bad_farm = FlagConfig {
            farm: Some("zookeeper://x".into()),
            ..Default::default()
        };
        assert!(Config::resolve(FileConfig::default(), bad_farm)
            .unwrap_err()
            .contains("etcd://"));
    }

    #[test]
    fn etcd_history_and_boot_window_defaults_file_and_flags() {
        let c = Config::resolve(FileConfig::default(), FlagConfig::default()).unwrap();
        assert_eq!(c.etcd_history_secs, DEFAULT_ETCD_HISTORY_SECS);
        assert_eq!(c.boot_window_secs, DEFAULT_BOOT_WINDOW_SECS);
        let text = "etcd_history_secs = 60\nboot_window_secs = 300";
        let file: FileConfig = toml::from_str(text).unwrap();
        let c = Config::resolve(file, FlagConfig::default()).unwrap();
        assert_eq!((c.etcd_history_secs, c.boot_window_secs), (60, 300));
        let file: FileConfig = toml::from_str(text).unwrap();
        let flags = FlagConfig {
            etcd_history_secs: Some(0),
            boot_window_secs: Some(0),
            ..Default::default()
        };
        let c = Config::resolve(file, flags).unwrap();
        assert_eq!((c.etcd_history_secs, c.boot_window_secs), (0, 0));
    }

    #[test]
    fn the_boot_set_budget_is_a_quarter_of_memory_unless_given() {
        let c = Config::resolve(FileConfig::default(), FlagConfig::default()).unwrap();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        let total_kib: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        assert_eq!(c.boot_set_budget, total_kib * 1024 / 4);
        let file: FileConfig = toml::from_str("boot_set_budget = \"2G\"").unwrap();
        let c = Config::resolve(file, FlagConfig::default()).unwrap();
        assert_eq!(c.boot_set_budget, 2 << 30);
        let flags = FlagConfig {
            boot_set_budget: Some("0".into()),
            ..Default::default()
        };
        assert_eq!(
            Config::resolve(FileConfig::default(), flags)
                .unwrap()
                .boot_set_budget,
            0
        );
        let bad = FlagConfig {
            boot_set_budget: Some("lots".into()),
            ..Default::default()
        };
        let err = Config::resolve(FileConfig::default(), bad).unwrap_err();
        assert!(err.contains("boot_set_budget \"lots\""), "{err}");
    }

    #[test]
    fn keepalive_defaults_file_and_flags() {
        let c = Config::resolve(FileConfig::default(), FlagConfig::default()).unwrap();
        assert_eq!(c.keepalive, vstream_service::tcp::Keepalive::default());
        let file: FileConfig =
            toml::from_str("tcp_keepalive_secs = 4\ntcp_user_timeout_secs = 12").unwrap();
        let flags = FlagConfig {
            tcp_user_timeout_secs: Some(0),
            ..Default::default()
        };
        let c = Config::resolve(file, flags).unwrap();
        assert_eq!(c.keepalive.idle_secs, 4);
        assert_eq!(c.keepalive.user_timeout_secs, 0);
        let flags = FlagConfig {
            tcp_keepalive_secs: Some(100_000),
            ..Default::default()
        };
        assert!(Config::resolve(FileConfig::default(), flags)
            .unwrap_err()
            .contains("tcp_keepalive_secs"));
    }

    #[test]
    fn farm_endpoints() {
        assert_eq!(
            "etcd://10.0.0.1:2379,10.0.0.2:2379"
                .parse::<FarmConfig>()
                .unwrap(),
            FarmConfig::Etcd(vec![
                "http://10.0.0.1:2379".into(),
                "http://10.0.0.2:2379".into()
            ])
        );
        assert!("etcd://".parse::<FarmConfig>().is_err());
    }
}
