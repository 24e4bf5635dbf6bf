"""What the bench scripts share: a process's CPU and memory from /proc, the machine's
busy time, free ports, waiting, logging, and stopping what a script started.

    sys.path.insert(0, BENCH_DIR); from benchlib import ticks, machine_busy, ...
"""
import os
import socket
import subprocess
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def ticks(pid):
    """utime+stime+cutime+cstime of process `pid` (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15])


def rss_kib(pid):
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE // 1024


def machine_busy():
    """(busy, total) jiffies of the whole machine since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7], sum(v)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc, timeout=15):
    """SIGTERM, then SIGKILL after `timeout` s."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def log(msg):
    """`msg` on stderr, after the time of day."""
    print(time.strftime("%H:%M:%S"), msg, file=sys.stderr, flush=True)


def wait(what, secs, pred):
    """`pred()`'s first true value within `secs` s (an exception counts as not yet);
    the script ends, naming `what`, if none comes."""
    end = time.monotonic() + secs
    while time.monotonic() < end:
        try:
            v = pred()
            if v:
                return v
        except Exception:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{os.path.basename(sys.argv[0])}: gave up waiting for {what}")
