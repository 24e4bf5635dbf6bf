//! libiscsi's test suite (`iscsi-test-cu`) and Debian's tgt, the reference
//! target it is measured beside: running both, and reading the suite's
//! console test by test.

use std::path::Path;
use std::process::Command;

/// How iscsi-test-cu ran one test, from its own console output: CUnit
/// counts a test that printed `[SKIPPED]` (a command not implemented) as
/// passed, so the skips are told apart here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Skipped,
    Failed,
}

/// `Suite.Test` → outcome, from an iscsi-test-cu console log. A test's
/// result is the first `passed` or `FAILED` after its `Test: NAME ...`
/// (what follows it on that line belongs to the next test's setup).
pub fn classify(log: &str) -> Vec<(String, Outcome)> {
    let mut out = Vec::new();
    let mut suite = String::new();
    let mut current: Option<(String, bool)> = None;
    for line in log.lines() {
        if let Some(s) = line.strip_prefix("Suite: ") {
            suite = s.trim().to_owned();
            continue;
        }
        let mut rest = line;
        if let Some(i) = line.find("Test: ") {
            let after = &line[i + 6..];
            let (name, tail) = after.split_once(" ...").unwrap_or((after, ""));
            current = Some((format!("{suite}.{}", name.trim()), false));
            rest = tail;
        }
        let Some((name, skipped)) = current.as_mut() else {
            continue;
        };
        let t = rest.trim_start();
        let result = if t.starts_with("passed") {
            Some(if *skipped {
                Outcome::Skipped
            } else {
                Outcome::Passed
            })
        } else if t.starts_with("FAILED") {
            Some(Outcome::Failed)
        } else {
            if t.contains("[SKIPPED]") {
                *skipped = true;
            }
            None
        };
        if let Some(r) = result {
            out.push((std::mem::take(name), r));
            current = None;
        }
    }
    out
}

/// Runs iscsi-test-cu's FAMILY against `url` from `dir`, as `initiator`
/// (and as it again, with another session, where a test needs a second
/// I_T nexus); its console.
pub fn test_cu(dir: &Path, family: &str, url: &str, initiator: Option<&str>) -> String {
    let mut cmd = Command::new("iscsi-test-cu");
    cmd.current_dir(dir).args(["--dataloss", "-t", family]);
    if let Some(i) = initiator {
        cmd.args(["-i", i, "-I", i]);
    }
    let out = cmd.arg(url).output().expect("iscsi-test-cu");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// tgtd on `port`, with a 64 MiB file at LUN 1 of `iqn`, as the issue's
/// reference target; killed on drop.
pub struct Tgt(std::process::Child);

impl Tgt {
    pub fn start(dir: &Path, port: u16, control: u16, iqn: &str) -> Tgt {
        let file = dir.join("tgt.img");
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(64 << 20))
            .unwrap();
        let child = Command::new("tgtd")
            .args(["-f", "-C", &control.to_string(), "--iscsi"])
            .arg(format!("portal=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tgtd");
        let tgt = Tgt(child);
        let adm = |args: &[&str]| {
            for _ in 0..50 {
                let ok = Command::new("tgtadm")
                    .args(["-C", &control.to_string(), "--lld", "iscsi"])
                    .args(args)
                    .status()
                    .is_ok_and(|s| s.success());
                if ok {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            panic!("tgtadm {args:?} failed");
        };
        adm(&["--op", "new", "--mode", "target", "--tid", "1", "-T", iqn]);
        let file = file.to_str().unwrap();
        adm(&[
            "--op",
            "new",
            "--mode",
            "logicalunit",
            "--tid",
            "1",
            "--lun",
            "1",
            "-b",
            file,
        ]);
        adm(&[
            "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL",
        ]);
        tgt
    }
}

impl Drop for Tgt {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classifier_tells_skips_from_passes() {
        let log = "Suite: A\n  Test: One ...passed    [SKIPPED] PR IN is not implemented.\n\
                   \n  Test: Two ...    [SKIPPED] X is not implemented.\n    [SKIPPED] X\npassed\n\
                   Suite: B\n  Test: Three ...    [FAILED] READ10 failed\nFAILED\n    1. x.c:9 - CU\n";
        assert_eq!(
            classify(log),
            vec![
                ("A.One".to_string(), Outcome::Passed),
                ("A.Two".to_string(), Outcome::Skipped),
                ("B.Three".to_string(), Outcome::Failed),
            ]
        );
    }
}
