//! A multi-server farm on a real etcd: servers publish themselves, devices
//! log in through `vstream target` agents, and the agents fail over when a
//! server is killed, with a verifying workload running (tests/farm/workload.py).

use crate::common;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::{
    have, have_netns, have_python_nbd, random_image, repo, wait_for, NetNs, TestAgent, TestEtcd,
    TestServer, PYTHON,
};

const IMAGE_SIZE: u64 = 32 << 20;

/// Tools every test here needs; prints why when one is missing.
fn tools() -> Option<TestEtcd> {
    if !have("curl") || !have_python_nbd() {
        return None;
    }
    TestEtcd::start()
}

/// `n` servers in the farm, each holding vDisk `demo` (imported on the
/// first, copied to the others by replication), Standard mode with
/// device-side caches, and `devices` devices pc1.. on it.
fn farm(etcd: &TestEtcd, dir: &Path, n: usize, devices: usize) -> Vec<TestServer> {
    let servers: Vec<TestServer> = (1..=n)
        .map(|i| common::farm_member(dir, etcd, i, &[]))
        .collect();
    with_demo(servers, dir, devices)
}

/// Imports vDisk `demo` on the first server of a farm, adds `devices`
/// devices, and waits until every server holds it verified.
fn with_demo(servers: Vec<TestServer>, dir: &Path, devices: usize) -> Vec<TestServer> {
    let image = dir.join("demo.raw");
    random_image(&image, IMAGE_SIZE, 7);
    servers[0].cli_ok(&["vdisk", "import", "demo", image.to_str().unwrap()]);
    servers[0].cli_ok(&[
        "vdisk",
        "set",
        "demo",
        "--mode",
        "standard",
        "--cache-type",
        "device",
    ]);
    for d in 1..=devices {
        servers[0].cli_ok(&[
            "device",
            "add",
            &format!("pc{d}"),
            "--mac",
            &mac(d),
            "--vdisk",
            "demo",
        ]);
    }
    common::wait_farm(&servers);
    servers
}

fn mac(d: usize) -> String {
    format!("52:54:00:00:01:{d:02x}")
}

fn server_list(s: &TestServer) -> serde_json::Value {
    let out = s.cli(&["server", "list", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// Waits until `s` reports that it reaches the farm state (or not).
fn wait_farm_connected(s: &TestServer, connected: bool, secs: u64) {
    wait_for(secs, "the server to report its farm connection", || {
        let list = server_list(s);
        let me = list
            .as_array()?
            .iter()
            .find(|v| v["farm_connected"].is_boolean())?
            .clone();
        (me["farm_connected"] == connected).then_some(())
    });
}

/// Agents for devices pc1..pc`n`, each with a 64 MiB RAM cache.
fn ram_agents(dir: &Path, servers: &[TestServer], n: usize) -> Vec<TestAgent> {
    (1..=n)
        .map(|d| TestAgent::start(dir, &format!("pc{d}"), &mac(d), &apis(servers), "ram:64MiB"))
        .collect()
}

/// Agents for pc1..pc3 with the three cache types: RAM, local disk, and
/// RAM (of `ram`) overflowing to disk.
fn three_cache_agents(dir: &Path, servers: &[TestServer], ram: &str) -> Vec<TestAgent> {
    let caches = [
        "ram:64MiB".to_string(),
        format!("disk:{}:64MiB", dir.join("pc2.cache").display()),
        format!("ram:{ram},disk:{}:64MiB", dir.join("pc3.cache").display()),
    ];
    (1..=3)
        .map(|d| {
            TestAgent::start(
                dir,
                &format!("pc{d}"),
                &mac(d),
                &apis(servers),
                &caches[d - 1],
            )
        })
        .collect()
}

fn apis(servers: &[TestServer]) -> Vec<&str> {
    servers.iter().map(|s| s.api.as_str()).collect()
}

fn start_workload(agent: &TestAgent, image: &Path, secs: u32, seed: usize) -> Child {
    start_workload_with(agent, image, secs, seed, &[])
}

fn start_workload_with(
    agent: &TestAgent,
    image: &Path,
    secs: u32,
    seed: usize,
    extra: &[&str],
) -> Child {
    Command::new(PYTHON)
        .arg(repo().join("tests/farm/workload.py"))
        .arg(&agent.sock)
        .arg(image)
        .arg(secs.to_string())
        .arg(seed.to_string())
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the workload")
}

/// Waits for a workload; insists it saw no I/O error and no mismatch.
fn finish_workload(child: Child, agent: &TestAgent) -> serde_json::Value {
    let out = child.wait_with_output().expect("workload");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the workload saw errors:\n{stdout}\n{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log_text()
    );
    let stats: serde_json::Value = serde_json::from_str(stdout.trim()).expect("workload JSON");
    assert!(
        stats["reads"].as_u64() > Some(100) && stats["writes"].as_u64() > Some(10),
        "{stats}"
    );
    stats
}

/// Starts one workload per agent (seeds 1, 2, ...).
fn start_workloads(agents: &[TestAgent], image: &Path, secs: u32) -> Vec<Child> {
    agents
        .iter()
        .enumerate()
        .map(|(i, a)| start_workload(a, image, secs, i + 1))
        .collect()
}

/// Waits for every workload; insists none saw an error or a mismatch.
fn finish_workloads(loads: Vec<Child>, agents: &[TestAgent]) -> Vec<serde_json::Value> {
    let stats: Vec<serde_json::Value> = loads
        .into_iter()
        .zip(agents)
        .map(|(c, a)| finish_workload(c, a))
        .collect();
    eprintln!("workloads: {stats:?}");
    stats
}

fn pid(s: &TestServer) -> u32 {
    s.child.as_ref().expect("running").id()
}

/// Writes and zeroes that cover part of a block, or the end of one and the
/// start of the next, at any byte: each cache type fills in the rest of such
/// a block from the base, streamed from a server, and a server killed on the
/// way changes nothing of what reads back.
#[test]
fn partial_writes_through_the_agent_read_back() {
    let Some(etcd) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut servers = farm(&etcd, dir.path(), 2, 3);
    let image = dir.path().join("demo.raw");
    let agents = three_cache_agents(dir.path(), &servers, "1MiB");
    let loads: Vec<Child> = agents
        .iter()
        .enumerate()
        .map(|(i, a)| start_workload_with(a, &image, 10, i + 1, &["partial"]))
        .collect();
    std::thread::sleep(std::time::Duration::from_secs(4));
    servers[0].kill9();
    let stats = finish_workloads(loads, &agents);
    for s in &stats {
        assert!(
            s["writes"].as_u64().unwrap_or(0) > 50,
            "each device wrote: {stats:?}"
        );
    }
}

#[test]
fn agents_carry_on_when_servers_are_killed() {
    let Some(etcd) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut servers = farm(&etcd, dir.path(), 3, 3);
    let image = dir.path().join("demo.raw");
    // (RAM small enough that the workload's writes overflow.)
    let agents = three_cache_agents(dir.path(), &servers, "4MiB");
    // Load balancing: three devices on three idle servers of equal power.
    let mut on: Vec<String> = agents.iter().map(TestAgent::streaming_from).collect();
    on.sort();
    assert_eq!(on, ["s1", "s2", "s3"], "one device per server");

    let loads = start_workloads(&agents, &image, 14);
    std::thread::sleep(std::time::Duration::from_secs(3));
    let first = pid(&servers[0]);
    servers[0].kill9();
    std::thread::sleep(std::time::Duration::from_secs(4));
    let second = pid(&servers[1]);
    assert_ne!(first, second);
    servers[1].kill9();
    finish_workloads(loads, &agents);

    // Every device now streams from the one live server, which says so.
    for a in &agents {
        assert_eq!(a.streaming_from(), "s3", "{}", a.log_text());
    }
    let moved = agents
        .iter()
        .filter(|a| a.log_text().contains("failed over"))
        .count();
    assert_eq!(
        moved, 2,
        "the devices of s1 and s2 moved, the one on s3 stayed"
    );
    wait_for(10, "s3 reporting three devices and s1, s2 down", || {
        let list = server_list(&servers[2]);
        let by = |n: &str| list.as_array()?.iter().find(|v| v["name"] == n).cloned();
        let (s1, s2, s3) = (by("s1")?, by("s2")?, by("s3")?);
        (s1["up"] == false && s2["up"] == false && s3["devices"] == 3).then_some(())
    });
    // `device list` tells where each device is and what it booted.
    let out = servers[2].cli_ok(&["device", "list", "--json"]);
    let devices: serde_json::Value = serde_json::from_str(&out).unwrap();
    for d in devices.as_array().unwrap() {
        assert_eq!(
            (
                &d["connected"],
                &d["server"],
                &d["version"],
                &d["device_cache"]
            ),
            (&true.into(), &"s3".into(), &1.into(), &true.into()),
            "{d}"
        );
    }
}

#[test]
fn etcd_away_streaming_and_logins_go_on_and_the_farm_catches_up() {
    let Some(mut etcd) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let servers = farm(&etcd, dir.path(), 2, 3);
    let image = dir.path().join("demo.raw");
    let a1 = TestAgent::start(dir.path(), "pc1", &mac(1), &apis(&servers), "ram:64MiB");
    let load = start_workload(&a1, &image, 8, 1);
    std::thread::sleep(std::time::Duration::from_secs(1));
    etcd.pause();
    // Each server notices and says so.
    for s in &servers {
        wait_farm_connected(s, false, 15);
    }
    // A known device logs in and streams while etcd is away.
    let disk_cache = format!("disk:{}:64MiB", dir.path().join("pc2.cache").display());
    let a2 = TestAgent::start(dir.path(), "pc2", &mac(2), &apis(&servers), &disk_cache);
    let load2 = start_workload(&a2, &image, 3, 2);
    finish_workload(load2, &a2);
    finish_workload(load, &a1);
    // Admin changes wait for etcd; once it is back, the farm catches up.
    let refused =
        servers[0].cli_err(&["device", "add", "pc9", "--mac", &mac(9), "--vdisk", "demo"]);
    assert!(refused.contains("etcd"), "{refused}");
    etcd.resume();
    for s in &servers {
        wait_farm_connected(s, true, 20);
    }
    servers[0].cli_ok(&["device", "add", "pc9", "--mac", &mac(9), "--vdisk", "demo"]);
    // The other server learns of the new device, and logs it in.
    let a9 = wait_for(10, "the new device to log in on the other server", || {
        let body = format!("{{\"mac\":\"{}\"}}", mac(9));
        let out = Command::new("curl")
            .args([
                "-sf",
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "-d",
                &body,
            ])
            .arg(format!("{}/api/v1/login", servers[1].api))
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    });
    assert!(a9.contains("\"device\":\"pc9\""), "{a9}");
}

#[test]
fn logins_are_refused_with_reasons() {
    let Some(etcd) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let servers = farm(&etcd, dir.path(), 1, 1);
    let login = |mac: &str| {
        let out = Command::new("curl")
            .args([
                "-s",
                "-w",
                "\n%{http_code}",
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
            ])
            .args(["-d", &format!("{{\"mac\":\"{mac}\"}}")])
            .arg(format!("{}/api/v1/login", servers[0].api))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let unknown = login("52:54:00:ff:ff:ff");
    assert!(
        unknown.ends_with("404") && unknown.contains("no device has MAC"),
        "{unknown}"
    );
    let bad = login("not-a-mac");
    assert!(bad.ends_with("400"), "{bad}");
    let ok = login(&mac(1));
    assert!(
        ok.ends_with("200") && ok.contains("\"failover\":true"),
        "{ok}"
    );
    // The login needs no token; the server list does.
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("{}/api/v1/servers", servers[0].api))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "401");
}

#[test]
fn a_returning_server_gets_its_share_back_on_rebalance() {
    let Some(etcd) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut servers = farm(&etcd, dir.path(), 2, 4);
    let image = dir.path().join("demo.raw");
    let agents = ram_agents(dir.path(), &servers, 4);
    let count_on =
        |agents: &[TestAgent], s: &str| agents.iter().filter(|a| a.streaming_from() == s).count();
    assert_eq!((count_on(&agents, "s1"), count_on(&agents, "s2")), (2, 2));
    let loads = start_workloads(&agents, &image, 16);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let started = |name: &str| {
        let list = server_list(&servers[1]);
        list.as_array()
            .and_then(|l| l.iter().find(|v| v["name"] == name).cloned())
            .and_then(|v| v["started_unix"].as_u64())
            .unwrap_or(0)
    };
    let first_start = started("s1");
    servers[0].kill9();
    wait_for(10, "every device on s2", || {
        (count_on(&agents, "s2") == 4).then_some(())
    });
    // A new start time tells the new s1 from its old record.
    std::thread::sleep(std::time::Duration::from_secs(1));
    servers[0].restart();
    wait_for(
        30,
        "the new s1 up and verified, and s2 carrying 4, in s2's view",
        || {
            let list = server_list(&servers[1]);
            let by = |n: &str| list.as_array()?.iter().find(|v| v["name"] == n).cloned();
            let (s1, s2) = (by("s1")?, by("s2")?);
            let verified = s1["versions"]
                .as_array()?
                .iter()
                .any(|v| v["verified"] == true);
            let new = s1["started_unix"].as_u64()? > first_start;
            (new && s1["up"] == true && verified && s2["devices"] == 4).then_some(())
        },
    );
    let plan = servers[1].cli_ok(&["farm", "rebalance", "--trigger", "0"]);
    let logs: Vec<String> = agents.iter().map(|a| a.log_text()).collect();
    assert!(
        plan.contains("s2: 2 device(s)"),
        "{plan}\n{}\n{logs:#?}",
        server_list(&servers[1])
    );
    wait_for(15, "two devices back on s1", || {
        (count_on(&agents, "s1") == 2 && count_on(&agents, "s2") == 2).then_some(())
    });
    finish_workloads(loads, &agents);
    let again = servers[1].cli_ok(&["farm", "rebalance", "--trigger", "0"]);
    assert!(again.contains("nothing to move"), "{again}");
}

#[test]
fn a_silent_server_loses_its_devices_within_the_deadline() {
    if !have_netns() || !have("curl") || !have_python_nbd() {
        return;
    }
    let nets: Vec<NetNs> = (0..2).map(|_| NetNs::create()).collect();
    let outsides: Vec<&str> = nets.iter().map(|ns| ns.outside.as_str()).collect();
    let Some(etcd) = TestEtcd::start_on(&outsides) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let servers: Vec<TestServer> = nets
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let wrap = ns.wrap();
            let wrap: Vec<&str> = wrap.iter().map(String::as_str).collect();
            let farm = format!("etcd://{}:{}", ns.outside, etcd.port());
            let name = format!("s{}", i + 1);
            TestServer::start_wrapped(
                dir.path().join(&name),
                &ns.inside,
                &wrap,
                &["--farm", &farm, "--name", &name],
            )
        })
        .collect();
    let servers = with_demo(servers, dir.path(), 2);
    let image = dir.path().join("demo.raw");
    let agents: Vec<TestAgent> = (1..=2)
        .map(|d| {
            TestAgent::start_with(
                dir.path(),
                &format!("pc{d}"),
                &mac(d),
                &apis(&servers),
                "ram:64MiB",
                &["--deadline-ms", "1000"],
            )
        })
        .collect();
    let on_s1 = agents
        .iter()
        .position(|a| a.streaming_from() == "s1")
        .expect("a device on s1");
    let loads = start_workloads(&agents, &image, 10);
    std::thread::sleep(std::time::Duration::from_secs(2));
    nets[0].silence();
    finish_workloads(loads, &agents);
    let moved = &agents[on_s1];
    assert_eq!(moved.streaming_from(), "s2", "{}", moved.log_text());
    assert!(
        moved.log_text().contains("no answer within 1s"),
        "the move came from the deadline:\n{}",
        moved.log_text()
    );
    // When the network heals, the server rejoins the farm.
    nets[0].restore();
    let back = (0..300).any(|_| {
        let list = server_list(&servers[1]);
        let up = list
            .as_array()
            .and_then(|l| l.iter().find(|v| v["name"] == "s1"))
            .is_some_and(|s1| s1["up"] == true);
        if !up {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        up
    });
    let log = servers[0].log_text();
    assert!(
        back,
        "s1 did not rejoin within 30 s of the network healing:\n{log}"
    );
}

#[test]
fn a_server_stopped_gracefully_hands_its_devices_over_first() {
    let Some(etcd) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut servers = farm(&etcd, dir.path(), 2, 2);
    let image = dir.path().join("demo.raw");
    let agents = ram_agents(dir.path(), &servers, 2);
    let on_s1 = agents
        .iter()
        .position(|a| a.streaming_from() == "s1")
        .expect("a device on s1");
    let loads = start_workloads(&agents, &image, 6);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let status = servers[0].stop();
    assert!(
        status.success(),
        "SIGTERM ends the server cleanly: {status}"
    );
    // It leaves the farm at once, not when its 3 s lease runs out.
    wait_for(2, "s1 down in s2's view within 2 s of its stop", || {
        let list = server_list(&servers[1]);
        let s1 = list.as_array()?.iter().find(|v| v["name"] == "s1")?.clone();
        (s1["up"] == false).then_some(())
    });
    finish_workloads(loads, &agents);
    let moved = &agents[on_s1];
    assert_eq!(moved.streaming_from(), "s2", "{}", moved.log_text());
}

#[test]
fn a_private_device_waits_for_its_server_and_loses_no_acknowledged_write() {
    let Some(etcd) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut servers = farm(&etcd, dir.path(), 1, 1);
    servers[0].cli_ok(&["vdisk", "set", "demo", "--mode", "private"]);
    let image = dir.path().join("demo.raw");
    let agent = TestAgent::start(dir.path(), "pc1", &mac(1), &apis(&servers), "ram:64MiB");
    assert!(
        agent
            .log_text()
            .contains("waits for it rather than fail over"),
        "{}",
        agent.log_text()
    );
    let load = start_workload_with(&agent, &image, 10, 1, &["fua"]);
    std::thread::sleep(std::time::Duration::from_secs(2));
    servers[0].kill9();
    std::thread::sleep(std::time::Duration::from_secs(2));
    servers[0].restart();
    // Every write acknowledged before the crash reads back after it.
    let stats = finish_workload(load, &agent);
    eprintln!("workload: {stats}");
    let log = agent.log_text();
    assert!(log.contains("I/O waits for server s1 to return"), "{log}");
    assert!(log.contains("reconnected"), "{log}");
    assert!(!log.contains("failed over"), "{log}");
}

/// Reads of every size through the agent, some wholly of the base (sent on
/// without a copy), some part cache and part base, against the bytes the
/// device must see.
#[test]
fn reads_through_the_agent_return_the_right_bytes_whole_or_mixed() {
    let Some(etcd) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let servers = farm(&etcd, dir.path(), 1, 1);
    let mut want = std::fs::read(dir.path().join("demo.raw")).unwrap();
    let agent = TestAgent::start(dir.path(), "pc1", &mac(1), &apis(&servers), "ram:16MiB");
    let url = format!("nbd+unix:///?socket={}", agent.sock.display());
    let got = common::nbd::read_export(&url).expect("reading through the agent");
    assert!(got == want, "the base, read in 1 MiB requests");

    // Writes that leave 1 MiB reads part cached: inside one, across a
    // boundary, and a long one over several.
    let mut nbd = common::nbd::Nbd::connect(&url);
    for (i, (off, len)) in [
        (100_000, 5_000),
        ((1 << 20) - 3, 70_000),
        (5 << 20, 2_300_000),
    ]
    .into_iter()
    .enumerate()
    {
        let data: Vec<u8> = (0..len).map(|b| (b * 13 + i) as u8).collect();
        nbd.pwrite(&data, off, &dir.path().join("scratch"));
        want[off..off + len].copy_from_slice(&data);
    }
    nbd.quit();
    let got = common::nbd::read_export(&url).expect("reading through the agent");
    assert_eq!(got.len(), want.len());
    let first_bad = got.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(
        first_bad, None,
        "the cache's writes over the base, read back"
    );
}

/// What etcd answers to a read of the farm's keys at `revision`.
fn etcd_read_at(etcd: &TestEtcd, revision: u64) -> String {
    // The JSON gateway: keys from "/" ("Lw==") to "0" ("MA==").
    let body =
        format!(r#"{{"key":"Lw==","range_end":"MA==","count_only":true,"revision":"{revision}"}}"#);
    let out = Command::new("curl")
        .args([
            "-sS",
            "-X",
            "POST",
            &format!("{}/v3/kv/range", etcd.url),
            "-d",
            &body,
        ])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// etcd keeps every earlier value of every key until it is compacted, and
/// each server writes its status every second. A server with
/// `--etcd-history 1` compacts: a read at an early revision is soon refused
/// as compacted, and the farm goes on. One with `--etcd-history 0` leaves
/// etcd's history alone.
#[test]
fn an_etcd_farm_compacts_its_history_unless_told_not_to() {
    if !have("curl") {
        return;
    }
    let (Some(kept), Some(compacted)) = (TestEtcd::start(), TestEtcd::start()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let keeper = TestServer::start_in_farm_with(
        dir.path().join("keeper"),
        &kept.url,
        "s1",
        &["--etcd-history", "0"],
        &[],
    );
    let compactor = TestServer::start_in_farm_with(
        dir.path().join("compactor"),
        &compacted.url,
        "s1",
        &["--etcd-history", "1"],
        &[],
    );
    let early = 2;
    wait_for(
        30,
        "etcd to refuse a read before its compacted revision",
        || {
            etcd_read_at(&compacted, early)
                .contains("required revision has been compacted")
                .then_some(())
        },
    );
    assert!(
        compactor.log_text().contains("etcd history compacted"),
        "the server did not log its compaction:\n{}",
        compactor.log_text()
    );
    wait_farm_connected(&compactor, true, 10);
    // The other server has been publishing as long: its etcd still has
    // every revision.
    let read = etcd_read_at(&kept, early);
    assert!(
        read.contains(r#""count""#) || read.contains(r#""header""#),
        "{read}"
    );
    assert!(!read.contains("compacted"), "{read}");
    assert!(!keeper.log_text().contains("etcd history compacted"));
}
