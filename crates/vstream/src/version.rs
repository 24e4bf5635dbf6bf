//! `vstream version`: the versions of a vDisk through the admin API.
//!
//! A vDisk's versions form a chain of layers. A new version starts in
//! maintenance (read/write, for one maintenance device), is sealed and
//! promoted to test and then production; devices boot the version their
//! type picks (`vstream device set NAME --type ...`).
//!
//! ```text
//!   new VDISK                             POST   /api/v1/vdisks/VDISK/versions
//!   promote VDISK VERSION --to STATE      POST   /api/v1/vdisks/VDISK/versions/VERSION/promote
//!   rollback VDISK                        POST   /api/v1/vdisks/VDISK/rollback
//!   merge VDISK [--upto VERSION]          POST   /api/v1/vdisks/VDISK/merge
//!   list VDISK                            GET    /api/v1/vdisks/VDISK/versions
//!   delete VDISK VERSION                  DELETE /api/v1/vdisks/VDISK/versions/VERSION
//!   clear-boot-set VDISK VERSION          DELETE /api/v1/vdisks/VDISK/versions/VERSION/boot-set
//! ```

use anyhow::Result;
use clap::{Args, Subcommand};
use vstream_api::{Merge, Promote, VersionInfo, VersionState};

use crate::client::{api_path, connect, Client, ClientArgs};
use crate::output::{
    boot_set_cell, format_unix_time, human_size, print, print_json, render_table, short_hash,
};

#[derive(Debug, Args)]
pub struct VersionArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: VersionCommand,
}

#[derive(Debug, Subcommand)]
pub enum VersionCommand {
    /// Seal a vDisk's newest version and start a maintenance version on top.
    New(VDiskArg),
    /// Promote a version to test or production, sealing it if needed.
    Promote(PromoteArgs),
    /// Set the newest production version back to test; the production
    /// version before it serves again.
    Rollback(VDiskArg),
    /// Merge the layers of a version and those below it into one; older
    /// versions are retired.
    Merge(MergeArgs),
    /// List a vDisk's versions.
    List(ListArgs),
    /// Delete a version.
    Delete(VersionArg),
    /// Clear a version's boot set on every server of the farm (what its
    /// devices read while they boot, read ahead of the boot storm): after a
    /// device read more than its boot in its first minutes, say. The next
    /// boots learn it again.
    ClearBootSet(VersionArg),
}

#[derive(Debug, Args)]
pub struct VDiskArg {
    /// The vDisk.
    pub vdisk: String,
}

#[derive(Debug, Args)]
pub struct VersionArg {
    /// The vDisk.
    pub vdisk: String,
    // Not `version`: that argument id is clap's own `--version` flag.
    /// The version number.
    #[arg(value_name = "VERSION")]
    pub number: u32,
}

#[derive(Debug, Args)]
pub struct PromoteArgs {
    /// The vDisk.
    pub vdisk: String,
    /// The version number.
    #[arg(value_name = "VERSION")]
    pub number: u32,
    /// The state to promote it to.
    #[arg(long, value_name = "test|production", value_parser = parse_promote_target)]
    pub to: VersionState,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The vDisk.
    pub vdisk: String,
    /// Merge up to this version [default: the newest production version].
    #[arg(long, value_name = "VERSION")]
    pub upto: Option<u32>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// The vDisk.
    pub vdisk: String,
    /// Print the API's JSON (sizes in bytes) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Versions are promoted to test or production only.
fn parse_promote_target(s: &str) -> Result<VersionState, String> {
    match s {
        "test" => Ok(VersionState::Test),
        "production" => Ok(VersionState::Production),
        _ => Err(format!(
            "cannot promote to {s:?}: expected test or production"
        )),
    }
}

pub fn run(args: VersionArgs) -> Result<()> {
    let client = connect(&args.client)?;
    match args.command {
        VersionCommand::New(a) => new(&client, a),
        VersionCommand::Promote(a) => promote(&client, a),
        VersionCommand::Rollback(a) => rollback(&client, a),
        VersionCommand::Merge(a) => merge(&client, a),
        VersionCommand::List(a) => list(&client, a),
        VersionCommand::Delete(a) => delete(&client, a),
        VersionCommand::ClearBootSet(a) => clear_boot_set(&client, a),
    }
}

fn new(client: &Client, a: VDiskArg) -> Result<()> {
    let v = client.create_version(&a.vdisk)?;
    print(&format!(
        "created {} version {} of vDisk {}\n",
        v.state, v.number, a.vdisk
    ))
}

fn promote(client: &Client, a: PromoteArgs) -> Result<()> {
    let body = Promote { to: a.to };
    let v = client.promote(&a.vdisk, a.number, &body)?;
    print(&format!(
        "version {} of vDisk {} is now {}: content hash {}\n",
        v.number,
        a.vdisk,
        v.state,
        full_hash(&v)
    ))
}

fn rollback(client: &Client, a: VDiskArg) -> Result<()> {
    let v = client.rollback(&a.vdisk)?;
    print(&format!(
        "rolled back vDisk {}: version {} is {} now, content hash {}\n",
        a.vdisk,
        v.number,
        v.state,
        full_hash(&v)
    ))
}

fn merge(client: &Client, a: MergeArgs) -> Result<()> {
    let body = Merge { upto: a.upto };
    let v = client.merge(&a.vdisk, &body)?;
    print(&format!(
        "merged vDisk {} up to version {}: content hash {}\n",
        a.vdisk,
        v.number,
        full_hash(&v)
    ))
}

fn clear_boot_set(client: &Client, a: VersionArg) -> Result<()> {
    let v = client.clear_boot_set(&a.vdisk, a.number)?;
    print(&format!(
        "cleared the boot set of version {} of vDisk {} across the farm; the next boots learn it again\n",
        v.number, a.vdisk
    ))
}

fn list(client: &Client, a: ListArgs) -> Result<()> {
    let path = api_path(&["vdisks", &a.vdisk, "versions"]);
    if a.json {
        return print_json(&client.get(&path)?);
    }
    let versions = client.versions(&a.vdisk)?;
    print(&version_table(&versions))
}

fn version_table(versions: &[VersionInfo]) -> String {
    let rows: Vec<Vec<String>> = versions
        .iter()
        .map(|v| {
            vec![
                v.number.to_string(),
                v.state.to_string(),
                format_unix_time(v.created_unix),
                v.sealed_unix
                    .map_or_else(|| "-".to_string(), format_unix_time),
                human_size(v.own_bytes),
                short_hash(v.content_hash.as_deref().unwrap_or("")),
                if v.devices.is_empty() {
                    "-".to_string()
                } else {
                    v.devices.join(",")
                },
                boot_set_cell(&v.boot_set),
            ]
        })
        .collect();
    render_table(
        &[
            "VERSION", "STATE", "CREATED", "SEALED", "SIZE", "HASH", "DEVICES", "BOOT SET",
        ],
        &rows,
    )
}

/// The whole content hash, or `-` while the version is unsealed.
fn full_hash(v: &VersionInfo) -> &str {
    match v.content_hash.as_deref() {
        Some(h) if !h.is_empty() => h,
        _ => "-",
    }
}

fn delete(client: &Client, a: VersionArg) -> Result<()> {
    client.delete_version(&a.vdisk, a.number)?;
    print(&format!(
        "deleted version {} of vDisk {}\n",
        a.number, a.vdisk
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(number: u32, state: VersionState, sealed: bool, devices: &[&str]) -> VersionInfo {
        VersionInfo {
            number,
            state,
            created_unix: 1_700_000_000,
            sealed_unix: sealed.then_some(1_700_003_600),
            own_bytes: 3 << 29,
            layers: number as usize,
            content_hash: sealed.then(|| "0123456789abcdef".repeat(4)),
            boot_set_cleared_unix: None,
            devices: devices.iter().map(|s| s.to_string()).collect(),
            boot_set: Default::default(),
        }
    }

    #[test]
    fn list_table() {
        let t = version_table(&[
            version(1, VersionState::Retired, true, &[]),
            VersionInfo {
                boot_set: vstream_api::BootSetState {
                    bytes: 250 << 20,
                    ..Default::default()
                },
                ..version(2, VersionState::Production, true, &["pc1", "pc2"])
            },
            version(3, VersionState::Maintenance, false, &["lab"]),
        ]);
        assert_eq!(
            t,
            "VERSION  STATE        CREATED                  SEALED                   \
             SIZE     HASH          DEVICES  BOOT SET\n\
             1        retired      2023-11-14 22:13:20 UTC  2023-11-14 23:13:20 UTC  \
             1.5 GiB  0123456789ab  -\n\
             2        production   2023-11-14 22:13:20 UTC  2023-11-14 23:13:20 UTC  \
             1.5 GiB  0123456789ab  pc1,pc2  250 MiB cached\n\
             3        maintenance  2023-11-14 22:13:20 UTC  -                        \
             1.5 GiB  -             lab\n"
        );
    }

    #[test]
    fn empty_list_is_the_header() {
        assert_eq!(
            version_table(&[]),
            "VERSION  STATE  CREATED  SEALED  SIZE  HASH  DEVICES  BOOT SET\n"
        );
    }

    #[test]
    fn empty_hash_reads_as_none() {
        let mut v = version(2, VersionState::Test, false, &[]);
        v.content_hash = Some(String::new());
        assert_eq!(full_hash(&v), "-");
        assert!(version_table(&[v])
            .lines()
            .nth(1)
            .unwrap()
            .contains("  -  "));
        let v = version(2, VersionState::Test, true, &[]);
        assert_eq!(full_hash(&v), "0123456789abcdef".repeat(4));
    }

    #[test]
    fn promote_targets() {
        assert_eq!(parse_promote_target("test"), Ok(VersionState::Test));
        assert_eq!(
            parse_promote_target("production"),
            Ok(VersionState::Production)
        );
        assert!(parse_promote_target("maintenance").is_err());
        assert!(parse_promote_target("retired").is_err());
        assert!(parse_promote_target("Production").is_err());
    }

    #[test]
    fn version_json_parses() {
        // The shape the server sends: optional fields null while unsealed.
        let json = r#"{"number":3,"state":"maintenance","created_unix":1700000000,
            "sealed_unix":null,"own_bytes":0,"layers":3,"content_hash":null,
            "devices":["lab"]}"#;
        let v: VersionInfo = serde_json::from_str(json).unwrap();
        assert_eq!(v.state, VersionState::Maintenance);
        assert_eq!(full_hash(&v), "-");
    }
}
