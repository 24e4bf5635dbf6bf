//! The storage adapter trait the farm store sits on.
//!
//! It is shaped after etcd's v3 API so an etcd adapter maps onto it one to one:
//!
//! * keys are strings, values are bytes;
//! * the store has one global revision counter. Every successful [`Backend::txn`]
//!   that changes something (a put, or a delete of a key that exists) increments
//!   it by exactly one, and every key that transaction puts gets the new value as
//!   its `mod_revision` ([`Versioned::revision`]). Revisions never go backwards,
//!   not even across restarts. An absent key has revision 0;
//! * read-modify-write is optimistic: read keys with their revisions, then
//!   [`Backend::txn`] with [`Compare`]s on those revisions and the [`Op`]s to
//!   apply. Either every compare holds and every op is applied atomically, or
//!   nothing happens and the txn answers `Ok(false)`. There are no locks.
//!
//! Adapters must pass the test suite in `vstream_farm::contract` (feature
//! `contract`).

use futures::future::BoxFuture;

use crate::FarmError;

/// A value with the revision of the transaction that last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    /// The key's `mod_revision`; never 0 for a key that exists.
    pub revision: u64,
}

/// A condition a [`Backend::txn`] checks before applying its ops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's `mod_revision` equals `revision`; 0 means the key must be absent.
    Revision { key: String, revision: u64 },
}

impl Compare {
    /// The key was last written at `revision` (0: the key is absent).
    pub fn revision(key: impl Into<String>, revision: u64) -> Self {
        Compare::Revision {
            key: key.into(),
            revision,
        }
    }

    /// The key is absent.
    pub fn absent(key: impl Into<String>) -> Self {
        Compare::revision(key, 0)
    }

    /// The key the condition is about.
    pub fn key(&self) -> &str {
        match self {
            Compare::Revision { key, .. } => key,
        }
    }
}

/// A change a [`Backend::txn`] applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Sets the key's value (creating it if absent).
    Put { key: String, value: Vec<u8> },
    /// Removes the key; removing an absent key is not an error and changes nothing.
    Delete { key: String },
}

impl Op {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
        }
    }

    pub fn delete(key: impl Into<String>) -> Self {
        Op::Delete { key: key.into() }
    }

    /// The key the op changes.
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
}

/// A key-value store with etcd's revision semantics (see the module docs).
pub trait Backend: Send + Sync + 'static {
    /// The key's value and revision, or `None` if it is absent.
    fn get(&self, key: &str) -> BoxFuture<'_, Result<Option<Versioned>, FarmError>>;

    /// Every key starting with `prefix` (all keys for `""`), in ascending byte
    /// order of the key, from one consistent snapshot.
    fn list(&self, prefix: &str) -> BoxFuture<'_, Result<Vec<(String, Versioned)>, FarmError>>;

    /// Applies `ops` atomically, in order, if every compare holds; `Ok(false)`
    /// (and no change at all) if one did not. `ops` must not name a key twice
    /// (etcd refuses that; adapters answer [`FarmError::Invalid`]). With no ops
    /// it only evaluates the compares.
    fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> BoxFuture<'_, Result<bool, FarmError>>;

    /// Puts `key` so that it disappears about `ttl` after this process stops
    /// calling (etcd: under a lease this adapter keeps alive, one per
    /// adapter). Calling again within `ttl` keeps it. The embedded store,
    /// which serves one server, keeps it until it is overwritten or deleted;
    /// readers judge freshness by what the value says.
    fn put_ephemeral(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: std::time::Duration,
    ) -> BoxFuture<'_, Result<(), FarmError>>;

    /// The store's revision now: every write moves it on.
    fn revision(&self) -> BoxFuture<'_, Result<u64, FarmError>>;

    /// Forgets the history before `revision`: the values keys had before it
    /// and the keys deleted before it. Every key's current value stays. A
    /// store that keeps history (etcd) keeps it until told, and grows with
    /// every write until then; one that keeps none does nothing. A revision
    /// already forgotten is no error: every server of a farm compacts.
    fn compact(&self, revision: u64) -> BoxFuture<'_, Result<(), FarmError>>;
}

/// Checks that `ops` name every key at most once.
pub(crate) fn check_distinct_keys(ops: &[Op]) -> Result<(), FarmError> {
    let mut seen = std::collections::HashSet::new();
    for op in ops {
        if !seen.insert(op.key()) {
            return Err(FarmError::Invalid(format!(
                "a transaction names key {} more than once",
                op.key()
            )));
        }
    }
    Ok(())
}
