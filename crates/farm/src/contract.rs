//! The contract every [`Backend`] adapter must pass, written once.
//!
//! Each case takes a fresh, empty backend and panics (via `assert!`) on the
//! first broken promise, so adapters run them from their own tests:
//!
//! ```ignore
//! #[tokio::test]
//! async fn kv_revisions() {
//!     vstream_farm::contract::kv_revisions(my_fresh_backend()).await;
//! }
//! ```
//!
//! or all at once with [`contract_suite`]. It covers the raw key-value layer
//! (get/put/list by prefix, etcd revision semantics, all-or-nothing
//! transactions) and the typed [`FarmStore`] operations on top (duplicates,
//! unique MACs, deletes refused while assigned, retries on conflict).
//!
//! Available in this crate's tests and, for adapters elsewhere, with feature
//! `contract`.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;
use vstream_model::{Device, Mode, VDisk};

use crate::{
    Backend, Compare, ErrorCategory, FarmError, FarmStore, Op, RecordKind, Versioned, MAX_ATTEMPTS,
};

/// How many cases [`contract_suite`] runs (how often it calls `fresh`).
pub const CASES: usize = 15;

/// Calls macro `$m` with the name of every case, once: the suite below and
/// each adapter's per-case tests take the list from here.
#[macro_export]
macro_rules! contract_case_names {
    ($m:ident) => {
        $m!(
            kv_get_put_list,
            kv_revisions,
            kv_atomic_txn,
            vdisk_crud,
            device_crud_and_mac_index,
            vdisk_delete_refused_while_assigned,
            update_retries_on_conflict,
            conflict_after_retries_exhausted,
            delete_vdisk_races_with_create_device,
            concurrent_updates_serialise,
            ephemeral_keys,
            servers_publish_and_list,
            catalogs_and_replication,
            named_stores,
            compaction_keeps_every_current_value,
        );
    };
}

/// Runs every case, each on a new backend from `fresh` (which must be empty).
pub async fn contract_suite<F, Fut>(mut fresh: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Arc<dyn Backend>>,
{
    macro_rules! run_each {
        ($($case:ident),* $(,)?) => {
            $( $case(fresh().await).await; )*
        };
    }
    contract_case_names!(run_each);
}

// ---- helpers ----------------------------------------------------------------

async fn put(b: &dyn Backend, key: &str, value: &str) {
    let ok = b
        .txn(vec![], vec![Op::put(key, value.as_bytes().to_vec())])
        .await
        .expect("unconditional put");
    assert!(ok, "an unconditional txn must succeed");
}

async fn get(b: &dyn Backend, key: &str) -> Option<Versioned> {
    b.get(key).await.expect("get")
}

async fn rev(b: &dyn Backend, key: &str) -> u64 {
    get(b, key).await.map_or(0, |v| v.revision)
}

async fn keys(b: &dyn Backend, prefix: &str) -> Vec<String> {
    b.list(prefix)
        .await
        .expect("list")
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

fn vdisk(name: &str) -> VDisk {
    VDisk::new(name, 4 << 30, 1_700_000_000)
}

fn device(name: &str, mac: &str, vdisk: &str) -> Device {
    Device::new(name, mac, vdisk, 1_700_000_100)
}

/// A backend that runs `action` on the inner backend just before each of the
/// next `times` transactions: a stand-in for another writer that gets in
/// between an operation's read and its write.
struct Interfere {
    inner: Arc<dyn Backend>,
    times: AtomicUsize,
    action: Box<dyn Fn(Arc<dyn Backend>) -> BoxFuture<'static, ()> + Send + Sync>,
}

impl Interfere {
    fn wrap(
        inner: Arc<dyn Backend>,
        times: usize,
        action: impl Fn(Arc<dyn Backend>) -> BoxFuture<'static, ()> + Send + Sync + 'static,
    ) -> Arc<dyn Backend> {
        Arc::new(Interfere {
            inner,
            times: AtomicUsize::new(times),
            action: Box::new(action),
        })
    }
}

impl Backend for Interfere {
    fn get(&self, key: &str) -> BoxFuture<'_, Result<Option<Versioned>, FarmError>> {
        self.inner.get(key)
    }

    fn revision(&self) -> BoxFuture<'_, Result<u64, FarmError>> {
        self.inner.revision()
    }

    fn compact(&self, revision: u64) -> BoxFuture<'_, Result<(), FarmError>> {
        self.inner.compact(revision)
    }

    fn list(&self, prefix: &str) -> BoxFuture<'_, Result<Vec<(String, Versioned)>, FarmError>> {
        self.inner.list(prefix)
    }

    fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> BoxFuture<'_, Result<bool, FarmError>> {
        async move {
            let take = self
                .times
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if take {
                (self.action)(self.inner.clone()).await;
            }
            self.inner.txn(compares, ops).await
        }
        .boxed()
    }

    fn put_ephemeral(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: std::time::Duration,
    ) -> BoxFuture<'_, Result<(), FarmError>> {
        self.inner.put_ephemeral(key, value, ttl)
    }
}

// ---- the key-value layer ----------------------------------------------------

/// get, put, overwrite, delete and list by prefix.
pub async fn kv_get_put_list(b: Arc<dyn Backend>) {
    let b = &*b;
    assert_eq!(get(b, "p/a").await, None, "a fresh backend is empty");
    assert!(keys(b, "").await.is_empty(), "a fresh backend is empty");

    for (k, v) in [
        ("p/b", "2"),
        ("p/a", "1"),
        ("pa", "x"),
        ("p/c/d", "3"),
        ("o/x", "y"),
        ("p", "z"),
    ] {
        put(b, k, v).await;
    }
    let a = get(b, "p/a").await.expect("p/a was put");
    assert_eq!(a.value, b"1");
    assert!(a.revision > 0, "an existing key has a nonzero revision");

    assert_eq!(
        keys(b, "p/").await,
        ["p/a", "p/b", "p/c/d"],
        "prefix, sorted"
    );
    assert_eq!(keys(b, "p/c/").await, ["p/c/d"]);
    assert_eq!(keys(b, "p").await, ["p", "p/a", "p/b", "p/c/d", "pa"]);
    assert!(keys(b, "q/").await.is_empty());
    assert_eq!(
        keys(b, "").await,
        ["o/x", "p", "p/a", "p/b", "p/c/d", "pa"],
        "the empty prefix lists everything"
    );
    let listed = b.list("p/").await.expect("list");
    assert_eq!(listed[1].1.value, b"2", "list returns values");
    assert_eq!(
        listed[1].1,
        get(b, "p/b").await.expect("p/b"),
        "list agrees with get"
    );

    put(b, "p/a", "one").await;
    assert_eq!(get(b, "p/a").await.expect("p/a").value, b"one", "overwrite");

    assert!(b
        .txn(vec![], vec![Op::delete("p/b")])
        .await
        .expect("delete"));
    assert_eq!(get(b, "p/b").await, None, "deleted");
    assert_eq!(keys(b, "p/").await, ["p/a", "p/c/d"]);
    assert!(
        b.txn(vec![], vec![Op::delete("never/was")])
            .await
            .expect("delete absent"),
        "deleting an absent key is not an error"
    );

    put(b, "bin/0", "").await;
    assert_eq!(
        get(b, "bin/0").await.expect("empty value").value,
        b"",
        "empty values are kept"
    );
}

/// Revision semantics: 0 means absent, stale revisions are refused, revisions
/// come from one global counter that only moves forward.
/// The revision moves with every write; compacting up to now forgets only
/// history: current values, revisions and later writes are as before, and
/// compacting again, or to an older revision, is no error.
pub async fn compaction_keeps_every_current_value(b: Arc<dyn Backend>) {
    let b = &*b;
    let start = b.revision().await.expect("revision");
    for v in ["v1", "v2", "v3"] {
        put(b, "kept", v).await;
    }
    put(b, "gone", "x").await;
    assert!(b
        .txn(vec![], vec![Op::delete("gone")])
        .await
        .expect("delete"));
    let now = b.revision().await.expect("revision");
    let kept = get(b, "kept").await.expect("kept");
    assert!(
        now > start && now >= kept.revision,
        "revision {start} then {now}, with key kept at {}",
        kept.revision
    );
    b.compact(now).await.expect("compact to now");
    assert_eq!(
        get(b, "kept").await,
        Some(kept.clone()),
        "current value kept"
    );
    assert_eq!(get(b, "gone").await, None);
    assert_eq!(keys(b, "").await, vec!["kept".to_string()]);
    b.compact(now)
        .await
        .expect("compact to the same revision again");
    b.compact(start.max(1))
        .await
        .expect("compact to an older revision");
    // Writes go on from where they were, and compares still hold.
    assert!(b
        .txn(
            vec![Compare::revision("kept", kept.revision)],
            vec![Op::put("kept", b"v4".to_vec())]
        )
        .await
        .expect("txn"));
    let after = b.revision().await.expect("revision");
    assert!(after > now, "revision {after} after {now}");
    assert_eq!(rev(b, "kept").await, after);
}

pub async fn kv_revisions(b: Arc<dyn Backend>) {
    let b = &*b;
    // Create-if-absent.
    assert!(b
        .txn(
            vec![Compare::absent("k")],
            vec![Op::put("k", b"v1".to_vec())]
        )
        .await
        .expect("txn"));
    let r1 = rev(b, "k").await;
    assert!(r1 > 0);
    assert!(
        !b.txn(
            vec![Compare::absent("k")],
            vec![Op::put("k", b"v2".to_vec())]
        )
        .await
        .expect("txn"),
        "compare on 0 fails once the key exists"
    );
    let k = get(b, "k").await.expect("k");
    assert_eq!(
        (k.value.as_slice(), k.revision),
        (&b"v1"[..], r1),
        "untouched"
    );

    // Compare-and-swap.
    assert!(b
        .txn(
            vec![Compare::revision("k", r1)],
            vec![Op::put("k", b"v2".to_vec())]
        )
        .await
        .expect("txn"));
    let r2 = rev(b, "k").await;
    assert!(r2 > r1, "a write moves the revision forward");
    assert!(
        !b.txn(
            vec![Compare::revision("k", r1)],
            vec![Op::put("k", b"v3".to_vec())]
        )
        .await
        .expect("txn"),
        "a stale revision is refused"
    );
    assert_eq!(get(b, "k").await.expect("k").value, b"v2");
    assert!(
        !b.txn(
            vec![Compare::revision("nope", r2)],
            vec![Op::put("x", b"1".to_vec())]
        )
        .await
        .expect("txn"),
        "an absent key has revision 0, not any other"
    );
    assert_eq!(get(b, "x").await, None);

    // One global counter: keys written in one txn share its revision, and a
    // later txn on another key gets a later one.
    assert!(b
        .txn(
            vec![],
            vec![Op::put("a", b"1".to_vec()), Op::put("b", b"1".to_vec())]
        )
        .await
        .expect("txn"));
    let (ra, rb) = (rev(b, "a").await, rev(b, "b").await);
    assert_eq!(ra, rb, "one txn, one revision");
    assert!(ra > r2, "the counter is global, not per key");
    put(b, "c", "1").await;
    assert!(rev(b, "c").await > ra);
    assert_eq!(rev(b, "a").await, ra, "writing c leaves a's revision alone");
    assert_eq!(
        rev(b, "k").await,
        r2,
        "writing other keys leaves k's revision alone"
    );

    // Compares only: evaluates, changes nothing.
    let before = rev(b, "c").await;
    assert!(b
        .txn(vec![Compare::revision("c", before)], vec![])
        .await
        .expect("txn"));
    assert!(!b
        .txn(vec![Compare::revision("c", before + 1)], vec![])
        .await
        .expect("txn"));
    put(b, "d", "1").await;
    assert_eq!(
        rev(b, "d").await,
        before + 1,
        "txns without writes do not use up revisions"
    );

    // Deleting brings a key back to 0.
    assert!(b
        .txn(vec![Compare::revision("k", r2)], vec![Op::delete("k")])
        .await
        .expect("txn"));
    assert_eq!(rev(b, "k").await, 0);
    assert!(b
        .txn(
            vec![Compare::absent("k")],
            vec![Op::put("k", b"again".to_vec())]
        )
        .await
        .expect("txn"));
    assert!(
        rev(b, "k").await > rev(b, "d").await,
        "a re-created key gets a new revision"
    );
}

/// A txn applies all of its ops or none.
pub async fn kv_atomic_txn(b: Arc<dyn Backend>) {
    let b = &*b;
    put(b, "t/a", "a0").await;
    put(b, "t/b", "b0").await;
    put(b, "t/d", "d0").await;
    let (ra, rb, rd) = (
        rev(b, "t/a").await,
        rev(b, "t/b").await,
        rev(b, "t/d").await,
    );

    // The second compare fails (t/b exists): nothing may change.
    let ok = b
        .txn(
            vec![Compare::revision("t/a", ra), Compare::absent("t/b")],
            vec![
                Op::put("t/a", b"a1".to_vec()),
                Op::put("t/c", b"c1".to_vec()),
                Op::delete("t/d"),
            ],
        )
        .await
        .expect("txn");
    assert!(!ok);
    assert_eq!(get(b, "t/a").await.expect("t/a").value, b"a0");
    assert_eq!(rev(b, "t/a").await, ra);
    assert_eq!(get(b, "t/c").await, None);
    assert_eq!(rev(b, "t/d").await, rd, "t/d was not deleted");
    assert_eq!(keys(b, "t/").await, ["t/a", "t/b", "t/d"]);

    // With compares that hold, everything applies, at one new revision.
    let ok = b
        .txn(
            vec![Compare::revision("t/a", ra), Compare::revision("t/b", rb)],
            vec![
                Op::put("t/a", b"a1".to_vec()),
                Op::put("t/c", b"c1".to_vec()),
                Op::delete("t/d"),
            ],
        )
        .await
        .expect("txn");
    assert!(ok);
    let a = get(b, "t/a").await.expect("t/a");
    let c = get(b, "t/c").await.expect("t/c");
    assert_eq!(
        (a.value.as_slice(), c.value.as_slice()),
        (&b"a1"[..], &b"c1"[..])
    );
    assert_eq!(a.revision, c.revision);
    assert!(a.revision > rd);
    assert_eq!(get(b, "t/d").await, None);
    assert_eq!(
        rev(b, "t/b").await,
        rb,
        "keys the txn only compared keep their revision"
    );
    assert_eq!(keys(b, "t/").await, ["t/a", "t/b", "t/c"]);
}

// ---- the typed store --------------------------------------------------------

/// vDisk create, duplicate, get, list, update, delete, and name checks.
pub async fn vdisk_crud(b: Arc<dyn Backend>) {
    let store = FarmStore::new(b);
    assert!(store.list_vdisks().await.expect("list").is_empty());
    assert_eq!(store.get_vdisk("base").await.expect("get"), None);

    let created = store.create_vdisk(vdisk("base")).await.expect("create");
    assert_eq!(created, vdisk("base"));
    assert_eq!(
        store.get_vdisk("base").await.expect("get"),
        Some(vdisk("base"))
    );

    let mut other = vdisk("base");
    other.size = 1;
    let err = store.create_vdisk(other).await.expect_err("duplicate");
    assert_eq!(
        err,
        FarmError::AlreadyExists {
            kind: RecordKind::VDisk,
            name: "base".into()
        }
    );
    assert_eq!(err.to_string(), "vDisk base already exists");
    assert_eq!(err.category(), ErrorCategory::Conflict);
    assert_eq!(
        store.get_vdisk("base").await.expect("get").map(|v| v.size),
        Some(4 << 30),
        "a refused duplicate leaves the original alone"
    );

    for bad in ["", "../etc", "a/b", ".x", "-x"] {
        let err = store.create_vdisk(vdisk(bad)).await.expect_err(bad);
        assert_eq!(err.category(), ErrorCategory::Invalid, "{bad:?}: {err}");
        assert!(err.to_string().contains("invalid vDisk name"), "{err}");
    }
    assert_eq!(
        store
            .get_vdisk("a/b")
            .await
            .expect_err("bad name")
            .category(),
        ErrorCategory::Invalid
    );

    store.create_vdisk(vdisk("alpha")).await.expect("create");
    store.create_vdisk(vdisk("zeta")).await.expect("create");
    let names: Vec<String> = store
        .list_vdisks()
        .await
        .expect("list")
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["alpha", "base", "zeta"]);

    let updated = store
        .update_vdisk("base", |v| {
            v.mode = Mode::Standard;
            v.cache_limit = Some(1 << 30);
            Ok(())
        })
        .await
        .expect("update");
    assert_eq!(updated.mode, Mode::Standard);
    assert_eq!(
        store.get_vdisk("base").await.expect("get"),
        Some(updated.clone())
    );

    let err = store
        .update_vdisk("base", |v| {
            v.size = 0;
            Err(FarmError::Invalid("no, thanks".into()))
        })
        .await
        .expect_err("closure error");
    assert_eq!(err, FarmError::Invalid("no, thanks".into()));
    assert_eq!(
        store.get_vdisk("base").await.expect("get"),
        Some(updated.clone()),
        "an error from the closure writes nothing"
    );

    let err = store
        .update_vdisk("base", |v| {
            v.name = "renamed".into();
            Ok(())
        })
        .await
        .expect_err("rename");
    assert_eq!(err.category(), ErrorCategory::Invalid);
    assert_eq!(store.get_vdisk("renamed").await.expect("get"), None);

    let err = store
        .update_vdisk("ghost", |_| Ok(()))
        .await
        .expect_err("missing");
    assert_eq!(err.to_string(), "vDisk ghost does not exist");
    assert_eq!(err.category(), ErrorCategory::NotFound);

    let deleted = store.delete_vdisk("base").await.expect("delete");
    assert_eq!(deleted, updated);
    assert_eq!(store.get_vdisk("base").await.expect("get"), None);
    let err = store.delete_vdisk("base").await.expect_err("gone");
    assert_eq!(
        err,
        FarmError::NotFound {
            kind: RecordKind::VDisk,
            name: "base".into()
        }
    );
    store
        .create_vdisk(vdisk("base"))
        .await
        .expect("a deleted name can be reused");
}

/// Device create/find/update/delete and the MAC index.
pub async fn device_crud_and_mac_index(b: Arc<dyn Backend>) {
    let store = FarmStore::new(b);
    store.create_vdisk(vdisk("base")).await.expect("vdisk");
    store.create_vdisk(vdisk("other")).await.expect("vdisk");

    let pc1 = store
        .create_device(device("pc1", "AA-BB-CC-00-11-22", "base"))
        .await
        .expect("create");
    assert_eq!(pc1.mac, "aa:bb:cc:00:11:22", "the MAC is stored normalised");
    assert_eq!(
        store.get_device("pc1").await.expect("get"),
        Some(pc1.clone())
    );
    assert_eq!(
        store.find_device("pc1").await.expect("find"),
        Some(pc1.clone())
    );
    for form in ["aa:bb:cc:00:11:22", "AABBCC001122", "aa-bb-cc-00-11-22"] {
        assert_eq!(
            store.find_device(form).await.expect("find"),
            Some(pc1.clone()),
            "found by MAC written as {form}"
        );
    }
    assert_eq!(store.find_device("pc2").await.expect("find"), None);
    assert_eq!(
        store.find_device("00:00:00:00:00:01").await.expect("find"),
        None
    );
    let err = store.find_device("not a thing").await.expect_err("garbage");
    assert_eq!(err.category(), ErrorCategory::Invalid);

    // Duplicate name.
    let err = store
        .create_device(device("pc1", "00:00:00:00:00:01", "base"))
        .await
        .expect_err("duplicate name");
    assert_eq!(err.to_string(), "device pc1 already exists");
    // Duplicate MAC, written differently.
    let err = store
        .create_device(device("pc2", "aabbcc001122", "base"))
        .await
        .expect_err("duplicate MAC");
    assert_eq!(err.category(), ErrorCategory::Conflict);
    assert!(
        err.to_string().contains("pc1") && err.to_string().contains("aa:bb:cc:00:11:22"),
        "the error names the MAC and the device that has it: {err}"
    );
    assert_eq!(store.get_device("pc2").await.expect("get"), None);
    // Missing vDisk.
    let err = store
        .create_device(device("pc2", "00:00:00:00:00:02", "nope"))
        .await
        .expect_err("missing vdisk");
    assert_eq!(err.category(), ErrorCategory::Invalid);
    assert_eq!(err.to_string(), "vDisk nope does not exist");
    // Bad MAC, bad name.
    let err = store
        .create_device(device("pc2", "aa:bb", "base"))
        .await
        .expect_err("bad MAC");
    assert_eq!(err.category(), ErrorCategory::Invalid);
    let err = store
        .create_device(device("pc 2", "00:00:00:00:00:02", "base"))
        .await
        .expect_err("bad name");
    assert!(err.to_string().contains("invalid device name"), "{err}");
    assert_eq!(
        store.list_devices().await.expect("list"),
        std::slice::from_ref(&pc1),
        "refused creates leave nothing behind"
    );
    assert_eq!(
        store.find_device("00:00:00:00:00:02").await.expect("find"),
        None,
        "refused creates leave no MAC index entry"
    );

    let pc2 = store
        .create_device(device("pc2", "00:00:00:00:00:02", "other"))
        .await
        .expect("create");
    assert_eq!(
        store.list_devices().await.expect("list"),
        [pc1.clone(), pc2.clone()]
    );
    assert_eq!(
        store.devices_using("base").await.expect("using"),
        std::slice::from_ref(&pc1)
    );

    // Change pc1's MAC and vDisk.
    let moved = store
        .update_device("pc1", |d| {
            d.mac = "12-22-33-44-55-66".into();
            d.vdisk = "other".into();
            Ok(())
        })
        .await
        .expect("update");
    assert_eq!(moved.mac, "12:22:33:44:55:66");
    assert_eq!(
        store.get_device("pc1").await.expect("get"),
        Some(moved.clone())
    );
    assert_eq!(
        store.find_device("122233445566").await.expect("find"),
        Some(moved.clone())
    );
    assert_eq!(
        store.find_device("aa:bb:cc:00:11:22").await.expect("find"),
        None,
        "the old MAC no longer finds it"
    );
    assert!(store.devices_using("base").await.expect("using").is_empty());
    // The old MAC is free again.
    let pc3 = store
        .create_device(device("pc3", "aa:bb:cc:00:11:22", "base"))
        .await
        .expect("old MAC is free");

    // Taking another device's MAC, or pointing at a missing vDisk, is refused.
    let err = store
        .update_device("pc2", |d| {
            d.mac = "AA:BB:CC:00:11:22".into();
            Ok(())
        })
        .await
        .expect_err("MAC taken");
    assert!(err.to_string().contains("pc3"), "{err}");
    let err = store
        .update_device("pc2", |d| {
            d.vdisk = "nope".into();
            Ok(())
        })
        .await
        .expect_err("missing vdisk");
    assert_eq!(err.to_string(), "vDisk nope does not exist");
    let err = store
        .update_device("pc2", |d| {
            d.name = "pc9".into();
            Ok(())
        })
        .await
        .expect_err("rename");
    assert_eq!(err.category(), ErrorCategory::Invalid);
    assert_eq!(
        store.get_device("pc2").await.expect("get"),
        Some(pc2.clone()),
        "refused updates write nothing"
    );
    let err = store
        .update_device("ghost", |_| Ok(()))
        .await
        .expect_err("missing");
    assert_eq!(err.to_string(), "device ghost does not exist");

    // Delete frees the MAC.
    assert_eq!(store.delete_device("pc3").await.expect("delete"), pc3);
    assert_eq!(store.get_device("pc3").await.expect("get"), None);
    assert_eq!(
        store.find_device("aa:bb:cc:00:11:22").await.expect("find"),
        None
    );
    store
        .create_device(device("pc4", "aa:bb:cc:00:11:22", "base"))
        .await
        .expect("MAC freed by delete");
    let err = store.delete_device("pc3").await.expect_err("gone");
    assert_eq!(err.category(), ErrorCategory::NotFound);
}

/// A vDisk cannot be deleted while devices are assigned to it.
pub async fn vdisk_delete_refused_while_assigned(b: Arc<dyn Backend>) {
    let store = FarmStore::new(b);
    store.create_vdisk(vdisk("base")).await.expect("vdisk");
    store.create_vdisk(vdisk("spare")).await.expect("vdisk");
    store
        .create_device(device("b", "00:00:00:00:00:0b", "base"))
        .await
        .expect("device");
    store
        .create_device(device("a", "00:00:00:00:00:0a", "base"))
        .await
        .expect("device");
    store
        .create_device(device("c", "00:00:00:00:00:0c", "spare"))
        .await
        .expect("device");

    let err = store.delete_vdisk("base").await.expect_err("assigned");
    assert_eq!(err.category(), ErrorCategory::Conflict);
    assert!(
        err.to_string()
            .starts_with("vDisk base is assigned to devices a, b"),
        "{err}"
    );
    assert!(store.get_vdisk("base").await.expect("get").is_some());

    store.delete_device("a").await.expect("delete");
    let err = store
        .delete_vdisk("base")
        .await
        .expect_err("still assigned");
    assert!(
        err.to_string()
            .starts_with("vDisk base is assigned to device b"),
        "{err}"
    );

    store
        .update_device("b", |d| {
            d.vdisk = "spare".into();
            Ok(())
        })
        .await
        .expect("reassign");
    store
        .delete_vdisk("base")
        .await
        .expect("no device uses it now");
    assert_eq!(store.get_vdisk("base").await.expect("get"), None);
    assert_eq!(store.list_devices().await.expect("list").len(), 2);
}

/// An update that loses a race re-reads and applies its change to the newer record.
pub async fn update_retries_on_conflict(b: Arc<dyn Backend>) {
    FarmStore::new(b.clone())
        .create_vdisk(vdisk("base"))
        .await
        .expect("vdisk");
    let store = FarmStore::new(Interfere::wrap(b.clone(), 1, |inner| {
        async move {
            FarmStore::new(inner)
                .update_vdisk("base", |v| {
                    v.cache_limit = Some(7);
                    Ok(())
                })
                .await
                .expect("interfering update");
        }
        .boxed()
    }));
    let calls = AtomicUsize::new(0);
    let updated = store
        .update_vdisk("base", |v| {
            calls.fetch_add(1, Ordering::SeqCst);
            v.mode = Mode::Standard;
            Ok(())
        })
        .await
        .expect("update");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "one lost attempt, one retry"
    );
    assert_eq!(updated.mode, Mode::Standard);
    assert_eq!(
        updated.cache_limit,
        Some(7),
        "the other writer's change is kept"
    );
    assert_eq!(store.get_vdisk("base").await.expect("get"), Some(updated));

    // The same for devices: the other writer changes the MAC, we the vDisk.
    let plain = FarmStore::new(b.clone());
    plain.create_vdisk(vdisk("other")).await.expect("vdisk");
    plain
        .create_device(device("pc", "00:00:00:00:00:01", "base"))
        .await
        .expect("device");
    let store = FarmStore::new(Interfere::wrap(b, 1, |inner| {
        async move {
            FarmStore::new(inner)
                .update_device("pc", |d| {
                    d.mac = "00:00:00:00:00:09".into();
                    Ok(())
                })
                .await
                .expect("interfering update");
        }
        .boxed()
    }));
    let calls = AtomicUsize::new(0);
    let updated = store
        .update_device("pc", |d| {
            calls.fetch_add(1, Ordering::SeqCst);
            d.vdisk = "other".into();
            Ok(())
        })
        .await
        .expect("update");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "one lost attempt, one retry"
    );
    assert_eq!(
        (updated.mac.as_str(), updated.vdisk.as_str()),
        ("00:00:00:00:00:09", "other")
    );
    assert_eq!(
        plain.get_device("pc").await.expect("get"),
        Some(updated.clone())
    );
    assert_eq!(
        plain.find_device("00:00:00:00:00:09").await.expect("find"),
        Some(updated)
    );
    assert_eq!(
        plain.find_device("00:00:00:00:00:01").await.expect("find"),
        None
    );
}

/// An operation that keeps losing races gives up with [`FarmError::Conflict`]
/// and writes nothing of its own.
pub async fn conflict_after_retries_exhausted(b: Arc<dyn Backend>) {
    let plain = FarmStore::new(b.clone());
    plain.create_vdisk(vdisk("base")).await.expect("vdisk");
    let interferences = Arc::new(AtomicUsize::new(0));
    let counter = interferences.clone();
    let store = FarmStore::new(Interfere::wrap(b, usize::MAX, move |inner| {
        let counter = counter.clone();
        async move {
            let n = counter.fetch_add(1, Ordering::SeqCst) as u64;
            FarmStore::new(inner)
                .update_vdisk("base", |v| {
                    v.cache_limit = Some(n);
                    Ok(())
                })
                .await
                .expect("interfering update");
        }
        .boxed()
    }));
    let err = store
        .update_vdisk("base", |v| {
            v.mode = Mode::Standard;
            Ok(())
        })
        .await
        .expect_err("must give up");
    assert_eq!(err.category(), ErrorCategory::Conflict);
    assert!(matches!(err, FarmError::Conflict(_)), "{err:?}");
    assert!(err.to_string().contains("vDisk base"), "{err}");
    assert_eq!(interferences.load(Ordering::SeqCst), MAX_ATTEMPTS);
    let now = plain.get_vdisk("base").await.expect("get").expect("exists");
    assert_eq!(now.mode, Mode::Private, "the losing update wrote nothing");
    assert_eq!(now.cache_limit, Some(MAX_ATTEMPTS as u64 - 1));
}

/// A device created between delete_vdisk's check and its write makes the delete
/// retry and be refused, instead of leaving the device pointing at nothing.
pub async fn delete_vdisk_races_with_create_device(b: Arc<dyn Backend>) {
    let plain = FarmStore::new(b.clone());
    plain.create_vdisk(vdisk("base")).await.expect("vdisk");
    let store = FarmStore::new(Interfere::wrap(b, 1, |inner| {
        async move {
            FarmStore::new(inner)
                .create_device(device("late", "00:00:00:00:00:0f", "base"))
                .await
                .expect("interfering create");
        }
        .boxed()
    }));
    let err = store
        .delete_vdisk("base")
        .await
        .expect_err("must be refused");
    assert_eq!(err.category(), ErrorCategory::Conflict);
    assert!(
        err.to_string()
            .starts_with("vDisk base is assigned to device late"),
        "{err}"
    );
    assert!(plain.get_vdisk("base").await.expect("get").is_some());
    assert!(plain.get_device("late").await.expect("get").is_some());
}

/// Concurrent read-modify-write updates of one record all take effect.
pub async fn concurrent_updates_serialise(b: Arc<dyn Backend>) {
    const WRITERS: u64 = 12;
    let store = FarmStore::new(b);
    let mut v = vdisk("counter");
    v.cache_limit = Some(0);
    store.create_vdisk(v).await.expect("vdisk");
    let results = futures::future::join_all((0..WRITERS).map(|_| {
        let store = store.clone();
        async move {
            store
                .update_vdisk("counter", |v| {
                    v.cache_limit = Some(v.cache_limit.unwrap_or(0) + 1);
                    Ok(())
                })
                .await
        }
    }))
    .await;
    for r in results {
        r.expect("every writer succeeds within its retries");
    }
    let v = store
        .get_vdisk("counter")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(v.cache_limit, Some(WRITERS), "no update was lost");
}

// ---- ephemeral keys and servers ----------------------------------------------

/// An ephemeral put is read back like any other key, and a second put
/// (the renewal) replaces the value and moves the revision.
pub async fn ephemeral_keys(b: Arc<dyn Backend>) {
    let ttl = std::time::Duration::from_secs(10);
    b.put_ephemeral("live/a", b"1".to_vec(), ttl)
        .await
        .expect("ephemeral put");
    let first = get(&*b, "live/a").await.expect("the key is there");
    assert_eq!(first.value, b"1");
    b.put_ephemeral("live/a", b"2".to_vec(), ttl)
        .await
        .expect("renewing");
    b.put_ephemeral("live/b", b"3".to_vec(), ttl)
        .await
        .expect("a second key under the same lease");
    let again = get(&*b, "live/a").await.expect("still there");
    assert_eq!(again.value, b"2");
    assert!(
        again.revision > first.revision,
        "a renewal moves the revision"
    );
    assert_eq!(keys(&*b, "live/").await, ["live/a", "live/b"]);
    assert!(b
        .txn(vec![], vec![Op::delete("live/a")])
        .await
        .expect("delete"));
    assert_eq!(get(&*b, "live/a").await, None);
}

fn status(name: &str, devices: u32) -> vstream_model::ServerStatus {
    vstream_model::ServerStatus {
        devices,
        started_unix: 1,
        updated_unix: 2,
        ..vstream_model::ServerStatus::idle(
            name,
            &format!("http://{name}:7080"),
            &format!("{name}:10809"),
        )
    }
}

/// Servers publish their status and are listed by name; a member record
/// outlives the live one.
pub async fn servers_publish_and_list(b: Arc<dyn Backend>) {
    let farm = FarmStore::new(b);
    let ttl = std::time::Duration::from_secs(10);
    farm.publish_server(&status("s2", 3), ttl)
        .await
        .expect("publish");
    farm.publish_server(&status("s1", 1), ttl)
        .await
        .expect("publish");
    farm.publish_server(&status("s1", 5), ttl)
        .await
        .expect("publish again");
    let live = farm.live_servers().await.expect("list");
    let names: Vec<(&str, u32)> = live.iter().map(|s| (s.name.as_str(), s.devices)).collect();
    assert_eq!(names, [("s1", 5), ("s2", 3)]);
    let members = farm.members().await.expect("members");
    assert_eq!(members.len(), 2);
    farm.withdraw_server("s2").await.expect("withdraw");
    let live = farm.live_servers().await.expect("list");
    assert_eq!(live.len(), 1);
    assert_eq!(
        farm.members().await.expect("members").len(),
        2,
        "members stay"
    );
    assert_eq!(farm.rebalance_request().await.expect("read"), None);
    let req = vstream_model::RebalanceRequest {
        id: 7,
        trigger_pct: 25.0,
        requested_unix: 3,
    };
    farm.request_rebalance(&req).await.expect("request");
    assert_eq!(farm.rebalance_request().await.expect("read"), Some(req));
    let err = farm
        .publish_server(&status("bad/name", 0), ttl)
        .await
        .unwrap_err();
    assert_eq!(err.category(), ErrorCategory::Invalid, "{err}");
}

fn catalog(name: &str, versions: &[u32]) -> vstream_model::Catalog {
    vstream_model::Catalog {
        vdisk: name.into(),
        size: 1 << 20,
        created_unix: 1,
        last_number: versions.iter().copied().max().unwrap_or(0),
        versions: versions
            .iter()
            .map(|&n| vstream_model::CatalogVersion {
                version: vstream_model::Version {
                    number: n,
                    state: vstream_model::VersionState::Production,
                    layers: vec![format!("v{n}-00000000.layer")],
                    created_unix: 1,
                    sealed_unix: Some(2),
                    content_hash: Some("ab".repeat(32)),
                    boot_set_cleared_unix: None,
                },
                server: "s1".into(),
            })
            .collect(),
    }
}

pub async fn catalogs_and_replication(b: Arc<dyn Backend>) {
    let farm = FarmStore::new(b);
    assert_eq!(farm.catalog("d").await.expect("read"), None);
    let made = farm
        .update_catalog("d", |old| {
            assert_eq!(old, None);
            Ok(Some(catalog("d", &[1])))
        })
        .await
        .expect("create");
    assert_eq!(made, Some(catalog("d", &[1])));
    // Two writers adding different versions: both land, one after a retry.
    let store = FarmStore::new(Interfere::wrap(farm.backend().clone(), 1, |inner| {
        async move {
            FarmStore::new(inner)
                .update_catalog("d", |_| Ok(Some(catalog("d", &[1, 2]))))
                .await
                .expect("interfering update");
        }
        .boxed()
    }));
    let calls = AtomicUsize::new(0);
    let added = store
        .update_catalog("d", |old| {
            calls.fetch_add(1, Ordering::SeqCst);
            let mut c = old.expect("exists");
            c.versions.push(catalog("d", &[3]).versions.remove(0));
            c.last_number = 3;
            Ok(Some(c))
        })
        .await
        .expect("update")
        .expect("kept");
    assert_eq!(calls.load(Ordering::SeqCst), 2, "retried once");
    let numbers: Vec<u32> = added.versions.iter().map(|v| v.version.number).collect();
    assert_eq!(numbers, [1, 2, 3]);
    let err = farm
        .update_catalog("d", |_| Err(FarmError::Invalid("refused".into())))
        .await
        .unwrap_err();
    assert_eq!(err.category(), ErrorCategory::Invalid);
    let err = farm
        .update_catalog("d", |_| Ok(Some(catalog("other", &[1]))))
        .await
        .unwrap_err();
    assert_eq!(err.category(), ErrorCategory::Invalid, "{err}");
    farm.update_catalog("e", |_| Ok(Some(catalog("e", &[1]))))
        .await
        .expect("second");
    let names: Vec<String> = farm
        .catalogs()
        .await
        .expect("list")
        .into_iter()
        .map(|c| c.vdisk)
        .collect();
    assert_eq!(names, ["d", "e"]);
    farm.update_catalog("e", |_| Ok(None))
        .await
        .expect("delete");
    assert_eq!(farm.catalog("e").await.expect("read"), None);

    assert_eq!(farm.replication_override().await.expect("read"), None);
    let order = vstream_model::ReplicationOverride {
        versions: vec![("d".into(), 3)],
        created_unix: 5,
        expires_unix: 10,
    };
    farm.set_replication_override(&order).await.expect("set");
    assert_eq!(
        farm.replication_override().await.expect("read"),
        Some(order)
    );

    let first = farm.peer_secret("s3cret").await.expect("made");
    assert_eq!(first, "s3cret");
    let again = farm.peer_secret("other").await.expect("read");
    assert_eq!(again, "s3cret", "the first secret stays");
}

/// Named stores: made once, refused for the default name or a relative
/// path; a vDisk goes only into a store that exists; a store that holds a
/// vDisk cannot be deleted, even when the vDisk is made in it between the
/// delete's check and its write.
pub async fn named_stores(b: Arc<dyn Backend>) {
    use vstream_model::StoreDef;
    let farm = FarmStore::new(b);
    let def = |name: &str, path: &str| StoreDef {
        name: name.into(),
        path: path.into(),
    };
    assert_eq!(farm.list_stores().await.expect("list"), vec![]);
    farm.create_store(def("fast", "/srv/fast"))
        .await
        .expect("create");
    let again = farm.create_store(def("fast", "/other")).await.unwrap_err();
    assert!(
        matches!(
            again,
            FarmError::AlreadyExists {
                kind: RecordKind::Store,
                ..
            }
        ),
        "{again}"
    );
    for bad in [def("default", "/srv/x"), def("rel", "srv/x")] {
        let e = farm.create_store(bad).await.unwrap_err();
        assert_eq!(e.category(), ErrorCategory::Invalid, "{e}");
    }
    assert_eq!(
        farm.get_store("fast").await.expect("get"),
        Some(def("fast", "/srv/fast"))
    );

    let mut v = vdisk("golden");
    v.store = "nosuch".into();
    let e = farm.create_vdisk(v.clone()).await.unwrap_err();
    assert!(
        matches!(
            e,
            FarmError::NotFound {
                kind: RecordKind::Store,
                ..
            }
        ),
        "{e}"
    );
    v.store = "fast".into();
    farm.create_vdisk(v).await.expect("a vDisk in a store");
    let e = farm.delete_store("fast").await.unwrap_err();
    assert!(matches!(e, FarmError::InUse(_)), "{e}");
    assert!(e.to_string().contains("golden"), "{e}");
    farm.delete_vdisk("golden").await.expect("delete the vDisk");

    // A vDisk made in the store after the delete looked: the delete's
    // compare fails, and the retry sees the vDisk.
    let racing = FarmStore::new(Interfere::wrap(farm.backend().clone(), 1, |inner| {
        async move {
            let mut v = vdisk("late");
            v.store = "fast".into();
            FarmStore::new(inner)
                .create_vdisk(v)
                .await
                .expect("create during the delete");
        }
        .boxed()
    }));
    let e = racing.delete_store("fast").await.unwrap_err();
    assert!(matches!(e, FarmError::InUse(_)), "{e}");
    assert!(e.to_string().contains("late"), "{e}");
    farm.delete_vdisk("late").await.expect("delete");
    farm.delete_store("fast")
        .await
        .expect("an empty store goes");
    assert_eq!(farm.get_store("fast").await.expect("get"), None);
    let e = farm.delete_store("fast").await.unwrap_err();
    assert!(matches!(e, FarmError::NotFound { .. }), "{e}");
}
