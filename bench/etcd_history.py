#!/usr/bin/python3
"""How an etcd farm's etcd grows, with and without the servers compacting its history.

    /usr/bin/python3 bench/etcd_history.py [--secs 300] [--every 60] [--history 20] [--no-build]

Two one-server farms side by side, each on an etcd of its own (free ports, data in
bench/.work/etcd-history/): one server started with `--etcd-history 0` (no compaction,
what every server did before), the other with `--etcd-history HISTORY`. Each imports the
64 MiB file of random bytes (bench/.work/etcd-history/disk.img, written if missing, or
any file given with --image) as a vDisk, so its status names one held version. Every EVERY seconds the script prints each
etcd's revision and database size (`etcdctl endpoint status`); at the end, each size's
growth per minute over the second half of the run, when the compacting one has levelled
off.

Needs etcd and etcdctl; builds target/release/vstream first unless --no-build.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from benchlib import free_port, stop, wait  # noqa: E402

HERE = os.path.join(ROOT, "bench/.work/etcd-history")
VSTREAM = os.path.join(ROOT, "target/release/vstream")


class Farm:
    def __init__(self, history, image):
        self.history = history
        self.dir = os.path.join(HERE, f"history-{history}")
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        client, peer, api = free_port(), free_port(), free_port()
        self.endpoint = f"127.0.0.1:{client}"
        self.etcd = subprocess.Popen(
            ["etcd", "--data-dir", os.path.join(self.dir, "etcd"),
             "--listen-client-urls", f"http://{self.endpoint}",
             "--advertise-client-urls", f"http://{self.endpoint}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"default=http://127.0.0.1:{peer}"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.dir, "etcd.log"), "w"))
        wait("etcd", 20, lambda: self.status() is not None)
        data = os.path.join(self.dir, "data")
        self.server = subprocess.Popen(
            [VSTREAM, "server", "--data", data, "--farm", f"etcd://{self.endpoint}",
             "--name", "s1", "--nbd", "127.0.0.1:0", "--api", f"127.0.0.1:{api}",
             "--etcd-history", str(history)],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.dir, "server.log"), "w"))
        token = os.path.join(data, "admin.token")
        wait("the server's admin token", 30, lambda: os.path.exists(token))
        env = dict(os.environ, VSTREAM_API=f"http://127.0.0.1:{api}", VSTREAM_TOKEN_FILE=token)
        for _ in range(100):
            r = subprocess.run([VSTREAM, "vdisk", "import", "demo", image], env=env,
                               capture_output=True, text=True)
            if r.returncode == 0:
                break
            time.sleep(0.2)
        else:
            raise SystemExit(f"etcd_history.py: vdisk import: {r.stderr.strip()}")

    def status(self):
        r = subprocess.run(["etcdctl", "--endpoints", self.endpoint, "endpoint", "status",
                            "-w", "json"], capture_output=True, text=True,
                           env=dict(os.environ, ETCDCTL_API="3"))
        if r.returncode != 0:
            return None
        s = json.loads(r.stdout)[0]["Status"]
        return int(s["header"]["revision"]), int(s["dbSize"])

    def close(self):
        stop(self.server)
        stop(self.etcd)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--secs", type=int, default=300)
    ap.add_argument("--every", type=int, default=60)
    ap.add_argument("--history", type=int, default=20)
    ap.add_argument("--image", default=os.path.join(HERE, "disk.img"))
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "vstream"], cwd=ROOT, check=True)
    for tool in ("etcd", "etcdctl"):
        if not shutil.which(tool):
            raise SystemExit(f"etcd_history.py: {tool} is missing (bash .ci/install-deps)")
    os.makedirs(HERE, exist_ok=True)
    if not os.path.exists(args.image):
        with open(args.image + ".tmp", "wb") as f:
            f.write(os.urandom(64 << 20))
        os.rename(args.image + ".tmp", args.image)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    farms = [Farm(0, args.image), Farm(args.history, args.image)]
    try:
        rows = []
        t0 = time.monotonic()
        while True:
            t = time.monotonic() - t0
            rows.append((round(t), [f.status() for f in farms]))
            if t >= args.secs:
                break
            time.sleep(min(args.every, args.secs - t))
    finally:
        for f in farms:
            f.close()
    print(f"bench/etcd_history.py, {started}: one server per etcd, one vDisk, "
          f"--etcd-history 0 and {args.history}")
    print()
    print(f"| s | revision | dbSize, history 0 | dbSize, history {args.history} |")
    print("|---:|---:|---:|---:|")
    for t, st in rows:
        sizes = " | ".join("-" if s is None else str(s[1]) for s in st)
        print(f"| {t} | {st[0][0] if st[0] else '-'} | {sizes} |")
    half = [r for r in rows if r[0] >= args.secs / 2]
    if len(half) >= 2 and all(s is not None for s in half[0][1] + half[-1][1]):
        mins = (half[-1][0] - half[0][0]) / 60
        for i, f in enumerate(farms):
            grew = (half[-1][1][i][1] - half[0][1][i][1]) / mins
            print(f"- history {f.history}: {grew / 1024:.1f} KiB per minute over the second half")


if __name__ == "__main__":
    main()
