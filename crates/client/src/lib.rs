//! The one HTTP client of a vstream server: its admin and device API
//! (`/api/v1`) and the peer protocol between the servers of a farm
//! (`/peer/v1`).
//!
//! ```text
//!   Agent (timeouts, connection pool)
//!     └─ Client (base URL, bearer token, X-Vstream-Server)
//!          ├─ typed calls:   login, cache_report, vdisks, versions, devices,
//!          │                 servers, stores, replication, import, export, ...
//!          ├─ peer calls:    layer_meta, layer_data, boot_file, boot_set, poke
//!          └─ JSON by path:  get, post, patch, put, delete (api_path builds paths)
//! ```
//!
//! Blocking, on `ureq`: the CLI, the device agent and the server's
//! replication threads all call it from plain threads. It knows the types
//! the API speaks (`vstream-api`) and nothing of the server.
//!
//! Every failure is an [`Error`] that keeps what the server said: a 4xx/5xx
//! answer is [`Error::Status`] with the status, the API's sentence (from
//! `{"error": "..."}`) and the raw body, so each caller can word it as it
//! always has.

use std::io::Read;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use vstream_api::{
    Adopt, BootFileKind, CacheReport, CreateDevice, CreateVDisk, Device, DeviceInfo, ErrorBody,
    LoginReply, LoginRequest, Merge, Promote, Quarantined, Rebalance, RebalancePlan, ReplicaRow,
    ReplicationOverride, ReplicationStart, ServerInfo, SetBootCmdline, SetDevice, SetVDisk,
    StoreDef, StoreInfo, VDisk, VDiskInfo, VersionInfo,
};

/// The header naming the server that sends a peer request.
pub const SERVER_HEADER: &str = "x-vstream-server";

/// Longest error body kept from an answer.
const MAX_ERROR_BODY: u64 = 64 << 10;

/// A streamed answer's body, read as it arrives.
pub type Body = Box<dyn Read + Send + Sync>;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a request gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The base URL is not an `http://` or `https://` URL.
    #[error("{base:?} is not an http:// or https:// URL")]
    BadUrl { base: String },
    /// The server answered 4xx/5xx. Shown as the API's own sentence when
    /// the body was its `{"error": ...}`, else as the status and the start
    /// of the body.
    #[error("{}", status_message(*.status, .status_text, .error.as_deref(), .body))]
    Status {
        /// The URL asked.
        url: String,
        status: u16,
        status_text: String,
        /// The API's sentence, when the body was `{"error": "..."}`.
        error: Option<String>,
        /// The body as it came (at most 64 KiB).
        body: String,
    },
    /// No connection: refused, unresolvable, or timed out connecting.
    #[error("cannot reach the vstream API at {base}: {detail} (is `vstream server` running?)")]
    Unreachable {
        base: String,
        /// The most telling part of the failure: its cause.
        detail: String,
        /// The whole failure as the HTTP layer words it (with the URL).
        transport: String,
    },
    /// The TLS handshake failed on the server's certificate: signed by a CA
    /// this client does not trust, or for another name, or expired.
    #[error("the vstream API at {base} showed a certificate this client does not trust: {detail}")]
    Untrusted {
        base: String,
        detail: String,
        transport: String,
    },
    /// The connection broke, timed out or carried something not HTTP.
    #[error("talking to the vstream API at {base}: {detail}")]
    Transport {
        base: String,
        detail: String,
        transport: String,
    },
    /// A 2xx answer whose body could not be read.
    #[error("reading the answer from {url}")]
    ReadAnswer {
        url: String,
        #[source]
        source: std::io::Error,
    },
    /// A 2xx answer whose JSON is not what the call expects.
    #[error("{url} answered with JSON this vstream does not understand")]
    Decode {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    /// A 2xx answer without the body the call expects.
    #[error("the vstream API at {base} answered with an empty body")]
    EmptyAnswer { base: String },
}

impl Error {
    /// The HTTP status, when the server answered 4xx/5xx.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The API's own sentence, when the server answered with one.
    pub fn server_message(&self) -> Option<&str> {
        match self {
            Error::Status { error, .. } => error.as_deref(),
            _ => None,
        }
    }

    /// True when the server answered (4xx/5xx) rather than the exchange
    /// failing.
    pub fn is_status(&self) -> bool {
        matches!(self, Error::Status { .. })
    }

    /// The failure as the HTTP layer words it, with the URL:
    /// `URL: status code 404` for an answer, the transport failure
    /// otherwise. For logs that have always shown it that way.
    pub fn http_text(&self) -> String {
        match self {
            Error::Status { url, status, .. } => format!("{url}: status code {status}"),
            Error::Unreachable { transport, .. }
            | Error::Untrusted { transport, .. }
            | Error::Transport { transport, .. } => transport.clone(),
            other => other.to_string(),
        }
    }
}

fn status_message(status: u16, status_text: &str, error: Option<&str>, body: &str) -> String {
    if let Some(e) = error {
        return e.to_string();
    }
    let body = body.trim();
    let mut m = format!("the vstream API answered {status} {status_text}");
    if !body.is_empty() {
        let snippet: String = body.chars().take(200).collect();
        m.push_str(": ");
        m.push_str(&snippet);
    }
    m
}

/// Timeouts and a connection pool, shared by the [`Client`]s made from it.
#[derive(Clone)]
pub struct Agent {
    inner: ureq::Agent,
}

/// Builds an [`Agent`]. A timeout not set keeps ureq's default (connect:
/// 30 s; the whole request: none).
#[derive(Debug, Clone)]
pub struct AgentBuilder {
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    connect_timeout: Option<Duration>,
    timeout: Option<Duration>,
    max_idle_per_host: Option<usize>,
    user_agent: String,
}

impl AgentBuilder {
    /// HTTPS with this configuration: its trusted CA, and its client
    /// certificate if it has one.
    pub fn tls_config(mut self, config: std::sync::Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// How long connecting may take.
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = Some(t);
        self
    }

    /// How long a whole request may take, its answer's body included.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }

    /// Idle connections kept per host for the next request.
    pub fn max_idle_per_host(mut self, n: usize) -> Self {
        self.max_idle_per_host = Some(n);
        self
    }

    pub fn build(self) -> Agent {
        let mut b = ureq::AgentBuilder::new().user_agent(&self.user_agent);
        if let Some(t) = self.connect_timeout {
            b = b.timeout_connect(t);
        }
        if let Some(t) = self.timeout {
            b = b.timeout(t);
        }
        if let Some(n) = self.max_idle_per_host {
            b = b.max_idle_connections_per_host(n);
        }
        if let Some(tls) = self.tls {
            b = b.tls_config(tls);
        }
        Agent { inner: b.build() }
    }
}

impl Agent {
    pub fn builder() -> AgentBuilder {
        AgentBuilder {
            tls: None,
            connect_timeout: None,
            timeout: None,
            max_idle_per_host: None,
            user_agent: concat!("vstream/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }

    /// A client of the server at `base` (`http://HOST:PORT`), without
    /// credentials yet.
    pub fn client(&self, base: &str) -> Result<Client> {
        let base = base.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::BadUrl {
                base: base.to_string(),
            });
        }
        Ok(Client {
            agent: self.inner.clone(),
            base: base.to_string(),
            token: None,
            server: None,
        })
    }
}

/// A connection to one server: its base URL and the credentials to send.
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    /// Without a trailing slash.
    base: String,
    token: Option<String>,
    /// Sent as [`SERVER_HEADER`] on peer requests.
    server: Option<String>,
}

impl Client {
    /// Sends `token` as `Authorization: Bearer` (the admin token, or the
    /// farm's peer secret).
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Names the asking server in [`SERVER_HEADER`], as peers expect.
    pub fn as_server(mut self, name: impl Into<String>) -> Self {
        self.server = Some(name.into());
        self
    }

    /// The base URL, without a trailing slash.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The same agent and credentials at another server (`base`, a URL).
    pub fn at(&self, base: &str) -> Result<Client> {
        let c = Agent {
            inner: self.agent.clone(),
        }
        .client(base)?;
        Ok(Client {
            token: self.token.clone(),
            server: self.server.clone(),
            ..c
        })
    }

    // ---- /api/v1: typed calls ----

    /// `POST /api/v1/login`: a device asks which server serves it.
    pub fn login(&self, req: &LoginRequest) -> Result<LoginReply> {
        self.post_for("/api/v1/login", req)
    }

    /// `POST /api/v1/enroll` (HTTPS): a device trades its one-time token
    /// for a certificate.
    pub fn enroll(&self, req: &vstream_api::EnrollRequest) -> Result<vstream_api::CredentialReply> {
        self.post_for("/api/v1/enroll", req)
    }

    /// `POST /api/v1/renew` (HTTPS, with the device's certificate): a new
    /// certificate before the one it holds ends.
    pub fn renew(&self, req: &vstream_api::RenewRequest) -> Result<vstream_api::CredentialReply> {
        self.post_for("/api/v1/renew", req)
    }

    /// `POST /api/v1/cache-report`: a device reports its cache use.
    pub fn cache_report(&self, report: &CacheReport) -> Result<()> {
        self.check(
            self.request("POST", "/api/v1/cache-report")
                .send_json(report),
        )?;
        Ok(())
    }

    /// `GET /api/v1/stores`.
    pub fn stores(&self) -> Result<Vec<StoreInfo>> {
        self.get(&api_path(&["stores"]))
    }

    /// `GET /api/v1/servers`.
    pub fn servers(&self) -> Result<Vec<ServerInfo>> {
        self.get(&api_path(&["servers"]))
    }

    /// `GET /api/v1/replication`: every replica of every version.
    pub fn replication(&self) -> Result<Vec<ReplicaRow>> {
        self.get(&api_path(&["replication"]))
    }

    /// `POST /api/v1/stores`: the store as the farm now records it.
    pub fn add_store(&self, def: &StoreDef) -> Result<StoreDef> {
        self.post_for(&api_path(&["stores"]), def)
    }

    /// `DELETE /api/v1/stores/NAME`.
    pub fn delete_store(&self, name: &str) -> Result<()> {
        self.delete(&api_path(&["stores", name]))
    }

    /// `GET /api/v1/vdisks`.
    pub fn vdisks(&self) -> Result<Vec<VDiskInfo>> {
        self.get(&api_path(&["vdisks"]))
    }

    /// `GET /api/v1/vdisks/NAME`.
    pub fn vdisk(&self, name: &str) -> Result<VDiskInfo> {
        self.get(&api_path(&["vdisks", name]))
    }

    /// `POST /api/v1/vdisks`: the new vDisk, if the server says.
    pub fn create_vdisk(&self, body: &CreateVDisk) -> Result<Option<VDisk>> {
        self.post(&api_path(&["vdisks"]), body)
    }

    /// `PATCH /api/v1/vdisks/NAME`: the vDisk as changed, if the server says.
    pub fn set_vdisk(&self, name: &str, body: &SetVDisk) -> Result<Option<VDisk>> {
        self.patch(&api_path(&["vdisks", name]), body)
    }

    /// `DELETE /api/v1/vdisks/NAME`.
    pub fn delete_vdisk(&self, name: &str) -> Result<()> {
        self.delete(&api_path(&["vdisks", name]))
    }

    /// `PUT /api/v1/vdisks/NAME/boot/KERNEL|INITRD?name=FILE`: uploads a
    /// boot file, streamed.
    pub fn upload_boot_file(
        &self,
        vdisk: &str,
        which: BootFileKind,
        file_name: &str,
        body: impl Read,
    ) -> Result<VDiskInfo> {
        let path = format!(
            "{}?name={}",
            api_path(&["vdisks", vdisk, "boot", &which.to_string()]),
            encode_segment(file_name)
        );
        self.put_stream(&path, "application/octet-stream", body)
    }

    /// `PUT /api/v1/vdisks/NAME/boot/cmdline`.
    pub fn set_boot_cmdline(&self, vdisk: &str, body: &SetBootCmdline) -> Result<VDiskInfo> {
        self.put(&api_path(&["vdisks", vdisk, "boot", "cmdline"]), body)
    }

    /// `POST /api/v1/farm/rebalance`: the moves made (or planned).
    pub fn rebalance(&self, body: &Rebalance) -> Result<RebalancePlan> {
        self.post_for(&api_path(&["farm", "rebalance"]), body)
    }

    /// `POST /api/v1/replication/start`: replicate now, outside the window.
    pub fn start_replication(&self, body: &ReplicationStart) -> Result<ReplicationOverride> {
        self.post_for(&api_path(&["replication", "start"]), body)
    }

    /// `POST /api/v1/quarantine/NAME/adopt`, on the server holding it.
    pub fn adopt_quarantined(&self, name: &str, body: &Adopt) -> Result<Quarantined> {
        self.post_for(&api_path(&["quarantine", name, "adopt"]), body)
    }

    /// `DELETE /api/v1/quarantine/NAME`, on the server holding it.
    pub fn delete_quarantined(&self, name: &str) -> Result<()> {
        self.delete(&api_path(&["quarantine", name]))
    }

    /// `GET /api/v1/vdisks/NAME/versions`.
    pub fn versions(&self, vdisk: &str) -> Result<Vec<VersionInfo>> {
        self.get(&api_path(&["vdisks", vdisk, "versions"]))
    }

    /// `POST /api/v1/vdisks/NAME/versions`: a new maintenance version.
    pub fn create_version(&self, vdisk: &str) -> Result<VersionInfo> {
        self.post_empty_for(&api_path(&["vdisks", vdisk, "versions"]))
    }

    /// `POST /api/v1/vdisks/NAME/versions/N/promote`.
    pub fn promote(&self, vdisk: &str, number: u32, body: &Promote) -> Result<VersionInfo> {
        self.post_for(&version_path(vdisk, number, &["promote"]), body)
    }

    /// `POST /api/v1/vdisks/NAME/rollback`.
    pub fn rollback(&self, vdisk: &str) -> Result<VersionInfo> {
        self.post_empty_for(&api_path(&["vdisks", vdisk, "rollback"]))
    }

    /// `POST /api/v1/vdisks/NAME/merge`.
    pub fn merge(&self, vdisk: &str, body: &Merge) -> Result<VersionInfo> {
        self.post_for(&api_path(&["vdisks", vdisk, "merge"]), body)
    }

    /// `DELETE /api/v1/vdisks/NAME/versions/N`.
    pub fn delete_version(&self, vdisk: &str, number: u32) -> Result<()> {
        self.delete(&version_path(vdisk, number, &[]))
    }

    /// `DELETE /api/v1/vdisks/NAME/versions/N/boot-set`: cleared across
    /// the farm; the version as it is now.
    pub fn clear_boot_set(&self, vdisk: &str, number: u32) -> Result<VersionInfo> {
        let path = version_path(vdisk, number, &["boot-set"]);
        let resp = self.check(self.request("DELETE", &path).call())?;
        self.json(resp)
    }

    /// `GET /api/v1/devices`.
    pub fn devices(&self) -> Result<Vec<DeviceInfo>> {
        self.get(&api_path(&["devices"]))
    }

    /// `GET /api/v1/devices/NAME`.
    pub fn device(&self, name: &str) -> Result<DeviceInfo> {
        self.get(&api_path(&["devices", name]))
    }

    /// `POST /api/v1/devices`: the new device, if the server says.
    pub fn add_device(&self, body: &CreateDevice) -> Result<Option<Device>> {
        self.post(&api_path(&["devices"]), body)
    }

    /// `PATCH /api/v1/devices/NAME`: the device as changed, if the server says.
    pub fn set_device(&self, name: &str, body: &SetDevice) -> Result<Option<Device>> {
        self.patch(&api_path(&["devices", name]), body)
    }

    /// `DELETE /api/v1/devices/NAME`.
    pub fn delete_device(&self, name: &str) -> Result<()> {
        self.delete(&api_path(&["devices", name]))
    }

    /// `POST /api/v1/devices/NAME/reset[?force=true]`.
    pub fn reset_device(&self, name: &str, force: bool) -> Result<()> {
        let mut path = api_path(&["devices", name, "reset"]);
        if force {
            path.push_str("?force=true");
        }
        self.post_empty(&path)
    }

    /// `POST /api/v1/devices/NAME/move`: the device as the move left it
    /// (its `moved` names where to, and from where); it is there once its
    /// agent has logged in again.
    pub fn move_device(&self, name: &str, body: &vstream_api::MoveDevice) -> Result<DeviceInfo> {
        self.post_for(&api_path(&["devices", name, "move"]), body)
    }

    /// `POST /api/v1/devices/NAME/revoke`: the device's certificates so far
    /// open nothing any more.
    pub fn revoke_device(&self, name: &str) -> Result<Device> {
        self.post_empty_for(&api_path(&["devices", name, "revoke"]))
    }

    /// `GET /api/v1/devices/NAME/iscsi`: the device's iSCSI names and CHAP
    /// secrets.
    pub fn iscsi_access(&self, name: &str) -> Result<vstream_api::IscsiAccess> {
        self.get(&api_path(&["devices", name, "iscsi"]))
    }

    /// `POST /api/v1/devices/NAME/iscsi/rotate`: new CHAP secrets for the
    /// device.
    pub fn rotate_iscsi(&self, name: &str) -> Result<vstream_api::IscsiAccess> {
        self.post_empty_for(&api_path(&["devices", name, "iscsi", "rotate"]))
    }

    /// `POST /api/v1/devices/NAME/credential`: a certificate for the key
    /// of `req`'s signing request, naming the device.
    pub fn issue_credential(
        &self,
        name: &str,
        req: &vstream_api::CredentialRequest,
    ) -> Result<vstream_api::CredentialReply> {
        self.post_for(&api_path(&["devices", name, "credential"]), req)
    }

    /// `PUT /api/v1/vdisks/NAME/content[?store=STORE]`: uploads `body`, an
    /// extent stream (`vstream_api::extents`), as the new vDisk `name`. The
    /// body goes out with chunked transfer encoding as it is produced.
    pub fn import(&self, name: &str, store: Option<&str>, body: impl Read) -> Result<VDiskInfo> {
        let mut path = api_path(&["vdisks", name, "content"]);
        if let Some(store) = store {
            path += &format!("?store={}", encode_segment(store));
        }
        self.put_stream(&path, vstream_api::extents::CONTENT_TYPE, body)
    }

    /// `GET /api/v1/vdisks/NAME[@VERSION]/content`: the vDisk's extent
    /// stream, read as it arrives.
    pub fn export(&self, name: &str) -> Result<Body> {
        self.get_stream(
            &api_path(&["vdisks", name, "content"]),
            vstream_api::extents::CONTENT_TYPE,
        )
    }

    // ---- /peer/v1 ----

    /// `GET /peer/v1/vdisks/NAME/layers/FILE/meta`: a layer's metadata,
    /// read into memory up to `limit` bytes.
    pub fn layer_meta(&self, vdisk: &str, file: &str, limit: u64) -> Result<Vec<u8>> {
        let path = peer_path(&["vdisks", vdisk, "layers", file, "meta"]);
        let resp = self.check(self.request("GET", &path).call())?;
        read_limited(resp, limit)
    }

    /// `GET /peer/v1/vdisks/NAME/layers/FILE/data?from=C&to=C`: the layer's
    /// allocated chunks in `[from, to)`, streamed.
    pub fn layer_data(&self, vdisk: &str, file: &str, from: u64, to: u64) -> Result<Body> {
        let path = format!(
            "{}?from={from}&to={to}",
            peer_path(&["vdisks", vdisk, "layers", file, "data"])
        );
        Ok(self.check(self.request("GET", &path).call())?.into_reader())
    }

    /// [`layer_data`](Client::layer_data) read into memory, up to `limit`
    /// bytes.
    pub fn layer_data_vec(
        &self,
        vdisk: &str,
        file: &str,
        (from, to): (u64, u64),
        limit: u64,
    ) -> Result<Vec<u8>> {
        let path = format!(
            "{}?from={from}&to={to}",
            peer_path(&["vdisks", vdisk, "layers", file, "data"])
        );
        let resp = self.check(self.request("GET", &path).call())?;
        read_limited(resp, limit)
    }

    /// `GET /peer/v1/vdisks/NAME/boot/HASH`: a boot file, streamed.
    pub fn boot_file(&self, vdisk: &str, hash: &str) -> Result<Body> {
        let path = peer_path(&["vdisks", vdisk, "boot", hash]);
        Ok(self.check(self.request("GET", &path).call())?.into_reader())
    }

    /// `GET /peer/v1/vdisks/NAME/boot-sets/VERSION`: the peer's boot set of
    /// a version, in its file's form, read up to `limit` bytes.
    pub fn boot_set(&self, vdisk: &str, version: u32, limit: u64) -> Result<Vec<u8>> {
        let path = peer_path(&["vdisks", vdisk, "boot-sets", &version.to_string()]);
        read_limited(self.check(self.request("GET", &path).call())?, limit)
    }

    /// `POST /peer/v1/poke`: "the catalog changed", reconcile now.
    pub fn poke(&self) -> Result<()> {
        self.check(self.request("POST", "/peer/v1/poke").call())?;
        Ok(())
    }

    // ---- JSON by path (paths from `api_path`) ----

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
        json_opt(resp)
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
        json_opt(resp)
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
    pub fn get_stream(&self, path: &str, content_type: &str) -> Result<Body> {
        let req = self.request("GET", path).set("Accept", content_type);
        Ok(self.check(req.call())?.into_reader())
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let mut req = self.agent.request(method, &format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        if let Some(s) = &self.server {
            req = req.set(SERVER_HEADER, s);
        }
        req
    }

    /// The response of a 2xx answer, every failure an [`Error`].
    fn check(&self, sent: Result<ureq::Response, ureq::Error>) -> Result<ureq::Response> {
        sent.map_err(|e| self.map_error(e))
    }

    fn json<T: DeserializeOwned>(&self, resp: ureq::Response) -> Result<T> {
        json_opt(resp)?.ok_or_else(|| Error::EmptyAnswer {
            base: self.base.clone(),
        })
    }

    fn map_error(&self, err: ureq::Error) -> Error {
        match err {
            ureq::Error::Status(status, resp) => {
                let url = resp.get_url().to_string();
                let status_text = resp.status_text().to_string();
                let mut body = String::new();
                // A body that fails to read is no worse than an empty one here.
                let _ = resp
                    .into_reader()
                    .take(MAX_ERROR_BODY)
                    .read_to_string(&mut body);
                let error = serde_json::from_str::<ErrorBody>(&body)
                    .ok()
                    .map(|b| b.error);
                Error::Status {
                    url,
                    status,
                    status_text,
                    error,
                    body,
                }
            }
            ureq::Error::Transport(t) => {
                let detail = transport_detail(&t);
                let transport = t.to_string();
                let base = self.base.clone();
                match t.kind() {
                    _ if detail.contains("invalid peer certificate") => Error::Untrusted {
                        base,
                        detail,
                        transport,
                    },
                    ureq::ErrorKind::ConnectionFailed | ureq::ErrorKind::Dns => {
                        Error::Unreachable {
                            base,
                            detail,
                            transport,
                        }
                    }
                    _ => Error::Transport {
                        base,
                        detail,
                        transport,
                    },
                }
            }
        }
    }
}

fn json_opt<T: DeserializeOwned>(resp: ureq::Response) -> Result<Option<T>> {
    let url = resp.get_url().to_string();
    let mut text = String::new();
    if let Err(source) = resp.into_reader().read_to_string(&mut text) {
        return Err(Error::ReadAnswer { url, source });
    }
    if text.trim().is_empty() {
        return Ok(None);
    }
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| Error::Decode { url, source })
}

fn read_limited(resp: ureq::Response, limit: u64) -> Result<Vec<u8>> {
    let url = resp.get_url().to_string();
    let mut out = Vec::new();
    resp.into_reader()
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|source| Error::ReadAnswer { url, source })?;
    Ok(out)
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
    path_under("/api/v1", segments)
}

/// `/api/v1/vdisks/VDISK/versions/VERSION` followed by `rest`.
pub fn version_path(vdisk: &str, version: u32, rest: &[&str]) -> String {
    let number = version.to_string();
    let mut segments = vec!["vdisks", vdisk, "versions", &number];
    segments.extend_from_slice(rest);
    api_path(&segments)
}

/// `/peer/v1/` followed by `segments`, each percent-encoded.
pub fn peer_path(segments: &[&str]) -> String {
    path_under("/peer/v1", segments)
}

fn path_under(prefix: &str, segments: &[&str]) -> String {
    let mut p = String::from(prefix);
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
mod tests;
