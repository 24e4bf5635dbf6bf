#!/usr/bin/python3
"""Measure an NBD server's memory per idle connection.

Reads the server's VmRSS, opens N connections that each complete the NBD
fixed-newstyle handshake (NBD_OPT_GO on EXPORT) and then stay idle in the
transmission phase, reads VmRSS again, then ends every connection with
NBD_CMD_DISC. Raw sockets only (no libnbd), so the client itself is cheap.

Usage: idle_conns.py --pid PID (--tcp HOST:PORT | --unix PATH) --export NAME [-n 1000]
Prints one line: "<rss_idle_kib> <rss_with_conns_kib> <connections_ok>".
"""

import argparse
import resource
import socket
import struct
import sys
import time

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9
OPT_GO = 7
REP_ACK = 1
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
REQUEST_MAGIC = 0x25609513
CMD_DISC = 2


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("server closed the connection during the handshake")
        buf += chunk
    return bytes(buf)


def handshake(s, export):
    hello = recv_exact(s, 18)
    if hello[:8] != NBDMAGIC or hello[8:16] != IHAVEOPT:
        raise ConnectionError("not a fixed-newstyle NBD server")
    (sflags,) = struct.unpack(">H", hello[16:18])
    cflags = FLAG_FIXED_NEWSTYLE | (FLAG_NO_ZEROES if sflags & FLAG_NO_ZEROES else 0)
    name = export.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">I", cflags) + IHAVEOPT + struct.pack(">II", OPT_GO, len(data)) + data)
    while True:
        magic, opt, rtype, rlen = struct.unpack(">QIII", recv_exact(s, 20))
        if magic != REPLY_MAGIC or opt != OPT_GO:
            raise ConnectionError("bad option reply")
        payload = recv_exact(s, rlen)
        if rtype == REP_ACK:
            return
        if rtype & 0x80000000:
            raise ConnectionError(f"NBD_OPT_GO refused (reply type {rtype:#x}): {payload[4:]!r}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--tcp")
    ap.add_argument("--unix")
    ap.add_argument("--export", default="")
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--settle", type=float, default=1.0, help="seconds to wait before reading RSS")
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = a.n + 64
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))

    time.sleep(a.settle)
    idle = rss_kib(a.pid)
    socks = []
    err = None
    for i in range(a.n):
        try:
            if a.unix:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(30)
                s.connect(a.unix)
            else:
                host, port = a.tcp.rsplit(":", 1)
                s = socket.create_connection((host, int(port)), timeout=30)
            handshake(s, a.export)
            socks.append(s)
        except (OSError, ConnectionError) as e:
            err = f"connection {i + 1}: {e}"
            break
    time.sleep(a.settle)
    loaded = rss_kib(a.pid)
    for s in socks:
        try:
            s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        except OSError:
            pass
    for s in socks:
        s.close()
    if err:
        print(f"idle_conns: stopped after {len(socks)} connections: {err}", file=sys.stderr)
    print(idle, loaded, len(socks))


if __name__ == "__main__":
    main()
