//! `vstream replication`: where each version stands on each server, and
//! "copy now".
//!
//! ```text
//!   status [--json]             GET  /api/v1/replication
//!   start [VDISK[@VERSION]]     POST /api/v1/replication/start
//! ```

use std::io::IsTerminal;

use anyhow::{anyhow, Result};
use clap::{Args, Subcommand};
use vstream_api::{ReplicaRow, ReplicaState, ReplicationStart};

use crate::client::{api_path, connect, ClientArgs};
use crate::output::{boot_set_cell, human_size, print, print_json, render_table};

#[derive(Debug, Args)]
pub struct ReplicationArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: ReplicationCommand,
}

#[derive(Debug, Subcommand)]
pub enum ReplicationCommand {
    /// Each sealed version on each server: missing, queued, copying (bytes,
    /// rate, ETA), verified or corrupt.
    Status {
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Copy now, outside the replication windows: everything, one vDisk, or
    /// one version (VDISK@VERSION).
    Start {
        #[arg(value_name = "VDISK[@VERSION]")]
        target: Option<String>,
    },
}

pub fn run(args: ReplicationArgs) -> Result<()> {
    let client = connect(&args.client)?;
    match args.command {
        ReplicationCommand::Status { json } => {
            let path = api_path(&["replication"]);
            if json {
                let v: serde_json::Value = client.get(&path)?;
                return print_json(&v);
            }
            let rows = client.replication()?;
            print(&render(&rows, std::io::stdout().is_terminal()))
        }
        ReplicationCommand::Start { target } => {
            let body = parse_target(target.as_deref())?;
            let order = client.start_replication(&body)?;
            let list: Vec<String> = order
                .versions
                .iter()
                .map(|(d, n)| format!("{d}@{n}"))
                .collect();
            print(&format!(
                "replicating now, outside the windows: {}\n",
                list.join(", ")
            ))
        }
    }
}

fn parse_target(target: Option<&str>) -> Result<ReplicationStart> {
    let Some(t) = target else {
        return Ok(ReplicationStart::default());
    };
    let (vdisk, version) = match t.split_once('@') {
        Some((d, n)) => {
            let n = n
                .parse()
                .map_err(|_| anyhow!("{t:?}: the version after @ must be a number"))?;
            (d, Some(n))
        }
        None => (t, None),
    };
    Ok(ReplicationStart {
        vdisk: Some(vdisk.to_owned()),
        version,
    })
}

/// A table; on a terminal, copying rows get a progress bar.
fn render(rows: &[ReplicaRow], bars: bool) -> String {
    if rows.is_empty() {
        return "no sealed versions in the farm\n".into();
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let p = &r.progress;
            let progress = match p.state {
                ReplicaState::Copying => {
                    let pct = (p.bytes_done * 100).checked_div(p.bytes_total).unwrap_or(0);
                    let bar = if bars {
                        format!("{} ", bar(pct, 20))
                    } else {
                        String::new()
                    };
                    let eta = r.eta_s.map(|s| format!(" ETA {s}s")).unwrap_or_default();
                    format!(
                        "{bar}{pct}% {}/{} {}/s{eta}",
                        human_size(p.bytes_done),
                        human_size(p.bytes_total),
                        human_size(p.rate)
                    )
                }
                _ => p.note.clone().unwrap_or_default(),
            };
            vec![
                format!("{}@{}", p.vdisk, p.version),
                r.server.clone(),
                if r.up { "up" } else { "down" }.to_string(),
                p.state.to_string(),
                progress,
                boot_set(r),
            ]
        })
        .collect();
    render_table(
        &["VERSION", "SERVER", "UP", "STATE", "PROGRESS", "BOOT SET"],
        &table,
    )
}

/// The boot set the server reads ahead for the version: its size, and
/// whether it was all in the page cache at the server's last check.
fn boot_set(r: &ReplicaRow) -> String {
    boot_set_cell(&r.boot_set)
}

fn bar(pct: u64, width: u64) -> String {
    let full = (pct.min(100) * width / 100) as usize;
    format!(
        "[{}{}]",
        "#".repeat(full),
        ".".repeat(width as usize - full)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use vstream_api::ReplicaProgress;

    #[test]
    fn targets_and_rows() {
        assert_eq!(parse_target(None).unwrap(), ReplicationStart::default());
        let t = parse_target(Some("win@3")).unwrap();
        assert_eq!((t.vdisk.as_deref(), t.version), (Some("win"), Some(3)));
        assert!(parse_target(Some("win@x")).is_err());
        let row = ReplicaRow {
            server: "s2".into(),
            up: true,
            progress: ReplicaProgress {
                vdisk: "win".into(),
                version: 3,
                state: ReplicaState::Copying,
                bytes_done: 50 << 20,
                bytes_total: 100 << 20,
                rate: 10 << 20,
                note: None,
            },
            eta_s: Some(5),
            boot_set: Default::default(),
        };
        let text = render(std::slice::from_ref(&row), true);
        assert!(text.contains("[##########..........] 50%"), "{text}");
        assert!(text.contains("ETA 5s"), "{text}");
        assert!(text.contains("copying"), "{text}");
        assert!(!text.contains("cached"), "{text}");
        let mut warm = row.clone();
        warm.boot_set.bytes = 10 << 20;
        assert!(boot_set(&warm).ends_with(" cached"), "{}", boot_set(&warm));
        let mut cold = warm.clone();
        cold.boot_set.uncached = 2 << 20;
        assert!(
            boot_set(&cold).contains("not cached"),
            "{}",
            boot_set(&cold)
        );
        let mut over = cold.clone();
        over.boot_set.over_budget = true;
        assert_eq!(boot_set(&over), "10 MiB, over budget: not read ahead");
    }
}
