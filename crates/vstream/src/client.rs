//! The HTTP client of the server's admin API, shared by every admin command.
//!
//! It knows the base URL and the bearer token, builds `/api/v1/...` URLs from
//! percent-encoded path segments, and maps every failure to one of three
//! messages:
//!
//! * the server answered 4xx/5xx with `{"error": "sentence"}`: an
//!   [`ApiError`] carrying the sentence, which `main` prints alone;
//! * the server could not be reached: "cannot reach the vstream API at URL";
//! * anything else (a bad answer, a broken connection): what went wrong, with
//!   the URL.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde::de::DeserializeOwned;
use serde::Serialize;
use vstream_api::ErrorBody;

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
}

/// The API refused a request and said why.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: u16,
    pub message: String,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

/// Longest error body kept when it is not the API's JSON.
const MAX_ERROR_BODY: u64 = 64 << 10;

/// A connection to one server's admin API.
pub struct Client {
    agent: ureq::Agent,
    /// Without a trailing slash.
    base: String,
    token: String,
}

impl Client {
    /// Reads the token (from the environment or the token file) and checks
    /// the URL; sends nothing yet.
    pub fn from_args(args: &ClientArgs) -> Result<Client> {
        let env_token = std::env::var(TOKEN_ENV).ok();
        let token = resolve_token(env_token.as_deref(), &args.token_file)?;
        Client::new(&args.api, token)
    }

    /// The same credentials at another server's API (`base`, a URL).
    pub fn at(&self, base: &str) -> Result<Client> {
        Client::new(base, self.token.clone())
    }

    fn new(base: &str, token: String) -> Result<Client> {
        let base = base.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("--api {base:?} is not an http:// or https:// URL");
        }
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .user_agent(concat!("vstream/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Client {
            agent,
            base: base.to_string(),
            token,
        })
    }

    /// GET `path` and decode the JSON answer.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let resp = self.check(self.request("GET", path).call())?;
        self.json(resp)
    }

    /// POST `body` as JSON; the answer's JSON, if it has a body.
    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<Option<T>> {
        let resp = self.check(self.request("POST", path).send_json(body))?;
        self.json_opt(resp)
    }

    /// POST `body` as JSON and decode the JSON answer, which must be there.
    pub fn post_for<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let resp = self.check(self.request("POST", path).send_json(body))?;
        self.json(resp)
    }

    /// POST without a body, for actions; the answer's body is ignored.
    pub fn post_empty(&self, path: &str) -> Result<()> {
        self.check(self.request("POST", path).call())?;
        Ok(())
    }

    /// POST without a body, for actions that answer with JSON.
    pub fn post_empty_for<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let resp = self.check(self.request("POST", path).call())?;
        self.json(resp)
    }

    /// PATCH `body` as JSON; the answer's JSON, if it has a body.
    pub fn patch<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<Option<T>> {
        let resp = self.check(self.request("PATCH", path).send_json(body))?;
        self.json_opt(resp)
    }

    /// PUT `body` as JSON and decode the JSON answer.
    pub fn put<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let resp = self.check(self.request("PUT", path).send_json(body))?;
        self.json(resp)
    }

    /// DELETE `path`; the answer's body is ignored.
    pub fn delete(&self, path: &str) -> Result<()> {
        self.check(self.request("DELETE", path).call())?;
        Ok(())
    }

    /// PUT a streamed body of `content_type` and decode the JSON answer. The
    /// body goes out with chunked transfer encoding as `body` produces it.
    pub fn put_stream<T: DeserializeOwned>(
        &self,
        path: &str,
        content_type: &str,
        body: impl Read,
    ) -> Result<T> {
        let req = self.request("PUT", path).set("Content-Type", content_type);
        let resp = self.check(req.send(body))?;
        self.json(resp)
    }

    /// GET a streamed answer of `content_type`, read as it arrives.
    pub fn get_stream(
        &self,
        path: &str,
        content_type: &str,
    ) -> Result<Box<dyn Read + Send + Sync>> {
        let req = self.request("GET", path).set("Accept", content_type);
        Ok(self.check(req.call())?.into_reader())
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        self.agent
            .request(method, &self.url(path))
            .set("Authorization", &format!("Bearer {}", self.token))
    }

    /// The response of a 2xx answer; every failure mapped as the module
    /// header says.
    fn check(&self, sent: Result<ureq::Response, ureq::Error>) -> Result<ureq::Response> {
        sent.map_err(|e| self.map_error(e))
    }

    fn json<T: DeserializeOwned>(&self, resp: ureq::Response) -> Result<T> {
        self.json_opt(resp)?.ok_or_else(|| {
            anyhow!(
                "the vstream API at {} answered with an empty body",
                self.base
            )
        })
    }

    fn json_opt<T: DeserializeOwned>(&self, resp: ureq::Response) -> Result<Option<T>> {
        let url = resp.get_url().to_string();
        let mut text = String::new();
        resp.into_reader()
            .read_to_string(&mut text)
            .with_context(|| format!("reading the answer from {url}"))?;
        if text.trim().is_empty() {
            return Ok(None);
        }
        serde_json::from_str(&text)
            .map(Some)
            .with_context(|| format!("{url} answered with JSON this vstream does not understand"))
    }

    fn map_error(&self, err: ureq::Error) -> anyhow::Error {
        match err {
            ureq::Error::Status(status, resp) => {
                let status_text = resp.status_text().to_string();
                let mut body = String::new();
                // A body that fails to read is no worse than an empty one here.
                let _ = resp
                    .into_reader()
                    .take(MAX_ERROR_BODY)
                    .read_to_string(&mut body);
                error_from_status(status, &status_text, &body).into()
            }
            ureq::Error::Transport(t) => {
                let detail = transport_detail(&t);
                match t.kind() {
                    ureq::ErrorKind::ConnectionFailed | ureq::ErrorKind::Dns => anyhow!(
                        "cannot reach the vstream API at {}: {detail} (is `vstream server` running?)",
                        self.base
                    ),
                    _ => anyhow!("talking to the vstream API at {}: {detail}", self.base),
                }
            }
        }
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

/// The error a 4xx/5xx answer stands for: the API's sentence when the body is
/// its `{"error": ...}`, otherwise the status and the start of the body.
fn error_from_status(status: u16, status_text: &str, body: &str) -> ApiError {
    let message = match serde_json::from_str::<ErrorBody>(body) {
        Ok(b) => b.error,
        Err(_) => {
            let body = body.trim();
            let mut m = format!("the vstream API answered {status} {status_text}");
            if !body.is_empty() {
                let snippet: String = body.chars().take(200).collect();
                m.push_str(": ");
                m.push_str(&snippet);
            }
            m
        }
    };
    ApiError { status, message }
}

/// The most telling part of a transport error: its cause if it has one.
fn transport_detail(t: &ureq::Transport) -> String {
    use std::error::Error as _;
    match (t.source(), t.message()) {
        (Some(src), _) => src.to_string(),
        (None, Some(m)) => m.to_string(),
        (None, None) => t.kind().to_string(),
    }
}

/// `/api/v1/` followed by `segments`, each percent-encoded so that any name
/// (`win10@3`, `a/b`, `ä`) stays one path segment.
pub fn api_path(segments: &[&str]) -> String {
    let mut p = String::from("/api/v1");
    for s in segments {
        p.push('/');
        p.push_str(&encode_segment(s));
    }
    p
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn paths_are_encoded_per_segment() {
        assert_eq!(api_path(&["vdisks"]), "/api/v1/vdisks");
        assert_eq!(
            api_path(&["vdisks", "win10", "content"]),
            "/api/v1/vdisks/win10/content"
        );
        assert_eq!(api_path(&["vdisks", "win10@3"]), "/api/v1/vdisks/win10%403");
        assert_eq!(api_path(&["vdisks", "a/b c"]), "/api/v1/vdisks/a%2Fb%20c");
        assert_eq!(api_path(&["vdisks", "ä"]), "/api/v1/vdisks/%C3%A4");
        assert_eq!(api_path(&["vdisks", "x-y.z_~"]), "/api/v1/vdisks/x-y.z_~");
    }

    #[test]
    fn api_errors_keep_the_sentence() {
        let e = error_from_status(
            404,
            "Not Found",
            r#"{"error": "vDisk win10 does not exist"}"#,
        );
        assert_eq!(e.to_string(), "vDisk win10 does not exist");
        let e = error_from_status(502, "Bad Gateway", "<html>proxy down</html>\n");
        assert_eq!(
            e.to_string(),
            "the vstream API answered 502 Bad Gateway: <html>proxy down</html>"
        );
        let e = error_from_status(500, "Internal Server Error", "");
        assert_eq!(
            e.to_string(),
            "the vstream API answered 500 Internal Server Error"
        );
    }

    #[test]
    fn api_error_wins_over_context_in_main() {
        let e: anyhow::Error =
            error_from_status(409, "Conflict", r#"{"error":"it exists"}"#).into();
        let e = e.context("creating vDisk x");
        assert_eq!(
            e.downcast_ref::<ApiError>().map(|a| a.to_string()),
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
        let c = Client::new(&base, "t".into()).unwrap();
        let msg = format!(
            "{:#}",
            c.get::<serde_json::Value>("/api/v1/vdisks").unwrap_err()
        );
        assert!(
            msg.starts_with(&format!("cannot reach the vstream API at {base}: ")),
            "{msg}"
        );
        assert!(msg.ends_with("(is `vstream server` running?)"), "{msg}");
    }

    /// Answers one HTTP request on 127.0.0.1 with `response`; the thread
    /// returns the request head it saw.
    fn serve_once(response: &'static str) -> (String, std::thread::JoinHandle<String>) {
        use std::io::{BufRead, BufReader};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream);
            let mut head = String::new();
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                head.push_str(&line);
            }
            // Read the body too: closing with unread bytes would reset the
            // connection under the client.
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            reader.get_mut().write_all(response.as_bytes()).unwrap();
            head
        });
        (base, handle)
    }

    #[test]
    fn sends_the_token_and_reads_json() {
        let (base, server) = serve_once(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\
             Connection: close\r\n\r\n[]",
        );
        let c = Client::new(&base, "s3cret".into()).unwrap();
        let got: Vec<serde_json::Value> = c.get("/api/v1/vdisks").unwrap();
        assert!(got.is_empty());
        let head = server.join().unwrap();
        assert!(
            head.starts_with("GET /api/v1/vdisks HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("authorization: bearer s3cret\r\n"),
            "{head}"
        );
    }

    #[test]
    fn error_answers_become_api_errors() {
        let body = r#"{"error":"vDisk win10 does not exist"}"#;
        let response: &'static str = Box::leak(
            format!(
                "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        );
        let (base, server) = serve_once(response);
        let c = Client::new(&base, "t".into()).unwrap();
        let err = c.delete("/api/v1/vdisks/win10").unwrap_err();
        let api = err.downcast_ref::<ApiError>().expect("an ApiError");
        assert_eq!(api.status, 404);
        assert_eq!(api.message, "vDisk win10 does not exist");
        assert!(server
            .join()
            .unwrap()
            .starts_with("DELETE /api/v1/vdisks/win10 "));
    }

    #[test]
    fn empty_answers_are_none() {
        let (base, server) = serve_once("HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
        let c = Client::new(&base, "t".into()).unwrap();
        let got: Option<serde_json::Value> = c
            .patch("/api/v1/vdisks/a", &serde_json::json!({"mode": "standard"}))
            .unwrap();
        assert!(got.is_none());
        assert!(server
            .join()
            .unwrap()
            .starts_with("PATCH /api/v1/vdisks/a "));
    }

    #[test]
    fn actions_that_answer_need_an_answer() {
        let (base, server) = serve_once(
            "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\
             Connection: close\r\n\r\n{\"number\":2}",
        );
        let c = Client::new(&base, "t".into()).unwrap();
        let got: serde_json::Value = c.post_empty_for("/api/v1/vdisks/a/versions").unwrap();
        assert_eq!(got["number"], 2);
        assert!(server
            .join()
            .unwrap()
            .starts_with("POST /api/v1/vdisks/a/versions "));

        let (base, server) = serve_once("HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
        let c = Client::new(&base, "t".into()).unwrap();
        let err = c
            .post_for::<_, serde_json::Value>("/api/v1/vdisks/a/merge", &serde_json::json!({}))
            .unwrap_err();
        assert!(
            err.to_string().ends_with("answered with an empty body"),
            "{err}"
        );
        server.join().unwrap();
    }

    #[test]
    fn only_http_urls() {
        assert!(Client::new("127.0.0.1:7080", "t".into()).is_err());
        assert_eq!(
            Client::new("http://h:1/", "t".into()).unwrap().base,
            "http://h:1"
        );
    }
}
