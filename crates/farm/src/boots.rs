//! Device boots: `boots/DEVICE` → [`BootRecord`], the device's current boot.
//!
//! A boot is announced by whoever sees it first: the boot script request,
//! the agent's login, or an NBD client naming a boot identity in its export.
//! Announcing the identity the record already holds changes nothing (a
//! failover or reconnect within the boot); another identity starts the next
//! boot, numbered one higher, and every server ends the device's sessions of
//! lower numbers.

use vstream_model::{check_boot_token, BootRecord};

use crate::{checked_name, decode, encode, gave_up, Compare, FarmError, FarmStore, Op};
use crate::{RecordKind, MAX_ATTEMPTS};

const BOOTS: &str = "boots/";

pub(crate) fn boot_key(device: &str) -> String {
    format!("{BOOTS}{device}")
}

impl FarmStore {
    /// Every device's current boot.
    pub async fn list_boots(&self) -> Result<Vec<(String, BootRecord)>, FarmError> {
        self.backend
            .list(BOOTS)
            .await?
            .iter()
            .map(|(key, v)| {
                let device = key.strip_prefix(BOOTS).unwrap_or(key).to_owned();
                decode(key, &v.value).map(|b| (device, b))
            })
            .collect()
    }

    /// Device `device`'s current boot, if one was ever announced.
    pub async fn get_boot(&self, device: &str) -> Result<Option<BootRecord>, FarmError> {
        checked_name(RecordKind::Device, device)?;
        self.get_record(&boot_key(device)).await
    }

    /// Announces that device `device` runs the boot `token`, seen by
    /// `source`, at `now_unix`. Returns the device's current boot and whether
    /// this call started it (false: the token was already the current one).
    pub async fn announce_boot(
        &self,
        device: &str,
        token: &str,
        source: &str,
        now_unix: u64,
    ) -> Result<(BootRecord, bool), FarmError> {
        checked_name(RecordKind::Device, device)?;
        check_boot_token(token).map_err(FarmError::Invalid)?;
        let key = boot_key(device);
        for _ in 0..MAX_ATTEMPTS {
            let current = self.backend.get(&key).await?;
            let (compare, seq) = match &current {
                Some(v) => {
                    let old: BootRecord = decode(&key, &v.value)?;
                    if old.token == token {
                        return Ok((old, false));
                    }
                    (Compare::revision(&key, v.revision), old.seq + 1)
                }
                None => (Compare::absent(&key), 1),
            };
            let record = BootRecord {
                token: token.to_owned(),
                seq,
                since_unix: now_unix,
                source: source.to_owned(),
            };
            let ops = vec![Op::put(&key, encode(&key, &record)?)];
            if self.backend.txn(vec![compare], ops).await? {
                return Ok((record, true));
            }
        }
        Err(gave_up(format_args!("recording a boot of device {device}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_new_token_is_the_next_boot_and_the_same_one_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let farm = FarmStore::embedded(dir.path().join("farm.redb")).unwrap();
        assert_eq!(farm.get_boot("pc1").await.unwrap(), None);
        let (first, new) = farm.announce_boot("pc1", "aaa", "ipxe", 10).await.unwrap();
        assert!(new);
        assert_eq!((first.seq, first.token.as_str()), (1, "aaa"));
        let (same, new) = farm.announce_boot("pc1", "aaa", "login", 20).await.unwrap();
        assert!(!new, "the same boot announced again started another");
        assert_eq!(same, first);
        let (next, new) = farm.announce_boot("pc1", "bbb", "nbd", 30).await.unwrap();
        assert!(new);
        assert_eq!(
            (next.seq, next.source.as_str(), next.since_unix),
            (2, "nbd", 30)
        );
        farm.announce_boot("pc2", "ccc", "ipxe", 40).await.unwrap();
        let all = farm.list_boots().await.unwrap();
        assert_eq!(
            all.iter()
                .map(|(d, b)| (d.as_str(), b.seq))
                .collect::<Vec<_>>(),
            [("pc1", 2), ("pc2", 1)]
        );
        for bad in ["", "a b", "x/y", &"z".repeat(65)] {
            let err = farm.announce_boot("pc1", bad, "nbd", 50).await.unwrap_err();
            assert!(matches!(err, FarmError::Invalid(_)), "{bad:?}: {err}");
        }
        assert_eq!(farm.get_boot("pc1").await.unwrap().unwrap().seq, 2);
    }
}
