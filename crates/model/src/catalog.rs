//! The farm's catalog of vDisk versions, and what servers report about
//! copying them between their stores.

use serde::{Deserialize, Serialize};

use crate::{Version, VersionState};

/// One version of a vDisk, as the whole farm knows it: the [`Version`] a
/// store keeps, and the server that made it. On the wire and in the farm
/// state its fields sit side by side in one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogVersion {
    #[serde(flatten)]
    pub version: Version,
    /// The server that made this version; while it is unsealed, the only one
    /// holding it.
    pub server: String,
}

impl CatalogVersion {
    /// Sealed and not retired: every server of the farm should hold it.
    pub fn is_replicated(&self) -> bool {
        let v = &self.version;
        v.sealed_unix.is_some()
            && v.content_hash.is_some()
            && v.state != VersionState::Retired
            && !v.layers.is_empty()
    }
}

/// Every version of one vDisk: the farm's truth, which each server's store
/// follows (`catalog/NAME` in the farm state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Catalog {
    pub vdisk: String,
    pub size: u64,
    pub created_unix: u64,
    /// The highest version number ever given farm-wide.
    pub last_number: u32,
    pub versions: Vec<CatalogVersion>,
}

impl Catalog {
    pub fn version(&self, number: u32) -> Option<&CatalogVersion> {
        self.versions.iter().find(|v| v.version.number == number)
    }
}

/// Where one server stands with one version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    /// Not held, and not yet planned (another transfer runs, or no peer has it).
    Missing,
    /// Planned, waiting for its time window or a transfer slot.
    Queued,
    Copying,
    /// Held, and every block checked against its hash.
    Verified,
    /// Held, but a block failed its hash: not offered to devices until repaired.
    Corrupt,
}

impl std::fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReplicaState::Missing => "missing",
            ReplicaState::Queued => "queued",
            ReplicaState::Copying => "copying",
            ReplicaState::Verified => "verified",
            ReplicaState::Corrupt => "corrupt",
        })
    }
}

/// What a server publishes about one version it is copying or holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReplicaProgress {
    pub vdisk: String,
    pub version: u32,
    pub state: ReplicaState,
    /// Data bytes of the missing layers received so far, and in all.
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Bytes received per second over the last few seconds.
    pub rate: u64,
    /// Why it waits or failed, for the administrator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A "replicate now" order, kept in the farm state (`replication/now`) until
/// it expires; every server copies what it names outside its windows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReplicationOverride {
    /// (vDisk, version) pairs resolved from the catalog when it was given.
    #[cfg_attr(feature = "openapi", schema(schema_with = schema::pairs))]
    pub versions: Vec<(String, u32)>,
    pub created_unix: u64,
    pub expires_unix: u64,
}

/// The OpenAPI schema of [`CatalogVersion`]: one flat object, as it travels.
/// (A derived schema would describe the flattened `version` as an `allOf`,
/// changing the published document.) The API crate's tests check that it
/// names exactly the fields a [`CatalogVersion`] serializes.
#[cfg(feature = "openapi")]
mod schema {
    use std::borrow::Cow;

    use utoipa::openapi::{schema::Schema, RefOr};
    use utoipa::{PartialSchema, ToSchema};

    use crate::VersionState;

    /// `[[vdisk, version], ...]`: each pair an array of two, a string and
    /// an integer. utoipa writes a tuple as a list of item schemas, which
    /// OpenAPI 3.1 does not allow; `prefixItems` says it exactly, but some
    /// clients (schemathesis) turn it back into that list, so the pair is
    /// said as two items each a string or an integer.
    pub fn pairs() -> utoipa::openapi::schema::Array {
        use utoipa::openapi::schema::{AnyOfBuilder, ArrayBuilder, ObjectBuilder, Type};
        let either = AnyOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::String))
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                        utoipa::openapi::KnownFormat::Int32,
                    )))
                    .minimum(Some(0)),
            );
        let pair = ArrayBuilder::new()
            .items(either)
            .min_items(Some(2))
            .max_items(Some(2))
            .description(Some("[vDisk, version]"));
        ArrayBuilder::new().items(pair).build()
    }

    /// One version of a vDisk, as the whole farm knows it.
    #[derive(ToSchema)]
    #[schema(as = CatalogVersion)]
    #[allow(dead_code)] // never built: it only describes the wire form
    struct Flat {
        number: u32,
        state: VersionState,
        /// Layer files, bottom first; empty once retired. A sealed layer file's
        /// name stands for one content farm-wide.
        layers: Vec<String>,
        created_unix: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sealed_unix: Option<u64>,
        /// Hex content hash, once sealed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content_hash: Option<String>,
        /// The server that made this version; while it is unsealed, the only one
        /// holding it.
        server: String,
    }

    impl PartialSchema for super::CatalogVersion {
        fn schema() -> RefOr<Schema> {
            Flat::schema()
        }
    }

    impl ToSchema for super::CatalogVersion {
        fn name() -> Cow<'static, str> {
            Flat::name()
        }

        fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
            Flat::schemas(schemas)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(sealed: bool) -> CatalogVersion {
        CatalogVersion {
            version: Version {
                number: 3,
                state: VersionState::Production,
                layers: vec!["v1-00000001.layer".into(), "v3-00000003.layer".into()],
                created_unix: 10,
                sealed_unix: sealed.then_some(11),
                content_hash: sealed.then(|| "ab".repeat(32)),
                boot_set_cleared_unix: None,
            },
            server: "s1".into(),
        }
    }

    /// The form farms made before the catalog reused [`Version`] hold in
    /// `catalog/NAME`: one flat object, optional fields left out when unset.
    #[test]
    fn a_catalog_entry_keeps_its_flat_json() {
        let sealed = format!(
            r#"{{"number":3,"state":"production","layers":["v1-00000001.layer","v3-00000003.layer"],"created_unix":10,"sealed_unix":11,"content_hash":"{}","server":"s1"}}"#,
            "ab".repeat(32)
        );
        let open = r#"{"number":3,"state":"production","layers":["v1-00000001.layer","v3-00000003.layer"],"created_unix":10,"server":"s1"}"#;
        assert_eq!(serde_json::to_string(&entry(true)).unwrap(), sealed);
        assert_eq!(serde_json::to_string(&entry(false)).unwrap(), open);
        for (json, want) in [(sealed.as_str(), entry(true)), (open, entry(false))] {
            let got: CatalogVersion = serde_json::from_str(json).unwrap();
            assert_eq!(got, want);
        }
        let err = serde_json::from_str::<CatalogVersion>(
            r#"{"number":3,"state":"production","layers":[],"created_unix":10}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("server"), "{err}");
    }

    #[test]
    fn replicated_means_sealed_live_and_hashed() {
        assert!(entry(true).is_replicated());
        assert!(!entry(false).is_replicated());
        let mut retired = entry(true);
        retired.version.state = VersionState::Retired;
        assert!(!retired.is_replicated());
        let mut empty = entry(true);
        empty.version.layers.clear();
        assert!(!empty.is_replicated());
    }
}
