#!/usr/bin/env bash
# Makes the compatibility fixture that crates/vstream/tests/e2e/compat.rs opens with today's
# binary: what a given vstream binary wrote, on both kinds of farm.
#
#   embedded/data   a one-server farm on the embedded store (its data folder)
#   etcd/data       the data folder of server fx1 of an etcd farm
#   etcd/keys.json  that farm's etcd keys (leased keys, such as live/, left out)
#   expected.json   what the binary said: exports' sha256, vdisk/version/device lists
#
# usage: tests/compat/make-fixture.sh VSTREAM_BINARY OUT_DIR
# Needs etcd, etcdctl, python3 with the nbd module (python3-libnbd), sha256sum.
set -euo pipefail
py=${PYTHON:-/usr/bin/python3}  # Debian's, with python3-libnbd
bin=$(realpath "$1")
out=$2
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on $1" >&2
  return 1
}

# A 4 MiB image: 256 KiB of pseudo-random bytes at 0, a text pattern at 1 MiB, zeros else.
"$py" - "$work/golden.raw" <<'PY'
import hashlib, sys
size = 4 << 20
buf = bytearray(size)
chunk, i, off = b"", 0, 0
while off < 256 << 10:
    chunk = hashlib.sha256(b"vstream-compat-%d" % i).digest()
    buf[off:off + 32] = chunk
    off += 32
    i += 1
pat = b"vstream compatibility fixture, version 1\n" * 100
buf[1 << 20:(1 << 20) + len(pat)] = pat
open(sys.argv[1], "wb").write(buf)
PY

# write EXPORT-URL OFFSET TEXT: one write and a clean disconnect.
nbd_write() {
  "$py" - "$@" <<'PY'
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(sys.argv[3].encode(), int(sys.argv[2]))
h.flush()
h.shutdown()
PY
}
nbd_sha() {
  "$py" - "$1" <<'PY' | sha256sum | cut -d' ' -f1
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size, off, step = h.get_size(), 0, 1 << 20
while off < size:
    n = min(step, size - off)
    sys.stdout.buffer.write(h.pread(n, off))
    off += n
h.shutdown()
PY
}

# fill KIND DATA [server flags...]: one farm's worth of vDisks, versions and devices.
fill() {
  local kind=$1 data=$2
  shift 2
  local nbd api
  nbd=$(port)
  api=$(port)
  mkdir -p "$data"
  RUST_LOG=warn "$bin" server --data "$data" --nbd "127.0.0.1:$nbd" --api "127.0.0.1:$api" "$@" \
    2>"$work/$kind-server.log" &
  local pid=$!
  pids+=("$pid")
  wait_port "$nbd"
  wait_port "$api"
  export VSTREAM_API="http://127.0.0.1:$api"
  export VSTREAM_TOKEN
  VSTREAM_TOKEN=$(cat "$data/admin.token")
  "$bin" vdisk import golden "$work/golden.raw" >/dev/null
  "$bin" vdisk set golden --mode standard >/dev/null
  "$bin" vdisk create scratch --size 4MiB >/dev/null
  "$bin" device add pc1 --mac 52:54:00:c0:00:01 --vdisk scratch >/dev/null
  "$bin" device add maint1 --mac 52:54:00:c0:00:02 --vdisk golden --type maintenance >/dev/null
  "$bin" device add pc2 --mac 52:54:00:c0:00:03 --vdisk golden >/dev/null
  nbd_write "nbd://127.0.0.1:$nbd/device/pc1" 0 "pc1's own data, written in place"
  nbd_write "nbd://127.0.0.1:$nbd/device/pc1" $((3 << 20)) "and near its end"
  "$bin" version new golden >/dev/null
  nbd_write "nbd://127.0.0.1:$nbd/device/maint1" $((2 << 20)) "version 2 was written by maint1"
  "$bin" version promote golden 2 --to test >/dev/null
  local e="$out/$kind"
  "$py" - "$e/expected.json" \
    "$("$bin" vdisk list --json)" "$("$bin" version list golden --json)" \
    "$("$bin" version list scratch --json)" "$("$bin" device list --json)" \
    "$(nbd_sha "nbd://127.0.0.1:$nbd/golden")" "$(nbd_sha "nbd://127.0.0.1:$nbd/golden@2")" \
    "$(nbd_sha "nbd://127.0.0.1:$nbd/device/pc1")" "$("$bin" --version 2>/dev/null || echo unknown)" <<'PY'
import json, sys
a = sys.argv
json.dump({
    "made_by": a[9].strip(),
    "vdisks": json.loads(a[2]),
    "versions": {"golden": json.loads(a[3]), "scratch": json.loads(a[4])},
    "devices": json.loads(a[5]),
    "sha256": {"golden": a[6], "golden@2": a[7], "device/pc1": a[8]},
}, open(a[1], "w"), indent=1, sort_keys=True)
PY
  kill -TERM "$pid"
  wait "$pid" || true
  rm -f "$data"/server-*.log "$data/nbd.sock"
}

rm -rf "$out"
mkdir -p "$out/embedded" "$out/etcd"
fill embedded "$out/embedded/data"

client=$(port)
peer=$(port)
etcd --name fx --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$client" \
  --advertise-client-urls "http://127.0.0.1:$client" --listen-peer-urls "http://127.0.0.1:$peer" \
  --initial-advertise-peer-urls "http://127.0.0.1:$peer" --initial-cluster "fx=http://127.0.0.1:$peer" \
  >"$work/etcd.log" 2>&1 &
pids+=("$!")
wait_port "$client"
fill etcd "$out/etcd/data" --farm "etcd://127.0.0.1:$client" --name fx1
ETCDCTL_API=3 etcdctl --endpoints "http://127.0.0.1:$client" get --prefix "" -w json |
  "$py" -c '
import base64, json, sys
kvs = json.load(sys.stdin).get("kvs", [])
keys = [{"key": base64.b64decode(kv["key"]).decode(), "value": base64.b64decode(kv["value"]).decode()}
        for kv in kvs if not kv.get("lease")]
json.dump(keys, open(sys.argv[1], "w"), indent=1)
' "$out/etcd/keys.json"
du -sh "$out"
