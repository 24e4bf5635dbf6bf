//! Named stores: `stores/NAME` → [`StoreDef`], a folder every server holds
//! locally. The default store (each server's data folder) has no record.

use vstream_model::{StoreDef, DEFAULT_STORE};

use crate::{checked_name, decode, encode, gave_up, Compare, FarmError, FarmStore, Op};
use crate::{RecordKind, MAX_ATTEMPTS};

const STORES: &str = "stores/";

fn store_key(name: &str) -> String {
    format!("{STORES}{name}")
}

impl FarmStore {
    /// Every named store, sorted by name.
    pub async fn list_stores(&self) -> Result<Vec<StoreDef>, FarmError> {
        self.list_records(STORES).await
    }

    /// The named store `name`, if there is one.
    pub async fn get_store(&self, name: &str) -> Result<Option<StoreDef>, FarmError> {
        checked_name(RecordKind::Store, name)?;
        self.get_record(&store_key(name)).await
    }

    /// Records a new named store.
    pub async fn create_store(&self, store: StoreDef) -> Result<StoreDef, FarmError> {
        checked_name(RecordKind::Store, &store.name)?;
        if store.name == DEFAULT_STORE {
            return Err(FarmError::Invalid(format!(
                "{DEFAULT_STORE:?} is each server's data folder; name the store otherwise"
            )));
        }
        if !store.path.starts_with('/') {
            return Err(FarmError::Invalid(format!(
                "a store's path is absolute: {:?}",
                store.path
            )));
        }
        let key = store_key(&store.name);
        let ok = self
            .backend
            .txn(
                vec![Compare::absent(&key)],
                vec![Op::put(&key, encode(&key, &store)?)],
            )
            .await?;
        if !ok {
            return Err(FarmError::AlreadyExists {
                kind: RecordKind::Store,
                name: store.name,
            });
        }
        Ok(store)
    }

    /// Deletes the named store `name`; [`FarmError::InUse`] while a vDisk is in it.
    pub async fn delete_store(&self, name: &str) -> Result<StoreDef, FarmError> {
        checked_name(RecordKind::Store, name)?;
        let key = store_key(name);
        for _ in 0..MAX_ATTEMPTS {
            let Some(current) = self.backend.get(&key).await? else {
                return Err(FarmError::NotFound {
                    kind: RecordKind::Store,
                    name: name.to_owned(),
                });
            };
            let users: Vec<String> = self
                .list_vdisks()
                .await?
                .into_iter()
                .filter(|v| v.store == name)
                .map(|v| v.name)
                .collect();
            if !users.is_empty() {
                return Err(FarmError::InUse(format!(
                    "store {name} holds vDisk(s) {}; delete them first",
                    users.join(", ")
                )));
            }
            // A vDisk made in it meanwhile touched the record: compare fails.
            let compares = vec![Compare::revision(&key, current.revision)];
            if self.backend.txn(compares, vec![Op::delete(&key)]).await? {
                return decode(&key, &current.value);
            }
        }
        Err(gave_up(format_args!("deleting store {name}")))
    }

    /// For a transaction that puts a vDisk into `store`: the compare that
    /// the store still exists, and the write that touches it.
    pub(crate) async fn store_guard(
        &self,
        store: &str,
    ) -> Result<(Option<Compare>, Option<Op>), FarmError> {
        if store == DEFAULT_STORE {
            return Ok((None, None));
        }
        checked_name(RecordKind::Store, store)?;
        let key = store_key(store);
        let Some(current) = self.backend.get(&key).await? else {
            return Err(FarmError::NotFound {
                kind: RecordKind::Store,
                name: store.to_owned(),
            });
        };
        Ok((
            Some(Compare::revision(&key, current.revision)),
            Some(Op::put(&key, current.value)),
        ))
    }
}
