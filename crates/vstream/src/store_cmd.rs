//! `vstream store`: named stores, folders every server holds locally.
//!
//! ```text
//!   add NAME --path PATH     POST   /api/v1/stores
//!   list [--json]            GET    /api/v1/stores
//!   remove NAME              DELETE /api/v1/stores/NAME
//! ```
//!
//! A server keeps a store at its farm path unless started with
//! `--store-path NAME=PATH`; `vdisk create|import --store NAME` puts a vDisk
//! in one.

use anyhow::Result;
use clap::{Args, Subcommand};
use vstream_api::{StoreDef, StoreInfo};

use crate::args::{ListArgs, NameArg};
use crate::client::{api_path, connect, ClientArgs};
use crate::output::{print, print_json, render_table};

#[derive(Debug, Args)]
pub struct StoreArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: StoreCommand,
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Add a named store: the folder every server keeps it in, unless it
    /// overrides the path (`vstream server --store-path NAME=PATH`).
    Add {
        name: String,
        /// An absolute folder, the same on every server.
        #[arg(long, value_name = "PATH")]
        path: String,
    },
    /// The named stores, their vDisks, and each server's folder for them.
    List(ListArgs),
    /// Remove a named store that holds no vDisk (its folders stay).
    Remove(NameArg),
}

pub fn run(args: StoreArgs) -> Result<()> {
    let client = connect(&args.client)?;
    match args.command {
        StoreCommand::Add { name, path } => {
            let def = client.add_store(&StoreDef { name, path })?;
            print(&format!("added store {} at {}\n", def.name, def.path))
        }
        StoreCommand::List(a) => {
            let path = api_path(&["stores"]);
            if a.json {
                return print_json(&client.get::<serde_json::Value>(&path)?);
            }
            let stores = client.stores()?;
            print(&table(&stores))
        }
        StoreCommand::Remove(a) => {
            client.delete_store(&a.name)?;
            print(&format!("removed store {}\n", a.name))
        }
    }
}

/// One row per store and server; a store no live server reports gets one
/// row with its farm path.
fn table(stores: &[StoreInfo]) -> String {
    let mut rows = Vec::new();
    for s in stores {
        let vdisks = if s.vdisks.is_empty() {
            "-".to_string()
        } else {
            s.vdisks.join(", ")
        };
        if s.servers.is_empty() {
            rows.push(vec![
                s.store.name.clone(),
                "-".into(),
                s.store.path.clone(),
                vdisks.clone(),
            ]);
        }
        for h in &s.servers {
            let path = match &h.problem {
                Some(p) => format!("{} (PROBLEM: {p})", h.path),
                None => h.path.clone(),
            };
            rows.push(vec![
                s.store.name.clone(),
                h.server.clone(),
                path,
                vdisks.clone(),
            ]);
        }
    }
    render_table(&["STORE", "SERVER", "PATH", "VDISKS"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vstream_api::StoreHere;

    #[test]
    fn one_row_per_store_and_server() {
        let here = |server: &str, path: &str, problem: Option<&str>| StoreHere {
            store: "fast".into(),
            server: server.into(),
            path: path.into(),
            problem: problem.map(Into::into),
        };
        let stores = vec![
            StoreInfo {
                store: StoreDef {
                    name: "fast".into(),
                    path: "/srv/fast".into(),
                },
                vdisks: vec!["a".into(), "b".into()],
                servers: vec![
                    here("s1", "/srv/fast", None),
                    here("s2", "/mnt/ssd", Some("permission denied")),
                ],
            },
            StoreInfo {
                store: StoreDef {
                    name: "cold".into(),
                    path: "/srv/cold".into(),
                },
                vdisks: vec![],
                servers: vec![],
            },
        ];
        let t = table(&stores);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[1].starts_with("fast   s1      /srv/fast"), "{t}");
        assert!(
            lines[2].contains("/mnt/ssd (PROBLEM: permission denied)"),
            "{t}"
        );
        assert!(lines[3].starts_with("cold   -       /srv/cold"), "{t}");
        assert!(lines[3].trim_end().ends_with('-'), "{t}");
    }
}
