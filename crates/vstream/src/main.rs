//! `vstream`: the one command-line program of a vstream farm.
//!
//! ```text
//!   vstream server ...   run a provisioning server             (server_cmd.rs)
//!   vstream vdisk ...    manage vDisks through a server's API  (vdisk.rs, vdisk/)
//!   vstream device ...   manage devices through the API        (device.rs)
//!   vstream version ...  manage vDisk versions through the API (version.rs)
//!   vstream farm ...     farm-wide actions (rebalance)         (farm_cmd.rs)
//!   vstream replication  copying versions between servers      (replication_cmd.rs)
//!   vstream store ...    named stores, held on every server    (store_cmd.rs)
//!   vstream quarantine   vDisks a server holds the farm lacks  (quarantine_cmd.rs)
//!   vstream target ...   run a device's agent                  (target_cmd.rs)
//! ```
//!
//! `vstream-agent` (agent.rs) is `vstream target` alone, for an initramfs.
//!
//! Each subcommand lives in its own module and owns its clap arguments. The
//! admin commands (`vdisk`, `device`, `version`) are a thin HTTP client of the
//! server's JSON API, all going through `client.rs`; their `--api URL` and
//! `--token-file` options belong to them rather than to the whole program,
//! because `vstream server --api HOST:PORT` means a listen address instead.
//!
//! Errors end the program with `error: ...` on stderr and exit status 1; an
//! error sentence from the API is printed as the server wrote it.

mod args;
mod audit_cmd;
mod ca_cmd;
mod client;
mod device;
mod docs_cmd;
mod farm_cmd;
mod log_fields;
mod logging;
mod output;
mod quarantine_cmd;
mod replication_cmd;
mod server_cmd;
mod store_cmd;
mod target_cmd;
mod token_cmd;
mod vdisk;
mod version;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Streams vDisks to network-booted devices over NBD, and manages the farm.
#[derive(Debug, Parser)]
#[command(name = "vstream", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a provisioning server (NBD service and admin API).
    Server(Box<server_cmd::ServerArgs>),
    /// Create, import, export, list and change vDisks.
    #[command(name = "vdisk")]
    VDisk(vdisk::VDiskArgs),
    /// Add, list, change, remove and reset devices.
    Device(device::DeviceArgs),
    /// Create, promote, roll back, merge, list and delete vDisk versions.
    Version(version::VersionArgs),
    /// Farm-wide actions: rebalance.
    Farm(farm_cmd::FarmArgs),
    /// Replication of versions between the servers' stores: status, start now.
    Replication(replication_cmd::ReplicationArgs),
    /// Named stores: folders every server holds locally (add, list, remove).
    Store(store_cmd::StoreArgs),
    /// vDisks a server holds that the farm does not list: list, adopt, remove.
    Quarantine(quarantine_cmd::QuarantineArgs),
    /// Run a device's agent: log in, stream, keep the write cache, fail over.
    Target(target_cmd::TargetArgs),
    /// The farm's certificates: its CA, and each server's TLS folder.
    Ca(ca_cmd::CaArgs),
    /// API tokens: the farm's, with roles (create, list, revoke), and a
    /// server's own admin tokens in its data folder (add, list --data,
    /// remove); kept as SHA-256 digests only.
    Token(token_cmd::TokenArgs),
    /// The audit trail: who changed what, from where, when.
    Audit(audit_cmd::AuditArgs),
    /// Write the man pages and shell completions (for packaging).
    #[command(hide = true)]
    Docs(docs_cmd::DocsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Server(args) => server_cmd::run(*args),
        Command::VDisk(args) => vdisk::run(args),
        Command::Device(args) => device::run(args),
        Command::Version(args) => version::run(args),
        Command::Target(args) => target_cmd::run(args),
        Command::Farm(args) => farm_cmd::run(args),
        Command::Replication(args) => replication_cmd::run(args),
        Command::Store(args) => store_cmd::run(args),
        Command::Quarantine(args) => quarantine_cmd::run(args),
        Command::Ca(args) => ca_cmd::run(args),
        Command::Token(args) => token_cmd::run(args),
        Command::Audit(args) => audit_cmd::run(args),
        Command::Docs(args) => docs_cmd::run(args, <Cli as clap::CommandFactory>::command()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The API's own sentence stands alone, whatever context was added
            // on the way up; anything else shows its whole chain.
            match e
                .downcast_ref::<client::ClientError>()
                .filter(|c| c.is_status())
            {
                Some(api) => eprintln!("error: {api}"),
                None => eprintln!("error: {e:#}"),
            }
            if let Some(client::ClientError::Untrusted { .. }) = e.downcast_ref() {
                eprintln!(
                    "hint: give the farm's CA certificate with --api-ca FILE (or VSTREAM_API_CA); \
                     by default {} is used when it exists",
                    client::DEFAULT_CA_FILE
                );
            }
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("vstream").chain(args.iter().copied()))
    }

    #[test]
    fn documented_command_lines_parse() {
        for line in [
            "vdisk create win10 --size 8GiB",
            "vdisk import win10 disk.qcow2",
            "vdisk export win10 out.vhd --format vhd",
            "vdisk export win10@3 out.img",
            "vdisk list --json",
            "vdisk show win10 --json",
            "vdisk set win10 --mode standard --cache-limit 4GiB",
            "vdisk set win10 --cache-limit 4GiB",
            "vdisk delete win10",
            "device add pc1 --mac AA-BB-CC-00-11-22 --vdisk win10",
            "device add lab --mac aabbcc001122 --vdisk win10 --type maintenance",
            "device set pc1 --type test",
            "device list --json",
            "device show pc1",
            "device remove pc1",
            "device reset pc1",
            "version new win10",
            "version promote win10 2 --to test",
            "version promote win10 2 --to production",
            "version rollback win10",
            "version merge win10",
            "version merge win10 --upto 3",
            "version list win10",
            "version list win10 --json",
            "version delete win10 1",
            "server list --api http://h:1 --json",
            "farm rebalance --trigger 10",
            "server --farm etcd://10.0.0.1:2379,10.0.0.2:2379 --name pvs1 --power 2 --auto-rebalance 25",
            "target --bootstrap 10.0.0.1:7080,10.0.0.2:7080 --mac 52:54:00:00:00:01 \
             --listen unix:/run/vstream.sock --cache disk:/var/cache/vs:4GiB --deadline-ms 500",
            "version --api http://h:1 --token-file /tmp/t list win10",
            "server --data /srv/vs --nbd 0.0.0.0:10809 --nbd unix:/run/vs.sock \
             --api 127.0.0.1:7080 --log-format json --max-connections 10",
        ] {
            let args: Vec<&str> = line.split_whitespace().collect();
            if let Err(e) = parse(&args) {
                panic!("{line}: {e}");
            }
        }
    }

    #[test]
    fn client_options_go_before_or_after_the_action() {
        for args in [
            &["vdisk", "--api", "http://h:1", "list"][..],
            &["vdisk", "list", "--api", "http://h:1"][..],
        ] {
            let Command::VDisk(v) = parse(args).unwrap().command else {
                panic!("not a vdisk command");
            };
            assert_eq!(v.client.api, "http://h:1");
        }
        let Command::Version(v) = parse(&["version", "list", "win10", "--api", "http://h:2"])
            .unwrap()
            .command
        else {
            panic!("not a version command");
        };
        assert_eq!(v.client.api, "http://h:2");
        // The client's --api is not the server's.
        assert!(parse(&["--api", "http://h:1", "vdisk", "list"]).is_err());
    }

    #[test]
    fn set_needs_something_to_set() {
        assert!(parse(&["vdisk", "set", "win10"]).is_err());
        assert!(parse(&["vdisk", "set", "win10", "--mode", "shared"]).is_err());
    }

    #[test]
    fn device_types_and_version_states_are_checked() {
        assert!(parse(&["device", "set", "pc1"]).is_err());
        assert!(parse(&["device", "set", "pc1", "--type", "staging"]).is_err());
        let Command::Device(d) = parse(&[
            "device",
            "add",
            "a",
            "--mac",
            "aabbcc001122",
            "--vdisk",
            "v",
        ])
        .unwrap()
        .command
        else {
            panic!("not a device command");
        };
        let device::DeviceCommand::Add(add) = d.command else {
            panic!("not device add");
        };
        assert_eq!(add.kind, vstream_api::DeviceType::Production);
        assert!(parse(&["version", "promote", "win10", "2"]).is_err());
        assert!(parse(&["version", "promote", "win10", "2", "--to", "maintenance"]).is_err());
        assert!(parse(&["version", "promote", "win10", "x", "--to", "test"]).is_err());
        assert!(parse(&["version", "delete", "win10"]).is_err());
        assert!(parse(&["version", "merge", "win10", "--upto", "-1"]).is_err());
    }

    #[test]
    fn bad_sizes_and_macs_are_refused() {
        assert!(parse(&["vdisk", "create", "a", "--size", "8 parsecs"]).is_err());
        assert!(parse(&["device", "add", "a", "--mac", "aa:bb", "--vdisk", "v"]).is_err());
    }
}
