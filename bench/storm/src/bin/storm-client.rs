//! A storm of simulated devices: each replays a boot trace over its own NBD connection
//! to its own export, one request at a time (as a booting machine's early boot mostly
//! does), with the trace's gaps scaled by `--gap-scale` (0: back to back).
//!
//! ```text
//! storm-client --connect ADDR[,ADDR...] --export 'device/storm{i}'
//!              --devices N --trace FILE [--ramp SECS] [--gap-scale X]
//!              [--verify IMAGE [--skip-written]] [--first I] [--progress SECS]
//! ```
//!
//! ADDR is HOST:PORT (TCP) or unix:PATH (a unix socket, such as a `vstream target`
//! agent's `--listen unix:PATH`), `{i}` in either replaced by the device's number.
//! Device i (from `--first`, default 0) starts at ramp * i / N seconds, connects to the
//! address i mod (number of addresses), and opens the export with `{i}` replaced by i.
//! With `--verify`, every byte read is checked against IMAGE, or against what that
//! device wrote there itself earlier in the trace (each device writes its own pattern);
//! with `--skip-written`, for a server that forgets writes (the floor) or keeps one
//! overlay for every device (nbdkit's cow filter), the bytes the trace writes anywhere
//! are not checked, so every server's storm costs the client about the same checking.
//! A progress line goes to stderr each second (each SECS with `--progress`); the result is one JSON object on
//! stdout: per-device boot-read times (first request to last reply) as p50/p99/max,
//! the time until the last device finished, bytes and MB/s, the longest any one request
//! waited for its reply (`max_stall_s`, with the device and step that waited), and the
//! errors (up to 10).
//! Exits 1 if any device failed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vstream_storm::nbd::{self, Request};
use vstream_storm::trace::{Op, Trace};

struct Args {
    connect: Vec<String>,
    export: String,
    devices: usize,
    first: usize,
    trace: Trace,
    ramp: f64,
    gap_scale: f64,
    progress: f64,
    image: Option<Vec<u8>>,
    skip_written: bool,
}

fn usage(why: &str) -> ! {
    eprintln!("storm-client: {why}");
    eprintln!(
        "usage: storm-client --connect HOST:PORT|unix:PATH[,...] --export PATTERN --devices N \
         --trace FILE [--ramp SECS] [--gap-scale X] [--verify IMAGE [--skip-written]] \
         [--first I] \
         [--progress SECS]"
    );
    std::process::exit(2);
}

fn parse_args() -> Args {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |name: &str| -> Option<String> {
        let i = args.iter().position(|a| a == name)?;
        Some(
            args.get(i + 1)
                .cloned()
                .unwrap_or_else(|| usage(&format!("{name} needs a value"))),
        )
    };
    let num = |v: Option<String>, name: &str, default: f64| -> f64 {
        v.map_or(default, |s| {
            s.parse()
                .unwrap_or_else(|_| usage(&format!("{name} {s:?}")))
        })
    };
    let connect = get("--connect").unwrap_or_else(|| usage("--connect is required"));
    let export = get("--export").unwrap_or_else(|| usage("--export is required"));
    let trace_path = get("--trace").unwrap_or_else(|| usage("--trace is required"));
    let devices = num(get("--devices"), "--devices", 1.0) as usize;
    let first = num(get("--first"), "--first", 0.0) as usize;
    let ramp = num(get("--ramp"), "--ramp", 0.0);
    let gap_scale = num(get("--gap-scale"), "--gap-scale", 0.0);
    let progress = num(get("--progress"), "--progress", 1.0);
    if !(0.01..=3600.0).contains(&progress) {
        usage(&format!("--progress {progress}: 0.01 to 3600 seconds"));
    }
    let text = std::fs::read_to_string(&trace_path)
        .unwrap_or_else(|e| usage(&format!("{trace_path}: {e}")));
    let trace = Trace::parse(&text).unwrap_or_else(|e| usage(&format!("{trace_path}: {e}")));
    let image = get("--verify").map(|p| {
        let d = std::fs::read(&p).unwrap_or_else(|e| usage(&format!("{p}: {e}")));
        if (d.len() as u64) < trace.size {
            usage(&format!("{p} is smaller than the trace's disk"));
        }
        d
    });
    let skip_written = args.iter().any(|a| a == "--skip-written");
    if skip_written && image.is_none() {
        usage("--skip-written needs --verify");
    }
    Args {
        connect: connect.split(',').map(str::to_owned).collect(),
        export,
        devices,
        first,
        trace,
        ramp,
        gap_scale,
        progress,
        image,
        skip_written,
    }
}

/// What one device saw.
struct Outcome {
    dev: usize,
    boot_s: f64,
    finished_at_s: f64,
    read_bytes: u64,
    /// The longest one request waited (request sent to reply read), and its step.
    stall: (f64, usize),
    error: Option<String>,
}

/// A device's connection: TCP, or a unix socket (an agent's).
enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    /// Connects to `addr` (HOST:PORT or unix:PATH), `{i}` replaced by `dev`.
    fn open(addr: &str, dev: usize) -> Result<Conn, String> {
        let addr = addr.replace("{i}", &dev.to_string());
        // A device that hears nothing for a minute is a failed boot, not a hang
        // of the whole benchmark.
        let timeout = Some(Duration::from_secs(60));
        match addr.strip_prefix("unix:") {
            Some(path) => {
                let s = UnixStream::connect(path).map_err(|e| format!("connect {addr}: {e}"))?;
                s.set_read_timeout(timeout).map_err(|e| e.to_string())?;
                Ok(Conn::Unix(s))
            }
            None => {
                let s = TcpStream::connect(&addr).map_err(|e| format!("connect {addr}: {e}"))?;
                s.set_nodelay(true).map_err(|e| e.to_string())?;
                s.set_read_timeout(timeout).map_err(|e| e.to_string())?;
                Ok(Conn::Tcp(s))
            }
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Unix(s) => s.flush(),
        }
    }
}

/// The bytes device `dev` writes at step `step`: distinct per device and step.
fn pattern(dev: usize, step: usize, len: usize) -> Vec<u8> {
    let seed = (dev as u64) << 32 | step as u64;
    (0..len)
        .map(|i| {
            (seed
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .rotate_left((i % 61) as u32) as u8)
                ^ i as u8
        })
        .collect()
}

/// Replays the trace as device `dev`: its boot-read time and bytes read. `stall`
/// keeps the longest wait of one request so far and its step, failed or not.
fn device(
    a: &Args,
    dev: usize,
    read_total: &AtomicU64,
    stall: &mut (f64, usize),
) -> Result<(f64, u64), String> {
    let export = a.export.replace("{i}", &dev.to_string());
    let mut s = Conn::open(&a.connect[dev % a.connect.len()], dev)?;
    let size = nbd::client_handshake(&mut s, &export).map_err(|e| format!("{export}: {e}"))?;
    if size < a.trace.size {
        return Err(format!(
            "{export} has {size} bytes, the trace needs {}",
            a.trace.size
        ));
    }
    // What this device wrote, newest last: the expected bytes of a later read. Where
    // writes go unchecked, every place the trace writes, from the start: another
    // device sharing the overlay may have written there first.
    let mut written: Vec<(u64, Vec<u8>)> = Vec::new();
    if a.skip_written {
        written = (a.trace.steps.iter())
            .filter(|s| s.op == Op::Write)
            .map(|s| (s.offset, vec![0; s.length as usize]))
            .collect();
    }
    let mut buf = Vec::new();
    let start = Instant::now();
    let mut read = 0u64;
    for (i, step) in a.trace.steps.iter().enumerate() {
        if a.gap_scale > 0.0 {
            let due = start + Duration::from_secs_f64(step.at_us as f64 * a.gap_scale / 1e6);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        let command = match step.op {
            Op::Read => nbd::CMD_READ,
            Op::Write => nbd::CMD_WRITE,
            Op::Flush => nbd::CMD_FLUSH,
        };
        let req = Request {
            flags: 0,
            command,
            handle: i as u64,
            offset: step.offset,
            length: step.length,
        };
        let fail = |e: std::io::Error| {
            format!(
                "{export}: step {i} ({:?} {} +{}): {e}",
                step.op, step.offset, step.length
            )
        };
        let sent = Instant::now();
        // Counted however the request ends: a request that never gets its reply
        // waited until the error.
        let waited = |stall: &mut (f64, usize)| {
            let w = sent.elapsed().as_secs_f64();
            if w > stall.0 {
                *stall = (w, i);
            }
        };
        let r = s.write_all(&req.encode());
        r.map_err(|e| {
            waited(stall);
            fail(e)
        })?;
        if step.op == Op::Write {
            let data = pattern(dev, i, step.length as usize);
            s.write_all(&data).map_err(fail)?;
            if a.image.is_some() && !a.skip_written {
                written.push((step.offset, data));
            }
        }
        let (err, handle) = nbd::read_simple_reply(&mut s).map_err(|e| {
            waited(stall);
            fail(e)
        })?;
        if step.op != Op::Read {
            waited(stall);
        }
        if handle != i as u64 {
            return Err(format!("{export}: step {i}: reply for handle {handle}"));
        }
        if err != 0 {
            return Err(format!(
                "{export}: step {i} ({:?} {} +{}): error {err}",
                step.op, step.offset, step.length
            ));
        }
        if step.op == Op::Read {
            buf.resize(step.length as usize, 0);
            let r = s.read_exact(&mut buf);
            waited(stall);
            r.map_err(fail)?;
            read += u64::from(step.length);
            read_total.fetch_add(u64::from(step.length), Ordering::Relaxed);
            if let Some(image) = &a.image {
                check(image, &written, a.skip_written, step.offset, &buf).map_err(|at| {
                    format!("{export}: step {i}: byte {at} differs from the image")
                })?;
            }
        }
    }
    let boot = start.elapsed().as_secs_f64();
    let disc = Request {
        flags: 0,
        command: nbd::CMD_DISC,
        handle: u64::MAX,
        offset: 0,
        length: 0,
    };
    let _ = s.write_all(&disc.encode());
    Ok((boot, read))
}

/// The first absolute offset where `got` (read at `offset`) differs from what the
/// device should see there: the image, or what the device wrote there itself. With
/// `skip_written` (a server that forgets writes, or keeps one overlay for all
/// devices) the bytes the device wrote are not checked. A read that meets no write,
/// nearly every read of a boot, is one comparison against the image, so the check
/// costs the client about what reading the bytes does, whichever server it measures.
fn check(
    image: &[u8],
    written: &[(u64, Vec<u8>)],
    skip_written: bool,
    offset: u64,
    got: &[u8],
) -> Result<(), u64> {
    let end = offset + got.len() as u64;
    let base = &image[offset as usize..end as usize];
    let first_diff = |want: &[u8], mask: Option<&[bool]>| {
        (0..got.len())
            .find(|&p| want[p] != got[p] && mask.is_none_or(|m| !m[p]))
            .map_or(Ok(()), |p| Err(offset + p as u64))
    };
    let meets =
        |(w_off, data): &&(u64, Vec<u8>)| *w_off < end && w_off + data.len() as u64 > offset;
    if !written.iter().any(|w| meets(&w)) {
        return if got == base {
            Ok(())
        } else {
            first_diff(base, None)
        };
    }
    let mut want = base.to_vec();
    let mut mask = vec![false; got.len()];
    for (w_off, data) in written.iter().filter(meets) {
        let w_end = w_off + data.len() as u64;
        let (lo, hi) = (offset.max(*w_off), end.min(w_end));
        let (a, b) = ((lo - offset) as usize, (hi - offset) as usize);
        want[a..b].copy_from_slice(&data[(lo - w_off) as usize..(hi - w_off) as usize]);
        mask[a..b].fill(skip_written);
    }
    first_diff(&want, Some(&mask))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let a = Arc::new(parse_args());
    let t0 = Instant::now();
    let read_total = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let outcomes = Arc::new(Mutex::new(Vec::with_capacity(a.devices)));
    let mut handles = Vec::with_capacity(a.devices);
    let progress = {
        let (read_total, done, devices) = (read_total.clone(), done.clone(), a.devices);
        let every = Duration::from_secs_f64(a.progress);
        std::thread::spawn(move || loop {
            std::thread::sleep(every);
            let d = done.load(Ordering::Relaxed);
            eprintln!(
                "storm: {:>6.2} s, {d}/{devices} devices done, {} MB read",
                t0.elapsed().as_secs_f64(),
                read_total.load(Ordering::Relaxed) >> 20
            );
            if d >= devices {
                break;
            }
        })
    };
    for k in 0..a.devices {
        let dev = a.first + k;
        let (a, read_total, done, outcomes) = (
            a.clone(),
            read_total.clone(),
            done.clone(),
            outcomes.clone(),
        );
        let due = t0 + Duration::from_secs_f64(a.ramp * k as f64 / a.devices.max(1) as f64);
        let h = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let mut stall = (0.0, 0);
                let r = device(&a, dev, &read_total, &mut stall);
                let o = match r {
                    Ok((boot_s, read_bytes)) => Outcome {
                        dev,
                        boot_s,
                        finished_at_s: t0.elapsed().as_secs_f64(),
                        read_bytes,
                        stall,
                        error: None,
                    },
                    Err(e) => Outcome {
                        dev,
                        boot_s: 0.0,
                        finished_at_s: t0.elapsed().as_secs_f64(),
                        read_bytes: 0,
                        stall,
                        error: Some(e),
                    },
                };
                outcomes.lock().expect("outcomes").push(o);
                done.fetch_add(1, Ordering::Relaxed);
            });
        match h {
            Ok(h) => handles.push(h),
            Err(e) => {
                eprintln!("storm-client: cannot start device {dev}: {e}");
                std::process::exit(1);
            }
        }
    }
    for h in handles {
        let _ = h.join();
    }
    let _ = progress.join();
    let outcomes = outcomes.lock().expect("outcomes");
    let mut boots: Vec<f64> = outcomes
        .iter()
        .filter(|o| o.error.is_none())
        .map(|o| o.boot_s)
        .collect();
    boots.sort_by(f64::total_cmp);
    let errors: Vec<&String> = outcomes.iter().filter_map(|o| o.error.as_ref()).collect();
    let total_s = outcomes.iter().map(|o| o.finished_at_s).fold(0.0, f64::max);
    let bytes: u64 = outcomes.iter().map(|o| o.read_bytes).sum();
    let shown: Vec<String> = errors.iter().take(10).map(|e| format!("{e:?}")).collect();
    let worst = outcomes
        .iter()
        .max_by(|x, y| x.stall.0.total_cmp(&y.stall.0))
        .map_or((0.0, 0, 0), |o| (o.stall.0, o.dev, o.stall.1));
    println!(
        "{{\"devices\": {}, \"failed\": {}, \"total_s\": {total_s:.3}, \"p50_s\": {:.3}, \
         \"p99_s\": {:.3}, \"max_s\": {:.3}, \"read_bytes\": {bytes}, \"mb_s\": {:.1}, \
         \"max_stall_s\": {:.3}, \"max_stall_device\": {}, \"max_stall_step\": {}, \
         \"errors\": [{}]}}",
        a.devices,
        errors.len(),
        percentile(&boots, 0.5),
        percentile(&boots, 0.99),
        boots.last().copied().unwrap_or(0.0),
        bytes as f64 / 1e6 / total_s.max(1e-9),
        worst.0,
        worst.1,
        worst.2,
        shown.join(", ")
    );
    if !errors.is_empty() {
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_is_checked_against_the_image_and_the_devices_own_writes() {
        let image = vec![7u8; 64];
        let written = vec![(8u64, vec![1u8; 8]), (12, vec![2u8; 2])];
        let mut got = vec![7u8; 16];
        got[8..12].copy_from_slice(&[1; 4]);
        got[12..14].copy_from_slice(&[2; 2]);
        got[14..16].copy_from_slice(&[1; 2]);
        assert_eq!(check(&image, &written, false, 0, &got), Ok(()));
        got[15] = 7;
        assert_eq!(check(&image, &written, false, 0, &got), Err(15));
        // A forgetful server's image bytes where the device wrote pass when skipped,
        // and a wrong byte outside the writes does not.
        assert_eq!(check(&image, &written, true, 0, &[7u8; 16]), Ok(()));
        assert_eq!(check(&image, &written, false, 0, &[7u8; 16]), Err(8));
        let mut bad = [7u8; 16];
        bad[3] = 0;
        assert_eq!(check(&image, &written, true, 0, &bad), Err(3));
        // A read that meets no write is compared with the image alone.
        assert_eq!(check(&image, &written, false, 32, &[7u8; 8]), Ok(()));
        assert_eq!(check(&image, &written, false, 32, &[7, 7, 9, 7]), Err(34));
        assert_ne!(pattern(1, 2, 32), pattern(2, 1, 32));
    }

    #[test]
    fn a_device_connects_to_its_own_unix_socket() {
        let dir = std::env::temp_dir().join(format!("storm-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let listener = std::os::unix::net::UnixListener::bind(dir.join("a7.sock")).expect("bind");
        let pattern = format!("unix:{}/a{{i}}.sock", dir.display());
        let mut c = Conn::open(&pattern, 7).expect("device 7 reaches a7.sock");
        let (mut peer, _) = listener.accept().expect("accept");
        c.write_all(b"hi").expect("write");
        let mut got = [0u8; 2];
        peer.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"hi");
        let err = Conn::open(&pattern, 8).err().expect("no a8.sock");
        assert!(err.contains("a8.sock"), "{err}");
        assert!(Conn::open("127.0.0.1:notaport", 0).is_err());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
