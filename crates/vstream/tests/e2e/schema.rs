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
//! the import tests send it real bytes. Not checked: whether every request
//! the schema allows is accepted (schemathesis' positive_data_acceptance)
//! and every one it forbids refused (negative_data_rejection): the server
//! checks more than the schema can say (a MAC's multicast bit, a size in
//! 512-byte sectors, a path on this server), so those answer 400 as
//! documented.

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
                      response_headers_conformance,response_schema_conformance";
/// Test cases per operation: about a minute alone on this 2-core machine, two
/// beside other tests.
const MAX_EXAMPLES: &str = "75";
/// The whole run, past which it counts as a failure.
const LIMIT: Duration = Duration::from_secs(420);

#[test]
fn the_api_answers_as_its_document_says() {
    let Some(st) = schemathesis() else {
        return;
    };
    let s = TestServer::start();
    let report = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(&st)
        .args(["--no-color", "run"])
        .arg(format!("{}/api/v1/openapi.json", s.api))
        .args(["-H", &format!("Authorization: Bearer {}", s.token())])
        .args(["--checks", CHECKS])
        .args(["--exclude-operation-id", "import_vdisk"])
        .args(["--max-examples", MAX_EXAMPLES])
        .args(["--request-timeout", "20"])
        .args(["--output-truncate", "false"])
        .current_dir(report.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
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
    let out = child.wait_with_output().expect("schemathesis output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
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
