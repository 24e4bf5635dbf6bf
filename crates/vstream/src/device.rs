//! `vstream device`: target devices through the admin API.
//!
//! ```text
//!   add NAME --mac MAC --vdisk VDISK [--type TYPE]  POST   /api/v1/devices
//!   list                                            GET    /api/v1/devices
//!   show NAME                                       GET    /api/v1/devices/NAME
//!   show NAME --secrets                             GET    /api/v1/devices/NAME/iscsi
//!   set NAME [--type TYPE] [--iqn IQN|default]      PATCH  /api/v1/devices/NAME
//!   set NAME --rotate-chap                          POST   /api/v1/devices/NAME/iscsi/rotate
//!   events NAME [--json]                            GET    /api/v1/devices/NAME/events
//!   remove NAME                                     DELETE /api/v1/devices/NAME
//!   reset NAME [--force]                            POST   /api/v1/devices/NAME/reset[?force=true]
//!   move NAME --to SERVER [--no-wait]               POST   /api/v1/devices/NAME/move
//!   revoke NAME                                     POST   /api/v1/devices/NAME/revoke
//!   credential NAME --out DIR [--hours H]           POST   /api/v1/devices/NAME/credential
//!   credential NAME --out DIR --ca DIR              (offline: signed here by the farm CA)
//! ```
//!
//! A device's type picks the version of its vDisk it boots: production (the
//! newest production version; the default), test (the newest test version, or
//! the production version if there is none) or maintenance (the maintenance
//! version, read/write, one such device at a time); see `vstream version`.

use anyhow::Result;
use clap::{ArgGroup, Args, Subcommand};
use vstream_api::{CreateDevice, DeviceInfo, DeviceType, SetDevice};

use crate::args::{ListArgs, NameArg, ShowArgs};
use crate::client::{api_path, connect, Client, ClientArgs};
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
    Show(DeviceShowArgs),
    /// Change a device's type (which version of its vDisk it boots), its
    /// iSCSI initiator name, or its CHAP secrets.
    Set(SetArgs),
    /// A device's recent events: connects, disconnects (and how), failovers,
    /// retries, refusals (and why), full write caches, moves; from every
    /// server.
    Events(ShowArgs),
    /// Remove a device.
    Remove(NameArg),
    /// Reset a device (its session and write cache; see the server's docs).
    Reset(ResetArgs),
    /// Move a connected device to another server of the farm: the server it
    /// streams from lets it go, and it logs in again at SERVER, which must
    /// be up and hold a verified copy of the version it runs. Only a device
    /// that keeps its write cache itself moves while it runs. Waits until
    /// the device streams from SERVER.
    Move(MoveArgs),
    /// Revoke the device's credentials: every client certificate it holds
    /// now opens nothing from its next connection on, on every server, even
    /// while the certificate is still valid.
    Revoke(NameArg),
    /// Issue the device a credential ahead of time, for a VM or host that
    /// keeps its key on a disk: writes DIR/ca-cert.pem, client-cert.pem and
    /// client-key.pem (mode 0600), the layout nbdkit, QEMU, libnbd and
    /// `vstream target --tls-certificates` read. The key is made here and
    /// never leaves this machine; a server's enrollment CA signs it, or the
    /// farm CA with --ca.
    Credential(CredentialArgs),
}

#[derive(Debug, Args)]
pub struct CredentialArgs {
    pub name: String,
    /// The folder to write (made if missing; nothing in it is overwritten).
    #[arg(long, value_name = "DIR")]
    pub out: std::path::PathBuf,
    /// Hours the certificate stays valid [default: 720 (30 days); at most
    /// 2160 from a server].
    #[arg(long, value_name = "HOURS")]
    pub hours: Option<u64>,
    /// Sign it here with the farm CA in DIR (ca-cert.pem, ca-key.pem),
    /// without a server: for the machine that keeps the farm CA offline.
    #[arg(long, value_name = "DIR")]
    pub ca: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// Name of the new device: 1 to 64 letters, digits, '.', '_' or '-', and
    /// not a MAC address.
    pub name: String,
    /// Its network card's MAC address (aa:bb:cc:dd:ee:ff, AA-BB-CC-DD-EE-FF,
    /// aabb.ccdd.eeff or aabbccddeeff): unicast, not all-zero.
    #[arg(long, value_name = "MAC", value_parser = vstream_api::parse_mac)]
    pub mac: String,
    /// The vDisk it boots.
    #[arg(long, value_name = "VDISK")]
    pub vdisk: String,
    /// Which version of the vDisk it boots (see `device set`).
    #[arg(long = "type", value_name = "maintenance|test|production",
          value_parser = parse_device_type, default_value = "production")]
    pub kind: DeviceType,
    /// The iSCSI initiator name it logs in with [default: the farm's IQN
    /// prefix, `:mac.` and its MAC as 12 hex digits].
    #[arg(long, value_name = "IQN")]
    pub iqn: Option<String>,
}

#[derive(Debug, Args)]
pub struct DeviceShowArgs {
    #[command(flatten)]
    pub show: ShowArgs,
    /// Print its iSCSI names and CHAP secrets instead (they open its disk:
    /// keep them as you would its key).
    #[arg(long)]
    pub secrets: bool,
}

#[derive(Debug, Args)]
pub struct ResetArgs {
    pub name: String,
    /// Disconnect the device first if it is connected (its unsaved state is
    /// lost, as at a power-off); without it a connected device is refused.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct MoveArgs {
    pub name: String,
    /// The server to move it to.
    #[arg(long, value_name = "SERVER")]
    pub to: String,
    /// Return once the move is recorded, without waiting for the device to
    /// get there.
    #[arg(long)]
    pub no_wait: bool,
    /// How long to wait for the device to get there, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub timeout: u64,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("change").required(true).multiple(true).args(["kind", "iqn", "rotate_chap"])))]
pub struct SetArgs {
    pub name: String,
    /// Which version of its vDisk it boots: production (the newest production
    /// version), test (the newest test version, or the production version if
    /// there is none) or maintenance (the maintenance version, read/write).
    /// A running device switches at its next boot.
    #[arg(long = "type", value_name = "maintenance|test|production",
          value_parser = parse_device_type)]
    pub kind: Option<DeviceType>,
    /// The iSCSI initiator name it logs in with; `default` for the one its
    /// MAC makes. Counts from its next login.
    #[arg(long, value_name = "IQN|default")]
    pub iqn: Option<String>,
    /// Make new CHAP secrets: the old ones open nothing from its next login
    /// on. Prints the new ones.
    #[arg(long)]
    pub rotate_chap: bool,
}

fn parse_device_type(s: &str) -> Result<DeviceType, String> {
    s.parse()
}

pub fn run(args: DeviceArgs) -> Result<()> {
    if let DeviceCommand::Credential(a) = &args.command {
        if a.ca.is_some() {
            return offline_credential(a);
        }
    }
    let client = connect(&args.client)?;
    match args.command {
        DeviceCommand::Add(a) => add(&client, a),
        DeviceCommand::List(a) => list(&client, a),
        DeviceCommand::Show(a) => show(&client, a),
        DeviceCommand::Set(a) => set(&client, a),
        DeviceCommand::Events(a) => {
            let path = api_path(&["devices", &a.name, "events"]);
            if a.json {
                return print_json(&client.get(&path)?);
            }
            let events: Vec<vstream_api::DeviceEvent> = client.get(&path)?;
            print(&events_table(&events))
        }
        DeviceCommand::Remove(a) => {
            client.delete_device(&a.name)?;
            print(&format!("removed device {}\n", a.name))
        }
        DeviceCommand::Reset(a) => {
            client.reset_device(&a.name, a.force)?;
            print(&format!("reset device {}\n", a.name))
        }
        DeviceCommand::Move(a) => move_device(&client, a),
        DeviceCommand::Revoke(a) => {
            let d = client.revoke_device(&a.name)?;
            print(&format!(
                "revoked the credentials of device {} issued up to {} (Unix time)\n",
                d.name,
                d.credentials_revoked_unix.unwrap_or_default()
            ))
        }
        DeviceCommand::Credential(a) => {
            let (csr, key) = vstream_pki::request(&a.name)?;
            let req = vstream_api::CredentialRequest {
                csr,
                hours: a.hours,
            };
            let reply = client.issue_credential(&a.name, &req)?;
            crate::ca_cmd::write_client_folder(&a.out, &reply.ca_pem, &reply.chain_pem, &key)?;
            print(&format!(
                "wrote the credential of device {} to {} (serial {}, valid until {})\n",
                reply.device,
                a.out.display(),
                reply.serial,
                format_unix_time(u64::try_from(reply.not_after_unix).unwrap_or_default())
            ))
        }
    }
}

fn add(client: &Client, a: AddArgs) -> Result<()> {
    let body = CreateDevice {
        name: a.name,
        mac: a.mac,
        vdisk: a.vdisk,
        kind: a.kind,
        iqn: a.iqn,
    };
    // The answer is a Device or a DeviceInfo (which holds one); either parses.
    let added = client.add_device(&body)?;
    let (name, mac, vdisk, kind) = match &added {
        Some(d) => (&d.name, &d.mac, &d.vdisk, d.kind),
        None => (&body.name, &body.mac, &body.vdisk, body.kind),
    };
    print(&format!(
        "added {kind} device {name} ({mac}) booting vDisk {vdisk}\n"
    ))
}

fn set(client: &Client, a: SetArgs) -> Result<()> {
    if a.kind.is_none() && a.iqn.is_none() && !a.rotate_chap {
        anyhow::bail!("nothing to change: give --type, --iqn or --rotate-chap");
    }
    let mut out = String::new();
    if a.kind.is_some() || a.iqn.is_some() {
        let body = SetDevice {
            kind: a.kind,
            iqn: a.iqn.clone(),
        };
        // The answer is a DeviceInfo, which reads as the Device it holds.
        let updated = client.set_device(&a.name, &body)?;
        let (name, kind, iqn) = match &updated {
            Some(d) => (d.name.clone(), Some(d.kind), d.iqn.clone()),
            None => (a.name.clone(), a.kind, a.iqn.clone()),
        };
        if let Some(kind) = kind.filter(|_| a.kind.is_some()) {
            out.push_str(&format!("device {name}: type {kind}\n"));
        }
        if a.iqn.is_some() {
            let iqn = iqn.unwrap_or_else(|| "the one its MAC makes".into());
            out.push_str(&format!("device {name}: iSCSI initiator {iqn}\n"));
        }
    }
    if a.rotate_chap {
        let access = client.rotate_iscsi(&a.name)?;
        out.push_str(&format!(
            "device {}: new CHAP secrets; the old ones open nothing from its next login\n",
            access.device
        ));
        out.push_str(&iscsi_fields(&access));
    }
    print(&out)
}

/// `vstream device move`: asks the move, then waits for the device to show
/// on the server it was moved to.
fn move_device(client: &Client, a: MoveArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let body = vstream_api::MoveDevice {
        server: a.to.clone(),
    };
    let info = client.move_device(&a.name, &body)?;
    let name = info.device.name.clone();
    let from = info
        .device
        .moved
        .map(|m| m.from)
        .or(info.server)
        .unwrap_or_else(|| "-".into());
    if a.no_wait {
        return print(&format!(
            "device {name} is moving from {from} to {}\n",
            a.to
        ));
    }
    let deadline = started + std::time::Duration::from_secs(a.timeout);
    loop {
        let now = client.device(&name)?;
        if now.connected && now.server.as_deref() == Some(a.to.as_str()) {
            return print(&format!(
                "moved device {name} from {from} to {} in {:.1} s\n",
                a.to,
                started.elapsed().as_secs_f64()
            ));
        }
        if std::time::Instant::now() >= deadline {
            let at = match (now.connected, now.server) {
                (true, Some(s)) => format!("it streams from {s}"),
                _ => "it is not connected".to_owned(),
            };
            anyhow::bail!(
                "device {name} is not on {} {} s after the move was asked: {at} \
                 (see `vstream device events {name}`)",
                a.to,
                a.timeout
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn iscsi_fields(a: &vstream_api::IscsiAccess) -> String {
    let portals = if a.portals.is_empty() {
        "- (no server serves iSCSI: vstream server --iscsi HOST)".to_string()
    } else {
        a.portals.join(", ")
    };
    render_fields(&[
        ("iscsi-initiator", a.initiator.clone()),
        ("iscsi-target", a.target.clone()),
        ("iscsi-portals", portals),
        ("chap-user", a.chap_user.clone()),
        ("chap-secret", a.chap_secret.clone()),
        ("chap-target-user", a.chap_target_user.clone()),
        ("chap-target-secret", a.chap_target_secret.clone()),
        ("chap-created", format_unix_time(a.created_unix)),
    ])
}

fn list(client: &Client, a: ListArgs) -> Result<()> {
    let path = api_path(&["devices"]);
    if a.json {
        return print_json(&client.get(&path)?);
    }
    let devices = client.devices()?;
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
                i.device.kind.to_string(),
                yes_no(i.connected).to_string(),
                i.server.clone().unwrap_or_else(|| "-".to_string()),
                i.version.map_or_else(|| "-".to_string(), |v| v.to_string()),
                i.connected_since
                    .map_or_else(|| "-".to_string(), format_unix_time),
                if i.device_cache {
                    format!("{} on device", human_size(i.cache_bytes))
                } else {
                    human_size(i.cache_bytes)
                },
                i.retries.to_string(),
                i.failovers.to_string(),
            ]
        })
        .collect();
    render_table(
        &[
            "NAME",
            "MAC",
            "VDISK",
            "TYPE",
            "CONNECTED",
            "SERVER",
            "VERSION",
            "SINCE",
            "CACHE",
            "RETRIES",
            "FAILOVERS",
        ],
        &rows,
    )
}

fn show(client: &Client, a: DeviceShowArgs) -> Result<()> {
    let secrets = a.secrets;
    let a = a.show;
    if secrets {
        if a.json {
            return print_json(&client.get(&api_path(&["devices", &a.name, "iscsi"]))?);
        }
        return print(&iscsi_fields(&client.iscsi_access(&a.name)?));
    }
    let path = api_path(&["devices", &a.name]);
    if a.json {
        return print_json(&client.get(&path)?);
    }
    let info = client.device(&a.name)?;
    print(&device_fields(&info))
}

fn device_fields(i: &DeviceInfo) -> String {
    let d = &i.device;
    let connected = match (i.connected, i.connected_since) {
        (true, Some(t)) => format!("yes, since {}", format_unix_time(t)),
        (c, _) => yes_no(c).to_string(),
    };
    let mut fields = vec![
        ("name", d.name.clone()),
        ("mac", d.mac.clone()),
        ("vdisk", d.vdisk.clone()),
        ("type", d.kind.to_string()),
        ("connected", connected),
        (
            "server",
            i.server.clone().unwrap_or_else(|| "-".to_string()),
        ),
        (
            "version",
            i.version.map_or_else(|| "-".to_string(), |v| v.to_string()),
        ),
        ("peer", i.peer.clone().unwrap_or_else(|| "-".to_string())),
        (
            "write cache",
            if i.device_cache {
                format!("{} on the device", human_size(i.cache_bytes))
            } else {
                human_size(i.cache_bytes)
            },
        ),
        ("created", format_unix_time(d.created_unix)),
        ("retries", counted(i.retries, i.last_retry_ms)),
        ("failovers", counted(i.failovers, i.last_failover_ms)),
    ];
    if let Some(m) = &d.moved {
        fields.push((
            "moved",
            format!(
                "from {} to {} at {}",
                m.from,
                m.server,
                format_unix_time(m.requested_unix)
            ),
        ));
    }
    if let Some(p) = &i.protocol {
        fields.push(("protocol", p.clone()));
    }
    if let Some(iqn) = &i.iscsi_initiator {
        let how = if d.iqn.is_some() {
            ""
        } else {
            " (from its MAC)"
        };
        fields.push(("iscsi initiator", format!("{iqn}{how}")));
    }
    if let Some(t) = &i.iscsi_target {
        fields.push(("iscsi target", t.clone()));
    }
    if let Some(t) = d.credentials_revoked_unix {
        fields.push((
            "revoked",
            format!("credentials issued up to {}", format_unix_time(t)),
        ));
    }
    render_fields(&fields)
}

/// A count of events since the device was added, with when the last was.
fn counted(n: u64, last_ms: Option<u64>) -> String {
    match last_ms {
        Some(ms) if n > 0 => format!("{n}, the last at {}", format_unix_time(ms / 1000)),
        _ => n.to_string(),
    }
}

fn events_table(events: &[vstream_api::DeviceEvent]) -> String {
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                format_unix_time(e.at_ms / 1000),
                e.kind.to_string(),
                e.server.clone(),
                e.detail.clone(),
            ]
        })
        .collect();
    render_table(&["TIME", "EVENT", "SERVER", "DETAIL"], &rows)
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// `vstream device credential NAME --ca DIR`: signed here by the farm CA.
fn offline_credential(a: &CredentialArgs) -> Result<()> {
    let dir = a.ca.as_deref().unwrap_or(std::path::Path::new("."));
    let ca = crate::ca_cmd::load_ca(dir)?;
    let hours = a.hours.unwrap_or(24 * 30);
    if hours == 0 {
        anyhow::bail!("--hours: a credential lasts at least an hour");
    }
    let issued = ca.device(
        &a.name,
        vstream_pki::Validity::from_now(hours.saturating_mul(3600)),
    )?;
    crate::ca_cmd::write_client_folder(
        &a.out,
        ca.cert_pem(),
        &issued.chain_pem,
        issued.key_pem.as_deref().unwrap_or_default(),
    )?;
    print(&format!(
        "wrote a credential naming device {} to {} (serial {}, valid until {}); \
         the farm checks at each connection that the device exists and is not revoked\n",
        a.name,
        a.out.display(),
        issued.serial,
        crate::ca_cmd::until(issued.validity.not_after)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vstream_api::Device;

    fn info(name: &str, peer: Option<&str>, cache_bytes: u64) -> DeviceInfo {
        DeviceInfo {
            device: Device {
                kind: DeviceType::Production,
                ..Device::new(name, "aa:bb:cc:00:11:22", "win10", 1_700_000_000)
            },
            connected: peer.is_some(),
            connected_since: peer.map(|_| 1_700_000_060),
            peer: peer.map(str::to_string),
            cache_bytes,
            server: peer.map(|_| "pvs1".to_string()),
            version: peer.map(|_| 3),
            device_cache: false,
            protocol: peer.map(|_| "NBD".to_string()),
            iscsi_initiator: Some("iqn.2026-12.org.vstream:mac.aabbcc001122".into()),
            iscsi_target: Some(format!("iqn.2026-12.org.vstream:device.{name}")),
            failovers: 0,
            retries: 0,
            last_failover_ms: None,
            last_retry_ms: None,
        }
    }

    #[test]
    fn list_table() {
        let mut lab = info("lab-pc-22", None, 0);
        lab.device.kind = DeviceType::Maintenance;
        let mut pc1 = info("pc1", Some("10.0.0.5:51234"), 3 << 29);
        (pc1.retries, pc1.failovers) = (12, 1);
        let t = device_table(&[pc1, lab]);
        assert_eq!(
            t,
            "NAME       MAC                VDISK  TYPE         CONNECTED  SERVER  VERSION  SINCE                    CACHE    RETRIES  FAILOVERS\n\
             pc1        aa:bb:cc:00:11:22  win10  production   yes        pvs1    3        2023-11-14 22:14:20 UTC  1.5 GiB  12       1\n\
             lab-pc-22  aa:bb:cc:00:11:22  win10  maintenance  no         -       -        -                        0 B      0        0\n"
        );
    }

    #[test]
    fn show_fields() {
        assert_eq!(
            device_fields(&{
                let mut pc1 = info("pc1", Some("10.0.0.5:51234"), 4096);
                (pc1.failovers, pc1.last_failover_ms) = (2, Some(1_700_000_030_000));
                pc1.device.moved = Some(vstream_api::DeviceMove {
                    server: "pvs1".into(),
                    from: "pvs2".into(),
                    requested_unix: 1_700_000_029,
                });
                pc1
            }),
            "name:            pc1\n\
             mac:             aa:bb:cc:00:11:22\n\
             vdisk:           win10\n\
             type:            production\n\
             connected:       yes, since 2023-11-14 22:14:20 UTC\n\
             server:          pvs1\n\
             version:         3\n\
             peer:            10.0.0.5:51234\n\
             write cache:     4 KiB\n\
             created:         2023-11-14 22:13:20 UTC\n\
             retries:         0\n\
             failovers:       2, the last at 2023-11-14 22:13:50 UTC\n\
             moved:           from pvs2 to pvs1 at 2023-11-14 22:13:49 UTC\n\
             protocol:        NBD\n\
             iscsi initiator: iqn.2026-12.org.vstream:mac.aabbcc001122 (from its MAC)\n\
             iscsi target:    iqn.2026-12.org.vstream:device.pc1\n"
        );
    }

    #[test]
    fn device_json_without_type_is_production() {
        // A server from before device types sends no "type".
        let json = r#"{"name":"pc1","mac":"aa:bb:cc:00:11:22","vdisk":"win10",
            "created_unix":1700000000,"connected":false,"connected_since":null,
            "peer":null,"cache_bytes":0}"#;
        let d: Device = serde_json::from_str(json).unwrap();
        assert_eq!(d.kind, DeviceType::Production);
    }

    #[test]
    fn types_go_out_as_the_api_spells_them() {
        let body = serde_json::to_value(SetDevice {
            kind: Some(DeviceType::Test),
            iqn: None,
        })
        .unwrap();
        assert_eq!(body, serde_json::json!({"type": "test"}));
        let body = serde_json::to_value(SetDevice {
            kind: None,
            iqn: Some("default".into()),
        })
        .unwrap();
        assert_eq!(body, serde_json::json!({"type": null, "iqn": "default"}));
        let body = serde_json::to_value(CreateDevice {
            name: "pc1".into(),
            mac: "aa:bb:cc:00:11:22".into(),
            vdisk: "win10".into(),
            kind: DeviceType::Maintenance,
            iqn: None,
        })
        .unwrap();
        assert_eq!(body["type"], "maintenance");
    }
}
