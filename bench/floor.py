#!/usr/bin/python3
"""The NBD data path against the floor and nbdkit, in one run (issue 21's data-path targets).

    /usr/bin/python3 bench/floor.py [--runtime 10] [--seq-runs 3] [--rounds 2] [--qd 32]
                                    [--old-bin PATH] [--variant NAME:VAR=VALUE ...]

The same 2 GiB random image as bench/compare.sh (bench/.work/disk.raw, written here if
missing) served by three servers, one at a time, each measured by the same clients:

- vstream: `vstream server` on loopback, the image imported as a vDisk open to anonymous
  readers (`--anonymous-read on`), read through its read-only export;
- nbdkit: `nbdkit -r file disk.raw`;
- floor: `storm-floor` (bench/storm/src/bin/storm-floor.rs), the image in memory, one
  blocking thread per connection, every READ answered with one writev: the least CPU per
  read a server can spend here.

Random: `fio --ioengine=nbd --rw=randread --bs=4k --iodepth=QD`, one connection, RUNTIME
s: IOPS and server µs per read (utime+stime of the server's /proc/PID/stat, all threads,
over fio's total_ios). Sequential: `nbdcopy URL null:` (4 connections, 256 KiB requests)
SEQ_RUNS times: GiB/s of the median and server CPU s per GiB. The page cache holds the
image (read before each server). Rounds alternate the order; figures are medians over
rounds, and the table gives each against the floor's.

"+ client" columns add the clients' CPU (fio, nbdcopy: this script's children) to the
server's. Over loopback the receiving half of TCP (the client socket's segment processing
and its wakeups) runs in whichever process's context delivers or drains the segments:
the sender's softirq, or the receiver's own release of its socket. Which one depends on
timing, so a server can look cheaper by leaving that work to its client. The floor does:
its copies keep the client's socket backed up, and the client drains it
(bench/notes/datapath.md, "Who pays for loopback's receive side").

A/B in the same run: `--old-bin PATH` adds `vstream-old`, another vstream binary (an
older build) on the same store; `--variant NAME:VAR=VALUE` (repeatable) adds a row NAME,
this build run with the environment variable VAR=VALUE (a knob such as
VSTREAM_NBD_SENDFILE_MIN). Each such row is also given against `vstream`.
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from benchlib import HZ, free_port, machine_busy, stop, ticks  # noqa: E402

WORK = os.path.join(ROOT, "bench/.work")
HERE = os.path.join(WORK, "floor")
IMAGE = os.path.join(WORK, "disk.raw")
REL = os.path.join(ROOT, "target/release")
GIB = 1 << 30


def log(msg):
    print(time.strftime("%H:%M:%S"), "floor.py:", msg, file=sys.stderr, flush=True)


def die(msg):
    raise SystemExit(f"floor.py: {msg}")








def wait_nbd(url, proc, what):
    for _ in range(400):
        if proc.poll() is not None:
            die(f"{what} exited at start")
        if subprocess.run(["nbdinfo", "--size", url], capture_output=True).returncode == 0:
            return
        time.sleep(0.05)
    die(f"{what} does not answer at {url}")




def vstream_store():
    """A store with the image imported, made once per run."""
    data = os.path.join(HERE, "vstream-data")
    shutil.rmtree(data, ignore_errors=True)
    api = free_port()
    p = subprocess.Popen([os.path.join(REL, "vstream"), "server", "--data", data,
                          "--nbd", f"127.0.0.1:{free_port()}", "--api", f"127.0.0.1:{api}"],
                         stdout=subprocess.DEVNULL, stderr=open(os.path.join(HERE, "import.log"), "w"))
    try:
        token = os.path.join(data, "admin.token")
        for _ in range(400):
            try:
                if os.path.exists(token):
                    urllib.request.urlopen(f"http://127.0.0.1:{api}/healthz", timeout=1)
                    break
            except OSError:
                pass
            time.sleep(0.05)
        env = dict(os.environ, VSTREAM_API=f"http://127.0.0.1:{api}", VSTREAM_TOKEN_FILE=token)
        for args in (["vdisk", "import", "bench", IMAGE], ["vdisk", "set", "bench", "--anonymous-read", "on"]):
            r = subprocess.run([os.path.join(REL, "vstream"), *args], env=env, capture_output=True, text=True)
            if r.returncode != 0:
                die(f"vstream {' '.join(args)}: {r.stderr.strip()}")
    finally:
        stop(p)
    return data


def start(kind, data, args):
    port = free_port()
    env = None
    if kind not in ("nbdkit", "floor"):
        binary = os.path.join(REL, "vstream")
        if kind == "vstream-old":
            binary = os.path.abspath(args.old_bin)
        elif kind != "vstream":
            var, _, value = args.variants[kind].partition("=")
            env = dict(os.environ, **{var: value})
        cmd = [binary, "server", "--data", data, "--nbd", f"127.0.0.1:{port}",
               "--api", f"127.0.0.1:{free_port()}"]
        url = f"nbd://127.0.0.1:{port}/bench"
    elif kind == "nbdkit":
        cmd = ["nbdkit", "-f", "-r", "-i", "127.0.0.1", "-p", str(port), "file", IMAGE]
        url = f"nbd://127.0.0.1:{port}/"
    else:
        cmd = [os.path.join(REL, "storm-floor"), "--listen", f"127.0.0.1:{port}", "--image", IMAGE]
        url = f"nbd://127.0.0.1:{port}/"
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env,
                         stderr=open(os.path.join(HERE, f"{kind}.log"), "a"))
    wait_nbd(url, p, kind)
    return p, url


def child_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measure(proc, fn):
    t0, m0, c0 = ticks(proc.pid), machine_busy(), child_cpu()
    out = fn()
    t1, m1, c1 = ticks(proc.pid), machine_busy(), child_cpu()
    server = (t1 - t0) / HZ
    total = (m1[1] - m0[1]) / HZ
    # The clients (fio, nbdcopy) are this script's children, waited for: what the
    # machine did besides them and the server is other work.
    client = c1 - c0
    foreign = max(0.0, (m1[0] - m0[0]) / HZ - server - client) / total if total else 0
    return out, server, client, foreign


def one(kind, data, args):
    proc, url = start(kind, data, args)
    try:
        js = os.path.join(HERE, f"fio-{kind}.json")

        def fio():
            subprocess.run(["fio", "--ioengine=nbd", f"--uri={url}", "--rw=randread", "--bs=4k",
                            f"--iodepth={args.qd}", f"--runtime={args.runtime}", "--time_based",
                            "--size=2G", "--name=x", "--output-format=json", f"--output={js}"],
                           check=True, capture_output=True)
            r = json.load(open(js))["jobs"][0]["read"]
            return r["iops"], r["total_ios"]
        (iops, ios), s_rand, c_rand, f1 = measure(proc, fio)

        def seq():
            walls = []
            for _ in range(args.seq_runs):
                t = time.monotonic()
                subprocess.run(["nbdcopy", url, "null:"], check=True)
                walls.append(time.monotonic() - t)
            return walls
        walls, s_seq, c_seq, f2 = measure(proc, seq)
    finally:
        stop(proc)
    gib = args.seq_runs * os.path.getsize(IMAGE) / GIB
    return {"IOPS": iops, "µs/read": s_rand * 1e6 / ios,
            "both µs/read": (s_rand + c_rand) * 1e6 / ios,
            "seq GiB/s": os.path.getsize(IMAGE) / GIB / statistics.median(walls),
            "s/GiB": s_seq / gib, "both s/GiB": (s_seq + c_seq) / gib,
            "foreign %": 100 * max(f1, f2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--seq-runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--qd", type=int, default=32)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--old-bin", help="another vstream binary, run as vstream-old")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:VAR=VALUE: this build with an environment variable, as row NAME")
    args = ap.parse_args()
    args.variants = {}
    for v in args.variant:
        name, _, assign = v.partition(":")
        if not name or "=" not in assign or name in ("vstream", "vstream-old", "nbdkit", "floor"):
            die(f"--variant {v!r}: give NAME:VAR=VALUE with a new NAME")
        args.variants[name] = assign
    for tool in ("nbdkit", "fio", "nbdcopy", "nbdinfo"):
        if not shutil.which(tool):
            die(f"{tool} is missing (bash .ci/install-deps installs it)")
    if not args.no_build:
        log("cargo build --release -p vstream -p vstream-storm")
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "vstream", "-p", "vstream-storm"],
                       cwd=ROOT, check=True)
    os.makedirs(HERE, exist_ok=True)
    if not os.path.exists(IMAGE):
        log(f"writing {IMAGE}: 2 GiB of random data")
        subprocess.run("openssl enc -aes-128-ctr -pass pass:vstream-bench -nosalt -pbkdf2 "
                       f"</dev/zero 2>/dev/null | head -c {2 * GIB} >'{IMAGE}.tmp'", shell=True)
        if os.path.getsize(IMAGE + ".tmp") != 2 * GIB:
            die(f"could not write {IMAGE}")
        os.rename(IMAGE + ".tmp", IMAGE)
    data = vstream_store()
    layers = [os.path.join(d, f) for d, _, fs in os.walk(data) for f in fs if f.endswith(".layer")]
    kinds = ["vstream", *(["vstream-old"] if args.old_bin else []), *args.variants, "nbdkit", "floor"]
    order = []
    for r in range(args.rounds):
        order += kinds if r % 2 == 0 else kinds[::-1]
    runs = {k: [] for k in kinds}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for kind in order:
        for path in [IMAGE] + layers:
            subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)
        r = one(kind, data, args)
        log(f"{kind}: " + ", ".join(f"{k} {v:.3g}" for k, v in r.items()))
        runs[kind].append(r)
    med = {k: {m: statistics.median(r[m] for r in runs[k]) for m in runs[k][0]} for k in kinds}
    for k in kinds:
        med[k]["foreign %"] = max(r["foreign %"] for r in runs[k])
    print(f"bench/floor.py, {started}, {args.rounds} rounds (order {','.join(order)}), fio 4 KiB "
          f"randread QD{args.qd} for {args.runtime} s, {args.seq_runs} nbdcopy runs; medians")
    print()
    print(f"| server | QD{args.qd} IOPS | server µs/read | + client | seq GiB/s | server s/GiB | "
          "+ client | foreign % | IOPS / floor | µs/read / floor | + client | seq / floor | "
          "s/GiB / floor | + client |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    f = med["floor"]
    for k in kinds:
        m = med[k]
        print(f"| {k} | {m['IOPS']:.0f} | {m['µs/read']:.2f} | {m['both µs/read']:.2f} | "
              f"{m['seq GiB/s']:.2f} | {m['s/GiB']:.3f} | {m['both s/GiB']:.3f} | "
              f"{m['foreign %']:.0f} | {m['IOPS'] / f['IOPS']:.2f} | "
              f"{m['µs/read'] / f['µs/read']:.2f} | {m['both µs/read'] / f['both µs/read']:.2f} | "
              f"{m['seq GiB/s'] / f['seq GiB/s']:.2f} | {m['s/GiB'] / f['s/GiB']:.2f} | "
              f"{m['both s/GiB'] / f['both s/GiB']:.2f} |")
    v, n = med["vstream"], med["nbdkit"]
    print()
    print(f"- vstream / nbdkit: IOPS {v['IOPS'] / n['IOPS']:.2f} (target ≥ 1.25), CPU per read "
          f"{v['µs/read'] / n['µs/read']:.2f} (target ≤ 0.6)")
    print(f"- vstream / floor: IOPS {v['IOPS'] / f['IOPS']:.2f} (target ≥ 0.95), CPU per read "
          f"{v['µs/read'] / f['µs/read']:.2f} (target ≤ 1.15); sequential "
          f"{v['seq GiB/s'] / f['seq GiB/s']:.2f} (target ≥ 0.97) at "
          f"{v['s/GiB'] / f['s/GiB']:.2f} the CPU per GiB (target ≤ 1.15)")
    print(f"- the same with the clients' CPU added (server + client, what the transfer costs this "
          f"machine): CPU per read {v['both µs/read'] / f['both µs/read']:.2f} the floor's and "
          f"{v['both µs/read'] / n['both µs/read']:.2f} nbdkit's; CPU per GiB "
          f"{v['both s/GiB'] / f['both s/GiB']:.2f} the floor's")
    for k in kinds:
        if k in ("vstream", "nbdkit", "floor"):
            continue
        o = med[k]
        print(f"- vstream / {k}: IOPS {v['IOPS'] / o['IOPS']:.2f}, CPU per read "
              f"{v['µs/read'] / o['µs/read']:.2f}; sequential {v['seq GiB/s'] / o['seq GiB/s']:.2f} "
              f"at {v['s/GiB'] / o['s/GiB']:.2f} the CPU per GiB")


if __name__ == "__main__":
    main()
