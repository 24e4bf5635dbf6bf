//! Helpers shared by the tests of several crates.
//!
//! **Skipping.** A test that cannot run here (a tool missing, not root, no
//! etcd) calls [`skip`] and returns. By hand that prints `SKIP: ...` and,
//! when `VSTREAM_SKIP_LOG` names a file, appends one line to it; under
//! `CI=true` it fails the test instead. `.ci/run` sets both and fails on any
//! line in the log, so CI cannot pass by skipping.

pub mod libiscsi;
pub mod webdriver;

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// The environment variable naming the file every skip is appended to.
pub const SKIP_LOG: &str = "VSTREAM_SKIP_LOG";

/// True under `CI=true`, where every skip is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Says why the calling test does nothing here, and counts it as skipped.
///
/// Under `CI=true` it panics ("required in CI: ..."): the test fails. Otherwise
/// it prints `SKIP: <test binary> <test>: <why>` and appends that line (less
/// the `SKIP: `) to the file named by `VSTREAM_SKIP_LOG`, if set. The caller
/// returns early after it.
#[track_caller]
pub fn skip(why: &str) {
    let log = std::env::var_os(SKIP_LOG).map(PathBuf::from);
    skip_with(in_ci(), log.as_deref(), why);
}

/// [`skip`] with its settings given, not read from the environment.
#[track_caller]
fn skip_with(ci: bool, log: Option<&Path>, why: &str) {
    let line = format!("{}: {why}", test_name());
    if ci {
        panic!("required in CI: {line}");
    }
    eprintln!("SKIP: {line}");
    if let Some(log) = log {
        // One write of one line, appended: lines of parallel tests do not mix.
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
        if let Err(e) = written {
            panic!("{SKIP_LOG}={}: cannot record the skip: {e}", log.display());
        }
    }
}

/// `<test binary> <test>`: the binary's name without cargo's hash, and the
/// name libtest gives the test's thread.
fn test_name() -> String {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
        .map(|name| match name.rsplit_once('-') {
            Some((stem, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => stem.to_owned(),
            _ => name,
        })
        .unwrap_or_else(|| "?".to_owned());
    let thread = std::thread::current();
    format!("{binary} {}", thread.name().unwrap_or("(unnamed thread)"))
}

/// True if `tool` is an executable file on `PATH` (or at that path, if it
/// has a `/`); otherwise [`skip`]s, naming the tool.
#[track_caller]
pub fn have(tool: &str) -> bool {
    let found = find_program(tool).is_some();
    if !found {
        skip(&format!(
            "{tool} is not installed (.ci/install-deps installs it)"
        ));
    }
    found
}

/// Where `tool` is: `PATH` searched as a shell would.
pub fn find_program(tool: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if tool.contains('/') {
        let p = PathBuf::from(tool);
        return runnable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| runnable(p))
}

/// The lowest port of the kernel's ephemeral range (32768 if unknown).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// `N` distinct ports free on 127.0.0.1 now, for a process the test starts.
///
/// They come from just below the kernel's ephemeral range, never from it: a
/// process restarted on its old port must find it free, and in the ephemeral
/// range any outgoing connection may take it as its source port meanwhile.
/// A counter shared by the tests of one binary, from a start that differs
/// between processes, hands each port out once.
pub fn free_ports<const N: usize>() -> [u16; N] {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = ephemeral_low();
    let span = 10_000.min(low.saturating_sub(1024)).max(1);
    let base = low - span;
    let _ = NEXT.compare_exchange(0, std::process::id(), Ordering::SeqCst, Ordering::SeqCst);
    // The listeners are held until all N are picked, so none repeats.
    let mut listeners = Vec::with_capacity(N);
    for _ in 0..span {
        if listeners.len() == N {
            break;
        }
        let port = base + NEXT.fetch_add(1, Ordering::SeqCst) % span;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port as u16)) {
            listeners.push(l);
        }
    }
    assert_eq!(listeners.len(), N, "no {N} free ports in {base}..{low}");
    std::array::from_fn(|i| listeners[i].local_addr().expect("local addr").port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn lines(path: &Path) -> Vec<String> {
        match std::fs::read_to_string(path) {
            Ok(s) => s.lines().map(str::to_owned).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => panic!("reading {}: {e}", path.display()),
        }
    }

    #[test]
    fn a_skip_in_ci_fails_the_test_and_logs_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("skips");
        let err = std::panic::catch_unwind(|| skip_with(true, Some(&log), "no frobnicator"))
            .expect_err("skip must panic under CI=true");
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.starts_with("required in CI: "), "{msg}");
        assert!(msg.contains("no frobnicator"), "{msg}");
        assert!(lines(&log).is_empty(), "{:?}", lines(&log));
    }

    #[test]
    fn a_skip_by_hand_appends_one_line_naming_the_test() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("skips");
        skip_with(false, Some(&log), "no frobnicator");
        skip_with(false, Some(&log), "no widget");
        skip_with(false, None, "not logged");
        let got = lines(&log);
        assert_eq!(got.len(), 2, "{got:?}");
        let test = "tests::a_skip_by_hand_appends_one_line_naming_the_test";
        assert!(got[0].starts_with("vstream_testkit "), "{got:?}");
        assert!(got[0].contains(test), "{got:?}");
        assert!(got[0].ends_with(": no frobnicator"), "{got:?}");
        assert!(got[1].ends_with(": no widget"), "{got:?}");
    }

    #[test]
    fn have_finds_programs_on_path_only() {
        assert!(find_program("sh").is_some());
        assert!(find_program("/bin/sh").is_some());
        assert!(find_program("vstream-no-such-tool").is_none());
        // A file that is there but not executable is not a program.
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "").expect("write");
        assert!(find_program(plain.to_str().expect("utf-8")).is_none());
    }

    /// The test binary run again on this one test, as the probe, with `env`.
    fn probe(ci: bool, log: &Path) -> std::process::Output {
        let test = "tests::skip_and_have_read_ci_and_the_log_from_the_environment";
        let mut cmd = Command::new(std::env::current_exe().expect("current exe"));
        cmd.args(["--exact", test, "--test-threads=1"])
            .env("VSTREAM_TESTKIT_PROBE", "1")
            .env(SKIP_LOG, log);
        if ci {
            cmd.env("CI", "true");
        } else {
            cmd.env_remove("CI");
        }
        cmd.output().expect("running the test binary")
    }

    /// A child's output, indented: its own `test result:` lines must not
    /// read as this binary's to whatever parses the test log.
    fn indented(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).replace('\n', "\n    ")
    }

    /// `skip` and `have` as a test sees them: CI and the log from the
    /// environment, the test failing or passing as a whole.
    #[test]
    fn skip_and_have_read_ci_and_the_log_from_the_environment() {
        if std::env::var_os("VSTREAM_TESTKIT_PROBE").is_some() {
            // The probe: one tool there, one not.
            assert!(have("sh"));
            assert!(!have("vstream-no-such-tool"));
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("skips");

        let out = probe(true, &log);
        let stdout = indented(&out.stdout);
        assert!(
            !out.status.success(),
            "the probe passed under CI=true:\n    {stdout}"
        );
        assert!(
            stdout.contains("required in CI: ")
                && stdout.contains("vstream-no-such-tool is not installed"),
            "{stdout}"
        );
        assert!(lines(&log).is_empty(), "{:?}", lines(&log));

        let out = probe(false, &log);
        let stdout = indented(&out.stdout);
        let stderr = indented(&out.stderr);
        assert!(out.status.success(), "\n    {stdout}\n    {stderr}");
        let got = lines(&log);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].contains("skip_and_have_read_ci_and_the_log_from_the_environment: ")
                && got[0].ends_with(
                    "vstream-no-such-tool is not installed (.ci/install-deps installs it)"
                ),
            "{got:?}"
        );
    }

    #[test]
    fn ports_are_distinct_free_and_below_the_ephemeral_range() {
        let low = ephemeral_low();
        let a = free_ports::<3>();
        let b = free_ports::<3>();
        let all: std::collections::HashSet<u16> = a.iter().chain(&b).copied().collect();
        assert_eq!(all.len(), 6, "{a:?} {b:?}");
        for p in all {
            assert!(u32::from(p) < low, "{p} is in the ephemeral range");
            TcpListener::bind(("127.0.0.1", p)).expect("the port is free");
        }
    }
}
