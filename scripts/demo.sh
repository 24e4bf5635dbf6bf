#!/usr/bin/env bash
# Sets up and runs a one-server farm on the embedded store, streaming a demo vDisk.
# Usage: bash scripts/demo.sh [DATA_DIR]   (default ./demo-data; Ctrl-C stops the server)
set -euo pipefail
cd "$(dirname "$0")/.."
data=$(realpath -m "${1:-demo-data}")
nbd=127.0.0.1:10809
api=127.0.0.1:7080

cargo build --release -q -p vstream
bin=target/release/vstream
mkdir -p "$data"

"$bin" server --data "$data" --nbd "$nbd" --api "$api" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server' EXIT INT TERM
for _ in $(seq 100); do
  [ -s "$data/admin.token" ] && curl -fs "http://$api/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
export VSTREAM_API="http://$api" VSTREAM_TOKEN_FILE="$data/admin.token"

if ! "$bin" vdisk show demo >/dev/null 2>&1; then
  # A small ext4 file system with a greeting, as the demo vDisk.
  tmp=$(mktemp -d)
  mkdir -p "$tmp/root"
  echo "Hello from a vDisk streamed by vstream." > "$tmp/root/hello.txt"
  truncate -s 256M "$tmp/demo.raw"
  if command -v mkfs.ext4 >/dev/null; then
    mkfs.ext4 -q -F -d "$tmp/root" "$tmp/demo.raw"
  else
    printf 'vstream demo vDisk\n' | dd of="$tmp/demo.raw" conv=notrunc status=none
  fi
  "$bin" vdisk import demo "$tmp/demo.raw"
  rm -rf "$tmp"
  "$bin" device add demo-pc --mac 52:54:00:00:00:01 --vdisk demo
fi
"$bin" vdisk list
"$bin" device list
cat <<TXT

vstream is streaming vDisk "demo" on nbd://$nbd/demo (read-only) and
nbd://$nbd/device/demo-pc (the device's own view). Try:
  nbdinfo nbd://$nbd/demo
  qemu-img compare nbd://$nbd/demo nbd://$nbd/device/demo-pc
Admin API: http://$api (token in $data/admin.token). Ctrl-C stops the server.
TXT
wait $server
