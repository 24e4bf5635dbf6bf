#!/usr/bin/python3
"""The iSCSI front door against Debian's tgt and against vstream's own NBD door, in one run.

    /usr/bin/python3 bench/iscsi.py [--runtime 15] [--seq-runs 3] [--rounds 2] [--qd 32]

One vstream server (`--nbd` and `--iscsi` on loopback) serves a Private device on the
same 2 GiB random image that bench/compare.sh uses (bench/.work/disk.raw, written here if
missing); tgtd serves that image file as LUN 1 of its own target. Every figure comes from
the same client on both sides of a comparison:

- random 4 KiB reads at QD (32): libiscsi's `iscsi-perf -r -m QD -b 8` for vstream's iSCSI
  target and tgt (RUNTIME s each); `fio --ioengine=nbd` at the same depth for vstream's NBD
  door, for the CPU-per-read comparison;
- sequential reads: `qemu-img bench -c N -d 4 -s 256k` over the whole image, iscsi:// for
  vstream and tgt, nbd:// for vstream's NBD door (SEQ_RUNS times; GiB/s of the median).

Server CPU is utime+stime of the server's /proc/PID/stat (all threads), read when the
client's first and last progress line arrive (iscsi-perf) or around the client's run.
Each round runs vstream-iscsi, tgt, vstream-nbd and then the reverse order; a figure is
the median over rounds. The page cache is warmed first, so no read touches the disk.
Prints a table and the issue's ratios; logs in bench/.work/iscsi/.
"""
import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from benchlib import HZ, log, machine_busy, stop, ticks  # noqa: E402

WORK = os.path.join(ROOT, "bench/.work")
HERE = os.path.join(WORK, "iscsi")
IMAGE = os.path.join(WORK, "disk.raw")
GIB = 1 << 30
IQN_TGT = "iqn.2026-12.org.vstream.bench:tgt"
INITIATOR_TGT = "iqn.2026-12.org.vstream.bench:client"


def die(msg):
    raise SystemExit(f"iscsi.py: {msg}")


def free_port_block(n):
    for base in range(20900, 21900, 10):
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", p)) == 0:
                    ok = False
                    break
        if ok:
            return base
    die("no free ports")


def healthy(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


class Vstream:
    def __init__(self, binary, base):
        self.bin, self.nbd, self.api, self.iscsi = binary, base, base + 1, base + 2
        self.data = os.path.join(HERE, "store")
        shutil.rmtree(self.data, ignore_errors=True)
        self.logf = open(os.path.join(HERE, "vstream.log"), "w")
        self.proc = subprocess.Popen(
            [binary, "server", "--data", self.data, "--nbd", f"127.0.0.1:{self.nbd}",
             "--api", f"127.0.0.1:{self.api}", "--iscsi", f"127.0.0.1:{self.iscsi}"],
            stdout=subprocess.DEVNULL, stderr=self.logf)
        self.env = dict(os.environ, VSTREAM_API=f"http://127.0.0.1:{self.api}",
                        VSTREAM_TOKEN_FILE=os.path.join(self.data, "admin.token"))
        for _ in range(300):
            if self.proc.poll() is not None:
                die(f"vstream exited at start; see {self.logf.name}")
            if os.path.exists(os.path.join(self.data, "admin.token")) and healthy(self.api):
                break
            time.sleep(0.05)
        else:
            die(f"vstream's API did not answer; see {self.logf.name}")
        log("vstream: importing the image")
        self.cli("vdisk", "import", "bench", IMAGE)
        self.cli("vdisk", "set", "bench", "--mode", "private")
        self.cli("device", "add", "dev1", "--mac", "52:54:00:00:09:01", "--vdisk", "bench")
        a = json.loads(self.cli("device", "show", "dev1", "--secrets", "--json").stdout)
        self.initiator, self.target = a["initiator"], a["target"]
        self.user, self.secret = a["chap_user"], a["chap_secret"]

    def cli(self, *args, check=True):
        r = subprocess.run([self.bin, *args], env=self.env, capture_output=True, text=True)
        if check and r.returncode != 0:
            die(f"vstream {' '.join(args)}: {r.stderr.strip()}")
        return r

    def stop(self):
        stop(self.proc)


class Tgt:
    def __init__(self, port, control):
        self.port, self.control = port, control
        self.proc = subprocess.Popen(
            ["tgtd", "-f", "-C", str(control), "--iscsi", f"portal=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(HERE, "tgtd.log"), "w"))
        self.adm("--op", "new", "--mode", "target", "--tid", "1", "-T", IQN_TGT)
        self.adm("--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", IMAGE)
        self.adm("--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")

    def adm(self, *args):
        for _ in range(100):
            r = subprocess.run(["tgtadm", "-C", str(self.control), "--lld", "iscsi", *args],
                               capture_output=True)
            if r.returncode == 0:
                return
            time.sleep(0.05)
        die(f"tgtadm {' '.join(args)}: {r.stderr.decode().strip()}")

    def stop(self):
        stop(self.proc)


class Door:
    """One target as the clients see it: its URLs and the server process to watch."""

    def __init__(self, name, pid, perf_url=None, perf_initiator=None, qemu=None, nbd=None):
        self.name, self.pid = name, pid
        self.perf_url, self.perf_initiator = perf_url, perf_initiator
        self.qemu, self.nbd = qemu, nbd
        self.runs = []


def iscsi_perf(door, qd, runtime):
    """(IOPS, server µs per read, foreign share) from iscsi-perf's progress lines."""
    cmd = ["iscsi-perf", "-i", door.perf_initiator, "-m", str(qd), "-b", "8", "-r",
           door.perf_url]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    line_re = re.compile(rb"(\d+):(\d+):(\d+) - lba \d+, iops current \d+ \(.*?\), "
                         rb"iops average (\d+)")
    first = last = None
    buf = b""
    deadline = time.monotonic() + runtime + 30
    os.set_blocking(p.stdout.fileno(), True)
    while time.monotonic() < deadline:
        chunk = p.stdout.read1(4096)
        if not chunk:
            break
        buf += chunk
        for m in line_re.finditer(buf):
            secs = int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])
            point = (secs, int(m[4]), ticks(door.pid), machine_busy())
            if first is None:
                first = point
            last = point
        buf = buf[-300:] if not line_re.search(buf[-300:]) else b""
        if first and last[0] - first[0] >= runtime:
            break
    p.terminate()
    out, _ = p.communicate(timeout=10)
    if not first or last[0] == first[0]:
        die(f"iscsi-perf against {door.name} printed no progress: {(buf + out)[-500:]!r}")
    reads = last[1] * last[0] - first[1] * first[0]
    secs = last[0] - first[0]
    server = (last[2] - first[2]) / HZ
    busy, total = last[3][0] - first[3][0], last[3][1] - first[3][1]
    # The client is this machine's other busy process; the rest is foreign work.
    foreign = max(0.0, busy / HZ - 2 * server) / (total / HZ) if total else 0
    return reads / secs, server * 1e6 / reads, foreign


def fio_nbd(door, qd, runtime):
    js = os.path.join(HERE, f"fio-{door.name}.json")
    t0, m0 = ticks(door.pid), machine_busy()
    subprocess.run(["fio", "--ioengine=nbd", f"--uri={door.nbd}", "--rw=randread", "--bs=4k",
                    f"--iodepth={qd}", f"--runtime={runtime}", "--time_based", "--size=2G",
                    "--name=x", "--output-format=json", f"--output={js}"],
                   check=True, capture_output=True)
    t1, m1 = ticks(door.pid), machine_busy()
    r = json.load(open(js))["jobs"][0]["read"]
    server = (t1 - t0) / HZ
    total = (m1[1] - m0[1]) / HZ
    foreign = max(0.0, (m1[0] - m0[0]) / HZ - 2 * server) / total if total else 0
    return r["iops"], server * 1e6 / r["total_ios"], foreign


def sequential(door, runs):
    size = os.path.getsize(IMAGE)
    count = size // (256 << 10)
    walls = []
    t0 = ticks(door.pid)
    for _ in range(runs):
        args = ["qemu-img", "bench", "-c", str(count), "-d", "4", "-s", "256k"]
        args += door.qemu if door.qemu else ["-f", "raw", door.nbd]
        s = time.monotonic()
        r = subprocess.run(args, capture_output=True, text=True)
        if r.returncode != 0:
            die(f"qemu-img bench against {door.name}: {r.stderr.strip()}")
        walls.append(time.monotonic() - s)
    server = (ticks(door.pid) - t0) / HZ
    return size / GIB / statistics.median(walls), server / (runs * size / GIB)


def wait_openable(door):
    """A device is on one door at a time: wait until the other door let it go."""
    for _ in range(200):
        if door.nbd:
            ok = subprocess.run(["nbdinfo", "--size", door.nbd], capture_output=True)
        else:
            ok = subprocess.run(["iscsi-inq", "-i", door.perf_initiator, door.perf_url],
                                capture_output=True)
        if ok.returncode == 0:
            return
        time.sleep(0.05)
    die(f"{door.name} cannot be opened")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=15)
    ap.add_argument("--seq-runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--qd", type=int, default=32)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/vstream"))
    args = ap.parse_args()
    for tool in ("iscsi-perf", "iscsi-inq", "tgtd", "tgtadm", "qemu-img", "fio", "nbdinfo"):
        if not shutil.which(tool):
            die(f"{tool} is missing (bash .ci/install-deps installs it)")
    if not os.path.exists(args.bin):
        die(f"{args.bin} is missing: cargo build --release -p vstream")
    os.makedirs(HERE, exist_ok=True)
    if not os.path.exists(IMAGE):
        log(f"writing {IMAGE}: 2 GiB of random data")
        # The same bytes as bench/compare.sh writes, so either script can make it.
        subprocess.run("openssl enc -aes-128-ctr -pass pass:vstream-bench -nosalt -pbkdf2 "
                       f"</dev/zero 2>/dev/null | head -c {2 * GIB} >'{IMAGE}.tmp'",
                       shell=True, check=False)
        if os.path.getsize(IMAGE + ".tmp") != 2 * GIB:
            die(f"could not write {IMAGE}")
        os.rename(IMAGE + ".tmp", IMAGE)
    base = free_port_block(5)
    vs = Vstream(args.bin, base)
    tgt = Tgt(base + 3, base + 4)
    try:
        for path in [IMAGE] + [os.path.join(d, f) for d, _, fs in os.walk(vs.data) for f in fs
                               if f.endswith(".layer")]:
            subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)
        vurl = f"iscsi://{vs.user}%{vs.secret}@127.0.0.1:{vs.iscsi}/{vs.target}/0"
        # qemu-img bench takes no --object: the CHAP secret goes in the options
        # (a throwaway bench device's, on loopback).
        vqemu = ["--image-opts",
                 f"driver=iscsi,transport=tcp,portal=127.0.0.1:{vs.iscsi},target={vs.target},"
                 f"lun=0,user={vs.user},password={vs.secret},initiator-name={vs.initiator}"]
        turl = f"iscsi://127.0.0.1:{tgt.port}/{IQN_TGT}/1"
        tqemu = ["--image-opts", f"driver=iscsi,transport=tcp,portal=127.0.0.1:{tgt.port},"
                 f"target={IQN_TGT},lun=1,initiator-name={INITIATOR_TGT}"]
        doors = [
            Door("vstream-iscsi", vs.proc.pid, vurl, vs.initiator, qemu=vqemu),
            Door("tgt", tgt.proc.pid, turl, INITIATOR_TGT, qemu=tqemu),
            Door("vstream-nbd", vs.proc.pid, nbd=f"nbd://127.0.0.1:{vs.nbd}/device/dev1"),
        ]
        order = []
        for r in range(args.rounds):
            order += doors if r % 2 == 0 else doors[::-1]
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        for door in order:
            wait_openable(door)
            if door.nbd:
                iops, us, f1 = fio_nbd(door, args.qd, args.runtime)
            else:
                iops, us, f1 = iscsi_perf(door, args.qd, args.runtime)
            wait_openable(door)
            gibs, s_gib = sequential(door, args.seq_runs)
            run = {"QD IOPS": iops, "server µs/read": us, "seq GiB/s": gibs,
                   "server s/GiB": s_gib, "foreign %": 100 * f1}
            log(f"{door.name}: " + ", ".join(f"{k} {x:.3g}" for k, x in run.items()))
            door.runs.append(run)
    finally:
        vs.stop()
        tgt.stop()
    med = {d.name: {k: statistics.median(r[k] for r in d.runs) for k in d.runs[0]} for d in doors}
    for d in doors:
        med[d.name]["foreign %"] = max(r["foreign %"] for r in d.runs)
    print(f"bench/iscsi.py, {started}, {args.rounds} rounds (order "
          f"{','.join(d.name for d in order)}), random 4 KiB reads at QD{args.qd} for "
          f"{args.runtime} s (iscsi-perf; fio for NBD), {args.seq_runs} sequential runs "
          f"(qemu-img bench, 256 KiB x 4); medians over rounds")
    print()
    keys = list(doors[0].runs[0])
    print("| door | " + " | ".join(k.replace("QD", f"QD{args.qd}") for k in keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for d in doors:
        cells = [f"{med[d.name][k]:.0f}" if med[d.name][k] >= 1000 or k == "foreign %"
                 else f"{med[d.name][k]:.3g}" for k in keys]
        print(f"| {d.name} | " + " | ".join(cells) + " |")
    v, t, n = med["vstream-iscsi"], med["tgt"], med["vstream-nbd"]
    print()
    print(f"- QD{args.qd} IOPS, vstream iSCSI / tgt: {v['QD IOPS'] / t['QD IOPS']:.2f} (target ≥ 2)")
    print(f"- server CPU per read, vstream iSCSI / vstream NBD: "
          f"{v['server µs/read'] / n['server µs/read']:.2f} (target ≤ 1.2)")
    print(f"- server CPU per read, vstream iSCSI / tgt: "
          f"{v['server µs/read'] / t['server µs/read']:.2f}")
    print(f"- sequential, vstream iSCSI / vstream NBD: {v['seq GiB/s'] / n['seq GiB/s']:.2f} "
          f"(target ≥ 0.9)")
    print(f"- sequential, vstream iSCSI / tgt: {v['seq GiB/s'] / t['seq GiB/s']:.2f}")


if __name__ == "__main__":
    main()
