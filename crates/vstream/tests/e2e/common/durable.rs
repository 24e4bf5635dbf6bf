//! The block writer and checker shared by the durability tests
//! (durability.rs: the server process is killed; power_loss.rs: the QEMU
//! guest the server runs in is).
//!
//! Every 4 KiB block the writer puts on the disk is a pure function of its
//! write number `i`: it lands at block `i % 4096`, carries `i`, its generation
//! (`i / 4096`), its block index, filler derived from `i` and a CRC-32. After
//! a crash and restart each block must hold the last write to it that was
//! covered by a completed flush, or a later write, never an older one and
//! never anything else.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::PYTHON;

pub const BLOCK: usize = 4096;
pub const BLOCKS: u64 = 4096;
pub const DISK_SIZE: usize = 64 << 20;

/// The writer. Modes:
///   crash URL START  writes i = START, START+1, ...; FLUSH after every 8th
///                    write, then prints `FLUSHED i` (writes up to i are covered).
///   ack URL START    writes without FLUSH; prints `ACK i` after each reply.
///   fua URL          a few writes with FUA, prints `DONE`, then waits on stdin.
pub const WRITER: &str = r#"
import struct, sys, zlib
import nbd

BLOCK = 4096
BLOCKS = 4096

def content(i):
    gen, b = divmod(i, BLOCKS)
    head = b"VSDURBLK" + struct.pack("<QQQ", i, gen, b)
    fill = struct.pack("<Q", (i * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) * ((BLOCK - 8 - len(head)) // 8)
    body = head + fill
    return body + struct.pack("<Q", zlib.crc32(body))

def main():
    mode, url = sys.argv[1], sys.argv[2]
    h = nbd.NBD()
    h.connect_uri(url)
    if mode == "fua":
        for i in (5, 100, 4000, 4096 + 5):
            h.pwrite(content(i), (i % BLOCKS) * BLOCK, nbd.CMD_FLAG_FUA)
        h.pwrite(b"FUA-PARTIAL!" * 100, 7 * BLOCK + 100, nbd.CMD_FLAG_FUA)
        print("DONE", flush=True)
        sys.stdin.read()
        return
    i = int(sys.argv[3])
    try:
        while True:
            h.pwrite(content(i), (i % BLOCKS) * BLOCK)
            if mode == "ack":
                print(f"ACK {i}", flush=True)
            elif i % 8 == 7:
                h.flush()
                print(f"FLUSHED {i}", flush=True)
            i += 1
    except nbd.Error as e:
        print(f"END {e}", flush=True)

main()
"#;

// ---------------------------------------------------------------------------
// Block contents, as the writer makes them.

pub fn crc32(data: &[u8]) -> u32 {
    let mut table = [0u32; 256];
    for (n, t) in table.iter_mut().enumerate() {
        let mut c = n as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
        *t = c;
    }
    let mut crc = u32::MAX;
    for &b in data {
        crc = table[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

pub fn content(i: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(BLOCK);
    v.extend_from_slice(b"VSDURBLK");
    for x in [i, i / BLOCKS, i % BLOCKS] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    let fill = i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes();
    while v.len() < BLOCK - 8 {
        v.extend_from_slice(&fill);
    }
    let crc = u64::from(crc32(&v));
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

pub fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// What block `b` holds: `None` for zeros (never written), `Some(i)` for write `i`.
pub fn decode(block: &[u8], b: u64) -> Result<Option<u64>, String> {
    if block.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    if &block[0..8] != b"VSDURBLK" {
        return Err(format!("garbage: starts {:02x?}", &block[..16]));
    }
    let crc = u64::from(crc32(&block[..BLOCK - 8]));
    if le_u64(&block[BLOCK - 8..]) != crc {
        return Err("torn or corrupt block: checksum mismatch".into());
    }
    let i = le_u64(&block[8..16]);
    if le_u64(&block[16..24]) != i / BLOCKS || le_u64(&block[24..32]) != b || i % BLOCKS != b {
        return Err(format!(
            "write {i} found in block {b}, where it does not belong"
        ));
    }
    if block != content(i).as_slice() {
        return Err(format!("write {i}: content differs from what was written"));
    }
    Ok(Some(i))
}

/// The last write to block `b` among writes `start..=last`.
pub fn last_write_to(b: u64, start: u64, last: u64) -> Option<u64> {
    let back = (last % BLOCKS + BLOCKS - b) % BLOCKS;
    let i = last.checked_sub(back)?;
    (i >= start).then_some(i)
}

/// Checks the whole disk: block `b` holds write `lower[b]` or a later one (up
/// to `max_i`), and everything past the written area is zeros. Returns what
/// each block holds.
pub fn check_disk(img: &[u8], lower: &[Option<u64>], max_i: u64, what: &str) -> Vec<Option<u64>> {
    assert_eq!(img.len(), DISK_SIZE, "{what}: disk size");
    let mut found = Vec::with_capacity(BLOCKS as usize);
    let mut problems = Vec::new();
    for b in 0..BLOCKS {
        let block = &img[b as usize * BLOCK..(b as usize + 1) * BLOCK];
        match decode(block, b) {
            Err(e) => problems.push(format!("block {b}: {e}")),
            Ok(got) => {
                if let Some(i) = got {
                    if i > max_i {
                        problems.push(format!(
                            "block {b}: write {i} was never sent (last possible {max_i})"
                        ));
                    }
                }
                if got < lower[b as usize] {
                    problems.push(format!(
                        "block {b}: holds {got:?}, older than the acknowledged and flushed write {:?}",
                        lower[b as usize]
                    ));
                }
                found.push(got);
            }
        }
    }
    if let Some(pos) = img[BLOCKS as usize * BLOCK..].iter().position(|&x| x != 0) {
        problems.push(format!(
            "byte {} past the written area is not zero",
            BLOCKS as usize * BLOCK + pos
        ));
    }
    assert!(
        problems.is_empty(),
        "{what}: {} of {BLOCKS} blocks are wrong:\n{}",
        problems.len(),
        problems
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    found
}

// ---------------------------------------------------------------------------
// The writer process.

/// The running writer and the lines it prints.
pub struct Writer {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Writer {
    pub fn start(script: &Path, args: &[&str]) -> Writer {
        let mut child = Command::new(PYTHON)
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the python writer");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Writer { child, lines }
    }

    /// Waits for a line starting with `prefix` (up to 30 s); returns it.
    pub fn wait_for(&mut self, prefix: &str, seen: &mut Vec<String>) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    seen.push(l.clone());
                    if l.starts_with(prefix) {
                        return l;
                    }
                }
                Err(e) => panic!(
                    "the writer printed no {prefix:?} ({e}); it printed {:?}",
                    seen.last()
                ),
            }
        }
    }

    /// Lets the writer end (it does once the server is gone), killing it after
    /// 20 s; returns every line it printed.
    pub fn finish(mut self, mut seen: Vec<String>) -> Vec<String> {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().expect("try_wait").is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.wait();
        seen.extend(self.lines.iter());
        seen
    }
}

/// The largest `N` among the lines `PREFIX N`.
pub fn last_number(lines: &[String], prefix: &str) -> Option<u64> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
        .max()
}

pub fn write_script(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("writer.py");
    let mut f = std::fs::File::create(&path).expect("writing the writer script");
    f.write_all(WRITER.as_bytes()).unwrap();
    path
}
