//! `vstream farm`: farm-wide actions through any server's API.
//!
//! ```text
//!   rebalance [--trigger PCT]   POST /api/v1/farm/rebalance
//!   migrate --data DIR --to etcd://HOST:PORT   (offline: the server is stopped)
//! ```

use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand};
use vstream_api::Rebalance;

use crate::client::{api_path, connect, ClientArgs};
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
    /// Move a stopped one-server farm's state (its embedded farm.redb) into
    /// a new etcd farm, so the server starts with `--farm etcd://...` and
    /// keeps every vDisk, device and store. farm.redb is left as it was.
    Migrate(MigrateArgs),
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The stopped server's data folder, holding farm.redb.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/vstream")]
    pub data: std::path::PathBuf,
    /// The etcd farm to fill: etcd://HOST:PORT[,HOST:PORT...]. It must be new
    /// (no farm identity yet).
    #[arg(long, value_name = "etcd://HOST:PORT,...")]
    pub to: String,
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
    if let FarmCommand::Migrate(a) = args.command {
        return migrate(a);
    }
    let client = connect(&args.client)?;
    match args.command {
        FarmCommand::Migrate(_) => unreachable!("handled above"),
        FarmCommand::Rebalance(a) => {
            let body = Rebalance {
                trigger_pct: Some(a.trigger),
            };
            let path = api_path(&["farm", "rebalance"]);
            if a.json {
                let v: serde_json::Value = client.post_for(&path, &body)?;
                return print_json(&v);
            }
            let plan = client.rebalance(&body)?;
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

fn migrate(a: MigrateArgs) -> Result<()> {
    use vstream_server::config::FarmConfig;
    use vstream_server::identity;
    let endpoints = match a.to.parse::<FarmConfig>().map_err(|e| anyhow!(e))? {
        FarmConfig::Etcd(e) => e,
        FarmConfig::Embedded => bail!("--to names the etcd farm to fill: etcd://HOST:PORT"),
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let (n, id) = identity::migrate(&a.data, &endpoints).await?;
        print(&format!(
            "copied {n} records of farm {id} into etcd at {}; start the server with --farm {} \
             (farm.redb is left as it was)\n",
            endpoints.join(","),
            a.to
        ))
    })
}
