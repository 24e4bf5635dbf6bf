#!/usr/bin/python3
"""NBD over TLS, A/B: a few server variants measured in one run, interleaved.

    /usr/bin/python3 bench/tls_ab.py VARIANT... [--order A,B,B,A] [--seq-runs 3] [--runtime 10] [--qd 32]

A VARIANT is NAME=KIND[:BIN][,ENV=VALUE...]: KIND is `plain` (vstream, nbd://), `tls`
(vstream --tls require, nbds://) or `nbdkit-tls` (nbdkit --tls=require file); BIN is a
vstream binary (default target/release/vstream); ENV=VALUE is set in the server's
environment. For example, two builds, and plain and nbdkit for reference:

    bench/tls_ab.py old=tls:/tmp/vstream-old new=tls plain=plain nbdkit=nbdkit-tls \\
        --order old,new,plain,nbdkit,nbdkit,plain,new,old

It reuses what bench/compare.sh left in bench/.work (run that first, with a -tls server
in BENCH_SERVERS): the 2 GiB image, the vstream store with --anonymous-read on, and the
PKI. For each run of a variant: a fresh server; `nbdcopy URL null:` SEQ_RUNS times (GiB/s
of the median wall time); `fio --ioengine=nbd` 4 KiB randread at QD (32) for RUNTIME s. CPU
per GiB and per read for the server (utime+stime of /proc/PID/stat, all threads) and for
the client (the children's rusage): both ends share this machine's CPUs. A variant's
figure is the median of its runs. Prints a table; logs in bench/.work/tls_ab/.
"""
import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import log  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "bench/.work")
IMAGE = os.path.join(WORK, "disk.raw")
PKI = os.path.join(WORK, "pki")
HZ = os.sysconf("SC_CLK_TCK")
GIB = 1 << 30


def server_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15])


def child_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def machine_busy():
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7], sum(v)


class Variant:
    def __init__(self, spec):
        name, _, rest = spec.partition("=")
        kind_bin, *envs = rest.split(",")
        kind, _, binary = kind_bin.partition(":")
        if kind not in ("plain", "tls", "nbdkit-tls"):
            raise SystemExit(f"tls_ab.py: {spec!r}: KIND is plain, tls or nbdkit-tls")
        self.name, self.kind = name, kind
        self.bin = binary or os.path.join(ROOT, "target/release/vstream")
        self.env = dict(e.split("=", 1) for e in envs)
        self.runs = []


def start(v, port, logf):
    env = dict(os.environ, **v.env)
    if v.kind == "nbdkit-tls":
        cmd = ["nbdkit", "-f", "-r", "-i", "127.0.0.1", "-p", str(port), "--tls=require",
               f"--tls-certificates={PKI}/server", "file", IMAGE]
    else:
        cmd = [v.bin, "server", "--data", os.path.join(WORK, "vstream-data"),
               "--nbd", f"127.0.0.1:{port}", "--api", f"127.0.0.1:{port + 1}"]
        if v.kind == "tls":
            cmd += ["--tls", "require", "--tls-certificates", f"{PKI}/server"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(logf, "a"), env=env)
    url = url_of(v, port)
    for _ in range(200):
        if subprocess.run(["nbdinfo", "--size", url], env=client_env(v), capture_output=True).returncode == 0:
            return proc
        if proc.poll() is not None:
            raise SystemExit(f"tls_ab.py: {v.name} exited at start; see {logf}")
        time.sleep(0.05)
    raise SystemExit(f"tls_ab.py: {v.name} did not answer; see {logf}")


def url_of(v, port):
    scheme = "nbd" if v.kind == "plain" else "nbds"
    return f"{scheme}://127.0.0.1:{port}/bench"


def client_env(v):
    env = dict(os.environ)
    if v.kind != "plain":
        env["HOME"] = os.path.join(PKI, "client-home")
    return env


def measured(pid, fn):
    """Runs fn(); returns its result, server s, client s, foreign share."""
    s0, c0, m0 = server_ticks(pid), child_cpu(), machine_busy()
    out = fn()
    s1, c1, m1 = server_ticks(pid), child_cpu(), machine_busy()
    server, client = (s1 - s0) / HZ, c1 - c0
    total = (m1[1] - m0[1]) / HZ
    foreign = max(0.0, (m1[0] - m0[0]) / HZ - server - client) / total if total else 0
    return out, server, client, foreign


def one_run(v, port, seq_runs, runtime, qd, logdir):
    proc = start(v, port, os.path.join(logdir, f"{v.name}.log"))
    env = client_env(v)
    url = url_of(v, port)
    try:
        def seq():
            walls = []
            for _ in range(seq_runs):
                t0 = time.monotonic()
                subprocess.run(["nbdcopy", url, "null:"], env=env, check=True)
                walls.append(time.monotonic() - t0)
            return walls
        walls, s_seq, c_seq, f_seq = measured(proc.pid, seq)
        size = os.path.getsize(IMAGE)
        js = os.path.join(logdir, f"fio-{v.name}-{len(v.runs)}.json")

        def fio():
            subprocess.run(["fio", "--ioengine=nbd", f"--uri={url}", "--rw=randread", "--bs=4k",
                            f"--iodepth={qd}", f"--runtime={runtime}", "--time_based", "--size=2G",
                            "--name=x", "--output-format=json", f"--output={js}"],
                           env=env, check=True, capture_output=True)
            r = json.load(open(js))["jobs"][0]["read"]
            return r["iops"], r["total_ios"]
        (iops, ios), s_fio, c_fio, f_fio = measured(proc.pid, fio)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    gib = seq_runs * size / GIB
    run = {
        "seq GiB/s": size / GIB / statistics.median(walls),
        "seq server s/GiB": s_seq / gib,
        "seq client s/GiB": c_seq / gib,
        f"QD{qd} IOPS": iops,
        f"QD{qd} server µs/read": s_fio * 1e6 / ios,
        f"QD{qd} client µs/read": c_fio * 1e6 / ios,
        "foreign %": 100 * max(f_seq, f_fio),
    }
    log(f"{v.name}: " + ", ".join(f"{k} {x:.3g}" for k, x in run.items()))
    v.runs.append(run)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--order", help="comma-separated variant names (default: each, then reversed)")
    ap.add_argument("--seq-runs", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--qd", type=int, default=32, help="fio's iodepth")
    ap.add_argument("--port", type=int, default=20849)
    args = ap.parse_args()
    for need in (IMAGE, os.path.join(PKI, "server/server-key.pem"), os.path.join(WORK, "vstream-data")):
        if not os.path.exists(need):
            raise SystemExit(f"tls_ab.py: {need} missing: run bench/compare.sh with a -tls server first")
    variants = {v.name: v for v in map(Variant, args.variants)}
    order = args.order.split(",") if args.order else list(variants) + list(variants)[::-1]
    logdir = os.path.join(WORK, "tls_ab")
    os.makedirs(logdir, exist_ok=True)
    for p in (args.port, args.port + 1):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", p)) == 0:
                raise SystemExit(f"tls_ab.py: port {p} is in use; give --port")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for name in order:
        one_run(variants[name], args.port, args.seq_runs, args.runtime, args.qd, logdir)
    keys = list(next(iter(variants.values())).runs[0])
    print(f"bench/tls_ab.py, {started}, order {','.join(order)}, {args.seq_runs} nbdcopy runs, "
          f"fio {args.runtime} s at QD{args.qd}; medians of each variant's runs (foreign: the most other work took)")
    print()
    print("| variant | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for v in variants.values():
        cells = []
        for k in keys:
            vals = [r[k] for r in v.runs]
            m = max(vals) if k == "foreign %" else statistics.median(vals)
            cells.append(f"{m:.0f}" if m >= 1000 or k == "foreign %" else f"{m:.3g}")
        print(f"| {v.name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
