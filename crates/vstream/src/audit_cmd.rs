//! `vstream audit`: the farm's audit trail of changes and refusals.
//!
//! ```text
//!   list [--since DUR] [--object OBJ] [--limit N] [--json]   GET /api/v1/audit
//! ```

use anyhow::Result;
use clap::{Args, Subcommand};
use vstream_api::AuditEntry;

use crate::client::{connect, ClientArgs};
use crate::output::{format_unix_time, print, print_json, render_table};

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: AuditCommand,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Who changed what, from where, when, and how it ended; oldest first.
    List {
        /// Only the last DUR, such as 1h or 7d.
        #[arg(long, value_name = "DUR", value_parser = crate::token_cmd::parse_duration)]
        since: Option<u64>,
        /// Only this object (`device/pc1`, `vdisk/win10`) or kind (`device/`).
        #[arg(long, value_name = "OBJ")]
        object: Option<String>,
        /// Only the newest N [default: 1000].
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: AuditArgs) -> Result<()> {
    let client = connect(&args.client)?;
    let AuditCommand::List {
        since,
        object,
        limit,
        json,
    } = args.command;
    let mut query = Vec::new();
    if let Some(ago) = since {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        query.push(format!("since={}", now.saturating_sub(ago)));
    }
    if let Some(o) = &object {
        query.push(format!("object={}", encode(o)));
    }
    if let Some(n) = limit {
        query.push(format!("limit={n}"));
    }
    let path = match query.is_empty() {
        true => "/api/v1/audit".to_owned(),
        false => format!("/api/v1/audit?{}", query.join("&")),
    };
    if json {
        return print_json(&client.get(&path)?);
    }
    let entries: Vec<AuditEntry> = client.get(&path)?;
    print(&table(&entries))
}

/// Query-string form of `s`: letters, digits and `-._~/` as they are.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn table(entries: &[AuditEntry]) -> String {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                format_unix_time(e.at_ms / 1000),
                e.who.clone(),
                e.from.clone(),
                e.server.clone(),
                format!("{} {}", e.method, e.path),
                e.status.to_string(),
                match (e.result.as_str(), e.summary.is_empty()) {
                    ("ok", true) => "ok".into(),
                    ("ok", false) => e.summary.clone(),
                    (why, _) => why.to_owned(),
                },
            ]
        })
        .collect();
    render_table(
        &["TIME", "WHO", "FROM", "SERVER", "REQUEST", "STATUS", "WHAT"],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_escaped_in_the_query() {
        assert_eq!(encode("device/pc-1"), "device/pc-1");
        assert_eq!(encode("a b&c"), "a%20b%26c");
    }
}
