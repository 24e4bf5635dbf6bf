//! Logging in through the bootstrap list: the first server that answers decides.

use std::time::Duration;

use vstream_api::{LoginReply, LoginRequest};
use vstream_client::{Agent, Error};

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
/// `tls`: the device's credentials, for `https://` entries.
pub fn login(
    bootstrap: &[String],
    req: &LoginRequest,
    timeout: Duration,
    tls: Option<&vstream_service::ClientTls>,
) -> Result<LoginReply, LoginFailure> {
    let mut builder = Agent::builder()
        .connect_timeout(timeout)
        .timeout(timeout * 2);
    if let Some(tls) = tls {
        builder = builder.tls_config(tls.config());
    }
    let agent = builder.build();
    let mut errors = Vec::new();
    for entry in bootstrap {
        let server = entry.clone();
        match agent.client(&url(entry)).and_then(|c| c.login(req)) {
            Ok(reply) => return Ok(reply),
            Err(Error::Status { status, error, .. }) => {
                let message = error.unwrap_or_else(|| format!("HTTP {status}"));
                return Err(if status == 410 {
                    LoginFailure::Gone { server, message }
                } else {
                    LoginFailure::Refused { server, message }
                });
            }
            Err(Error::Decode { source, .. }) => {
                return Err(LoginFailure::Refused {
                    server,
                    message: format!("unreadable login answer: Failed to read JSON: {source}"),
                })
            }
            Err(e @ (Error::ReadAnswer { .. } | Error::EmptyAnswer { .. })) => {
                return Err(LoginFailure::Refused {
                    server,
                    message: format!("unreadable login answer: {e}"),
                })
            }
            Err(e) => errors.push(format!("{entry}: {}", e.http_text())),
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

    /// Answers one request on 127.0.0.1 with `response`; returns the
    /// server's HOST:PORT.
    fn answer_once(response: String) -> (String, std::thread::JoinHandle<()>) {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let t = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut r = BufReader::new(stream);
            let mut len = 0;
            loop {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                if line == "\r\n" || line.is_empty() {
                    break;
                }
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            r.get_mut().write_all(response.as_bytes()).unwrap();
        });
        (addr, t)
    }

    fn request() -> LoginRequest {
        LoginRequest {
            mac: "52:54:00:12:34:56".into(),
            avoid: Vec::new(),
            pin: None,
            boot: None,
        }
    }

    fn refusal(status: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
    }

    #[test]
    fn the_first_server_that_answers_decides() {
        // Nobody listens on the first entry: it is skipped.
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let (live, t) = answer_once(refusal(
            "410 Gone",
            r#"{"error":"version 3 of vDisk w is gone"}"#,
        ));
        let got = login(
            &[dead, format!("http://{live}/")],
            &request(),
            Duration::from_secs(5),
            None,
        );
        t.join().unwrap();
        match got {
            Err(LoginFailure::Gone { server, message }) => {
                assert_eq!(server, format!("http://{live}/"));
                assert_eq!(message, "version 3 of vDisk w is gone");
            }
            other => panic!("{other:?}"),
        }

        // A refusal without the API's sentence names the status.
        let (live, t) = answer_once(refusal("503 Service Unavailable", "busy"));
        let got = login(
            std::slice::from_ref(&live),
            &request(),
            Duration::from_secs(5),
            None,
        );
        t.join().unwrap();
        assert_eq!(
            got.unwrap_err().to_string(),
            format!("{live} answered: HTTP 503")
        );
    }

    #[test]
    fn no_answer_lists_every_server() {
        let dead: Vec<String> = (0..2)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .to_string()
            })
            .collect();
        let msg = login(&dead, &request(), Duration::from_secs(5), None)
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with(&format!(
                "no bootstrap server answered: {}: http://{}/api/v1/login: Connection Failed",
                dead[0], dead[0]
            )),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("; {}: http://{}/api/v1/login: ", dead[1], dead[1])),
            "{msg}"
        );
    }

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
