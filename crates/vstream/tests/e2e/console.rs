//! The web console in a real browser: headless Chromium, driven over W3C
//! WebDriver by `chromedriver`, against real servers. An admin signs in,
//! sees both servers of an etcd farm, promotes a version and watches its
//! replicas turn verified, sees a device connect through the agent and its
//! write cache fill, moves it to the other server and sees its failover
//! counted, and finds the promote and the move in the audit trail; a viewer
//! sees no action, and the API refuses the same actions with 403; markup
//! in what the page shows stays text; and the devices page with 4,096
//! devices paints and filters in under a second.

use crate::common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{have, TestAgent, TestEtcd, TestServer};
use serde_json::Value;
use vstream_testkit::webdriver::{Browser, CHROMEDRIVER, CHROMIUM};

const MIB: u64 = 1 << 20;

pub(crate) fn have_browser() -> bool {
    have(CHROMIUM) && have(CHROMEDRIVER) && have("curl")
}

/// `method path` at `api` with `token` and a JSON `body`: status and body.
fn curl(api: &str, token: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(["-s", "-m", "30", "-w", "\n%{http_code}", "-X", method])
        .args(["-H", &format!("Authorization: Bearer {token}")]);
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "-d", b]);
    }
    let out = c.arg(format!("{api}{path}")).output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn create_token(s: &TestServer, name: &str, role: &str) -> String {
    s.cli_ok(&["token", "create", name, "--role", role])
        .trim()
        .to_owned()
}

/// Signs in at the console of `api` with `token`; waits for the farm page.
pub(crate) fn sign_in(b: &Browser, api: &str, token: &str) {
    b.goto(&format!("{api}/#/overview"));
    let input = b.wait(20, "#token");
    b.type_text(&input, token);
    b.click_on(5, "#login-button");
    b.wait(20, "#servers");
}

/// Opens the console's page `hash` (`#/devices`) and waits for its first
/// render.
pub(crate) fn open(b: &Browser, hash: &str) {
    b.script("location.hash = arguments[0];", vec![Value::from(hash)]);
    let view = hash.trim_start_matches("#/");
    b.wait(20, &format!("main[data-view=\"{view}\"][data-ready]"));
}

/// Clicks `selector`, then the confirmation dialog's button.
fn click_and_confirm(b: &Browser, selector: &str) {
    b.click_on(20, selector);
    let ok = b.wait(5, "dialog[open] #confirm-ok");
    b.click(&ok);
}

fn attr_of(b: &Browser, selector: &str, name: &str) -> Option<String> {
    b.find(selector).and_then(|e| b.attr(&e, name))
}

/// No element `tags` in the page, no flag set by injected script, no alert.
fn assert_nothing_injected(b: &Browser, where_: &str) {
    let found = b.script(
        "return [document.querySelectorAll('main img, main script, main iframe, main svg, main b').length, \
         window.__xss === undefined ? null : window.__xss];",
        vec![],
    );
    assert_eq!(found[0], 0, "{where_}: an injected element: {found}");
    assert!(found[1].is_null(), "{where_}: injected script ran: {found}");
    assert_eq!(b.alert_text(), None, "{where_}: an alert is open");
}

/// The console at work on a two-server etcd farm, as an admin and then as
/// a viewer.
#[test]
fn the_console_runs_a_farm_from_any_server() {
    if !have_browser() || !have("qemu-io") {
        return;
    }
    let Some(etcd) = TestEtcd::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let [s1, s2] = common::farm_of(dir.path(), &etcd, &[]);
    let admin = create_token(&s1, "root", "admin");
    let viewer = create_token(&s1, "look", "viewer");
    let operator = create_token(&s1, "ops", "operator");
    // A standard vDisk with a device cache of 8 MiB at most, a device on
    // it, and version 2 written by a maintenance device.
    let image = dir.path().join("g.raw");
    common::dense_image(&image, 16 * MIB, 7);
    s1.cli_ok(&["vdisk", "import", "g", image.to_str().expect("path")]);
    s1.cli_ok(&[
        "vdisk",
        "set",
        "g",
        "--mode",
        "standard",
        "--cache-type",
        "device",
        "--cache-limit",
        "8MiB",
    ]);
    common::wait_farm_ready(&s1, 2);
    s1.cli_ok(&[
        "device",
        "add",
        "pc1",
        "--mac",
        "52:54:00:00:20:01",
        "--vdisk",
        "g",
    ]);
    s1.cli_ok(&[
        "device",
        "add",
        "m",
        "--mac",
        "52:54:00:00:20:99",
        "--vdisk",
        "g",
        "--type",
        "maintenance",
    ]);
    s1.cli_ok(&["version", "new", "g"]);
    common::run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 1M 256k",
            &s1.url("device/m"),
        ],
    );
    common::wait_for(20, "m to disconnect", || {
        let v: Value = serde_json::from_str(&s1.cli_ok(&["device", "show", "m", "--json"])).ok()?;
        (v["connected"] == false).then_some(())
    });

    let b = Browser::start();
    // Signed in at the first server (the one version 2 was written on:
    // an open version is listed by its server only, until it is sealed).
    sign_in(&b, &s1.api, &admin);
    let who = b.text(&b.wait(5, "#who"));
    assert!(who.contains("root (admin) at s1"), "{who}");
    for s in ["s1", "s2"] {
        b.wait_for(20, &format!("server {s} up"), || {
            let row = b.find(&format!("#servers tr[data-server=\"{s}\"]"))?;
            b.text(&row).contains("up").then_some(())
        });
    }
    assert!(b.find("#rebalance").is_some(), "an admin may rebalance");

    // Promote version 2 to production from its vDisk page; its cells turn
    // verified on both servers.
    open(&b, "#/vdisk/g");
    let before: Vec<String> = ["s1", "s2"]
        .iter()
        .map(|s| {
            attr_of(&b, &format!("td[data-cell=\"g/2/{s}\"]"), "data-state").unwrap_or_default()
        })
        .collect();
    let promoted_at = Instant::now();
    click_and_confirm(
        &b,
        "#versions tr[data-version=\"2\"] button[data-action=\"promote-production\"]",
    );
    b.wait_for(30, "version 2 in production on the page", || {
        let row = b.find("#versions tr[data-version=\"2\"]")?;
        b.text(&row).contains("production").then_some(())
    });
    for s in ["s1", "s2"] {
        b.wait_for(60, &format!("g/2 verified on {s}"), || {
            (attr_of(&b, &format!("td[data-cell=\"g/2/{s}\"]"), "data-state")? == "verified")
                .then_some(())
        });
    }
    eprintln!(
        "console: g/2 cells before the promote {before:?}, verified on both {:.1} s after it",
        promoted_at.elapsed().as_secs_f64()
    );
    assert!(
        b.find("#versions tr[data-version=\"2\"] button[data-action=\"promote-production\"]")
            .is_none(),
        "a production version offers no promote to production"
    );

    // A device connects through the agent; its write cache fills.
    open(&b, "#/devices");
    let agent = TestAgent::start(
        dir.path(),
        "pc1",
        "52:54:00:00:20:01",
        &[&s1.api, &s2.api],
        "ram:64MiB",
    );
    let connected_at = Instant::now();
    b.wait_for(20, "pc1 connected on the devices page", || {
        b.find("#devices tr[data-device=\"pc1\"][data-state=\"connected\"]")
    });
    eprintln!(
        "console: pc1 shown connected {:.1} s after its agent served",
        connected_at.elapsed().as_secs_f64()
    );
    let fill = |b: &Browser| -> Option<f64> {
        attr_of(b, "#devices tr[data-device=\"pc1\"] td.fill", "data-fill")?
            .parse()
            .ok()
    };
    let first = b.wait_for(10, "pc1's fill", || fill(&b));
    let url = format!("nbd+unix:///?socket={}", agent.sock.display());
    common::run("qemu-io", &["-f", "raw", "-c", "write -P 0x33 0 7M", &url]);
    let written_at = Instant::now();
    let later = b.wait_for(30, "pc1's cache fill to grow", || {
        fill(&b).filter(|f| *f > first + 50.0)
    });
    eprintln!(
        "console: pc1's cache fill {first} % -> {later} % on the page {:.1} s after the write",
        written_at.elapsed().as_secs_f64()
    );
    // Over 80 % of its limit: the row stands out.
    let class = attr_of(&b, "#devices tr[data-device=\"pc1\"]", "class").unwrap_or_default();
    assert!(later > 80.0 && class.contains("hot"), "{later} % {class:?}");
    // Its own page: where it runs, and its connect among its events.
    open(&b, "#/device/pc1");
    let server = b.text(&b.wait(10, "dd[data-key=\"server\"]"));
    assert!(server == "s1" || server == "s2", "pc1's server: {server:?}");
    b.wait_for(20, "pc1's connect event", || {
        b.all("#events tbody tr")
            .into_iter()
            .find(|r| b.text(r).contains("connect"))
    });

    // Its retries and failovers are columns of the list.
    open(&b, "#/devices");
    let count = |b: &Browser, what: &str| -> Option<u64> {
        let cell = format!("#devices tr[data-device=\"pc1\"] td[data-{what}]");
        attr_of(b, &cell, &format!("data-{what}"))?.parse().ok()
    };
    let failovers_before = b.wait_for(10, "pc1's failovers column", || count(&b, "failovers"));
    let retries = count(&b, "retries").expect("pc1's retries column");
    let heads: Vec<String> = b
        .all("#devices thead th")
        .iter()
        .map(|e| b.text(e))
        .collect();
    assert!(
        heads.iter().any(|h| h == "retries") && heads.iter().any(|h| h == "failovers"),
        "{heads:?}"
    );
    // The API refuses a move it cannot make, with a sentence.
    for (body, device, code, says) in [
        (
            r#"{"server":"nosuch"}"#,
            "pc1",
            400,
            "not a server of this farm",
        ),
        (r#"{"server":"s1"}"#, "m", 409, "not connected"),
    ] {
        let path = format!("/api/v1/devices/{device}/move");
        let (got, text) = curl(&s1.api, &admin, "POST", &path, Some(body));
        assert_eq!(got, code, "{path} {body}: {text}");
        assert!(text.contains(says), "{path} {body}: {text}");
    }
    // Move it to the other server: the dialog offers the server holding a
    // verified copy of its version, and the agent fails over there.
    let on = |b: &Browser| -> Option<String> {
        let t = b.text(&b.find("#devices tr[data-device=\"pc1\"] td.server")?);
        (t == "s1" || t == "s2").then_some(t)
    };
    let from = b.wait_for(10, "pc1's server on the devices page", || on(&b));
    let to = if from == "s1" { "s2" } else { "s1" };
    let (got, text) = curl(
        &s1.api,
        &admin,
        "POST",
        "/api/v1/devices/pc1/move",
        Some(&format!(r#"{{"server":"{from}"}}"#)),
    );
    assert!(got == 409 && text.contains("already"), "{got} {text}");
    b.click_on(
        10,
        "#devices tr[data-device=\"pc1\"] button[data-action=\"move\"]",
    );
    let says = b.text(&b.wait(5, "dialog[open] #confirm-body"));
    assert!(
        says.contains(&format!("verified copy of that version: {to} (load")),
        "{says}"
    );
    let offered: Vec<String> = b
        .all("dialog[open] select[name=\"server\"] option")
        .iter()
        .map(|o| b.text(o))
        .collect();
    assert_eq!(offered, [to], "{says}");
    let moved_at = Instant::now();
    b.click_on(5, "dialog[open] #confirm-ok");
    // The device is idle: its agent leaves the connection its server let
    // go at once, not at its next read.
    common::wait_for(30, "the agent to fail over to the other server", || {
        (agent.streaming_from() == to).then_some(())
    });
    let agent_at = moved_at.elapsed().as_secs_f64();
    b.wait_for(30, "pc1 on the other server on the page", || {
        (on(&b)? == to).then_some(())
    });
    let failovers = b.wait_for(30, "pc1's failover counted in the list", || {
        count(&b, "failovers").filter(|n| *n > failovers_before)
    });
    eprintln!(
        "console: pc1 moved {from} -> {to}: the agent there {agent_at:.1} s, the page {:.1} s \
         after the click; failovers {failovers_before} -> {failovers}, retries {retries}",
        moved_at.elapsed().as_secs_f64()
    );
    // Its write cache went with it: what it wrote reads back.
    let read = common::run("qemu-io", &["-f", "raw", "-c", "read -P 0x33 0 7M", &url]);
    assert!(!read.contains("failed"), "{read}");
    // Its page: the move among its events, by the token that made it.
    open(&b, "#/device/pc1");
    b.wait_for(20, "pc1's move event", || {
        b.all("#events tbody tr").into_iter().find(|r| {
            let t = b.text(r);
            t.contains("move") && t.contains(&format!("from {from} to {to} by root"))
        })
    });
    // And back with the CLI, which waits until it is there.
    let said = s2.cli_ok(&["device", "move", "pc1", "--to", &from]);
    assert!(
        said.contains(&format!("moved device pc1 from {to} to {from} in")),
        "{said}"
    );
    assert_eq!(agent.streaming_from(), from, "{}", agent.log_text());

    // The farm's tokens, for an admin.
    open(&b, "#/tokens");
    for t in ["root", "look"] {
        b.wait(10, &format!("tr[data-token=\"{t}\"]"));
    }

    // The promote in the audit trail, by the token that made it.
    open(&b, "#/audit");
    b.type_text(&b.wait(5, "#audit-q"), "promote");
    let row = b.wait_for(20, "the promote's audit entry", || {
        b.all("#audit tr[data-object=\"vdisk/g\"][data-method=\"POST\"]")
            .into_iter()
            .map(|r| b.text(&r))
            .find(|t| t.contains("/api/v1/vdisks/g/versions/2/promote"))
    });
    assert!(
        row.contains("root") && row.contains("to=production") && row.contains("200"),
        "{row}"
    );
    let input = b.wait(5, "#audit-q");
    b.clear(&input);
    b.type_text(&input, "pc1/move");
    let row = b.wait_for(20, "the move's audit entry", || {
        b.all("#audit tr[data-object=\"device/pc1\"][data-method=\"POST\"]")
            .into_iter()
            .map(|r| b.text(&r))
            .find(|t| t.contains("202") && t.contains(&format!("server={to}")))
    });
    assert!(
        row.contains("root") && row.contains(&format!("server={to}")),
        "{row}"
    );

    // Markup where the page shows what callers sent: a device named with
    // an <img> (refused, but recorded with its name) and a kernel command
    // line holding a <script>.
    let evil = r#"<img src=x onerror="window.__xss=1;alert(1)">"#;
    let body = serde_json::json!({"name": evil, "mac": "52:54:00:00:20:66", "vdisk": "g"});
    let (code, _) = curl(
        &s1.api,
        &admin,
        "POST",
        "/api/v1/devices",
        Some(&body.to_string()),
    );
    assert_eq!(code, 400, "a device named with markup");
    let script = r#"quiet <script>window.__xss=2;alert(2)</script><b>bold</b>"#;
    let body = serde_json::json!({ "cmdline": script });
    let (code, text) = curl(
        &s1.api,
        &admin,
        "PUT",
        "/api/v1/vdisks/g/boot/cmdline",
        Some(&body.to_string()),
    );
    let cmdline_set = code == 200;
    eprintln!("console: the command line with a script: {code} {text}");
    let input = b.wait(5, "#audit-q");
    b.clear(&input);
    b.type_text(&input, "onerror");
    let shown = b.wait_for(20, "the refused device in the trail", || {
        b.all("#audit tbody tr")
            .into_iter()
            .map(|r| b.text(&r))
            .find(|t| t.contains(evil))
    });
    assert!(shown.contains("400"), "{shown}");
    assert_nothing_injected(&b, "the audit page");
    if cmdline_set {
        open(&b, "#/vdisk/g");
        let dd = b.wait_for(20, "the command line", || {
            let dd = b.find("dd[data-key=\"command line\"]").or_else(|| {
                b.all("dl.kv dd")
                    .into_iter()
                    .find(|e| b.text(e).contains("quiet"))
            })?;
            Some(b.text(&dd))
        });
        assert!(dd.contains(script), "{dd}");
        assert_nothing_injected(&b, "the vDisk page");
    }

    // The vDisk's settings: its sectors shown, and a boot method changed
    // under a connected device (the form sends only what changed; a mode
    // would be refused while pc1 is connected).
    open(&b, "#/vdisk/g");
    let sectors = b.text(&b.wait(20, "dd[data-key=\"sectors\"]"));
    assert_eq!(sectors, "512 bytes (512n)");
    b.click_on(10, "#vdisk-settings");
    b.wait(5, "dialog[open] select[name=\"boot\"]");
    b.script(
        "const s = document.querySelector('dialog[open] select[name=\"boot\"]'); \
         s.value = 'sanboot'; s.dispatchEvent(new Event('change'));",
        vec![],
    );
    b.click_on(5, "dialog[open] #confirm-ok");
    b.wait_for(20, "the boot method sanboot on the vDisk page", || {
        let dd = b.find("dd[data-key=\"boot\"]")?;
        b.text(&dd).starts_with("sanboot").then_some(())
    });
    let (code, text) = curl(
        &s1.api,
        &admin,
        "PATCH",
        "/api/v1/vdisks/g",
        Some(r#"{"boot":"kernel"}"#),
    );
    assert_eq!(code, 200, "{text}");

    // A viewer, at the second server: the same farm, no action anywhere,
    // and the API refuses the actions.
    b.click_on(5, "#logout");
    sign_in(&b, &s2.api, &viewer);
    let who = b.text(&b.wait(5, "#who"));
    assert!(who.contains("look (viewer) at s2"), "{who}");
    for s in ["s1", "s2"] {
        b.wait_for(20, &format!("server {s} up, seen from s2"), || {
            let row = b.find(&format!("#servers tr[data-server=\"{s}\"]"))?;
            b.text(&row).contains("up").then_some(())
        });
    }
    let devices = b.text(&b.wait(5, "#servers tr[data-server=\"s1\"]"));
    eprintln!("console: s1 seen from s2: {devices}");
    let nav = b.text(&b.wait(5, "#nav"));
    assert!(
        !nav.contains("Tokens"),
        "a viewer sees the tokens page: {nav}"
    );
    assert!(
        b.find("#rebalance").is_none(),
        "a viewer offered a rebalance"
    );
    open(&b, "#/vdisk/g");
    b.wait(10, "#versions tr[data-version=\"2\"]");
    for page in [
        "#/vdisk/g",
        "#/devices",
        "#/replication",
        "#/stores",
        "#/vdisks",
    ] {
        open(&b, page);
        let buttons: Vec<String> = b
            .all("main button")
            .iter()
            .map(|e| b.text(e))
            .filter(|t| !t.contains("previous") && !t.contains("next"))
            .collect();
        assert!(buttons.is_empty(), "{page} offers a viewer {buttons:?}");
    }
    open(&b, "#/devices");
    b.wait(20, "#devices tr[data-device=\"pc1\"]");
    for (method, path, body) in [
        (
            "POST",
            "/api/v1/vdisks/g/versions/1/promote",
            Some(r#"{"to":"test"}"#),
        ),
        ("POST", "/api/v1/vdisks/g/versions", None),
        ("POST", "/api/v1/vdisks/g/rollback", None),
        ("POST", "/api/v1/vdisks/g/merge", Some("{}")),
        ("DELETE", "/api/v1/vdisks/g/versions/1", None),
        ("PATCH", "/api/v1/vdisks/g", Some(r#"{"mode":"private"}"#)),
        ("POST", "/api/v1/devices/pc1/reset", None),
        (
            "POST",
            "/api/v1/devices/pc1/move",
            Some(r#"{"server":"s1"}"#),
        ),
        ("PATCH", "/api/v1/devices/pc1", Some(r#"{"type":"test"}"#)),
        ("DELETE", "/api/v1/devices/pc1", None),
        ("POST", "/api/v1/farm/rebalance", Some("{}")),
        ("GET", "/api/v1/tokens", None),
    ] {
        let (code, text) = curl(&s2.api, &viewer, method, path, body);
        assert_eq!(code, 403, "{method} {path} as a viewer: {text}");
        assert!(text.contains("viewer"), "{text}");
    }
    // An operator: the device actions, none on vDisks or versions.
    b.click_on(5, "#logout");
    sign_in(&b, &s2.api, &operator);
    assert!(b.find("#rebalance").is_some(), "an operator may rebalance");
    open(&b, "#/devices");
    for action in ["reset", "move"] {
        b.wait(
            20,
            &format!("#devices tr[data-device=\"pc1\"] button[data-action=\"{action}\"]"),
        );
    }
    open(&b, "#/vdisk/g");
    b.wait(10, "#versions tr[data-version=\"2\"]");
    let offered: Vec<String> = b
        .all("#versions button, #version-new, #vdisk-settings, #vdisk-delete")
        .iter()
        .map(|e| b.text(e))
        .collect();
    assert!(offered.is_empty(), "an operator offered {offered:?}");

    // The page's polls are conditional: an unchanged answer is a bodiless 304.
    let headers = |extra: &[&str]| -> String {
        let out = Command::new("curl")
            .args(["-s", "-m", "20", "-D", "-", "-o", "/dev/null"])
            .args(["-H", &format!("Authorization: Bearer {viewer}")])
            .args(extra)
            .arg(format!("{}/api/v1/vdisks/g/versions", s2.api))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).to_ascii_lowercase()
    };
    let first = headers(&[]);
    let tag = first
        .lines()
        .find_map(|l| l.strip_prefix("etag:"))
        .map(|t| t.trim().to_owned())
        .unwrap_or_else(|| panic!("no ETag: {first}"));
    let again = headers(&["-H", &format!("If-None-Match: {tag}")]);
    assert!(again.starts_with("http/1.1 304"), "{again}");
    drop(b);
    drop(agent);
}

/// The devices page with 4,096 devices: the first paint, a search, a
/// filter and a sort, each timed inside the page (performance.now(), up to the frame
/// after the DOM changed) and around the WebDriver calls.
#[test]
fn the_devices_page_is_quick_with_4096_devices() {
    if !have_browser() {
        return;
    }
    const N: usize = 4096;
    let s = TestServer::start();
    let token = s.token();
    s.cli_ok(&["vdisk", "create", "g", "--size", "16M"]);
    s.cli_ok(&[
        "vdisk",
        "set",
        "g",
        "--mode",
        "standard",
        "--cache-limit",
        "1GiB",
    ]);
    let added = Instant::now();
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build();
    std::thread::scope(|scope| {
        for part in 0..4 {
            let (agent, api, token) = (&agent, &s.api, &token);
            scope.spawn(move || {
                for i in (part..N).step_by(4) {
                    let kind = match i % 8 {
                        0 => "test",
                        _ => "production",
                    };
                    let body = serde_json::json!({
                        "name": format!("pc{i:04}"),
                        "mac": format!("52:54:00:01:{:02x}:{:02x}", i >> 8, i & 0xff),
                        "vdisk": "g",
                        "type": kind,
                    });
                    agent
                        .post(&format!("{api}/api/v1/devices"))
                        .set("Authorization", &format!("Bearer {token}"))
                        .send_json(body)
                        .unwrap_or_else(|e| panic!("adding device {i}: {e}"));
                }
            });
        }
    });
    eprintln!(
        "console: {N} devices added in {:.1} s",
        added.elapsed().as_secs_f64()
    );
    // What one poll of the page costs the server: the whole list, as JSON.
    let t = Instant::now();
    let list = agent
        .get(&format!("{}/api/v1/devices", s.api))
        .set("Authorization", &format!("Bearer {token}"))
        .call()
        .expect("the device list")
        .into_string()
        .expect("its body");
    eprintln!(
        "console: GET /api/v1/devices with {N} devices: {} KiB in {:.0} ms",
        list.len() / 1024,
        t.elapsed().as_secs_f64() * 1000.0
    );
    let b = Browser::start();
    sign_in(&b, &s.api, &token);
    let shown =
        |b: &Browser| attr_of(b, "#count", "data-shown").and_then(|v| v.parse::<usize>().ok());

    let t = Instant::now();
    b.script("location.hash = '#/devices';", vec![]);
    b.wait_for(20, "all devices counted", || {
        (shown(&b)? == N).then_some(())
    });
    let rows = b.all("#devices tbody tr").len();
    let paint_wall = t.elapsed().as_secs_f64() * 1000.0;
    let paint = b.wait_for(5, "the first paint time", || {
        b.script("return window.vstreamTimings.firstPaintMs;", vec![])
            .as_f64()
    });
    assert!(rows > 0 && rows <= 200, "{rows} rows on the first page");

    // A search: every key typed filters again; the last one is timed.
    let t = Instant::now();
    b.type_text(&b.wait(5, "#f-q"), "pc40");
    b.wait_for(20, "the search's devices", || {
        (shown(&b)? == 96).then_some(())
    });
    let search_wall = t.elapsed().as_secs_f64() * 1000.0;
    let search = b
        .script("return window.vstreamTimings.filterMs;", vec![])
        .as_f64()
        .unwrap_or(f64::NAN);
    b.clear(&b.wait(5, "#f-q"));
    b.script(
        "const q = document.getElementById('f-q'); q.dispatchEvent(new Event('input'));",
        vec![],
    );
    b.wait_for(20, "every device again", || (shown(&b)? == N).then_some(()));

    // A filter over all 4,096: the test devices.
    let t = Instant::now();
    b.click_on(5, "#f-type option[value=\"test\"]");
    b.wait_for(20, "the test devices", || {
        (shown(&b)? == N / 8).then_some(())
    });
    let filter_wall = t.elapsed().as_secs_f64() * 1000.0;
    let filter = b
        .script("return window.vstreamTimings.filterMs;", vec![])
        .as_f64()
        .unwrap_or(f64::NAN);
    // Sorted by failovers (a column of its own), over the 512 test devices.
    b.script("window.vstreamTimings.filterMs = null;", vec![]);
    let t = Instant::now();
    b.click_on(5, "#devices th[data-sort=\"failovers\"]");
    let sort = b.wait_for(20, "the sort's paint", || {
        b.script("return window.vstreamTimings.filterMs;", vec![])
            .as_f64()
    });
    let sort_wall = t.elapsed().as_secs_f64() * 1000.0;
    let by = b.script("return document.getElementById('f-sort').value;", vec![]);
    assert_eq!(by, "failovers");
    assert_eq!(shown(&b), Some(N / 8), "the sort keeps the filter");
    let cells = b.all("#devices tbody td[data-failovers]").len();
    assert!(cells > 0 && cells <= 200, "{cells} failovers cells");
    let parts = b.script("return window.vstreamTimings;", vec![]);
    eprintln!(
        "console: the page's devices poll {:.0} ms (3 GETs and JSON), its render {:.0} ms",
        parts["devicesLoadMs"].as_f64().unwrap_or(f64::NAN),
        parts["devicesRenderMs"].as_f64().unwrap_or(f64::NAN)
    );
    eprintln!(
        "console timings, {N} devices (in the page / around WebDriver): first paint {paint:.0} / {paint_wall:.0} ms; \
         search {search:.0} / {search_wall:.0} ms (4 keys); type filter {filter:.0} / {filter_wall:.0} ms; \
         sort by failovers {sort:.0} / {sort_wall:.0} ms"
    );
    for (what, ms) in [
        ("first paint", paint),
        ("search", search),
        ("filter", filter),
        ("sort", sort),
    ] {
        assert!(ms < 1000.0, "{what} took {ms:.0} ms with {N} devices");
    }
}
