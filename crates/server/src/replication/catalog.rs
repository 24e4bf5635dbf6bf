//! The catalog and a store, side by side: what a version operation adds to
//! the catalog, and what a store must do to follow it. Pure functions.
//!
//! A version operation runs on one server's store; the change it made
//! (before → after) is then applied to the catalog in a transaction. Every
//! other server plans from the catalog: versions whose layers it has are
//! written into its properties file, the layers it lacks are fetched, and
//! versions the catalog dropped go once no device uses them.

use std::collections::BTreeSet;

use vstream_api::{Catalog, CatalogVersion};
use vstream_image::{Properties, Version, VersionState};

/// `v` as the catalog lists it, made by `server`.
fn listed(v: &Version, server: &str) -> CatalogVersion {
    CatalogVersion {
        version: v.clone(),
        server: server.to_owned(),
    }
}

/// The catalog of a vDisk as one store holds it: its first publication.
pub fn from_props(props: &Properties, server: &str) -> Catalog {
    Catalog {
        vdisk: props.name.clone(),
        size: props.size,
        created_unix: props.created_unix,
        last_number: props.next_number() - 1,
        versions: props.versions.iter().map(|v| listed(v, server)).collect(),
    }
}

/// Applies what an operation on `server`'s store changed (`before` → `after`)
/// to `catalog`. Refused when another server changed the same version
/// meanwhile (the error says how).
pub fn apply_change(
    catalog: Option<Catalog>,
    before: &Properties,
    after: &Properties,
    server: &str,
) -> Result<Catalog, String> {
    let Some(mut cat) = catalog else {
        return Ok(from_props(after, server));
    };
    for v in &after.versions {
        let old = before.version(v.number);
        if old == Some(v) {
            continue;
        }
        let existing = cat
            .versions
            .iter()
            .position(|c| c.version.number == v.number);
        match (old, existing) {
            (None, Some(i)) => {
                return Err(format!(
                    "version {} of vDisk {} was made on server {} meanwhile; try again",
                    v.number, cat.vdisk, cat.versions[i].server
                ))
            }
            (Some(_), Some(i)) => {
                let c = &cat.versions[i].version;
                let sealed_elsewhere = c.content_hash.is_some()
                    && c.sealed_unix.is_some()
                    && v.content_hash.is_some()
                    && c.content_hash != v.content_hash;
                if sealed_elsewhere {
                    return Err(format!(
                        "version {} of vDisk {} has other content in the farm; this server has not caught up",
                        v.number, cat.vdisk
                    ));
                }
                let origin = cat.versions[i].server.clone();
                cat.versions[i] = listed(v, &origin);
            }
            (_, None) => cat.versions.push(listed(v, server)),
        }
    }
    for v in &before.versions {
        if after.version(v.number).is_none() {
            cat.versions.retain(|c| c.version.number != v.number);
        }
    }
    cat.versions.sort_by_key(|c| c.version.number);
    cat.last_number = cat.last_number.max(after.next_number() - 1);
    Ok(cat)
}

/// Why a version operation cannot run on this server now.
pub fn foreign_maintenance(cat: &Catalog, local: &Properties, me: &str) -> Option<String> {
    cat.versions
        .iter()
        .find(|c| {
            c.version.state != VersionState::Retired
                && c.version.sealed_unix.is_none()
                && c.server != me
                && local.version(c.version.number).is_none()
        })
        .map(|c| {
            format!(
                "version {} of vDisk {} is open for writing on server {}: run version operations for it there",
                c.version.number, cat.vdisk, c.server
            )
        })
}

/// What a store must do to follow the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The versions the store should hold now.
    pub versions: Vec<Version>,
    /// Versions to copy, each with the layer files the store lacks.
    pub fetch: Vec<(u32, Vec<String>)>,
    /// Versions kept only because devices use them.
    pub kept_for_devices: Vec<u32>,
}

impl Plan {
    /// The versions as properties, if they make a valid properties file.
    pub fn properties(&self, cat: &Catalog, local: Option<&Properties>) -> Option<Properties> {
        let props = Properties {
            format: 2,
            name: cat.vdisk.clone(),
            size: cat.size,
            created_unix: local.map_or(cat.created_unix, |p| p.created_unix),
            last_number: cat
                .last_number
                .max(local.map_or(0, |p| p.next_number() - 1)),
            versions: self.versions.clone(),
        };
        props.check().ok().map(|()| props)
    }
}

/// Plans how `local` (None: the vDisk is not here yet) follows `cat`.
/// `present(file)` tells whether a layer file is here (in the store or
/// received); `in_use(n)` whether a device uses local version `n`.
pub fn plan(
    local: Option<&Properties>,
    cat: &Catalog,
    present: impl Fn(&str) -> bool,
    in_use: impl Fn(u32) -> bool,
) -> Plan {
    let mut versions = Vec::new();
    let mut fetch = Vec::new();
    let mut kept_for_devices = Vec::new();
    let local_version = |n: u32| local.and_then(|p| p.version(n)).filter(|v| v.is_live());
    for entry in &cat.versions {
        let c = &entry.version;
        let lv = local_version(c.number);
        if entry.is_replicated() {
            let same = lv.filter(|l| l.content_hash == c.content_hash);
            let missing: Vec<String> = c.layers.iter().filter(|f| !present(f)).cloned().collect();
            if missing.is_empty() {
                versions.push(c.clone());
            } else if let Some(l) = same {
                // The same bytes under other layers (a merged base, or an
                // import on each server): served from ours until the
                // catalog's layers are here.
                let mut v = l.clone();
                v.state = c.state;
                v.boot_set_cleared_unix = c.boot_set_cleared_unix;
                versions.push(v);
                fetch.push((c.number, missing));
            } else {
                fetch.push((c.number, missing));
                if let Some(l) = lv.filter(|_| in_use(c.number)) {
                    versions.push(l.clone());
                    kept_for_devices.push(c.number);
                }
            }
        } else if c.state == VersionState::Retired || c.layers.is_empty() {
            match lv {
                Some(l) if in_use(c.number) => {
                    versions.push(l.clone());
                    kept_for_devices.push(c.number);
                }
                _ => versions.push(c.clone()),
            }
        } else if let Some(l) = lv {
            // Open for writing: the store holding it is its truth.
            versions.push(l.clone());
        }
    }
    if let Some(p) = local {
        let in_catalog: BTreeSet<u32> = cat.versions.iter().map(|c| c.version.number).collect();
        for v in &p.versions {
            if in_catalog.contains(&v.number) {
                continue;
            }
            if v.number > cat.last_number {
                // Made here and not yet in the catalog.
                versions.push(v.clone());
            } else if v.is_live() && in_use(v.number) {
                versions.push(v.clone());
                kept_for_devices.push(v.number);
            }
        }
    }
    versions.sort_by_key(|v| v.number);
    // Retired entries that were never here add nothing.
    versions.retain(|v| v.is_live() || local.is_some_and(|p| p.version(v.number).is_some()));
    Plan {
        versions,
        fetch,
        kept_for_devices,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(n: u32, state: VersionState, layers: &[&str], hash: Option<&str>) -> Version {
        Version {
            number: n,
            state,
            layers: layers.iter().map(|s| s.to_string()).collect(),
            created_unix: 1,
            sealed_unix: (state != VersionState::Maintenance && hash.is_some()).then_some(2),
            content_hash: hash.map(str::to_owned),
            boot_set_cleared_unix: None,
        }
    }

    fn props(versions: Vec<Version>) -> Properties {
        Properties {
            format: 2,
            name: "d".into(),
            size: 4096,
            created_unix: 1,
            last_number: versions.iter().map(|v| v.number).max().unwrap_or(0),
            versions,
        }
    }

    use VersionState::*;

    #[test]
    fn an_operation_becomes_a_catalog_change() {
        let before = props(vec![v(1, Production, &["a"], Some("h1"))]);
        let cat = from_props(&before, "s1");
        let mut after = before.clone();
        after.versions.push(v(2, Maintenance, &["a", "b"], None));
        after.last_number = 2;
        let cat = apply_change(Some(cat), &before, &after, "s2").expect("new");
        assert_eq!(cat.last_number, 2);
        assert_eq!(cat.version(2).expect("v2").server, "s2");
        // Another server made version 2 meanwhile: refused.
        let mut other = before.clone();
        other.versions.push(v(2, Maintenance, &["a", "c"], None));
        let err = apply_change(Some(cat.clone()), &before, &other, "s3").unwrap_err();
        assert!(err.contains("made on server s2"), "{err}");
        // A promote elsewhere keeps the origin.
        let mut promoted = after.clone();
        promoted.versions[1] = v(2, Test, &["a", "b"], Some("h2"));
        let cat = apply_change(Some(cat), &after, &promoted, "s1").expect("promote");
        let c2 = cat.version(2).expect("v2");
        assert_eq!((c2.version.state, c2.server.as_str()), (Test, "s2"));
        assert!(c2.is_replicated());
        // A delete drops it.
        let cat = apply_change(Some(cat), &promoted, &before, "s1").expect("delete");
        assert!(cat.version(2).is_none());
        assert_eq!(cat.last_number, 2, "numbers are never reused");
        // Maintenance held by another server blocks operations here.
        let mut open = cat.clone();
        open.versions
            .push(listed(&v(3, Maintenance, &["a", "x"], None), "s2"));
        assert!(foreign_maintenance(&open, &before, "s1").is_some());
        assert!(foreign_maintenance(&open, &before, "s2").is_none());
    }

    #[test]
    fn a_store_follows_the_catalog() {
        let cat = from_props(
            &props(vec![
                v(1, Production, &["a"], Some("h1")),
                v(2, Test, &["a", "b"], Some("h2")),
                v(3, Maintenance, &["a", "b", "c"], None),
            ]),
            "s1",
        );
        // A new server has nothing: it fetches 1 and 2, not the open version 3.
        let p = plan(None, &cat, |_| false, |_| false);
        assert_eq!(
            p.fetch,
            vec![
                (1, vec!["a".to_string()]),
                (2, vec!["a".into(), "b".into()])
            ]
        );
        assert!(p.versions.is_empty());
        assert!(p.properties(&cat, None).is_none(), "no production yet");
        // With a here, version 1 is held; 2 waits for b.
        let p = plan(None, &cat, |f| f == "a", |_| false);
        assert_eq!(p.fetch, vec![(2, vec!["b".to_string()])]);
        let props1 = p.properties(&cat, None).expect("valid");
        assert_eq!(props1.versions.len(), 1);
        assert_eq!(props1.last_number, 3, "the farm's numbers are reserved");
        // Everything here: both sealed versions, and nothing to fetch.
        let p = plan(Some(&props1), &cat, |_| true, |_| false);
        assert!(p.fetch.is_empty());
        let numbers: Vec<u32> = p.versions.iter().map(|v| v.number).collect();
        assert_eq!(numbers, [1, 2]);
        // The origin keeps its open version.
        let origin = props(vec![
            v(1, Production, &["a"], Some("h1")),
            v(2, Test, &["a", "b"], Some("h2")),
            v(3, Maintenance, &["a", "b", "c"], None),
        ]);
        let p = plan(Some(&origin), &cat, |_| true, |_| false);
        assert_eq!(p.versions, origin.versions);
        // Version 2 deleted farm-wide: it goes, unless a device uses it.
        let mut cat2 = cat.clone();
        cat2.versions.retain(|c| c.version.number != 2);
        let here = p.properties(&cat, Some(&origin)).expect("valid");
        let gone = plan(Some(&here), &cat2, |_| true, |_| false);
        assert!(gone.versions.iter().all(|v| v.number != 2));
        let kept = plan(Some(&here), &cat2, |_| true, |n| n == 2);
        assert_eq!(kept.kept_for_devices, vec![2]);
        // A version made here after the catalog was read stays.
        let mut newer = here.clone();
        newer.versions.push(v(9, Maintenance, &["a", "z"], None));
        newer.last_number = 9;
        let p = plan(Some(&newer), &cat, |_| true, |_| false);
        assert!(p.versions.iter().any(|v| v.number == 9));
        // The same content imported here under other layer names is kept.
        // The catalog's layers are fetched (once) all the same.
        let own = props(vec![v(1, Production, &["own"], Some("h1"))]);
        let p = plan(Some(&own), &cat, |f| f == "own", |_| false);
        assert_eq!(p.versions[0].layers, vec!["own".to_string()]);
        assert_eq!(
            p.fetch,
            vec![
                (1, vec!["a".to_string()]),
                (2, vec!["a".into(), "b".into()])
            ]
        );
        // A merge: version 2 now lies on a merged base; version 1 retired.
        let mut merged = cat.clone();
        merged.versions[0].version.state = Retired;
        merged.versions[0].version.layers.clear();
        merged.versions[1].version.layers = vec!["m2".into()];
        let p = plan(Some(&here), &merged, |f| f != "m2", |_| false);
        assert_eq!(p.fetch, vec![(2, vec!["m2".to_string()])]);
        assert_eq!(
            p.versions[1].layers,
            vec!["a".to_string(), "b".into()],
            "served meanwhile"
        );
        let p = plan(Some(&here), &merged, |_| true, |_| false);
        assert!(p.fetch.is_empty());
        assert_eq!(p.versions[1].layers, vec!["m2".to_string()]);
        assert!(p.versions[0].layers.is_empty(), "retired: its layer goes");
    }
}
