//! Broken and hostile NBD clients against a real server, spoken byte by byte
//! over TCP with the test's own encoders (not the vstream-nbd crate), so the
//! server is checked against the protocol rather than against itself.
//!
//! After every bad input: the bad connection got the right answer or was
//! closed, the server process is alive, another client (`nbdinfo`) works, and
//! the server log shows no panic.
//!
//! Also hostile text from outside, over NBD and the login API: control
//! characters in logged names (11), names and MACs that cannot name a device (12).

use crate::common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{have, TestServer};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const CLIENT_FLAGS: u32 = 0b11; // FIXED_NEWSTYLE | NO_ZEROES

const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_EXTENDED_HEADERS: u32 = 11;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
const INFO_EXPORT: u16 = 0;

const TFLAG_READ_ONLY: u16 = 1 << 1;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;

const EPERM: u32 = 1;
const EINVAL: u32 = 22;

const MIB: u64 = 1 << 20;
const DISK_SIZE: u64 = 64 * MIB;
/// No socket operation of a test waits longer than this.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Byte builders.

fn option(code: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// NBD_OPT_GO / NBD_OPT_INFO data: the name and no information requests.
fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

fn request(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&command.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&length.to_be_bytes());
    v
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

// ---------------------------------------------------------------------------
// A raw client.

struct Client {
    s: TcpStream,
}

impl Client {
    /// Connects and reads the greeting; the client flags are not sent yet.
    fn connect(port: u16) -> Client {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connecting to the NBD port");
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_nodelay(true).unwrap();
        let mut c = Client { s };
        let g = c.read(18);
        assert_eq!(be_u64(&g[0..8]), NBDMAGIC, "greeting magic");
        assert_eq!(be_u64(&g[8..16]), IHAVEOPT, "greeting: not newstyle");
        assert_ne!(
            be_u16(&g[16..18]) & FLAG_FIXED_NEWSTYLE,
            0,
            "greeting: not fixed newstyle"
        );
        c
    }

    /// Connects and sends ordinary client flags: ready for options.
    fn negotiating(port: u16) -> Client {
        let mut c = Client::connect(port);
        c.send(&CLIENT_FLAGS.to_be_bytes());
        c
    }

    /// Connects and completes NBD_OPT_GO on `export`: ready for requests.
    fn transmitting(port: u16, export: &str) -> (Client, u64, u16) {
        let mut c = Client::negotiating(port);
        let (size, flags) = c.go(export);
        (c, size, flags)
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("sending to the server");
    }

    fn read(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        if let Err(e) = self.s.read_exact(&mut b) {
            panic!("reading {n} bytes from the server: {e}");
        }
        b
    }

    /// Reads one option reply to `option`: (reply type, data).
    fn opt_reply(&mut self, option: u32) -> (u32, Vec<u8>) {
        let h = self.read(20);
        assert_eq!(be_u64(&h[0..8]), OPT_REPLY_MAGIC, "option reply magic");
        assert_eq!(
            be_u32(&h[8..12]),
            option,
            "option reply names another option"
        );
        let len = be_u32(&h[16..20]);
        assert!(len <= 1 << 20, "option reply of {len} bytes");
        (be_u32(&h[12..16]), self.read(len as usize))
    }

    /// Sends an option and expects a single error reply of type `want`; returns its message.
    fn expect_opt_error(&mut self, code: u32, data: &[u8], want: u32) -> String {
        self.send(&option(code, data));
        let (kind, msg) = self.opt_reply(code);
        let msg = String::from_utf8_lossy(&msg).into_owned();
        assert_eq!(
            kind, want,
            "option {code}: reply {kind:#x} ({msg:?}), wanted {want:#x}"
        );
        msg
    }

    /// NBD_OPT_GO on `name`; panics unless it succeeds. Returns (size, transmission flags).
    fn go(&mut self, name: &str) -> (u64, u16) {
        self.send(&option(OPT_GO, &go_data(name)));
        let mut export = None;
        loop {
            let (kind, data) = self.opt_reply(OPT_GO);
            match kind {
                REP_INFO if be_u16(&data) == INFO_EXPORT => {
                    assert_eq!(data.len(), 12, "NBD_INFO_EXPORT length");
                    export = Some((be_u64(&data[2..10]), be_u16(&data[10..12])));
                }
                REP_INFO => {}
                REP_ACK => break,
                other => panic!(
                    "GO {name:?}: reply {other:#x}: {}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
        export.unwrap_or_else(|| panic!("GO {name:?}: no NBD_INFO_EXPORT before the ACK"))
    }

    /// NBD_OPT_LIST: the export names.
    fn list(&mut self) -> Vec<String> {
        self.send(&option(OPT_LIST, &[]));
        let mut names = Vec::new();
        loop {
            let (kind, data) = self.opt_reply(OPT_LIST);
            match kind {
                REP_SERVER => {
                    let len = be_u32(&data) as usize;
                    names.push(String::from_utf8_lossy(&data[4..4 + len]).into_owned());
                }
                REP_ACK => return names,
                other => panic!("LIST: reply {other:#x}: {}", String::from_utf8_lossy(&data)),
            }
        }
    }

    /// Reads a simple reply to `cookie`; returns its error.
    fn simple_reply(&mut self, cookie: u64) -> u32 {
        let h = self.read(16);
        assert_eq!(be_u32(&h[0..4]), SIMPLE_REPLY_MAGIC, "simple reply magic");
        assert_eq!(be_u64(&h[8..16]), cookie, "reply cookie");
        be_u32(&h[4..8])
    }

    /// Sends a request without payload and returns the error of its reply.
    fn command(&mut self, flags: u16, command: u16, cookie: u64, offset: u64, len: u32) -> u32 {
        self.send(&request(flags, command, cookie, offset, len));
        self.simple_reply(cookie)
    }

    fn read_at(&mut self, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let err = self.command(0, CMD_READ, cookie, offset, len);
        assert_eq!(err, 0, "READ {len} at {offset}");
        self.read(len as usize)
    }

    fn write_at(&mut self, cookie: u64, offset: u64, data: &[u8]) -> u32 {
        let mut r = request(0, CMD_WRITE, cookie, offset, data.len() as u32);
        r.extend_from_slice(data);
        self.send(&r);
        self.simple_reply(cookie)
    }

    /// The server must close the connection (EOF or reset) without sending anything.
    fn assert_closed(&mut self, what: &str) {
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        match self.s.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!(
                "{what}: the server answered {n} bytes instead of closing: {:02x?}",
                &buf[..n.min(48)]
            ),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                ) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!(
                    "{what}: the connection is still open after {:?}",
                    start.elapsed()
                )
            }
            Err(e) => panic!("{what}: unexpected socket error {e}"),
        }
    }
}

// ---------------------------------------------------------------------------
// The server and its health.

/// A server with vDisk `v` (64 MiB) and device `d1` on it (Private mode).
fn server() -> TestServer {
    let s = TestServer::start();
    common::add_v_and_d1(&s, "52:54:00:12:34:01");
    s
}

/// The server runs, another client can use `export`, and nothing panicked.
fn assert_healthy(server: &mut TestServer, export: &str) {
    let status = server
        .child
        .as_mut()
        .expect("server child")
        .try_wait()
        .expect("try_wait");
    if let Some(st) = status {
        panic!("the server exited with {st}:\n{}", server.log_text());
    }
    let out = Command::new("nbdinfo")
        .arg(server.url(export))
        .output()
        .expect("running nbdinfo");
    assert!(
        out.status.success(),
        "nbdinfo {export} failed after bad input: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log_text()
    );
    let log = server.log_text();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
}

/// Polls `metric` until it equals `want` (up to 5 s).
fn wait_metric(server: &TestServer, name: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = server.metric(name);
        if v == want {
            return;
        }
        assert!(Instant::now() < deadline, "{name} is {v}, expected {want}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------
// 1, 2: garbage during the handshake.

#[test]
fn garbage_instead_of_client_flags_or_options_is_closed() {
    if !have("nbdinfo") {
        return;
    }
    let mut server = server();
    let http = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    // In place of the client flags.
    let mut c = Client::connect(server.nbd_port);
    c.send(http);
    c.assert_closed("HTTP request instead of client flags");
    assert_healthy(&mut server, "v");

    // Good flags, then garbage in place of an option.
    let mut c = Client::negotiating(server.nbd_port);
    c.send(http);
    c.assert_closed("HTTP request instead of an option");
    assert_healthy(&mut server, "v");

    // A valid option, then random bytes.
    let mut c = Client::negotiating(server.nbd_port);
    assert_eq!(c.list(), vec!["v".to_string()]);
    c.send(&pattern(100, 7));
    c.assert_closed("random bytes after an option");
    assert_healthy(&mut server, "v");
}

#[test]
fn client_flags_with_unknown_bits_are_closed() {
    if !have("nbdinfo") {
        return;
    }
    let mut server = server();
    for flags in [1u32 << 2, 0x8000_0001, u32::MAX] {
        let mut c = Client::connect(server.nbd_port);
        c.send(&flags.to_be_bytes());
        // Even a valid option after the flags must not be answered.
        c.send(&option(OPT_LIST, &[]));
        c.assert_closed(&format!("client flags {flags:#x}"));
        assert_healthy(&mut server, "v");
    }
}

// 3: an option whose inner lengths lie.

#[test]
fn option_with_lying_lengths_gets_invalid_and_the_handshake_goes_on() {
    if !have("nbdinfo") {
        return;
    }
    let mut server = server();
    let mut c = Client::negotiating(server.nbd_port);

    // GO whose name length (100) runs past the option's 9 bytes of data.
    let mut lying = 100u32.to_be_bytes().to_vec();
    lying.extend_from_slice(b"abc");
    lying.extend_from_slice(&0u16.to_be_bytes());
    let msg = c.expect_opt_error(OPT_GO, &lying, REP_ERR_INVALID);
    assert!(!msg.is_empty(), "NBD_REP_ERR_INVALID without a message");

    // INFO that announces 5 information requests and carries 1.
    let mut short = 1u32.to_be_bytes().to_vec();
    short.extend_from_slice(b"v");
    short.extend_from_slice(&5u16.to_be_bytes());
    short.extend_from_slice(&3u16.to_be_bytes());
    c.expect_opt_error(OPT_INFO, &short, REP_ERR_INVALID);

    // GO with data left over after the requests.
    let mut long = go_data("v");
    long.extend_from_slice(b"trailing");
    c.expect_opt_error(OPT_GO, &long, REP_ERR_INVALID);

    // LIST takes no data.
    c.expect_opt_error(OPT_LIST, b"x", REP_ERR_INVALID);

    // The handshake goes on: LIST is answered, GO works, a READ works.
    assert_eq!(c.list(), vec!["v".to_string()]);
    let (size, _) = c.go("v");
    assert_eq!(size, DISK_SIZE);
    assert_eq!(c.read_at(1, 0, 4096), vec![0u8; 4096]);
    assert_healthy(&mut server, "v");
}

// 4: an option claiming 4 GiB of data.

#[test]
fn option_of_length_0xffffffff_is_closed_without_allocating() {
    if !have("nbdinfo") {
        return;
    }
    let mut server = server();
    let pid = server.pid();
    let hwm_before = common::proc_kib(pid, "VmHWM");
    for length in [u32::MAX, 0x8000_0000, (64 << 10) + 1] {
        let mut c = Client::negotiating(server.nbd_port);
        let mut h = IHAVEOPT.to_be_bytes().to_vec();
        h.extend_from_slice(&OPT_GO.to_be_bytes());
        h.extend_from_slice(&length.to_be_bytes());
        c.send(&h);
        c.send(&[0u8; 1000]);
        let start = Instant::now();
        c.assert_closed(&format!("option of length {length:#x}"));
        // Closing at once, not after waiting for 4 GiB that never come.
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "closed only after {:?}",
            start.elapsed()
        );
        assert_healthy(&mut server, "v");
    }
    let hwm_after = common::proc_kib(pid, "VmHWM");
    assert!(
        hwm_after < hwm_before + 256 * 1024,
        "peak memory grew from {hwm_before} KiB to {hwm_after} KiB: the server allocated the option"
    );
}

// 5: unknown options.

#[test]
fn unknown_options_are_unsupported_and_the_handshake_goes_on() {
    if !have("nbdinfo") {
        return;
    }
    let mut server = server();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.raw");
    common::random_image(&img, 16 * MIB, 5);
    server.cli_ok(&["vdisk", "import", "img", img.to_str().unwrap()]);
    let want = std::fs::read(&img).unwrap();

    let mut c = Client::negotiating(server.nbd_port);
    c.expect_opt_error(OPT_EXTENDED_HEADERS, &[], REP_ERR_UNSUP);
    c.expect_opt_error(12345, b"whatever data", REP_ERR_UNSUP);
    c.expect_opt_error(0, &[], REP_ERR_UNSUP);
    c.expect_opt_error(u32::MAX, &[0u8; 300], REP_ERR_UNSUP);
    let (size, flags) = c.go("img");
    assert_eq!(size, 16 * MIB);
    assert_ne!(
        flags & TFLAG_READ_ONLY,
        0,
        "the vDisk export must be read-only"
    );
    assert_eq!(c.read_at(1, 0, 4096), want[..4096]);
    let off = 16 * MIB - 300_000;
    assert_eq!(c.read_at(2, off, 300_000), want[off as usize..]);
    c.send(&request(0, CMD_DISC, 3, 0, 0));
    c.assert_closed("after NBD_CMD_DISC");
    assert_healthy(&mut server, "img");
}

// 6: unknown export names.

#[test]
fn go_on_an_unknown_export_is_refused_with_a_message() {
    if !have("nbdinfo") {
        return;
    }
    let mut server = server();
    let mut c = Client::negotiating(server.nbd_port);
    for name in ["nope", "device/ghost", "../v", "v/../v"] {
        let msg = c.expect_opt_error(OPT_GO, &go_data(name), REP_ERR_UNKNOWN);
        assert!(
            msg.contains(name),
            "the message {msg:?} does not name export {name:?}"
        );
    }
    // The handshake is still usable.
    assert_eq!(c.list(), vec!["v".to_string()]);
    let (size, _) = c.go("v");
    assert_eq!(size, DISK_SIZE);
    assert_healthy(&mut server, "v");
}

// 7: bad requests in transmission.

#[test]
fn bad_requests_in_transmission() {
    if !have("nbdinfo") {
        return;
    }
    let mut server = server();
    let port = server.nbd_port;
    let data = pattern(8192, 3);

    let (mut a, size, flags) = Client::transmitting(port, "device/d1");
    assert_eq!(size, DISK_SIZE);
    assert_eq!(
        flags & TFLAG_READ_ONLY,
        0,
        "device/d1 is Private: it must be writable"
    );
    assert_eq!(a.write_at(1, MIB, &data), 0, "WRITE on device/d1");

    // Errors that leave the connection usable.
    assert_eq!(
        a.command(0, CMD_READ, 2, DISK_SIZE - 512, 4096),
        EINVAL,
        "READ past the end"
    );
    assert_eq!(
        a.command(0, CMD_READ, 3, DISK_SIZE, 1),
        EINVAL,
        "READ at the end"
    );
    assert_eq!(
        a.command(0, CMD_READ, 4, u64::MAX - 511, 1024),
        EINVAL,
        "READ whose end overflows"
    );
    assert_eq!(a.command(0, 99, 5, 0, 4096), EINVAL, "unknown command 99");
    assert_eq!(
        a.command(0, CMD_READ, 6, 0, 64 << 20),
        EINVAL,
        "READ of 64 MiB"
    );
    assert_eq!(
        a.command(0x4000, CMD_READ, 7, 0, 4096),
        EINVAL,
        "READ with an unknown flag"
    );
    assert_eq!(
        a.command(0, CMD_FLUSH, 8, 0, 4096),
        EINVAL,
        "FLUSH with a length"
    );
    assert_eq!(
        a.write_at(9, DISK_SIZE - 4096, &data),
        EINVAL,
        "WRITE past the end"
    );
    assert_eq!(
        a.read_at(10, MIB, 8192),
        data,
        "the connection must still work"
    );
    assert_healthy(&mut server, "device/d1");

    // WRITE on the read-only vDisk export: EPERM, the payload consumed, the data unchanged.
    let (mut b, _, flags) = Client::transmitting(port, "v");
    assert_ne!(
        flags & TFLAG_READ_ONLY,
        0,
        "the vDisk export must be read-only"
    );
    assert_eq!(
        b.write_at(1, MIB, &pattern(4096, 99)),
        EPERM,
        "WRITE on the read-only export"
    );
    assert_eq!(
        b.command(0, CMD_TRIM, 2, MIB, 4096),
        EPERM,
        "TRIM on the read-only export"
    );
    assert_eq!(
        b.read_at(3, MIB, 8192),
        data,
        "the refused WRITE changed the data, or its payload was misread"
    );
    assert_healthy(&mut server, "v");

    // A request with a bad magic: closed.
    let (mut c, _, _) = Client::transmitting(port, "device/d1");
    let mut bad = request(0, CMD_READ, 1, 0, 4096);
    bad[0] ^= 0xff;
    c.send(&bad);
    c.assert_closed("request with a bad magic");
    assert_healthy(&mut server, "v");

    // A WRITE header claiming 100 MiB of payload: closed at once.
    let (mut d, _, _) = Client::transmitting(port, "device/d1");
    d.send(&request(0, CMD_WRITE, 1, 0, 100 << 20));
    d.send(&[0xaa; 4096]);
    let start = Instant::now();
    d.assert_closed("WRITE of 100 MiB");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "closed only after {:?}",
        start.elapsed()
    );
    assert_healthy(&mut server, "v");

    // Half a WRITE payload, then the client goes away: nothing of it is written.
    let (mut e, _, _) = Client::transmitting(port, "device/d1");
    e.send(&request(0, CMD_WRITE, 1, MIB, MIB as u32));
    e.send(&vec![0xee; 256 << 10]);
    e.s.shutdown(Shutdown::Both).unwrap();
    drop(e);
    std::thread::sleep(Duration::from_millis(300));
    assert_healthy(&mut server, "v");
    let (mut f, _, _) = Client::transmitting(port, "v");
    let got = f.read_at(1, MIB, MIB as u32);
    assert_eq!(
        got[..8192],
        data[..],
        "the half WRITE changed data before it"
    );
    assert!(
        got[8192..].iter().all(|&x| x == 0),
        "the half WRITE was partly applied"
    );

    // The first client never noticed.
    assert_eq!(a.read_at(11, MIB, 8192), data);
    assert_eq!(a.command(0, CMD_FLUSH, 12, 0, 0), 0, "FLUSH");
    assert_healthy(&mut server, "device/d1");
}

#[test]
fn structured_error_replies_for_bad_reads() {
    if !have("nbdinfo") {
        return;
    }
    let mut server = server();
    let mut c = Client::negotiating(server.nbd_port);
    c.send(&option(8, &[])); // NBD_OPT_STRUCTURED_REPLY
    let (kind, _) = c.opt_reply(8);
    assert_eq!(kind, REP_ACK, "structured replies");
    c.go("v");
    c.send(&request(0, CMD_READ, 77, DISK_SIZE - 512, 4096));
    let h = c.read(20);
    assert_eq!(be_u32(&h[0..4]), 0x668e_33ef, "structured reply magic");
    assert_eq!(
        be_u16(&h[4..6]) & 1,
        1,
        "the error chunk must be the last one"
    );
    assert_eq!(be_u16(&h[6..8]), 0x8001, "NBD_REPLY_TYPE_ERROR");
    assert_eq!(be_u64(&h[8..16]), 77, "cookie");
    let body = c.read(be_u32(&h[16..20]) as usize);
    assert_eq!(be_u32(&body[0..4]), EINVAL);
    assert_eq!(
        be_u16(&body[4..6]) as usize,
        body.len() - 6,
        "error message length"
    );
    assert_healthy(&mut server, "v");
}

// 8: a corrupt layer file.

/// Runs the CLI against `server`, failing the test if it takes more than 30 s.
fn cli_with_deadline(server: &TestServer, args: &[&str]) -> std::process::Output {
    let mut child = Command::new(common::BIN)
        .args(args)
        .env("VSTREAM_API", &server.api)
        .env("VSTREAM_TOKEN", server.token())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running vstream");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("vstream {args:?} hung for 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("collecting output")
}

#[test]
fn corrupt_layer_file_is_refused_clearly() {
    if !have("nbdinfo") {
        return;
    }
    let mut server = server();
    server.cli_ok(&["vdisk", "create", "c", "--size", "64MiB"]);
    assert!(server.stop().success(), "server did not stop cleanly");
    // vDisk c has one layer file, whatever its name.
    let layer = std::fs::read_dir(server.data.join("vdisks/c"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "layer"))
        .expect("vDisk c's layer file");
    let layer_name = layer.file_name().unwrap().to_string_lossy().into_owned();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&layer)
            .expect("opening the layer");
        f.write_all_at(&[0xa5; 10], 20)
            .expect("corrupting the layer");
        f.sync_all().unwrap();
    }
    server.restart();

    let out = Command::new("nbdinfo")
        .arg(server.url("c"))
        .output()
        .expect("running nbdinfo");
    assert!(
        !out.status.success(),
        "nbdinfo of the corrupt vDisk succeeded"
    );
    let log = server.log_text();
    let named = log.lines().any(|l| {
        l.contains(&format!("vdisks/c/{layer_name}"))
            && (l.contains("corrupt") || l.contains("checksum"))
    });
    assert!(named, "the log does not name the corrupt file:\n{log}");

    // A raw client gets an error reply that says what is wrong.
    let mut c = Client::negotiating(server.nbd_port);
    c.send(&option(OPT_GO, &go_data("c")));
    let (kind, msg) = c.opt_reply(OPT_GO);
    let msg = String::from_utf8_lossy(&msg);
    assert_ne!(
        kind & 0x8000_0000,
        0,
        "GO on a corrupt vDisk: reply {kind:#x}"
    );
    assert!(
        msg.contains("corrupt") || msg.contains("checksum"),
        "unclear error message {msg:?}"
    );
    // ... and may go on to a healthy export.
    c.go("v");
    assert_eq!(c.read_at(1, 0, 512), vec![0u8; 512]);

    // The other vDisk, and the device on it, still work.
    assert_healthy(&mut server, "v");
    assert_healthy(&mut server, "device/d1");

    // `vdisk show` fails with a clear message instead of hanging or crashing.
    let out = cli_with_deadline(&server, &["vdisk", "show", "c"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "vdisk show of a corrupt vDisk succeeded"
    );
    assert!(
        stderr.contains(&layer_name) && (stderr.contains("corrupt") || stderr.contains("checksum")),
        "vdisk show c: unclear message {stderr:?}"
    );
    // `vdisk list` still lists every vDisk, the broken one marked with why.
    let out = cli_with_deadline(&server, &["vdisk", "list"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "vdisk list failed: {stderr}");
    assert!(
        stdout.lines().any(|l| l.starts_with("v ")),
        "healthy vDisk missing:\n{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("c ") && l.contains("UNREADABLE")),
        "{stdout}"
    );
    assert!(
        stderr.contains("vDisk c:") && stderr.contains("corrupt"),
        "{stderr}"
    );
    assert_healthy(&mut server, "v");
}

// 9: the handshake timeout.

#[test]
fn silent_and_slow_clients_are_closed_at_the_handshake_timeout() {
    if !have("nbdinfo") {
        return;
    }
    let mut server = server();
    let port = server.nbd_port;
    let within = |c: &mut Client, what: &str| {
        c.s.set_read_timeout(Some(Duration::from_secs(14))).unwrap();
        let start = Instant::now();
        c.assert_closed(what);
        start.elapsed()
    };
    // One client says nothing at all after the greeting.
    let silent = std::thread::spawn(move || {
        let mut c = Client::connect(port);
        within(&mut c, "silent client")
    });
    // Another trickles an option one byte a second and never finishes it.
    let slow = std::thread::spawn(move || {
        let mut c = Client::negotiating(port);
        let writer = c.s.try_clone().unwrap();
        let trickle = std::thread::spawn(move || {
            let mut w = writer;
            for b in option(OPT_LIST, &[]).iter().take(14) {
                std::thread::sleep(Duration::from_secs(1));
                if w.write_all(&[*b]).is_err() {
                    return;
                }
            }
        });
        let t = within(&mut c, "slow client");
        let _ = trickle.join();
        t
    });
    // Meanwhile other clients are served.
    std::thread::sleep(Duration::from_secs(2));
    assert_healthy(&mut server, "v");
    for (what, t) in [
        ("silent", silent.join().unwrap()),
        ("slow", slow.join().unwrap()),
    ] {
        assert!(
            t >= Duration::from_secs(8) && t <= Duration::from_secs(13),
            "the {what} client was closed after {t:?}, expected about 10 s"
        );
    }
    assert!(
        server.log_text().contains("handshake timed out"),
        "{}",
        server.log_text()
    );
    assert_healthy(&mut server, "v");
}

// 10: many idle connections.

#[test]
fn two_hundred_idle_connections_then_a_real_client() {
    if !have("nbdinfo") {
        return;
    }
    let mut server = server();
    let port = server.nbd_port;
    let threads: Vec<_> = (0..200)
        .map(|_| {
            std::thread::spawn(move || {
                let (c, size, _) = Client::transmitting(port, "v");
                assert_eq!(size, DISK_SIZE);
                c
            })
        })
        .collect();
    let mut clients: Vec<Client> = threads
        .into_iter()
        .map(|t| t.join().expect("handshake thread"))
        .collect();
    wait_metric(&server, "vstream_nbd_connections_open", 200);

    assert_healthy(&mut server, "v");
    assert_healthy(&mut server, "device/d1");
    // The idle ones still answer.
    assert_eq!(clients[0].read_at(1, 0, 4096), vec![0u8; 4096]);
    assert_eq!(
        clients[199].read_at(1, DISK_SIZE - 4096, 4096),
        vec![0u8; 4096]
    );
    wait_metric(&server, "vstream_nbd_connections_open", 200);

    // All of them end cleanly: DISC, then the server closes.
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(&request(0, CMD_DISC, 2, 0, 0));
        c.assert_closed(&format!("client {i} after NBD_CMD_DISC"));
    }
    wait_metric(&server, "vstream_nbd_connections_open", 0);
    let log = server.log_text();
    assert!(
        !log.contains("connection dropped"),
        "connections ended badly:\n{log}"
    );
    assert_healthy(&mut server, "v");
}

// 11: fields from outside in the log.

/// POSTs `body` (JSON) to `path` of `server`'s API over a plain socket;
/// returns the status code and the body.
fn post_json(server: &TestServer, path: &str, body: &str) -> (u16, String) {
    post_json_with(server, path, body, "")
}

/// [`post_json`] with more header lines (each ending in CRLF).
fn post_json_with(server: &TestServer, path: &str, body: &str, headers: &str) -> (u16, String) {
    let addr = server.api.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).expect("connecting to the API");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n{headers}\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("sending the request");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("reading the answer");
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}

/// Text that, written raw into the log, would start a line of its own that
/// looks like the server's.
const FORGED: &str = "2099-01-01T00:00:00.000000Z  INFO vstream_server: FORGED";

/// An export name and a login MAC carrying a newline, a carriage return and
/// terminal escapes: the text log shows them escaped within one line, the
/// JSON log as JSON strings that decode to them, and no line of either log
/// is the forged one.
#[test]
fn control_characters_from_clients_cannot_forge_log_lines() {
    for format in ["text", "json"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = TestServer::start_with(dir.path().to_path_buf(), &["--log-format", format]);
        let name = format!("nope\n{FORGED} nbd\r\x1b[2Jx");
        let mut c = Client::negotiating(server.nbd_port);
        c.expect_opt_error(OPT_GO, &go_data(&name), REP_ERR_UNKNOWN);
        let mac = format!("52:54:00:12:34:01\n{FORGED} login\t\x7f\u{9b}");
        let body = serde_json::json!({ "mac": mac }).to_string();
        let (status, answer) = post_json(&server, "/api/v1/login", &body);
        assert!(
            (400..500).contains(&status),
            "login with {mac:?}: HTTP {status} {answer}"
        );
        let log = server.log_text();
        for line in log.lines() {
            assert!(
                !line.starts_with("2099"),
                "{format} log: a client forged the line {line:?}:\n{log}"
            );
        }
        if format == "text" {
            for line in log.lines() {
                assert!(
                    !line.contains(|c: char| c.is_control()),
                    "text log: a raw control character in {line:?}"
                );
            }
            for what in ["nbd", "login"] {
                assert!(
                    log.contains(&format!("\\n{FORGED} {what}")),
                    "text log: the {what} field is not in it, escaped:\n{log}"
                );
            }
        } else {
            let lines: Vec<serde_json::Value> = log
                .lines()
                .map(|l| {
                    serde_json::from_str(l)
                        .unwrap_or_else(|e| panic!("json log: {l:?} is not JSON: {e}"))
                })
                .collect();
            for raw in [&name, &mac] {
                assert!(
                    lines.iter().any(|v| v["fields"]
                        .as_object()
                        .is_some_and(|f| f.values().any(|x| x.as_str() == Some(raw.as_str())))),
                    "json log: no field holds {raw:?} exactly:\n{log}"
                );
            }
        }
    }
}

// 12: names that cannot name anything.

/// Export names that no export can have are answered and logged as invalid
/// names (NBD_REP_ERR_UNKNOWN), never as a farm state that is unreachable.
#[test]
fn invalid_export_names_are_refused_as_invalid() {
    let mut server = server();
    let mut c = Client::negotiating(server.nbd_port);
    for (name, why) in [
        ("device/..", "neither a device name nor a MAC address"),
        ("device/", "neither a device name nor a MAC address"),
        ("device/a b", "neither a device name nor a MAC address"),
        ("device/d1\0", "neither a device name nor a MAC address"),
        ("device/ff:ff:ff:ff:ff:ff", "broadcast"),
        ("device/01-00-5e-00-00-01", "multicast"),
        ("base/garbage", "base/DEVICE@VERSION/HASH"),
        ("base/..@1/abc", "neither a device name nor a MAC address"),
        ("v@one", "VDISK@VERSION"),
        ("v\0", "not a valid name"),
    ] {
        let msg = c.expect_opt_error(OPT_GO, &go_data(name), REP_ERR_UNKNOWN);
        assert!(
            msg.starts_with(&format!("invalid export name {name:?}")) && msg.contains(why),
            "export {name:?}: the message {msg:?} does not say it is invalid because {why:?}"
        );
    }
    // A good name that names nothing is still just unknown.
    let msg = c.expect_opt_error(OPT_GO, &go_data("device/ghost"), REP_ERR_UNKNOWN);
    assert!(msg.contains("no export named"), "{msg}");
    // The handshake goes on.
    let (size, _) = c.go("v");
    assert_eq!(size, DISK_SIZE);
    let log = server.log_text();
    assert!(
        !log.contains("unreachable"),
        "a bad name was taken for an unreachable farm state:\n{log}"
    );
    assert_eq!(
        log.matches("reason=invalid export name").count(),
        10,
        "each bad name is logged as invalid:\n{log}"
    );
    if have("nbdinfo") {
        assert_healthy(&mut server, "device/d1");
    }
}

/// A MAC address no network card has (broadcast, multicast, all-zero), or
/// text that is none, is a bad request at login and at `device add`; so is a
/// device name that reads as a MAC address.
#[test]
fn macs_of_no_device_and_mac_shaped_names_are_refused() {
    let server = server();
    for (mac, why) in [
        ("ff:ff:ff:ff:ff:ff", "broadcast"),
        ("01:00:5e:00:00:01", "multicast"),
        ("00-00-00-00-00-00", "all-zero"),
        ("no mac", "not a MAC address"),
    ] {
        let body = serde_json::json!({ "mac": mac }).to_string();
        let (status, answer) = post_json(&server, "/api/v1/login", &body);
        assert_eq!(status, 400, "login with {mac:?}: {answer}");
        assert!(answer.contains(why), "login with {mac:?}: {answer}");
        let err = server.cli_err(&["device", "add", "x", "--mac", mac, "--vdisk", "v"]);
        assert!(err.contains(why), "device add --mac {mac:?}: {err}");
    }
    // The API refuses them too, not only the CLI.
    let auth = format!("Authorization: Bearer {}\r\n", server.token());
    for mac in ["ff:ff:ff:ff:ff:ff", "33:33:00:00:00:01", "000000000000"] {
        let body = serde_json::json!({ "name": "x", "mac": mac, "vdisk": "v" }).to_string();
        let (status, answer) = post_json_with(&server, "/api/v1/devices", &body, &auth);
        assert_eq!(status, 400, "POST /api/v1/devices with {mac}: {answer}");
    }
    let body = r#"{"name":"52-54-00-12-34-08","mac":"52:54:00:12:34:09","vdisk":"v"}"#;
    let (status, answer) = post_json_with(&server, "/api/v1/devices", body, &auth);
    assert_eq!(
        status, 400,
        "POST /api/v1/devices with a MAC-shaped name: {answer}"
    );
    for name in ["52-54-00-12-34-01", "525400123401", "5254.0012.3402"] {
        let err = server.cli_err(&[
            "device",
            "add",
            name,
            "--mac",
            "52:54:00:12:34:09",
            "--vdisk",
            "v",
        ]);
        assert!(
            err.contains("reads as a MAC address"),
            "device add {name}: {err}"
        );
    }
    // A locally administered unicast MAC is a device's.
    server.cli_ok(&[
        "device",
        "add",
        "x",
        "--mac",
        "02:00:00:00:00:01",
        "--vdisk",
        "v",
    ]);
    let shown = server.cli_ok(&["device", "show", "52-54-00-12-34-01"]);
    assert!(shown.contains("d1"), "{shown}");
}
