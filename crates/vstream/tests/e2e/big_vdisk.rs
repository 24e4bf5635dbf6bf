//! A server holding an empty 8 TiB vDisk costs what its data costs: it
//! creates and verifies it in little memory, sits idle at a few percent of a
//! core at most, and refuses a size it cannot hold with a clear error.

use crate::common;

use std::time::{Duration, Instant};

use common::{skip, wait_for, TestServer};

/// CPU time (user + system, every thread) of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("reading /proc stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 here.
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).unwrap_or(100)
}

#[test]
fn an_empty_8_tib_vdisk_costs_little_cpu_and_memory() {
    let mut server = TestServer::start();
    let out = server.cli(&["vdisk", "create", "big", "--size", "8TiB"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("more than the file system") {
        skip(&format!(
            "the temporary folder's file system cannot hold an 8 TiB layer: {stderr}"
        ));
        return;
    }
    assert!(out.status.success(), "create failed: {stderr}");
    // Creating keeps the version's hash tree (64 MiB at 8 TiB) in memory
    // once; nothing holds a hash per block (4 GiB), nor reads the bitmap
    // (256 MiB).
    let hwm = common::proc_kib(server.pid(), "VmHWM");
    assert!(
        hwm < 256 * 1024,
        "peak RSS {} MiB after creating an empty 8 TiB vDisk",
        hwm / 1024
    );

    // A server reads again what it holds once after start, in the background
    // (a vDisk it has just made counts as verified: hashed as it was made;
    // after a restart it is offered from its verification record, then
    // re-checked). In Standard mode: a Private-mode version a device may
    // write is no replica, and not checked as one.
    server.cli_ok(&["vdisk", "set", "big", "--mode", "standard"]);
    assert_eq!(server.stop().code(), Some(0));
    server.restart();
    let pid = server.pid();
    wait_for(60, "the server to re-check big", || {
        server
            .log_text()
            .lines()
            .any(|l| l.contains("replica re-checked") && l.contains("vdisk=big version=1"))
            .then_some(())
    });
    let hwm = common::proc_kib(pid, "VmHWM");
    assert!(
        hwm < 256 * 1024,
        "peak RSS {} MiB after verifying an empty 8 TiB vDisk",
        hwm / 1024
    );

    // Idle: the status published every second costs nothing per byte of size.
    let hz = ticks_per_second();
    let before = cpu_ticks(pid);
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let used = cpu_ticks(pid) - before;
    let pct = used as f64 * 100.0 / hz as f64 / start.elapsed().as_secs_f64();
    assert!(
        pct < 10.0,
        "an idle server with an empty 8 TiB vDisk used {pct:.1}% of a core"
    );

    // Too large for any store: a clear error, and nothing made.
    let err = server.cli_err(&["vdisk", "create", "huge", "--size", "65TiB"]);
    assert!(err.contains("at most 64 TiB"), "{err}");
    let list = server.cli_ok(&["vdisk", "list"]);
    assert!(!list.contains("huge"), "{list}");
    let log = server.log_text();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
}
