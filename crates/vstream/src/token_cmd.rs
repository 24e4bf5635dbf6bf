//! `vstream token`: the admin tokens a server accepts, edited in its data
//! folder (root, on the server; the API cannot mint its own keys).
//!
//! ```text
//!   add NAME [--out FILE]    a new token: FILE (0600) or standard output;
//!                            the server keeps its SHA-256 only
//!   list [--json]            names and the start of each digest
//!   remove NAME              refused from the server's next request on
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
    /// The server's data folder, which holds admin-tokens.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/vstream",
        global = true
    )]
    pub data: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token named NAME; the server accepts it at once.
    Add {
        name: String,
        /// Write the token to FILE (made with mode 0600, not overwritten)
        /// instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// The tokens' names and the first digits of their SHA-256.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Stop accepting the token named NAME.
    Remove { name: String },
}

pub fn run(args: TokenArgs) -> Result<()> {
    let data = &args.data;
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
            match out {
                Some(out) => {
                    admin_tokens::write_private(&out, &format!("{token}\n"))
                        .with_context(|| format!("token {name:?} was made but not written"))?;
                    eprintln!("token {name:?} written to {}", out.display());
                    Ok(())
                }
                None => print(&format!("{token}\n")),
            }
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
    }
}
