//! `vstream quarantine`: vDisks a server holds that the farm does not list.
//!
//! ```text
//!   list [--json]                                GET    /api/v1/servers (each one's quarantined)
//!   adopt NAME [--server S] [--mode M] [--yes]   POST   S: /api/v1/quarantine/NAME/adopt
//!   remove NAME [--server S] [--yes]             DELETE S: /api/v1/quarantine/NAME
//! ```
//!
//! A server never deletes a vDisk the farm does not prove deleted: it keeps
//! it in quarantine. Adopting and removing run on the server holding the
//! copy (found in the farm's status; `--server` picks one where several hold
//! a copy). Without `--yes` they only say what they would do.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use vstream_api::{Adopt, CacheType, Mode, Quarantined, ServerInfo};

use crate::args::ListArgs;
use crate::client::{connect, ClientArgs};
use crate::output::{human_size, print, print_json, render_table};

#[derive(Debug, Args)]
pub struct QuarantineArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: QuarantineCommand,
}

#[derive(Debug, Subcommand)]
pub enum QuarantineCommand {
    /// Every quarantined vDisk in the farm, with the server holding it.
    List(ListArgs),
    /// Make a quarantined vDisk a vDisk of the farm again, from its copy.
    Adopt {
        name: String,
        /// The server whose copy is adopted (needed when several hold one).
        #[arg(long, value_name = "SERVER")]
        server: Option<String>,
        /// The mode of the farm record made for it [default: as `vdisk create`].
        #[arg(long, value_name = "private|standard", value_parser = parse_mode)]
        mode: Option<Mode>,
        /// Where its Standard-mode write caches live [default: as `vdisk create`].
        #[arg(long, value_name = "server|device", value_parser = parse_cache_type)]
        cache_type: Option<CacheType>,
        /// Do it; without this, only say what would be done.
        #[arg(long)]
        yes: bool,
    },
    /// Delete a quarantined vDisk's copy from the server holding it.
    Remove {
        name: String,
        /// The server whose copy is deleted (needed when several hold one).
        #[arg(long, value_name = "SERVER")]
        server: Option<String>,
        /// Do it; without this, only say what would be done.
        #[arg(long)]
        yes: bool,
    },
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    s.parse()
}

fn parse_cache_type(s: &str) -> Result<CacheType, String> {
    s.parse()
}

pub fn run(args: QuarantineArgs) -> Result<()> {
    let client = connect(&args.client)?;
    let servers = client.servers()?;
    match args.command {
        QuarantineCommand::List(a) => {
            let all: Vec<&Quarantined> = servers
                .iter()
                .flat_map(|s| s.status.quarantined.iter())
                .collect();
            if a.json {
                return print_json(&serde_json::to_value(&all)?);
            }
            if all.is_empty() {
                return print("no vDisk is in quarantine\n");
            }
            print(&table(&all))
        }
        QuarantineCommand::Adopt {
            name,
            server,
            mode,
            cache_type,
            yes,
        } => {
            let (q, holder) = find(&servers, &name, server.as_deref())?;
            let plan = format!(
                "adopt vDisk {name} from server {}: a farm record ({} bytes, versions {:?}) and its catalog \
                 are made from this copy; every other server then replicates it\n",
                q.server, q.size, q.versions
            );
            if !yes {
                return print(&format!("{plan}nothing done: run again with --yes\n"));
            }
            let at = client.at(&holder.status.api)?;
            at.adopt_quarantined(&name, &Adopt { mode, cache_type })?;
            print(&format!("adopted vDisk {name} into the farm\n"))
        }
        QuarantineCommand::Remove { name, server, yes } => {
            let (q, holder) = find(&servers, &name, server.as_deref())?;
            let plan = format!(
                "remove vDisk {name} from server {}'s store: versions {:?}, {} on disk, deleted for good\n",
                q.server,
                q.versions,
                human_size(q.bytes)
            );
            if !yes {
                return print(&format!("{plan}nothing done: run again with --yes\n"));
            }
            client.at(&holder.status.api)?.delete_quarantined(&name)?;
            print(&format!("removed vDisk {name} from server {}\n", q.server))
        }
    }
}

/// The quarantined copy of `name` (on `server`, if given) and its holder.
fn find<'a>(
    servers: &'a [ServerInfo],
    name: &str,
    server: Option<&str>,
) -> Result<(&'a Quarantined, &'a ServerInfo)> {
    let hits: Vec<(&Quarantined, &ServerInfo)> = servers
        .iter()
        .filter(|s| server.is_none_or(|want| s.status.name == want))
        .flat_map(|s| {
            s.status
                .quarantined
                .iter()
                .filter(|q| q.vdisk == name)
                .map(move |q| (q, s))
        })
        .collect();
    match hits.as_slice() {
        [] => bail!(
            "no server{} holds vDisk {name} in quarantine (`vstream quarantine list`)",
            server.map(|s| format!(" named {s}")).unwrap_or_default()
        ),
        [one] => {
            if !one.1.up {
                bail!("server {} holding it is down", one.1.status.name);
            }
            Ok(*one)
        }
        many => bail!(
            "servers {} each hold a vDisk {name} in quarantine: name one with --server",
            many.iter()
                .map(|(_, s)| s.status.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn table(all: &[&Quarantined]) -> String {
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|q| {
            vec![
                q.vdisk.clone(),
                q.server.clone(),
                human_size(q.size),
                q.versions
                    .iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                human_size(q.bytes),
                q.reason.clone(),
            ]
        })
        .collect();
    render_table(
        &["VDISK", "SERVER", "SIZE", "VERSIONS", "ON DISK", "WHY"],
        &rows,
    )
}
