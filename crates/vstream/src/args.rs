//! Arguments that several admin subcommands take in the same form.

use clap::Args;

/// `list [--json]`
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print the API's JSON (sizes in bytes) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `show NAME [--json]`
#[derive(Debug, Args)]
pub struct ShowArgs {
    pub name: String,
    /// Print the API's JSON (sizes in bytes).
    #[arg(long)]
    pub json: bool,
}

/// A command that takes just a name.
#[derive(Debug, Args)]
pub struct NameArg {
    pub name: String,
}
