//! The checked configuration of `vstream server`: a TOML file, then flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the NBD service listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Listen, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
        s.parse::<SocketAddr>().map(Listen::Tcp).map_err(|e| {
            format!("{s:?} is not HOST:PORT (an IP address and a port) or unix:PATH: {e}")
        })
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The settings a server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The store and the embedded farm database live here.
    pub data: PathBuf,
    /// NBD listeners (at least one).
    pub nbd: Vec<Listen>,
    /// Admin/device HTTP API.
    pub api: SocketAddr,
    pub log_format: LogFormat,
    /// Most concurrent NBD connections.
    pub max_connections: usize,
    /// Seconds a client may take to finish the handshake.
    pub handshake_timeout_secs: u64,
    /// Offer structured replies; off, every client gets simple replies as the
    /// Linux kernel does (for measuring that path, like nbdkit's `--no-sr`).
    pub structured_replies: bool,
}

pub const DEFAULT_DATA: &str = "/var/lib/vstream";
pub const DEFAULT_NBD: &str = "127.0.0.1:10809";
pub const DEFAULT_API: &str = "127.0.0.1:7080";

/// The config file: every key optional; flags override it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data: Option<PathBuf>,
    pub nbd: Option<Vec<String>>,
    pub api: Option<String>,
    pub log_format: Option<LogFormat>,
    pub max_connections: Option<usize>,
    pub handshake_timeout_secs: Option<u64>,
    pub structured_replies: Option<bool>,
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
    pub api: Option<String>,
    pub log_format: Option<LogFormat>,
    pub max_connections: Option<usize>,
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
        Ok(Config {
            data: flags
                .data
                .or(file.data)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA)),
            nbd,
            api,
            log_format: flags.log_format.or(file.log_format).unwrap_or_default(),
            max_connections,
            handshake_timeout_secs: file.handshake_timeout_secs.unwrap_or(10),
            structured_replies: file.structured_replies.unwrap_or(true),
        })
    }
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
    }
}
