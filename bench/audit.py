#!/usr/bin/python3
"""The audit trail's cost: a `device add` storm with the trail on and off, in one run.

    /usr/bin/python3 bench/audit.py [--devices 2000] [--clients 8] [--rounds 3]
                                    [--farm embedded|etcd] [--no-build]

For each round, a fresh release-build `vstream server` (its own data folder; with
--farm etcd, its own etcd too) with `--audit on` and one with `--audit off`, in the
order ON OFF OFF ON ON OFF ... so that a drift of the machine's speed falls on both.
Each server gets one vDisk, then CLIENTS threads, each with its own keep-alive
connection, POST /api/v1/devices until DEVICES devices are added (names d0..,
unicast MACs), all answers checked to be 201. A round's figure is adds per second
over the storm's wall time. With the trail on, every add also appends one entry to
the farm state's trail, and the script checks that the trail holds DEVICES entries
after the storm (and none with it off).

Prints the medians of each side, the ratio on/off and the cost (1 - ratio), and the
median of the rounds' own on/off ratios (each round's two storms ran back to back).
`--audit off` skips the trail's writes; the summary of each change (its JSON fields,
microseconds) is still made.
Target: cost <= 5 %. Logs in bench/.work/audit/.
"""
import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import log, free_port, wait  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VSTREAM = os.environ.get("VSTREAM_BIN", os.path.join(ROOT, "target/release/vstream"))
WORK = os.path.join(ROOT, "bench/.work/audit")


class Etcd:
    def __init__(self, work):
        self.port, peer = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            ["etcd", "--name", "b", "--data-dir", os.path.join(work, "etcd"),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"b=http://127.0.0.1:{peer}"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "etcd.log"), "w"))
        wait("etcd", 20, lambda: b"true" in urllib.request.urlopen(
            f"{self.url}/health", timeout=1).read())

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class Server:
    def __init__(self, work, audit, etcd=None):
        self.data = os.path.join(work, "data")
        os.makedirs(self.data)
        self.port = free_port()
        cmd = [VSTREAM, "server", "--data", self.data, "--nbd", f"127.0.0.1:{free_port()}",
               "--api", f"127.0.0.1:{self.port}", "--audit", audit]
        if etcd:
            cmd += ["--farm", f"etcd://127.0.0.1:{etcd.port}", "--name", "s1"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(work, "server.log"), "w"),
                                     env=dict(os.environ, RUST_LOG="warn"))
        wait("the server's API", 30, lambda: self.call("GET", "/healthz")[0] == 200)
        self.token = open(os.path.join(self.data, "admin.token")).read().strip()

    def call(self, method, path, body=None, conn=None):
        c = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"Authorization": f"Bearer {getattr(self, 'token', '')}"}
        data = None
        if body is not None:
            data = json.dumps(body)
            headers["Content-Type"] = "application/json"
        c.request(method, path, body=data, headers=headers)
        r = c.getresponse()
        out = r.read()
        if conn is None:
            c.close()
        return r.status, out

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def mac(d):
    # 52:54:..: locally administered, unicast.
    return "52:54:%02x:%02x:%02x:%02x" % ((d >> 24) & 255, (d >> 16) & 255, (d >> 8) & 255, d & 255)


def storm(server, devices, clients):
    """Adds `devices` devices from `clients` threads; returns adds per second."""
    next_i = iter(range(devices))
    lock = threading.Lock()
    errors = []

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        while True:
            with lock:
                i = next(next_i, None)
            if i is None:
                break
            st, out = server.call("POST", "/api/v1/devices",
                                  {"name": f"d{i}", "mac": mac(i + 1), "vdisk": "base"}, conn)
            if st != 201:
                errors.append(f"d{i}: {st} {out[:200]!r}")
                break
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    if errors:
        raise SystemExit(f"audit.py: adds failed: {errors[:3]}")
    return devices / wall


def round_(audit, args):
    work = os.path.join(WORK, f"run-{audit}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    etcd = Etcd(work) if args.farm == "etcd" else None
    server = Server(work, audit, etcd)
    try:
        st, out = server.call("POST", "/api/v1/vdisks", {"name": "base", "size": 1 << 30})
        if st != 201:
            raise SystemExit(f"audit.py: creating the vDisk: {st} {out!r}")
        rate = storm(server, args.devices, args.clients)
        st, out = server.call("GET", f"/api/v1/audit?object=device/&limit={args.devices * 2}")
        adds = sum(1 for e in json.loads(out) if e["method"] == "POST" and e["status"] == 201)
        want = args.devices if audit == "on" else 0
        if adds != want:
            raise SystemExit(f"audit.py: the trail holds {adds} device adds, not {want}")
        st, out = server.call("GET", "/api/v1/devices")
        if len(json.loads(out)) != args.devices:
            raise SystemExit("audit.py: the farm does not list every device added")
        return rate
    finally:
        server.stop()
        if etcd:
            etcd.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--farm", choices=["embedded", "etcd"], default="embedded")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if not args.no_build:
        log("building vstream (release)")
        subprocess.run(["cargo", "build", "--release", "-p", "vstream", "--bin", "vstream"],
                       cwd=ROOT, check=True)
    rates = {"on": [], "off": []}
    order = []
    for r in range(args.rounds):
        order += ["on", "off"] if r % 2 == 0 else ["off", "on"]
    for audit in order:
        rate = round_(audit, args)
        rates[audit].append(rate)
        log(f"audit {audit}: {args.devices} adds, {args.clients} clients: {rate:.0f} adds/s")
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    ratio = on / off
    # Each round ran its two servers back to back: the ratio within a round
    # is less moved by the machine's drift than the ratio of the medians.
    pairs = [a / b for a, b in zip(rates["on"], rates["off"])]
    paired = statistics.median(pairs)
    lines = [
        f"device add storm: {args.devices} adds, {args.clients} clients, "
        f"farm state {args.farm}, {args.rounds} rounds each (order {' '.join(order)})",
        "",
        "| audit trail | adds/s (median) | runs |",
        "|---|---|---|",
        f"| on  | {on:.0f} | {' '.join(f'{x:.0f}' for x in rates['on'])} |",
        f"| off | {off:.0f} | {' '.join(f'{x:.0f}' for x in rates['off'])} |",
        "",
        f"on / off = {ratio:.3f}; the trail costs {(1 - ratio) * 100:.1f} % "
        f"of the change rate (target <= 5 %)",
        f"round by round: on / off = {' '.join(f'{x:.2f}' for x in pairs)}; median "
        f"{paired:.3f}, a cost of {(1 - paired) * 100:.1f} %",
    ]
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(WORK, "last-table.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
