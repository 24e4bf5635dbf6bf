//! The version catalog and the records replication shares.
//!
//! * `catalog/NAME` → [`Catalog`]: every version of vDisk NAME, farm-wide.
//!   Each server's store follows it; a version operation on one server
//!   changes it in a transaction compared on its revision.
//! * `replication/now` → [`ReplicationOverride`]: "copy these now".
//! * `secrets/peer` → the farm's peer secret (hex): servers present it to
//!   each other to pull layers. Made once, by the first server that asks.

use vstream_model::{Catalog, ReplicationOverride};

use crate::{checked_name, decode, encode, gave_up, Compare, FarmError, FarmStore, Op};
use crate::{RecordKind, MAX_ATTEMPTS};

const CATALOG: &str = "catalog/";
const OVERRIDE: &str = "replication/now";
const PEER_SECRET: &str = "secrets/peer";

pub(crate) fn catalog_key(name: &str) -> String {
    format!("{CATALOG}{name}")
}

impl FarmStore {
    /// The catalog of vDisk `name`, if the farm has one.
    pub async fn catalog(&self, name: &str) -> Result<Option<Catalog>, FarmError> {
        checked_name(RecordKind::VDisk, name)?;
        self.get_record(&catalog_key(name)).await
    }

    /// Every catalog, by vDisk name.
    pub async fn catalogs(&self) -> Result<Vec<Catalog>, FarmError> {
        self.list_records(CATALOG).await
    }

    /// Changes the catalog of `name` with `f` (given the current one, or
    /// `None`), and stores what it returns (`None` deletes it), in a
    /// transaction compared on the catalog's revision, retried on conflict.
    /// An error from `f` aborts without writing.
    pub async fn update_catalog<F>(&self, name: &str, f: F) -> Result<Option<Catalog>, FarmError>
    where
        F: Fn(Option<Catalog>) -> Result<Option<Catalog>, FarmError>,
    {
        checked_name(RecordKind::VDisk, name)?;
        let key = catalog_key(name);
        for _ in 0..MAX_ATTEMPTS {
            let current = self.backend.get(&key).await?;
            let (old, revision) = match &current {
                Some(v) => (Some(decode::<Catalog>(&key, &v.value)?), v.revision),
                None => (None, 0),
            };
            let new = f(old.clone())?;
            if new == old {
                return Ok(new);
            }
            if let Some(c) = &new {
                if c.vdisk != name {
                    return Err(FarmError::Invalid(format!(
                        "the catalog of vDisk {name} cannot name vDisk {}",
                        c.vdisk
                    )));
                }
            }
            let op = match &new {
                Some(c) => Op::put(&key, encode(&key, c)?),
                None => Op::delete(&key),
            };
            if self
                .backend
                .txn(vec![Compare::revision(&key, revision)], vec![op])
                .await?
            {
                return Ok(new);
            }
        }
        Err(gave_up(format_args!(
            "updating the catalog of vDisk {name}"
        )))
    }

    /// Records a "replicate now" order, replacing any earlier one.
    pub async fn set_replication_override(
        &self,
        order: &ReplicationOverride,
    ) -> Result<(), FarmError> {
        self.backend
            .txn(vec![], vec![Op::put(OVERRIDE, encode(OVERRIDE, order)?)])
            .await?;
        Ok(())
    }

    /// The current "replicate now" order, if any.
    pub async fn replication_override(&self) -> Result<Option<ReplicationOverride>, FarmError> {
        match self.backend.get(OVERRIDE).await? {
            Some(v) => Ok(Some(decode(OVERRIDE, &v.value)?)),
            None => Ok(None),
        }
    }

    /// The farm's peer secret, made from `fresh` by whichever server asks first.
    pub async fn peer_secret(&self, fresh: &str) -> Result<String, FarmError> {
        for _ in 0..MAX_ATTEMPTS {
            if let Some(v) = self.backend.get(PEER_SECRET).await? {
                return crate::decode_name(PEER_SECRET, &v.value);
            }
            let created = self
                .backend
                .txn(
                    vec![Compare::absent(PEER_SECRET)],
                    vec![Op::put(PEER_SECRET, fresh.as_bytes().to_vec())],
                )
                .await?;
            if created {
                return Ok(fresh.to_owned());
            }
        }
        Err(gave_up("reading the peer secret"))
    }
}
