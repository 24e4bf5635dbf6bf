//! A vDisk's versions: each a chain of layer files (bottom first), the last
//! of which is its own. The same record in a store's properties file and,
//! with the server that made it, in the farm's catalog.

use serde::{Deserialize, Serialize};

/// The state of a vDisk version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum VersionState {
    Maintenance,
    Test,
    Production,
    Retired,
}

impl std::fmt::Display for VersionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VersionState::Maintenance => "maintenance",
            VersionState::Test => "test",
            VersionState::Production => "production",
            VersionState::Retired => "retired",
        })
    }
}

/// One version of a vDisk: a `[[version]]` table of a store's properties
/// file, and (with the server that made it) a [`crate::CatalogVersion`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Version {
    pub number: u32,
    pub state: VersionState,
    /// Layer files, bottom first; empty once retired.
    pub layers: Vec<String>,
    pub created_unix: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_unix: Option<u64>,
    /// Hex content hash, known once sealed (or after an import).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_hash: Option<String>,
    /// When an administrator last cleared the version's boot set, farm-wide
    /// (a stamp: every server drops a set learned before it, and takes
    /// none from a peer that has not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_set_cleared_unix: Option<u64>,
}

impl Version {
    pub fn is_sealed(&self) -> bool {
        self.sealed_unix.is_some()
    }
    /// The version's own layer file.
    pub fn own_layer(&self) -> Option<&str> {
        self.layers.last().map(String::as_str)
    }
    pub fn is_live(&self) -> bool {
        self.state != VersionState::Retired && !self.layers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `[[version]]` table of a store's properties file, as older builds
    /// wrote it.
    #[test]
    fn a_version_keeps_its_properties_file_form() {
        let sealed = Version {
            number: 2,
            state: VersionState::Test,
            layers: vec!["a.layer".into(), "b.layer".into()],
            created_unix: 5,
            sealed_unix: Some(6),
            content_hash: Some("cd".into()),
            boot_set_cleared_unix: None,
        };
        let text = "number = 2\nstate = \"test\"\nlayers = [\"a.layer\", \"b.layer\"]\n\
                    created_unix = 5\nsealed_unix = 6\ncontent_hash = \"cd\"\n";
        assert_eq!(toml::to_string(&sealed).unwrap(), text);
        assert_eq!(toml::from_str::<Version>(text).unwrap(), sealed);
        let open = Version {
            state: VersionState::Maintenance,
            sealed_unix: None,
            content_hash: None,
            boot_set_cleared_unix: None,
            ..sealed
        };
        let text = "number = 2\nstate = \"maintenance\"\nlayers = [\"a.layer\", \"b.layer\"]\n\
                    created_unix = 5\n";
        assert_eq!(toml::to_string(&open).unwrap(), text);
        assert_eq!(toml::from_str::<Version>(text).unwrap(), open);
        assert!(!open.is_sealed() && open.is_live());
        assert_eq!(open.own_layer(), Some("b.layer"));
    }
}
