//! The farm's catalog of vDisk versions, and what servers report about
//! copying them between their stores.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use vstream_model::{
    Catalog, CatalogVersion, ReplicaProgress, ReplicaState, ReplicationOverride,
};

/// One row of `vstream replication status`: a version on a server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReplicaRow {
    pub server: String,
    /// The server is up (its lease is alive).
    pub up: bool,
    #[serde(flatten)]
    pub progress: ReplicaProgress,
    /// Seconds left at the current rate, while copying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<u64>,
    /// The server's boot set of the version.
    #[serde(flatten)]
    pub boot_set: vstream_model::BootSetState,
}

/// `POST /api/v1/replication/start`: copy now, outside the time windows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReplicationStart {
    /// Only this vDisk (default: every vDisk).
    #[serde(default)]
    pub vdisk: Option<String>,
    /// Only this version of it.
    #[serde(default)]
    pub version: Option<u32>,
}

#[cfg(test)]
mod tests {
    use utoipa::openapi::{schema::Schema, RefOr};
    use utoipa::PartialSchema;

    use super::*;
    use crate::{Version, VersionState};

    fn entry(sealed: bool) -> CatalogVersion {
        CatalogVersion {
            version: Version {
                number: 1,
                state: VersionState::Production,
                layers: vec!["a".into()],
                created_unix: 1,
                sealed_unix: sealed.then_some(2),
                content_hash: sealed.then(|| "ab".into()),
                boot_set_cleared_unix: None,
            },
            server: "s1".into(),
        }
    }

    fn keys(v: &CatalogVersion) -> Vec<String> {
        let serde_json::Value::Object(map) = serde_json::to_value(v).unwrap() else {
            panic!("a catalog entry is a JSON object");
        };
        let mut keys: Vec<String> = map.keys().cloned().collect();
        keys.sort();
        keys
    }

    /// `CatalogVersion`'s schema is written apart from its serde form (see
    /// `vstream_model`): it must name exactly the fields the JSON carries,
    /// and require exactly those always present.
    #[test]
    fn the_catalog_entry_schema_is_its_json() {
        let RefOr::T(Schema::Object(schema)) = CatalogVersion::schema() else {
            panic!("CatalogVersion's schema is not an object");
        };
        let mut properties: Vec<String> = schema.properties.keys().cloned().collect();
        properties.sort();
        assert_eq!(properties, keys(&entry(true)));
        let mut required = schema.required.clone();
        required.sort();
        assert_eq!(required, keys(&entry(false)));
    }
}
