//! `vstream farm`: farm-wide actions through any server's API.
//!
//! ```text
//!   rebalance [--trigger PCT]   POST /api/v1/farm/rebalance
//! ```

use anyhow::Result;
use clap::{Args, Subcommand};
use vstream_api::{Rebalance, RebalancePlan};

use crate::client::{api_path, Client, ClientArgs};
use crate::output::{print, print_json};

#[derive(Debug, Args)]
pub struct FarmArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: FarmCommand,
}

#[derive(Debug, Subcommand)]
pub enum FarmCommand {
    /// Move devices so that no server carries more than the average load
    /// plus the trigger; moved devices switch servers with no I/O error.
    Rebalance(RebalanceArgs),
}

#[derive(Debug, Args)]
pub struct RebalanceArgs {
    /// Percent above the farm's average load (devices ÷ power) that a server
    /// may carry before devices move off it.
    #[arg(long, value_name = "PCT", default_value_t = 25.0)]
    pub trigger: f64,
    /// Print the API's JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: FarmArgs) -> Result<()> {
    let client = Client::from_args(&args.client)?;
    match args.command {
        FarmCommand::Rebalance(a) => {
            let body = Rebalance {
                trigger_pct: Some(a.trigger),
            };
            let path = api_path(&["farm", "rebalance"]);
            if a.json {
                let v: serde_json::Value = client.post_for(&path, &body)?;
                return print_json(&v);
            }
            let plan: RebalancePlan = client.post_for(&path, &body)?;
            let text = if plan.moves.is_empty() {
                format!(
                    "every server is within {}% of the average load: nothing to move\n",
                    plan.trigger_pct
                )
            } else {
                plan.moves
                    .iter()
                    .map(|m| {
                        format!(
                            "{}: {} device(s) move to less loaded servers\n",
                            m.server, m.devices
                        )
                    })
                    .collect()
            };
            print(&text)
        }
    }
}
