//! The version model of a vDisk, as kept in its properties file: each version
//! is a chain of layers (bottom first), the last of which is its own.
//!
//! ```text
//!   v1 production   [v1]
//!   v2 test         [v1, v2]
//!   v3 maintenance  [v1, v2, v3]   <- writable by one maintenance device
//! ```
//!
//! A version is sealed once its own layer is immutable and hashed. A merge
//! replaces the bottom of every chain by one merged layer with the same content.
//! Nothing here does I/O.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use vstream_model::DeviceType;
/// A version and its states are the domain model's: one record from the
/// properties file to the farm's catalog and the wire.
pub use vstream_model::{Version, VersionState};

/// The properties file of a vDisk: our .pvp.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Properties {
    /// Format of this file: 2.
    pub format: u32,
    pub name: String,
    /// Virtual size in bytes.
    pub size: u64,
    pub created_unix: u64,
    /// The highest version number ever given: numbers are never reused, so a
    /// number always means one content.
    #[serde(default)]
    pub last_number: u32,
    #[serde(rename = "version", default)]
    pub versions: Vec<Version>,
}

impl Properties {
    pub fn version(&self, number: u32) -> Option<&Version> {
        self.versions.iter().find(|v| v.number == number)
    }

    pub fn version_mut(&mut self, number: u32) -> Option<&mut Version> {
        self.versions.iter_mut().find(|v| v.number == number)
    }

    /// The highest-numbered live version in `state`.
    pub fn newest(&self, state: VersionState) -> Option<&Version> {
        self.versions
            .iter()
            .filter(|v| v.state == state && v.is_live())
            .max_by_key(|v| v.number)
    }

    /// The version a device of type `kind` boots: a maintenance device the
    /// newest maintenance version, a test device the newest test version
    /// (else production), a production device the newest production one.
    /// The error says what is missing, for the device's administrator.
    pub fn version_for(&self, kind: DeviceType) -> Result<u32, String> {
        let v = match kind {
            DeviceType::Maintenance => self.newest(VersionState::Maintenance).ok_or_else(|| {
                format!(
                    "vDisk {} has no maintenance version; create one with `vstream version new {}`",
                    self.name, self.name
                )
            })?,
            DeviceType::Test => self
                .newest(VersionState::Test)
                .or_else(|| self.newest(VersionState::Production))
                .ok_or_else(|| format!("vDisk {} has no test or production version", self.name))?,
            DeviceType::Production => self
                .newest(VersionState::Production)
                .ok_or_else(|| format!("vDisk {} has no production version", self.name))?,
        };
        Ok(v.number)
    }

    /// The highest-numbered live version, whatever its state.
    /// The versions a merge up to version `upto` retires: older live
    /// versions that are neither the newest in production or test nor built
    /// on `upto`'s layers (those are rewritten onto the merged layer).
    pub fn retired_by_merge(&self, upto: u32) -> Vec<u32> {
        let Some(target) = self.version(upto) else {
            return Vec::new();
        };
        let keep: Vec<u32> = [VersionState::Production, VersionState::Test]
            .iter()
            .filter_map(|s| self.newest(*s).map(|v| v.number))
            .collect();
        self.versions
            .iter()
            .filter(|v| !v.layers.starts_with(&target.layers))
            .filter(|v| v.number < upto && v.is_live() && !keep.contains(&v.number))
            .map(|v| v.number)
            .collect()
    }

    pub fn head(&self) -> Option<&Version> {
        self.versions
            .iter()
            .filter(|v| v.is_live())
            .max_by_key(|v| v.number)
    }

    pub fn next_number(&self) -> u32 {
        self.versions
            .iter()
            .map(|v| v.number)
            .max()
            .unwrap_or(0)
            .max(self.last_number)
            + 1
    }

    /// Every layer file some version uses.
    pub fn referenced_files(&self) -> BTreeSet<String> {
        self.versions
            .iter()
            .flat_map(|v| v.layers.iter().cloned())
            .collect()
    }

    /// Checks the invariants; the error says which one broke.
    pub fn check(&self) -> Result<(), String> {
        if self.format != 2 {
            return Err(format!("format {} is not supported", self.format));
        }
        if self.newest(VersionState::Production).is_none() {
            return Err("no production version".into());
        }
        let maint = self
            .versions
            .iter()
            .filter(|v| v.state == VersionState::Maintenance)
            .count();
        if maint > 1 {
            return Err("more than one maintenance version".into());
        }
        let mut seen = BTreeSet::new();
        for v in &self.versions {
            if !seen.insert(v.number) {
                return Err(format!("version {} appears twice", v.number));
            }
            if v.state != VersionState::Retired && v.layers.is_empty() {
                return Err(format!("version {} has no layers", v.number));
            }
            if v.state == VersionState::Maintenance && v.is_sealed() {
                return Err(format!("maintenance version {} is sealed", v.number));
            }
            if v.layers
                .iter()
                .any(|f| f.contains('/') || f.starts_with('.'))
            {
                return Err(format!(
                    "version {} names a layer outside the vDisk folder",
                    v.number
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(number: u32, state: VersionState, layers: &[&str]) -> Version {
        Version {
            number,
            state,
            layers: layers.iter().map(|s| s.to_string()).collect(),
            created_unix: 0,
            sealed_unix: (state != VersionState::Maintenance).then_some(1),
            content_hash: None,
            boot_set_cleared_unix: None,
        }
    }

    #[test]
    fn selection_and_invariants() {
        let p = Properties {
            format: 2,
            name: "x".into(),
            size: 4096,
            created_unix: 0,
            last_number: 0,
            versions: vec![
                v(1, VersionState::Production, &["a"]),
                v(2, VersionState::Production, &["a", "b"]),
                v(3, VersionState::Test, &["a", "b", "c"]),
                v(4, VersionState::Maintenance, &["a", "b", "c", "d"]),
                v(5, VersionState::Retired, &[]),
            ],
        };
        p.check().unwrap();
        assert_eq!(p.newest(VersionState::Production).unwrap().number, 2);
        assert_eq!(p.head().unwrap().number, 4);
        assert_eq!(p.next_number(), 6);
        assert_eq!(p.referenced_files().len(), 4);
        assert_eq!(p.version_for(DeviceType::Production), Ok(2));
        assert_eq!(p.version_for(DeviceType::Test), Ok(3));
        assert_eq!(p.version_for(DeviceType::Maintenance), Ok(4));
        let mut plain = p.clone();
        plain.versions.retain(|v| v.number <= 2);
        assert_eq!(
            plain.version_for(DeviceType::Test),
            Ok(2),
            "test falls back"
        );
        assert!(plain
            .version_for(DeviceType::Maintenance)
            .unwrap_err()
            .contains("vstream version new x"));
        let text = toml::to_string(&p).unwrap();
        assert_eq!(toml::from_str::<Properties>(&text).unwrap(), p);
        let mut bad = p.clone();
        bad.versions.retain(|v| v.state != VersionState::Production);
        assert!(bad.check().unwrap_err().contains("production"));
        let mut bad = p.clone();
        bad.versions.push(v(6, VersionState::Maintenance, &["e"]));
        assert!(bad.check().is_err());
    }
}
