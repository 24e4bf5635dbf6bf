//! `vstream vdisk`: vDisks through the admin API.
//!
//! ```text
//!   create NAME --size SIZE             POST   /api/v1/vdisks
//!   import NAME FILE                    PUT    /api/v1/vdisks/NAME/content   (vdisk/import.rs)
//!   export NAME[@VERSION] FILE          GET    /api/v1/vdisks/NAME/content   (vdisk/export.rs)
//!   list                                GET    /api/v1/vdisks
//!   show NAME                           GET    /api/v1/vdisks/NAME
//!   set NAME [--mode M] [--cache-limit] PATCH  /api/v1/vdisks/NAME
//!       [--kernel F] [--initrd F]       PUT    /api/v1/vdisks/NAME/boot/kernel|initrd
//!       [--cmdline "..."]               PUT    /api/v1/vdisks/NAME/boot/cmdline
//!   delete NAME                         DELETE /api/v1/vdisks/NAME
//! ```

mod export;
mod import;

use anyhow::{Context, Result};
use clap::{ArgGroup, Args, Subcommand};
use vstream_api::{
    BootFileKind, CacheType, CreateVDisk, Mode, SetBootCmdline, SetVDisk, VDisk, VDiskInfo,
};

use crate::args::{ListArgs, NameArg, ShowArgs};
use crate::client::{api_path, connect, Client, ClientArgs};
use crate::output::{
    format_unix_time, human_size, print, print_json, render_fields, render_table, short_hash,
};

#[derive(Debug, Args)]
pub struct VDiskArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: VDiskCommand,
}

#[derive(Debug, Subcommand)]
pub enum VDiskCommand {
    /// Create an empty vDisk.
    Create(CreateArgs),
    /// Make a new vDisk from a disk image (raw, VHD; qcow2, VHDX, VMDK, VDI
    /// through qemu-img).
    Import(import::ImportArgs),
    /// Download a vDisk's content into a disk image file.
    Export(export::ExportArgs),
    /// List the vDisks.
    List(ListArgs),
    /// Show one vDisk.
    Show(ShowArgs),
    /// Change a vDisk's mode or write cache limit.
    Set(SetArgs),
    /// Delete a vDisk.
    Delete(NameArg),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Name of the new vDisk.
    pub name: String,
    /// Virtual size, such as 8GiB, 512M or 1.5T (binary units).
    #[arg(long, value_name = "SIZE", value_parser = vstream_api::parse_size)]
    pub size: u64,
    /// The named store to keep it in on every server (`vstream store list`;
    /// default: each server's data folder).
    #[arg(long, value_name = "STORE")]
    pub store: Option<String>,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("change").required(true).multiple(true).args(["mode", "cache_limit", "cache_type", "anonymous_read", "boot", "physical_sector", "kernel", "initrd", "cmdline"])))]
pub struct SetArgs {
    pub name: String,
    /// private: one device reads and writes the vDisk itself; standard: many
    /// devices share it read-only, each writing to its own cache.
    #[arg(long, value_name = "private|standard", value_parser = parse_mode)]
    pub mode: Option<Mode>,
    /// Largest write cache one device may fill, such as 4GiB.
    #[arg(long, value_name = "SIZE", value_parser = vstream_api::parse_size)]
    pub cache_limit: Option<u64>,
    /// Where Standard-mode devices keep their write caches: server (a file per
    /// device in the server's store) or device (the device's agent, `vstream
    /// target --cache`; the device can then fail over between servers).
    #[arg(long, value_name = "server|device", value_parser = parse_cache_type)]
    pub cache_type: Option<CacheType>,
    /// on: on servers with TLS, clients without a device's certificate
    /// (tools such as nbdinfo or qemu-img) may read its versions, read-only.
    /// off (the default): only its own devices read it.
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    pub anonymous_read: Option<bool>,
    /// How its devices network-boot: kernel (iPXE loads --kernel and
    /// --initrd, which stream the disk over NBD; the default) or sanboot
    /// (iPXE boots the device's iSCSI target, as Windows needs: see
    /// docs/windows.md). Counts from each device's next boot.
    #[arg(long, value_name = "kernel|sanboot", value_parser = parse_boot_method)]
    pub boot: Option<vstream_api::BootMethod>,
    /// The physical sector its disks report over iSCSI: 512 (512n, the
    /// default) or 4096 (512e: 512-byte blocks, eight to a physical sector,
    /// as layers keep 4 KiB chunks). Only with no device connected.
    #[arg(long, value_name = "512|4096")]
    pub physical_sector: Option<u32>,
    /// The Linux kernel devices network-boot with (`/boot/ipxe`); it is
    /// copied to every server of the farm.
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<std::path::PathBuf>,
    /// The initramfs that goes with the kernel (with vstream's hook: see
    /// docs/netboot.md).
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<std::path::PathBuf>,
    /// Kernel command line words, such as "boot=vstream console=ttyS0";
    /// vstream adds the bootstrap list and the device's MAC itself.
    #[arg(long, value_name = "WORDS")]
    pub cmdline: Option<String>,
}

fn parse_boot_method(s: &str) -> Result<vstream_api::BootMethod, String> {
    s.parse()
}

fn parse_cache_type(s: &str) -> Result<CacheType, String> {
    s.parse()
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    s.parse()
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{s:?}: expected on or off")),
    }
}

pub fn run(args: VDiskArgs) -> Result<()> {
    let client = connect(&args.client)?;
    match args.command {
        VDiskCommand::Create(a) => create(&client, a),
        VDiskCommand::Import(a) => import::run(&client, a),
        VDiskCommand::Export(a) => export::run(&client, a),
        VDiskCommand::List(a) => list(&client, a),
        VDiskCommand::Show(a) => show(&client, a),
        VDiskCommand::Set(a) => set(&client, a),
        VDiskCommand::Delete(a) => delete(&client, a),
    }
}

fn create(client: &Client, a: CreateArgs) -> Result<()> {
    let body = CreateVDisk {
        name: a.name.clone(),
        size: a.size,
        store: a.store,
    };
    // The answer is a VDisk or a VDiskInfo (which holds one); either parses.
    let created = client.create_vdisk(&body)?;
    let (name, size) = created.map_or((a.name, a.size), |v| (v.name, v.size));
    print(&format!("created vDisk {name} ({})\n", human_size(size)))
}

fn list(client: &Client, a: ListArgs) -> Result<()> {
    let path = api_path(&["vdisks"]);
    if a.json {
        return print_json(&client.get(&path)?);
    }
    let vdisks = client.vdisks()?;
    print(&vdisk_table(&vdisks))?;
    for v in &vdisks {
        if let Some(p) = &v.problem {
            eprintln!("warning: vDisk {}: {p}", v.vdisk.name);
        }
    }
    Ok(())
}

fn vdisk_table(vdisks: &[VDiskInfo]) -> String {
    let rows: Vec<Vec<String>> = vdisks
        .iter()
        .map(|i| {
            vec![
                i.vdisk.name.clone(),
                human_size(i.vdisk.size),
                i.vdisk.mode.to_string(),
                cache_summary(&i.vdisk),
                if i.not_here {
                    "NOT HERE".to_string()
                } else if i.problem.is_some() {
                    "UNREADABLE".to_string()
                } else {
                    short_hash(&i.content_hash)
                },
                i.connected.len().to_string(),
            ]
        })
        .collect();
    render_table(&["NAME", "SIZE", "MODE", "CACHE", "HASH", "DEVICES"], &rows)
}

/// `server`, or `server (4 GiB)` with a cache limit.
fn cache_summary(v: &VDisk) -> String {
    match v.cache_limit {
        Some(limit) => format!("{} ({})", v.cache_type, human_size(limit)),
        None => v.cache_type.to_string(),
    }
}

fn show(client: &Client, a: ShowArgs) -> Result<()> {
    let path = api_path(&["vdisks", &a.name]);
    if a.json {
        return print_json(&client.get(&path)?);
    }
    let info = client.vdisk(&a.name)?;
    print(&vdisk_fields(&info))
}

fn vdisk_fields(i: &VDiskInfo) -> String {
    let v = &i.vdisk;
    let hash = if i.content_hash.is_empty() {
        "-".to_string()
    } else {
        i.content_hash.clone()
    };
    let connected = if i.connected.is_empty() {
        "none".to_string()
    } else {
        i.connected.join(", ")
    };
    let mut fields = vec![
        ("name", v.name.clone()),
        ("size", format!("{} ({} bytes)", human_size(v.size), v.size)),
        ("store", v.store.clone()),
        ("mode", v.mode.to_string()),
        ("cache type", v.cache_type.to_string()),
        (
            "cache limit",
            v.cache_limit
                .map_or_else(|| "the vDisk size".to_string(), human_size),
        ),
        (
            "anonymous read",
            if v.anonymous_read { "on" } else { "off" }.to_string(),
        ),
        (
            "sectors",
            match v.physical_sector {
                512 => "512 bytes (512n)".to_string(),
                p => format!("512 bytes logical, {p} physical (512e)"),
            },
        ),
        ("content hash", hash),
        ("allocated", human_size(i.allocated)),
        ("connected devices", connected),
        ("created", format_unix_time(v.created_unix)),
    ];
    // Network boot settings, for the vDisks that have them.
    if !v.boot.is_empty() {
        fields.extend([
            ("boot kernel", boot_file(v.boot.kernel.as_ref())),
            ("boot initrd", boot_file(v.boot.initrd.as_ref())),
            ("boot cmdline", v.boot.cmdline.clone()),
            ("boot method", v.boot.method.to_string()),
        ]);
    }
    render_fields(&fields)
}

fn boot_file(f: Option<&vstream_api::BootFile>) -> String {
    f.map_or_else(
        || "-".to_string(),
        |f| {
            format!(
                "{} ({}, {})",
                f.name,
                human_size(f.size),
                short_hash(&f.blake3)
            )
        },
    )
}

fn set(client: &Client, a: SetArgs) -> Result<()> {
    let boot = a.kernel.is_some() || a.initrd.is_some() || a.cmdline.is_some();
    let mut out = String::new();
    if a.mode.is_some()
        || a.cache_limit.is_some()
        || a.cache_type.is_some()
        || a.anonymous_read.is_some()
        || a.boot.is_some()
        || a.physical_sector.is_some()
        || !boot
    {
        let body = SetVDisk {
            mode: a.mode,
            cache_limit: a.cache_limit,
            cache_type: a.cache_type,
            anonymous_read: a.anonymous_read,
            boot: a.boot,
            physical_sector: a.physical_sector,
        };
        let updated = client.set_vdisk(&a.name, &body)?;
        out += &match updated {
            Some(v) => {
                format!(
                    "vDisk {}: mode {}, cache {}, cache limit {}{}\n",
                    v.name,
                    v.mode,
                    v.cache_type,
                    v.cache_limit
                        .map_or_else(|| "the vDisk size".to_string(), human_size),
                    if v.anonymous_read {
                        ", anonymous read on"
                    } else {
                        ""
                    }
                ) + &match a.physical_sector {
                    Some(_) => format!(
                        "vDisk {}: physical sector {} bytes\n",
                        v.name, v.physical_sector
                    ),
                    None => String::new(),
                } + &match a.boot {
                    Some(_) => format!("vDisk {}: boot {}\n", v.name, v.boot.method),
                    None => String::new(),
                }
            }
            None => format!("updated vDisk {}\n", a.name),
        };
    }
    if a.kernel.is_some() || a.initrd.is_some() {
        // A refusal before the upload is read would reach us only as a
        // broken pipe: make sure the vDisk is there first.
        client.get::<serde_json::Value>(&api_path(&["vdisks", &a.name]))?;
    }
    for (which, file) in [("kernel", &a.kernel), ("initrd", &a.initrd)] {
        let Some(path) = file else { continue };
        let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| which.to_owned());
        let kind: BootFileKind = which.parse().map_err(anyhow::Error::msg)?;
        let v = client.upload_boot_file(&a.name, kind, &name, f)?;
        if let Some(b) = v.vdisk.boot.get(kind) {
            out += &format!(
                "vDisk {}: {which} {} ({}, {})\n",
                a.name,
                b.name,
                human_size(b.size),
                short_hash(&b.blake3)
            );
        }
    }
    if let Some(cmdline) = a.cmdline {
        let body = SetBootCmdline { cmdline };
        let v = client.set_boot_cmdline(&a.name, &body)?;
        out += &format!(
            "vDisk {}: kernel command line {:?}\n",
            a.name, v.vdisk.boot.cmdline
        );
    }
    print(&out)
}

fn delete(client: &Client, a: NameArg) -> Result<()> {
    client.delete_vdisk(&a.name)?;
    print(&format!("deleted vDisk {}\n", a.name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vstream_api::CacheType;

    fn info(name: &str, size: u64, limit: Option<u64>, connected: &[&str]) -> VDiskInfo {
        VDiskInfo {
            vdisk: VDisk {
                name: name.into(),
                size,
                mode: if connected.len() > 1 {
                    Mode::Standard
                } else {
                    Mode::Private
                },
                cache_type: CacheType::Server,
                cache_limit: limit,
                created_unix: 1_700_000_000,
                store: vstream_api::default_store(),
                boot: Default::default(),
                anonymous_read: false,
                physical_sector: vstream_api::default_physical_sector(),
            },
            content_hash: "0123456789abcdef".repeat(4),
            allocated: 3 << 29,
            connected: connected.iter().map(|s| s.to_string()).collect(),
            problem: None,
            not_here: false,
        }
    }

    #[test]
    fn list_table() {
        let t = vdisk_table(&[
            info("win10", 8 << 30, Some(4 << 30), &["pc1", "pc2"]),
            info("tiny", 3 << 19, None, &[]),
        ]);
        assert_eq!(
            t,
            "NAME   SIZE     MODE      CACHE           HASH          DEVICES\n\
             win10  8 GiB    standard  server (4 GiB)  0123456789ab  2\n\
             tiny   1.5 MiB  private   server          0123456789ab  0\n"
        );
    }

    #[test]
    fn show_fields() {
        let f = vdisk_fields(&info("win10", 8 << 30, None, &["pc1", "pc2"]));
        let expected = format!(
            "name:              win10\n\
             size:              8 GiB (8589934592 bytes)\n\
             store:             default\n\
             mode:              standard\n\
             cache type:        server\n\
             cache limit:       the vDisk size\n\
             anonymous read:    off\n\
             sectors:           512 bytes (512n)\n\
             content hash:      {}\n\
             allocated:         1.5 GiB\n\
             connected devices: pc1, pc2\n\
             created:           2023-11-14 22:13:20 UTC\n",
            "0123456789abcdef".repeat(4)
        );
        assert_eq!(f, expected);

        let mut i = info("root", 64 << 20, None, &[]);
        i.vdisk.boot.kernel = Some(vstream_api::BootFile {
            name: "vmlinuz".into(),
            size: 8 << 20,
            blake3: "ab".repeat(32),
        });
        i.vdisk.boot.cmdline = "boot=vstream".into();
        let f = vdisk_fields(&i);
        assert!(
            f.ends_with(
                "boot kernel:       vmlinuz (8 MiB, abababababab)\n\
                 boot initrd:       -\n\
                 boot cmdline:      boot=vstream\n\
                 boot method:       kernel\n"
            ),
            "{f}"
        );
    }

    #[test]
    fn info_json_parses_as_vdisk() {
        // `create` and `set` rely on this: a VDiskInfo answer reads as a VDisk.
        let json = serde_json::to_string(&info("a", 1024, None, &[])).unwrap();
        let v: VDisk = serde_json::from_str(&json).unwrap();
        assert_eq!(v.name, "a");
    }
}
