//! `vstream-agent`: the device agent alone, what a diskless device's
//! initramfs carries. The same program as `vstream target`, without the
//! server, the farm store (etcd, redb), the admin API or the netboot
//! services: it links the agent crate and the NBD service only.

mod log_fields;
mod logging;
mod target_cmd;

use std::process::ExitCode;

use clap::Parser;

/// Run a device's agent: log in, stream, keep the write cache, fail over.
#[derive(Debug, Parser)]
#[command(name = "vstream-agent", version)]
struct Cli {
    #[command(flatten)]
    args: target_cmd::TargetArgs,
}

fn main() -> ExitCode {
    // `vstream-agent target ...` is `vstream-agent ...`: a drop-in for
    // `vstream target` wherever a script names the subcommand.
    let args = std::env::args_os()
        .enumerate()
        .filter(|(i, a)| !(*i == 1 && a == "target"))
        .map(|(_, a)| a);
    match target_cmd::run(Cli::parse_from(args).args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
