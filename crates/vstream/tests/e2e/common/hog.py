#!/usr/bin/python3
"""A client that tries to hold a server's every connection (crates/vstream/tests/e2e/exhaustion.rs).

  hog.py nbd HOST PORT EXPORT N SRC
      Opens up to N NBD connections from address SRC, each through NBD_OPT_GO
      on EXPORT, and leaves them idle. Prints "ok=A refused=B stalled=C" once
      done (refused: closed by the server; stalled: no greeting within 2 s,
      the attempt stops after 3 of those), then, each time a line comes on
      stdin, "open=X closed=Y" for the connections it holds. Exits on EOF.

  hog.py api HOST PORT N SRC SECS
      Slowloris: keeps N connections from SRC each sending one more header
      line of a never-ending request every SECS seconds, and opens a new one
      for each the server closes. Prints "opened=A" once the first N are
      open, then "closed_by_server=C" for each line on stdin. Exits on EOF.

Raw sockets only, so the client costs little.
"""

import resource
import select
import socket
import struct
import sys
import threading
import time

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9
OPT_GO = 7
REP_ACK = 1


class Refused(Exception):
    pass


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise Refused("closed by the server")
        buf += chunk
    return bytes(buf)


def nbd_go(s, export):
    hello = recv_exact(s, 18)
    if hello[:8] != NBDMAGIC or hello[8:16] != IHAVEOPT:
        raise Refused("not a fixed-newstyle NBD server")
    (sflags,) = struct.unpack(">H", hello[16:18])
    cflags = 1 | (2 if sflags & 2 else 0)
    name = export.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">I", cflags) + IHAVEOPT + struct.pack(">II", OPT_GO, len(data)) + data)
    while True:
        magic, opt, rtype, rlen = struct.unpack(">QIII", recv_exact(s, 20))
        payload = recv_exact(s, rlen)
        if rtype == REP_ACK:
            return
        if rtype & 0x80000000:
            raise Refused(f"NBD_OPT_GO refused: {payload[4:]!r}")


def connect(host, port, src):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((src, 0))
    s.settimeout(2)
    s.connect((host, port))
    return s


def is_closed(s):
    try:
        p = select.poll()
        p.register(s, select.POLLIN)
        if not p.poll(0):
            return False
        return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True


def nbd(host, port, export, n, src):
    socks = []
    refused = stalled = 0
    for _ in range(n):
        try:
            s = connect(host, port, src)
        except OSError:
            stalled += 1
            if stalled >= 3:
                break
            continue
        try:
            nbd_go(s, export)
            socks.append(s)
        except (Refused, ConnectionError):
            refused += 1
            s.close()
        except OSError:
            # No greeting in time: the server no longer accepts.
            stalled += 1
            s.close()
            if stalled >= 3:
                break
    print(f"ok={len(socks)} refused={refused} stalled={stalled}", flush=True)
    for _ in sys.stdin:
        closed = sum(1 for s in socks if is_closed(s))
        print(f"open={len(socks) - closed} closed={closed}", flush=True)


def api(host, port, n, src, secs):
    socks = []
    closed = 0
    lock = threading.Lock()

    def open_one():
        s = connect(host, port, src)
        s.sendall(b"GET /api/v1/vdisks HTTP/1.1\r\nHost: x\r\n")
        return s

    for _ in range(n):
        try:
            socks.append(open_one())
        except OSError:
            pass
    print(f"opened={len(socks)}", flush=True)

    def trickle():
        nonlocal closed
        i = 0
        while True:
            time.sleep(secs)
            i += 1
            with lock:
                for k, s in enumerate(socks):
                    try:
                        if is_closed(s):
                            raise OSError("closed")
                        s.sendall(b"X-Slow-%d: %d\r\n" % (i, k))
                    except OSError:
                        closed += 1
                        s.close()
                        try:
                            socks[k] = open_one()
                        except OSError:
                            socks[k] = socket.socket()

    threading.Thread(target=trickle, daemon=True).start()
    for _ in sys.stdin:
        with lock:
            print(f"closed_by_server={closed}", flush=True)


def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    mode = sys.argv[1]
    if mode == "nbd":
        _, _, host, port, export, n, src = sys.argv
        nbd(host, int(port), export, int(n), src)
    elif mode == "api":
        _, _, host, port, n, src, secs = sys.argv
        api(host, int(port), int(n), src, float(secs))
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
