//! NBD over TLS with the real clients: a test PKI made with certtool (as
//! libnbd's and qemu's tests make theirs), libnbd's nbdinfo and qemu-img
//! through `--tls require`, and the refusals of qemu-iotests 233 (a plain
//! client against TLS, a TLS client against a plain server, a client of
//! another CA, a client without a certificate), each with the server
//! unharmed.

mod common;

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
    /// ca-cert.pem, client-cert.pem, client-key.pem.
    fn client(&self) -> PathBuf {
        self.path("client")
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
            "encryption_key",
            "signing_key",
        ],
    );
    let client = [
        "organization = vstream test",
        "cn = dev-pc1",
        "tls_www_client",
        "encryption_key",
        "signing_key",
    ];
    make_cert(d, "ca", "client", &client);
    make_cert(d, "other-ca", "stranger", &client);
    layout(
        d,
        "server",
        &[
            ("ca-cert.pem", "ca-cert.pem"),
            ("server-cert.pem", "server-cert.pem"),
            ("server-key.pem", "server-key.pem"),
        ],
    );
    layout(
        d,
        "client",
        &[
            ("ca-cert.pem", "ca-cert.pem"),
            ("client-cert.pem", "client-cert.pem"),
            ("client-key.pem", "client-key.pem"),
        ],
    );
    layout(
        d,
        "stranger",
        &[
            ("ca-cert.pem", "ca-cert.pem"),
            ("client-cert.pem", "stranger-cert.pem"),
            ("client-key.pem", "stranger-key.pem"),
        ],
    );
    layout(d, "anonymous", &[("ca-cert.pem", "ca-cert.pem")]);
    Some(Pki { dir })
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
    assert!(server.metric("vstream_nbd_tls_required_refusals_total") >= 2);

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
    for (who, creds) in [
        ("another CA's client", pki.stranger()),
        ("a client without a certificate", pki.anonymous()),
    ] {
        let out = nbdinfo_tls(&server, "v", &creds);
        assert!(!out.status.success(), "{who} got in: {}", text(&out));
    }
    assert!(server.metric("vstream_nbd_tls_handshake_failures_total") >= 2);
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
