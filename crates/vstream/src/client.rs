//! How the admin commands reach the server's API: the `--api` and
//! `--token-file` options, and the token, for a [`vstream_client::Client`].
//!
//! The client maps every failure to one of three messages:
//!
//! * the server answered 4xx/5xx with `{"error": "sentence"}`: a
//!   [`ClientError::Status`] carrying the sentence, which `main` prints alone;
//! * the server could not be reached: "cannot reach the vstream API at URL";
//! * anything else (a bad answer, a broken connection): what went wrong, with
//!   the URL.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clap::Args;
use vstream_client::Agent;
pub use vstream_client::{api_path, Client, Error as ClientError};

pub const DEFAULT_API_URL: &str = "http://127.0.0.1:7080";
pub const DEFAULT_TOKEN_FILE: &str = "/var/lib/vstream/admin.token";
/// Holds the token itself; wins over the token file.
pub const TOKEN_ENV: &str = "VSTREAM_TOKEN";

/// How the admin commands reach the API. Flattened into `vdisk`, `device` and
/// `version`, and global there, so the options go before or after the action.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Base URL of the server's admin API.
    #[arg(long, value_name = "URL", env = "VSTREAM_API", default_value = DEFAULT_API_URL,
          global = true)]
    pub api: String,
    /// File holding the admin token (the VSTREAM_TOKEN environment variable,
    /// when set, holds the token itself and wins over this file).
    #[arg(long, value_name = "PATH", env = "VSTREAM_TOKEN_FILE",
          default_value = DEFAULT_TOKEN_FILE, global = true)]
    pub token_file: PathBuf,
    /// The CA certificate (PEM) an `https://` API's certificate must chain
    /// to: the farm's `ca-cert.pem`. Default: /etc/vstream/tls/ca-cert.pem
    /// when it exists, else the public web roots. Never skipped.
    #[arg(long, value_name = "PATH", env = "VSTREAM_API_CA", global = true)]
    pub api_ca: Option<PathBuf>,
}

/// The farm's CA where `vstream ca init` and the packages put it.
pub const DEFAULT_CA_FILE: &str = "/etc/vstream/tls/ca-cert.pem";

/// How long connecting to the API may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the token (from the environment or the token file) and checks the
/// URL; sends nothing yet.
pub fn connect(args: &ClientArgs) -> Result<Client> {
    let env_token = std::env::var(TOKEN_ENV).ok();
    let token = resolve_token(env_token.as_deref(), &args.token_file)?;
    let ca = args.api_ca.clone().or_else(|| {
        let default = Path::new(DEFAULT_CA_FILE);
        default.exists().then(|| default.to_owned())
    });
    connect_to(&args.api, token, ca.as_deref())
}

/// A client of the API at `base` sending `token`; over HTTPS, the server's
/// certificate must chain to `ca` (or, without one, to a public root) and
/// name the host of `base`.
fn connect_to(base: &str, token: String, ca: Option<&Path>) -> Result<Client> {
    let mut agent = Agent::builder().connect_timeout(CONNECT_TIMEOUT);
    if let (Some(ca), true) = (ca, base.starts_with("https://")) {
        let tls = vstream_service::tls::ClientTls::trusting(ca)
            .map_err(|e| anyhow!("--api-ca {}: {e}", ca.display()))?;
        agent = agent.tls_config(tls.config());
    }
    match agent.build().client(base) {
        Ok(c) => Ok(c.with_token(token)),
        Err(ClientError::BadUrl { base }) => {
            bail!("--api {base:?} is not an http:// or https:// URL")
        }
        Err(e) => Err(e.into()),
    }
}

/// The token from `VSTREAM_TOKEN` if set, else from the token file.
fn resolve_token(env_token: Option<&str>, token_file: &Path) -> Result<String> {
    if let Some(t) = env_token {
        let t = t.trim();
        if t.is_empty() {
            bail!("{TOKEN_ENV} is set but empty");
        }
        return Ok(t.to_string());
    }
    let text = std::fs::read_to_string(token_file).map_err(|e| {
        anyhow!(
            "cannot read the admin token from {}: {e}; pass --token-file or set {TOKEN_ENV}",
            token_file.display()
        )
    })?;
    let t = text.trim();
    if t.is_empty() {
        bail!(
            "the admin token file {} is empty; pass --token-file or set {TOKEN_ENV}",
            token_file.display()
        );
    }
    Ok(t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn api_error_wins_over_context_in_main() {
        let e: anyhow::Error = ClientError::Status {
            url: "http://h/api/v1/vdisks".into(),
            status: 409,
            status_text: "Conflict".into(),
            error: Some("it exists".into()),
            body: r#"{"error":"it exists"}"#.into(),
        }
        .into();
        let e = e.context("creating vDisk x");
        assert_eq!(
            e.downcast_ref::<ClientError>()
                .filter(|c| c.is_status())
                .map(|a| a.to_string()),
            Some("it exists".into())
        );
    }

    #[test]
    fn token_from_env_wins_over_file() {
        let missing = Path::new("/nonexistent/vstream/admin.token");
        assert_eq!(resolve_token(Some(" s3cret\n"), missing).unwrap(), "s3cret");
        assert!(resolve_token(Some(""), missing).is_err());
    }

    #[test]
    fn token_file_is_read_and_trimmed() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "abc123").unwrap();
        assert_eq!(resolve_token(None, f.path()).unwrap(), "abc123");
        let empty = tempfile::NamedTempFile::new().unwrap();
        assert!(resolve_token(None, empty.path())
            .unwrap_err()
            .to_string()
            .contains("is empty"));
    }

    #[test]
    fn unreadable_token_file_says_what_to_do() {
        let missing = Path::new("/nonexistent/vstream/admin.token");
        let msg = resolve_token(None, missing).unwrap_err().to_string();
        assert!(
            msg.starts_with("cannot read the admin token from /nonexistent/vstream/admin.token: "),
            "{msg}"
        );
        assert!(
            msg.ends_with("; pass --token-file or set VSTREAM_TOKEN"),
            "{msg}"
        );
    }

    #[test]
    fn refused_connection_is_explained() {
        // Bind and drop to find a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let base = format!("http://127.0.0.1:{port}");
        let c = connect_to(&base, "t".into(), None).unwrap();
        let msg = format!(
            "{:#}",
            anyhow::Error::from(c.get::<serde_json::Value>("/api/v1/vdisks").unwrap_err())
        );
        assert!(
            msg.starts_with(&format!("cannot reach the vstream API at {base}: ")),
            "{msg}"
        );
        assert!(msg.ends_with("(is `vstream server` running?)"), "{msg}");
    }

    #[test]
    fn only_http_urls() {
        assert_eq!(
            connect_to("127.0.0.1:7080", "t".into(), None)
                .err()
                .unwrap()
                .to_string(),
            r#"--api "127.0.0.1:7080" is not an http:// or https:// URL"#
        );
        assert_eq!(
            connect_to("http://h:1/", "t".into(), None).unwrap().base(),
            "http://h:1"
        );
    }
}
