//! A device's iSCSI CHAP secrets: `iscsi/DEVICE` → [`IscsiSecrets`], apart
//! from the device record so that no device listing carries them. They are
//! made once, by whichever server asks first (at `device add`, or at the
//! first iSCSI login of a device made before iSCSI), replaced by a rotation,
//! and go with the device.

use vstream_model::IscsiSecrets;

use crate::{checked_name, decode, encode, gave_up, Compare, FarmError, FarmStore, Op};
use crate::{RecordKind, MAX_ATTEMPTS};

pub(crate) const ISCSI: &str = "iscsi/";

pub(crate) fn iscsi_key(device: &str) -> String {
    format!("{ISCSI}{device}")
}

impl FarmStore {
    /// Device `device`'s CHAP secrets; `fresh` becomes them if it has none
    /// yet (of two servers asking at once, both get the same ones).
    pub async fn iscsi_secrets(
        &self,
        device: &str,
        fresh: IscsiSecrets,
    ) -> Result<IscsiSecrets, FarmError> {
        checked_name(RecordKind::Device, device)?;
        let key = iscsi_key(device);
        for _ in 0..MAX_ATTEMPTS {
            if let Some(v) = self.backend.get(&key).await? {
                return decode(&key, &v.value);
            }
            let ops = vec![Op::put(&key, encode(&key, &fresh)?)];
            if self.backend.txn(vec![Compare::absent(&key)], ops).await? {
                return Ok(fresh);
            }
        }
        Err(gave_up(format_args!(
            "reading the iSCSI secrets of {device}"
        )))
    }

    /// Replaces device `device`'s CHAP secrets with `fresh`: the old ones
    /// open nothing from the next login on.
    pub async fn rotate_iscsi_secrets(
        &self,
        device: &str,
        fresh: &IscsiSecrets,
    ) -> Result<(), FarmError> {
        checked_name(RecordKind::Device, device)?;
        let key = iscsi_key(device);
        let ops = vec![Op::put(&key, encode(&key, fresh)?)];
        match self.backend.txn(Vec::new(), ops).await? {
            true => Ok(()),
            false => Err(gave_up(format_args!(
                "rotating the iSCSI secrets of {device}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(s: &str) -> IscsiSecrets {
        IscsiSecrets {
            chap_secret: format!("{s}-initiator-1"),
            target_secret: format!("{s}-target-12345"),
            created_unix: 7,
        }
    }

    #[tokio::test]
    async fn secrets_are_made_once_rotated_and_go_with_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let farm = crate::tests::farm_with_base(dir.path()).await;
        farm.create_device(crate::tests::a_device("pc1", "52:54:00:00:00:01"))
            .await
            .unwrap();
        let first = farm.iscsi_secrets("pc1", secrets("a")).await.unwrap();
        assert_eq!(first, secrets("a"));
        // A second server's fresh ones lose to the first.
        let again = farm.iscsi_secrets("pc1", secrets("b")).await.unwrap();
        assert_eq!(again, secrets("a"));
        farm.rotate_iscsi_secrets("pc1", &secrets("c"))
            .await
            .unwrap();
        let rotated = farm.iscsi_secrets("pc1", secrets("d")).await.unwrap();
        assert_eq!(rotated, secrets("c"));
        farm.delete_device("pc1").await.unwrap();
        // A device made again under the name gets new secrets.
        farm.create_device(crate::tests::a_device("pc1", "52:54:00:00:00:01"))
            .await
            .unwrap();
        let new = farm.iscsi_secrets("pc1", secrets("e")).await.unwrap();
        assert_eq!(new, secrets("e"));
        assert!(farm.iscsi_secrets("../x", secrets("f")).await.is_err());
    }
}
