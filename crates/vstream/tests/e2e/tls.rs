//! NBD over TLS with the real clients: a test PKI made with certtool (as
//! libnbd's and qemu's tests make theirs), libnbd's nbdinfo and qemu-img
//! through `--tls require`, and the refusals of qemu-iotests 233 (a plain
//! client against TLS, a TLS client against a plain server, a client of
//! another CA, a client without a certificate), each with the server
//! unharmed.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::nbd::text;
use common::{have, random_image, TestServer};

const MIB: u64 = 1 << 20;

/// One CA, a server certificate for localhost and 127.0.0.1, and client
/// credentials in nbdkit's and QEMU's folder layout; plus a client of a
/// second CA, and a client that has the CA but no certificate.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    /// ca-cert.pem, server-cert.pem, server-key.pem.
    fn server(&self) -> PathBuf {
        self.path("server")
    }
    /// ca-cert.pem, client-cert.pem, client-key.pem: device pc1's credentials.
    fn client(&self) -> PathBuf {
        self.device("pc1")
    }
    /// The credentials of device NAME (pc1, pc2, or ghost: no device).
    fn device(&self, name: &str) -> PathBuf {
        self.path(&format!("device-{name}"))
    }
    /// A client whose certificate another CA signed (and who trusts that CA).
    fn stranger(&self) -> PathBuf {
        self.path("stranger")
    }
    /// The farm's CA, and no certificate of its own.
    fn anonymous(&self) -> PathBuf {
        self.path("anonymous")
    }
}

fn certtool(dir: &Path, args: &[&str]) {
    let out = Command::new("certtool")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("running certtool");
    assert!(
        out.status.success(),
        "certtool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn template(dir: &Path, name: &str, lines: &[&str]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").expect("writing a certtool template");
    path.to_string_lossy().into_owned()
}

/// Makes CA `name` in `dir` (name-key.pem, name-cert.pem).
fn make_ca(dir: &Path, name: &str) {
    let key = format!("{name}-key.pem");
    let cert = format!("{name}-cert.pem");
    certtool(dir, &["--generate-privkey", "--outfile", &key]);
    let t = template(
        dir,
        &format!("{name}.info"),
        &[&format!("cn = {name}"), "ca", "cert_signing_key"],
    );
    certtool(
        dir,
        &[
            "--generate-self-signed",
            "--load-privkey",
            &key,
            "--template",
            &t,
            "--outfile",
            &cert,
        ],
    );
}

/// Signs a certificate `out` (out-key.pem, out-cert.pem) with CA `ca`.
fn make_cert(dir: &Path, ca: &str, out: &str, lines: &[&str]) {
    let key = format!("{out}-key.pem");
    certtool(dir, &["--generate-privkey", "--outfile", &key]);
    let t = template(dir, &format!("{out}.info"), lines);
    certtool(
        dir,
        &[
            "--generate-certificate",
            "--load-ca-certificate",
            &format!("{ca}-cert.pem"),
            "--load-ca-privkey",
            &format!("{ca}-key.pem"),
            "--load-privkey",
            &key,
            "--template",
            &t,
            "--outfile",
            &format!("{out}-cert.pem"),
        ],
    );
}

/// Lays out folder `name` with `files` (to, from) copied from the work folder.
fn layout(dir: &Path, name: &str, files: &[(&str, &str)]) {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    for (to, from) in files {
        std::fs::copy(dir.join(from), d.join(to)).unwrap();
    }
}

fn make_pki() -> Option<Pki> {
    if !have("certtool") {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_ca(d, "ca");
    make_ca(d, "other-ca");
    make_cert(
        d,
        "ca",
        "server",
        &[
            "organization = vstream test",
            "cn = localhost",
            "dns_name = localhost",
            "ip_address = 127.0.0.1",
            "tls_www_server",
            // It is also the server's client certificate towards its peers.
            "tls_www_client",
            "encryption_key",
            "signing_key",
        ],
    );
    let client = |cn: &str| {
        [
            "organization = vstream test".to_string(),
            format!("cn = {cn}"),
            "tls_www_client".into(),
            "encryption_key".into(),
            "signing_key".into(),
        ]
    };
    // "expired": pc1's name on a certificate whose validity ended in 2021.
    for name in ["pc1", "pc2", "ghost", "expired"] {
        let cn = if name == "expired" { "pc1" } else { name };
        let mut lines = client(cn).to_vec();
        if name == "expired" {
            lines.push("activation_date = \"2020-01-01 00:00:00 UTC\"".into());
            lines.push("expiration_date = \"2021-01-01 00:00:00 UTC\"".into());
        }
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        make_cert(d, "ca", name, &lines);
        layout(
            d,
            &format!("device-{name}"),
            &[
                ("ca-cert.pem", "ca-cert.pem"),
                ("client-cert.pem", &format!("{name}-cert.pem")),
                ("client-key.pem", &format!("{name}-key.pem")),
            ],
        );
    }
    // Another CA's certificate for the same device name.
    let lines = client("pc1");
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    make_cert(d, "other-ca", "stranger", &lines);
    layout(
        d,
        "stranger",
        &[
            ("ca-cert.pem", "ca-cert.pem"),
            ("client-cert.pem", "stranger-cert.pem"),
            ("client-key.pem", "stranger-key.pem"),
        ],
    );
    layout(
        d,
        "server",
        &[
            ("ca-cert.pem", "ca-cert.pem"),
            ("server-cert.pem", "server-cert.pem"),
            ("server-key.pem", "server-key.pem"),
        ],
    );
    layout(d, "anonymous", &[("ca-cert.pem", "ca-cert.pem")]);
    Some(Pki { dir })
}

fn add_device(server: &TestServer, name: &str, mac: &str, vdisk: &str) {
    server.cli_ok(&["device", "add", name, "--mac", mac, "--vdisk", vdisk]);
}

/// `nbdinfo nbds://…/EXPORT?tls-certificates=DIR` (TLS required by the client).
fn nbdinfo_tls(server: &TestServer, export: &str, creds: &Path) -> std::process::Output {
    let url = format!(
        "nbds://127.0.0.1:{}/{export}?tls-certificates={}",
        server.nbd_port,
        creds.display()
    );
    Command::new("nbdinfo")
        .arg(&url)
        .output()
        .expect("running nbdinfo")
}

/// qemu-img's image options for EXPORT over TLS with the credentials in DIR.
fn qemu_tls(server: &TestServer, export: &str, creds: &Path) -> Vec<String> {
    vec![
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            creds.display()
        ),
        "--image-opts".into(),
        format!(
            "driver=nbd,host=127.0.0.1,port={},export={export},tls-creds=tls0",
            server.nbd_port
        ),
    ]
}

#[test]
fn tls_required_serves_real_tls_clients_and_refuses_plain_ones() {
    let (Some(pki), true, true) = (make_pki(), have("nbdinfo"), have("qemu-img")) else {
        return;
    };
    let server_dir = pki.server();
    // Certificates and no --tls: TLS is required.
    let server =
        TestServer::start_fresh_with(&["--tls-certificates", server_dir.to_str().unwrap()]);
    let work = tempfile::tempdir().unwrap();
    let raw = work.path().join("v.raw");
    random_image(&raw, 4 * MIB, 18);
    server.cli_ok(&["vdisk", "import", "v", raw.to_str().unwrap()]);
    // pc1's certificate reads pc1's vDisk.
    add_device(&server, "pc1", "52:54:00:00:00:01", "v");

    let out = nbdinfo_tls(&server, "v", &pki.client());
    let info = text(&out);
    assert!(out.status.success(), "nbdinfo over TLS failed:\n{info}");
    assert!(
        info.contains("with TLS"),
        "nbdinfo did not negotiate TLS:\n{info}"
    );
    assert!(
        info.contains(&format!("{}", 4 * MIB)),
        "size missing:\n{info}"
    );

    // qemu-img reads every byte through TLS.
    let tls = qemu_tls(&server, "v", &pki.client());
    let local = format!(
        "driver=raw,file.driver=file,file.filename={}",
        raw.display()
    );
    let out = Command::new("qemu-img")
        .args(["compare", &tls[0], &tls[1], &tls[2], &local, &tls[3]])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare over TLS: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("Images are identical"),
        "{}",
        text(&out)
    );

    // Plain clients are refused, with the spec's reason.
    let plain = format!("nbd://127.0.0.1:{}/v", server.nbd_port);
    let out = Command::new("qemu-img")
        .args(["info", &plain])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a plain qemu-img read a TLS-only server"
    );
    assert!(
        text(&out).contains("TLS negotiation required"),
        "qemu-img's refusal: {}",
        text(&out)
    );
    let out = Command::new("nbdinfo").arg(&plain).output().unwrap();
    assert!(
        !out.status.success(),
        "a plain nbdinfo read a TLS-only server: {}",
        text(&out)
    );
    assert!(server.metric(r#"vstream_nbd_refusals_total{reason="no_tls"}"#) >= 2);

    // NBD_OPT_EXPORT_NAME cannot be refused: the connection closes, nothing served.
    let mut s = TcpStream::connect(("127.0.0.1", server.nbd_port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
                                               // NBD_OPT_LIST first: refused with NBD_REP_ERR_TLS_REQD.
    let mut opt = Vec::new();
    opt.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes());
    opt.extend_from_slice(&3u32.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&opt).unwrap();
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).unwrap();
    let kind = u32::from_be_bytes(reply[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(reply[16..20].try_into().unwrap());
    assert_eq!(
        kind, 0x8000_0005,
        "NBD_OPT_LIST before TLS: reply type {kind:#x}"
    );
    let mut why = vec![0u8; len as usize];
    s.read_exact(&mut why).unwrap();
    let mut opt = Vec::new();
    opt.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes());
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.push(b'v');
    s.write_all(&opt).unwrap();
    let mut rest = Vec::new();
    let n = s.read_to_end(&mut rest).unwrap_or(0);
    assert_eq!(n, 0, "EXPORT_NAME before TLS got an answer: {rest:?}");

    // And the server is unharmed: TLS clients still read.
    let out = nbdinfo_tls(&server, "v", &pki.client());
    assert!(out.status.success(), "after the refusals: {}", text(&out));
    assert!(server.metric("vstream_nbd_tls_connections_total") >= 3);
}

#[test]
fn a_tls_client_against_a_plain_server_is_denied() {
    let (Some(pki), true) = (make_pki(), have("qemu-img")) else {
        return;
    };
    let server = TestServer::start();
    let work = tempfile::tempdir().unwrap();
    let raw = work.path().join("v.raw");
    random_image(&raw, MIB, 19);
    server.cli_ok(&["vdisk", "import", "v", raw.to_str().unwrap()]);
    let mut args = vec!["info".to_string()];
    args.extend(qemu_tls(&server, "v", &pki.client()));
    let out = Command::new("qemu-img").args(&args).output().unwrap();
    assert!(
        !out.status.success(),
        "TLS against a plain server succeeded"
    );
    assert!(
        text(&out).contains("TLS not configured") || text(&out).contains("option 5"),
        "qemu-img's refusal: {}",
        text(&out)
    );
    // Plain clients go on as before.
    let out = Command::new("qemu-img")
        .args([
            "compare",
            "-f",
            "raw",
            raw.to_str().unwrap(),
            &server.url("v"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn verify_peer_refuses_other_cas_and_clients_without_a_certificate() {
    let (Some(pki), true) = (make_pki(), have("nbdinfo")) else {
        return;
    };
    let server_dir = pki.server();
    let server = TestServer::start_fresh_with(&[
        "--tls",
        "require",
        "--tls-certificates",
        server_dir.to_str().unwrap(),
        "--tls-verify-peer",
    ]);
    let work = tempfile::tempdir().unwrap();
    let raw = work.path().join("v.raw");
    random_image(&raw, MIB, 20);
    server.cli_ok(&["vdisk", "import", "v", raw.to_str().unwrap()]);
    add_device(&server, "pc1", "52:54:00:00:00:01", "v");
    for (who, creds) in [
        ("another CA's client", pki.stranger()),
        ("a client without a certificate", pki.anonymous()),
        (
            "an expired certificate of the farm's CA",
            pki.device("expired"),
        ),
    ] {
        let out = nbdinfo_tls(&server, "v", &creds);
        assert!(!out.status.success(), "{who} got in: {}", text(&out));
    }
    assert!(server.metric(r#"vstream_nbd_refusals_total{reason="bad_certificate"}"#) >= 3);
    assert!(
        server.log_text().contains("refused: TLS handshake failed"),
        "the refusals are not in the log"
    );
    let out = nbdinfo_tls(&server, "v", &pki.client());
    assert!(
        out.status.success(),
        "the farm's own client: {}",
        text(&out)
    );
    assert!(text(&out).contains("with TLS"));
}

#[test]
fn a_server_with_bad_certificates_stops_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("certs");
    std::fs::create_dir_all(&empty).unwrap();
    let out = Command::new(common::BIN)
        .args([
            "server",
            "--data",
            dir.path().join("data").to_str().unwrap(),
            "--nbd",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
            "--tls-certificates",
            empty.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a server started without its certificates"
    );
    let err = text(&out);
    assert!(
        err.contains("server-cert.pem"),
        "the error does not name the file: {err}"
    );
    let out = Command::new(common::BIN)
        .args([
            "server",
            "--data",
            dir.path().join("data").to_str().unwrap(),
            "--tls",
            "require",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("--tls-certificates"), "{}", text(&out));
}

/// `nbdinfo --list` over TLS with the credentials in DIR: its output, which
/// names every export the server listed.
fn nbdinfo_list(server: &TestServer, creds: &Path) -> String {
    let url = format!(
        "nbds://127.0.0.1:{}/?tls-certificates={}",
        server.nbd_port,
        creds.display()
    );
    let out = Command::new("nbdinfo")
        .args(["--list", &url])
        .output()
        .expect("running nbdinfo");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The export names in `nbdinfo --list` output (`export="NAME":` lines).
fn listed(out: &str) -> Vec<String> {
    let mut names: Vec<String> = out
        .lines()
        .filter_map(|l| l.strip_prefix("export=\"")?.strip_suffix("\":"))
        .map(str::to_owned)
        .collect();
    names.sort();
    names
}

fn refusals(server: &TestServer, reason: &str) -> u64 {
    server.metric(&format!(
        r#"vstream_nbd_refusals_total{{reason="{reason}"}}"#
    ))
}

#[test]
fn a_device_certificate_opens_only_its_own_disk() {
    let (Some(pki), true, true) = (make_pki(), have("nbdinfo"), have("qemu-io")) else {
        return;
    };
    let server_dir = pki.server();
    // TLS on, not required: plain clients come in too, as anonymous ones.
    let server = TestServer::start_fresh_with(&[
        "--tls",
        "on",
        "--tls-certificates",
        server_dir.to_str().unwrap(),
    ]);
    let work = tempfile::tempdir().unwrap();
    for (i, name) in ["alpha", "beta"].iter().enumerate() {
        let raw = work.path().join(format!("{name}.raw"));
        random_image(&raw, MIB, 30 + i as u64);
        server.cli_ok(&["vdisk", "import", name, raw.to_str().unwrap()]);
    }
    add_device(&server, "pc1", "52:54:00:00:00:01", "alpha");
    add_device(&server, "pc2", "52:54:00:00:00:02", "beta");
    let pc1 = pki.device("pc1");
    let opens = |export: &str, creds: &Path| nbdinfo_tls(&server, export, creds).status.success();

    // pc1's certificate: its own disk (by name or MAC, any spelling) and its
    // vDisk, read and written through QEMU.
    for export in ["device/pc1", "device/52-54-00-00-00-01", "alpha"] {
        let out = nbdinfo_tls(&server, export, &pc1);
        assert!(
            out.status.success(),
            "pc1 cannot open {export}: {}",
            text(&out)
        );
    }
    let mut args = vec!["-c".to_string(), "write -P 0x5a 0 64k".into()];
    args.extend(["-c".into(), "read -P 0x5a 0 64k".into()]);
    args.extend(qemu_tls(&server, "device/pc1", &pc1));
    let out = Command::new("qemu-io").args(&args).output().unwrap();
    assert!(
        out.status.success() && !text(&out).contains("Pattern verification failed"),
        "pc1 writing its own disk: {}",
        text(&out)
    );
    // Its name on an expired certificate opens nothing, though a client
    // certificate is optional here.
    assert!(!opens("device/pc1", &pki.device("expired")));
    // Nothing of another device's.
    for export in ["device/pc2", "device/52:54:00:00:00:02", "beta"] {
        assert!(!opens(export, &pc1), "pc1's certificate opened {export}");
    }
    assert!(refusals(&server, "wrong_export") >= 3);
    assert!(
        server
            .log_text()
            .contains("the certificate of device pc1 opens only its own disk, not device/pc2"),
        "the reason is not in the server log"
    );
    assert_eq!(
        listed(&nbdinfo_list(&server, &pc1)),
        ["alpha", "device/pc1"],
        "pc1's list"
    );

    // No certificate, by TLS or plain: neither a device's disk nor a vDisk.
    let anonymous = pki.anonymous();
    for export in ["device/pc1", "alpha", "beta"] {
        assert!(!opens(export, &anonymous), "anonymous TLS opened {export}");
        let out = Command::new("nbdinfo")
            .arg(server.url(export))
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "plain NBD opened {export}: {}",
            text(&out)
        );
    }
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x66 0 4k",
            &server.url("device/pc1"),
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success() || text(&out).contains("Could not open"),
        "an anonymous client wrote device/pc1: {}",
        text(&out)
    );
    assert!(refusals(&server, "anonymous") >= 6);
    assert_eq!(
        listed(&nbdinfo_list(&server, &anonymous)),
        Vec::<String>::new()
    );

    // beta opened to anonymous readers: tools read it, devices of other
    // vDisks too; device/pc2 stays pc2's.
    server.cli_ok(&["vdisk", "set", "beta", "--anonymous-read", "on"]);
    assert!(opens("beta", &anonymous), "anonymous TLS cannot read beta");
    assert!(opens("beta", &pc1), "pc1 cannot read an open vDisk");
    let out = Command::new("nbdinfo")
        .arg(server.url("beta"))
        .output()
        .unwrap();
    assert!(out.status.success(), "plain NBD on beta: {}", text(&out));
    assert!(!opens("device/pc2", &anonymous));
    assert_eq!(listed(&nbdinfo_list(&server, &anonymous)), ["beta"]);

    // A certificate of the farm's CA naming no device opens nothing.
    let ghost = pki.device("ghost");
    assert!(!opens("beta", &ghost) && !opens("device/ghost", &ghost));
    assert!(refusals(&server, "unknown_device") >= 2);
    assert_eq!(listed(&nbdinfo_list(&server, &ghost)), Vec::<String>::new());

    // Revoked: pc1's still valid certificate opens nothing from now on.
    let out = server.cli_ok(&["device", "revoke", "pc1"]);
    assert!(
        out.contains("revoked the credentials of device pc1"),
        "{out}"
    );
    for export in ["device/pc1", "alpha"] {
        assert!(
            !opens(export, &pc1),
            "a revoked certificate opened {export}"
        );
    }
    assert!(refusals(&server, "revoked") >= 2);
    assert!(server
        .log_text()
        .contains("device pc1's credentials were revoked"));
    let shown = server.cli_ok(&["device", "show", "pc1"]);
    assert!(shown.contains("revoked:"), "{shown}");

    // Removed: pc2's certificate names no device any more.
    let pc2 = pki.device("pc2");
    assert!(opens("device/pc2", &pc2), "pc2 before its removal");
    // The client just closed its connection; the server may take a moment
    // to see it go before it lets the device be removed.
    common::wait_for(20, "pc2 removed once disconnected", || {
        server
            .cli(&["device", "remove", "pc2"])
            .status
            .success()
            .then_some(())
    });
    assert!(
        !opens("device/pc2", &pc2),
        "a removed device's certificate opened its disk"
    );
    assert!(server
        .log_text()
        .contains("which is no device of this farm"));

    // The server is unharmed.
    assert!(opens("beta", &anonymous));
}

/// A free TCP port on loopback, for a server's HTTPS API.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs an agent for `mac` through `bootstrap` with `extra` flags, which
/// must not get to serve: it stops, or waits for a login that is refused.
/// Its log.
fn agent_refused(bootstrap: &str, mac: &str, extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("agent.log");
    let mut child = Command::new(common::BIN)
        .args(["target", "--bootstrap", bootstrap])
        .args(["--mac", mac, "--deadline-ms", "4000", "--listen"])
        .arg(format!("unix:{}", dir.path().join("a.sock").display()))
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    common::wait_for(60, "the agent to stop or be refused", || {
        let stopped = child.try_wait().ok().flatten().is_some();
        (stopped || text().contains("waiting for a server")).then_some(())
    });
    let _ = child.kill();
    let _ = child.wait();
    let log = text();
    assert!(
        !log.contains("serving the device's disk"),
        "the agent serves: {log}"
    );
    log
}

/// Imports a 4 MiB random image as vDisk `name`, in Standard mode with
/// device-side caches, with devices pc1 and pc2 on it; the image's path.
fn shared_vdisk(server: &TestServer, dir: &Path, name: &str, seed: u64) -> PathBuf {
    let raw = dir.join(format!("{name}.raw"));
    random_image(&raw, 4 * MIB, seed);
    server.cli_ok(&["vdisk", "import", name, raw.to_str().unwrap()]);
    let standard = ["--mode", "standard", "--cache-type", "device"];
    server.cli_ok(&[&["vdisk", "set", name][..], &standard].concat());
    add_device(server, "pc1", "52:54:00:00:00:01", name);
    add_device(server, "pc2", "52:54:00:00:00:02", name);
    raw
}

/// An agent for `name` through `apis` with the credentials in `creds`.
fn tls_agent(
    dir: &Path,
    name: &str,
    mac: &str,
    apis: &[&str],
    creds: &Path,
    deadline_ms: &str,
) -> common::TestAgent {
    let creds = creds.to_str().unwrap();
    let flags = ["--deadline-ms", deadline_ms, "--tls-certificates", creds];
    common::TestAgent::start_with(dir, name, mac, apis, "ram:64MiB", &flags)
}

/// Asserts that the disk `agent` serves holds the bytes of image `raw`.
fn reads_as(agent: &common::TestAgent, raw: &Path) {
    let url = format!("nbd+unix:///?socket={}", agent.sock.display());
    let out = Command::new("qemu-img")
        .args([
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            raw.to_str().unwrap(),
            &url,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success() && text(&out).contains("Images are identical"),
        "reading through the agent: {}\nagent log:\n{}",
        text(&out),
        agent.log_text()
    );
}

/// A server requiring TLS, with its API over HTTPS too; and that API's URL.
fn tls_server(pki: &Pki) -> (TestServer, String) {
    let port = free_port();
    let server_dir = pki.server();
    let server = TestServer::start_fresh_with(&[
        "--tls-certificates",
        server_dir.to_str().unwrap(),
        "--api-tls",
        &format!("127.0.0.1:{port}"),
    ]);
    (server, format!("https://127.0.0.1:{port}"))
}

#[test]
fn the_agent_streams_over_tls_with_its_device_certificate() {
    let (Some(pki), true) = (make_pki(), have("qemu-img")) else {
        return;
    };
    let (server, https) = tls_server(&pki);
    let work = tempfile::tempdir().unwrap();
    let raw = shared_vdisk(&server, work.path(), "alpha", 40);
    let pc1 = pki.device("pc1");

    let agent = tls_agent(
        work.path(),
        "pc1",
        "52:54:00:00:00:01",
        &[&https],
        &pc1,
        "4000",
    );
    reads_as(&agent, &raw);
    assert!(server.metric("vstream_nbd_tls_connections_total") >= 1);
    drop(agent);

    // Another device's credentials, none, or a server name that is not in
    // the server's certificate: the agent does not serve, and says why.
    let pc1_flags = ["--tls-certificates", pc1.to_str().unwrap()];
    let log = agent_refused(&https, "52:54:00:00:00:02", &pc1_flags);
    assert!(
        log.contains("not the device with MAC 52:54:00:00:00:02"),
        "{log}"
    );
    let plain = server.api.trim_start_matches("http://");
    let log = agent_refused(plain, "52:54:00:00:00:01", &[]);
    assert!(log.contains("logs in over HTTPS"), "a plain agent: {log}");
    let mut flags = pc1_flags.to_vec();
    flags.extend(["--tls-hostname", "pvs9.example"]);
    let log = agent_refused(&https, "52:54:00:00:00:01", &flags);
    assert!(
        log.contains("certificate not valid for name \"pvs9.example\""),
        "a wrong server name: {log}"
    );
}

/// Two servers with TLS required in an etcd farm: the agent streams from
/// one with its device certificate, the server is killed, and the agent
/// fails over to the other, over TLS too, with every byte right.
/// Servers s1 and s2 of a farm in `etcd`, each requiring TLS with the
/// server certificate of `pki` and serving its API over HTTPS too; and
/// those HTTPS URLs.
fn tls_farm(pki: &Pki, etcd: &common::TestEtcd, dir: &Path) -> (Vec<TestServer>, Vec<String>) {
    let server_dir = pki.server();
    let ports = [free_port(), free_port()];
    let servers = (1..=2)
        .map(|i| {
            let https = format!("127.0.0.1:{}", ports[i - 1]);
            let tls = [
                "--tls",
                "require",
                "--tls-certificates",
                server_dir.to_str().unwrap(),
                "--api-tls",
                &https,
            ];
            TestServer::start_in_farm_with(
                dir.join(format!("s{i}")),
                &etcd.url,
                &format!("s{i}"),
                &tls,
                &[],
            )
        })
        .collect();
    let https = ports
        .iter()
        .map(|p| format!("https://127.0.0.1:{p}"))
        .collect();
    (servers, https)
}

#[test]
fn the_agent_fails_over_between_tls_servers() {
    let (Some(pki), true) = (make_pki(), have("qemu-img")) else {
        return;
    };
    let Some(etcd) = common::TestEtcd::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (mut servers, https) = tls_farm(&pki, &etcd, dir.path());
    let raw = shared_vdisk(&servers[0], dir.path(), "demo", 41);
    common::wait_farm(&servers);
    // Each server says in the farm state that its NBD requires TLS, and
    // where its HTTPS API is (the console shows both).
    let list: serde_json::Value =
        serde_json::from_str(&servers[0].cli_ok(&["server", "list", "--json"])).expect("JSON");
    let listed = list.as_array().expect("a list of servers");
    assert_eq!(listed.len(), 2, "{list}");
    for s in listed {
        assert_eq!(s["nbd_tls"], "require", "{s}");
        assert!(
            s["api_tls"]
                .as_str()
                .is_some_and(|u| u.starts_with("https://")),
            "{s}"
        );
    }
    let pc1 = pki.device("pc1");
    let apis: Vec<&str> = https.iter().map(String::as_str).collect();
    let agent = tls_agent(dir.path(), "pc1", "52:54:00:00:00:01", &apis, &pc1, "2000");
    reads_as(&agent, &raw);
    let log = agent.log_text();
    let serving = if log.contains("server=s1") { 0 } else { 1 };
    assert!(
        log.contains(&format!("server=s{}", serving + 1)),
        "which server? {log}"
    );
    servers[serving].kill9();
    reads_as(&agent, &raw);
    assert!(
        agent.log_text().contains("failed over"),
        "{}",
        agent.log_text()
    );
    let other = &servers[1 - serving];
    assert!(other.metric("vstream_nbd_tls_connections_total") >= 1);
}

/// POSTs a login for `mac` to `url` with curl's `extra` TLS flags; the
/// HTTP status and the body.
fn curl_login(url: &str, mac: &str, extra: &[String]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-m", "20", "-w", "\n%{http_code}", "-X", "POST"])
        .args(["-H", "content-type: application/json", "-d"])
        .arg(format!(r#"{{"mac":"{mac}","avoid":[]}}"#))
        .args(extra)
        .arg(format!("{url}/api/v1/login"))
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

#[test]
fn a_device_logs_in_over_https_with_its_certificate_only() {
    let (Some(pki), true, true) = (make_pki(), have("curl"), have("qemu-img")) else {
        return;
    };
    let (server, https) = tls_server(&pki);
    let work = tempfile::tempdir().unwrap();
    let raw = shared_vdisk(&server, work.path(), "alpha", 42);
    let creds = |name: &str| -> Vec<String> {
        let d = pki.device(name);
        let f = |n: &str| d.join(n).to_string_lossy().into_owned();
        vec![
            "--cacert".into(),
            f("ca-cert.pem"),
            "--cert".into(),
            f("client-cert.pem"),
            "--key".into(),
            f("client-key.pem"),
        ]
    };
    let ca_only = vec![
        "--cacert".to_string(),
        pki.device("pc1")
            .join("ca-cert.pem")
            .to_string_lossy()
            .into_owned(),
    ];

    // Anyone could map a MAC to its device, vDisk and server: no more.
    let (code, body) = curl_login(&server.api, "52:54:00:00:00:01", &[]);
    assert_eq!(code, 403, "plain HTTP login: {body}");
    assert!(body.contains("logs in over HTTPS"), "{body}");
    let (code, body) = curl_login(&https, "52:54:00:00:00:01", &ca_only);
    assert_eq!(code, 403, "HTTPS login without a certificate: {body}");
    let (code, body) = curl_login(&https, "52:54:00:00:00:02", &creds("pc1"));
    assert_eq!(code, 403, "pc1's certificate for pc2: {body}");
    assert!(
        body.contains("not the device with MAC 52:54:00:00:00:02"),
        "{body}"
    );
    // (Until the server has verified its copy, it answers 503.)
    let body = common::wait_for(60, "pc1's own login over HTTPS", || {
        let (code, body) = curl_login(&https, "52:54:00:00:00:01", &creds("pc1"));
        assert!(code == 200 || code == 503, "pc1's own login: {code} {body}");
        (code == 200).then_some(body)
    });
    assert!(body.contains(r#""device":"pc1""#), "{body}");

    // The agent logs in over HTTPS and streams over TLS.
    let pc1 = pki.device("pc1");
    let agent = tls_agent(
        work.path(),
        "pc1",
        "52:54:00:00:00:01",
        &[&https],
        &pc1,
        "4000",
    );
    reads_as(&agent, &raw);
    drop(agent);

    // Revoked: its still valid certificate logs in no more.
    server.cli_ok(&["device", "revoke", "pc1"]);
    let (code, body) = curl_login(&https, "52:54:00:00:00:01", &creds("pc1"));
    assert_eq!(code, 403, "a revoked device's login: {body}");
    assert!(body.contains("revoked"), "{body}");
    assert!(server.log_text().contains("login refused"));
}

/// nbdcopy reads a whole vDisk over TLS through four connections with many
/// large requests in flight: the socket fills, and each reply batch must
/// still leave the TLS session (a reply left in it stalls the client).
#[test]
fn nbdcopy_reads_a_whole_vdisk_over_tls() {
    let (Some(pki), true) = (make_pki(), have("nbdcopy")) else {
        return;
    };
    let server_dir = pki.server();
    let server =
        TestServer::start_fresh_with(&["--tls-certificates", server_dir.to_str().unwrap()]);
    let work = tempfile::tempdir().unwrap();
    let raw = work.path().join("big.raw");
    random_image(&raw, 96 * MIB, 43);
    server.cli_ok(&["vdisk", "import", "big", raw.to_str().unwrap()]);
    server.cli_ok(&["vdisk", "set", "big", "--anonymous-read", "on"]);
    let copy = work.path().join("copy.raw");
    let url = format!(
        "nbds://127.0.0.1:{}/big?tls-certificates={}",
        server.nbd_port,
        pki.anonymous().display()
    );
    // (A stalled copy is killed after 120 s, and fails.)
    let out = Command::new("timeout")
        .args([
            "120",
            "nbdcopy",
            "--connections=4",
            "--requests=64",
            "--request-size=1048576",
        ])
        .arg(&url)
        .arg(&copy)
        .output()
        .unwrap();
    assert!(out.status.success(), "nbdcopy over TLS: {}", text(&out));
    assert!(
        std::fs::read(&copy).unwrap() == std::fs::read(&raw).unwrap(),
        "the copy over TLS differs from the image"
    );
}

/// A farm PKI made by vstream itself: `vstream ca init`, and the server's
/// folder with its enrollment CA (`vstream ca server --enrollment`). The
/// farm CA's folder and the server's.
fn vstream_pki(dir: &Path) -> (PathBuf, PathBuf) {
    let (ca, server) = (dir.join("farm-ca"), dir.join("server-tls"));
    common::run(common::BIN, &["ca", "init", "--out", ca.to_str().unwrap()]);
    common::run(
        common::BIN,
        &[
            "ca",
            "server",
            "--ca",
            ca.to_str().unwrap(),
            "--out",
            server.to_str().unwrap(),
            "--name",
            "pvs1",
            "--san",
            "127.0.0.1",
            "--san",
            "localhost",
            "--enrollment",
        ],
    );
    (ca, server)
}

/// A server requiring TLS with the folder `tls`, its API over HTTPS too,
/// and `extra` flags; and that API's URL.
fn enrolling_server(tls: &Path, extra: &[&str]) -> (TestServer, String) {
    let port = free_port();
    let api_tls = format!("127.0.0.1:{port}");
    let flags = [
        &[
            "--tls-certificates",
            tls.to_str().unwrap(),
            "--api-tls",
            &api_tls,
        ][..],
        extra,
    ]
    .concat();
    (
        TestServer::start_fresh_with(&flags),
        format!("https://{api_tls}"),
    )
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_credential_from_the_cli_opens_its_own_device_export_only() {
    let (true, true) = (have("nbdinfo"), have("qemu-img")) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let (ca, tls) = vstream_pki(work.path());
    assert_eq!(mode(&ca.join("ca-key.pem")), 0o600);
    assert_eq!(mode(&tls.join("enroll-ca-key.pem")), 0o600);
    let (server, _) = enrolling_server(&tls, &[]);
    shared_vdisk(&server, work.path(), "alpha", 50);

    // Online: the key is made by the CLI, the server's enrollment CA signs.
    let pc1 = work.path().join("pc1");
    let said = server.cli_ok(&[
        "device",
        "credential",
        "pc1",
        "--out",
        pc1.to_str().unwrap(),
    ]);
    assert!(said.contains("credential of device pc1"), "{said}");
    assert_eq!(mode(&pc1.join("client-key.pem")), 0o600);
    let out = nbdinfo_tls(&server, "device/pc1", &pc1);
    assert!(out.status.success(), "pc1's own export: {}", text(&out));
    let out = nbdinfo_tls(&server, "device/pc2", &pc1);
    assert!(
        !out.status.success(),
        "pc1's credential opened pc2's export"
    );
    assert!(
        server.log_text().contains("pc2"),
        "no refusal in the server log"
    );
    // Offline: the farm CA signs on the admin's machine, no server asked.
    let pc2 = work.path().join("pc2");
    let said = common::run(
        common::BIN,
        &[
            "device",
            "credential",
            "pc2",
            "--ca",
            ca.to_str().unwrap(),
            "--out",
            pc2.to_str().unwrap(),
        ],
    );
    assert!(said.contains("device pc2"), "{said}");
    let out = nbdinfo_tls(&server, "device/pc2", &pc2);
    assert!(out.status.success(), "pc2's own export: {}", text(&out));
    // Nothing is overwritten, and an unknown device gets nothing.
    let err = server.cli_err(&[
        "device",
        "credential",
        "pc1",
        "--out",
        pc1.to_str().unwrap(),
    ]);
    assert!(err.contains("not overwritten"), "{err}");
    let err = server.cli_err(&[
        "device",
        "credential",
        "pc9",
        "--out",
        work.path().join("pc9").to_str().unwrap(),
    ]);
    assert!(err.contains("pc9 does not exist"), "{err}");
    assert!(server.metric("vstream_enroll_certificates_total") >= 1);
}

/// The boot script of `mac` (which must hand out a token): its
/// `vstream.bootstrap=` list and `vstream.enroll=` token.
fn script_token(server: &TestServer, mac: &str) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sf", "-m", "20"])
        .arg(format!("{}/boot/ipxe?mac={mac}", server.api))
        .output()
        .expect("curl");
    let script = String::from_utf8_lossy(&out.stdout).into_owned();
    let word = |key: &str| {
        script
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in the boot script:\n{script}"))
            .to_owned()
    };
    (word("vstream.bootstrap="), word("vstream.enroll="))
}

/// An agent with only the farm CA and `token`: the end of its log once it
/// serves (`Ok`) or stops (`Err`).
fn enrolling_agent(
    dir: &Path,
    mac: &str,
    bootstrap: &str,
    token: &str,
) -> Result<common::TestAgent, String> {
    let log = dir.join(format!("enroll-{mac}.log"));
    let mut child = Command::new(common::BIN)
        .args(["target", "--bootstrap", bootstrap, "--mac", mac])
        .args(["--cache", "ram:64MiB", "--deadline-ms", "4000"])
        .arg("--listen")
        .arg(format!(
            "unix:{}",
            dir.join(format!("{mac}.sock")).display()
        ))
        .arg("--tls-certificates")
        .arg(dir.join("ca-only"))
        .args(["--enroll-token", token])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if text().contains("serving the device's disk") {
            break;
        }
        if child.try_wait().ok().flatten().is_some() {
            return Err(text());
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("neither served nor stopped in 60 s:\n{}", text()));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let agent = common::TestAgent::adopt(child, dir.join(format!("{mac}.sock")), log);
    Ok(agent)
}

#[test]
fn a_netbooted_device_trades_its_boot_token_once_for_its_certificate() {
    let (true, true) = (have("curl"), have("qemu-img")) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (_, tls) = vstream_pki(w);
    // The device has the farm CA only: it checks servers, shows nothing.
    std::fs::create_dir(w.join("ca-only")).unwrap();
    std::fs::copy(tls.join("ca-cert.pem"), w.join("ca-only/ca-cert.pem")).unwrap();
    let (server, https) = enrolling_server(&tls, &[]);
    let raw = shared_vdisk(&server, w, "alpha", 51);
    let kernel = w.join("vmlinuz");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    server.cli_ok(&[
        "vdisk",
        "set",
        "alpha",
        "--kernel",
        kernel.to_str().unwrap(),
    ]);
    let (pc1, pc2) = ("52:54:00:00:00:01", "52:54:00:00:00:02");

    let (bootstrap, token) = script_token(&server, pc1);
    assert_eq!(bootstrap, https, "the device logs in over HTTPS");
    assert_eq!(token.len(), 64);
    let agent = enrolling_agent(w, pc1, &bootstrap, &token).expect("enrolled");
    reads_as(&agent, &raw);
    assert!(agent
        .log_text()
        .contains("device certificate from enrollment"));
    drop(agent);

    // Replayed: spent at the first use.
    let log = enrolling_agent(w, pc1, &bootstrap, &token)
        .map(|_| ())
        .unwrap_err();
    assert!(log.contains("no enrollment token outstanding"), "{log}");
    // Bound to its MAC: pc1's token is no use to pc2, and is not spent by
    // the attempt.
    let (_, token1) = script_token(&server, pc1);
    let (_, _token2) = script_token(&server, pc2);
    let log = enrolling_agent(w, pc2, &bootstrap, &token1)
        .map(|_| ())
        .unwrap_err();
    assert!(log.contains("not device pc2's enrollment token"), "{log}");
    let agent = enrolling_agent(w, pc1, &bootstrap, &token1).expect("pc1's token still good");
    drop(agent);
    // A later boot script replaces the token before it.
    let (_, old) = script_token(&server, pc2);
    let (_, _new) = script_token(&server, pc2);
    let log = enrolling_agent(w, pc2, &bootstrap, &old)
        .map(|_| ())
        .unwrap_err();
    assert!(log.contains("not device pc2's enrollment token"), "{log}");
    // Revoked after the script: its token goes with the credentials.
    let (_, before) = script_token(&server, pc2);
    server.cli_ok(&["device", "revoke", "pc2"]);
    let log = enrolling_agent(w, pc2, &bootstrap, &before)
        .map(|_| ())
        .unwrap_err();
    assert!(log.contains("no enrollment token outstanding"), "{log}");
    // Over plain HTTP the token is not even looked at.
    let (_, fresh) = script_token(&server, pc2);
    let log = enrolling_agent(w, pc2, &server.api, &fresh)
        .map(|_| ())
        .unwrap_err();
    assert!(log.contains("no https:// server"), "{log}");

    let refused = server.metric("vstream_enroll_refusals_total");
    assert!(refused >= 4, "refusals counted: {refused}");
    let log = server.log_text();
    for t in [&token, &token1, &old, &before, &fresh] {
        assert!(!log.contains(t.as_str()), "a token in the server log");
    }
}

#[test]
fn a_late_enrollment_token_is_refused_and_spent() {
    let true = have("curl") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (_, tls) = vstream_pki(w);
    std::fs::create_dir(w.join("ca-only")).unwrap();
    std::fs::copy(tls.join("ca-cert.pem"), w.join("ca-only/ca-cert.pem")).unwrap();
    let (server, _) = enrolling_server(&tls, &["--enroll-token-ttl", "1"]);
    shared_vdisk(&server, w, "alpha", 52);
    let kernel = w.join("vmlinuz");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    server.cli_ok(&[
        "vdisk",
        "set",
        "alpha",
        "--kernel",
        kernel.to_str().unwrap(),
    ]);
    let (bootstrap, token) = script_token(&server, "52:54:00:00:00:01");
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let log = enrolling_agent(w, "52:54:00:00:00:01", &bootstrap, &token)
        .map(|_| ())
        .unwrap_err();
    assert!(log.contains("enrollment token expired"), "{log}");
    let log = enrolling_agent(w, "52:54:00:00:00:01", &bootstrap, &token)
        .map(|_| ())
        .unwrap_err();
    assert!(log.contains("no enrollment token outstanding"), "{log}");
}

#[test]
fn a_device_renews_with_its_certificate_until_it_is_revoked() {
    let (true, true) = (have("curl"), have("certtool")) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (_, tls) = vstream_pki(w);
    let (server, https) = enrolling_server(&tls, &["--device-cert-hours", "2"]);
    shared_vdisk(&server, w, "alpha", 53);
    let pc1 = w.join("pc1");
    server.cli_ok(&[
        "device",
        "credential",
        "pc1",
        "--out",
        pc1.to_str().unwrap(),
    ]);
    // A new key and its request, as the agent makes them.
    let key = w.join("new-key.pem");
    certtool(
        w,
        &[
            "--generate-privkey",
            "--key-type",
            "ecdsa",
            "--outfile",
            key.to_str().unwrap(),
        ],
    );
    let tmpl = template(w, "req", &["cn = whatever"]);
    let csr = w.join("req.pem");
    certtool(
        w,
        &[
            "--generate-request",
            "--load-privkey",
            key.to_str().unwrap(),
            "--template",
            &tmpl,
            "--outfile",
            csr.to_str().unwrap(),
        ],
    );
    let body = serde_json::json!({ "csr": std::fs::read_to_string(&csr).unwrap() }).to_string();
    let renew = |cert: bool| {
        let f = |n: &str| pc1.join(n).to_string_lossy().into_owned();
        let mut cmd = Command::new("curl");
        cmd.args([
            "-s",
            "-m",
            "20",
            "-w",
            "\n%{http_code}",
            "--cacert",
            &f("ca-cert.pem"),
        ]);
        if cert {
            cmd.args([
                "--cert",
                &f("client-cert.pem"),
                "--key",
                &f("client-key.pem"),
            ]);
        }
        let out = cmd
            .args(["-H", "content-type: application/json", "-d", &body])
            .arg(format!("{https}/api/v1/renew"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().to_owned(), body.to_owned())
    };
    let (code, reply) = renew(true);
    assert_eq!(code, "200", "{reply}");
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(
        reply["device"], "pc1",
        "named by the server, not the request"
    );
    let left = reply["not_after_unix"].as_i64().unwrap()
        - std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
    assert!(
        (7000..=7300).contains(&left),
        "--device-cert-hours 2: {left} s"
    );
    let (code, reply) = renew(false);
    assert_eq!(code, "403", "renewed without a certificate: {reply}");
    server.cli_ok(&["device", "revoke", "pc1"]);
    let (code, reply) = renew(true);
    assert_eq!(code, "403", "renewed after revoke: {reply}");
    assert!(reply.contains("revoked"), "{reply}");
}

#[test]
fn a_peer_without_a_server_certificate_pulls_nothing_even_with_the_secret() {
    let (Some(pki), true, true) = (make_pki(), have("curl"), have("etcdctl")) else {
        return;
    };
    let Some(etcd) = common::TestEtcd::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (servers, https) = tls_farm(&pki, &etcd, dir.path());
    shared_vdisk(&servers[0], dir.path(), "demo", 43);
    // s2's verified copy came over mutual TLS: s1 refuses peers otherwise.
    common::wait_farm_ready(&servers[0], 2);
    let file = std::fs::read_dir(servers[0].data.join("vdisks/demo"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|f| f.ends_with(".layer"))
        .expect("a layer file");
    // The farm's peer secret, as a thief of the farm state has it.
    let secret = common::run(
        "etcdctl",
        &[
            "--endpoints",
            &etcd.url,
            "get",
            "--print-value-only",
            "/vstream/farm/secrets/peer",
        ],
    );
    let secret = secret.trim().trim_matches('"').to_owned();
    assert!(secret.len() >= 16, "no peer secret read: {secret:?}");
    let bearer = format!("Authorization: Bearer {secret}");
    let path = format!("/peer/v1/vdisks/demo/layers/{file}/data?from=0&to=16");
    let ask = |base: &str, creds: Option<(&Path, &str)>| {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-m", "20", "-w", "\n%{http_code}", "-H", &bearer]);
        if let Some((dir, who)) = creds {
            let f = |n: &str| dir.join(n).to_string_lossy().into_owned();
            cmd.args(["--cacert", &f("ca-cert.pem")]);
            if !who.is_empty() {
                let (cert, key) = (format!("{who}-cert.pem"), format!("{who}-key.pem"));
                cmd.args(["--cert", &f(&cert), "--key", &f(&key)]);
            }
        }
        let out = cmd.arg(format!("{base}{path}")).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().to_owned(), body.to_owned())
    };
    let (code, body) = ask(&servers[0].api, None);
    assert_eq!(code, "403", "plain HTTP with the secret: {body}");
    assert!(body.contains("over HTTPS"), "{body}");
    let (code, body) = ask(&https[0], Some((&pki.anonymous(), "")));
    assert_eq!(code, "403", "HTTPS without a certificate: {body}");
    let (code, body) = ask(&https[0], Some((&pki.client(), "client")));
    assert_eq!(code, "403", "a device's certificate: {body}");
    assert!(body.contains("not a server's"), "{body}");
    // A server's certificate and the secret: a farm server.
    let (code, _) = ask(&https[0], Some((&pki.server(), "server")));
    assert_eq!(code, "200", "a server of the farm was refused");
    assert!(servers[0].log_text().contains("a peer request was refused"));
}

/// Runs the CLI against `api` with `extra` options and the server's token.
fn cli_at(server: &TestServer, api: &str, extra: &[&str]) -> std::process::Output {
    Command::new(common::BIN)
        .args(["vdisk", "list"])
        .args(extra)
        .env("VSTREAM_API", api)
        .env("VSTREAM_TOKEN", server.token())
        .env_remove("VSTREAM_API_CA")
        .output()
        .expect("running vstream")
}

/// The admin CLI speaks HTTPS to the API and checks the server's
/// certificate: the farm's CA with `--api-ca`, the name in the URL; it
/// never goes on with a certificate it cannot verify.
#[test]
fn the_cli_verifies_the_https_api() {
    let Some(pki) = make_pki() else {
        return;
    };
    let (server, https) = tls_server(&pki);
    let ca = pki.path("ca-cert.pem");
    let ca = ca.to_str().unwrap();
    server.cli_ok(&["vdisk", "create", "alpha", "--size", "1MiB"]);

    let out = cli_at(&server, &https, &["--api-ca", ca]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("alpha"));
    // The name checked is the URL's: localhost is on the certificate too.
    let localhost = https.replace("127.0.0.1", "localhost");
    let out = cli_at(&server, &localhost, &["--api-ca", ca]);
    assert!(out.status.success(), "{}", text(&out));

    // Another CA's trust, or none: refused before any token leaves.
    let other = pki.path("other-ca-cert.pem");
    let out = cli_at(&server, &https, &["--api-ca", other.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("certificate"), "{err}");
    if !Path::new("/etc/vstream/tls/ca-cert.pem").exists() {
        let out = cli_at(&server, &https, &[]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("certificate") && err.contains("--api-ca"),
            "{err}"
        );
    }
    // A CA file that is not one: a clear error naming it.
    let out = cli_at(&server, &https, &["--api-ca", "/etc/hostname"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--api-ca /etc/hostname"), "{err}");
}
