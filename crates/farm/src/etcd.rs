//! The etcd [`Backend`]: the farm's state in an etcd v3 cluster, for farms of
//! several servers.
//!
//! Every key lives under a prefix (say `/vstream/farm/`), so several farms, or
//! test runs, can share one etcd. The mapping onto etcd's v3 API is one to one:
//!
//! * [`Backend::get`] is a Range on the key; [`Versioned::revision`] is the
//!   key's `mod_revision`.
//! * [`Backend::list`] is a Range over the prefix, in pages that all read the
//!   revision of the first page, so the result is one consistent snapshot.
//! * [`Backend::txn`] is a Txn: each [`Compare::Revision`] becomes a compare on
//!   `mod_revision`, or for revision 0 on `version == 0` ("the key does not
//!   exist"), and the ops become puts and deletes on the success branch.
//!
//! All reads are linearizable (etcd's default) and every request asks for a
//! leader, so a member cut off from the rest of its cluster refuses instead of
//! answering from stale state. No etcd locks or leases are used.
//!
//! Every call is bounded by a timeout ([`DEFAULT_TIMEOUT`] unless
//! [`Etcd::connect_with_timeout`] says otherwise): an etcd that is down or
//! unreachable gives [`FarmError::Backend`] saying "etcd at … did not answer"
//! rather than a call that hangs. The connection is re-established by the client
//! underneath once etcd is back; nothing has to be reopened. As with any remote
//! store, a [`Backend::txn`] that fails that way may or may not have been
//! applied; callers that care re-read.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, GetOptions, KeyValue, KvClient,
    PutOptions, Txn, TxnOp,
};
use futures::future::BoxFuture;
use futures::FutureExt;

use crate::backend::{check_distinct_keys, Backend, Compare, Op, Versioned};
use crate::FarmError;

/// How long one call to etcd may take before it fails.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// How many keys one Range request of [`Backend::list`] asks for.
const PAGE: i64 = 1000;

/// How often [`Backend::list`] starts over when etcd compacted away the revision
/// it was reading between two of its pages.
const LIST_ATTEMPTS: usize = 3;

/// How many times per endpoint a request whose connection was refused is sent
/// again: the balanced channel picks endpoints at random among those it holds
/// ready, a refusing one included, so a live one comes up within a few tries.
const TRIES_PER_ENDPOINT: usize = 8;

/// gRPC status codes (`tonic::Code as i32`) that mean "etcd did not answer"
/// rather than "etcd refused": CANCELLED, UNKNOWN (a broken connection),
/// DEADLINE_EXCEEDED, UNAVAILABLE (also etcd's "no leader").
const UNANSWERED_CODES: [i32; 4] = [1, 2, 4, 14];
/// OUT_OF_RANGE: etcd's "required revision has been compacted".
const COMPACTED_CODE: i32 = 11;

/// The etcd adapter. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Etcd {
    /// Kept whole (not only its KV client): it also holds the sender of the
    /// endpoint set its balanced channel watches.
    client: Client,
    prefix: String,
    /// The endpoints, comma-separated, for messages.
    endpoints: String,
    /// How many times a request is sent whose connection was refused: one
    /// endpoint refusing may be a member down while the others answer.
    tries: usize,
    timeout: Duration,
    /// The lease [`Backend::put_ephemeral`] keys live under, once granted.
    lease: Arc<tokio::sync::Mutex<Option<i64>>>,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// How an etcd call failed.
enum CallError {
    /// No answer: etcd is down, unreachable, has no leader, or was too slow.
    Unanswered(String),
    /// etcd answered with an error.
    Refused(String),
    /// The revision a paged read was pinned to has been compacted.
    Compacted,
}

impl Etcd {
    /// Connects to the etcd cluster at `endpoints` (URLs such as
    /// `http://127.0.0.1:2379`, or `host:port`), keeping every key under
    /// `prefix` (for instance `/vstream/farm/`; end it with `/` to keep it
    /// apart from its siblings), and checks that etcd answers. Each call may
    /// take up to [`DEFAULT_TIMEOUT`].
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, FarmError> {
        Self::connect_with_timeout(endpoints, prefix, DEFAULT_TIMEOUT).await
    }

    /// [`Etcd::connect`] with another bound on each call (connecting included).
    pub async fn connect_with_timeout(
        endpoints: &[String],
        prefix: &str,
        timeout: Duration,
    ) -> Result<Self, FarmError> {
        if endpoints.is_empty() || endpoints.iter().any(|e| e.trim().is_empty()) {
            return Err(FarmError::Invalid(
                "no etcd endpoint given: name at least one, such as http://127.0.0.1:2379".into(),
            ));
        }
        if prefix.is_empty() {
            return Err(FarmError::Invalid(
                "the etcd key prefix is empty: give the farm its own, such as /vstream/farm/"
                    .into(),
            ));
        }
        if timeout.is_zero() {
            return Err(FarmError::Invalid(
                "the etcd timeout must not be zero".into(),
            ));
        }
        let joined = endpoints.join(",");
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_tcp_keepalive(Duration::from_secs(30))
            // HTTP/2 pings: a connection whose packets vanish (a partition)
            // is dropped and made again, instead of swallowing every request.
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let client =
            match tokio::time::timeout(timeout, Client::connect(endpoints, Some(options))).await {
                Ok(Ok(client)) => client,
                Ok(Err(
                    e @ (etcd_client::Error::InvalidUri(_) | etcd_client::Error::InvalidArgs(_)),
                )) => {
                    return Err(FarmError::Invalid(format!(
                        "cannot use etcd endpoints {joined}: {e}"
                    )))
                }
                Ok(Err(e)) => {
                    return Err(FarmError::Backend(format!(
                        "cannot use etcd at {joined}: {e}"
                    )))
                }
                Err(_) => {
                    return Err(FarmError::Backend(format!(
                        "etcd at {joined} did not answer: no connection within {timeout:?}"
                    )))
                }
            };
        let etcd = Etcd {
            client,
            prefix: prefix.to_string(),
            endpoints: joined,
            tries: match endpoints.len() {
                1 => 1,
                n => n * TRIES_PER_ENDPOINT,
            },
            timeout,
            lease: Arc::default(),
        };
        // The client connects lazily; one cheap read makes a wrong address or a
        // dead etcd show up now rather than at the first request.
        let probe = GetOptions::new().with_prefix().with_count_only();
        let key = etcd.prefix.clone();
        etcd.call(
            || "checking the connection".to_string(),
            |mut kv| {
                let (key, probe) = (key.clone(), probe.clone());
                async move { kv.get(key, Some(probe)).await }
            },
        )
        .await?;
        Ok(etcd)
    }

    /// The prefix every key lives under.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The endpoints, comma-separated.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// The bound on each call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn full_key(&self, key: &str) -> Vec<u8> {
        format!("{}{key}", self.prefix).into_bytes()
    }

    /// Our key for an etcd key under the prefix.
    fn short_key(&self, kv: &KeyValue) -> Result<String, FarmError> {
        let key = kv.key();
        let rest = key
            .strip_prefix(self.prefix.as_bytes())
            .ok_or_else(|| self.unreadable(key, "it is outside the prefix"))?;
        String::from_utf8(rest.to_vec()).map_err(|_| self.unreadable(key, "it is not UTF-8"))
    }

    fn unreadable(&self, key: &[u8], why: &str) -> FarmError {
        FarmError::Backend(format!(
            "etcd at {} returned key {:?}, which is unreadable: {why}",
            self.endpoints,
            String::from_utf8_lossy(key)
        ))
    }

    fn versioned(&self, kv: &KeyValue) -> Result<Versioned, FarmError> {
        let revision = u64::try_from(kv.mod_revision())
            .ok()
            .filter(|&r| r > 0)
            .ok_or_else(|| {
                self.unreadable(
                    kv.key(),
                    &format!("its mod_revision is {}", kv.mod_revision()),
                )
            })?;
        Ok(Versioned {
            value: kv.value().to_vec(),
            revision,
        })
    }

    /// Runs one request on a clone of the client, bounded by the timeout, and
    /// turns its failure into a [`FarmError`] saying what we were `doing`.
    async fn call<T, F, Fut>(&self, doing: impl FnOnce() -> String, f: F) -> Result<T, FarmError>
    where
        F: Fn(KvClient) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.raw_call(f).await.map_err(|e| self.error(doing(), e))
    }

    async fn raw_call<T, F, Fut>(&self, f: F) -> Result<T, CallError>
    where
        F: Fn(KvClient) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.send(|| f(self.client.kv_client())).await
    }

    /// Sends a request made by `request`, bounded by the timeout. One that
    /// never left, because the endpoint the balanced channel picked refused
    /// the connection (a member down), is made and sent again, so that a
    /// cluster with a member down still answers every call through the others
    /// (`self.tries` times at most; each refusal is immediate).
    async fn send<T, Fut>(&self, request: impl Fn() -> Fut) -> Result<T, CallError>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let started = tokio::time::Instant::now();
        let no_answer = || CallError::Unanswered(format!("no answer within {:?}", self.timeout));
        let mut tries = self.tries;
        loop {
            tries -= 1;
            match tokio::time::timeout_at(started + self.timeout, request()).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(e)) if tries > 0 && never_sent(&e) => continue,
                // The client's own timeouts (per request, per connection attempt)
                // equal ours and may fire first; say the same thing either way.
                Ok(Err(e)) => {
                    return match classify(e) {
                        CallError::Unanswered(_) if started.elapsed() >= self.timeout => {
                            Err(no_answer())
                        }
                        e => Err(e),
                    }
                }
                Err(_) => return Err(no_answer()),
            }
        }
    }

    fn error(&self, doing: impl std::fmt::Display, e: CallError) -> FarmError {
        let endpoints = &self.endpoints;
        FarmError::Backend(match e {
            CallError::Unanswered(why) => format!(
                "etcd at {endpoints} did not answer: {why} (while {doing}); check that it is \
                 running and reachable"
            ),
            CallError::Refused(why) => format!("etcd at {endpoints} refused {doing}: {why}"),
            CallError::Compacted => format!(
                "etcd at {endpoints} kept compacting away the revision being read while {doing}"
            ),
        })
    }

    async fn get_impl(&self, key: String) -> Result<Option<Versioned>, FarmError> {
        let full = self.full_key(&key);
        let mut answer = self
            .call(
                || format!("reading key {}{key}", self.prefix),
                |mut kv| {
                    let full = full.clone();
                    async move { kv.get(full, None).await }
                },
            )
            .await?;
        match answer.take_kvs().first() {
            Some(kv) => Ok(Some(self.versioned(kv)?)),
            None => Ok(None),
        }
    }

    async fn list_impl(&self, prefix: String) -> Result<Vec<(String, Versioned)>, FarmError> {
        let doing = || format!("listing keys under {}{prefix}", self.prefix);
        for _ in 0..LIST_ATTEMPTS {
            match self.list_pages(&prefix).await {
                Ok(list) => return Ok(list),
                Err(CallError::Compacted) => continue,
                Err(e) => return Err(self.error(doing(), e)),
            }
        }
        Err(self.error(doing(), CallError::Compacted))
    }

    /// One attempt at [`Backend::list`]: pages of [`PAGE`] keys, all read at the
    /// revision the first page was read at.
    async fn list_pages(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, CallError> {
        let start = self.full_key(prefix);
        let end = prefix_end(&start);
        let mut from = start;
        let mut revision = 0;
        let mut out = Vec::new();
        loop {
            let options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(PAGE)
                .with_revision(revision);
            let mut answer = self
                .raw_call(|mut kv| {
                    let (key, options) = (from.clone(), options.clone());
                    async move { kv.get(key, Some(options)).await }
                })
                .await?;
            if revision == 0 {
                revision = answer.header().map_or(0, |h| h.revision());
            }
            let kvs = answer.take_kvs();
            for kv in &kvs {
                let key = self.short_key(kv).map_err(refused)?;
                let value = self.versioned(kv).map_err(refused)?;
                out.push((key, value));
            }
            match kvs.last() {
                Some(last) if answer.more() => {
                    // The next key after `last`.
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        // etcd returns keys in ascending byte order already; make sure.
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn txn_impl(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<bool, FarmError> {
        check_distinct_keys(&ops)?;
        let mut when = Vec::with_capacity(compares.len());
        for compare in &compares {
            let Compare::Revision { key, revision } = compare;
            let key = self.full_key(key);
            if *revision == 0 {
                when.push(EtcdCompare::version(key, CompareOp::Equal, 0));
            } else {
                let Ok(revision) = i64::try_from(*revision) else {
                    // etcd's revisions are i64: no key can be at this one.
                    return Ok(false);
                };
                when.push(EtcdCompare::mod_revision(key, CompareOp::Equal, revision));
            }
        }
        let then: Vec<TxnOp> = ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value } => TxnOp::put(self.full_key(key), value.clone(), None),
                Op::Delete { key } => TxnOp::delete(self.full_key(key), None),
            })
            .collect();
        let txn = Txn::new().when(when).and_then(then);
        let doing = || {
            let keys: Vec<&str> = ops.iter().map(Op::key).collect();
            let writing = if keys.is_empty() {
                "nothing".to_string()
            } else {
                keys.join(", ")
            };
            format!("a transaction under {} (writing {writing})", self.prefix)
        };
        let answer = self
            .call(doing, |mut kv| {
                let txn = txn.clone();
                async move { kv.txn(txn).await }
            })
            .await?;
        Ok(answer.succeeded())
    }
}

impl Etcd {
    async fn revision_impl(&self) -> Result<u64, FarmError> {
        let probe = GetOptions::new().with_prefix().with_count_only();
        let key = self.full_key("");
        let answer = self
            .call(
                || "reading the revision".to_string(),
                |mut kv| {
                    let (key, probe) = (key.clone(), probe.clone());
                    async move { kv.get(key, Some(probe)).await }
                },
            )
            .await?;
        answer
            .header()
            .and_then(|h| u64::try_from(h.revision()).ok())
            .ok_or_else(|| {
                FarmError::Backend(format!(
                    "etcd at {} answered a read without its revision",
                    self.endpoints
                ))
            })
    }

    async fn compact_impl(&self, revision: u64) -> Result<(), FarmError> {
        let doing = || format!("compacting its history before revision {revision}");
        let Ok(at) = i64::try_from(revision) else {
            return Err(self.error(doing(), CallError::Refused("no such revision".into())));
        };
        match self
            .raw_call(|mut kv| async move { kv.compact(at, None).await })
            .await
        {
            // Another server compacted as far or further already.
            Ok(_) | Err(CallError::Compacted) => Ok(()),
            Err(e) => Err(self.error(doing(), e)),
        }
    }

    async fn put_ephemeral_impl(
        &self,
        key: String,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<(), FarmError> {
        let mut lease = self.lease.lock().await;
        let alive = match *lease {
            Some(id) => self.keep_alive(id).await?,
            None => false,
        };
        if !alive {
            let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
            let granted = self
                .send(|| {
                    let mut leases = self.client.lease_client();
                    async move { leases.grant(secs, None).await }
                })
                .await
                .map_err(|e| self.error("granting a lease", e))?;
            *lease = Some(granted.id());
        }
        let id = lease.expect("set above");
        let full = self.full_key(&key);
        self.call(
            || format!("writing key {}{key} under lease {id:x}", self.prefix),
            |mut kv| {
                let (full, value) = (full.clone(), value.clone());
                async move {
                    kv.put(full, value, Some(PutOptions::new().with_lease(id)))
                        .await
                }
            },
        )
        .await?;
        Ok(())
    }

    /// Renews lease `id` once; `false` if it has expired.
    async fn keep_alive(&self, id: i64) -> Result<bool, FarmError> {
        let renewed = self
            .send(|| {
                let mut leases = self.client.lease_client();
                async move {
                    let (mut keeper, mut stream) = leases.keep_alive(id).await?;
                    keeper.keep_alive().await?;
                    stream.message().await
                }
            })
            .await;
        match renewed {
            Ok(answer) => Ok(answer.is_some_and(|a| a.ttl() > 0)),
            // "lease not found": it expired while we were away; grant another.
            Err(CallError::Refused(_)) => Ok(false),
            Err(e) => Err(self.error("renewing the lease", e)),
        }
    }
}

/// True if `e` says the request never reached etcd: the connection to the
/// endpoint it was sent to was refused.
fn never_sent(e: &etcd_client::Error) -> bool {
    // etcd_client's error does not chain to what it wraps: start there.
    let mut cause: Option<&(dyn std::error::Error + 'static)> = match e {
        etcd_client::Error::GRpcStatus(status) => Some(status),
        etcd_client::Error::TransportError(t) => Some(t),
        etcd_client::Error::IoError(io) => Some(io),
        _ => None,
    };
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

fn classify(e: etcd_client::Error) -> CallError {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            let code = status.code() as i32;
            if code == COMPACTED_CODE {
                CallError::Compacted
            } else if UNANSWERED_CODES.contains(&code) {
                CallError::Unanswered(with_causes(status.message(), &status))
            } else {
                CallError::Refused(format!("{:?}: {}", status.code(), status.message()))
            }
        }
        e @ (etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_)) => {
            CallError::Unanswered(with_causes(&e.to_string(), &e))
        }
        e => CallError::Refused(e.to_string()),
    }
}

/// `message`, followed by what the chain of sources behind `e` adds to it
/// ("tcp connect error: Connection refused (os error 111)").
fn with_causes(message: &str, e: &dyn std::error::Error) -> String {
    let mut out = message.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // tonic wraps the cause that says something in a bare "transport error".
        if !text.is_empty() && text != "transport error" && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

fn refused(e: FarmError) -> CallError {
    CallError::Refused(match e {
        FarmError::Backend(m) => m,
        e => e.to_string(),
    })
}

/// The smallest key greater than every key starting with `prefix` (etcd's
/// `range_end` for a prefix); `[0]` (to the end) when there is none.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(&last) = end.last() {
        if last < 0xff {
            *end.last_mut().expect("not empty") += 1;
            return end;
        }
        end.pop();
    }
    vec![0]
}

impl Backend for Etcd {
    fn get(&self, key: &str) -> BoxFuture<'_, Result<Option<Versioned>, FarmError>> {
        self.get_impl(key.to_string()).boxed()
    }

    fn list(&self, prefix: &str) -> BoxFuture<'_, Result<Vec<(String, Versioned)>, FarmError>> {
        self.list_impl(prefix.to_string()).boxed()
    }

    fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> BoxFuture<'_, Result<bool, FarmError>> {
        self.txn_impl(compares, ops).boxed()
    }

    fn put_ephemeral(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<(), FarmError>> {
        self.put_ephemeral_impl(key.to_string(), value, ttl).boxed()
    }

    fn revision(&self) -> BoxFuture<'_, Result<u64, FarmError>> {
        self.revision_impl().boxed()
    }

    fn compact(&self, revision: u64) -> BoxFuture<'_, Result<(), FarmError>> {
        self.compact_impl(revision).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"ab\xff"), b"ac");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
    }

    #[tokio::test]
    async fn bad_arguments_are_refused_before_connecting() {
        let err = Etcd::connect(&[], "/p/").await.expect_err("no endpoints");
        assert!(matches!(err, FarmError::Invalid(_)), "{err:?}");
        let one = ["http://127.0.0.1:1".to_string()];
        let err = Etcd::connect(&one, "").await.expect_err("empty prefix");
        assert!(matches!(err, FarmError::Invalid(_)), "{err:?}");
        let bad = ["http://[::1".to_string()];
        let err = Etcd::connect(&bad, "/p/").await.expect_err("bad URL");
        assert!(matches!(err, FarmError::Invalid(_)), "{err:?}");
        assert!(err.to_string().contains("http://[::1"), "{err}");
    }

    #[tokio::test]
    async fn nothing_listening_is_a_clear_error_within_the_timeout() {
        // Port 1 on loopback: nothing listens there, connections are refused.
        let endpoints = ["http://127.0.0.1:1".to_string()];
        let started = std::time::Instant::now();
        let err = Etcd::connect_with_timeout(&endpoints, "/p/", Duration::from_millis(700))
            .await
            .expect_err("nothing listens on port 1");
        assert!(started.elapsed() < Duration::from_secs(3), "took too long");
        let msg = err.to_string();
        assert!(matches!(err, FarmError::Backend(_)), "{err:?}");
        assert!(
            msg.contains("etcd at http://127.0.0.1:1 did not answer"),
            "{msg}"
        );
    }
}
