//! Refused device logins are budgeted per client address and per MAC: a scan
//! of MACs from one address, or guesses at one MAC from many, get 429 with
//! Retry-After before the server looks anything up; other clients and
//! successful logins go on.

use crate::common;

use std::process::Command;

use common::{have, have_netns, NetNs, TestServer};

const MAC: &str = "52:54:00:44:00:01";

/// POSTs a login for `mac` (with `extra` JSON fields) to `api`, run under
/// `wrap`: the status, the Retry-After header, and the body.
fn login(wrap: &[String], api: &str, mac: &str, extra: &str) -> (u16, Option<u64>, String) {
    let mut cmd = match wrap.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg("curl");
            c
        }
        None => Command::new("curl"),
    };
    let out = cmd
        .args(["-s", "-i", "-m", "20", "-X", "POST"])
        .args(["-H", "content-type: application/json", "-d"])
        .arg(format!(r#"{{"mac":"{mac}","avoid":[]{extra}}}"#))
        .arg(format!("{api}/api/v1/login"))
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let retry = text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("retry-after")
            .then(|| v.trim().parse().ok())
            .flatten()
    });
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, retry, body)
}

#[test]
fn refused_logins_are_held_back_per_address_and_per_mac() {
    if !have_netns() || !have("curl") {
        return;
    }
    let ns = NetNs::create();
    let dir = tempfile::tempdir().unwrap();
    // The server listens on the host's end of the namespace's link: the
    // namespace is one client address, the host another.
    let server = TestServer::start_wrapped(
        dir.path().join("data"),
        &ns.outside,
        &[],
        &[
            "--login-failures-per-address",
            "5",
            "--login-failures-per-mac",
            "3",
        ],
    );
    server.cli_ok(&["vdisk", "create", "root", "--size", "1MiB"]);
    server.cli_ok(&["device", "add", "pc1", "--mac", MAC, "--vdisk", "root"]);
    let inside = ns.wrap();
    let host: Vec<String> = Vec::new();

    // A scan of MACs from one address: five answers, then 429.
    for n in 0..5 {
        let (code, _, body) = login(&inside, &server.api, &format!("52:54:00:44:01:{n:02x}"), "");
        assert_eq!(code, 404, "unknown MAC {n}: {body}");
    }
    let (code, retry, body) = login(&inside, &server.api, MAC, "");
    assert_eq!(code, 429, "the sixth attempt: {body}");
    assert!(body.contains(&format!("address {}", ns.inside)), "{body}");
    let retry = retry.expect("a Retry-After header");
    assert!((1..=12).contains(&retry), "Retry-After {retry}");
    // Another address is not held back: the device's own login works.
    let (code, _, body) = login(&host, &server.api, MAC, "");
    assert!(
        code == 200 || code == 503,
        "the host's login: {code} {body}"
    );
    // Successful logins never fill a budget.
    for _ in 0..10 {
        let (code, _, body) = login(&host, &server.api, MAC, "");
        assert!(code == 200 || code == 503, "{code} {body}");
    }

    // Guesses at one MAC (bad boot identities) from an address still
    // within its own budget: the MAC's budget of three, then 429 for that
    // MAC, whoever asks.
    let bad = r#","boot":"not a boot id!""#;
    for _ in 0..3 {
        let (code, _, body) = login(&host, &server.api, MAC, bad);
        assert_eq!(code, 400, "{body}");
    }
    let (code, _, body) = login(&host, &server.api, MAC, "");
    assert_eq!(code, 429, "{body}");
    assert!(body.contains(&format!("MAC {MAC}")), "{body}");
    // Other MACs from the same address are not.
    let (code, _, body) = login(&host, &server.api, "52:54:00:44:02:01", "");
    assert_eq!(code, 404, "{body}");

    assert!(server.metric("vstream_login_throttled_total") >= 2);
    let log = server.log_text();
    assert!(
        log.contains("device requests from this address held back"),
        "{log}"
    );
    assert!(
        log.contains("device requests for this MAC held back"),
        "{log}"
    );
}
