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
/// The most devices whose events [`FarmStore::add_device_events`] writes in
/// one transaction: two compares and two puts each, 120 in all, stay under
/// etcd's default limit of 128 operations a transaction.
pub const EVENT_DEVICES_PER_TXN: usize = 30;

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
        self.add_device_events(&[(device.to_owned(), event.clone())], keep)
            .await
    }

    /// Adds each `(device, event)` of `batch` to that device's recent
    /// events (keeping the newest `keep`) and its counts, in as few
    /// transactions as the batch's devices allow ([`EVENT_DEVICES_PER_TXN`]
    /// each): a boot storm's hundreds of connects are a handful of commits,
    /// not one each. A device's events stay in the batch's order among
    /// equal times. A batch that names an invalid device is refused whole,
    /// before anything is written.
    pub async fn add_device_events(
        &self,
        batch: &[(String, DeviceEvent)],
        keep: usize,
    ) -> Result<(), FarmError> {
        let mut devices: Vec<(&str, Vec<&DeviceEvent>)> = Vec::new();
        let mut seen = std::collections::HashMap::new();
        for (device, event) in batch {
            checked_name(RecordKind::Device, device)?;
            let i = *seen.entry(device.as_str()).or_insert_with(|| {
                devices.push((device.as_str(), Vec::new()));
                devices.len() - 1
            });
            devices[i].1.push(event);
        }
        for group in devices.chunks(EVENT_DEVICES_PER_TXN) {
            self.add_events_of(group, keep).await?;
        }
        Ok(())
    }

    /// One transaction: each device's new events and counts.
    async fn add_events_of(
        &self,
        group: &[(&str, Vec<&DeviceEvent>)],
        keep: usize,
    ) -> Result<(), FarmError> {
        for _ in 0..crate::MAX_ATTEMPTS {
            let mut compares = Vec::with_capacity(2 * group.len());
            let mut ops = Vec::with_capacity(2 * group.len());
            for (device, new) in group {
                let key = events_key(device);
                let counts_key = crate::counts::counts_key(device);
                let current = self.backend.get(&key).await?;
                let mut events = match &current {
                    Some(v) => decode::<Vec<DeviceEvent>>(&key, &v.value)?,
                    None => Vec::new(),
                };
                compares.push(match &current {
                    Some(v) => Compare::revision(&key, v.revision),
                    None => Compare::absent(&key),
                });
                // Its counts since it was added, kept with the recent events.
                let stored = self.backend.get(&counts_key).await?;
                let mut counts = crate::counts::counts_or_seed(
                    &counts_key,
                    stored.as_ref().map(|v| v.value.as_slice()),
                    &events,
                )?;
                compares.push(Compare::revision(
                    &counts_key,
                    stored.map_or(0, |v| v.revision),
                ));
                for event in new {
                    counts.add(event);
                    events.push((*event).clone());
                }
                events.sort_by_key(|e| e.at_ms);
                if events.len() > keep {
                    events.drain(..events.len() - keep);
                }
                ops.push(Op::put(&key, encode(&key, &events)?));
                ops.push(Op::put(&counts_key, encode(&counts_key, &counts)?));
            }
            if self.backend.txn(compares, ops).await? {
                return Ok(());
            }
        }
        Err(crate::gave_up(format_args!(
            "recording events of {} devices",
            group.len()
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

    /// A batch of 70 devices' events is three commits (30 devices each at
    /// most), each device keeps its newest, and its counts count them all.
    #[tokio::test]
    async fn a_batch_of_events_is_a_commit_per_thirty_devices() {
        use vstream_model::EventKind;
        let dir = tempfile::tempdir().unwrap();
        let farm = FarmStore::embedded(dir.path().join("farm.redb")).unwrap();
        let event = |at_ms, kind| DeviceEvent {
            at_ms,
            kind,
            server: "s1".into(),
            detail: String::new(),
        };
        farm.add_device_event("pc0", &event(1, EventKind::Connect), 3)
            .await
            .unwrap();
        let mut batch = Vec::new();
        for d in 0..70 {
            batch.push((format!("pc{d}"), event(10, EventKind::Connect)));
        }
        for at in [11, 12, 13] {
            batch.push(("pc0".to_owned(), event(at, EventKind::Disconnect)));
        }
        let last = |farm: &FarmStore| {
            let farm = farm.clone();
            async move {
                let all = farm.backend().list("").await.unwrap();
                all.iter().map(|(_, v)| v.revision).max().unwrap_or(0)
            }
        };
        let before = last(&farm).await;
        farm.add_device_events(&batch, 3).await.unwrap();
        assert_eq!(last(&farm).await, before + 3, "three commits");
        let at = |events: Vec<DeviceEvent>| events.iter().map(|e| e.at_ms).collect::<Vec<_>>();
        assert_eq!(
            at(farm.device_events("pc0").await.unwrap()),
            vec![11, 12, 13]
        );
        assert_eq!(at(farm.device_events("pc69").await.unwrap()), vec![10]);
        let counts = farm.device_event_counts().await.unwrap();
        let pc0 = &counts["pc0"];
        assert_eq!((pc0.connects, pc0.disconnects), (2, 3), "{pc0:?}");
        assert_eq!(counts["pc69"].connects, 1);
        // A bad name refuses the batch before anything is written.
        let bad = vec![
            ("pc1".to_owned(), event(20, EventKind::Retry)),
            ("no/such".to_owned(), event(20, EventKind::Retry)),
        ];
        let before = last(&farm).await;
        assert!(farm.add_device_events(&bad, 3).await.is_err());
        assert_eq!(last(&farm).await, before, "nothing written");
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
