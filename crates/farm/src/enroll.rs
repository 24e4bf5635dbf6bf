//! Enrollment tokens: `enroll/DEVICE` → [`EnrollToken`], the one token the
//! boot script last handed the device. A token serves once: taking it
//! removes it in the same transaction that finds it unchanged, so of two
//! servers handed the same token at once, one signs and the other refuses.

use vstream_model::EnrollToken;

use crate::{checked_name, decode, encode, gave_up, Compare, FarmError, FarmStore, Op};
use crate::{RecordKind, MAX_ATTEMPTS};

const ENROLL: &str = "enroll/";

fn enroll_key(device: &str) -> String {
    format!("{ENROLL}{device}")
}

impl FarmStore {
    /// Records `token` as device `device`'s one outstanding enrollment
    /// token, in place of any earlier one (a new boot script, a new token).
    pub async fn put_enroll_token(
        &self,
        device: &str,
        token: &EnrollToken,
    ) -> Result<(), FarmError> {
        checked_name(RecordKind::Device, device)?;
        let key = enroll_key(device);
        let ops = vec![Op::put(&key, encode(&key, token)?)];
        match self.backend.txn(Vec::new(), ops).await? {
            true => Ok(()),
            false => Err(gave_up(format_args!(
                "recording an enrollment token of {device}"
            ))),
        }
    }

    /// Takes device `device`'s enrollment token if `check` accepts it: it
    /// is gone from the farm state when this answers `Ok(Ok(_))`, and no
    /// other call gets it. `Ok(Err(why))`: none outstanding, or `check`'s
    /// refusal (the token then stays, so a wrong guess cannot spend the
    /// device's token).
    pub async fn take_enroll_token(
        &self,
        device: &str,
        check: impl Fn(&EnrollToken) -> Result<(), String>,
    ) -> Result<Result<EnrollToken, String>, FarmError> {
        checked_name(RecordKind::Device, device)?;
        let key = enroll_key(device);
        for _ in 0..MAX_ATTEMPTS {
            let Some(v) = self.backend.get(&key).await? else {
                return Ok(Err(format!(
                    "device {device} has no enrollment token outstanding (used already, \
                     or replaced by a later boot script)"
                )));
            };
            let token: EnrollToken = decode(&key, &v.value)?;
            if let Err(why) = check(&token) {
                return Ok(Err(why));
            }
            let compare = vec![Compare::revision(&key, v.revision)];
            if self.backend.txn(compare, vec![Op::delete(&key)]).await? {
                return Ok(Ok(token));
            }
        }
        Err(gave_up(format_args!(
            "taking the enrollment token of {device}"
        )))
    }

    /// Removes device `device`'s enrollment token, if it has one (the
    /// device was removed or its credentials revoked).
    pub async fn drop_enroll_token(&self, device: &str) -> Result<(), FarmError> {
        checked_name(RecordKind::Device, device)?;
        self.backend
            .txn(Vec::new(), vec![Op::delete(enroll_key(device))])
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(sha: &str) -> EnrollToken {
        EnrollToken {
            sha256: sha.into(),
            mac: "52:54:00:00:00:01".into(),
            from: "10.0.0.9".into(),
            created_unix: 100,
            expires_unix: 400,
        }
    }

    #[tokio::test]
    async fn a_token_is_taken_once_and_a_refused_one_stays() {
        let dir = tempfile::tempdir().unwrap();
        let farm = FarmStore::embedded(dir.path().join("farm.redb")).unwrap();
        let none = farm.take_enroll_token("pc1", |_| Ok(())).await.unwrap();
        assert!(none.unwrap_err().contains("no enrollment token"));
        farm.put_enroll_token("pc1", &token("aa")).await.unwrap();
        // A later script's token replaces the first.
        farm.put_enroll_token("pc1", &token("bb")).await.unwrap();
        let refused = farm
            .take_enroll_token("pc1", |t| match t.sha256.as_str() {
                "aa" => Ok(()),
                _ => Err("not this one".into()),
            })
            .await
            .unwrap();
        assert_eq!(refused.unwrap_err(), "not this one");
        let taken = farm.take_enroll_token("pc1", |_| Ok(())).await.unwrap();
        assert_eq!(taken.unwrap(), token("bb"));
        let again = farm.take_enroll_token("pc1", |_| Ok(())).await.unwrap();
        assert!(again.is_err(), "a token served twice");
        farm.put_enroll_token("pc2", &token("cc")).await.unwrap();
        farm.drop_enroll_token("pc2").await.unwrap();
        assert!(farm
            .take_enroll_token("pc2", |_| Ok(()))
            .await
            .unwrap()
            .is_err());
        let bad = farm
            .put_enroll_token("x/y", &token("dd"))
            .await
            .unwrap_err();
        assert!(matches!(bad, FarmError::Invalid(_)), "{bad}");
    }
}
