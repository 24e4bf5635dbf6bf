//! What a farm must prove before a server deletes anything.
//!
//! * `identity` → [`FarmIdentity`]: the farm's identity, made once by the
//!   first server that starts against an empty farm state. A data folder
//!   records the identity of the farm it belongs to (`DATA/farm-id`), so a
//!   server started against another farm (a moved `farm.redb`, a mistyped
//!   `--farm`, a new or restored etcd) is stopped before it acts on a view
//!   that does not know its vDisks.
//! * `tombstones/NAME` → [`Tombstone`]: written by `vdisk delete` in the same
//!   transaction that removes the vDisk's record and catalog. It is the one
//!   proof that lets a server remove its copy of a vDisk the farm does not
//!   list: a vDisk is named by its name and the time it was made
//!   (`created_unix`), so a later vDisk of the same name is never mistaken
//!   for a deleted one.

use serde::{Deserialize, Serialize};

use crate::{checked_name, decode, encode, gave_up, Compare, FarmError, FarmStore, Op};
use crate::{RecordKind, MAX_ATTEMPTS};

pub(crate) const IDENTITY: &str = "identity";
pub(crate) const TOMBSTONES: &str = "tombstones/";

/// Most deleted incarnations a tombstone remembers per vDisk name.
const TOMBSTONE_DEPTH: usize = 32;

pub(crate) fn tombstone_key(name: &str) -> String {
    format!("{TOMBSTONES}{name}")
}

/// A farm's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FarmIdentity {
    /// 32 hex digits, random.
    pub id: String,
    pub created_unix: u64,
}

impl FarmIdentity {
    /// A new random identity.
    pub fn fresh(created_unix: u64) -> FarmIdentity {
        let id = (0..16)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        FarmIdentity { id, created_unix }
    }
}

/// The proof that vDisks of one name were deleted from the farm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub vdisk: String,
    /// The `created_unix` of every deleted vDisk of this name (the newest
    /// 32, `TOMBSTONE_DEPTH`).
    pub created: Vec<u64>,
    pub deleted_unix: u64,
}

impl Tombstone {
    /// True if the vDisk of this name made at `created_unix` was deleted.
    pub fn buries(&self, created_unix: u64) -> bool {
        self.created.contains(&created_unix)
    }

    /// This tombstone (or a new one) with `created_unix` added.
    pub(crate) fn with(old: Option<Tombstone>, vdisk: &str, created_unix: u64, now: u64) -> Self {
        let mut t = old.unwrap_or_else(|| Tombstone {
            vdisk: vdisk.to_owned(),
            created: Vec::new(),
            deleted_unix: now,
        });
        t.created.retain(|c| *c != created_unix);
        t.created.push(created_unix);
        let excess = t.created.len().saturating_sub(TOMBSTONE_DEPTH);
        t.created.drain(..excess);
        t.deleted_unix = now;
        t
    }
}

impl FarmStore {
    /// The farm's identity, if it has one yet.
    pub async fn identity(&self) -> Result<Option<FarmIdentity>, FarmError> {
        self.get_record(IDENTITY).await
    }

    /// Gives the farm `fresh` as its identity if it has none; answers the
    /// farm's identity (`fresh`, or the one another server made first).
    pub async fn claim_identity(&self, fresh: FarmIdentity) -> Result<FarmIdentity, FarmError> {
        for _ in 0..MAX_ATTEMPTS {
            if let Some(existing) = self.identity().await? {
                return Ok(existing);
            }
            let ok = self
                .backend
                .txn(
                    vec![Compare::absent(IDENTITY)],
                    vec![Op::put(IDENTITY, encode(IDENTITY, &fresh)?)],
                )
                .await?;
            if ok {
                return Ok(fresh);
            }
        }
        Err(gave_up("claiming the farm's identity"))
    }

    /// The tombstone of vDisk name `name`, if a vDisk of that name was deleted.
    pub async fn tombstone(&self, name: &str) -> Result<Option<Tombstone>, FarmError> {
        checked_name(RecordKind::VDisk, name)?;
        self.get_record(&tombstone_key(name)).await
    }

    /// Copies every lasting record of `from` into this farm, which must be
    /// new (no identity; records a copy cut short left are overwritten):
    /// moving a one-server farm's embedded state into etcd. Live records
    /// (`live/`) are not copied. Answers how many records were copied.
    pub async fn copy_from(&self, from: &FarmStore) -> Result<usize, FarmError> {
        if self.identity().await?.is_some() {
            return Err(FarmError::InUse(
                "the destination farm has an identity already: it is another farm; \
                 vstream copies a farm only into a new one"
                    .into(),
            ));
        }
        let records: Vec<(String, Vec<u8>)> = from
            .backend
            .list("")
            .await?
            .into_iter()
            .filter(|(k, _)| !k.starts_with(crate::servers::LIVE))
            .map(|(k, v)| (k, v.value))
            .collect();
        if records.is_empty() {
            return Ok(0);
        }
        // In batches (etcd takes at most 128 operations a transaction), the
        // identity last: until it is there, a server refuses this farm as
        // new, so a copy cut short is never taken for a farm.
        let identity = records.iter().position(|(k, _)| k == IDENTITY);
        let (last, rest): (Vec<_>, Vec<_>) = records
            .iter()
            .enumerate()
            .partition(|(i, _)| Some(*i) == identity);
        for batch in rest.chunks(64) {
            let ops = batch
                .iter()
                .map(|(_, (k, v))| Op::put(k, v.clone()))
                .collect();
            self.backend.txn(Vec::new(), ops).await?;
        }
        for (_, (k, v)) in last {
            if !self
                .backend
                .txn(vec![Compare::absent(k)], vec![Op::put(k, v.clone())])
                .await?
            {
                return Err(FarmError::Conflict(
                    "another server gave the destination farm an identity meanwhile".into(),
                ));
            }
        }
        Ok(records.len())
    }
}

/// The tombstone record to write when the vDisk made at `created_unix` is deleted.
pub(crate) fn bury(
    old: Option<&crate::Versioned>,
    name: &str,
    created_unix: u64,
    now: u64,
) -> Result<Op, FarmError> {
    let key = tombstone_key(name);
    let old: Option<Tombstone> = old.map(|v| decode(&key, &v.value)).transpose()?;
    let t = Tombstone::with(old, name, created_unix, now);
    Ok(Op::put(&key, encode(&key, &t)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tombstone_remembers_each_incarnation_and_forgets_the_oldest() {
        let mut t = Tombstone::with(None, "g", 10, 11);
        assert!(t.buries(10));
        assert!(!t.buries(12));
        for c in 100..(100 + TOMBSTONE_DEPTH as u64) {
            t = Tombstone::with(Some(t), "g", c, c);
        }
        assert_eq!(t.created.len(), TOMBSTONE_DEPTH);
        assert!(!t.buries(10), "the oldest is forgotten past the depth");
        assert!(t.buries(100 + TOMBSTONE_DEPTH as u64 - 1));
    }

    #[test]
    fn identities_differ() {
        let a = FarmIdentity::fresh(1);
        let b = FarmIdentity::fresh(1);
        assert_eq!(a.id.len(), 32);
        assert_ne!(a.id, b.id);
    }
}
