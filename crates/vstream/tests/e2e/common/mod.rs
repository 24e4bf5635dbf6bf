//! Runs the real `vstream` binary as a server in a temporary folder, drives it
//! with the real CLI, and tells tests which external clients exist.
#![allow(dead_code)]

pub mod durable;
pub mod nbd;
pub mod pxe;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_vstream");
/// The agent alone (`vstream target` without the server).
pub const AGENT_BIN: &str = env!("CARGO_BIN_EXE_vstream-agent");

/// `have(tool)`: true if `tool` is on PATH, else a skip. `skip(why)`: a test
/// that cannot run here says why; under CI=true that fails it, and by hand it
/// is counted in `VSTREAM_SKIP_LOG` (see `vstream_testkit`).
pub use vstream_testkit::{have, skip};

/// The Python with the libnbd bindings (Debian's python3-libnbd).
pub const PYTHON: &str = "/usr/bin/python3";

/// True if [`PYTHON`] can import nbd; otherwise prints why the test is
/// skipped (in CI, fails).
pub fn have_python_nbd() -> bool {
    let ok = Command::new(PYTHON)
        .args(["-c", "import nbd"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        skip(&format!(
            "{PYTHON} cannot import nbd (install python3-libnbd)"
        ));
    }
    ok
}

pub use vstream_testkit::free_ports;

/// True in a debug build, whose `vstream` reads the test hooks
/// `VSTREAM_CRASH_AT` and `VSTREAM_CLOCK_FILE`; a release build has them
/// compiled out, and a test that needs them skips (in CI, fails).
pub fn have_test_hooks() -> bool {
    if !cfg!(debug_assertions) {
        skip("a release build has no test hooks (VSTREAM_CRASH_AT, VSTREAM_CLOCK_FILE)");
    }
    cfg!(debug_assertions)
}

pub struct TestServer {
    pub child: Option<Child>,
    pub data: PathBuf,
    pub api: String,
    pub nbd_port: u16,
    pub sock: PathBuf,
    _dir: Option<tempfile::TempDir>,
    pub log: PathBuf,
    /// More `vstream server` flags (farm membership), kept for restarts.
    pub extra: Vec<String>,
    /// The address it listens on (127.0.0.1 unless in a network namespace).
    pub host: String,
    /// A command the server runs under (`ip netns exec NS`).
    pub wrap: Vec<String>,
    /// Environment variables it runs with (kept for restarts).
    pub env: Vec<(String, String)>,
}

impl TestServer {
    /// Starts a server named `name` on `data`, a member of the farm in etcd at `etcd`.
    pub fn start_in_farm(data: PathBuf, etcd: &str, name: &str) -> TestServer {
        let endpoint = etcd.trim_start_matches("http://");
        TestServer::start_with(
            data,
            &["--farm", &format!("etcd://{endpoint}"), "--name", name],
        )
    }

    /// Like [`TestServer::start_in_farm`], with more flags and environment variables.
    pub fn start_in_farm_with(
        data: PathBuf,
        etcd: &str,
        name: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> TestServer {
        let farm = format!("etcd://{}", etcd.trim_start_matches("http://"));
        let mut flags = vec!["--farm", &farm, "--name", name];
        flags.extend_from_slice(extra);
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        TestServer::start_full(data, "127.0.0.1", &[], &flags, env)
    }

    /// Starts a server on a new data folder.
    pub fn start() -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = TestServer::start_in(dir.path().to_path_buf());
        s._dir = Some(dir);
        s
    }

    /// Starts a server on a new data folder, with more flags.
    pub fn start_fresh_with(extra: &[&str]) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = TestServer::start_with(dir.path().to_path_buf(), extra);
        s._dir = Some(dir);
        s
    }

    /// Starts a server on `data` (an existing folder keeps its state).
    pub fn start_in(data: PathBuf) -> TestServer {
        TestServer::start_with(data, &[])
    }

    /// Starts a server on `data` with more flags.
    pub fn start_with(data: PathBuf, extra: &[&str]) -> TestServer {
        TestServer::start_wrapped(data, "127.0.0.1", &[], extra)
    }

    /// Starts a server listening on `host`, run under the command `wrap`.
    pub fn start_wrapped(data: PathBuf, host: &str, wrap: &[&str], extra: &[&str]) -> TestServer {
        TestServer::start_full(data, host, wrap, extra, Vec::new())
    }

    fn start_full(
        data: PathBuf,
        host: &str,
        wrap: &[&str],
        extra: &[&str],
        env: Vec<(String, String)>,
    ) -> TestServer {
        std::fs::create_dir_all(&data).expect("creating the data folder");
        // Another test may take a port between picking and binding: retry.
        for attempt in 0.. {
            let [nbd_port, api_port] = free_ports::<2>();
            let sock = data.join("nbd.sock");
            let log = data.join(format!("server-{nbd_port}.log"));
            let mut s = TestServer {
                child: None,
                api: format!("http://{host}:{api_port}"),
                nbd_port,
                sock,
                data: data.clone(),
                _dir: None,
                log,
                extra: extra.iter().map(|s| s.to_string()).collect(),
                host: host.to_string(),
                wrap: wrap.iter().map(|s| s.to_string()).collect(),
                env: env.clone(),
            };
            match s.try_spawn(api_port) {
                Ok(()) => return s,
                Err(log) if attempt < 5 && log.contains("Address already in use") => continue,
                Err(log) => panic!("server did not start:\n{log}"),
            }
        }
        unreachable!()
    }

    fn spawn(&mut self, api_port: u16) {
        if let Err(log) = self.try_spawn(api_port) {
            panic!("server did not start:\n{log}");
        }
    }

    /// Starts the server process; on failure returns its log.
    fn try_spawn(&mut self, api_port: u16) -> Result<(), String> {
        let log = std::fs::File::create(&self.log).expect("log file");
        let mut cmd = match self.wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let host = self.host.clone();
        let child = cmd
            .args(["server", "--data"])
            .arg(&self.data)
            .args(["--nbd", &format!("{host}:{}", self.nbd_port)])
            .arg("--nbd")
            .arg(format!("unix:{}", self.sock.display()))
            .args(["--api", &format!("{host}:{api_port}")])
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning vstream server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "server exited with {st} at start:\n{}",
                    self.log_text()
                ));
            }
            if std::net::TcpStream::connect((host.as_str(), self.nbd_port)).is_ok()
                && std::net::TcpStream::connect((host.as_str(), api_port)).is_ok()
                && self.log_text().contains("NBD listening")
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill9();
                return Err(format!(
                    "server did not start within 20 s:\n{}",
                    self.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Restarts on the same folder and ports (after kill9 or stop).
    pub fn restart(&mut self) {
        let port: u16 = self
            .api
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("api port");
        self.spawn(port);
    }

    /// A value from the server's Prometheus `/metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        let out = Command::new("curl")
            .args([
                "-sf",
                "-m",
                "10",
                "-H",
                &format!("Authorization: Bearer {}", self.token()),
            ])
            .arg(format!("{}/metrics", self.api))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} from {}/metrics:\n{text}", self.api))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.data.join("admin.token"))
            .expect("admin.token")
            .trim()
            .to_string()
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server child").id()
    }

    /// Runs the CLI against this server.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli_as(&self.api, &self.token(), args)
    }

    /// Runs the CLI and insists on success; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        ok_stdout("vstream", args, &self.cli(args))
    }

    /// Runs the CLI expecting failure; returns stderr.
    pub fn cli_err(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(!out.status.success(), "vstream {args:?} should have failed");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn url(&self, export: &str) -> String {
        format!("nbd://{}:{}/{}", self.host, self.nbd_port, export)
    }

    pub fn unix_url(&self, export: &str) -> String {
        format!("nbd+unix:///{}?socket={}", export, self.sock.display())
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("server running");
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = c.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!(
                    "server did not stop within 20 s of SIGTERM:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs a command and insists on success; returns stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    ok_stdout(cmd, args, &out)
}

/// The stdout of `cmd args`, which ended with `out`; fails the test, with
/// its stderr and stdout, unless it succeeded.
pub fn ok_stdout(cmd: &str, args: &[&str], out: &Output) -> String {
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fails the test, saying where, unless `got` and `want` are the same bytes.
pub fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return; // memcmp: the byte loop below is slow in a debug build
    }
    let i = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    panic!(
        "{what}: first difference at byte {i} (got {:?}, want {:?}; sizes {} and {})",
        got.get(i),
        want.get(i),
        got.len(),
        want.len()
    );
}

/// A field of /proc/PID/status in KiB (VmHWM, VmRSS).
pub fn proc_kib(pid: u32, field: &str) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Gives `server` vDisk `v` (64 MiB) and device `d1` (MAC `mac`) on it,
/// in Private mode (the default).
pub fn add_v_and_d1(server: &TestServer, mac: &str) {
    server.cli_ok(&["vdisk", "create", "v", "--size", "64MiB"]);
    server.cli_ok(&["device", "add", "d1", "--mac", mac, "--vdisk", "v"]);
}

/// Sets `server`'s vDisk `v` to Standard mode and adds device `d1` (MAC
/// `mac`) on it.
pub fn standard_v_and_d1(server: &TestServer, mac: &str) {
    server.cli_ok(&["vdisk", "set", "v", "--mode", "standard"]);
    server.cli_ok(&["device", "add", "d1", "--mac", mac, "--vdisk", "v"]);
}

/// Runs the CLI against the API at `api`, as `token`.
pub fn cli_as(api: &str, token: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("VSTREAM_API", api)
        .env("VSTREAM_TOKEN", token)
        .output()
        .expect("running vstream")
}

/// A file of `size` bytes: random data in scattered extents, zeros elsewhere.
/// An image of `size` random bytes, every block of it data.
pub fn dense_image(path: &Path, size: u64, seed: u64) {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; size as usize];
    rng.fill_bytes(&mut data);
    std::fs::write(path, data).expect("image");
}

pub fn random_image(path: &Path, size: u64, seed: u64) {
    use rand::{Rng, SeedableRng};
    use std::os::unix::fs::FileExt;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(size).expect("set_len");
    for _ in 0..64 {
        let len = rng.gen_range(1..256 * 1024u64);
        let off = rng.gen_range(0..size - len);
        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        f.write_all_at(&data, off).expect("write");
    }
    // Unaligned edges too.
    f.write_all_at(b"first bytes", 0).expect("write");
    f.write_all_at(b"last bytes!", size - 11).expect("write");
}

/// The repository's root folder.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Where the guest kit is built.
fn guest_kit_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-kit")
}

/// Builds (or reuses) the guest kit: kernel, initramfs, root file system image.
/// Call [`have_guest_tools`] first.
pub fn guest_kit() -> PathBuf {
    let out = guest_kit_dir();
    let build = repo().join("tests/guest/build.sh");
    run(
        "bash",
        &[build.to_str().expect("path"), out.to_str().expect("path")],
    );
    out
}

/// The guest kit with the network-boot initramfs (tests/guest/build-netboot.sh):
/// vstream in it, as the agent (/init) or as a server on the guest's own
/// disk (/power-init).
pub fn netboot_kit() -> PathBuf {
    let kit = guest_kit();
    let script = repo().join("tests/guest/build-netboot.sh");
    run(
        "bash",
        &[
            script.to_str().expect("path"),
            kit.to_str().expect("path"),
            BIN,
        ],
    );
    kit
}

/// The guest kit with the iSCSI initramfs (tests/guest/build-iscsi.sh):
/// Debian's open-iscsi initiator in a diskless guest.
pub fn iscsi_kit() -> PathBuf {
    let kit = guest_kit();
    let script = repo().join("tests/guest/build-iscsi.sh");
    run(
        "bash",
        &[script.to_str().expect("path"), kit.to_str().expect("path")],
    );
    kit
}

/// True if the tools that build and boot the test guest are here, and the
/// guest's kernel package: tests download nothing, `.ci/install-deps` (or
/// `tests/guest/fetch-kernel.sh`) fetched it before.
pub fn have_guest_tools() -> bool {
    if ![
        "qemu-system-x86_64",
        "mkfs.ext4",
        "busybox",
        "cpio",
        "dpkg-deb",
    ]
    .iter()
    .all(|t| have(t))
    {
        return false;
    }
    fetch_kernel_finds(&["--find", guest_kit_dir().to_str().expect("path")])
}

/// True if `tests/guest/fetch-kernel.sh ARGS` finds what it is asked for
/// (`--find [DIR]`: the kernel package, `--find-deb PKG`: a package) in its
/// cache; else says why the test skips.
pub fn fetch_kernel_finds(args: &[&str]) -> bool {
    let find = Command::new("bash")
        .arg(repo().join("tests/guest/fetch-kernel.sh"))
        .args(args)
        .output()
        .expect("running tests/guest/fetch-kernel.sh");
    if !find.status.success() {
        skip(String::from_utf8_lossy(&find.stderr).trim());
        return false;
    }
    true
}

/// Server `s{i}` of the farm in `etcd`, on the data folder `dir`/s{i}, with
/// more flags `extra`.
pub fn farm_member(dir: &Path, etcd: &TestEtcd, i: usize, extra: &[&str]) -> TestServer {
    let name = format!("s{i}");
    TestServer::start_in_farm_with(dir.join(&name), &etcd.url, &name, extra, &[])
}

/// A farm of `N` servers s1.. in `etcd` ([`farm_member`]), each with the
/// same flags `extra`; see [`wait_farm`] for when it is ready.
pub fn farm_of<const N: usize>(dir: &Path, etcd: &TestEtcd, extra: &[&str]) -> [TestServer; N] {
    std::array::from_fn(|i| farm_member(dir, etcd, i + 1, extra))
}

/// Waits until each of `servers` sees all of them up, each with a verified
/// replica ([`wait_farm_ready`]).
pub fn wait_farm(servers: &[TestServer]) {
    for s in servers {
        wait_farm_ready(s, servers.len());
    }
}

/// Waits until `server` sees `n` servers up, each with a verified replica.
pub fn wait_farm_ready(server: &TestServer, n: usize) {
    wait_for(30, "every server up with a verified replica", || {
        let out = server.cli(&["server", "list", "--json"]);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let ready = list.as_array()?.iter().filter(|v| {
            v["up"] == true
                && v["versions"]
                    .as_array()
                    .is_some_and(|vs| vs.iter().any(|x| x["verified"] == true))
        });
        (ready.count() == n).then_some(())
    });
}

/// Boots the guest on `url` with `vstest`; returns the console output.
pub fn guest_boot(kit: &Path, url: &str, vstest: &str) -> String {
    let out = Command::new("bash")
        .arg(repo().join("tests/guest/run-guest.sh"))
        .args([kit.to_str().expect("path"), url, vstest, "180"])
        .output()
        .expect("running run-guest.sh");
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "guest boot ({vstest}) on {url} failed ({}):\n{console}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    console
}

/// Boots the guest on `url` with `vstest` and more environment for
/// run-guest.sh (`VSTREAM_GUEST_TLS_CREDS`, ...); returns what it did,
/// success or not.
pub fn guest_boot_env(kit: &Path, url: &str, vstest: &str, env: &[(&str, &Path)]) -> Output {
    Command::new("bash")
        .arg(repo().join("tests/guest/run-guest.sh"))
        .args([kit.to_str().expect("path"), url, vstest, "180"])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("running run-guest.sh")
}

/// A farm's PKI made by vstream itself: `vstream ca init` in `dir/farm-ca`,
/// and for each `(name, sans)` a server folder `dir/NAME-tls` with its
/// certificate for those names and addresses and its enrollment CA
/// (`vstream ca server --enrollment`). The farm CA's folder.
pub fn farm_pki(dir: &Path, servers: &[(&str, &[&str])]) -> PathBuf {
    let ca = dir.join("farm-ca");
    run(BIN, &["ca", "init", "--out", ca.to_str().expect("path")]);
    for (name, sans) in servers {
        let out = dir.join(format!("{name}-tls"));
        let mut args = vec![
            "ca",
            "server",
            "--ca",
            ca.to_str().expect("path"),
            "--out",
            out.to_str().expect("path"),
            "--name",
            name,
            "--enrollment",
        ];
        for san in *sans {
            args.extend(["--san", san]);
        }
        run(BIN, &args);
    }
    ca
}

/// Writes to `out` the initrd `base` with a second, gzipped newc archive
/// appended (the kernel unpacks one after the other) that holds `files`:
/// (path in the initrd, file on the host). Keys (`*key.pem`) get mode 0600.
pub fn initrd_with(base: &Path, out: &Path, files: &[(&str, &Path)]) {
    use std::os::unix::fs::PermissionsExt;
    let stage = tempfile::tempdir().expect("tempdir");
    for (to, from) in files {
        let dest = stage.path().join(to.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
        std::fs::copy(from, &dest)
            .unwrap_or_else(|e| panic!("copying {} into the initrd: {e}", from.display()));
        let mode = if to.ends_with("key.pem") {
            0o600
        } else {
            0o644
        };
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let out_cpio = Command::new("sh")
        .arg("-c")
        .arg("find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc --owner=0:0 | gzip -n")
        .current_dir(stage.path())
        .output()
        .expect("cpio");
    assert!(
        out_cpio.status.success() && !out_cpio.stdout.is_empty(),
        "cpio: {}",
        String::from_utf8_lossy(&out_cpio.stderr)
    );
    let mut bytes = std::fs::read(base).expect("the base initrd");
    // Each archive starts on a 4-byte boundary; zeros between are skipped.
    bytes.resize(bytes.len().div_ceil(512) * 512, 0);
    bytes.extend_from_slice(&out_cpio.stdout);
    std::fs::write(out, bytes).expect("writing the initrd");
}

/// An etcd of its own for one test, on free ports, with its data in a
/// temporary folder; it can be stopped and started again on the same data.
/// It listens on loopback, and on the host's side of the test's network
/// namespaces when asked ([`TestEtcd::start_on`]), never on every address.
pub struct TestEtcd {
    child: Option<Child>,
    pub url: String,
    peer: String,
    dir: tempfile::TempDir,
    /// More addresses of this host clients reach it on (servers in network
    /// namespaces), besides 127.0.0.1.
    also: Vec<String>,
}

impl TestEtcd {
    /// `None` (and a SKIP line) when etcd is not installed.
    pub fn start() -> Option<TestEtcd> {
        TestEtcd::start_on(&[])
    }

    /// Like [`TestEtcd::start`]; clients also reach it on each of `also`,
    /// addresses this host has (such as [`NetNs::outside`]), at the same port.
    pub fn start_on(also: &[&str]) -> Option<TestEtcd> {
        if !have("etcd") {
            return None;
        }
        let [client, peer] = free_ports::<2>();
        let mut e = TestEtcd {
            child: None,
            url: format!("http://127.0.0.1:{client}"),
            peer: format!("http://127.0.0.1:{peer}"),
            dir: tempfile::tempdir().expect("tempdir"),
            also: also.iter().map(|a| a.to_string()).collect(),
        };
        e.resume();
        Some(e)
    }

    /// Starts the process (again) and waits until it answers.
    pub fn resume(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .expect("etcd log");
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &self.listen_url(),
                "--advertise-client-urls",
                &self.url,
            ])
            .args([
                "--listen-peer-urls",
                &self.peer,
                "--initial-advertise-peer-urls",
                &self.peer,
            ])
            .args(["--initial-cluster", &format!("t={}", self.peer)])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning etcd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        let health = format!("{}/health", self.url);
        while Instant::now() < deadline {
            let ok = Command::new("curl")
                .args(["-sf", "-m", "1", &health])
                .output()
                .is_ok_and(|o| {
                    o.status.success() && String::from_utf8_lossy(&o.stdout).contains("true")
                });
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("etcd did not become healthy within 20 s");
    }

    /// The URLs etcd listens on for clients: loopback and `also`.
    fn listen_url(&self) -> String {
        let port = self.port();
        std::iter::once(self.url.clone())
            .chain(self.also.iter().map(|a| format!("http://{a}:{port}")))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The port clients use.
    pub fn port(&self) -> u16 {
        self.url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("etcd port")
    }

    /// Stops it (SIGKILL: etcd away, as when its host dies).
    pub fn pause(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        self.pause();
    }
}

/// A `vstream target` agent serving its device on a unix socket.
pub struct TestAgent {
    child: Option<Child>,
    pub sock: PathBuf,
    pub log: PathBuf,
}

impl TestAgent {
    /// Starts an agent for `mac` with the bootstrap list `apis` (URLs), and
    /// waits for its socket.
    pub fn start(dir: &Path, name: &str, mac: &str, apis: &[&str], cache: &str) -> TestAgent {
        // A debug build on a busy 2-core machine can take a second to answer:
        // only a reset or a much longer silence should move a device here.
        TestAgent::start_with(dir, name, mac, apis, cache, &["--deadline-ms", "4000"])
    }

    /// [`TestAgent::start`] with more flags.
    pub fn start_with(
        dir: &Path,
        name: &str,
        mac: &str,
        apis: &[&str],
        cache: &str,
        extra: &[&str],
    ) -> TestAgent {
        let sock = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let bootstrap: Vec<&str> = apis
            .iter()
            .map(|a| a.trim_start_matches("http://"))
            .collect();
        // `--agent-binary` first in `extra`: run `vstream-agent` instead.
        let (mut cmd, extra) = match extra.split_first() {
            Some((&"--agent-binary", rest)) => (Command::new(AGENT_BIN), rest),
            _ => {
                let mut c = Command::new(BIN);
                c.arg("target");
                (c, extra)
            }
        };
        let child = cmd
            .args(["--bootstrap", &bootstrap.join(","), "--mac", mac])
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .args(["--cache", cache])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log"))
            .spawn()
            .expect("spawning vstream target");
        let mut a = TestAgent {
            child: Some(child),
            sock,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !a.log_text().contains("serving the device's disk") {
            if let Some(st) = a.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("agent exited with {st}:\n{}", a.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "agent did not serve within 30 s:\n{}",
                a.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        a
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The server the agent streams from now, from its log: the last
    /// failover's or login's.
    pub fn streaming_from(&self) -> String {
        let log = self.log_text();
        let last = log
            .lines()
            .rev()
            .find(|l| l.contains("failed over") || l.contains("logged in"))
            .unwrap_or_default()
            .to_string();
        let key = if last.contains("failed over") {
            " to="
        } else {
            " server="
        };
        last.split(key)
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_default()
            .to_string()
    }

    /// An agent started by the caller, serving on `sock` and logging to
    /// `log`: killed when dropped.
    pub fn adopt(child: Child, sock: PathBuf, log: PathBuf) -> TestAgent {
        TestAgent {
            child: Some(child),
            sock,
            log,
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `f` every 100 ms until it gives `Some`, for up to `secs` seconds.
pub fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "gave up after {secs} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A network namespace joined to this one by a veth pair: this side is
/// 10.X.N.1, the namespace 10.X.N.2. Removed on drop.
///
/// Packets between two namespaces go through this host, which forwards them
/// on the veths of test namespaces only (`net.ipv4.conf.<veth>.forwarding`),
/// so the host's own `ip_forward` is never touched; the setting goes with the
/// veth.
pub struct NetNs {
    pub name: String,
    pub inside: String,
    pub outside: String,
    veth: String,
}

/// True if network namespaces and nftables can be used here (root, ip, nft).
pub fn have_netns() -> bool {
    if !have("ip") || !have("nft") {
        return false;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip("network namespaces need root");
        return false;
    }
    true
}

/// Runs `cmd` with sh; fails the test with its stderr if it fails.
pub fn sh(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetNs {
    /// A new namespace, numbered by a counter of this test process: tests
    /// that run at once in one process (each file's tests, and the files'
    /// tests together) get namespaces and subnets of their own. Numbers stay
    /// in 1..=199; a LAN (`pxe::Lan`) takes 200 and up.
    pub fn create() -> NetNs {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 199 + 1;
        let tag = std::process::id() % 10_000;
        let name = format!("vs{tag}n{n}");
        let veth = format!("vs{tag}v{n}");
        // A second octet per process keeps parallel test binaries apart.
        let net = format!("10.{}.{n}", 100 + (std::process::id() % 150));
        let (outside, inside) = (format!("{net}.1"), format!("{net}.2"));
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip").args(["link", "del", &veth]).output();
        sh(&format!("ip netns add {name}"));
        sh(&format!("ip link add {veth} type veth peer name {veth}p"));
        sh(&format!("ip link set {veth}p netns {name}"));
        sh(&format!(
            "ip addr add {outside}/24 dev {veth} && ip link set {veth} up"
        ));
        // A default route through the host, which forwards what comes in on
        // this veth (and only there): servers in two namespaces reach each
        // other (replication between them).
        sh(&format!(
            "ip netns exec {name} sh -c 'ip addr add {inside}/24 dev {veth}p && ip link set {veth}p up && ip link set lo up && ip route add default via {outside}'"
        ));
        std::fs::write(format!("/proc/sys/net/ipv4/conf/{veth}/forwarding"), "1")
            .unwrap_or_else(|e| panic!("enabling forwarding on {veth}: {e}"));
        NetNs {
            name,
            inside,
            outside,
            veth,
        }
    }

    /// The command prefix that runs a program inside.
    pub fn wrap(&self) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.name.clone(),
        ]
    }

    /// Drops every packet in and out: the host goes silent.
    pub fn silence(&self) {
        sh(&format!(
            "ip netns exec {} nft -f - <<'EOF'\ntable inet vstest {{\n chain in {{ type filter hook input priority 0; policy drop; }}\n chain out {{ type filter hook output priority 0; policy drop; }}\n}}\nEOF",
            self.name
        ));
    }

    /// Lets traffic through again.
    pub fn restore(&self) {
        sh(&format!(
            "ip netns exec {} nft delete table inet vstest",
            self.name
        ));
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
    }
}
