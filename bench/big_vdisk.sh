#!/usr/bin/env bash
# What an empty big vDisk costs a server: creation, verification, idle CPU, export, merge.
#
#   bash bench/big_vdisk.sh                                  # the current code (builds it)
#   VSTREAM_BIN_OLD=/path/to/old/vstream bash bench/big_vdisk.sh   # old, then current
#
# For each binary (the old one first, if given), on a fresh data folder:
#   1. start `vstream server`, time `vstream vdisk create big --size SIZE` (an empty
#      vDisk), read the server's peak RSS (VmHWM), stop the server;
#   2. start it again on the same folder (a fresh process, so VmHWM starts over) and time
#      from the start to the log line "replica verified vdisk=big": the server checks
#      every version it holds once after it starts. Verification time therefore includes
#      the start (about 0.1 s) and up to one publish interval (1 s) before the check
#      begins. VmHWM at that moment is the verification's peak RSS;
#   3. SETTLE s later, the server's CPU (utime+stime of every thread, /proc/PID/stat) over
#      IDLE seconds with nothing connected: the idle cost of holding the vDisk.
#      "checks" counts the "replica verified" lines by the end: more than 1 means the
#      server verified the same version again, which the idle figure then includes;
#   4. the time of an export of the whole vDisk (GET /api/v1/vdisks/big/content, the
#      stream `vstream vdisk export` reads: its extents, here none) to /dev/null;
#   5. the time of `vstream version merge big` after an empty version 2 is made and
#      promoted to production: the merge of two empty layers.
#
# Environment (all optional):
#   BENCH_SIZE=8TiB        the vDisk's virtual size
#   BENCH_IDLE_SECS=10     idle measurement window
#   BENCH_SETTLE=3         seconds between verification and the idle window
#   BENCH_WORK=DIR         work folder (default bench/.work/big_vdisk); data folders are
#                          removed at exit, logs/ and last-table.md stay
#   BENCH_PORT=P           NBD TCP port; the API uses P+1 (default 20829)
#   VSTREAM_BIN=PATH       the current binary (default target/release/vstream, built first)
#   VSTREAM_BIN_OLD=PATH   a binary to compare with, run first
#   BENCH_VERIFY_WAIT=S    give up waiting for verification after S s (default 900)
#   BENCH_NO_BUILD=1       do not run cargo build
#
# The old code (before the fix) needs about 13 GB of RAM at 8 TiB: the script warns when
# less is available.
set -euo pipefail
shopt -s inherit_errexit 2>/dev/null || true

cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(realpath -m "${BENCH_WORK:-$ROOT/bench/.work/big_vdisk}")
SIZE=${BENCH_SIZE:-8TiB}
IDLE=${BENCH_IDLE_SECS:-10}
SETTLE=${BENCH_SETTLE:-3}
PORT=${BENCH_PORT:-20829}
API_PORT=$((PORT + 1))
VERIFY_WAIT=${BENCH_VERIFY_WAIT:-900}
NEW=${VSTREAM_BIN:-$ROOT/target/release/vstream}
OLD=${VSTREAM_BIN_OLD:-}
LOGS=$WORK/logs
HZ=$(getconf CLK_TCK)
export VSTREAM_API=http://127.0.0.1:$API_PORT

die() { echo "big_vdisk.sh: $*" >&2; exit 1; }
log() { printf '%s  %s\n' "$(date +%T)" "$*" >&2; }
now_ns() { date +%s%N; }
secs() { awk -v ns="$1" 'BEGIN{printf "%.2f", ns/1e9}'; }
kib() { awk -v f="$2:" '$1==f{print $2}' "/proc/$1/status"; }
mib() { awk -v k="$1" 'BEGIN{printf "%.0f", k/1024}'; }
ticks() { awk '{sub(/.*\) /, ""); print $12 + $13}' "/proc/$1/stat"; }

for t in ss awk curl getconf; do
  command -v "$t" >/dev/null || die "$t not found on PATH"
done
for p in "$PORT" "$API_PORT"; do
  if [ -n "$(ss -Hltn "sport = :$p")" ]; then die "TCP port $p is in use; set BENCH_PORT"; fi
done
if [ -z "${VSTREAM_BIN:-}" ] && [ -z "${BENCH_NO_BUILD:-}" ]; then
  log "building target/release/vstream"
  cargo build --release -p vstream >&2
fi
[ -x "$NEW" ] || die "$NEW is not an executable"
[ -z "$OLD" ] || [ -x "$OLD" ] || die "VSTREAM_BIN_OLD=$OLD is not an executable"
if [ -n "$OLD" ]; then
  avail=$(awk '/^MemAvailable:/{print $2}' /proc/meminfo)
  if [ "$avail" -lt $((14 << 20)) ]; then
    log "warning: $(mib "$avail") MiB available; the old code may need about 13 GB at 8 TiB"
  fi
fi

mkdir -p "$WORK" "$LOGS"
SERVER_PID=
DATA=
stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 1 600); do
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
}
cleanup() {
  stop_server
  [ -z "$DATA" ] || rm -rf "$DATA"
}
trap cleanup EXIT

# start_server BIN LOG: starts it on $DATA and waits for its API.
start_server() {
  "$1" server --data "$DATA" --nbd "127.0.0.1:$PORT" --api "127.0.0.1:$API_PORT" >>"$2" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 300); do
    if curl -s -o /dev/null "$VSTREAM_API/"; then return 0; fi
    kill -0 "$SERVER_PID" 2>/dev/null || die "the server exited; see $2"
    sleep 0.1
  done
  die "the server's API did not come up within 30 s; see $2"
}

ROWS=()
# measure LABEL BIN
measure() {
  local label=$1 bin=$2 logf=$LOGS/$1.log t0 t1 create_s create_hwm verify_s verify_hwm
  DATA=$WORK/data-$label
  rm -rf "$DATA" && mkdir -p "$DATA"
  : >"$logf"
  export VSTREAM_TOKEN_FILE=$DATA/admin.token
  log "$label: $bin"
  start_server "$bin" "$logf"
  t0=$(now_ns)
  "$bin" vdisk create big --size "$SIZE" >&2
  t1=$(now_ns)
  create_s=$(secs $((t1 - t0)))
  create_hwm=$(kib "$SERVER_PID" VmHWM)
  log "$label: created in $create_s s, peak RSS $(mib "$create_hwm") MiB"
  # A Standard-mode vDisk is a replica, which every start checks (a Private
  # one a device may be writing is not).
  "$bin" vdisk set big --mode standard >&2
  stop_server
  # Without its verification record a start checks the version by reading it (with
  # the record it offers it at once, "replica verified by its record", and reads it
  # again later): the check this measures.
  rm -f "$DATA/vdisks/big/verified.json"

  t0=$(now_ns)
  start_server "$bin" "$logf"
  local deadline=$((SECONDS + VERIFY_WAIT))
  until grep -q "replica verified vdisk=big" "$logf"; do
    grep -q "failed verification" "$logf" && die "$label: verification failed; see $logf"
    [ "$SECONDS" -lt "$deadline" ] || die "$label: not verified within $VERIFY_WAIT s; see $logf"
    kill -0 "$SERVER_PID" 2>/dev/null || die "$label: the server exited; see $logf"
    sleep 0.05
  done
  t1=$(now_ns)
  verify_s=$(secs $((t1 - t0)))
  verify_hwm=$(kib "$SERVER_PID" VmHWM)
  log "$label: verified in $verify_s s, peak RSS $(mib "$verify_hwm") MiB"

  sleep "$SETTLE"
  local a b ta tb idle rss checks
  a=$(ticks "$SERVER_PID")
  ta=$(now_ns)
  sleep "$IDLE"
  b=$(ticks "$SERVER_PID")
  tb=$(now_ns)
  idle=$(awk -v t=$((b - a)) -v hz="$HZ" -v ns=$((tb - ta)) 'BEGIN{printf "%.1f", t / hz / (ns / 1e9) * 100}')
  rss=$(kib "$SERVER_PID" VmRSS)
  checks=$(grep -c "replica verified vdisk=big" "$logf" || true)
  log "$label: idle CPU $idle % of a core over $IDLE s, RSS $(mib "$rss") MiB, checks $checks"
  local export_s
  export_s=$(curl -sf -o /dev/null -w '%{time_total}' \
    -H "Authorization: Bearer $(cat "$VSTREAM_TOKEN_FILE")" "$VSTREAM_API/api/v1/vdisks/big/content") ||
    die "$label: the export failed; see $logf"
  export_s=$(awk -v s="$export_s" 'BEGIN{printf "%.3f", s}')
  log "$label: exported in $export_s s"
  "$bin" version new big >&2
  "$bin" version promote big 2 --to production >&2
  t0=$(now_ns)
  "$bin" version merge big >&2 || die "$label: the merge failed; see $logf"
  t1=$(now_ns)
  local merge_s
  merge_s=$(secs $((t1 - t0)))
  log "$label: merged in $merge_s s"
  stop_server
  rm -rf "$DATA"
  DATA=
  ROWS+=("| $label | $create_s | $(mib "$create_hwm") | $verify_s | $(mib "$verify_hwm") | $idle | $(mib "$rss") | $checks | $export_s | $merge_s |")
}

[ -z "$OLD" ] || measure old "$OLD"
measure new "$NEW"

{
  echo "Empty vDisk of $SIZE; $(nproc) cores; idle window ${SETTLE} s after verification; $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "| binary | create (s) | create peak RSS (MiB) | verify (s) | verify peak RSS (MiB) | idle CPU (% of a core, ${IDLE} s) | idle RSS (MiB) | checks | export (s) | merge (s) |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
} | tee "$WORK/last-table.md"
