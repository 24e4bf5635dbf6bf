//! The API against its own OpenAPI document: schemathesis (from PyPI, in
//! the venv `.ci/install-deps` makes) generates requests from the document,
//! valid and not, sends them to a real server with an admin token, and
//! checks every answer: no 5xx, a status the operation documents, the
//! content type it documents, its headers and a body that matches its
//! schema. Any failure fails the test, with schemathesis' own report.
//!
//! The token is the server's own admin token (`DATA/admin-tokens`): the
//! routes schemathesis may call with it cannot remove it (`DELETE
//! /api/v1/tokens/{name}` revokes the farm's tokens, never a server's own),
//! so a run never locks itself out half-way, whatever names it tries.
//!
//! Left out: `PUT /api/v1/vdisks/{name}/content` takes the extents framing
//! (`application/vnd.vstream.extents`), which schemathesis cannot generate;
//! the import tests send it real bytes. Every request the schema forbids
//! must be refused (schemathesis' negative_data_rejection). Not checked:
//! whether every request the schema allows is accepted
//! (positive_data_acceptance): the server checks more than the schema can
//! say (a MAC's multicast bit, a size in 512-byte sectors, a path on this
//! server), so those answer 400 as documented.

use crate::common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{skip, TestServer};

/// schemathesis' command line, from the venv of `.ci/install-deps`
/// (`VSTREAM_SCHEMATHESIS` for another).
fn schemathesis() -> Option<String> {
    let st = std::env::var("VSTREAM_SCHEMATHESIS")
        .unwrap_or_else(|_| "/opt/vstream-venv/bin/st".to_owned());
    let ok = Command::new(&st)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip(&format!(
            "schemathesis is not installed at {st} (.ci/install-deps installs it)"
        ));
        return None;
    }
    Some(st)
}

/// The checks run on every answer.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_headers_conformance,response_schema_conformance,\
                      negative_data_rejection";
/// Names that exist, offered for the path's `{name}` half of the time, and
/// the two routes whose 503 is expected here.
const CONFIG: &str = r#"
[dictionaries.vdisks]
values = ["base", "spare"]
[dictionaries.devices]
values = ["pc1", "pc2", "52:54:00:00:00:02"]

[[operations]]
include-path-regex = "^/api/v1/vdisks/[{]name[}]"
parameters = { "path.name" = { dictionary = "vdisks", probability = 0.5 } }

[[operations]]
include-path-regex = "^/api/v1/devices/[{]name[}]"
parameters = { "path.name" = { dictionary = "devices", probability = 0.5 } }

# 503 is these routes' documented "not now, ask again": this server has no
# enrollment CA to sign a credential with, a device's vDisk version has no
# verified copy on a live server yet. Any other 5xx fails.
[[operations]]
include-operation-id = ["issue_credential", "login"]
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "503"]
"#;
/// Test cases per operation: about 40 s alone on this 2-core machine. CI has
/// a 30-minute budget, and the suite took 28.6 min with 75.
const MAX_EXAMPLES: &str = "30";
/// The whole run, past which it counts as a failure.
const LIMIT: Duration = Duration::from_secs(420);

#[test]
fn the_api_answers_as_its_document_says() {
    let Some(st) = schemathesis() else {
        return;
    };
    let s = TestServer::start();
    // Objects that exist, so that the routes of one get past their 404:
    // schemathesis picks these names for half of its tries (the rest are
    // its own), and may change or delete them as it goes.
    s.cli_ok(&["vdisk", "create", "base", "--size", "16M"]);
    s.cli_ok(&["vdisk", "create", "spare", "--size", "16M"]);
    for (d, mac, vdisk) in [
        ("pc1", "52:54:00:00:00:01", "base"),
        ("pc2", "52:54:00:00:00:02", "spare"),
    ] {
        s.cli_ok(&["device", "add", d, "--mac", mac, "--vdisk", vdisk]);
    }
    let report = tempfile::tempdir().expect("tempdir");
    let config = report.path().join("schemathesis.toml");
    std::fs::write(&config, CONFIG).expect("writing schemathesis.toml");
    let (out_path, err_path) = (
        report.path().join("schemathesis.out"),
        report.path().join("schemathesis.err"),
    );
    let mut child = Command::new(&st)
        .arg("--no-color")
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(format!("{}/api/v1/openapi.json", s.api))
        .args(["-H", &format!("Authorization: Bearer {}", s.token())])
        .args(["--checks", CHECKS])
        .args(["--exclude-operation-id", "import_vdisk"])
        .args(["--max-examples", MAX_EXAMPLES])
        .args(["--request-timeout", "20"])
        .args(["--output-truncate", "false"])
        .current_dir(report.path())
        // Files, not pipes: nobody reads a pipe while the run goes on, and a
        // report past the pipe's 64 KiB would stall schemathesis for good.
        .stdout(std::fs::File::create(&out_path).expect("schemathesis.out"))
        .stderr(std::fs::File::create(&err_path).expect("schemathesis.err"))
        .spawn()
        .expect("running schemathesis");
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("waiting for schemathesis") {
            break Some(st);
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = child.wait();
    let stdout =
        String::from_utf8_lossy(&std::fs::read(&out_path).unwrap_or_default()).into_owned();
    let stderr =
        String::from_utf8_lossy(&std::fs::read(&err_path).unwrap_or_default()).into_owned();
    // The summary, always: the failures, then the counts.
    let summary = stdout
        .find("=== FAILURES ===")
        .or_else(|| stdout.find("=== ERRORS ==="))
        .or_else(|| stdout.find("=== SUMMARY ==="))
        .map_or(&stdout[..], |at| {
            &stdout[stdout[..at].rfind('\n').unwrap_or(0)..]
        });
    eprintln!(
        "schemathesis over {} ({:.0} s):\n{summary}\n{stderr}",
        s.api,
        started.elapsed().as_secs_f64()
    );
    let Some(status) = status else {
        panic!("schemathesis ran past {} s", LIMIT.as_secs());
    };
    assert!(
        status.success(),
        "schemathesis found answers that do not match the document ({status}); \
         `st replay ID` in a run by hand shows one"
    );
    // A run that tested nothing passes too: make sure it tested the routes.
    let tested = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("Tested: "))
        .and_then(|n| n.trim().parse::<u32>().ok())
        .unwrap_or(0);
    assert!(tested >= 40, "schemathesis tested {tested} operations");
    assert!(
        !s.log_text().contains("panicked"),
        "the server panicked:\n{}",
        s.log_text()
    );
}
