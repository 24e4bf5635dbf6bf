//! Who may call which admin route, and the audit trail of what they did.
//!
//! A request shows a token: one of the server's own admin tokens
//! (`DATA/admin-tokens`, role admin, for the local CLI), or one of the
//! farm's (`tokens/NAME` in the farm state, any role, known to every
//! server). Each route needs a role ([`needed`]); a token below it gets 403
//! with the reason, no token or a bad one 401.
//!
//! Every change (any method but GET and HEAD) and every refusal is
//! appended to the farm's audit trail before it is answered: who (the
//! token's name), from where, the route and its object, a summary of the
//! request's fields (never a secret), the status and the error sentence.
//! The trail is kept for `--audit-retention-days` (90 by default).
//!
//! A change's entry rides on the change's own first commit of the farm
//! state ([`vstream_farm::rider`]), drafted as the route's success; it is
//! rewritten only if the request ends otherwise. Refusals, and changes that
//! commit nothing to the farm state, are written after, by group commit
//! ([`Access::record`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use parking_lot::RwLock;
use vstream_api::{ApiToken, AuditEntry, Role};
use vstream_farm::rider::{AuditRider, Ridden};
use vstream_farm::FarmStore;

use crate::admin_tokens::AdminTokens;
use crate::error::ApiError;

/// How long the farm's tokens are trusted as read: a revoked token opens
/// nothing a second after.
const TOKEN_TTL: Duration = Duration::from_secs(1);
/// The largest request body summarized (a JSON request; imports and boot
/// files stream past unread).
const MAX_SUMMARIZED: usize = 64 * 1024;
/// The largest error body read for its sentence.
const MAX_ERROR_BODY: usize = 16 * 1024;

/// The tokens a server accepts, and its side of the audit trail.
pub struct Access {
    local: Arc<AdminTokens>,
    farm: FarmStore,
    server: String,
    tokens: RwLock<Option<(Instant, Vec<ApiToken>)>>,
    /// Tells apart this server's entries of one millisecond.
    seq: AtomicU64,
    /// Requests without a valid token recorded per address this minute: a
    /// scan fills the trail with [`MAX_ANONYMOUS_PER_MINUTE`] entries a
    /// minute at most, and the rest are only logged.
    anonymous: parking_lot::Mutex<(Instant, std::collections::HashMap<String, u32>)>,
    /// False under `--audit off`: nothing is recorded.
    audit: bool,
    /// Entries waiting to be written, for [`Access::record`].
    queue: parking_lot::Mutex<Queue>,
}

/// Refusals of requests without a valid token recorded per address a minute.
const MAX_ANONYMOUS_PER_MINUTE: u32 = 30;

/// Who a request is, once its token checked out.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

impl Access {
    pub fn new(local: Arc<AdminTokens>, farm: FarmStore, server: String) -> Access {
        Access {
            local,
            farm,
            server,
            tokens: RwLock::new(None),
            seq: AtomicU64::new(0),
            anonymous: parking_lot::Mutex::new((Instant::now(), Default::default())),
            audit: true,
            queue: Default::default(),
        }
    }

    /// Records changes and refusals in the audit trail (`true`, the
    /// default) or nothing (`--audit off`).
    pub fn with_audit(mut self, on: bool) -> Access {
        self.audit = on;
        self
    }

    /// The caller whose token `given` is, if any.
    pub async fn identify(&self, given: &str) -> Option<Caller> {
        if let Some(name) = self.local.check(given) {
            return Some(Caller {
                name,
                role: Role::Admin,
            });
        }
        let digest = vstream_pki::token_digest(given.trim());
        let now = crate::clock::now_unix();
        let tokens = self.farm_tokens().await;
        // Every token is compared, in constant time each.
        let hit = tokens.iter().fold(None, |found, t| {
            let same = vstream_pki::constant_time_eq(digest.as_bytes(), t.sha256.as_bytes());
            found.or(same.then_some(t))
        })?;
        if hit.expires_unix.is_some_and(|at| at <= now) {
            return None;
        }
        Some(Caller {
            name: hit.name.clone(),
            role: hit.role,
        })
    }

    /// The farm's tokens, read again when older than [`TOKEN_TTL`]; the
    /// last read while the farm state is away.
    async fn farm_tokens(&self) -> Vec<ApiToken> {
        if let Some((at, t)) = &*self.tokens.read() {
            if at.elapsed() < TOKEN_TTL {
                return t.clone();
            }
        }
        match self.farm.list_tokens().await {
            Ok(t) => {
                *self.tokens.write() = Some((Instant::now(), t.clone()));
                t
            }
            Err(e) => {
                tracing::warn!(error = %e, "farm state unreachable; API tokens as last read");
                self.tokens
                    .read()
                    .as_ref()
                    .map(|(_, t)| t.clone())
                    .unwrap_or_default()
            }
        }
    }

    /// Whether a refusal of a request without a valid token from `from`
    /// still goes into the trail this minute.
    fn record_anonymous(&self, from: &str) -> bool {
        let mut a = self.anonymous.lock();
        if a.0.elapsed() >= Duration::from_secs(60) {
            *a = (Instant::now(), Default::default());
        }
        let n = a.1.entry(from.to_owned()).or_insert(0);
        *n += 1;
        if *n == MAX_ANONYMOUS_PER_MINUTE + 1 {
            tracing::warn!(%from, "more than {MAX_ANONYMOUS_PER_MINUTE} requests without a valid token this minute: the rest are not recorded in the audit trail");
        }
        *n <= MAX_ANONYMOUS_PER_MINUTE
    }

    /// Forgets the tokens read, so a change made here counts at once.
    pub fn tokens_changed(&self) {
        *self.tokens.write() = None;
    }

    /// Appends `entry` to the trail, and returns once it is in the farm
    /// state; a failure is logged, never the request's.
    ///
    /// Entries are written by group commit: the first request to find no
    /// write under way starts one (a task of its own, so a client that
    /// hangs up cannot stop it), which takes every entry waiting, writes
    /// them in one transaction, wakes their requests, and goes on while
    /// more wait. Under a storm of changes the farm state commits once per
    /// batch instead of once per change; a lone change waits for one
    /// commit, as before.
    pub async fn record(self: &Arc<Self>, entry: AuditEntry) {
        if !self.audit {
            return;
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        self.append(entry, seq).await;
    }

    /// A rider for the change `draft` drafts, with its `seq`: the change's
    /// first commit carries the entry ([`vstream_farm::rider`]). None under
    /// `--audit off`.
    fn rider(&self, draft: &AuditEntry) -> Option<(Arc<AuditRider>, u64)> {
        if !self.audit {
            return None;
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut draft = draft.clone();
        draft.server = self.server.clone();
        match AuditRider::new(&draft, seq) {
            Ok(rider) => Some((rider, seq)),
            Err(e) => {
                tracing::warn!(error = %e, "could not draft an audit entry; it is written after the change");
                None
            }
        }
    }

    /// Records how the change of `rider` ended (`done`, at the draft's
    /// time): nothing more when its commit carried the entry and it ended
    /// as drafted (`as_drafted`); the entry rewritten under its key when it
    /// ended otherwise or its commit's outcome is unknown; the entry
    /// appended as any other when nothing was committed.
    async fn close(
        self: &Arc<Self>,
        rider: &AuditRider,
        seq: u64,
        mut done: AuditEntry,
        as_drafted: bool,
    ) {
        match rider.ridden() {
            Ridden::Yes if as_drafted => {}
            Ridden::Yes | Ridden::Unknown => {
                done.server = self.server.clone();
                if let Err(e) = self.farm.settle_audit(&done, seq).await {
                    tracing::warn!(error = %e, method = %done.method, path = %done.path, who = %done.who, "could not append to the audit trail");
                }
            }
            Ridden::No => self.append(done, seq).await,
        }
    }

    /// Appends `entry` with `seq` by group commit (see [`Access::record`]).
    async fn append(self: &Arc<Self>, mut entry: AuditEntry, seq: u64) {
        entry.server = self.server.clone();
        let (done, written) = tokio::sync::oneshot::channel();
        let start = {
            let mut q = self.queue.lock();
            q.waiting.push((entry, seq, done));
            !std::mem::replace(&mut q.writing, true)
        };
        if start {
            tokio::spawn(self.clone().write_batches());
        }
        // Dropped unsent only if the writer task died: nothing to wait for.
        let _ = written.await;
    }

    /// Writes the waiting entries, [`vstream_farm::access::MAX_AUDIT_BATCH`] at a
    /// time, until none wait.
    async fn write_batches(self: Arc<Self>) {
        loop {
            let batch: Vec<_> = {
                let mut q = self.queue.lock();
                if q.waiting.is_empty() {
                    q.writing = false;
                    return;
                }
                let n = q.waiting.len().min(vstream_farm::access::MAX_AUDIT_BATCH);
                q.waiting.drain(..n).collect()
            };
            let entries: Vec<(AuditEntry, u64)> =
                batch.iter().map(|(e, seq, _)| (e.clone(), *seq)).collect();
            if self.farm.append_audit_batch(&entries).await.is_err() {
                // One at a time, so that one bad entry costs only itself.
                for (entry, seq) in &entries {
                    if let Err(e) = self.farm.append_audit(entry, *seq).await {
                        tracing::warn!(error = %e, method = %entry.method, path = %entry.path, who = %entry.who, "could not append to the audit trail");
                    }
                }
            }
            for (_, _, done) in batch {
                let _ = done.send(());
            }
        }
    }
}

/// The entries waiting for the audit trail's next write.
#[derive(Default)]
struct Queue {
    waiting: Vec<(AuditEntry, u64, tokio::sync::oneshot::Sender<()>)>,
    /// A task is writing; it takes what is added meanwhile.
    writing: bool,
}

/// Removes the audit entries older than `days`, now and then every hour,
/// until `shutdown`.
pub async fn prune(farm: FarmStore, days: u64, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        let cutoff = now_ms().saturating_sub(days.saturating_mul(86_400_000));
        match farm.prune_audit(cutoff).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(entries = n, days, "old audit entries removed"),
            Err(e) => tracing::warn!(error = %e, "could not prune the audit trail"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// The role a route needs. Reads need a viewer, but for secrets and whole
/// disks; changes need an admin, but for what an operator does to devices,
/// rebalance and replication.
pub fn needed(method: &Method, route: &str) -> Role {
    const ADMIN_READS: [&str; 4] = [
        "/api/v1/devices/:name/iscsi",
        "/api/v1/tokens",
        "/api/v1/vdisks/:name/content",
        "/api/v1/audit/export",
    ];
    const OPERATOR: [(&str, &str); 8] = [
        ("POST", "/api/v1/devices"),
        ("PATCH", "/api/v1/devices/:name"),
        ("DELETE", "/api/v1/devices/:name"),
        ("POST", "/api/v1/devices/:name/reset"),
        ("POST", "/api/v1/devices/:name/move"),
        ("POST", "/api/v1/devices/:name/revoke"),
        ("POST", "/api/v1/farm/rebalance"),
        ("POST", "/api/v1/replication/start"),
    ];
    let read = method == Method::GET || method == Method::HEAD;
    if read && route == "/metrics" {
        Role::Metrics
    } else if read && ADMIN_READS.contains(&route) {
        Role::Admin
    } else if read {
        Role::Viewer
    } else if OPERATOR
        .iter()
        .any(|(m, r)| *m == method.as_str() && *r == route)
    {
        Role::Operator
    } else {
        Role::Admin
    }
}

/// Lets through a request whose token's role the route allows, and records
/// changes and refusals in the audit trail.
pub async fn guard(State(access): State<Arc<Access>>, mut req: Request, next: Next) -> Response {
    req.extensions_mut().insert(access.clone());
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| path.clone(), |m| m.as_str().to_owned());
    let from = req
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map_or_else(|| "-".to_owned(), |c| c.0.ip().to_string());
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_owned();
    let caller = match given.trim().is_empty() {
        true => None,
        false => access.identify(&given).await,
    };
    let need = needed(&method, &route);
    let entry = |who: &Caller, status: StatusCode, result: String, summary: String| AuditEntry {
        at_ms: now_ms(),
        who: who.name.clone(),
        role: Some(who.role),
        from: from.clone(),
        server: String::new(),
        method: method.to_string(),
        path: path.clone(),
        object: object(&path, &summary),
        summary,
        status: status.as_u16(),
        result,
    };
    let Some(caller) = caller else {
        let why = "a valid token is required (Authorization: Bearer ...)";
        let nobody = Caller {
            name: "-".into(),
            role: Role::Metrics,
        };
        if access.record_anonymous(&from) {
            let mut e = entry(&nobody, StatusCode::UNAUTHORIZED, why.into(), String::new());
            e.role = None;
            access.record(e).await;
        }
        return ApiError::new(StatusCode::UNAUTHORIZED, why).into_response();
    };
    if !caller.role.allows(need) {
        let why = format!(
            "token {} has role {}; {method} {route} needs {need}",
            caller.name, caller.role
        );
        tracing::info!(who = %caller.name, role = %caller.role, %method, %path, "refused: {why}");
        access
            .record(entry(
                &caller,
                StatusCode::FORBIDDEN,
                why.clone(),
                String::new(),
            ))
            .await;
        return ApiError::new(StatusCode::FORBIDDEN, why).into_response();
    }
    req.extensions_mut().insert(caller.clone());
    let change = method != Method::GET && method != Method::HEAD;
    if !change {
        return next.run(req).await;
    }
    let (req, summary) = summarize(req).await;
    // The entry as the change expects to end, riding on its first commit.
    let expected = crate::api::success_status(method.as_str(), &route)
        .and_then(|code| StatusCode::from_u16(code).ok())
        .unwrap_or(StatusCode::OK);
    let draft = entry(&caller, expected, "ok".to_owned(), summary.clone());
    let rider = access.rider(&draft);
    let resp = match &rider {
        Some((rider, _)) => rider.carry(next.run(req)).await,
        None => next.run(req).await,
    };
    let status = resp.status();
    let (resp, result) = if status.is_success() {
        (resp, "ok".to_owned())
    } else {
        error_sentence(resp).await
    };
    let mut done = entry(&caller, status, result, summary);
    done.at_ms = draft.at_ms;
    match rider {
        Some((rider, seq)) => access.close(&rider, seq, done, status == expected).await,
        None => access.record(done).await,
    }
    resp
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a request acts on: `device/pc1` for `/api/v1/devices/pc1/reset`;
/// for a collection, the `name` its summary gives.
fn object(path: &str, summary: &str) -> String {
    let rest = path.trim_start_matches("/api/v1/");
    let mut parts = rest.split('/');
    let kind = parts.next().unwrap_or_default();
    let singular = kind.strip_suffix('s').unwrap_or(kind);
    match parts.next() {
        Some(name) if !name.is_empty() => format!("{singular}/{name}"),
        _ => match summary.split(' ').find_map(|kv| kv.strip_prefix("name=")) {
            Some(name) => format!("{singular}/{name}"),
            None => singular.to_owned(),
        },
    }
}

/// The request's JSON fields as `key=value` words (secrets left out), and
/// the request to pass on. Bodies that are not small JSON pass unread.
async fn summarize(req: Request) -> (Request, String) {
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let mut summary = req
        .uri()
        .query()
        .map(|q| q.replace('&', " "))
        .unwrap_or_default();
    if !json {
        return (req, summary);
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_SUMMARIZED).await {
        Ok(b) => b,
        Err(_) => {
            // Too big to summarize, or broken: the handler sees an empty
            // body and answers it.
            return (Request::from_parts(parts, Body::empty()), summary);
        }
    };
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(&bytes) {
        for (k, v) in &map {
            let lower = k.to_ascii_lowercase();
            let secret = ["token", "secret", "password", "csr", "key"]
                .iter()
                .any(|s| lower.contains(s));
            let shown = match v {
                _ if secret => "(hidden)".to_owned(),
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => continue,
                other => other.to_string(),
            };
            if !summary.is_empty() {
                summary.push(' ');
            }
            summary.push_str(&format!("{k}={shown}"));
        }
    }
    summary.truncate(
        summary
            .char_indices()
            .nth(512)
            .map_or(summary.len(), |(i, _)| i),
    );
    (Request::from_parts(parts, Body::from(bytes)), summary)
}

/// The error sentence of a refused or failed request, and the response to
/// pass on.
async fn error_sentence(resp: Response) -> (Response, String) {
    let (parts, body) = resp.into_parts();
    match axum::body::to_bytes(body, MAX_ERROR_BODY).await {
        Ok(bytes) => {
            let sentence = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            (Response::from_parts(parts, Body::from(bytes)), sentence)
        }
        Err(_) => {
            let sentence = format!("status {} (an error body too long to read)", parts.status);
            (Response::from_parts(parts, Body::empty()), sentence)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(i: u64) -> AuditEntry {
        AuditEntry {
            at_ms: 1_000 + i,
            who: "admin".into(),
            role: Some(Role::Admin),
            from: "127.0.0.1".into(),
            server: String::new(),
            method: "POST".into(),
            path: "/api/v1/devices".into(),
            object: format!("device/d{i}"),
            summary: format!("name=d{i}"),
            status: 201,
            result: "ok".into(),
        }
    }

    /// A router with the guard in front of `POST /api/v1/vdisks` (201 on
    /// success in the API's document), its handler made by `make` over the
    /// farm state; and an admin token.
    fn guarded<H, T>(
        audit: bool,
        make: impl FnOnce(FarmStore) -> H,
    ) -> (tempfile::TempDir, FarmStore, axum::Router, String)
    where
        H: axum::handler::Handler<T, ()>,
        T: 'static,
    {
        let dir = tempfile::tempdir().unwrap();
        let farm = FarmStore::embedded(dir.path().join("farm.redb")).unwrap();
        crate::admin_tokens::ensure(dir.path()).unwrap();
        let token = std::fs::read_to_string(dir.path().join(crate::admin_tokens::FIRST_TOKEN_FILE))
            .unwrap();
        let tokens = Arc::new(AdminTokens::open(dir.path()).unwrap());
        let access = Access::new(tokens, farm.clone(), "s1".into()).with_audit(audit);
        let app = axum::Router::new()
            .route("/api/v1/vdisks", axum::routing::post(make(farm.clone())))
            .layer(axum::middleware::from_fn_with_state(
                Arc::new(access),
                guard,
            ));
        (dir, farm, app, token)
    }

    async fn post(app: &mut axum::Router, token: &str) -> StatusCode {
        use tower_service::Service;
        let req = axum::http::Request::post("/api/v1/vdisks")
            .header(header::AUTHORIZATION, format!("Bearer {}", token.trim()))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(r#"{"name":"base"}"#))
            .unwrap();
        app.call(req).await.unwrap().status()
    }

    /// The highest revision in the farm state: one more per commit.
    async fn revision(farm: &FarmStore) -> u64 {
        let all = farm.backend().list("").await.unwrap();
        all.iter().map(|(_, v)| v.revision).max().unwrap_or(0)
    }

    fn base() -> vstream_api::VDisk {
        serde_json::from_value(serde_json::json!({
            "name": "base", "size": 1048576, "mode": "standard",
            "cache_type": "server", "cache_limit": null, "created_unix": 1
        }))
        .unwrap()
    }

    /// A change's entry rides on the change's own commit: the trail costs
    /// no commit of its own, and the entry says what the request got.
    #[tokio::test]
    async fn a_change_and_its_entry_are_one_commit() {
        for audit in [false, true] {
            let (_dir, farm, mut app, token) = guarded(audit, |farm: FarmStore| {
                move || async move {
                    farm.create_vdisk(base()).await.unwrap();
                    StatusCode::CREATED
                }
            });
            let before = revision(&farm).await;
            assert_eq!(post(&mut app, &token).await, StatusCode::CREATED);
            assert_eq!(
                revision(&farm).await,
                before + 1,
                "audit {audit}: one commit"
            );
            let trail = farm.audit().await.unwrap();
            if audit {
                assert_eq!(trail.len(), 1);
                assert_eq!((trail[0].status, trail[0].result.as_str()), (201, "ok"));
                assert_eq!(trail[0].object, "vdisk/base");
                assert_eq!(trail[0].server, "s1");
            } else {
                assert!(trail.is_empty());
            }
        }
    }

    /// A change that commits and then fails is recorded as it ended, under
    /// one entry; one that commits nothing is recorded all the same.
    #[tokio::test]
    async fn a_change_that_ends_otherwise_is_recorded_as_it_ended() {
        let (_dir, farm, mut app, token) = guarded(true, |farm: FarmStore| {
            move || async move {
                farm.create_vdisk(base()).await.unwrap();
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the second step failed")
            }
        });
        assert_eq!(
            post(&mut app, &token).await,
            StatusCode::INTERNAL_SERVER_ERROR
        );
        let trail = farm.audit().await.unwrap();
        assert_eq!(trail.len(), 1, "{trail:?}");
        assert_eq!(trail[0].status, 500);
        assert_eq!(trail[0].result, "the second step failed");

        let (_dir, farm, mut app, token) = guarded(true, |_farm: FarmStore| {
            || async { ApiError::new(StatusCode::CONFLICT, "vDisk base exists") }
        });
        assert_eq!(post(&mut app, &token).await, StatusCode::CONFLICT);
        let trail = farm.audit().await.unwrap();
        assert_eq!(trail.len(), 1, "{trail:?}");
        assert_eq!(
            (trail[0].status, trail[0].result.as_str()),
            (409, "vDisk base exists")
        );
    }

    /// Group commit loses nothing and answers no change before its entry
    /// is in the farm state, alone or in a storm.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn every_change_is_in_the_trail_when_answered() {
        let dir = tempfile::tempdir().unwrap();
        let farm = FarmStore::embedded(dir.path().join("farm.redb")).unwrap();
        let tokens = Arc::new(AdminTokens::open(dir.path()).unwrap());
        let access = Arc::new(Access::new(tokens, farm.clone(), "s1".into()));
        access.record(change(0)).await;
        assert_eq!(farm.audit().await.unwrap().len(), 1);
        let tasks: Vec<_> = (1..=300)
            .map(|i| {
                let (access, farm) = (access.clone(), farm.clone());
                tokio::spawn(async move {
                    access.record(change(i)).await;
                    let trail = farm.audit().await.unwrap();
                    assert!(
                        trail.iter().any(|e| e.object == format!("device/d{i}")),
                        "d{i} answered before its entry was written"
                    );
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let trail = farm.audit().await.unwrap();
        assert_eq!(trail.len(), 301);
        assert!(trail.iter().all(|e| e.server == "s1"));
        let off = Arc::new(
            Access::new(
                Arc::new(AdminTokens::open(dir.path()).unwrap()),
                farm.clone(),
                "s1".into(),
            )
            .with_audit(false),
        );
        off.record(change(999)).await;
        assert_eq!(farm.audit().await.unwrap().len(), 301);
    }

    #[test]
    fn routes_need_the_roles_the_issue_gives() {
        assert_eq!(needed(&Method::GET, "/metrics"), Role::Metrics);
        assert_eq!(needed(&Method::GET, "/api/v1/devices"), Role::Viewer);
        assert_eq!(
            needed(&Method::GET, "/api/v1/devices/:name/iscsi"),
            Role::Admin
        );
        assert_eq!(needed(&Method::GET, "/api/v1/tokens"), Role::Admin);
        assert_eq!(
            needed(&Method::POST, "/api/v1/devices/:name/reset"),
            Role::Operator
        );
        assert_eq!(
            needed(&Method::POST, "/api/v1/farm/rebalance"),
            Role::Operator
        );
        assert_eq!(
            needed(
                &Method::POST,
                "/api/v1/vdisks/:name/versions/:version/promote"
            ),
            Role::Admin
        );
        assert_eq!(
            needed(&Method::POST, "/api/v1/devices/:name/iscsi/rotate"),
            Role::Admin
        );
        assert_eq!(needed(&Method::PATCH, "/api/v1/vdisks/:name"), Role::Admin);
        assert!(Role::Admin.allows(Role::Operator));
        assert!(!Role::Viewer.allows(Role::Operator));
        assert!(!Role::Metrics.allows(Role::Viewer));
    }

    #[test]
    fn objects_come_from_the_path_or_the_name_given() {
        assert_eq!(object("/api/v1/devices/pc1/reset", ""), "device/pc1");
        assert_eq!(object("/api/v1/devices", "name=pc2 mac=x"), "device/pc2");
        assert_eq!(
            object("/api/v1/vdisks/win/versions/3/promote", ""),
            "vdisk/win"
        );
        assert_eq!(object("/api/v1/farm/rebalance", ""), "farm/rebalance");
        assert_eq!(object("/api/v1/replication/start", ""), "replication/start");
    }
}
