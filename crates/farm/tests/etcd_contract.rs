//! The etcd adapter against a real etcd.
//!
//! * The [`Backend`] contract, each case under a fresh key prefix of the etcd
//!   named by `VSTREAM_TEST_ETCD` (such as `http://127.0.0.1:2379`; `.ci/run`
//!   starts one and sets it). Without it the cases are skipped, except under
//!   `CI=true`, where that is a failure. The cases run one at a time: one of
//!   them checks that a txn without writes does not use up a revision, which
//!   any other writer to the same etcd meanwhile would upset, so do not point
//!   two test runs at one etcd at the same time.
//! * Restarts: a test starts its own etcd (`etcd` from `PATH`, or
//!   `VSTREAM_TEST_ETCD_BIN`), kills it, checks that calls fail in bounded time
//!   with a clear error, starts it again on the same data and checks that the
//!   same handle works again and the data is all there.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{Client, DeleteOptions};
use vstream_farm::etcd::Etcd;
use vstream_farm::{contract, Backend, Compare, FarmError, FarmStore, Op};
use vstream_model::{DeviceEvent, EventKind, VDisk};

/// The shared test etcd, or `None` after a skip (a failure under CI=true).
fn test_etcd() -> Option<String> {
    match std::env::var("VSTREAM_TEST_ETCD") {
        Ok(url) if !url.trim().is_empty() => Some(url.trim().to_string()),
        _ => {
            vstream_testkit::skip(
                "VSTREAM_TEST_ETCD is not set: set it to an etcd's client URL \
                 (such as http://127.0.0.1:2379), or run .ci/run, which starts etcd",
            );
            None
        }
    }
}

/// A key prefix no other case or test run uses.
fn unique_prefix(label: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    format!(
        "/vstream-test/{label}-{}-{nanos}-{}/",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// Serialises the cases that use the shared etcd (see the module docs).
static SHARED_ETCD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn fresh(url: &str, label: &str) -> (String, Arc<dyn Backend>) {
    let prefix = unique_prefix(label);
    // Printed, so a failing case says where its keys are.
    println!("etcd {url}, prefix {prefix}");
    let etcd = Etcd::connect(&[url.to_string()], &prefix)
        .await
        .unwrap_or_else(|e| panic!("connecting to the test etcd at {url}: {e}"));
    (prefix, Arc::new(etcd))
}

/// Deletes everything under `prefix`, so a developer's etcd does not fill up.
async fn remove_prefix(url: &str, prefix: &str) {
    let mut client = Client::connect([url], None).await.expect("connect");
    client
        .delete(prefix, Some(DeleteOptions::new().with_prefix()))
        .await
        .expect("removing the test keys");
}

macro_rules! contract_cases {
    ($($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let Some(url) = test_etcd() else { return };
                let _one_at_a_time = SHARED_ETCD.lock().await;
                let (prefix, backend) = fresh(&url, stringify!($case)).await;
                contract::$case(backend).await;
                remove_prefix(&url, &prefix).await;
            }
        )*
    };
}

vstream_farm::contract_case_names!(contract_cases);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_contract_suite() {
    let Some(url) = test_etcd() else { return };
    let _one_at_a_time = SHARED_ETCD.lock().await;
    let mut prefixes = Vec::new();
    contract::contract_suite(|| {
        let url = url.clone();
        let prefix = unique_prefix("suite");
        prefixes.push(prefix.clone());
        async move {
            let etcd = Etcd::connect(&[url], &prefix).await.expect("connect");
            Arc::new(etcd) as Arc<dyn Backend>
        }
    })
    .await;
    assert_eq!(prefixes.len(), contract::CASES);
    for prefix in &prefixes {
        remove_prefix(&url, prefix).await;
    }
}

fn vdisk(name: &str) -> VDisk {
    VDisk::new(name, 1 << 30, 1_700_000_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_keep_farms_apart() {
    let Some(url) = test_etcd() else { return };
    let _one_at_a_time = SHARED_ETCD.lock().await;
    let endpoints = [url.clone()];
    let (one, two) = (unique_prefix("one"), unique_prefix("two"));
    let a = FarmStore::etcd(&endpoints, &one).await.expect("connect");
    let b = FarmStore::etcd(&endpoints, &two).await.expect("connect");
    a.create_vdisk(vdisk("base")).await.expect("create in one");
    assert_eq!(b.get_vdisk("base").await.expect("get"), None);
    assert!(b.list_vdisks().await.expect("list").is_empty());
    b.create_vdisk(vdisk("base"))
        .await
        .expect("the same name in another farm");
    assert_eq!(a.list_vdisks().await.expect("list").len(), 1);
    // The raw keys carry the prefix in etcd, and not in the Backend.
    let mut client = Client::connect([url.as_str()], None)
        .await
        .expect("connect");
    let raw = client
        .get(format!("{one}vdisks/base"), None)
        .await
        .expect("raw get");
    assert_eq!(raw.kvs().len(), 1);
    let listed = a.backend().list("").await.expect("list");
    assert_eq!(
        listed.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        ["vdisks/base"]
    );
    assert_eq!(
        listed[0].1.revision,
        u64::try_from(raw.kvs()[0].mod_revision()).expect("positive"),
        "revisions are etcd's mod_revision"
    );
    remove_prefix(&url, &one).await;
    remove_prefix(&url, &two).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_lists_are_read_in_pages() {
    let Some(url) = test_etcd() else { return };
    let _one_at_a_time = SHARED_ETCD.lock().await;
    let (prefix, b) = fresh(&url, "pages").await;
    // More than one page (1000 keys), in txns of 100 puts (etcd allows 128).
    let mut expected: Vec<String> = (0..2345).map(|i| format!("k/{i:05}")).collect();
    for chunk in expected.chunks(100) {
        let ops = chunk
            .iter()
            .map(|k| Op::put(k, k.as_bytes().to_vec()))
            .collect();
        assert!(b.txn(vec![], ops).await.expect("txn"));
    }
    assert!(b
        .txn(vec![], vec![Op::put("l", b"outside".to_vec())])
        .await
        .expect("txn"));
    let listed = b.list("k/").await.expect("list");
    assert_eq!(
        listed.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
        expected
    );
    assert!(listed.iter().all(|(k, v)| v.value == k.as_bytes()));
    expected.push("l".into());
    assert_eq!(b.list("").await.expect("list").len(), expected.len());
    remove_prefix(&url, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_keys_in_one_txn_are_refused() {
    let Some(url) = test_etcd() else { return };
    let _one_at_a_time = SHARED_ETCD.lock().await;
    let (prefix, b) = fresh(&url, "dup").await;
    let err = b
        .txn(vec![], vec![Op::put("k", b"1".to_vec()), Op::delete("k")])
        .await
        .expect_err("duplicate key");
    assert!(matches!(err, FarmError::Invalid(_)), "{err:?}");
    assert_eq!(b.get("k").await.expect("get"), None);
    // A revision beyond etcd's i64 cannot match anything.
    assert!(!b
        .txn(
            vec![Compare::revision("k", u64::MAX)],
            vec![Op::put("k", b"1".to_vec())]
        )
        .await
        .expect("txn"));
    remove_prefix(&url, &prefix).await;
}

// ---- restarts ---------------------------------------------------------------

/// The etcd binary, or `None` after a skip (a failure under CI=true).
fn etcd_binary() -> Option<PathBuf> {
    let bin =
        std::env::var_os("VSTREAM_TEST_ETCD_BIN").map_or_else(|| "etcd".into(), PathBuf::from);
    let runs = Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if runs {
        return Some(bin);
    }
    vstream_testkit::skip(&format!(
        "{} does not run: install etcd (Debian: etcd-server) or set VSTREAM_TEST_ETCD_BIN",
        bin.display()
    ));
    None
}

/// An etcd process of the test's own; killed when dropped.
struct EtcdProcess {
    child: Child,
    log: PathBuf,
}

impl EtcdProcess {
    fn start(bin: &Path, dir: &Path, client_port: u16, peer_port: u16) -> Self {
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let log = dir.join("etcd.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("etcd log");
        let child = Command::new(bin)
            .arg("--name=default")
            .arg(format!("--data-dir={}", dir.join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=default={peer}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("starting etcd");
        EtcdProcess { child, log }
    }

    /// Panics with the end of etcd's log if it has exited.
    fn check_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!("etcd exited ({status}); its log ends:\n{}", tail.join("\n"));
        }
    }

    /// Kills etcd (SIGKILL: a crash, no clean shutdown) and waits for it.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends etcd a signal (`-STOP`, `-CONT`, `-TERM`).
fn signal(process: &EtcdProcess, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &process.child.id().to_string()])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill {signal} failed");
}

/// Waits until every thread of etcd is stopped (state `T` in
/// /proc/PID/task/*/stat): `kill -STOP` returns once the signal is sent, and
/// a thread of etcd on another CPU may still answer a request meanwhile
/// (CI once saw a read succeed right after the signal).
fn wait_stopped(process: &EtcdProcess) {
    let tasks = PathBuf::from(format!("/proc/{}/task", process.child.id()));
    let stopped = || -> bool {
        let Ok(dir) = std::fs::read_dir(&tasks) else {
            return false;
        };
        dir.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
            .all(|stat| {
                stat.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
            })
    };
    let started = Instant::now();
    while !stopped() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "etcd's threads did not all stop within 10 s of SIGSTOP"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until `etcd` answers a read, for up to `limit`.
async fn until_answers(etcd: &Etcd, process: &mut EtcdProcess, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        process.check_running();
        match etcd.get("probe").await {
            Ok(_) => return started.elapsed(),
            Err(e) if started.elapsed() > limit => {
                panic!("etcd still does not answer after {limit:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_etcd_restarts() {
    let Some(bin) = etcd_binary() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let [client_port, peer_port] = vstream_testkit::free_ports::<2>();
    let url = format!("http://127.0.0.1:{client_port}");
    let timeout = Duration::from_secs(2);

    let mut process = EtcdProcess::start(&bin, dir.path(), client_port, peer_port);
    let started = Instant::now();
    let etcd = loop {
        process.check_running();
        match Etcd::connect_with_timeout(std::slice::from_ref(&url), "/farm/", timeout).await {
            Ok(etcd) => break etcd,
            Err(e) if started.elapsed() > Duration::from_secs(30) => {
                panic!("etcd did not come up within 30 s: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let store = FarmStore::new(Arc::new(etcd.clone()));
    store.create_vdisk(vdisk("base")).await.expect("create");
    let before = etcd
        .get("vdisks/base")
        .await
        .expect("get")
        .expect("present");

    let expected = format!("etcd at {url} did not answer");

    // Frozen (SIGSTOP): the connection stays open but nothing answers. Calls
    // give up after the timeout; once etcd goes on (SIGCONT) they work again.
    signal(&process, "-STOP");
    wait_stopped(&process);
    let started = Instant::now();
    let err = store.get_vdisk("base").await.expect_err("etcd is frozen");
    let took = started.elapsed();
    println!("frozen, after {took:?}: {err}");
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(1),
        "{took:?}"
    );
    assert!(err.to_string().contains(&expected), "{err}");
    assert!(err.to_string().contains("no answer within 2s"), "{err}");
    signal(&process, "-CONT");
    assert_eq!(
        store.get_vdisk("base").await.expect("get"),
        Some(vdisk("base"))
    );

    // Down: every kind of call fails within the timeout, saying what happened.
    process.kill();
    for attempt in 0..2 {
        let started = Instant::now();
        let err = store.get_vdisk("base").await.expect_err("etcd is down");
        let took = started.elapsed();
        assert!(
            took < timeout + Duration::from_secs(1),
            "attempt {attempt} took {took:?}"
        );
        assert!(matches!(err, FarmError::Backend(_)), "{err:?}");
        let msg = err.to_string();
        println!("attempt {attempt}, after {took:?}: {msg}");
        assert!(msg.contains(&expected), "{msg}");
        assert!(msg.contains("vdisks/base"), "says what it was doing: {msg}");

        let started = Instant::now();
        let err = store
            .create_vdisk(vdisk("while-down"))
            .await
            .expect_err("etcd is down");
        assert!(started.elapsed() < timeout + Duration::from_secs(1));
        assert!(err.to_string().contains(&expected), "{err}");
        let err = store.list_vdisks().await.expect_err("etcd is down");
        assert!(err.to_string().contains(&expected), "{err}");
        println!("{err}");
    }
    let started = Instant::now();
    let err = Etcd::connect_with_timeout(std::slice::from_ref(&url), "/farm/", timeout)
        .await
        .expect_err("etcd is down");
    assert!(started.elapsed() < timeout + Duration::from_secs(1));
    assert!(err.to_string().contains(&expected), "{err}");
    println!("{err}");

    // Up again on the same data: the same handle works again, nothing is lost,
    // and revisions go on from where they were.
    let mut process = EtcdProcess::start(&bin, dir.path(), client_port, peer_port);
    let took = until_answers(&etcd, &mut process, Duration::from_secs(30)).await;
    println!("answered {took:?} after the restart");
    assert_eq!(
        etcd.get("vdisks/base").await.expect("get"),
        Some(before.clone())
    );
    assert_eq!(
        store.get_vdisk("base").await.expect("get"),
        Some(vdisk("base"))
    );
    assert_eq!(store.get_vdisk("while-down").await.expect("get"), None);
    store
        .create_vdisk(vdisk("after"))
        .await
        .expect("create after the restart");
    let after = etcd
        .get("vdisks/after")
        .await
        .expect("get")
        .expect("present");
    assert!(after.revision > before.revision);
    assert_eq!(store.list_vdisks().await.expect("list").len(), 2);

    // And a second time, with a clean shutdown (SIGTERM) this time.
    signal(&process, "-TERM");
    let _ = process.child.wait();
    let err = store.get_vdisk("after").await.expect_err("etcd is down");
    assert!(err.to_string().contains(&expected), "{err}");
    let mut process = EtcdProcess::start(&bin, dir.path(), client_port, peer_port);
    until_answers(&etcd, &mut process, Duration::from_secs(30)).await;
    assert_eq!(store.list_vdisks().await.expect("list").len(), 2);
    store
        .update_vdisk("after", |v| {
            v.size = 2 << 30;
            Ok(())
        })
        .await
        .expect("update after the second restart");
}

/// A farm names every member of its etcd cluster (`--farm etcd://A,B,C`), so
/// that one member down does not stop it. Here the second endpoint refuses
/// every connection, as a stopped member's host does: every call must still
/// succeed, through the live one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_among_several_fails_no_call() {
    let Some(url) = test_etcd() else { return };
    let _one_at_a_time = SHARED_ETCD.lock().await;
    let prefix = unique_prefix("dead-endpoint");
    let endpoints = [url.clone(), "http://127.0.0.1:1".to_string()];
    let etcd = Etcd::connect(&endpoints, &prefix)
        .await
        .expect("connecting with one endpoint down");
    let store = FarmStore::new(Arc::new(etcd));
    for i in 0..40 {
        let name = format!("v{i}");
        store
            .create_vdisk(vdisk(&name))
            .await
            .unwrap_or_else(|e| panic!("create {i}: {e}"));
        assert_eq!(
            store
                .get_vdisk(&name)
                .await
                .unwrap_or_else(|e| panic!("get {i}: {e}")),
            Some(vdisk(&name))
        );
    }
    assert_eq!(store.list_vdisks().await.expect("list").len(), 40);
    remove_prefix(&url, &prefix).await;
}

/// A batch of device events for more devices than one transaction holds
/// stays within etcd's limit of 128 operations a transaction, and every
/// device's events and counts land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_device_events_fits_etcds_transactions() {
    let Some(url) = test_etcd() else { return };
    let _one_at_a_time = SHARED_ETCD.lock().await;
    let prefix = unique_prefix("events");
    let farm = FarmStore::etcd(std::slice::from_ref(&url), &prefix)
        .await
        .expect("connect");
    let event = |at_ms, kind| DeviceEvent {
        at_ms,
        kind,
        server: "s1".into(),
        detail: String::new(),
    };
    let batch: Vec<(String, DeviceEvent)> = (0..70)
        .flat_map(|d| {
            [
                (format!("pc{d}"), event(1, EventKind::Connect)),
                (format!("pc{d}"), event(2, EventKind::Disconnect)),
            ]
        })
        .collect();
    farm.add_device_events(&batch, 50)
        .await
        .expect("a batch of 70 devices");
    let counts = farm.device_event_counts().await.expect("counts");
    assert_eq!(counts.len(), 70);
    assert!(
        counts
            .values()
            .all(|c| c.connects == 1 && c.disconnects == 1),
        "{counts:?}"
    );
    assert_eq!(farm.device_events("pc69").await.expect("events").len(), 2);
    remove_prefix(&url, &prefix).await;
}

/// Compaction reaches etcd: a read at a revision before it is refused as
/// compacted, the current value is still there, and the farm's own paged
/// read, pinned to a revision, still lists everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_forgets_history_in_etcd() {
    let Some(url) = test_etcd() else { return };
    let _one_at_a_time = SHARED_ETCD.lock().await;
    let (prefix, backend) = fresh(&url, "compaction").await;
    for v in ["v1", "v2"] {
        assert!(backend
            .txn(vec![], vec![Op::put("k", v.as_bytes().to_vec())])
            .await
            .expect("put"));
    }
    let first = backend.get("k").await.expect("get").expect("k").revision;
    assert!(backend
        .txn(vec![], vec![Op::put("k", b"v3".to_vec())])
        .await
        .expect("put"));
    let mut client = Client::connect([url.as_str()], None)
        .await
        .expect("connect");
    let key = format!("{prefix}k");
    let old = client
        .get(
            key.as_str(),
            Some(etcd_client::GetOptions::new().with_revision(first as i64)),
        )
        .await
        .expect("reading at an old revision before compacting");
    assert_eq!(old.kvs()[0].value(), b"v2", "history is there before");
    let now = backend.revision().await.expect("revision");
    backend.compact(now).await.expect("compact");
    let err = client
        .get(
            key.as_str(),
            Some(etcd_client::GetOptions::new().with_revision(first as i64)),
        )
        .await
        .expect_err("a read before the compacted revision");
    assert!(err.to_string().contains("compacted"), "{err}");
    let current = backend.get("k").await.expect("get").expect("k");
    assert_eq!(current.value, b"v3");
    assert_eq!(backend.list("").await.expect("list").len(), 1);
    remove_prefix(&url, &prefix).await;
}
