#!/usr/bin/python3
"""A verifying device workload, through a vstream target agent's NBD socket.

    workload.py SOCKET IMAGE SECONDS [SEED] [fua|partial]

Random 4 KiB writes (each block's bytes depend on the seed, the block and a
counter) go to the device's write cache; random reads check every block
against what was written last, or else against IMAGE (the vDisk's base
content). Runs for SECONDS, then prints one JSON line:
{"reads": N, "writes": N, "errors": N, "mismatches": N, "max_ms": F, "p99_ms": F}
and exits 1 if there was any error or mismatch. With `fua`, every write is
sent with FUA: acknowledged means durable (for a Private-mode device, whose
writes must survive its server's crash). With `partial`, a third of the
writes cover part of a block, or the end of one and the start of the next,
at any byte, and some of those are zeroes: a write cache must fill in the
rest of such a block from the base.
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
    mode = sys.argv[5] if len(sys.argv) > 5 else ""
    flags = nbd.CMD_FLAG_FUA if mode == "fua" else 0
    partial = mode == "partial"
    rng = random.Random(seed)
    base = open(image, "rb")
    h = nbd.NBD()
    h.connect_unix(sock)
    size = h.get_size()
    blocks = size // BLOCK
    written = {}

    def current(b):
        if b in written:
            return written[b]
        base.seek(b * BLOCK)
        return base.read(BLOCK)

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
                if partial and rng.random() < 0.33 and block + 1 < blocks:
                    # Part of this block, or its end and the next block's start.
                    at = rng.randrange(BLOCK)
                    length = rng.randrange(1, 2 * BLOCK - at)
                    if rng.random() < 0.25:
                        h.zero(length, block * BLOCK + at)
                        data = bytes(length)
                    else:
                        data = (pattern(seed, block, n) * 2)[:length]
                        h.pwrite(data, block * BLOCK + at, flags)
                    both = current(block) + current(block + 1)
                    both = both[:at] + data + both[at + length:]
                    written[block], written[block + 1] = both[:BLOCK], both[BLOCK:]
                else:
                    data = pattern(seed, block, n)
                    h.pwrite(data, block * BLOCK, flags)
                    written[block] = data
                stats["writes"] += 1
            else:
                got = h.pread(BLOCK, block * BLOCK)
                want = current(block)
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
