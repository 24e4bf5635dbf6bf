#!/usr/bin/env bash
# How long a restarted server takes to log a device in, holding vDisks of real data.
#
#   bash bench/restart.sh                                          # the current code (builds it)
#   VSTREAM_BIN_OLD=/path/to/old/vstream bash bench/restart.sh     # old and current, one run
#
# 1. With the current binary, on a fresh data folder: make BENCH_VDISKS vDisks of
#    BENCH_SIZE_GIB each (default 4 x 16 GiB), the first BENCH_DATA_GIB of each (default:
#    all of it) written with random data from /dev/urandom through NBD, so that a full
#    check is a real read and hash of that much; each in Standard mode with a device;
#    stop; start once more so that the current code has checked and recorded them (its
#    verification record).
# 2. BENCH_ROUNDS times (default 3), for each binary (old first, if given): start the
#    server on that folder and time from the spawn to
#      - the first successful login (POST /api/v1/login answers 200 for any device; the
#        devices are asked in turn, every 20 ms), and
#      - the moment every device has had one successful login;
#    then stop it (SIGTERM). The old binary reads every vDisk in full before offering it;
#    it ignores the record and leaves it alone. With BENCH_DROP_CACHES=1 the page cache
#    is dropped before each start (a cold start, as after a reboot; needs root).
# 3. Medians per binary into bench/.work/restart/last-table.md; the data folder is
#    removed at exit (also on failure).
#
# The data is checked against the free space of BENCH_WORK's file system: the script
# refuses unless BENCH_VDISKS x BENCH_DATA_GIB leaves BENCH_KEEP_FREE_GIB (default 15)
# free, and says what BENCH_DATA_GIB would fit.
#
# Environment (all optional):
#   BENCH_VDISKS=4  BENCH_SIZE_GIB=16  BENCH_DATA_GIB=16  BENCH_ROUNDS=3  BENCH_KEEP_FREE_GIB=15
#   BENCH_WORK=DIR         work folder (default bench/.work/restart)
#   BENCH_PORT=P           NBD TCP port; the API uses P+1 (default 20839)
#   VSTREAM_BIN=PATH       the current binary (default target/release/vstream, built first)
#   VSTREAM_BIN_OLD=PATH   a binary to compare with
#   BENCH_LOGIN_WAIT=S     give up on a login after S s (default 1800)
#   BENCH_DROP_CACHES=1    drop the page cache before each start
#   BENCH_NO_BUILD=1       do not run cargo build
set -euo pipefail
shopt -s inherit_errexit 2>/dev/null || true

cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(realpath -m "${BENCH_WORK:-$ROOT/bench/.work/restart}")
N=${BENCH_VDISKS:-4}
GIB=${BENCH_SIZE_GIB:-16}
DATA_GIB=${BENCH_DATA_GIB:-$GIB}
ROUNDS=${BENCH_ROUNDS:-3}
KEEP_FREE=${BENCH_KEEP_FREE_GIB:-15}
PORT=${BENCH_PORT:-20839}
API_PORT=$((PORT + 1))
LOGIN_WAIT=${BENCH_LOGIN_WAIT:-1800}
NEW=${VSTREAM_BIN:-$ROOT/target/release/vstream}
OLD=${VSTREAM_BIN_OLD:-}
LOGS=$WORK/logs
export VSTREAM_API=http://127.0.0.1:$API_PORT

die() { echo "restart.sh: $*" >&2; exit 1; }
log() { printf '%s  %s\n' "$(date +%T)" "$*" >&2; }
now_ns() { date +%s%N; }
secs() { awk -v ns="$1" 'BEGIN{printf "%.2f", ns/1e9}'; }
median() { sort -g | awk '{v[NR]=$1} END{if (NR%2) print v[(NR+1)/2]; else printf "%.2f\n", (v[NR/2]+v[NR/2+1])/2}'; }

for t in ss awk curl nbdcopy head sort; do
  command -v "$t" >/dev/null || die "$t not found on PATH"
done
for p in "$PORT" "$API_PORT"; do
  if [ -n "$(ss -Hltn "sport = :$p")" ]; then die "TCP port $p is in use; set BENCH_PORT"; fi
done
if [ -n "${BENCH_DROP_CACHES:-}" ] && [ ! -w /proc/sys/vm/drop_caches ]; then
  die "BENCH_DROP_CACHES needs root (/proc/sys/vm/drop_caches)"
fi
if [ -z "${VSTREAM_BIN:-}" ] && [ -z "${BENCH_NO_BUILD:-}" ]; then
  log "building target/release/vstream"
  cargo build --release -p vstream >&2
fi
[ -x "$NEW" ] || die "$NEW is not an executable"
[ -z "$OLD" ] || [ -x "$OLD" ] || die "VSTREAM_BIN_OLD=$OLD is not an executable"

mkdir -p "$WORK" "$LOGS"
avail_gib=$(df -P -k "$WORK" | awk 'NR==2{printf "%d", $4 / 1048576}')
[ "$DATA_GIB" -le "$GIB" ] || die "BENCH_DATA_GIB=$DATA_GIB is more than BENCH_SIZE_GIB=$GIB"
need=$((N * DATA_GIB + KEEP_FREE))
if [ "$avail_gib" -lt "$need" ]; then
  fit=$(((avail_gib - KEEP_FREE) / N))
  die "$N x $DATA_GIB GiB of data would leave less than $KEEP_FREE GiB free ($avail_gib GiB available); BENCH_DATA_GIB=$fit fits"
fi

SERVER_PID=
DATA=$WORK/data
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
  rm -rf "$DATA"
}
trap cleanup EXIT

# start_server BIN LOG: starts it on $DATA and waits for its API; sets T0 (its spawn).
start_server() {
  T0=$(now_ns)
  "$1" server --data "$DATA" --nbd "127.0.0.1:$PORT" --api "127.0.0.1:$API_PORT" >>"$2" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 600); do
    if curl -s -o /dev/null "$VSTREAM_API/"; then return 0; fi
    kill -0 "$SERVER_PID" 2>/dev/null || die "the server exited; see $2"
    sleep 0.05
  done
  die "the server's API did not come up within 30 s; see $2"
}

mac() { printf '52:54:00:be:00:%02x' "$1"; }
login() {
  curl -s -o /dev/null -w '%{http_code}' -m 5 -X POST -H 'content-type: application/json' \
    -d "{\"mac\":\"$(mac "$1")\"}" "$VSTREAM_API/api/v1/login" || true
}

# 1. The data set.
rm -rf "$DATA" && mkdir -p "$DATA"
export VSTREAM_TOKEN_FILE=$DATA/admin.token
setup_log=$LOGS/setup.log
: >"$setup_log"
log "making $N vDisks of $GIB GiB, $DATA_GIB GiB of random data each, with $NEW"
start_server "$NEW" "$setup_log"
for i in $(seq 1 "$N"); do
  "$NEW" vdisk create "r$i" --size "${GIB}GiB" >&2
  "$NEW" device add "d$i" --mac "$(mac "$i")" --vdisk "r$i" >&2
  t0=$(now_ns)
  # Private mode (the default) while it is written: the device writes the vDisk itself.
  head -c "$((DATA_GIB << 30))" /dev/urandom |
    nbdcopy --flush - "nbd://127.0.0.1:$PORT/device/d$i"
  log "r$i: $DATA_GIB GiB written in $(secs $(($(now_ns) - t0))) s"
  "$NEW" vdisk show "r$i" >/dev/null # hashes the written data
  "$NEW" vdisk set "r$i" --mode standard >&2
done
stop_server
# One start of the current code: it reads everything once and records it.
start_server "$NEW" "$setup_log"
deadline=$((SECONDS + LOGIN_WAIT))
for i in $(seq 1 "$N"); do
  until [ "$(login "$i")" = 200 ]; do
    [ "$SECONDS" -lt "$deadline" ] || die "no login for d$i; see $setup_log"
    sleep 0.2
  done
done
log "checked and recorded in $(secs $(($(now_ns) - T0))) s"
stop_server
du -sh "$DATA" >&2

# 2. Restarts.
declare -A FIRST ALL
run() {
  local label=$1 bin=$2 round=$3 logf=$LOGS/$1-$3.log first='' done=0 i
  : >"$logf"
  if [ -n "${BENCH_DROP_CACHES:-}" ]; then sync; echo 3 >/proc/sys/vm/drop_caches; fi
  start_server "$bin" "$logf"
  local -A ok=()
  local deadline=$((SECONDS + LOGIN_WAIT))
  while [ "$done" -lt "$N" ]; do
    for i in $(seq 1 "$N"); do
      [ -z "${ok[$i]:-}" ] || continue
      if [ "$(login "$i")" = 200 ]; then
        ok[$i]=1
        done=$((done + 1))
        [ -n "$first" ] || first=$(secs $(($(now_ns) - T0)))
      fi
    done
    [ "$SECONDS" -lt "$deadline" ] || die "$label: no login within $LOGIN_WAIT s; see $logf"
    kill -0 "$SERVER_PID" 2>/dev/null || die "$label: the server exited; see $logf"
    [ "$done" -eq "$N" ] || sleep 0.02
  done
  local all
  all=$(secs $(($(now_ns) - T0)))
  log "$label round $round: first login $first s, every device $all s"
  FIRST[$label]+="$first "
  ALL[$label]+="$all "
  stop_server
}
for r in $(seq 1 "$ROUNDS"); do
  [ -z "$OLD" ] || run old "$OLD" "$r"
  run new "$NEW" "$r"
done

# 3. Medians.
{
  echo "$N vDisks x $GIB GiB, $DATA_GIB GiB of random data each (Standard mode, one device each); $(nproc) cores;" \
    "$ROUNDS rounds; page cache $([ -n "${BENCH_DROP_CACHES:-}" ] && echo dropped before each start || echo kept);" \
    "$(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "| binary | start to first login (s), median | start to every device's login (s), median | rounds (first / every) |"
  echo "|---|---|---|---|"
  for label in old new; do
    [ -n "${FIRST[$label]:-}" ] || continue
    f=$(printf '%s\n' ${FIRST[$label]} | median)
    a=$(printf '%s\n' ${ALL[$label]} | median)
    echo "| $label | $f | $a | ${FIRST[$label]% }/ ${ALL[$label]% } |"
  done
} | tee "$WORK/last-table.md"
