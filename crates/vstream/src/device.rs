//! `vstream device`: target devices through the admin API.
//!
//! ```text
//!   add NAME --mac MAC --vdisk VDISK   POST   /api/v1/devices
//!   list                               GET    /api/v1/devices
//!   show NAME                          GET    /api/v1/devices/NAME
//!   remove NAME                        DELETE /api/v1/devices/NAME
//!   reset NAME                         POST   /api/v1/devices/NAME/reset
//! ```

use anyhow::Result;
use clap::{Args, Subcommand};
use vstream_api::{CreateDevice, Device, DeviceInfo};

use crate::client::{api_path, Client, ClientArgs};
use crate::output::{format_unix_time, human_size, print, print_json, render_fields, render_table};

#[derive(Debug, Args)]
pub struct DeviceArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: DeviceCommand,
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Add a device that boots a vDisk.
    Add(AddArgs),
    /// List the devices and what they are doing.
    List(ListArgs),
    /// Show one device.
    Show(ShowArgs),
    /// Remove a device.
    Remove(NameArg),
    /// Reset a device (its session and write cache; see the server's docs).
    Reset(NameArg),
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// Name of the new device.
    pub name: String,
    /// Its network card's MAC address (aa:bb:cc:dd:ee:ff, AA-BB-..., aabb...).
    #[arg(long, value_name = "MAC", value_parser = vstream_api::parse_mac)]
    pub mac: String,
    /// The vDisk it boots.
    #[arg(long, value_name = "VDISK")]
    pub vdisk: String,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print the API's JSON (sizes in bytes) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    pub name: String,
    /// Print the API's JSON (sizes in bytes).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct NameArg {
    pub name: String,
}

pub fn run(args: DeviceArgs) -> Result<()> {
    let client = Client::from_args(&args.client)?;
    match args.command {
        DeviceCommand::Add(a) => add(&client, a),
        DeviceCommand::List(a) => list(&client, a),
        DeviceCommand::Show(a) => show(&client, a),
        DeviceCommand::Remove(a) => {
            client.delete(&api_path(&["devices", &a.name]))?;
            print(&format!("removed device {}\n", a.name))
        }
        DeviceCommand::Reset(a) => {
            client.post_empty(&api_path(&["devices", &a.name, "reset"]))?;
            print(&format!("reset device {}\n", a.name))
        }
    }
}

fn add(client: &Client, a: AddArgs) -> Result<()> {
    let body = CreateDevice {
        name: a.name,
        mac: a.mac,
        vdisk: a.vdisk,
        kind: Default::default(),
    };
    // The answer is a Device or a DeviceInfo (which holds one); either parses.
    let added: Option<Device> = client.post(&api_path(&["devices"]), &body)?;
    let (name, mac, vdisk) = match &added {
        Some(d) => (&d.name, &d.mac, &d.vdisk),
        None => (&body.name, &body.mac, &body.vdisk),
    };
    print(&format!(
        "added device {name} ({mac}) booting vDisk {vdisk}\n"
    ))
}

fn list(client: &Client, a: ListArgs) -> Result<()> {
    let path = api_path(&["devices"]);
    if a.json {
        return print_json(&client.get(&path)?);
    }
    let devices: Vec<DeviceInfo> = client.get(&path)?;
    print(&device_table(&devices))
}

fn device_table(devices: &[DeviceInfo]) -> String {
    let rows: Vec<Vec<String>> = devices
        .iter()
        .map(|i| {
            vec![
                i.device.name.clone(),
                i.device.mac.clone(),
                i.device.vdisk.clone(),
                yes_no(i.connected).to_string(),
                i.peer.clone().unwrap_or_else(|| "-".to_string()),
                human_size(i.cache_bytes),
            ]
        })
        .collect();
    render_table(
        &["NAME", "MAC", "VDISK", "CONNECTED", "PEER", "CACHE"],
        &rows,
    )
}

fn show(client: &Client, a: ShowArgs) -> Result<()> {
    let path = api_path(&["devices", &a.name]);
    if a.json {
        return print_json(&client.get(&path)?);
    }
    let info: DeviceInfo = client.get(&path)?;
    print(&device_fields(&info))
}

fn device_fields(i: &DeviceInfo) -> String {
    let d = &i.device;
    let connected = match (i.connected, i.connected_since) {
        (true, Some(t)) => format!("yes, since {}", format_unix_time(t)),
        (c, _) => yes_no(c).to_string(),
    };
    render_fields(&[
        ("name", d.name.clone()),
        ("mac", d.mac.clone()),
        ("vdisk", d.vdisk.clone()),
        ("connected", connected),
        ("peer", i.peer.clone().unwrap_or_else(|| "-".to_string())),
        ("write cache", human_size(i.cache_bytes)),
        ("created", format_unix_time(d.created_unix)),
    ])
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, peer: Option<&str>, cache_bytes: u64) -> DeviceInfo {
        DeviceInfo {
            device: Device {
                name: name.into(),
                mac: "aa:bb:cc:00:11:22".into(),
                vdisk: "win10".into(),
                created_unix: 1_700_000_000,
            },
            connected: peer.is_some(),
            connected_since: peer.map(|_| 1_700_000_060),
            peer: peer.map(str::to_string),
            cache_bytes,
        }
    }

    #[test]
    fn list_table() {
        let t = device_table(&[
            info("pc1", Some("10.0.0.5:51234"), 3 << 29),
            info("lab-pc-22", None, 0),
        ]);
        assert_eq!(
            t,
            "NAME       MAC                VDISK  CONNECTED  PEER            CACHE\n\
             pc1        aa:bb:cc:00:11:22  win10  yes        10.0.0.5:51234  1.5 GiB\n\
             lab-pc-22  aa:bb:cc:00:11:22  win10  no         -               0 B\n"
        );
    }

    #[test]
    fn show_fields() {
        assert_eq!(
            device_fields(&info("pc1", Some("10.0.0.5:51234"), 4096)),
            "name:        pc1\n\
             mac:         aa:bb:cc:00:11:22\n\
             vdisk:       win10\n\
             connected:   yes, since 2023-11-14 22:14:20 UTC\n\
             peer:        10.0.0.5:51234\n\
             write cache: 4 KiB\n\
             created:     2023-11-14 22:13:20 UTC\n"
        );
    }
}
