//! The boot trace: what one device asked of its disk while it booted, in order.
//!
//! The text format (version 1), one request per line after `#` comments:
//!
//! ```text
//! # vstream boot trace 1
//! # size 67108864
//! 0 R 0 4096
//! 1532 R 1048576 131072
//! 20811 W 4096 4096
//! 20950 F 0 0
//! ```
//!
//! The fields are: microseconds since the first request was issued; the operation
//! (`R` read, `W` write, `F` flush); offset and length in bytes. The `# size` line is
//! the disk's size. The gaps between requests are the differences of the first field.
//! `from_nbdkit_log` makes a trace from nbdkit's `log` filter output (a QEMU guest
//! booting through `nbdkit --filter=log file IMAGE logfile=LOG`): requests in the
//! order the server received them, with their arrival times. Write-zeroes counts as a
//! write; trim, cache and block-status requests are left out (the replay's clients
//! read and write only).

use std::fmt::Write as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub at_us: u64,
    pub op: Op,
    pub offset: u64,
    pub length: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    pub size: u64,
    pub steps: Vec<Step>,
}

impl Trace {
    pub fn parse(text: &str) -> Result<Trace, String> {
        let mut size = None;
        let mut steps = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if let Some(c) = line.strip_prefix('#') {
                if let Some(v) = c.trim().strip_prefix("size ") {
                    size = Some(
                        v.trim()
                            .parse()
                            .map_err(|e| format!("line {}: size: {e}", n + 1))?,
                    );
                }
                continue;
            }
            if line.is_empty() {
                continue;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            let [at, op, off, len] = f[..] else {
                return Err(format!("line {}: want 4 fields, got {line:?}", n + 1));
            };
            let num = |s: &str, what: &str| -> Result<u64, String> {
                s.parse()
                    .map_err(|e| format!("line {}: {what} {s:?}: {e}", n + 1))
            };
            let op = match op {
                "R" => Op::Read,
                "W" => Op::Write,
                "F" => Op::Flush,
                o => return Err(format!("line {}: unknown operation {o:?}", n + 1)),
            };
            let length = u32::try_from(num(len, "length")?)
                .map_err(|_| format!("line {}: length too big", n + 1))?;
            steps.push(Step {
                at_us: num(at, "time")?,
                op,
                offset: num(off, "offset")?,
                length,
            });
        }
        let size = size.ok_or("no `# size` line")?;
        if let Some(s) = steps.iter().find(|s| s.offset + u64::from(s.length) > size) {
            return Err(format!("{s:?} reaches past the disk's {size} bytes"));
        }
        if steps.windows(2).any(|w| w[1].at_us < w[0].at_us) {
            return Err("the times go backwards".into());
        }
        Ok(Trace { size, steps })
    }

    pub fn render(&self, comment: &str) -> String {
        let mut out = format!(
            "# vstream boot trace 1\n# {comment}\n# size {}\n",
            self.size
        );
        for s in &self.steps {
            let op = match s.op {
                Op::Read => 'R',
                Op::Write => 'W',
                Op::Flush => 'F',
            };
            let _ = writeln!(out, "{} {op} {} {}", s.at_us, s.offset, s.length);
        }
        out
    }

    /// A trace from nbdkit's log filter: its requests on its connection with the
    /// most of them (the guest's disk), in arrival order.
    pub fn from_nbdkit_log(log: &str) -> Result<Trace, String> {
        let mut size = None;
        let mut per_conn: std::collections::BTreeMap<String, Vec<(u64, Op, u64, u32)>> =
            Default::default();
        for line in log.lines() {
            let mut words = line.split_whitespace();
            let (Some(day), Some(time), Some(conn), Some(what)) =
                (words.next(), words.next(), words.next(), words.next())
            else {
                continue;
            };
            if !conn.starts_with("connection=") {
                continue;
            }
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
            };
            if what == "Connect" {
                size = size.or(field("size="));
                continue;
            }
            let op = match what {
                "Read" => Op::Read,
                "Write" | "Zero" => Op::Write,
                "Flush" => Op::Flush,
                _ => continue,
            };
            let us = micros(day, time).ok_or_else(|| format!("bad time in {line:?}"))?;
            let (offset, length) = if op == Op::Flush {
                (0, 0)
            } else {
                let off = field("offset=").ok_or_else(|| format!("no offset in {line:?}"))?;
                let len = field("count=").ok_or_else(|| format!("no count in {line:?}"))?;
                (
                    off,
                    u32::try_from(len).map_err(|_| format!("count too big: {line:?}"))?,
                )
            };
            per_conn
                .entry(conn.to_owned())
                .or_default()
                .push((us, op, offset, length));
        }
        let reqs = per_conn
            .into_values()
            .max_by_key(Vec::len)
            .ok_or("no requests in the log")?;
        let t0 = reqs[0].0;
        Ok(Trace {
            size: size.ok_or("no Connect line with the size")?,
            steps: reqs
                .into_iter()
                .map(|(us, op, offset, length)| Step {
                    at_us: us.saturating_sub(t0),
                    op,
                    offset,
                    length,
                })
                .collect(),
        })
    }

    pub fn bytes(&self, op: Op) -> u64 {
        self.steps
            .iter()
            .filter(|s| s.op == op)
            .map(|s| u64::from(s.length))
            .sum()
    }
}

/// Microseconds since the epoch day 0 of `YYYY-MM-DD HH:MM:SS.ffffff` (only
/// differences matter, so days are counted from a fixed origin without calendars
/// beyond the day of the month, which covers a trace recorded within one month).
fn micros(day: &str, time: &str) -> Option<u64> {
    let d: u64 = day.get(8..10)?.parse().ok()?;
    let (hms, frac) = time.split_once('.')?;
    let mut parts = hms.split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, s) = (parts.next()??, parts.next()??, parts.next()??);
    let frac = format!("{frac:0<6}");
    let us: u64 = frac.get(..6)?.parse().ok()?;
    Some((((d * 24 + h) * 60 + m) * 60 + s) * 1_000_000 + us)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_nbdkit_log_becomes_a_trace_that_round_trips() {
        let log = "2026-12-06 18:05:28.185080 connection=1 Connect export=\"\" tls=0 size=0x1000000 minsize=0x0\n\
                   2026-12-06 18:05:28.195359 connection=1 Read id=1 offset=0x200 count=0x1000 ...\n\
                   2026-12-06 18:05:28.195400 connection=1 ...Read id=1 return=0\n\
                   2026-12-06 18:05:28.201253 connection=1 Write id=2 offset=0x0 count=0x200 fua=0 ...\n\
                   2026-12-06 18:05:28.301253 connection=1 Flush id=3 ...\n\
                   2026-12-06 18:05:28.301300 connection=2 Read id=1 offset=0x0 count=0x200 ...\n";
        let t = Trace::from_nbdkit_log(log).expect("trace");
        assert_eq!(t.size, 16 << 20);
        assert_eq!(
            t.steps,
            vec![
                Step {
                    at_us: 0,
                    op: Op::Read,
                    offset: 512,
                    length: 4096
                },
                Step {
                    at_us: 5894,
                    op: Op::Write,
                    offset: 0,
                    length: 512
                },
                Step {
                    at_us: 105_894,
                    op: Op::Flush,
                    offset: 0,
                    length: 0
                },
            ]
        );
        assert_eq!(Trace::parse(&t.render("test")).expect("parse"), t);
    }

    #[test]
    fn a_bad_trace_says_which_line() {
        let e = Trace::parse("# size 4096\n0 R 0 4096\n5 X 0 1\n").expect_err("bad op");
        assert!(e.contains("line 3"), "{e}");
        let e = Trace::parse("# size 4096\n0 R 4096 1\n").expect_err("past the end");
        assert!(e.contains("past"), "{e}");
        assert!(Trace::parse("0 R 0 1\n").is_err(), "no size");
    }
}
