//! API tokens (`tokens/NAME` → [`ApiToken`]) and the audit trail
//! (`audit/MS-SERVER-SEQ` → [`AuditEntry`], in time order by key).

use vstream_model::{ApiToken, AuditEntry, DeviceEvent};

use crate::{checked_name, decode, encode, Compare, FarmError, FarmStore, Op, RecordKind};

const TOKENS: &str = "tokens/";
const AUDIT: &str = "audit/";
const EVENTS: &str = "events/";
/// The most audit entries [`FarmStore::append_audit_batch`] writes at once:
/// twice this (a compare and a put each) stays under etcd's default limit
/// of 128 operations a transaction.
pub const MAX_AUDIT_BATCH: usize = 60;

pub(crate) fn events_key(device: &str) -> String {
    format!("{EVENTS}{device}")
}

/// The key of `entry` in the trail: its time, its server and `seq`, which
/// tells apart one server's entries of one millisecond.
pub(crate) fn audit_key(entry: &AuditEntry, seq: u64) -> String {
    format!(
        "{AUDIT}{:016}-{}-{seq:08}",
        entry.at_ms,
        entry.server.replace('/', "_")
    )
}

fn token_key(name: &str) -> String {
    format!("{TOKENS}{name}")
}

impl FarmStore {
    /// Records a new token; refused if one of its name exists.
    pub async fn create_token(&self, token: &ApiToken) -> Result<(), FarmError> {
        checked_name(RecordKind::Token, &token.name)?;
        let key = token_key(&token.name);
        let ops = vec![Op::put(&key, encode(&key, token)?)];
        match self.backend.txn(vec![Compare::absent(&key)], ops).await? {
            true => Ok(()),
            false => Err(FarmError::AlreadyExists {
                kind: RecordKind::Token,
                name: token.name.clone(),
            }),
        }
    }

    /// Every token, sorted by name.
    pub async fn list_tokens(&self) -> Result<Vec<ApiToken>, FarmError> {
        self.list_records(TOKENS).await
    }

    /// Removes token `name`: it opens nothing from the next request on.
    pub async fn revoke_token(&self, name: &str) -> Result<ApiToken, FarmError> {
        checked_name(RecordKind::Token, name)?;
        let key = token_key(name);
        let Some(v) = self.backend.get(&key).await? else {
            return Err(FarmError::NotFound {
                kind: RecordKind::Token,
                name: name.to_owned(),
            });
        };
        let token: ApiToken = decode(&key, &v.value)?;
        let compare = vec![Compare::revision(&key, v.revision)];
        match self.backend.txn(compare, vec![Op::delete(&key)]).await? {
            true => Ok(token),
            false => Err(crate::gave_up(format_args!("revoking token {name}"))),
        }
    }

    /// Adds `event` to device `device`'s recent events, keeping the newest
    /// `keep`.
    pub async fn add_device_event(
        &self,
        device: &str,
        event: &DeviceEvent,
        keep: usize,
    ) -> Result<(), FarmError> {
        checked_name(RecordKind::Device, device)?;
        let key = events_key(device);
        let counts_key = crate::counts::counts_key(device);
        for _ in 0..crate::MAX_ATTEMPTS {
            let current = self.backend.get(&key).await?;
            let (mut events, compare) = match &current {
                Some(v) => (
                    decode::<Vec<DeviceEvent>>(&key, &v.value)?,
                    Compare::revision(&key, v.revision),
                ),
                None => (Vec::new(), Compare::absent(&key)),
            };
            // Its counts since it was added, kept with the recent events.
            let stored = self.backend.get(&counts_key).await?;
            let mut counts = crate::counts::counts_or_seed(
                &counts_key,
                stored.as_ref().map(|v| v.value.as_slice()),
                &events,
            )?;
            counts.add(event);
            let counts_compare = Compare::revision(&counts_key, stored.map_or(0, |v| v.revision));
            events.push(event.clone());
            events.sort_by_key(|e| e.at_ms);
            if events.len() > keep {
                events.drain(..events.len() - keep);
            }
            let ops = vec![
                Op::put(&key, encode(&key, &events)?),
                Op::put(&counts_key, encode(&counts_key, &counts)?),
            ];
            if self.backend.txn(vec![compare, counts_compare], ops).await? {
                return Ok(());
            }
        }
        Err(crate::gave_up(format_args!(
            "recording an event of {device}"
        )))
    }

    /// Device `device`'s recent events, oldest first.
    pub async fn device_events(&self, device: &str) -> Result<Vec<DeviceEvent>, FarmError> {
        checked_name(RecordKind::Device, device)?;
        let key = events_key(device);
        match self.backend.get(&key).await? {
            Some(v) => decode(&key, &v.value),
            None => Ok(Vec::new()),
        }
    }

    /// Appends `entry` to the audit trail; `seq` tells apart entries of one
    /// server in the same millisecond.
    pub async fn append_audit(&self, entry: &AuditEntry, seq: u64) -> Result<(), FarmError> {
        self.append_audit_batch(&[(entry.clone(), seq)]).await
    }

    /// Appends `entries` (each with its `seq`) to the audit trail in one
    /// transaction: one commit of the farm state for all of them. At most
    /// [`MAX_AUDIT_BATCH`] at a time (etcd caps the operations of a
    /// transaction).
    pub async fn append_audit_batch(&self, entries: &[(AuditEntry, u64)]) -> Result<(), FarmError> {
        if entries.len() > MAX_AUDIT_BATCH {
            return Err(FarmError::Invalid(format!(
                "{} audit entries in one transaction; at most {MAX_AUDIT_BATCH}",
                entries.len()
            )));
        }
        let mut compares = Vec::with_capacity(entries.len());
        let mut ops = Vec::with_capacity(entries.len());
        for (entry, seq) in entries {
            let key = audit_key(entry, *seq);
            ops.push(Op::put(&key, encode(&key, entry)?));
            compares.push(Compare::absent(&key));
        }
        match self.backend.txn(compares, ops).await? {
            true => Ok(()),
            false => Err(crate::gave_up(format_args!("appending to the audit trail"))),
        }
    }

    /// Writes `entry` (with its `seq`) over whatever its key holds: the
    /// final word on a [`crate::rider::AuditRider`] whose request ended
    /// otherwise than its entry said.
    pub async fn settle_audit(&self, entry: &AuditEntry, seq: u64) -> Result<(), FarmError> {
        let key = audit_key(entry, seq);
        self.backend
            .txn(Vec::new(), vec![Op::put(&key, encode(&key, entry)?)])
            .await?;
        Ok(())
    }

    /// The audit trail, oldest first.
    pub async fn audit(&self) -> Result<Vec<AuditEntry>, FarmError> {
        self.list_records(AUDIT).await
    }

    /// Removes the audit entries from before `cutoff_ms`; how many went.
    pub async fn prune_audit(&self, cutoff_ms: u64) -> Result<usize, FarmError> {
        let old: Vec<String> = self
            .backend
            .list(AUDIT)
            .await?
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| {
                k[AUDIT.len()..]
                    .split('-')
                    .next()
                    .and_then(|ms| ms.parse::<u64>().ok())
                    .is_some_and(|ms| ms < cutoff_ms)
            })
            .collect();
        for chunk in old.chunks(64) {
            let ops = chunk.iter().map(Op::delete).collect();
            self.backend.txn(Vec::new(), ops).await?;
        }
        Ok(old.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vstream_model::Role;

    fn entry(at_ms: u64, server: &str) -> AuditEntry {
        AuditEntry {
            at_ms,
            who: "admin".into(),
            role: Some(Role::Admin),
            from: "10.0.0.9".into(),
            server: server.into(),
            method: "POST".into(),
            path: "/api/v1/devices".into(),
            object: "device/pc1".into(),
            summary: String::new(),
            status: 201,
            result: "ok".into(),
        }
    }

    #[tokio::test]
    async fn tokens_are_made_once_and_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let farm = FarmStore::embedded(dir.path().join("farm.redb")).unwrap();
        let t = ApiToken {
            name: "ops".into(),
            sha256: "ab".repeat(32),
            role: Role::Operator,
            created_unix: 1,
            expires_unix: None,
            created_by: "admin".into(),
        };
        farm.create_token(&t).await.unwrap();
        assert!(matches!(
            farm.create_token(&t).await,
            Err(FarmError::AlreadyExists { .. })
        ));
        assert_eq!(farm.list_tokens().await.unwrap(), vec![t.clone()]);
        assert_eq!(farm.revoke_token("ops").await.unwrap(), t);
        assert!(farm.list_tokens().await.unwrap().is_empty());
        assert!(matches!(
            farm.revoke_token("ops").await,
            Err(FarmError::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn a_device_keeps_its_newest_events() {
        let dir = tempfile::tempdir().unwrap();
        let farm = FarmStore::embedded(dir.path().join("farm.redb")).unwrap();
        for at_ms in [5, 1, 3, 4, 2] {
            let e = DeviceEvent {
                at_ms,
                kind: vstream_model::EventKind::Connect,
                server: "s1".into(),
                detail: String::new(),
            };
            farm.add_device_event("pc1", &e, 3).await.unwrap();
        }
        let at: Vec<u64> = farm
            .device_events("pc1")
            .await
            .unwrap()
            .iter()
            .map(|e| e.at_ms)
            .collect();
        assert_eq!(at, vec![3, 4, 5]);
        assert!(farm.device_events("pc2").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_trail_keeps_time_order_and_prunes_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let farm = FarmStore::embedded(dir.path().join("farm.redb")).unwrap();
        farm.append_audit(&entry(3_000, "s2"), 0).await.unwrap();
        farm.append_audit(&entry(1_000, "s1"), 0).await.unwrap();
        farm.append_audit(&entry(2_000, "s1"), 0).await.unwrap();
        farm.append_audit(&entry(2_000, "s1"), 1).await.unwrap();
        let times = |trail: Vec<AuditEntry>| trail.iter().map(|e| e.at_ms).collect::<Vec<_>>();
        assert_eq!(
            times(farm.audit().await.unwrap()),
            vec![1_000, 2_000, 2_000, 3_000]
        );
        assert_eq!(farm.prune_audit(2_500).await.unwrap(), 3);
        assert_eq!(times(farm.audit().await.unwrap()), vec![3_000]);
    }

    #[tokio::test]
    async fn a_batch_lands_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let farm = FarmStore::embedded(dir.path().join("farm.redb")).unwrap();
        let batch = vec![
            (entry(2_000, "s1"), 0),
            (entry(1_000, "s1"), 0),
            (entry(2_000, "s1"), 1),
        ];
        farm.append_audit_batch(&batch).await.unwrap();
        let times = |trail: Vec<AuditEntry>| trail.iter().map(|e| e.at_ms).collect::<Vec<_>>();
        assert_eq!(
            times(farm.audit().await.unwrap()),
            vec![1_000, 2_000, 2_000]
        );
        // One key taken already: none of the batch is written.
        let clash = vec![(entry(5_000, "s1"), 0), (entry(1_000, "s1"), 0)];
        assert!(farm.append_audit_batch(&clash).await.is_err());
        assert_eq!(farm.audit().await.unwrap().len(), 3);
        let big: Vec<_> = (0..=MAX_AUDIT_BATCH as u64)
            .map(|i| (entry(9_000, "s1"), i))
            .collect();
        assert!(farm.append_audit_batch(&big).await.is_err());
        assert_eq!(farm.audit().await.unwrap().len(), 3);
    }
}
