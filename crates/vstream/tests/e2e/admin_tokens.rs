//! The admin tokens: a server keeps their SHA-256 only, in DATA/admin-tokens;
//! `vstream token add|list|remove` changes them under a running server,
//! which counts each change from its next request on.

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use common::nbd::text;
use common::TestServer;

/// `vstream vdisk list` against `server` with `token`.
fn list_with(server: &TestServer, token: &str) -> Output {
    common::cli_as(&server.api, token, &["vdisk", "list"])
}

/// `vstream token ARGS --data` the server's folder.
fn token_cmd(server: &TestServer, args: &[&str]) -> Output {
    Command::new(common::BIN)
        .arg("token")
        .args(args)
        .arg("--data")
        .arg(&server.data)
        .output()
        .expect("running vstream token")
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn admin_tokens_are_kept_hashed_and_change_under_a_running_server() {
    let mut server = TestServer::start();
    let first = server.token();
    let store = server.data.join("admin-tokens");
    let stored = std::fs::read_to_string(&store).expect("DATA/admin-tokens");
    assert!(
        !stored.contains(&first),
        "the token itself is stored:\n{stored}"
    );
    assert!(stored.contains("sha256:"), "{stored}");
    assert_eq!(mode(&store), 0o600);

    // A second token, for another admin: accepted at once.
    let work = tempfile::tempdir().unwrap();
    let ops_file = work.path().join("ops.token");
    let out = token_cmd(
        &server,
        &["add", "ops", "--out", ops_file.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(mode(&ops_file), 0o600);
    let ops = std::fs::read_to_string(&ops_file)
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(ops.len(), 64);
    let out = list_with(&server, &ops);
    assert!(out.status.success(), "the new token: {}", text(&out));
    // Neither the store nor the listing shows it; nor is a file overwritten.
    assert!(!std::fs::read_to_string(&store).unwrap().contains(&ops));
    let out = token_cmd(&server, &["list"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains("admin") && listed.contains("ops"),
        "{listed}"
    );
    assert!(
        !listed.contains(&ops) && !listed.contains(&first),
        "{listed}"
    );
    let out = token_cmd(
        &server,
        &["add", "more", "--out", ops_file.to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("not overwriting"), "{}", text(&out));
    let out = token_cmd(&server, &["add", "ops"]);
    assert!(
        text(&out).contains("already a token named"),
        "{}",
        text(&out)
    );

    // What the store holds is not a token: its digest is refused.
    let digest = stored
        .lines()
        .find_map(|l| l.strip_prefix("sha256:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_owned();
    let out = list_with(&server, &digest);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("a valid token is required"),
        "{}",
        text(&out)
    );

    // Removed: refused from the next request on, without a restart.
    let out = token_cmd(&server, &["remove", "ops"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = list_with(&server, &ops);
    assert!(!out.status.success(), "a removed token still works");
    assert!(list_with(&server, &first).status.success());

    // A mistyped data folder: a clear error, nothing made there.
    let out = Command::new(common::BIN)
        .args(["token", "list", "--data"])
        .arg(work.path().join("nope"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("has no admin-tokens"), "{}", text(&out));

    // No token reached the log.
    let log = server.log_text();
    assert!(
        !log.contains(&first) && !log.contains(&ops),
        "a token in the log"
    );

    // A data folder of an older vstream (admin.token only): the same token
    // goes on working, and from then on only its digest is kept.
    server.stop();
    std::fs::remove_file(&store).unwrap();
    server.restart();
    assert!(list_with(&server, &first).status.success());
    let stored = std::fs::read_to_string(&store).unwrap();
    assert!(
        !stored.contains(&first) && stored.contains("admin"),
        "{stored}"
    );

    // A broken store stops the server with the file and line named.
    server.stop();
    std::fs::write(&store, "sha256:123 admin\n").unwrap();
    let out = Command::new(common::BIN)
        .args([
            "server",
            "--nbd",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
            "--data",
        ])
        .arg(&server.data)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a server started on a broken store");
    let err = text(&out);
    assert!(err.contains("admin-tokens, line 1"), "{err}");
}
