//! A libnbd client (Debian's python3-libnbd) the tests drive line by line,
//! and a reader of whole exports.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};

use super::PYTHON;

/// A libnbd client driven line by line on stdin; each command answers one line.
/// With a second argument it starts up, says `waiting`, and connects only at
/// its first input line.
///
/// ```text
///   pwrite OFF PATH        pwrite the bytes of file PATH at OFF   -> ok | error ...
///   fill OFF LEN BYTE      pwrite LEN bytes of BYTE               -> ok | error ...
///   zero OFF LEN hole|nohole   NBD_CMD_WRITE_ZEROES               -> ok | error ...
///   check OFF LEN BYTE     pread and compare with BYTE            -> ok | mismatch AT GOT
///   pread OFF LEN PATH     pread into the file PATH               -> ok
///   flush                                                         -> ok
///   crash                  exit at once: no NBD_CMD_DISC
///   quit                   h.shutdown() (NBD_CMD_DISC), exit      -> bye
/// ```
pub const DRIVER: &str = r#"
import os, sys
import nbd
h = nbd.NBD()
if len(sys.argv) > 2:
    # Lazy: start up now, connect when told to.
    print("waiting", flush=True)
    sys.stdin.readline()
try:
    h.connect_uri(sys.argv[1])
except nbd.Error as e:
    print("connect-error", e.errnum, e.errno, e.string, flush=True)
    sys.exit(3)
print("ready", h.get_size(), int(h.can_zero()), flush=True)
for line in sys.stdin:
    w = line.split()
    if not w:
        continue
    try:
        if w[0] == "pwrite":
            with open(w[2], "rb") as f:
                data = f.read()
            h.pwrite(data, int(w[1]))
        elif w[0] == "fill":
            h.pwrite(bytes([int(w[3], 0)]) * int(w[2]), int(w[1]))
        elif w[0] == "zero":
            h.zero(int(w[2]), int(w[1]), nbd.CMD_FLAG_NO_HOLE if w[3] == "nohole" else 0)
        elif w[0] == "check":
            off, n, b = int(w[1]), int(w[2]), int(w[3], 0)
            data = h.pread(n, off)
            bad = [i for i, x in enumerate(data) if x != b][:1]
            print("ok" if not bad else "mismatch %d %d" % (off + bad[0], data[bad[0]]), flush=True)
            continue
        elif w[0] == "pread":
            off, n = int(w[1]), int(w[2])
            with open(w[3], "wb") as f:
                while n > 0:
                    k = min(n, 1 << 20)
                    f.write(h.pread(k, off))
                    off += k
                    n -= k
        elif w[0] == "flush":
            h.flush()
        elif w[0] == "crash":
            os._exit(0)
        elif w[0] == "quit":
            h.shutdown()
            print("bye", flush=True)
            sys.exit(0)
        else:
            print("unknown command", w[0], flush=True)
            continue
        print("ok", flush=True)
    except nbd.Error as e:
        print("error", e.errnum, e.errno, e.string, flush=True)
os._exit(0)
"#;

/// Reads whole exports: `READER OUTDIR URL...` writes OUTDIR/I (the bytes)
/// or OUTDIR/I.err (why not) for the I-th URL, each on its own connection
/// ended with NBD_CMD_DISC.
pub const READER: &str = r#"
import sys
import nbd
out = sys.argv[1]
for i, url in enumerate(sys.argv[2:]):
    h = nbd.NBD()
    try:
        h.connect_uri(url)
        size = h.get_size()
        with open("%s/%d" % (out, i), "wb") as f:
            off = 0
            while off < size:
                k = min(size - off, 1 << 20)
                f.write(h.pread(k, off))
                off += k
        h.shutdown()
    except nbd.Error as e:
        with open("%s/%d.err" % (out, i), "w") as f:
            f.write("%s %s %s" % (e.errnum, e.errno, e.string))
    del h
"#;

/// One NBD connection held open by a libnbd client process.
pub struct Nbd {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    url: String,
    pub can_zero: bool,
}

impl Nbd {
    /// Connects, or returns the client's complaint.
    pub fn try_connect(url: &str) -> Result<Nbd, String> {
        Nbd::try_connect_in(&[], url)
    }

    /// Connects from a client run under the command `wrap` (`ip netns exec NS`).
    pub fn try_connect_in(wrap: &[String], url: &str) -> Result<Nbd, String> {
        let mut n = Nbd::spawn_in(wrap, url, false);
        let first = n.line();
        n.ready(&first).map(|()| n).map_err(|()| first)
    }

    /// A client started up but not connected yet: `connect_now` connects it.
    pub fn lazy(url: &str) -> Nbd {
        let mut n = Nbd::spawn(url, true);
        assert_eq!(n.line(), "waiting");
        n
    }

    pub fn connect_now(&mut self) {
        let answer = self.cmd("connect");
        assert!(
            self.ready(&answer).is_ok(),
            "connecting to {}: {answer}",
            self.url
        );
    }

    /// Takes the client's first answer: `ready SIZE CAN_ZERO`, or a complaint.
    fn ready(&mut self, first: &str) -> Result<(), ()> {
        let w: Vec<&str> = first.split_whitespace().collect();
        if w.first() != Some(&"ready") {
            let _ = self.child.wait();
            return Err(());
        }
        self.can_zero = w.get(2) == Some(&"1");
        Ok(())
    }

    fn spawn(url: &str, lazy: bool) -> Nbd {
        Nbd::spawn_in(&[], url, lazy)
    }

    fn spawn_in(wrap: &[String], url: &str, lazy: bool) -> Nbd {
        let mut cmd = match wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(PYTHON);
                c
            }
            None => Command::new(PYTHON),
        };
        let mut child = cmd
            .args(["-c", DRIVER, url])
            .args(lazy.then_some("lazy"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning the libnbd client");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Nbd {
            child,
            stdin,
            stdout,
            url: url.to_string(),
            can_zero: false,
        }
    }

    pub fn connect(url: &str) -> Nbd {
        Nbd::try_connect(url).unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
    }

    /// [`Nbd::connect`] from a client run under the command `wrap`.
    pub fn connect_in(wrap: &[String], url: &str) -> Nbd {
        Nbd::try_connect_in(wrap, url).unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
    }

    fn line(&mut self) -> String {
        let mut s = String::new();
        self.stdout.read_line(&mut s).expect("reading the client");
        s.trim_end().to_string()
    }

    /// Sends one command; returns its answer line.
    pub fn cmd(&mut self, c: &str) -> String {
        let stdin = self.stdin.as_mut().expect("client stdin");
        writeln!(stdin, "{c}")
            .and_then(|()| stdin.flush())
            .expect("writing to the client");
        let answer = self.line();
        assert!(
            !answer.is_empty(),
            "the client on {} died during {c:?}",
            self.url
        );
        answer
    }

    pub fn ok(&mut self, c: &str) {
        let a = self.cmd(c);
        assert_eq!(a, "ok", "{c:?} on {}", self.url);
    }

    pub fn pwrite(&mut self, data: &[u8], off: usize, scratch: &Path) {
        std::fs::write(scratch, data).expect("writing the scratch file");
        self.ok(&format!("pwrite {off} {}", scratch.display()));
    }

    pub fn pread(&mut self, off: usize, len: usize, scratch: &Path) -> Vec<u8> {
        self.ok(&format!("pread {off} {len} {}", scratch.display()));
        std::fs::read(scratch).expect("reading the scratch file")
    }

    /// Ends without NBD_CMD_DISC, as a device that loses power does.
    pub fn crash(mut self) {
        let stdin = self.stdin.as_mut().expect("client stdin");
        let _ = writeln!(stdin, "crash").and_then(|()| stdin.flush());
        let st = self.child.wait().expect("wait");
        assert!(st.success(), "{st}");
    }

    /// Ends cleanly with NBD_CMD_DISC.
    pub fn quit(mut self) {
        assert_eq!(self.cmd("quit"), "bye");
        let st = self.child.wait().expect("wait");
        assert!(st.success(), "{st}");
    }
}

impl Drop for Nbd {
    fn drop(&mut self) {
        // Only our own child, by its handle.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads each export whole; an error says why the connection failed.
pub fn read_exports(urls: &[String]) -> Vec<Result<Vec<u8>, String>> {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(PYTHON)
        .args(["-c", READER])
        .arg(dir.path())
        .args(urls)
        .output()
        .expect("running the libnbd reader");
    assert!(out.status.success(), "reader: {}", text(&out));
    (0..urls.len())
        .map(|i| {
            let data = dir.path().join(i.to_string());
            match std::fs::read(&data) {
                Ok(b) => Ok(b),
                Err(_) => Err(std::fs::read_to_string(dir.path().join(format!("{i}.err")))
                    .unwrap_or_else(|_| "no answer".into())),
            }
        })
        .collect()
}

pub fn read_export(url: &str) -> Result<Vec<u8>, String> {
    read_exports(&[url.to_string()]).remove(0)
}

/// A process's status and output, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
