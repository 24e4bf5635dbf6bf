//! Each device's event counts since it was added: `eventcounts/DEVICE` →
//! [`DeviceEventCounts`], written in the transaction that adds an event to
//! its recent ones (`events/DEVICE`, see `access.rs`), which keep only the
//! newest few. One range read gives every device's counts, for the device
//! list.

use std::collections::HashMap;

use vstream_model::{DeviceEvent, DeviceEventCounts};

use crate::{checked_name, decode, FarmError, FarmStore, RecordKind};

pub(crate) const COUNTS: &str = "eventcounts/";

pub(crate) fn counts_key(device: &str) -> String {
    format!("{COUNTS}{device}")
}

/// The counts at `key` as stored, or, for a device whose events an older
/// build recorded, those of its recent events.
pub(crate) fn counts_or_seed(
    key: &str,
    stored: Option<&[u8]>,
    recent: &[DeviceEvent],
) -> Result<DeviceEventCounts, FarmError> {
    match stored {
        Some(bytes) => decode(key, bytes),
        None => {
            let mut c = DeviceEventCounts::default();
            recent.iter().for_each(|e| c.add(e));
            Ok(c)
        }
    }
}

impl FarmStore {
    /// Every device's event counts, by device name, in one read. A device
    /// with no event has none.
    pub async fn device_event_counts(
        &self,
    ) -> Result<HashMap<String, DeviceEventCounts>, FarmError> {
        self.backend
            .list(COUNTS)
            .await?
            .into_iter()
            .map(|(key, v)| {
                let counts = decode(&key, &v.value)?;
                Ok((key[COUNTS.len()..].to_owned(), counts))
            })
            .collect()
    }

    /// Device `device`'s event counts (all zero if it had no event).
    pub async fn device_event_count(&self, device: &str) -> Result<DeviceEventCounts, FarmError> {
        checked_name(RecordKind::Device, device)?;
        Ok(self
            .get_record(&counts_key(device))
            .await?
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use vstream_model::{DeviceEvent, EventKind};

    use crate::FarmStore;

    fn event(at_ms: u64, kind: EventKind) -> DeviceEvent {
        DeviceEvent {
            at_ms,
            kind,
            server: "s1".into(),
            detail: String::new(),
        }
    }

    #[tokio::test]
    async fn counts_outlive_the_recent_events_and_go_with_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let farm = crate::tests::farm_with_base(dir.path()).await;
        farm.create_device(crate::tests::a_device("pc1", "52:54:00:00:00:01"))
            .await
            .unwrap();
        // Five retries and two failovers, of which the newest three are kept.
        let kinds = [
            EventKind::Retry,
            EventKind::Failover,
            EventKind::Retry,
            EventKind::Retry,
            EventKind::Failover,
            EventKind::Retry,
            EventKind::Retry,
        ];
        for (i, kind) in kinds.into_iter().enumerate() {
            farm.add_device_event("pc1", &event(10 + i as u64, kind), 3)
                .await
                .unwrap();
        }
        farm.add_device_event("pc2", &event(1, EventKind::Connect), 3)
            .await
            .unwrap();
        assert_eq!(farm.device_events("pc1").await.unwrap().len(), 3);
        let c = farm.device_event_count("pc1").await.unwrap();
        assert_eq!((c.retries, c.failovers), (5, 2));
        assert_eq!((c.last_retry_ms, c.last_failover_ms), (Some(16), Some(14)));
        let all = farm.device_event_counts().await.unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all["pc1"], c);
        assert_eq!(all["pc2"].connects, 1);
        assert_eq!(farm.device_event_count("pc3").await.unwrap().retries, 0);
        // A device removed leaves no counts for one made again by its name.
        farm.delete_device("pc1").await.unwrap();
        assert!(!farm
            .device_event_counts()
            .await
            .unwrap()
            .contains_key("pc1"));
    }

    #[tokio::test]
    async fn events_an_older_build_kept_seed_the_counts() {
        let dir = tempfile::tempdir().unwrap();
        let farm = FarmStore::embedded(dir.path().join("farm.redb")).unwrap();
        // Recent events as an older build wrote them: no counts beside.
        let old = vec![event(1, EventKind::Retry), event(2, EventKind::Failover)];
        let key = crate::access::events_key("pc1");
        farm.backend()
            .txn(
                vec![],
                vec![crate::Op::put(&key, crate::encode(&key, &old).unwrap())],
            )
            .await
            .unwrap();
        farm.add_device_event("pc1", &event(3, EventKind::Retry), 50)
            .await
            .unwrap();
        let c = farm.device_event_count("pc1").await.unwrap();
        assert_eq!((c.retries, c.failovers), (2, 1));
    }
}
