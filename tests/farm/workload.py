#!/usr/bin/python3
"""A verifying device workload, through a vstream target agent's NBD socket.

    workload.py SOCKET IMAGE SECONDS [SEED] [fua]

Random 4 KiB writes (each block's bytes depend on the seed, the block and a
counter) go to the device's write cache; random reads check every block
against what was written last, or else against IMAGE (the vDisk's base
content). Runs for SECONDS, then prints one JSON line:
{"reads": N, "writes": N, "errors": N, "mismatches": N, "max_ms": F, "p99_ms": F}
and exits 1 if there was any error or mismatch. With `fua`, every write is
sent with FUA: acknowledged means durable (for a Private-mode device, whose
writes must survive its server's crash).
"""
import json
import random
import sys
import time

import nbd

BLOCK = 4096


def pattern(seed, block, n):
    head = f"seed {seed} block {block} write {n} ".encode()
    return (head * (BLOCK // len(head) + 1))[:BLOCK]


def main():
    sock, image, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    seed = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    flags = nbd.CMD_FLAG_FUA if len(sys.argv) > 5 and sys.argv[5] == "fua" else 0
    rng = random.Random(seed)
    base = open(image, "rb")
    h = nbd.NBD()
    h.connect_unix(sock)
    size = h.get_size()
    blocks = size // BLOCK
    written = {}
    stats = {"reads": 0, "writes": 0, "errors": 0, "mismatches": 0}
    lat = []
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        block = rng.randrange(blocks)
        t0 = time.monotonic()
        try:
            if rng.random() < 0.3:
                n += 1
                data = pattern(seed, block, n)
                h.pwrite(data, block * BLOCK, flags)
                written[block] = data
                stats["writes"] += 1
            else:
                got = h.pread(BLOCK, block * BLOCK)
                if block in written:
                    want = written[block]
                else:
                    base.seek(block * BLOCK)
                    want = base.read(BLOCK)
                if got != want:
                    stats["mismatches"] += 1
                    print(f"mismatch at block {block}", file=sys.stderr)
                stats["reads"] += 1
        except nbd.Error as e:
            stats["errors"] += 1
            print(f"I/O error at block {block}: {e}", file=sys.stderr)
        lat.append((time.monotonic() - t0) * 1000)
    h.flush()
    # Everything written must still read back.
    for block, data in written.items():
        if h.pread(BLOCK, block * BLOCK) != data:
            stats["mismatches"] += 1
            print(f"final mismatch at block {block}", file=sys.stderr)
    h.shutdown()
    lat.sort()
    stats["max_ms"] = round(lat[-1], 1) if lat else 0.0
    stats["p99_ms"] = round(lat[int(len(lat) * 0.99)], 1) if lat else 0.0
    print(json.dumps(stats))
    sys.exit(1 if stats["errors"] or stats["mismatches"] else 0)


if __name__ == "__main__":
    main()
