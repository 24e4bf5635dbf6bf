//! The embedded [`Backend`]: one `redb` database file, for a single-server farm.
//!
//! Table `kv` maps each key to `(mod_revision, value)`; table `meta` holds the
//! global revision counter under `revision`, so revisions keep increasing across
//! restarts. A [`Backend::txn`] runs as one redb write transaction (redb runs
//! those one at a time), checking the compares and applying the ops inside it,
//! and commits with redb's default, durable setting. Each call runs on tokio's
//! blocking pool, so the store must be used from within a tokio runtime.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::FutureExt;
use redb::{Database, ReadableTable, TableDefinition};

use crate::backend::{check_distinct_keys, Backend, Compare, Op, Versioned};
use crate::FarmError;

const KV: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";

/// How long a reopen waits for the calls still holding the failed database.
const REOPEN_WAIT: Duration = Duration::from_secs(2);

/// The redb adapter. Cheap to clone; clones share the open database.
///
/// After an I/O error (a full disk, say) redb refuses every later call with
/// "Previous I/O error occurred" until the database is closed and opened
/// again. So the call that meets one closes the database, and it is opened
/// again at once, or by the next call if that fails too (space is still
/// short). Opening runs redb's repair, which keeps exactly the transactions
/// whose commit was made durable: a call that failed was not committed.
#[derive(Clone)]
pub struct Embedded {
    shared: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    slot: Mutex<Slot>,
}

/// The database in use, or (after an I/O error) the one being closed.
struct Slot {
    open: Option<Arc<Database>>,
    closing: Weak<Database>,
}

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedded")
            .field("path", &self.shared.path)
            .finish_non_exhaustive()
    }
}

thread_local! {
    /// Set when a redb call on this thread failed with an I/O error, so the
    /// database has to be opened again.
    static IO_FAILED: Cell<bool> = const { Cell::new(false) };
}

/// Attaches "what we were doing with which file" to any redb error, and
/// notes an I/O error (see [`IO_FAILED`]).
trait Context<T> {
    fn ctx(self, path: &Path, doing: impl std::fmt::Display) -> Result<T, FarmError>;
}

impl<T, E: Into<redb::Error>> Context<T> for Result<T, E> {
    fn ctx(self, path: &Path, doing: impl std::fmt::Display) -> Result<T, FarmError> {
        self.map_err(|e| {
            let e: redb::Error = e.into();
            let reason = match &e {
                redb::Error::Io(io) => {
                    IO_FAILED.with(|f| f.set(true));
                    if matches!(
                        io.kind(),
                        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
                    ) {
                        "no space left on the data folder's file system (ENOSPC); \
                         the farm database takes writes again once space is freed"
                            .to_owned()
                    } else {
                        io.to_string()
                    }
                }
                redb::Error::PreviousIo => {
                    IO_FAILED.with(|f| f.set(true));
                    "an earlier I/O error closed the database; it is opened again".to_owned()
                }
                other => other.to_string(),
            };
            FarmError::backend(format_args!("{doing} in {}", path.display()), reason)
        })
    }
}

/// Opens (or creates) the database at `path` and its tables.
fn open_database(path: &Path, create: bool) -> Result<Database, FarmError> {
    let db = if create {
        Database::create(path).ctx(path, "opening the database")?
    } else {
        Database::open(path).ctx(path, "opening the database again")?
    };
    // Create the tables up front so readers never find them missing.
    let tx = db.begin_write().ctx(path, "starting a transaction")?;
    {
        tx.open_table(KV).ctx(path, "opening table kv")?;
        tx.open_table(META).ctx(path, "opening table meta")?;
    }
    tx.commit().ctx(path, "initialising the database")?;
    Ok(db)
}

impl Shared {
    /// The open database, opening it again if an I/O error closed it.
    fn database(&self) -> Result<Arc<Database>, FarmError> {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(db) = &slot.open {
            return Ok(db.clone());
        }
        // redb allows one `Database` per file in a process: the calls that
        // still hold the failed one end soon (it fails them at once).
        let deadline = Instant::now() + REOPEN_WAIT;
        while slot.closing.strong_count() > 0 {
            if Instant::now() > deadline {
                return Err(FarmError::backend(
                    format!("reopening {} after an I/O error", self.path.display()),
                    "calls still hold the failed database; try again",
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let was = IO_FAILED.with(|f| f.replace(false));
        let db = open_database(&self.path, false);
        IO_FAILED.with(|f| f.set(was));
        let db = Arc::new(db?);
        tracing::info!(path = %self.path.display(), "farm database opened again after an I/O error");
        slot.open = Some(db.clone());
        Ok(db)
    }

    /// Closes `db` after an I/O error, unless it was replaced already.
    fn close(&self, db: &Arc<Database>) {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        if slot.open.as_ref().is_some_and(|d| Arc::ptr_eq(d, db)) {
            tracing::warn!(path = %self.path.display(), "an I/O error closed the farm database; it is opened again");
            slot.open = None;
            slot.closing = Arc::downgrade(db);
        }
    }

    /// Runs `f` on the database, closing it (and trying to open it again)
    /// if `f` meets an I/O error.
    fn run<T>(
        &self,
        f: impl FnOnce(&Database, &Path) -> Result<T, FarmError>,
    ) -> Result<T, FarmError> {
        let db = self.database()?;
        IO_FAILED.with(|f| f.set(false));
        let result = f(&db, &self.path);
        if IO_FAILED.with(|f| f.replace(false)) {
            self.close(&db);
            drop(db);
            // Opened again now if it can be; if not, the next call tries.
            if let Err(e) = self.database() {
                tracing::warn!(error = %e, "the farm database cannot be opened again yet");
            }
        }
        result
    }
}

impl Embedded {
    /// Opens the database file at `path`, creating it (and its parent
    /// directories) if it does not exist. Fails if another process, or another
    /// `Embedded` in this one, has it open.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, FarmError> {
        let path = path.as_ref().to_path_buf();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| FarmError::backend(format!("creating {}", parent.display()), e))?;
        }
        let db = open_database(&path, true)?;
        IO_FAILED.with(|f| f.set(false));
        Ok(Embedded {
            shared: Arc::new(Shared {
                path,
                slot: Mutex::new(Slot {
                    open: Some(Arc::new(db)),
                    closing: Weak::new(),
                }),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Runs `f` on the blocking pool.
    fn blocking<T, F>(&self, f: F) -> BoxFuture<'static, Result<T, FarmError>>
    where
        T: Send + 'static,
        F: FnOnce(&Database, &Path) -> Result<T, FarmError> + Send + 'static,
    {
        let shared = self.shared.clone();
        async move {
            let path = shared.path.clone();
            tokio::task::spawn_blocking(move || shared.run(f))
                .await
                .map_err(|e| {
                    FarmError::backend(
                        format_args!("running a database task in {}", path.display()),
                        e,
                    )
                })?
        }
        .boxed()
    }
}

fn get_sync(db: &Database, path: &Path, key: &str) -> Result<Option<Versioned>, FarmError> {
    let tx = db.begin_read().ctx(path, "starting a read")?;
    let table = tx.open_table(KV).ctx(path, "opening table kv")?;
    let found = table
        .get(key)
        .ctx(path, format_args!("reading key {key}"))?
        .map(|guard| {
            let (revision, value) = guard.value();
            Versioned {
                value: value.to_vec(),
                revision,
            }
        });
    Ok(found)
}

fn list_sync(
    db: &Database,
    path: &Path,
    prefix: &str,
) -> Result<Vec<(String, Versioned)>, FarmError> {
    let tx = db.begin_read().ctx(path, "starting a read")?;
    let table = tx.open_table(KV).ctx(path, "opening table kv")?;
    let mut out = Vec::new();
    let range = table
        .range::<&str>(prefix..)
        .ctx(path, format_args!("listing keys under {prefix:?}"))?;
    for entry in range {
        let (key, value) = entry.ctx(path, format_args!("listing keys under {prefix:?}"))?;
        let key = key.value();
        if !key.starts_with(prefix) {
            break;
        }
        let (revision, value) = value.value();
        out.push((
            key.to_string(),
            Versioned {
                value: value.to_vec(),
                revision,
            },
        ));
    }
    Ok(out)
}

fn txn_sync(
    db: &Database,
    path: &Path,
    compares: &[Compare],
    ops: &[Op],
) -> Result<bool, FarmError> {
    check_distinct_keys(ops)?;
    let tx = db.begin_write().ctx(path, "starting a transaction")?;
    let changed = {
        let mut kv = tx.open_table(KV).ctx(path, "opening table kv")?;
        for compare in compares {
            let Compare::Revision { key, revision } = compare;
            let current = kv
                .get(key.as_str())
                .ctx(path, format_args!("reading key {key}"))?
                .map_or(0, |guard| guard.value().0);
            if current != *revision {
                drop(kv);
                tx.abort().ctx(path, "abandoning a transaction")?;
                return Ok(false);
            }
        }
        if ops.is_empty() {
            false
        } else {
            let mut meta = tx.open_table(META).ctx(path, "opening table meta")?;
            let current = meta
                .get(REVISION)
                .ctx(path, "reading the revision counter")?
                .map_or(0, |guard| guard.value());
            let next = current.checked_add(1).ok_or_else(|| {
                FarmError::backend(
                    format!("advancing the revision in {}", path.display()),
                    "the counter is exhausted",
                )
            })?;
            let mut changed = false;
            for op in ops {
                match op {
                    Op::Put { key, value } => {
                        kv.insert(key.as_str(), (next, value.as_slice()))
                            .ctx(path, format_args!("writing key {key}"))?;
                        changed = true;
                    }
                    Op::Delete { key } => {
                        let removed = kv
                            .remove(key.as_str())
                            .ctx(path, format_args!("deleting key {key}"))?;
                        changed |= removed.is_some();
                    }
                }
            }
            if changed {
                meta.insert(REVISION, next)
                    .ctx(path, "writing the revision counter")?;
            }
            changed
        }
    };
    if changed {
        tx.commit().ctx(path, "committing a transaction")?;
    } else {
        tx.abort().ctx(path, "abandoning a transaction")?;
    }
    Ok(true)
}

impl Backend for Embedded {
    fn get(&self, key: &str) -> BoxFuture<'_, Result<Option<Versioned>, FarmError>> {
        let key = key.to_string();
        self.blocking(move |db, path| get_sync(db, path, &key))
    }

    fn list(&self, prefix: &str) -> BoxFuture<'_, Result<Vec<(String, Versioned)>, FarmError>> {
        let prefix = prefix.to_string();
        self.blocking(move |db, path| list_sync(db, path, &prefix))
    }

    fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> BoxFuture<'_, Result<bool, FarmError>> {
        self.blocking(move |db, path| txn_sync(db, path, &compares, &ops))
    }

    fn put_ephemeral(
        &self,
        key: &str,
        value: Vec<u8>,
        _ttl: std::time::Duration,
    ) -> BoxFuture<'_, Result<(), FarmError>> {
        let ops = vec![Op::put(key, value)];
        self.blocking(move |db, path| txn_sync(db, path, &[], &ops).map(|_| ()))
    }

    fn revision(&self) -> BoxFuture<'_, Result<u64, FarmError>> {
        self.blocking(revision_sync)
    }

    /// redb keeps only the current value of each key: there is no history.
    fn compact(&self, _revision: u64) -> BoxFuture<'_, Result<(), FarmError>> {
        async { Ok(()) }.boxed()
    }
}

fn revision_sync(db: &Database, path: &Path) -> Result<u64, FarmError> {
    let tx = db.begin_read().ctx(path, "starting a read")?;
    let meta = tx.open_table(META).ctx(path, "opening table meta")?;
    let revision = meta
        .get(REVISION)
        .ctx(path, "reading the revision counter")?
        .map_or(0, |guard| guard.value());
    Ok(revision)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract;
    use crate::FarmStore;
    use vstream_model::{Device, Mode, VDisk};

    fn fresh() -> (tempfile::TempDir, Arc<dyn Backend>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = Embedded::open(dir.path().join("farm.redb")).expect("open");
        (dir, Arc::new(backend))
    }

    macro_rules! contract_cases {
        ($($case:ident),* $(,)?) => {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let (_dir, backend) = fresh();
                    contract::$case(backend).await;
                }
            )*
        };
    }

    crate::contract_case_names!(contract_cases);

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn whole_contract_suite() {
        let mut dirs = Vec::new();
        contract::contract_suite(|| {
            let (dir, backend) = fresh();
            dirs.push(dir);
            async move { backend }
        })
        .await;
        assert_eq!(dirs.len(), contract::CASES);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn data_survives_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nested/dir/farm.redb");
        let vdisk = VDisk {
            mode: Mode::Standard,
            cache_limit: Some(1 << 30),
            ..VDisk::new("base", 8 << 30, 1_700_000_000)
        };
        let device = Device::new("pc1", "aa:bb:cc:00:11:22", "base", 1_700_000_001);
        let last_revision = {
            let store = FarmStore::embedded(&path).expect("open");
            store
                .create_vdisk(vdisk.clone())
                .await
                .expect("create vdisk");
            store
                .create_device(device.clone())
                .await
                .expect("create device");
            let all = store.backend().list("").await.expect("list");
            all.iter().map(|(_, v)| v.revision).max().expect("keys")
        };

        // Dropped: the file is closed, so it can be opened again.
        let store = FarmStore::embedded(&path).expect("reopen");
        assert_eq!(store.get_vdisk("base").await.expect("get"), Some(vdisk));
        assert_eq!(
            store.get_device("pc1").await.expect("get"),
            Some(device.clone())
        );
        assert_eq!(
            store.find_device("AA-BB-CC-00-11-22").await.expect("find"),
            Some(device)
        );
        // The revision counter persisted too: new writes get later revisions.
        let backend = store.backend();
        assert!(backend
            .txn(vec![], vec![Op::put("after/reopen", b"x".to_vec())])
            .await
            .expect("txn"));
        let after = backend
            .get("after/reopen")
            .await
            .expect("get")
            .expect("present");
        assert_eq!(after.revision, last_revision + 1);
    }

    #[tokio::test]
    async fn opening_twice_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("farm.redb");
        let _first = Embedded::open(&path).expect("open");
        let err = Embedded::open(&path).expect_err("second open must fail");
        assert!(matches!(err, FarmError::Backend(_)), "{err:?}");
        assert!(err.to_string().contains("farm.redb"), "{err}");
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_database_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("farm.redb");
        std::fs::write(&path, vec![0x5a; 64 * 1024]).expect("write");
        let err = Embedded::open(&path).expect_err("garbage must not open");
        assert!(matches!(err, FarmError::Backend(_)), "{err:?}");
        assert!(err.to_string().contains("farm.redb"), "{err}");
    }

    #[tokio::test]
    async fn duplicate_keys_in_one_txn_are_refused() {
        let (_dir, backend) = fresh();
        let err = backend
            .txn(vec![], vec![Op::put("k", b"1".to_vec()), Op::delete("k")])
            .await
            .expect_err("duplicate key");
        assert!(matches!(err, FarmError::Invalid(_)), "{err:?}");
        assert_eq!(backend.get("k").await.expect("get"), None);
    }
}
