//! No client can lock the others out (issue 16, point 5): one peer holding
//! thousands of idle NBD connections, or a slowloris on the API, leaves other
//! devices, tools and the API served, also under systemd's open-file limit of
//! 1,024; and a tool's connection that does nothing is closed, a device's not.
//!
//! The hog is `common/hog.py`, a raw-socket client, from 127.0.0.2; the
//! clients that must still be served come from 127.0.0.1.

use crate::common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{have, TestServer, PYTHON};

/// One test at a time: each holds thousands of sockets on a shared machine.
static ONE: Mutex<()> = Mutex::new(());

const HOG_ADDR: &str = "127.0.0.2";

fn hog_script() -> String {
    format!("{}/tests/e2e/common/hog.py", env!("CARGO_MANIFEST_DIR"))
}

/// A running `hog.py`: one line out per line in.
struct Hog {
    child: Child,
    stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
}

impl Hog {
    fn start(args: &[&str]) -> Hog {
        let mut child = Command::new(PYTHON)
            .arg(hog_script())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("running hog.py");
        let stdin = child.stdin.take();
        let out = BufReader::new(child.stdout.take().expect("hog stdout"));
        Hog { child, stdin, out }
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.out.read_line(&mut l).expect("reading hog.py");
        assert!(!l.is_empty(), "hog.py ended early");
        l.trim().to_string()
    }

    fn ask(&mut self) -> String {
        let w = self.stdin.as_mut().expect("hog stdin");
        w.write_all(b"?\n")
            .and_then(|_| w.flush())
            .expect("asking hog.py");
        self.line()
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        self.stdin.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `key=N` from a hog line.
fn field(line: &str, key: &str) -> usize {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

fn tools() -> bool {
    have("nbdinfo") && have("curl") && have("python3")
}

/// A server with vDisk `v` and device `d1` on it, run under `ulimit`
/// (`-Sn 1024`: systemd's soft limit; `-n 1024`: soft and hard) if given.
fn server(ulimit: Option<&str>, extra: &[&str]) -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().expect("tempdir");
    let script;
    let wrap: Vec<&str> = match ulimit {
        Some(u) => {
            script = format!("ulimit {u} 1024 && exec \"$0\" \"$@\"");
            vec!["sh", "-c", &script]
        }
        None => vec![],
    };
    let s = TestServer::start_wrapped(dir.path().to_path_buf(), "127.0.0.1", &wrap, extra);
    common::add_v_and_d1(&s, "52:54:00:12:34:01");
    (dir, s)
}

/// The server is alive, and from 127.0.0.1 a tool reads vDisk `v`, device
/// `d1` opens its export, and the API answers.
fn assert_served(server: &mut TestServer, what: &str) {
    if let Some(st) = server
        .child
        .as_mut()
        .and_then(|c| c.try_wait().ok().flatten())
    {
        panic!(
            "{what}: the server exited with {st}:\n{}",
            server.log_text()
        );
    }
    for export in ["v", "device/d1"] {
        let started = Instant::now();
        let out = Command::new("timeout")
            .args(["20", "nbdinfo", "--size"])
            .arg(server.url(export))
            .output()
            .expect("running nbdinfo");
        assert!(
            out.status.success(),
            "{what}: nbdinfo {export} from 127.0.0.1 was not served after {:?}: {}\n{}",
            started.elapsed(),
            String::from_utf8_lossy(&out.stderr),
            tail(&server.log_text())
        );
    }
    let out = Command::new("curl")
        .args(["-sf", "-m", "10", "-H"])
        .arg(format!("Authorization: Bearer {}", server.token()))
        .arg(format!("{}/api/v1/vdisks", server.api))
        .output()
        .expect("curl");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"v\""),
        "{what}: the API did not answer within 10 s (curl {}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        tail(&server.log_text())
    );
}

/// The last lines of a log, enough to see why.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// One peer opens 4,200 NBD connections through NBD_OPT_GO and leaves them
/// idle: it gets its share, and everyone else is still served.
fn nbd_hog(ulimit: Option<&str>) {
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let (_dir, mut server) = server(ulimit, &[]);
    let started = Instant::now();
    let mut hog = Hog::start(&[
        "nbd",
        "127.0.0.1",
        &server.nbd_port.to_string(),
        "v",
        "4200",
        HOG_ADDR,
    ]);
    let done = hog.line();
    eprintln!("hog: {done} in {:?}", started.elapsed());
    assert_served(
        &mut server,
        &format!("while one peer holds connections ({done})"),
    );
    let held = field(&done, "ok");
    assert!(
        held <= 256,
        "one peer holds {held} connections, more than the per-peer cap of 256"
    );
    assert!(held > 0, "the hog got no connection at all: {done}");
    let log = server.log_text();
    assert!(
        log.contains("per-peer connection limit reached"),
        "{}",
        tail(&log)
    );
    assert!(!log.contains("Too many open files"), "{}", tail(&log));
    // The refusals are a few lines, not thousands.
    let refusal_lines = log
        .lines()
        .filter(|l| l.contains("connection refused"))
        .count();
    assert!(refusal_lines <= 3, "{refusal_lines} lines of refusals");
    // The hog's connections are still open (a tool's idle limit is 10 min).
    let now = hog.ask();
    assert_eq!(field(&now, "open"), held, "{now}");
}

#[test]
fn one_peer_holding_thousands_of_nbd_connections_leaves_room_for_others() {
    if tools() {
        nbd_hog(None);
    }
}

/// systemd's default: soft limit 1,024, hard limit higher; the server raises
/// its soft limit to the hard one.
#[test]
fn nbd_hog_under_a_soft_open_file_limit_of_1024() {
    if tools() {
        nbd_hog(Some("-Sn"));
    }
}

/// Soft and hard limits of 1,024: the server sizes its connections to fit.
#[test]
fn nbd_hog_under_an_open_file_limit_of_1024() {
    if !tools() {
        return;
    }
    nbd_hog(Some("-n"));
}

/// 1,500 connections each sending one header line every 2 s: they are cut
/// at the header deadline and capped per address; the API and NBD are served.
#[test]
fn api_slowloris_under_an_open_file_limit_of_1024() {
    if !tools() {
        return;
    }
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let (_dir, mut server) = server(Some("-n"), &[]);
    let port = server.api.rsplit(':').next().expect("api port").to_string();
    let mut hog = Hog::start(&["api", "127.0.0.1", &port, "1500", HOG_ADDR, "2"]);
    let opened = hog.line();
    eprintln!("slowloris: {opened}");
    std::thread::sleep(Duration::from_secs(3));
    assert_served(&mut server, "during a slowloris on the API");
    // Past the 10 s header deadline, with the hog reopening what is closed.
    std::thread::sleep(Duration::from_secs(10));
    assert_served(&mut server, "12 s into a slowloris on the API");
    let now = hog.ask();
    assert!(
        field(&now, "closed_by_server") > 0,
        "the server closed none of the slow connections: {now}"
    );
    let log = server.log_text();
    assert!(!log.contains("Too many open files"), "{}", tail(&log));
}

/// With `--idle-timeout 2`, a connection to vDisk `v` that sends nothing is
/// closed; device d1's own connection, idle as long, is kept.
#[test]
fn an_idle_tool_connection_is_closed_and_an_idle_device_is_not() {
    if !tools() {
        return;
    }
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let (_dir, mut server) = server(None, &["--idle-timeout", "2"]);
    let port = server.nbd_port.to_string();
    let mut tool = Hog::start(&["nbd", "127.0.0.1", &port, "v", "1", HOG_ADDR]);
    let mut device = Hog::start(&["nbd", "127.0.0.1", &port, "device/d1", "1", HOG_ADDR]);
    assert_eq!(field(&tool.line(), "ok"), 1);
    assert_eq!(field(&device.line(), "ok"), 1);
    std::thread::sleep(Duration::from_secs(5));
    let t = tool.ask();
    let d = device.ask();
    assert_eq!(
        field(&t, "closed"),
        1,
        "the idle tool connection was kept: {t}"
    );
    assert_eq!(
        field(&d, "open"),
        1,
        "the idle device connection was cut: {d}"
    );
    let log = server.log_text();
    assert!(log.contains("closed: no request for 2 s"), "{}", tail(&log));
    assert_served(&mut server, "after the idle limit");
}

/// A refused login (503: device d2 boots a maintenance version, and vDisk v
/// has none) is one server log line, and an agent asking again backs off instead of asking every
/// 500 ms, with one log line of its own.
#[test]
fn a_refused_login_is_logged_once_and_the_agent_backs_off() {
    if !tools() {
        return;
    }
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let (dir, server) = server(None, &[]);
    server.cli_ok(&[
        "device",
        "add",
        "d2",
        "--mac",
        "52:54:00:12:34:02",
        "--vdisk",
        "v",
        "--type",
        "maintenance",
    ]);
    let login = |mac: &str| {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "10"])
            .args(["-X", "POST", "-H", "Content-Type: application/json"])
            .args(["-d", &format!("{{\"mac\":\"{mac}\"}}")])
            .arg(format!("{}/api/v1/login", server.api))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let count = |what: &str| {
        let log = server.log_text();
        log.lines().filter(|l| l.contains(what)).count()
    };
    // The server offers the version once it has checked it.
    common::wait_for(30, "d1 to log in", || {
        (login("52:54:00:12:34:01") == "200").then_some(())
    });
    let (refused, failed) = (count("login refused"), count("API request failed"));
    assert_eq!(
        login("52:54:00:12:34:02"),
        "503",
        "{}",
        tail(&server.log_text())
    );
    assert_eq!(
        count("login refused"),
        refused + 1,
        "{}",
        tail(&server.log_text())
    );
    assert_eq!(
        count("API request failed"),
        failed,
        "a refused login was logged twice:\n{}",
        tail(&server.log_text())
    );
    let refused = refused + 1;
    // An agent for d2 is refused as long as it asks.
    let agent_log = dir.path().join("d2.log");
    let bootstrap = server.api.trim_start_matches("http://").to_string();
    let mut agent = Command::new(common::BIN)
        .args([
            "target",
            "--bootstrap",
            &bootstrap,
            "--mac",
            "52:54:00:12:34:02",
        ])
        .arg("--listen")
        .arg(format!("unix:{}", dir.path().join("d2.sock").display()))
        .args(["--cache", "ram:64MiB"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&agent_log).expect("agent log"))
        .spawn()
        .expect("spawning vstream target");
    std::thread::sleep(Duration::from_secs(8));
    let _ = agent.kill();
    let _ = agent.wait();
    let log = server.log_text();
    let asked = count("login refused") - refused;
    // 200 ms doubling: asked at 0, 0.2, 0.6, 1.4, 3.0, 6.2 s; every 500 ms it was 16.
    assert!(
        (2..=8).contains(&asked),
        "the agent asked {asked} times in 8 s:\n{}",
        tail(&log)
    );
    let agent_text = std::fs::read_to_string(&agent_log).unwrap_or_default();
    let waits = agent_text
        .lines()
        .filter(|l| l.contains("waiting for a server to take the device"))
        .count();
    assert_eq!(waits, 1, "{agent_text}");
}
