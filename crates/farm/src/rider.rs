//! An audit entry that rides on the change it records.
//!
//! A change made through the API is recorded in the audit trail before it is
//! answered. Written on its own, the entry costs a commit of the farm state
//! per change: a third commit for a device add, which takes two. Instead,
//! the request runs inside [`AuditRider::carry`], and the first transaction
//! it commits that changes something also puts the entry: the change and its
//! record land together or not at all, at no commit of their own.
//!
//! The entry is written as the request expects to end (its route's success
//! status, result `ok`). When the request ends otherwise (a later step
//! failed, or the commit's outcome is unknown because the farm state did not
//! answer), the caller [settles](crate::FarmStore::settle_audit) the entry
//! with what happened, under the same key. A request that commits nothing
//! leaves its entry to be written afterwards, as before.
//!
//! The rider is a tokio task-local: only transactions committed by the
//! request's own task carry it, never those of tasks it spawns.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use futures::future::BoxFuture;
use vstream_model::AuditEntry;

use crate::backend::{Backend, Compare, Op, Versioned};
use crate::FarmError;

/// The most operations a transaction may already hold to take a rider
/// along: etcd's default limit is 128 a transaction.
const MAX_OPS_WITH_RIDER: usize = 127;

tokio::task_local! {
    static RIDER: Arc<AuditRider>;
}

/// Where a rider's entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ridden {
    /// No commit carried it: nothing of it is in the farm state.
    No,
    /// A commit carried it: the entry is in the farm state, as drafted.
    Yes,
    /// A commit that carried it failed without saying whether it landed.
    Unknown,
}

/// An audit entry waiting for its request's first change (see the module
/// docs).
#[derive(Debug)]
pub struct AuditRider {
    key: String,
    value: Vec<u8>,
    state: AtomicU8,
}

impl AuditRider {
    /// A rider for `entry` (its `seq` tells apart the entries of one server
    /// in one millisecond, as for [`crate::FarmStore::append_audit`]).
    pub fn new(entry: &AuditEntry, seq: u64) -> Result<Arc<AuditRider>, FarmError> {
        let key = crate::access::audit_key(entry, seq);
        let value = crate::encode(&key, entry)?;
        Ok(Arc::new(AuditRider {
            key,
            value,
            state: AtomicU8::new(Ridden::No as u8),
        }))
    }

    /// Runs `fut` with this rider: its first committed change carries the
    /// entry.
    pub async fn carry<F: std::future::Future>(self: &Arc<Self>, fut: F) -> F::Output {
        RIDER.scope(self.clone(), fut).await
    }

    /// Whether a commit carried the entry.
    pub fn ridden(&self) -> Ridden {
        match self.state.load(Ordering::Acquire) {
            0 => Ridden::No,
            1 => Ridden::Yes,
            _ => Ridden::Unknown,
        }
    }

    fn mark(&self, to: Ridden) {
        // Once landed, it stays landed.
        let _ = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (s != Ridden::Yes as u8).then_some(to as u8)
            });
    }
}

/// The backend under a [`crate::FarmStore`]: every transaction of a task
/// with a rider that has not landed yet carries it.
pub(crate) struct Riding(pub(crate) Arc<dyn Backend>);

impl Backend for Riding {
    fn get(&self, key: &str) -> BoxFuture<'_, Result<Option<Versioned>, FarmError>> {
        self.0.get(key)
    }

    fn list(&self, prefix: &str) -> BoxFuture<'_, Result<Vec<(String, Versioned)>, FarmError>> {
        self.0.list(prefix)
    }

    fn txn(
        &self,
        compares: Vec<Compare>,
        mut ops: Vec<Op>,
    ) -> BoxFuture<'_, Result<bool, FarmError>> {
        let rider = RIDER
            .try_with(Arc::clone)
            .ok()
            .filter(|r| r.ridden() != Ridden::Yes)
            .filter(|_| !ops.is_empty() && ops.len() < MAX_OPS_WITH_RIDER)
            .filter(|r| ops.iter().all(|op| op.key() != r.key));
        let Some(rider) = rider else {
            return self.0.txn(compares, ops);
        };
        ops.push(Op::put(&rider.key, rider.value.clone()));
        Box::pin(async move {
            match self.0.txn(compares, ops).await {
                Ok(true) => {
                    rider.mark(Ridden::Yes);
                    Ok(true)
                }
                Ok(false) => Ok(false),
                Err(e) => {
                    rider.mark(Ridden::Unknown);
                    Err(e)
                }
            }
        })
    }

    fn revision(&self) -> BoxFuture<'_, Result<u64, FarmError>> {
        self.0.revision()
    }

    fn compact(&self, revision: u64) -> BoxFuture<'_, Result<(), FarmError>> {
        self.0.compact(revision)
    }

    fn put_ephemeral(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: std::time::Duration,
    ) -> BoxFuture<'_, Result<(), FarmError>> {
        self.0.put_ephemeral(key, value, ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{a_device, a_vdisk};
    use crate::FarmStore;
    use vstream_model::Role;

    fn draft(at_ms: u64) -> AuditEntry {
        AuditEntry {
            at_ms,
            who: "admin".into(),
            role: Some(Role::Admin),
            from: "10.0.0.9".into(),
            server: "s1".into(),
            method: "POST".into(),
            path: "/api/v1/devices".into(),
            object: "device/pc1".into(),
            summary: "name=pc1".into(),
            status: 201,
            result: "ok".into(),
        }
    }

    /// Every key under `prefix` with its revision.
    async fn revisions(farm: &FarmStore, prefix: &str) -> Vec<(String, u64)> {
        let all = farm.backend().list(prefix).await.unwrap();
        all.into_iter().map(|(k, v)| (k, v.revision)).collect()
    }

    #[tokio::test]
    async fn the_entry_lands_in_the_commit_of_the_change() {
        let dir = tempfile::tempdir().unwrap();
        let farm = crate::tests::farm_with_base(dir.path()).await;
        let before = revisions(&farm, "").await.iter().map(|r| r.1).max();
        let rider = AuditRider::new(&draft(1_000), 7).unwrap();
        assert_eq!(rider.ridden(), Ridden::No);
        rider
            .carry(async {
                farm.create_device(a_device("pc1", "52:54:00:00:00:01"))
                    .await
                    .unwrap();
                // A second change of the same request: the entry is not
                // written twice.
                farm.create_device(a_device("pc2", "52:54:00:00:00:02"))
                    .await
                    .unwrap();
            })
            .await;
        assert_eq!(rider.ridden(), Ridden::Yes);
        let trail = revisions(&farm, "audit/").await;
        assert_eq!(trail.len(), 1, "{trail:?}");
        let device = revisions(&farm, "devices/pc1").await;
        assert_eq!(
            trail[0].1, device[0].1,
            "the entry and the device in one commit"
        );
        // Two changes, two commits: the entry cost none.
        let after = revisions(&farm, "").await.iter().map(|r| r.1).max();
        assert_eq!(after.unwrap() - before.unwrap(), 2);
        assert_eq!(farm.audit().await.unwrap(), vec![draft(1_000)]);
    }

    #[tokio::test]
    async fn a_refused_change_carries_nothing_and_settling_rewrites() {
        let dir = tempfile::tempdir().unwrap();
        let farm = FarmStore::embedded(dir.path().join("farm.redb")).unwrap();
        let rider = AuditRider::new(&draft(1_000), 0).unwrap();
        let refused = rider
            .carry(farm.create_device(a_device("pc1", "52:54:00:00:00:01")))
            .await;
        assert!(refused.is_err(), "no vDisk base");
        assert_eq!(rider.ridden(), Ridden::No);
        assert!(farm.audit().await.unwrap().is_empty());

        // Landed, then settled with how the request really ended.
        farm.create_vdisk(a_vdisk("base")).await.unwrap();
        let rider = AuditRider::new(&draft(2_000), 0).unwrap();
        rider
            .carry(farm.create_device(a_device("pc1", "52:54:00:00:00:01")))
            .await
            .unwrap();
        assert_eq!(rider.ridden(), Ridden::Yes);
        let mut ended = draft(2_000);
        ended.status = 500;
        ended.result = "a later step failed".into();
        farm.settle_audit(&ended, 0).await.unwrap();
        assert_eq!(farm.audit().await.unwrap(), vec![ended]);
    }

    #[tokio::test]
    async fn tasks_the_request_spawns_carry_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let farm = FarmStore::embedded(dir.path().join("farm.redb")).unwrap();
        let rider = AuditRider::new(&draft(1_000), 0).unwrap();
        let f = farm.clone();
        rider
            .carry(async move {
                tokio::spawn(async move { f.create_vdisk(a_vdisk("base")).await })
                    .await
                    .unwrap()
            })
            .await
            .unwrap();
        assert_eq!(rider.ridden(), Ridden::No);
        assert!(farm.audit().await.unwrap().is_empty());
        // Outside any request, nothing rides either.
        farm.create_device(a_device("pc1", "52:54:00:00:00:01"))
            .await
            .unwrap();
        assert!(farm.audit().await.unwrap().is_empty());
    }
}
