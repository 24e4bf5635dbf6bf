//! `vstream token`: API tokens.
//!
//! The farm's tokens, with a role, through the API (an admin's token), for
//! every server at once:
//!
//! ```text
//!   create NAME --role ROLE [--expires DUR] [--out FILE]   POST   /api/v1/tokens
//!   list [--json]                                          GET    /api/v1/tokens
//!   revoke NAME                                            DELETE /api/v1/tokens/NAME
//! ```
//!
//! One server's own admin tokens, edited in its data folder (root, on the
//! server), for its local CLI and for the first admin:
//!
//! ```text
//!   add NAME [--out FILE] --data DIR   a new token: FILE (0600) or standard output;
//!                                      the server keeps its SHA-256 only
//!   list --data DIR [--json]           names and the start of each digest
//!   remove NAME --data DIR             refused from the server's next request on
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use vstream_server::admin_tokens;

use crate::output::{print, print_json, render_table};

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    pub command: TokenCommand,
    /// A server's data folder, which holds its own admin-tokens (for add,
    /// remove, and list of that server's tokens) [default for add and
    /// remove: /var/lib/vstream].
    #[arg(long, value_name = "DIR", global = true)]
    pub data: Option<PathBuf>,
    #[command(flatten)]
    pub client: crate::client::ClientArgs,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a farm token with a role; every server accepts it at once. The
    /// token is shown this once.
    Create {
        name: String,
        /// admin, operator (device actions, rebalance, replication start),
        /// viewer (read only) or metrics (/metrics only).
        #[arg(long, value_parser = parse_role)]
        role: vstream_api::Role,
        /// How long it stays good, such as 30d, 12h or 90m; without it,
        /// until revoked.
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        expires: Option<u64>,
        /// Write the token to FILE (made with mode 0600, not overwritten)
        /// instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Revoke a farm token: every server refuses it within a second.
    Revoke { name: String },
    /// Make a token named NAME in one server's own store (--data); that
    /// server accepts it at once, as an admin's.
    Add {
        name: String,
        /// Write the token to FILE (made with mode 0600, not overwritten)
        /// instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// The farm's tokens and their roles; with --data, that server's own
    /// tokens' names and the first digits of their SHA-256.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Stop accepting the token named NAME (one server's own, --data).
    Remove { name: String },
}

fn parse_role(s: &str) -> Result<vstream_api::Role, String> {
    s.parse()
}

/// `30d`, `12h`, `90m`, `45s` or plain seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 30d, 12h, 90m or 45s"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit is s, m, h or d")),
    };
    n.checked_mul(scale)
        .filter(|&t| t > 0)
        .ok_or_else(|| format!("{s:?} is not a duration of at least a second"))
}

fn write_token(token: &str, out: Option<&PathBuf>, name: &str) -> Result<()> {
    match out {
        Some(out) => {
            admin_tokens::write_private(out, &format!("{token}\n"))
                .with_context(|| format!("token {name:?} was made but not written"))?;
            eprintln!("token {name:?} written to {}", out.display());
            Ok(())
        }
        None => print(&format!("{token}\n")),
    }
}

fn farm(args: TokenArgs) -> Result<()> {
    let client = crate::client::connect(&args.client)?;
    match args.command {
        TokenCommand::Create {
            name,
            role,
            expires,
            out,
        } => {
            if let Some(out) = &out {
                if out.exists() {
                    anyhow::bail!("{} exists; not overwriting it", out.display());
                }
            }
            let body = vstream_api::CreateToken {
                name,
                role,
                expires_secs: expires,
            };
            let made: vstream_api::NewToken = client.post_for("/api/v1/tokens", &body)?;
            write_token(&made.token, out.as_ref(), &made.info.name)
        }
        TokenCommand::Revoke { name } => {
            client.delete(&crate::client::api_path(&["tokens", &name]))?;
            eprintln!("token {name:?} revoked");
            Ok(())
        }
        TokenCommand::List { json } => {
            if json {
                return print_json(&client.get("/api/v1/tokens")?);
            }
            let tokens: Vec<vstream_api::TokenInfo> = client.get("/api/v1/tokens")?;
            let rows: Vec<Vec<String>> = tokens
                .iter()
                .map(|t| {
                    vec![
                        t.name.clone(),
                        t.role.to_string(),
                        crate::output::format_unix_time(t.created_unix),
                        t.expires_unix
                            .map_or_else(|| "never".into(), crate::output::format_unix_time),
                        t.created_by.clone(),
                    ]
                })
                .collect();
            print(&render_table(
                &["NAME", "ROLE", "CREATED", "EXPIRES", "BY"],
                &rows,
            ))
        }
        TokenCommand::Add { .. } | TokenCommand::Remove { .. } => unreachable!(),
    }
}

pub fn run(args: TokenArgs) -> Result<()> {
    let local = match &args.command {
        TokenCommand::Add { .. } | TokenCommand::Remove { .. } => true,
        TokenCommand::List { .. } => args.data.is_some(),
        TokenCommand::Create { .. } | TokenCommand::Revoke { .. } => false,
    };
    if !local {
        return farm(args);
    }
    let data = &args
        .data
        .clone()
        .unwrap_or_else(|| PathBuf::from("/var/lib/vstream"));
    // The first start of a server makes the store; before that there is
    // nothing to edit.
    if !data.join(admin_tokens::STORE_FILE).exists() {
        anyhow::bail!(
            "{} has no {}: is it a vstream server's data folder (--data), and has the \
             server started once?",
            data.display(),
            admin_tokens::STORE_FILE
        );
    }
    match args.command {
        TokenCommand::Add { name, out } => {
            if let Some(out) = &out {
                if out.exists() {
                    anyhow::bail!("{} exists; not overwriting it", out.display());
                }
            }
            let token = admin_tokens::add(data, &name)?;
            write_token(&token, out.as_ref(), &name)
        }
        TokenCommand::List { json } => {
            let entries = admin_tokens::read(data)?;
            if json {
                let list: Vec<_> = entries
                    .iter()
                    .map(|e| serde_json::json!({"name": e.name, "sha256": e.digest}))
                    .collect();
                return print_json(&serde_json::Value::Array(list));
            }
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|e| vec![e.name.clone(), format!("{}…", &e.digest[..12])])
                .collect();
            print(&render_table(&["NAME", "SHA-256"], &rows))
        }
        TokenCommand::Remove { name } => {
            admin_tokens::remove(data, &name)?;
            eprintln!("token {name:?} removed");
            Ok(())
        }
        TokenCommand::Create { .. } | TokenCommand::Revoke { .. } => unreachable!(),
    }
}
