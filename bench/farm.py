#!/usr/bin/python3
"""Farm benchmarks: agent overhead, failover stall, logins.

    /usr/bin/python3 bench/farm.py [--parts a,b,c,d] [--kills 20] [--devices 4000]
                                   [--size-mib 1024] [--runtime 15] [--link-mbit 10000]
                                   [--halt-poll-ns machine,200000] [--no-build]
                                   [--old-bin PATH]

One etcd and release-build `vstream server`s on this machine, a `vstream target`
agent, and real clients, in one run:

  a. agent overhead  (also `a-pinned`: the device's side on CPU 0, the server on CPU 1;
                     and `a-link`: the server in a network namespace behind a veth
                     link shaped to --link-mbit (tc tbf), as across a real network;
                     needs root)
                     the same reads of a device's base, four ways, in the order
                     A B C D D C B A: direct NBD to the server (TCP), through the
                     agent (its unix socket), through nbdkit's nbd plugin as a plain
                     proxy (the peer), and through socat copying bytes both ways
                     (the floor of any second hop: no NBD, no cache, no failover):
                     nbdcopy of the whole disk to null:, and fio 4 KiB randread
                     QD16. Medians; ratios to direct. Once per guest halt polling
                     setting of --halt-poll-ns (a KVM guest's idle vCPUs: as the
                     machine has it, and the Linux default of 200 us).
                     Target: agent >= 0.9 x direct.
                     With --old-bin PATH, a second farm of that binary (its own
                     etcd, server and agent) stands beside this build's, and its
                     direct and agent reads join the sequence (A B A' B' C D D C
                     B' A' B A): the rows "this build ÷ old build" are an A/B of
                     the two builds in one run, and the noise row says how far
                     the two runs of one way lay apart.
  b. kill stall      3 servers, one agent running tests/farm/workload.py; each round
                     kill -9 the server the agent streams from, 2 s into a 6 s
                     workload; the largest request latency of the round is its
                     stall; the server is restarted before the next round.
                     p50 and p99 over the rounds. Target: <= 1 s.
                     `b-tls` (not in the default parts): the same with NBD over TLS
                     required, APIs over HTTPS, and the agent showing its device
                     certificate (a PKI made by `vstream ca`). Target: <= 1 s.
  c. silent stall    2 servers in network namespaces; each round nftables drops
                     all traffic of the agent's server; agent deadline 1 s (the
                     default). Needs root, ip and nft. Target: <= 2 s.
  d. logins          N devices, then 8 threads POST /api/v1/login for 10 s;
                     logins/s, and the server's VmRSS before adding the devices,
                     after, and at the end.

Writes the table to stdout and to bench/.work/farm/last-table.md.
"""
import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import log, free_port, wait  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VSTREAM = os.environ.get("VSTREAM_BIN", os.path.join(ROOT, "target/release/vstream"))
WORKLOAD = os.path.join(ROOT, "tests/farm/workload.py")
PY = "/usr/bin/python3"


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Etcd:
    def __init__(self, work, host="127.0.0.1"):
        self.port, peer = free_port(), free_port()
        self.url = f"http://{host}:{self.port}"
        listen = f"http://0.0.0.0:{self.port}"
        self.proc = subprocess.Popen(
            ["etcd", "--name", "b", "--data-dir", os.path.join(work, "etcd"),
             "--listen-client-urls", listen, "--advertise-client-urls", self.url,
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"b=http://127.0.0.1:{peer}"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "etcd.log"), "w"))
        wait("etcd", 20, lambda: b"true" in urllib.request.urlopen(
            f"http://127.0.0.1:{self.port}/health", timeout=1).read())

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class Server:
    def __init__(self, work, name, etcd_endpoint, host="127.0.0.1", wrap=(), extra=(), binary=None):
        self.name, self.host, self.wrap, self.extra = name, host, list(wrap), list(extra)
        self.bin = binary or VSTREAM
        self.data = os.path.join(work, name)
        os.makedirs(self.data, exist_ok=True)
        self.nbd_port, self.api_port = free_port(), free_port()
        self.api = f"http://{host}:{self.api_port}"
        self.etcd = etcd_endpoint
        self.proc = None
        self.start()

    def start(self):
        cmd = self.wrap + [self.bin, "server", "--data", self.data,
                           "--nbd", f"{self.host}:{self.nbd_port}",
                           "--api", f"{self.host}:{self.api_port}",
                           "--farm", f"etcd://{self.etcd}", "--name", self.name] + self.extra
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(self.data, "server.log"), "a"),
                                     env=dict(os.environ, RUST_LOG="warn"))
        wait(f"server {self.name}", 20, lambda: socket.create_connection(
            (self.host, self.api_port), timeout=0.5).close() is None)

    def kill(self):
        self.proc.kill()
        self.proc.wait()

    def token(self):
        return open(os.path.join(self.data, "admin.token")).read().strip()

    def cli(self, *args):
        env = dict(os.environ, VSTREAM_API=self.api, VSTREAM_TOKEN=self.token())
        return subprocess.run([self.bin, *args], env=env, check=True, capture_output=True,
                              text=True).stdout

    def servers(self):
        return json.loads(self.cli("server", "list", "--json"))


def make_farm(work, servers, image, devices=1):
    for s in servers:
        s.cli("vdisk", "import", "demo", image)
    servers[0].cli("vdisk", "set", "demo", "--mode", "standard", "--cache-type", "device")
    for d in range(1, devices + 1):
        servers[0].cli("device", "add", f"pc{d}", "--mac", mac(d), "--vdisk", "demo")
    n = len(servers)
    for s in servers:
        wait("every server up and verified", 120, lambda s=s: sum(
            1 for v in s.servers() if v["up"] and any(x["verified"] for x in v["versions"])) == n)


def mac(d):
    return "52:54:%02x:%02x:%02x:%02x" % ((d >> 24) & 255, (d >> 16) & 255, (d >> 8) & 255, d & 255)


class Agent:
    def __init__(self, work, servers, deadline_ms=1000, wrap=(), binary=None, tls=None):
        """`tls`: the device's credential folder; the agent then logs in over
        HTTPS (each server's --api-tls) and streams over NBD with TLS."""
        self.sock = os.path.join(work, "agent.sock")
        self.logfile = os.path.join(work, "agent.log")
        if tls:
            boot = ",".join(s.api_tls for s in servers)
            extra = ["--tls-certificates", tls]
        else:
            boot = ",".join(s.api.replace("http://", "") for s in servers)
            extra = []
        self.proc = subprocess.Popen(
            list(wrap) + [binary or VSTREAM, "target", "--bootstrap", boot, "--mac", mac(1), "--listen",
             f"unix:{self.sock}", "--cache", "ram:2GiB", "--deadline-ms", str(deadline_ms)] + extra,
            stdout=subprocess.DEVNULL, stderr=open(self.logfile, "w"),
            env=dict(os.environ, RUST_LOG="info"))
        wait("agent", 30, lambda: "serving the device's disk" in self.log())

    def log(self):
        return open(self.logfile).read()

    def server(self):
        last = [l for l in self.log().splitlines() if "failed over" in l or "logged in" in l][-1]
        key = " to=" if "failed over" in last else " server="
        return last.split(key)[1].split()[0]

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def workload(agent, image, secs, seed):
    out = subprocess.run([PY, WORKLOAD, agent.sock, image, str(secs), str(seed)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        print(f"farm.py: the workload saw errors:\n{out.stdout}\n{out.stderr[-2000:]}", file=sys.stderr)
        return {}
    return json.loads(out.stdout)


def pct(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


# ---- a. agent overhead -------------------------------------------------------------

def part_a(work, rows, size_mib, runtime, pin=False, link_mbit=None, setting="", old_bin=None):
    """With `pin`, the device's side (client, agent, proxy) runs on CPU 0 and
    the server on CPU 1, as if they were different machines. With
    `link_mbit`, the server sits behind a veth link shaped to that rate.
    `setting` names the guest halt polling the run had (see halt_polls).
    With `old_bin`, a second farm (its own etcd, server and agent) runs that
    binary beside this one, and its direct and agent reads are interleaved
    with this binary's: an A/B of two builds in one run."""
    if link_mbit and (os.geteuid() != 0 or not shutil.which("tc") or not shutil.which("ip")):
        rows.append(("a-link. agent overhead across a shaped link", "skipped: needs root, ip and tc", "≥ 0.9", ""))
        return
    device = ["taskset", "-c", "0"] if pin else []
    label = ", device on CPU 0 and server on CPU 1" if pin else ""
    image = os.path.join(work, "a.raw")
    subprocess.run(["head", "-c", f"{size_mib}M", "/dev/urandom"], stdout=open(image, "wb"), check=True)
    builds = [("", None)] + ([("-old", old_bin)] if old_bin else [])
    nets = make_nets(len(builds), rate_mbit=link_mbit) if link_mbit else []
    if link_mbit:
        label = f", server across a {link_mbit} Mbit/s link"
    label += setting
    etcds, servers, agents = [], [], []
    ways, middle, server_of = {}, {}, {}
    try:
        for i, (tag, binary) in enumerate(builds):
            sub = os.path.join(work, f"farm{tag or '-new'}")
            os.makedirs(sub)
            etcds.append(Etcd(sub))
            if link_mbit:
                ns, _, net = nets[i]
                server = Server(sub, "a1", f"{net}.1:{etcds[-1].port}", host=f"{net}.2",
                                wrap=["ip", "netns", "exec", ns], binary=binary)
            else:
                server = Server(sub, "a1", etcds[-1].url.replace("http://", ""),
                                wrap=["taskset", "-c", "1"] if pin else [], binary=binary)
            servers.append(server)
            make_farm(sub, [server], image)
            agents.append(Agent(sub, [server], wrap=device, binary=binary))
            info = json.loads(urllib.request.urlopen(urllib.request.Request(
                f"{server.api}/api/v1/login", data=json.dumps({"mac": mac(1)}).encode(),
                headers={"content-type": "application/json"})).read())
            ways["direct" + tag] = f"nbd://{server.host}:{server.nbd_port}/{info['export']}"
            ways["agent" + tag] = f"nbd+unix:///?socket={agents[-1].sock}"
            middle["direct" + tag], middle["agent" + tag] = None, agents[-1].proc.pid
            server_of["direct" + tag] = server_of["agent" + tag] = server
            if i == 0:
                export = info["export"]
        host, port = servers[0].host, servers[0].nbd_port
        proxy_sock = os.path.join(work, "nbdkit.sock")
        nbdkit = subprocess.Popen(device + ["nbdkit", "-f", "-U", proxy_sock, "nbd", f"hostname={host}",
                                   f"port={port}", f"export={export}"],
                                  stderr=subprocess.DEVNULL)
        wait("nbdkit", 10, lambda: os.path.exists(proxy_sock))
        # The floor of any second hop: a relay that copies bytes both ways
        # and knows nothing of NBD (no cache, no failover).
        relay_sock = os.path.join(work, "relay.sock")
        relay = subprocess.Popen(device + ["socat", "-b", "262144", f"UNIX-LISTEN:{relay_sock},fork",
                                           f"TCP:{host}:{port},nodelay"],
                                 stderr=subprocess.DEVNULL)
        wait("socat", 10, lambda: os.path.exists(relay_sock))
        ways["nbdkit"] = f"nbd+unix:///?socket={proxy_sock}"
        ways["relay"] = f"nbd+unix:///{export}?socket={relay_sock}"
        middle["nbdkit"], middle["relay"] = nbdkit.pid, relay.pid
        server_of["nbdkit"] = server_of["relay"] = servers[0]
        seq = {k: [] for k in ways}
        rnd = {k: [] for k in ways}
        # CPU µs per random read of fio, of the middle process and of the server, and
        # the share of the machine left idle: where the time of a read goes.
        cost = {k: [] for k in ways}
        half = ["direct", "agent"] + (["direct-old", "agent-old"] if old_bin else []) + ["nbdkit", "relay"]
        for way in half + half[::-1]:
            t0 = time.monotonic()
            subprocess.run(device + ["nbdcopy", ways[way], "null:"], check=True)
            seq[way].append(size_mib / 1024 / (time.monotonic() - t0))
            res = os.path.join(work, "fio.json")
            srv = server_of[way].proc.pid
            before = (fio_cpu(), tree_cpu(middle[way]), tree_cpu(srv), idle_share())
            subprocess.run(device + ["fio", "--name=r", "--ioengine=nbd", f"--uri={ways[way]}",
                            "--rw=randread", "--bs=4k", "--iodepth=16", f"--runtime={runtime}",
                            "--time_based", "--output-format=json", f"--output={res}"],
                           capture_output=True, text=True, check=True)
            after = (fio_cpu(), tree_cpu(middle[way]), tree_cpu(srv), idle_share())
            read = json.load(open(res))["jobs"][0]["read"]
            rnd[way].append(read["iops"])
            per_read = [(b - a) / read["total_ios"] * 1e6 for a, b in zip(before[:3], after[:3])]
            idle = (after[3][0] - before[3][0]) / max(1, after[3][1] - before[3][1])
            cost[way].append(per_read + [idle * 100])
            log(f"a. {way}: {seq[way][-1]:.2f} GiB/s, {rnd[way][-1]:.0f} IOPS, CPU µs per read "
                f"fio {per_read[0]:.1f} middle {per_read[1]:.1f} server {per_read[2]:.1f}, idle {idle:.0%}")
        nbdkit.kill()
        relay.kill()
        for agent in agents:
            agent.stop()
        for name, vals, unit in [("sequential nbdcopy", seq, "GiB/s"), ("4 KiB randread QD16", rnd, "IOPS")]:
            med = {k: statistics.median(v) for k, v in vals.items()}
            rows.append((f"a. {name}, {unit}: direct / agent / nbdkit proxy / socat relay (medians of 2){label}",
                         f"{med['direct']:.2f} / {med['agent']:.2f} / {med['nbdkit']:.2f} / {med['relay']:.2f}", "", ""))
            ratio = med["agent"] / med["direct"]
            rows.append((f"a. {name}: agent ÷ direct (nbdkit proxy ÷ direct, socat relay ÷ direct){label}",
                         f"{ratio:.2f} ({med['nbdkit'] / med['direct']:.2f}, {med['relay'] / med['direct']:.2f})",
                         "≥ 0.9", "met" if ratio >= 0.9 else "MISSED"))
            if old_bin:
                rows.append((f"a. {name}, {unit}: this build ÷ old build, direct / agent "
                             f"(old: {med['direct-old']:.2f} / {med['agent-old']:.2f}){label}",
                             f"{med['direct'] / med['direct-old']:.2f} / {med['agent'] / med['agent-old']:.2f}",
                             "within the noise row", ""))
        for way, runs in cost.items():
            m = [statistics.median(r[i] for r in runs) for i in range(4)]
            rows.append((f"a. randread, CPU µs per read: fio / {'(none)' if way.startswith('direct') else way} / server; "
                         f"machine idle ({way}, medians of 2){label}",
                         f"{m[0]:.1f} / {m[1]:.1f} / {m[2]:.1f}; {m[3]:.0f} %", "", ""))
        if old_bin:
            # The noise: how far the two runs of one way lie apart, as a share of their median.
            spread = max(abs(v[0] - v[1]) / statistics.median(v) for v in rnd.values())
            rows.append((f"a. randread noise: the largest spread between the two runs of one way{label}",
                         f"{spread:.0%}", "", ""))
    finally:
        for s in servers:
            s.kill()
        for e in etcds:
            e.stop()
        drop_nets(nets)


HALT_POLL = "/sys/module/haltpoll/parameters/guest_halt_poll_ns"


def halt_polls(wanted):
    """The guest halt polling settings to run part a under: (ns or None for the
    machine's own, row label). In a KVM guest with the haltpoll cpuidle
    driver, an idle vCPU polls up to guest_halt_poll_ns before it halts (Linux
    default 200000); at 0 every wake-up of an idle vCPU is a VM exit and an
    interrupt from the host. Without the driver, only the machine's own."""
    if not os.path.exists(HALT_POLL):
        return [(None, ", no haltpoll cpuidle driver")]
    now = open(HALT_POLL).read().strip()
    out = []
    for w in wanted.split(","):
        if w == "machine":
            out.append((None, f", guest halt polling as the machine has it ({now} ns)"))
        elif not os.access(HALT_POLL, os.W_OK):
            log(f"farm.py: cannot set {HALT_POLL} (needs root): no run at {w} ns")
        else:
            ns = int(w)
            out.append((ns, f", guest halt polling {ns} ns" + (" (the Linux default)" if ns == 200000 else "")))
    return out


class HaltPoll:
    """Sets guest_halt_poll_ns for a part (None: leaves it) and puts the
    machine's value back after."""
    def __init__(self, ns):
        self.ns, self.old = ns, None

    def __enter__(self):
        if self.ns is not None:
            self.old = open(HALT_POLL).read().strip()
            with open(HALT_POLL, "w") as f:
                f.write(str(self.ns))
            log(f"guest_halt_poll_ns {self.old} -> {self.ns}")

    def __exit__(self, *exc):
        if self.old is not None:
            with open(HALT_POLL, "w") as f:
                f.write(self.old)
            log(f"guest_halt_poll_ns back to {self.old}")


def tree_cpu(pid):
    """CPU seconds used so far by `pid`, its live descendants and those it has
    reaped (socat forks one per connection); 0 for None."""
    if pid is None:
        return 0.0
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in open(f"/proc/{p}/task/{task}/children").read().split()]
        except (OSError, IndexError, ValueError):
            pass
    return total


def fio_cpu():
    """CPU seconds of this script's finished children (fio, once it has exited)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def idle_share():
    """(idle, total) jiffies of the whole machine so far."""
    cpu = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return cpu[3] + cpu[4], sum(cpu[:8])


def make_nets(count, rate_mbit=None):
    """`count` network namespaces, each joined to this one by a veth pair:
    10.250.N.1 here, 10.250.N.2 inside. With `rate_mbit`, both ends of each
    link send at most that rate (tc tbf), as a real network link would."""
    tag = os.getpid() % 10000
    nets = []
    for n in range(1, count + 1):
        ns, veth, net = f"vb{tag}n{n}", f"vb{tag}v{n}", f"10.250.{n}"
        sh(f"ip netns add {ns}; ip link add {veth} type veth peer name {veth}p; ip link set {veth}p netns {ns}; "
           f"ip addr add {net}.1/24 dev {veth}; ip link set {veth} up; "
           f"ip netns exec {ns} sh -c 'ip addr add {net}.2/24 dev {veth}p; ip link set {veth}p up; ip link set lo up'")
        nets.append((ns, veth, net))
        if rate_mbit:
            # A burst of 1 ms of traffic (at least 64 KiB), as a switch port buffers.
            burst = max(64 * 1024, rate_mbit * 1000 // 8)
            shape = f"tbf rate {rate_mbit}mbit burst {burst} latency 5ms"
            sh(f"tc qdisc add dev {veth} root {shape}; ip netns exec {ns} tc qdisc add dev {veth}p root {shape}")
    return nets


def drop_nets(nets):
    for ns, veth, _ in nets:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", veth], capture_output=True)


# ---- b. kill stall -----------------------------------------------------------------

def stall_rounds(work, servers, new_agent, image, rounds, hurt, heal, label):
    """Each round boots a fresh agent (a reboot: its write cache starts empty,
    as the workload expects), then hurts the server it streams from."""
    stalls = []
    for r in range(rounds):
        agent = new_agent()
        try:
            stalls.append(one_round(agent, servers, image, r, hurt, heal, label))
        finally:
            agent.stop()
    return stalls


def one_round(agent, servers, image, r, hurt, heal, label):
    """One round: a workload, the agent's server hurt 2 s in, then healed;
    returns the largest request latency of the workload (ms)."""
    name = agent.server()
    victim = next(s for s in servers if s.name == name)
    result = {}
    t = threading.Thread(target=lambda: result.update(workload(agent, image, 6, r + 1)))
    t.start()
    time.sleep(2)
    hurt(victim)
    t.join()
    if "max_ms" not in result:
        raise SystemExit(f"farm.py: round {r + 1} failed; agent log:\n{agent.log()[-3000:]}")
    log(f"{label} round {r + 1}: {name} -> {agent.server()}, stall {result['max_ms']} ms")
    heal(victim)
    other = next(s for s in servers if s is not victim)
    wait("the server back, verified, in the farm", 60, lambda: any(
        v["name"] == victim.name and v["up"]
        and any(x["verified"] for x in v["versions"]) for v in other.servers()))
    return result["max_ms"]


def make_pki(work, names):
    """A farm CA made by vstream (`vstream ca init`), a TLS folder for each
    server in `names`, and device pc1's credential; the folders by name."""
    pki = os.path.join(work, "pki")
    run = lambda *a: subprocess.run([VSTREAM, *a], check=True, capture_output=True)
    ca = os.path.join(pki, "ca")
    run("ca", "init", "--out", ca)
    dirs = {}
    for n in names:
        dirs[n] = os.path.join(pki, n)
        run("ca", "server", "--ca", ca, "--out", dirs[n], "--name", n, "--san", "127.0.0.1",
            "--san", "localhost")
    dirs["pc1"] = os.path.join(pki, "pc1")
    run("device", "credential", "pc1", "--ca", ca, "--out", dirs["pc1"])
    return dirs


def part_b(work, rows, rounds, tls=False):
    """With `tls`, every server requires NBD over TLS and serves its API over
    HTTPS too, and the agent shows device pc1's certificate (issue 18)."""
    image = os.path.join(work, "b.raw")
    subprocess.run(["head", "-c", "64M", "/dev/urandom"], stdout=open(image, "wb"), check=True)
    etcd = Etcd(work)
    names = [f"b{i}" for i in (1, 2, 3)]
    pki = make_pki(work, names) if tls else {}
    servers = []
    for n in names:
        extra = []
        if tls:
            port = free_port()
            extra = ["--tls", "require", "--tls-certificates", pki[n], "--api-tls", f"127.0.0.1:{port}"]
        servers.append(Server(work, n, etcd.url.replace("http://", ""), extra=extra))
        servers[-1].api_tls = f"https://127.0.0.1:{port}" if tls else None
    try:
        make_farm(work, servers, image)
        def restart(s):
            time.sleep(1)  # a new start time
            s.start()
            time.sleep(1.5)

        label = "b-tls." if tls else "b."
        stalls = stall_rounds(work, servers, lambda: Agent(work, servers, tls=pki.get("pc1")), image,
                              rounds, Server.kill, restart, label)
        if tls:
            # The servers require TLS, so a workload that read at all read
            # over it; the counter shows it (the killed servers' counts are gone).
            def tls_conns(s):
                req = urllib.request.Request(f"{s.api}/metrics",
                                             headers={"Authorization": f"Bearer {s.token()}"})
                text = urllib.request.urlopen(req, timeout=5).read().decode()
                return sum(int(float(l.split()[-1])) for l in text.splitlines()
                           if l.startswith("vstream_nbd_tls_connections_total"))
            if sum(tls_conns(s) for s in servers) < 1:
                raise SystemExit("farm.py: b-tls: no NBD connection over TLS on any server")
        p50, p99 = pct(stalls, 50), pct(stalls, 99)
        what = "the server process is killed, agent over TLS" if tls else "the server process is killed"
        rows.append((f"{label} stall when {what}, ms: p50 / p99 / max ({rounds} kills)",
                     f"{p50:.1f} / {p99:.1f} / {max(stalls):.1f}", "≤ 1000", "met" if p99 <= 1000 else "MISSED"))
    finally:
        for s in servers:
            s.kill()
        etcd.stop()


# ---- c. silent stall ---------------------------------------------------------------

def sh(cmd):
    subprocess.run(["sh", "-c", cmd], check=True, capture_output=True)


def part_c(work, rows, rounds):
    if os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("ip"):
        rows.append(("c. stall when the server's host goes silent", "skipped: needs root, ip and nft", "≤ 2000", ""))
        return
    image = os.path.join(work, "c.raw")
    subprocess.run(["head", "-c", "64M", "/dev/urandom"], stdout=open(image, "wb"), check=True)
    nets = make_nets(2)
    etcd = Etcd(work)
    servers = []
    try:
        for i, (ns, _, net) in enumerate(nets):
            servers.append(Server(work, f"c{i + 1}", f"{net}.1:{etcd.port}", host=f"{net}.2",
                                  wrap=["ip", "netns", "exec", ns]))
        make_farm(work, servers, image)
        ns_of = {s.name: nets[i][0] for i, s in enumerate(servers)}
        rule = ("table inet vb {\n chain i { type filter hook input priority 0; policy drop; }\n"
                " chain o { type filter hook output priority 0; policy drop; }\n}\n")
        stalls = stall_rounds(
            work, servers, lambda: Agent(work, servers, deadline_ms=1000), image, rounds,
            lambda s: subprocess.run(["ip", "netns", "exec", ns_of[s.name], "nft", "-f", "-"],
                                     input=rule, text=True, check=True),
            lambda s: (sh(f"ip netns exec {ns_of[s.name]} nft delete table inet vb"), time.sleep(4)),
            "c.")
        p50, p99 = pct(stalls, 50), pct(stalls, 99)
        rows.append((f"c. stall when the server's host goes silent (deadline 1 s), ms: p50 / p99 / max ({rounds} rounds)",
                     f"{p50:.1f} / {p99:.1f} / {max(stalls):.1f}", "≤ 2000", "met" if p99 <= 2000 else "MISSED"))
    finally:
        for s in servers:
            s.kill()
        etcd.stop()
        drop_nets(nets)


# ---- d. logins ---------------------------------------------------------------------

def part_d(work, rows, devices):
    image = os.path.join(work, "d.raw")
    subprocess.run(["head", "-c", "16M", "/dev/urandom"], stdout=open(image, "wb"), check=True)
    etcd = Etcd(work)
    # No pacing: this measures how fast logins are answered, not how many
    # devices may boot at once.
    servers = [Server(work, "d1", etcd.url.replace("http://", ""), extra=["--max-booting", "0"])]
    s = servers[0]
    try:
        make_farm(work, servers, image, devices=0)
        rss0 = rss_kib(s.proc.pid)
        token = s.token()

        def add(lo, hi):
            for d in range(lo, hi):
                body = json.dumps({"name": f"pc{d}", "mac": mac(d), "vdisk": "demo"}).encode()
                urllib.request.urlopen(urllib.request.Request(
                    f"{s.api}/api/v1/devices", data=body, method="POST",
                    headers={"content-type": "application/json", "authorization": f"Bearer {token}"}))

        t0 = time.monotonic()
        threads = [threading.Thread(target=add, args=(1 + i * devices // 8, 1 + (i + 1) * devices // 8))
                   for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        log(f"d. {devices} devices added in {time.monotonic() - t0:.1f} s")
        time.sleep(2.5)  # into the login view
        rss1 = rss_kib(s.proc.pid)
        counts = [0] * 8
        stop = time.monotonic() + 10

        def storm(i):
            n, d = 0, 1 + i
            while time.monotonic() < stop:
                body = json.dumps({"mac": mac(d)}).encode()
                reply = json.loads(urllib.request.urlopen(urllib.request.Request(
                    f"{s.api}/api/v1/login", data=body,
                    headers={"content-type": "application/json"})).read())
                assert reply["server"] == "d1", reply
                n += 1
                d = (d + 8 - 1) % devices + 1
            counts[i] = n

        threads = [threading.Thread(target=storm, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rss2 = rss_kib(s.proc.pid)
        rows.append((f"d. logins per second, {devices} devices, 8 client threads on this machine, 10 s",
                     f"{sum(counts) / 10:.0f}", "", ""))
        rows.append(("d. server VmRSS: no devices / with them / after the login storm, MiB",
                     f"{rss0 / 1024:.1f} / {rss1 / 1024:.1f} / {rss2 / 1024:.1f}", "", ""))
    finally:
        s.kill()
        etcd.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="a,b,c,d")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--devices", type=int, default=4000)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runtime", type=int, default=15)
    ap.add_argument("--link-mbit", type=int, default=10000)
    ap.add_argument("--halt-poll-ns", default="machine,200000",
                    help="part a's runs, one per guest halt polling setting: 'machine' (as it is) or ns")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--old-bin", help="part a also runs this vstream binary (direct and agent), "
                    "interleaved with this build's, and prints this build ÷ old")
    args = ap.parse_args()
    for tool in ["etcd", "nbdcopy", "fio", "nbdkit", "socat"]:
        if not shutil.which(tool):
            raise SystemExit(f"farm.py: {tool} not found (.ci/install-deps installs it)")
    if not args.no_build:
        log("building vstream (release)")
        subprocess.run(["cargo", "build", "--release", "-p", "vstream"], cwd=ROOT, check=True)
    base = os.path.join(ROOT, "bench/.work/farm")
    os.makedirs(base, exist_ok=True)
    rows = []
    started = time.time()
    polls = halt_polls(args.halt_poll_ns)

    def under_each_poll(**kw):
        def run(w):
            for i, (ns, setting) in enumerate(polls):
                sub = os.path.join(w, f"poll{i}")
                os.makedirs(sub)
                with HaltPoll(ns):
                    part_a(sub, rows, args.size_mib, args.runtime, setting=setting,
                           old_bin=args.old_bin, **kw)
        return run
    parts = {"a": under_each_poll(),
             "a-pinned": under_each_poll(pin=True),
             "a-link": under_each_poll(link_mbit=args.link_mbit),
             "b": lambda w: part_b(w, rows, args.kills),
             "b-tls": lambda w: part_b(w, rows, args.kills, tls=True),
             "c": lambda w: part_c(w, rows, args.kills),
             "d": lambda w: part_d(w, rows, args.devices)}
    for p in args.parts.split(","):
        with tempfile.TemporaryDirectory(dir=base) as work:
            log(f"part {p}")
            parts[p](work)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    out = [f"bench/farm.py, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, commit {commit}, "
           f"{os.cpu_count()} CPUs, whole run {time.time() - started:.0f} s", "",
           "| measurement | value | target | |", "|---|---:|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    text = "\n".join(out) + "\n"
    print(text)
    open(os.path.join(base, "last-table.md"), "w").write(text)


if __name__ == "__main__":
    main()
