//! Which farm a data folder belongs to.
//!
//! A data folder records its farm's identity in `DATA/farm-id`. At start a
//! server compares it with the identity in the farm state before it does
//! anything else; a mismatch (a moved `farm.redb`, a mistyped `--farm`, a
//! new or rewound etcd) stops it with a message saying how to go on, so a
//! farm view that does not know this folder's vDisks never acts on them.
//!
//! | folder    | farm      | what happens                                         |
//! |-----------|-----------|------------------------------------------------------|
//! | none      | none      | a new farm: the farm gets an identity, the folder too |
//! | none      | F         | a new server (or one older than identities) joins F  |
//! | F         | F         | the same farm                                        |
//! | F         | none / G  | refused, unless `--adopt-data`                        |
//!
//! With `--adopt-data` the folder takes the farm's identity; the vDisks the
//! farm does not list are then quarantined, never deleted (`quarantine.rs`).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use vstream_farm::{FarmIdentity, FarmStore};

use crate::clock::now_unix;
use crate::config::FarmConfig;

/// The file in a data folder naming its farm.
pub const FARM_ID_FILE: &str = "farm-id";

fn id_path(data: &Path) -> PathBuf {
    data.join(FARM_ID_FILE)
}

/// The farm identity a data folder records, if any.
pub fn folder_identity(data: &Path) -> anyhow::Result<Option<String>> {
    let path = id_path(data);
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let id = s.trim().to_owned();
            if id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit()) {
                bail!(
                    "{} does not hold a farm identity (32 hex digits); it was changed by hand?",
                    path.display()
                );
            }
            Ok(Some(id))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Records `id` as the farm of data folder `data`, durably.
pub fn write_folder_identity(data: &Path, id: &str) -> anyhow::Result<()> {
    let path = id_path(data);
    let mut tmp = tempfile::NamedTempFile::new_in(data)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(tmp, "{id}")?;
    tmp.as_file().sync_all()?;
    tmp.persist(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    std::fs::File::open(data)?.sync_all()?;
    Ok(())
}

/// Where the farm state is, in words.
pub fn describe(farm: &FarmConfig, data: &Path) -> String {
    match farm {
        FarmConfig::Embedded => format!(
            "the embedded farm state {}",
            data.join("farm.redb").display()
        ),
        FarmConfig::Etcd(endpoints) => format!("the farm in etcd at {}", endpoints.join(",")),
    }
}

/// Checks that data folder `data` belongs to `farm` (see the module docs),
/// giving either an identity if they have none. Answers the farm's identity.
pub async fn check(
    data: &Path,
    farm: &FarmStore,
    where_: &str,
    adopt: bool,
) -> anyhow::Result<String> {
    let folder = folder_identity(data)?;
    let current = farm
        .identity()
        .await
        .with_context(|| format!("reading the identity of {where_}"))?;
    match (&folder, &current) {
        (Some(f), Some(c)) if f == &c.id => return Ok(c.id.clone()),
        (Some(f), other) if !adopt => {
            let what = match other {
                Some(c) => format!("another farm ({})", c.id),
                None => "a new farm state, which has no identity yet".to_owned(),
            };
            bail!(
                "data folder {data} belongs to farm {f}, but {where_} is {what}. \
                 Nothing was changed. If the farm address is mistyped, correct --farm; \
                 if farm.redb was moved or lost, put it back. To move a one-server farm \
                 into etcd, stop the server and run `vstream farm migrate --data {data} \
                 --to etcd://HOST:PORT`. To join this farm on purpose, start once with \
                 --adopt-data: the vDisks it does not list are then kept in quarantine \
                 (never deleted) until `vstream quarantine adopt` or `vstream quarantine remove`.",
                data = data.display()
            );
        }
        _ => {}
    }
    let id = match current {
        Some(c) => c.id,
        None => {
            farm.claim_identity(FarmIdentity::fresh(now_unix()))
                .await
                .with_context(|| format!("giving {where_} an identity"))?
                .id
        }
    };
    if folder.as_deref() != Some(id.as_str()) {
        if let Some(old) = &folder {
            tracing::warn!(data = %data.display(), old_farm = %old, farm = %id, "--adopt-data: this data folder now belongs to this farm; vDisks it does not list are quarantined");
        }
        write_folder_identity(data, &id)?;
    }
    Ok(id)
}

/// Copies the embedded farm state of stopped server folder `data` into the
/// new etcd farm at `endpoints` (`vstream farm migrate`), giving the source
/// an identity first if it has none, so the folder, its farm.redb and the
/// etcd farm all carry one. Answers the records copied and the identity.
pub async fn migrate(data: &Path, endpoints: &[String]) -> anyhow::Result<(usize, String)> {
    let redb = data.join("farm.redb");
    if !redb.is_file() {
        bail!("{} holds no farm.redb: nothing to migrate", data.display());
    }
    let source = FarmStore::embedded(&redb)
        .with_context(|| format!("opening {} (is the server still running?)", redb.display()))?;
    let folder = folder_identity(data)?;
    let id = match (source.identity().await?, folder) {
        (Some(s), Some(f)) if s.id != f => bail!(
            "{} belongs to farm {f} but its farm.redb is farm {}: start the server once to see why",
            data.display(),
            s.id
        ),
        (Some(s), _) => s.id,
        (None, f) => {
            let fresh = FarmIdentity {
                id: f.unwrap_or_else(|| FarmIdentity::fresh(0).id),
                created_unix: now_unix(),
            };
            source.claim_identity(fresh).await?.id
        }
    };
    write_folder_identity(data, &id)?;
    let dest = FarmStore::etcd(endpoints, crate::config::ETCD_PREFIX)
        .await
        .with_context(|| format!("reaching etcd at {}", endpoints.join(",")))?;
    let n = dest.copy_from(&source).await?;
    Ok((n, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn a_folder_refuses_another_farm_unless_adopted() {
        rt().block_on(async {
            let dir = tempfile::tempdir().expect("tempdir");
            let data = dir.path().join("data");
            std::fs::create_dir(&data).expect("mkdir");
            let first = FarmStore::embedded(dir.path().join("a.redb")).expect("farm a");
            let id = check(&data, &first, "farm a", false).await.expect("new");
            assert_eq!(folder_identity(&data).expect("read"), Some(id.clone()));
            // The same farm again: fine.
            assert_eq!(
                check(&data, &first, "farm a", false).await.expect("same"),
                id
            );
            drop(first);
            // A new farm state (a moved farm.redb): refused, folder unchanged.
            let second = FarmStore::embedded(dir.path().join("b.redb")).expect("farm b");
            let err = check(&data, &second, "farm b", false)
                .await
                .expect_err("refused");
            assert!(err.to_string().contains("--adopt-data"), "{err}");
            assert!(second.identity().await.expect("read").is_none());
            assert_eq!(folder_identity(&data).expect("read"), Some(id.clone()));
            // Adopted on purpose: the folder takes the new farm's identity.
            let new = check(&data, &second, "farm b", true).await.expect("adopt");
            assert_ne!(new, id);
            assert_eq!(folder_identity(&data).expect("read"), Some(new));
        });
    }
}
