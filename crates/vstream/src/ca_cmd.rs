//! `vstream ca`: the farm's certificates, made on the machine that keeps
//! the farm CA (offline, not a server).
//!
//! ```text
//!   init --out DIR [--days N]                 DIR/ca-cert.pem, ca-key.pem
//!   server --ca DIR --out DIR --name N         a server's --tls-certificates folder:
//!          --san NAME... [--enrollment]        ca-cert.pem, server-cert.pem,
//!                                              server-key.pem [, enroll-ca-cert.pem,
//!                                              enroll-ca-key.pem]
//! ```
//!
//! `vstream device credential NAME --ca DIR` signs a device's credential
//! with the farm CA here too; without `--ca` a server's enrollment CA does.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use vstream_pki::Authority;

use crate::output::{format_unix_time, print};

#[derive(Debug, Args)]
pub struct CaArgs {
    #[command(subcommand)]
    pub command: CaCommand,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Make the farm's CA: DIR/ca-cert.pem (give it to every server and
    /// device) and DIR/ca-key.pem (mode 0600; keep it off the servers).
    Init(InitArgs),
    /// Make a server's TLS folder, signed by the farm CA: its certificate
    /// for the names and addresses devices and peers dial, and with
    /// --enrollment its own enrollment CA, which signs short-lived device
    /// certificates and nothing else.
    Server(ServerCertArgs),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// The folder to write (made if missing; nothing in it is overwritten).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Days the CA stays valid.
    #[arg(long, value_name = "DAYS", default_value_t = 3650)]
    pub days: u32,
    /// The CA's name (its certificate's CN).
    #[arg(long, value_name = "NAME", default_value = "vstream farm CA")]
    pub name: String,
}

#[derive(Debug, Args)]
pub struct ServerCertArgs {
    /// The farm CA's folder (ca-cert.pem, ca-key.pem).
    #[arg(long, value_name = "DIR")]
    pub ca: PathBuf,
    /// The server's TLS folder to write (its --tls-certificates).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The server's name in the farm (the certificate's CN).
    #[arg(long, value_name = "NAME")]
    pub name: String,
    /// A host name or IP address devices and other servers dial it by;
    /// repeat for each. A client checks the name it dialled against these.
    #[arg(long = "san", value_name = "NAME|IP", required = true)]
    pub sans: Vec<String>,
    /// Also make the server's enrollment CA (enroll-ca-cert.pem,
    /// enroll-ca-key.pem): it enrolls netbooted devices.
    #[arg(long)]
    pub enrollment: bool,
    /// Days the certificates stay valid.
    #[arg(long, value_name = "DAYS", default_value_t = 365)]
    pub days: u32,
}

pub fn run(args: CaArgs) -> Result<()> {
    match args.command {
        CaCommand::Init(a) => init(a),
        CaCommand::Server(a) => server(a),
    }
}

fn init(a: InitArgs) -> Result<()> {
    let ca = Authority::create(&a.name, a.days)?;
    vstream_pki::write_folder(
        &a.out,
        &[
            ("ca-cert.pem", ca.cert_pem(), false),
            ("ca-key.pem", &ca.key_pem(), true),
        ],
    )
    .with_context(|| format!("writing the farm CA to {}", a.out.display()))?;
    print(&format!(
        "wrote the farm CA to {} (valid until {}); keep ca-key.pem off the servers\n",
        a.out.display(),
        until(ca.not_after())
    ))
}

/// The farm CA in `dir`.
pub fn load_ca(dir: &Path) -> Result<Authority> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    Authority::load(&read("ca-cert.pem")?, &read("ca-key.pem")?)
        .with_context(|| format!("the farm CA in {}", dir.display()))
}

fn server(a: ServerCertArgs) -> Result<()> {
    let ca = load_ca(&a.ca)?;
    let issued = ca.server(&a.name, &a.sans, a.days)?;
    let key = issued.key_pem.unwrap_or_default();
    let mut files = vec![
        ("ca-cert.pem", ca.cert_pem().to_owned(), false),
        ("server-cert.pem", issued.chain_pem, false),
        ("server-key.pem", key, true),
    ];
    if a.enrollment {
        let enroll = ca.enrollment_ca(&a.name, a.days)?;
        files.push(("enroll-ca-cert.pem", enroll.chain_pem, false));
        files.push((
            "enroll-ca-key.pem",
            enroll.key_pem.unwrap_or_default(),
            true,
        ));
    }
    let refs: Vec<(&str, &str, bool)> =
        files.iter().map(|(n, c, s)| (*n, c.as_str(), *s)).collect();
    vstream_pki::write_folder(&a.out, &refs)
        .with_context(|| format!("writing server {}'s certificates", a.name))?;
    print(&format!(
        "wrote server {}'s certificates to {} (for {}; valid until {}){}\n",
        a.name,
        a.out.display(),
        a.sans.join(", "),
        until(issued.validity.not_after),
        if a.enrollment {
            ", with its enrollment CA"
        } else {
            ""
        }
    ))
}

/// The client layout of nbdkit, QEMU and libnbd: ca-cert.pem,
/// client-cert.pem and client-key.pem (0600).
pub fn write_client_folder(dir: &Path, ca_pem: &str, chain_pem: &str, key_pem: &str) -> Result<()> {
    vstream_pki::write_folder(
        dir,
        &[
            ("ca-cert.pem", ca_pem, false),
            ("client-cert.pem", chain_pem, false),
            ("client-key.pem", key_pem, true),
        ],
    )
    .with_context(|| format!("writing the credential to {}", dir.display()))
}

pub fn until(unix: i64) -> String {
    format_unix_time(u64::try_from(unix).unwrap_or_default())
}
