//! The device's certificate when it has no disk to keep one on: traded at
//! start for the one-time token of its boot script (`vstream.enroll=`),
//! held in memory only, and renewed at half its life with itself.
//!
//! ```text
//!   start   key + CSR made here ── POST /api/v1/enroll {mac, token, csr} ──> first
//!                                  https:// bootstrap server that answers
//!   T/2     new key + CSR ──────── POST /api/v1/renew {csr}, showing the
//!                                  certificate held ──> same
//! ```
//!
//! The key never leaves the agent. A refused token is final (spent, late,
//! revoked, or another device's): the device boots again for a new one.

use std::time::Duration;

use tokio::sync::watch;
use vstream_api::{CredentialReply, EnrollRequest, RenewRequest};
use vstream_client::{Agent, Client, Error};
use vstream_service::ClientTls;

use crate::remote::Backoff;

/// Why no certificate came.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// A server answered no: final for this token or certificate.
    #[error("{server} refused: {message}")]
    Refused { server: String, message: String },
    /// No server could be asked.
    #[error("no server answered: {0}")]
    NoAnswer(String),
    /// The bootstrap list names no HTTPS API: a token never crosses the
    /// wire in clear.
    #[error("no https:// server in the bootstrap list ({0}): enrollment runs over HTTPS only")]
    NoHttps(String),
}

/// The `vstream.enroll=` word of a kernel command line: hex digits only.
pub fn token_from_cmdline(cmdline: &str) -> Option<&str> {
    cmdline
        .split_whitespace()
        .rev()
        .find_map(|w| w.strip_prefix("vstream.enroll="))
        .filter(|t| !t.is_empty() && t.len() <= 128 && t.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Asks each HTTPS bootstrap server in turn with `call`; the first that
/// answers decides, and its certificate is the client's from then on.
fn ask(
    bootstrap: &[String],
    tls: &ClientTls,
    timeout: Duration,
    name: &str,
    call: impl Fn(&Client, String) -> Result<CredentialReply, Error>,
) -> Result<CredentialReply, EnrollError> {
    let agent = Agent::builder()
        .connect_timeout(timeout)
        .timeout(timeout * 2)
        .tls_config(tls.config())
        .build();
    if !bootstrap.iter().any(|e| e.starts_with("https://")) {
        return Err(EnrollError::NoHttps(bootstrap.join(",")));
    }
    let mut errors = Vec::new();
    for entry in bootstrap.iter().filter(|e| e.starts_with("https://")) {
        let (csr, key) =
            vstream_pki::request(name).map_err(|e| EnrollError::NoAnswer(e.to_string()))?;
        match agent.client(entry).and_then(|c| call(&c, csr)) {
            Ok(reply) => {
                tls.set_credential(&reply.chain_pem, &key)
                    .map_err(|why| EnrollError::Refused {
                        server: entry.clone(),
                        message: format!("an unusable certificate: {why}"),
                    })?;
                return Ok(reply);
            }
            Err(Error::Status { status, error, .. }) if status != 503 => {
                return Err(EnrollError::Refused {
                    server: entry.clone(),
                    message: error.unwrap_or_else(|| format!("HTTP {status}")),
                })
            }
            Err(e) => errors.push(format!("{entry}: {}", e.http_text())),
        }
    }
    Err(EnrollError::NoAnswer(errors.join("; ")))
}

/// Trades `token` for the device's certificate, trying again while no
/// server answers.
pub async fn enroll(
    bootstrap: &[String],
    mac: &str,
    token: &str,
    tls: &ClientTls,
    timeout: Duration,
) -> Result<CredentialReply, EnrollError> {
    let mut backoff = Backoff::new(Duration::from_secs(5));
    loop {
        let (bootstrap, mac, token, tls) = (
            bootstrap.to_vec(),
            mac.to_owned(),
            token.to_owned(),
            tls.clone(),
        );
        let asked = tokio::task::spawn_blocking(move || {
            ask(&bootstrap, &tls, timeout, &mac, |c, csr| {
                c.enroll(&EnrollRequest {
                    mac: mac.clone(),
                    token: token.clone(),
                    csr,
                })
            })
        })
        .await
        .map_err(|e| EnrollError::NoAnswer(e.to_string()))?;
        match asked {
            Err(EnrollError::NoAnswer(why)) => {
                if backoff.failed(&why) {
                    tracing::warn!(reason = %why, "enrollment: waiting for a server");
                }
            }
            done => return done,
        }
        backoff.wait().await;
    }
}

/// Renews the certificate at half its remaining life, until `shutdown`
/// or a refusal (the device was removed or revoked: its connections end
/// with its certificate).
pub async fn keep_renewed(
    bootstrap: Vec<String>,
    tls: ClientTls,
    timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut retry: Option<Duration> = None;
    loop {
        let left = tls
            .credential_not_after()
            .map_or(0, |t| t - now_unix())
            .max(0) as u64;
        let wait = retry.unwrap_or(Duration::from_secs(left / 2));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let (b, t) = (bootstrap.clone(), tls.clone());
        let asked = tokio::task::spawn_blocking(move || {
            ask(&b, &t, timeout, "renewal", |c, csr| {
                c.renew(&RenewRequest { csr })
            })
        })
        .await;
        match asked {
            Ok(Ok(reply)) => {
                tracing::info!(serial = %reply.serial, not_after = reply.not_after_unix, "device certificate renewed");
                retry = None;
            }
            Ok(Err(e @ (EnrollError::Refused { .. } | EnrollError::NoHttps(_)))) => {
                tracing::error!(error = %e, "device certificate not renewed; it ends as it was issued");
                return;
            }
            Ok(Err(e)) => {
                // A tenth of what is left, between 5 s and a minute.
                let again = Duration::from_secs((left / 10).clamp(5, 60));
                tracing::warn!(error = %e, retry_secs = again.as_secs(), "device certificate renewal failed");
                retry = Some(again);
            }
            Err(e) => {
                tracing::warn!(error = %e, "device certificate renewal task failed");
                retry = Some(Duration::from_secs(30));
            }
        }
    }
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_the_last_well_formed_word() {
        assert_eq!(
            token_from_cmdline("ro vstream.enroll=00aa quiet vstream.enroll=ff01\n"),
            Some("ff01")
        );
        assert_eq!(token_from_cmdline("vstream.enroll=0g"), None);
        assert_eq!(token_from_cmdline("vstream.enroll="), None);
        assert_eq!(token_from_cmdline("vstream.boot=00aa"), None);
    }
}
