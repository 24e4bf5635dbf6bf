//! Roles and the audit trail, against real servers: every route of the
//! OpenAPI document checks its role, and every change and refusal lands in
//! the farm's audit trail, the same from every server and across restarts.

use crate::common;

use std::process::Command;

use common::{have, TestEtcd, TestServer};

/// The routes devices call without a token.
const PUBLIC: [&str; 4] = [
    "/api/v1/login",
    "/api/v1/enroll",
    "/api/v1/renew",
    "/api/v1/cache-report",
];

/// The role each route needs, written out here apart from the server's
/// table: reads need a viewer but secrets and whole disks an admin;
/// changes need an admin but device actions, rebalance and replication an
/// operator.
fn expected(method: &str, path: &str) -> &'static str {
    let admin_reads = [
        "/api/v1/devices/{name}/iscsi",
        "/api/v1/tokens",
        "/api/v1/vdisks/{name}/content",
    ];
    let operator = [
        ("post", "/api/v1/devices"),
        ("patch", "/api/v1/devices/{name}"),
        ("delete", "/api/v1/devices/{name}"),
        ("post", "/api/v1/devices/{name}/reset"),
        ("post", "/api/v1/devices/{name}/move"),
        ("post", "/api/v1/devices/{name}/revoke"),
        ("post", "/api/v1/farm/rebalance"),
        ("post", "/api/v1/replication/start"),
    ];
    match method {
        "get" if admin_reads.contains(&path) => "admin",
        "get" => "viewer",
        _ if operator.contains(&(method, path)) => "operator",
        _ => "admin",
    }
}

const RANK: [&str; 4] = ["metrics", "viewer", "operator", "admin"];

fn rank(role: &str) -> usize {
    RANK.iter().position(|r| *r == role).expect("a role")
}

/// The status of `method path` with `token` (none: no header), an empty
/// JSON body for changes.
fn status(api: &str, method: &str, path: &str, token: Option<&str>) -> u16 {
    let mut c = Command::new("curl");
    c.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "20"])
        .args(["-X", &method.to_uppercase()]);
    if let Some(t) = token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    if method != "get" {
        c.args(["-H", "Content-Type: application/json", "-d", "{}"]);
    }
    let out = c.arg(format!("{api}{path}")).output().expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn create_token(s: &TestServer, name: &str, role: &str) -> String {
    s.cli_ok(&["token", "create", name, "--role", role])
        .trim()
        .to_owned()
}

/// Every route × every role, from the OpenAPI document: a route a role may
/// not call answers 403, one it may never answers 401 or 403, and without
/// a token every route but the devices' own answers 401. A route added
/// without a role check fails here.
#[test]
fn every_route_checks_its_role() {
    if !have("curl") {
        return;
    }
    let s = TestServer::start();
    let tokens: Vec<(&str, String)> = RANK
        .iter()
        .map(|r| (*r, create_token(&s, &format!("t-{r}"), r)))
        .collect();
    let doc = common::run("curl", &["-sf", &format!("{}/api/v1/openapi.json", s.api)]);
    let doc: serde_json::Value = serde_json::from_str(&doc).expect("the OpenAPI document");
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() >= 30, "{} paths", paths.len());
    let mut wrong = Vec::new();
    let mut public_seen = Vec::new();
    for (template, ops) in paths {
        let path = template
            .replace("{name}", "nosuch")
            .replace("{version}", "1")
            .replace("{file}", "kernel");
        for method in ops.as_object().expect("operations").keys() {
            if PUBLIC.contains(&template.as_str()) {
                public_seen.push(template.clone());
                continue;
            }
            let need = expected(method, template);
            let none = status(&s.api, method, &path, None);
            if none != 401 {
                wrong.push(format!("{method} {template} without a token: {none}"));
            }
            let bad = status(&s.api, method, &path, Some("not-a-token-at-all"));
            if bad != 401 {
                wrong.push(format!("{method} {template} with a forged token: {bad}"));
            }
            for (role, token) in &tokens {
                let got = status(&s.api, method, &path, Some(token));
                let may = rank(role) >= rank(need);
                let refused = got == 401 || got == 403;
                if may == refused || (!may && got != 403) {
                    wrong.push(format!(
                        "{method} {template} as {role} (needs {need}): {got}"
                    ));
                }
            }
        }
    }
    public_seen.sort();
    public_seen.dedup();
    assert_eq!(public_seen.len(), PUBLIC.len(), "{public_seen:?}");
    // /metrics: the metrics role and up.
    for (role, token) in &tokens {
        let got = status(&s.api, "get", "/metrics", Some(token));
        assert_eq!(got, 200, "/metrics as {role}");
    }
    assert_eq!(status(&s.api, "get", "/metrics", None), 401);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // An expired token opens nothing.
    let out = s.cli_ok(&[
        "token",
        "create",
        "brief",
        "--role",
        "admin",
        "--expires",
        "1s",
    ]);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    assert_eq!(
        status(&s.api, "get", "/api/v1/devices", Some(out.trim())),
        401
    );
}

/// The trail of a two-server farm: changes and refusals made at either
/// server, read the same from both, across a restart; no token in it.
#[test]
fn the_audit_trail_is_the_farms_and_survives_a_restart() {
    if !have("curl") {
        return;
    }
    let Some(etcd) = TestEtcd::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut servers: [TestServer; 2] = common::farm_of(dir.path(), &etcd, &[]);
    let op = create_token(&servers[0], "ops", "operator");
    let viewer = create_token(&servers[0], "look", "viewer");
    servers[0].cli_ok(&["vdisk", "create", "win", "--size", "16M"]);
    // The operator, at the second server: a device, then a vDisk it may not make.
    let as_token = |s: &TestServer, token: &str, args: &[&str]| common::cli_as(&s.api, token, args);
    let added = as_token(
        &servers[1],
        &op,
        &[
            "device",
            "add",
            "pc1",
            "--mac",
            "52:54:00:00:05:01",
            "--vdisk",
            "win",
        ],
    );
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let refused = as_token(&servers[1], &op, &["vdisk", "create", "x", "--size", "1M"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("needs admin"));
    let refused = as_token(&servers[0], &viewer, &["device", "remove", "pc1"]);
    assert!(!refused.status.success());

    let trail = |s: &TestServer| -> Vec<serde_json::Value> {
        let out = s.cli_ok(&["audit", "list", "--json"]);
        serde_json::from_str(&out).expect("JSON")
    };
    let a = trail(&servers[0]);
    assert_eq!(a, trail(&servers[1]), "the servers' trails differ");
    let find = |who: &str, method: &str, path: &str, status: u64| {
        a.iter()
            .find(|e| {
                e["who"] == who
                    && e["method"] == method
                    && e["path"] == path
                    && e["status"] == status
            })
            .unwrap_or_else(|| panic!("no {who} {method} {path} {status} in {a:#?}"))
            .clone()
    };
    let add = find("ops", "POST", "/api/v1/devices", 201);
    assert_eq!(add["server"], "s2");
    assert_eq!(add["object"], "device/pc1");
    assert!(add["summary"]
        .as_str()
        .unwrap_or("")
        .contains("mac=52:54:00:00:05:01"));
    let no = find("ops", "POST", "/api/v1/vdisks", 403);
    assert!(no["result"].as_str().unwrap_or("").contains("needs admin"));
    find("look", "DELETE", "/api/v1/devices/pc1", 403);
    let made = find("admin", "POST", "/api/v1/tokens", 201);
    assert!(made["summary"]
        .as_str()
        .unwrap_or("")
        .contains("role=operator"));
    let text = serde_json::to_string(&a).expect("JSON");
    assert!(
        !text.contains(&op) && !text.contains(&viewer),
        "a token in the trail"
    );

    servers[0].stop();
    servers[0].restart();
    assert_eq!(trail(&servers[0]), trail(&servers[1]));
    assert!(trail(&servers[0]).len() >= a.len());
    let objects = servers[1].cli_ok(&["audit", "list", "--object", "device/pc1"]);
    assert!(
        objects.contains("POST /api/v1/devices") && !objects.contains("/api/v1/vdisks"),
        "{objects}"
    );
}

/// The metric names in `text` (`vstream_...`), each once.
fn metric_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("vstream_") && w.len() > 8)
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The shipped alerts and dashboard: promtool passes the rules and their
/// unit tests; every metric they name is one a server serves, on
/// `--metrics` without a token (and on the API only with one); a Standard
/// device's cache fill shows while it is connected.
#[test]
fn the_shipped_alerts_and_dashboard_name_what_servers_serve() {
    if !have("promtool") || !have("curl") || !have("qemu-io") {
        return;
    }
    let dist = common::repo().join("dist");
    let rules = dist.join("prometheus");
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts_test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(&rules)
            .output()
            .expect("promtool");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let [port] = vstream_testkit::free_ports::<1>();
    let s = TestServer::start_fresh_with(&["--metrics", &format!("127.0.0.1:{port}")]);
    s.cli_ok(&["vdisk", "create", "std", "--size", "8M"]);
    s.cli_ok(&[
        "vdisk",
        "set",
        "std",
        "--mode",
        "standard",
        "--cache-limit",
        "1M",
    ]);
    s.cli_ok(&[
        "device",
        "add",
        "pc1",
        "--mac",
        "52:54:00:00:06:01",
        "--vdisk",
        "std",
    ]);
    // A Standard device writes half its cache limit, and stays connected.
    let mut held = Command::new("qemu-io")
        .args(["-f", "raw", &s.url("device/pc1")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io");
    {
        use std::io::Write;
        let stdin = held.stdin.as_mut().expect("stdin");
        writeln!(stdin, "write -P 0x11 0 512k").expect("write");
        writeln!(stdin, "flush").expect("flush");
    }
    let scrape = || {
        common::run(
            "curl",
            &["-sf", &format!("http://127.0.0.1:{port}/metrics")],
        )
    };
    let text = common::wait_for(15, "the cache fill of pc1", || {
        let t = scrape();
        t.lines()
            .find_map(|l| l.strip_prefix("vstream_device_cache_fill_ratio{device=\"pc1\"} "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| *v >= 0.4)
            .map(|_| t)
    });
    let out = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(
            std::fs::File::open({
                let p = s.data.join("scrape.txt");
                std::fs::write(&p, &text).expect("scrape");
                p
            })
            .expect("scrape"),
        )
        .output()
        .expect("promtool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(text.contains("vstream_farm_state_connected 1"), "{text}");
    assert!(text.contains("vstream_devices_connected 1"), "{text}");
    let served: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect();
    let alerts = std::fs::read_to_string(rules.join("alerts.yml")).expect("alerts");
    let dashboard = std::fs::read_to_string(dist.join("grafana/vstream.json")).expect("dashboard");
    serde_json::from_str::<serde_json::Value>(&dashboard).expect("the dashboard is JSON");
    for name in metric_names(&alerts)
        .into_iter()
        .chain(metric_names(&dashboard))
    {
        assert!(served.contains(&name), "{name} is named but not served");
    }
    // The API's /metrics still wants a token.
    let api = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("{}/metrics", s.api))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&api.stdout), "401");
    // The metrics address serves nothing else.
    let other = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://127.0.0.1:{port}/api/v1/devices"))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&other.stdout), "404");
    let _ = held.kill();
    let _ = held.wait();
}

/// Device events: a connect, a cache past 80 %, a cut-off disconnect and a
/// failover login of one device, a refusal of another, each kept in the
/// farm state (`vstream device events`), counted on /metrics, and logged.
#[test]
fn device_events_are_kept_counted_and_shown() {
    if !have("qemu-io") || !have("nbdinfo") || !have("curl") {
        return;
    }
    let s = TestServer::start();
    s.cli_ok(&["vdisk", "create", "std", "--size", "8M"]);
    s.cli_ok(&[
        "vdisk",
        "set",
        "std",
        "--mode",
        "standard",
        "--cache-limit",
        "1M",
    ]);
    s.cli_ok(&["vdisk", "create", "priv", "--size", "8M"]);
    s.cli_ok(&["vdisk", "set", "priv", "--mode", "private"]);
    for (d, mac, v) in [
        ("pc1", "52:54:00:00:07:01", "std"),
        ("pc2", "52:54:00:00:07:02", "priv"),
        ("pc3", "52:54:00:00:07:03", "priv"),
    ] {
        s.cli_ok(&["device", "add", d, "--mac", mac, "--vdisk", v]);
    }
    let hold = |export: &str, cmds: &[&str]| {
        let mut c = Command::new("qemu-io")
            .args(["-f", "raw", &s.url(export)])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("qemu-io");
        use std::io::Write;
        let stdin = c.stdin.as_mut().expect("stdin");
        for cmd in cmds {
            writeln!(stdin, "{cmd}").expect("qemu-io command");
        }
        c
    };
    let events = |d: &str| -> Vec<serde_json::Value> {
        serde_json::from_str(&s.cli_ok(&["device", "events", d, "--json"])).expect("JSON")
    };
    let kinds = |d: &str| -> Vec<String> {
        events(d)
            .iter()
            .map(|e| e["kind"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    let mut pc1 = hold("device/pc1", &["write -P 0x22 0 900k", "flush"]);
    let mut pc2 = hold("device/pc2", &[]);
    common::wait_for(15, "pc1's cache noticed", || {
        kinds("pc1")
            .contains(&"cache_full".to_string())
            .then_some(())
    });
    common::wait_for(15, "pc2 connected", || {
        kinds("pc2").contains(&"connect".to_string()).then_some(())
    });
    // pc3 shares pc2's Private vDisk: refused while pc2 has it.
    let o = Command::new("nbdinfo")
        .arg(s.url("device/pc3"))
        .output()
        .expect("nbdinfo");
    assert!(!o.status.success());
    // pc1 loses power: its connection is cut.
    let _ = pc1.kill();
    let _ = pc1.wait();
    // It logs in again, avoiding a server that failed it.
    let login = common::run(
        "curl",
        &[
            "-sf",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"mac":"52:54:00:00:07:01","avoid":["gone-server"]}"#,
            &format!("{}/api/v1/login", s.api),
        ],
    );
    assert!(login.contains("pc1"), "{login}");
    common::wait_for(15, "pc1's events", || {
        let k = kinds("pc1");
        ["connect", "cache_full", "disconnect", "failover"]
            .iter()
            .all(|w| k.contains(&w.to_string()))
            .then_some(())
    });
    let e1 = events("pc1");
    for (kind, says) in [
        ("cache_full", "80 %"),
        ("disconnect", "cut off"),
        ("failover", "gone-server"),
    ] {
        let e = e1.iter().find(|e| e["kind"] == kind).expect(kind);
        assert!(e["detail"].as_str().unwrap_or("").contains(says), "{e}");
    }
    common::wait_for(15, "pc3's refusal", || {
        events("pc3")
            .iter()
            .any(|e| {
                e["kind"] == "refusal" && e["detail"].as_str().unwrap_or("").contains("Private")
            })
            .then_some(())
    });
    // The device list counts them for every device, in one answer.
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&s.cli_ok(&["device", "list", "--json"])).expect("JSON");
    let row = |d: &str| list.iter().find(|r| r["name"] == d).expect(d).clone();
    assert!(
        row("pc1")["failovers"].as_u64() >= Some(1),
        "{}",
        row("pc1")
    );
    assert!(row("pc1")["last_failover_ms"].as_u64().is_some());
    assert_eq!(row("pc2")["failovers"].as_u64(), Some(0), "{}", row("pc2"));
    let table = s.cli_ok(&["device", "events", "pc1"]);
    assert!(
        table.contains("EVENT") && table.contains("failover"),
        "{table}"
    );
    let metrics = common::run(
        "curl",
        &[
            "-sf",
            "-H",
            &format!("Authorization: Bearer {}", s.token()),
            &format!("{}/metrics", s.api),
        ],
    );
    for kind in ["connect", "disconnect", "failover", "refusal", "cache_full"] {
        let line = format!("vstream_device_events_total{{kind=\"{kind}\"}} ");
        let n: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        assert!(n >= 1, "{kind}: {n}");
    }
    assert!(s.log_text().contains("device event"));
    let _ = pc2.kill();
    let _ = pc2.wait();
}
