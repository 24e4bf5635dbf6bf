//! Logging in through the bootstrap list: the first server that answers decides.

use std::time::Duration;

use vstream_api::{LoginReply, LoginRequest};

/// Why a login gave no server.
#[derive(Debug, thiserror::Error)]
pub enum LoginFailure {
    /// A server answered, and said no (unknown device, nothing to serve now).
    #[error("{server} answered: {message}")]
    Refused { server: String, message: String },
    /// A server answered that the pinned version is gone from the farm.
    #[error("{server} answered: {message}")]
    Gone { server: String, message: String },
    /// No bootstrap server answered.
    #[error("no bootstrap server answered: {0}")]
    NoAnswer(String),
}

/// The API URL of a bootstrap entry (HOST:PORT, or a URL).
fn url(entry: &str) -> String {
    if entry.starts_with("http://") || entry.starts_with("https://") {
        entry.trim_end_matches('/').to_string()
    } else {
        format!("http://{entry}")
    }
}

/// Asks each bootstrap server in turn; the first that answers decides.
pub fn login(
    bootstrap: &[String],
    req: &LoginRequest,
    timeout: Duration,
) -> Result<LoginReply, LoginFailure> {
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(timeout)
        .timeout(timeout * 2)
        .build();
    let mut errors = Vec::new();
    for entry in bootstrap {
        let answer = agent
            .post(&format!("{}/api/v1/login", url(entry)))
            .send_json(req);
        match answer {
            Ok(resp) => {
                return resp
                    .into_json::<LoginReply>()
                    .map_err(|e| LoginFailure::Refused {
                        server: entry.clone(),
                        message: format!("unreadable login answer: {e}"),
                    })
            }
            Err(ureq::Error::Status(code, resp)) => {
                let body: serde_json::Value = resp.into_json().unwrap_or_default();
                let message = body["error"]
                    .as_str()
                    .map_or_else(|| format!("HTTP {code}"), str::to_string);
                let (server, message) = (entry.clone(), message);
                return Err(if code == 410 {
                    LoginFailure::Gone { server, message }
                } else {
                    LoginFailure::Refused { server, message }
                });
            }
            Err(e) => errors.push(format!("{entry}: {e}")),
        }
    }
    Err(LoginFailure::NoAnswer(errors.join("; ")))
}

/// The bootstrap list with the entries for API `failed` moved to the end.
pub fn failed_last(bootstrap: &[String], failed: &str) -> Vec<String> {
    let failed = url(failed);
    let (bad, good): (Vec<String>, Vec<String>) =
        bootstrap.iter().cloned().partition(|e| url(e) == failed);
    good.into_iter().chain(bad).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_failed_server_goes_last() {
        let list: Vec<String> = ["10.0.0.1:7080", "http://10.0.0.2:7080/", "10.0.0.3:7080"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            failed_last(&list, "http://10.0.0.1:7080"),
            ["http://10.0.0.2:7080/", "10.0.0.3:7080", "10.0.0.1:7080"]
        );
        assert_eq!(
            failed_last(&list, "http://10.0.0.2:7080"),
            ["10.0.0.1:7080", "10.0.0.3:7080", "http://10.0.0.2:7080/"]
        );
        assert_eq!(failed_last(&list, "http://elsewhere:1"), list);
    }
}
