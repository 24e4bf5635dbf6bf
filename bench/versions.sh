#!/usr/bin/env bash
# vDisk versions: reads through a 10-layer chain, promote time, merge throughput.
#
#   bash bench/versions.sh           # 4 to 7 minutes on 2 cores; builds target/release/vstream first
#
# One vstream server (release build, fresh data folder), driven through the CLI:
#   a. chain reads   fio --ioengine=nbd 4 KiB randread, QD32, RUNTIME s, on export flat@1
#                    (one layer: a 2 GiB random image) and layered@10 (10 layers holding the
#                    same bytes: 64 KiB stripes, stripe i in layer i mod 10), in the order
#                    A B B A A B B A; medians compared.
#                    layered is built as an admin would: import (stripe 0), then 9 times
#                    `version new`, nbdcopy into a maintenance device's export device/NAME,
#                    `version promote --to production`. Target: IOPS ratio >= 0.95.
#   b. promote       wall time of `vstream version promote` only, after a 64 MiB, 256 MiB and
#                    1 GiB change written into the maintenance version of a fresh sparse 64 GiB
#                    vDisk; the 256 MiB change again on a 16 GiB vDisk; and a 64 MiB change on
#                    the 64 GiB vDisk once 9 more (empty) versions lie below it.
#   c. merge         `version merge V --upto 10` (2 GiB of data in 10 layers) against
#                    `cp --sparse=always` of the same 10 layer files followed by `sync` of the
#                    copies (merge makes its layer durable too), cp first. Two rounds: layered,
#                    then layered2, built like layered. Page cache warm for both (the layer
#                    files were just written or read); nothing drops caches (the machine is
#                    shared). The merge's time includes removing the old layer files; the
#                    rm of cp's copies is timed apart and not counted.
#                    Target: merge GiB/s >= 0.8 x those of cp + sync.
#
# Environment (all optional):
#   BENCH_WORK=DIR        work folder (default bench/.work/versions); its data is removed at exit,
#                         logs/ and last-table.md stay
#   BENCH_RUNTIME=S       fio run time per run, seconds (default 15)
#   BENCH_PORT=P          NBD TCP port; the API uses P+1 (default 20819)
#   BENCH_STEPS="a b c"   which parts to run (c needs the layered vDisk that a builds; it is
#                         built whenever a or c is asked for)
#   BENCH_NO_BUILD=1      use target/release/vstream as it is
#   BENCH_CLI_WAIT=S      how long to wait (rebuilding every 30 s) for a CLI with
#                         `device set` and `version` (default 1200)
#   BENCH_KEEP=1          keep the data folder and images
#   BENCH_AB_ROUNDS=N     A B B A blocks of fio runs in part a (default 2: 8 runs)
#   BENCH_QUIET_WAIT=S    before part a, wait up to S s for the machine to be < 10 % busy (default 60)
#   BENCH_PROMOTE_RUNS=N  runs per promote point; the median is reported (default 3)
set -euo pipefail
shopt -s inherit_errexit 2>/dev/null || true

cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(realpath -m "${BENCH_WORK:-$ROOT/bench/.work/versions}")
RUNTIME=${BENCH_RUNTIME:-15}
PORT=${BENCH_PORT:-20819}
API_PORT=$((PORT + 1))
STEPS=" ${BENCH_STEPS:-a b c} "
CLI_WAIT=${BENCH_CLI_WAIT:-1200}
DATA=$WORK/data
LOGS=$WORK/logs
IMAGE=$WORK/disk.raw
IMAGE_BYTES=$((2 << 30))
STRIPE=$((64 << 10))
PY=/usr/bin/python3
VSTREAM=$ROOT/target/release/vstream
HZ=$(getconf CLK_TCK)
NBD=nbd://127.0.0.1:$PORT
export VSTREAM_API=http://127.0.0.1:$API_PORT
export VSTREAM_TOKEN_FILE=$DATA/admin.token

die() { echo "versions.sh: $*" >&2; exit 1; }
log() { printf '%s  %s\n' "$(date +%T)" "$*" >&2; }
now_ns() { date +%s%N; }
secs() { awk -v ns="$1" 'BEGIN{printf "%.3f", ns/1e9}'; }

AB_ROUNDS=${BENCH_AB_ROUNDS:-2}
PROMOTE_RUNS=${BENCH_PROMOTE_RUNS:-3}

# --- preflight ---------------------------------------------------------------------------------
for t in nbdcopy nbdinfo fio ss awk sync cp; do
  command -v "$t" >/dev/null || die "$t not found on PATH (Debian: apt-get install libnbd-bin fio iproute2)"
done
[ -x "$PY" ] || die "$PY not found"
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine (fio --enghelp=nbd fails)"
for p in "$PORT" "$API_PORT"; do
  if [ -n "$(ss -Hltn "sport = :$p")" ]; then die "TCP port $p is in use; set BENCH_PORT"; fi
done
mkdir -p "$WORK" "$LOGS"
: >"$LOGS/details.txt"

cli_ready() {
  "$VSTREAM" device set --help >/dev/null 2>&1 && "$VSTREAM" version --help >/dev/null 2>&1
}
if [ -z "${BENCH_NO_BUILD:-}" ]; then
  command -v cargo >/dev/null || die "cargo not found (or set BENCH_NO_BUILD=1 with a built target/release/vstream)"
  log "building vstream (cargo build --release -p vstream)"
  waited=0
  while :; do
    if cargo build --release -q -p vstream >"$LOGS/build.log" 2>&1 && cli_ready; then break; fi
    [ "$waited" -ge "$CLI_WAIT" ] && die "no release build with \`vstream device set\` and \`vstream version\` after ${CLI_WAIT} s (see $LOGS/build.log)"
    [ "$waited" = 0 ] && log "the CLI has no \`device set\`/\`version\` yet (or does not build); rebuilding every 30 s for up to ${CLI_WAIT} s"
    sleep 30
    waited=$((waited + 30))
  done
fi
[ -x "$VSTREAM" ] || die "$VSTREAM missing"
cli_ready || die "$VSTREAM has no \`device set\` or \`version\` command"

# --- the server and cleanup --------------------------------------------------------------------
SERVER_PID=""
cleanup() {
  local rc=$?
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  if [ -z "${BENCH_KEEP:-}" ]; then
    rm -rf "$DATA" "$WORK/cp" "$IMAGE" "$IMAGE.tmp" "$WORK"/stripe*.raw
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

vs() { "$VSTREAM" "$@"; }
# vsq ARGS: the CLI, output to the log, failure fatal.
vsq() { vs "$@" >>"$LOGS/cli.log" 2>&1 || { tail -5 "$LOGS/cli.log" >&2; die "vstream $* failed"; }; }

start_server() {
  rm -rf "$DATA"
  mkdir -p "$DATA"
  "$VSTREAM" server --data "$DATA" --nbd "127.0.0.1:$PORT" --api "127.0.0.1:$API_PORT" \
    >"$LOGS/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 200); do
    if [ -s "$DATA/admin.token" ] && vs vdisk list >/dev/null 2>&1; then return 0; fi
    kill -0 "$SERVER_PID" 2>/dev/null || { tail -20 "$LOGS/server.log" >&2; die "server exited at start"; }
    sleep 0.05
  done
  die "server API did not come up within 10 s (log: $LOGS/server.log)"
}

json() { "$PY" -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

# vnew VDISK: `version new`; sets NEWV to the new version's number.
vnew() {
  vsq version new "$1"
  NEWV=$(vs version list "$1" --json | json 'max(v["number"] for v in d)')
}

# wait_disconnected DEVICE: the device's session is over (the server flushed it).
wait_disconnected() {
  for _ in $(seq 300); do
    [ "$(vs device show "$1" --json | json 'd["connected"]')" = False ] && return 0
    sleep 0.1
  done
  die "device $1 still connected 30 s after its client exited"
}

# Machine, server and waited-for children CPU ticks (as in compare.sh).
server_ticks() { local s; s=$(cat "/proc/$SERVER_PID/stat"); echo "${s##*) }" | awk '{print $12 + $13 + $14 + $15}'; }
client_ticks() { local s; s=$(cat "/proc/$$/stat"); echo "${s##*) }" | awk '{print $14 + $15}'; }
machine_ticks() { awk '/^cpu /{print $2 + $3 + $4, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9}' /proc/stat; }

# Machine-wide busy CPU in percent over the last second.
busy_pct() {
  local a b
  a=$(machine_ticks); sleep 1; b=$(machine_ticks)
  awk -v a="$a" -v b="$b" 'BEGIN{split(a,x," "); split(b,y," "); t=y[2]-x[2]; printf "%d", (t > 0 ? 100*(y[1]-x[1])/t : 0)}'
}
# wait_quiet WHAT LIMIT: the machine is shared; wait up to LIMIT s for it to be < 10 % busy.
wait_quiet() {
  local what=$1 limit=$2 waited=0 b
  b=$(busy_pct)
  while [ "$b" -gt 10 ] && [ "$waited" -lt "$limit" ]; do
    [ "$waited" = 0 ] && log "machine is ${b}% busy with other work; waiting up to ${limit} s before $what"
    sleep 2
    waited=$((waited + 3))
    b=$(busy_pct)
  done
  return 0
}

# median V...: the middle value (the mean of the two middle ones for an even count).
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{m=int((NR+1)/2); if (NR%2) print a[m]; else printf "%.10g\n", (a[m]+a[m+1])/2}'; }
declare -a ROWS=()   # "label|value|target|verdict"
row() { ROWS+=("$1|$2|${3:-}|${4:-}"); }

# --- data ------------------------------------------------------------------------------------
make_image() {
  log "writing the 2 GiB random image and its 10 stripe files"
  if command -v openssl >/dev/null; then
    openssl enc -aes-128-ctr -pass pass:vstream-bench -nosalt -pbkdf2 </dev/zero 2>/dev/null |
      head -c "$IMAGE_BYTES" >"$IMAGE.tmp" || true
  else
    head -c "$IMAGE_BYTES" /dev/urandom >"$IMAGE.tmp"
  fi
  [ "$(stat -c %s "$IMAGE.tmp")" -eq "$IMAGE_BYTES" ] || die "could not write $IMAGE"
  mv "$IMAGE.tmp" "$IMAGE"
  # stripeK.raw: sparse, 2 GiB, holding the image's 64 KiB stripes i with i mod 10 = K.
  "$PY" - "$IMAGE" "$WORK" "$STRIPE" <<'PY'
import os, sys
image, work, stripe = sys.argv[1], sys.argv[2], int(sys.argv[3])
size = os.path.getsize(image)
outs = [open(os.path.join(work, f"stripe{k}.raw"), "wb") for k in range(10)]
for f in outs:
    f.truncate(size)
with open(image, "rb") as src:
    i = 0
    while True:
        buf = src.read(stripe * 160)
        if not buf:
            break
        for j in range(0, len(buf), stripe):
            n = i + j // stripe
            os.pwrite(outs[n % 10].fileno(), buf[j:j + stripe], n * stripe)
        i += len(buf) // stripe
for f in outs:
    f.close()
PY
}

# build_layered NAME MAC: stripe 0 imported as version 1 of vDisk NAME, stripes 1..9 written
# as versions 2..10 through maintenance device maint-NAME; checked against flat@1. Sets
# LAYERED_BYTES (data in its layers).
build_layered() {
  local v=$1 dev=maint-$1 k n t0 t1 layers hash
  vsq vdisk import "$v" "$WORK/stripe0.raw"
  vsq device add "$dev" --mac "$2" --vdisk "$v"
  log "building $v@10: 9 x (version new, nbdcopy into device/$dev, promote)"
  for k in $(seq 1 9); do
    vnew "$v"
    n=$NEWV
    [ "$k" = 1 ] && vsq device set "$dev" --type maintenance
    nbdcopy --destination-is-zero "$WORK/stripe$k.raw" "$NBD/device/$dev" 2>>"$LOGS/nbdcopy.log" ||
      die "nbdcopy into device/$dev failed (see $LOGS/nbdcopy.log)"
    wait_disconnected "$dev"
    t0=$(now_ns)
    vsq version promote "$v" "$n" --to production
    t1=$(now_ns)
    echo "$v: promote of version $n (205 MiB change, 2 GiB vDisk, $k layers below) took $(secs $((t1 - t0))) s" >>"$LOGS/details.txt"
  done
  [ "$n" = 10 ] || die "$v's top version is $n, not 10"
  vs version list "$v" --json >"$LOGS/$v-versions.json"
  LAYERED_BYTES=$(json 'sum(v["own_bytes"] for v in d)' <"$LOGS/$v-versions.json")
  layers=$(json "[v['layers'] for v in d if v['number'] == 10][0]" <"$LOGS/$v-versions.json")
  hash=$(json "[v['content_hash'] for v in d if v['number'] == 10][0]" <"$LOGS/$v-versions.json")
  [ "$layers" = 10 ] || die "$v@10 has $layers layers, not 10"
  [ "$hash" = "$FLAT_HASH" ] || die "$v@10 ($hash) does not hold the bytes of flat@1 ($FLAT_HASH)"
  echo "$v@10: 10 layers, $LAYERED_BYTES bytes in its layers, content hash = flat@1's ($hash)" >>"$LOGS/details.txt"
}

# --- a. reads through the chain ------------------------------------------------------------------
# fio_run EXPORT TAG: sets A_IOPS A_US A_FOREIGN.
fio_run() {
  local exp=$1 tag=$2 js=$LOGS/fio-$2.json s0 c0 m0 s1 c1 m1 out iops ios err
  s0=$(server_ticks); c0=$(client_ticks); m0=$(machine_ticks)
  fio --ioengine=nbd --uri="$NBD/$exp" --rw=randread --bs=4k --iodepth=32 --runtime="$RUNTIME" \
    --time_based --size=2G --name=x --output-format=json --output="$js" >>"$LOGS/fio.log" 2>&1 ||
    die "fio on $exp failed: see $LOGS/fio.log"
  m1=$(machine_ticks); s1=$(server_ticks); c1=$(client_ticks)
  out=$("$PY" - "$js" <<'PY'
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
print(f'{job["read"]["iops"]:.0f} {job["read"]["total_ios"]} {job["error"]}')
PY
  ) || die "cannot parse $js"
  read -r iops ios err <<<"$out"
  { [ "$err" = 0 ] && [ "$ios" -gt 0 ]; } || die "fio on $exp: error $err after $ios reads"
  A_IOPS=$iops
  A_US=$(awk -v t=$((s1 - s0)) -v hz="$HZ" -v n="$ios" 'BEGIN{printf "%.1f", (t/hz)*1e6/n}')
  A_FOREIGN=$(awk -v a="$m0" -v b="$m1" -v s=$((s1 - s0)) -v c=$((c1 - c0)) \
    'BEGIN{split(a,x," "); split(b,y," "); t=y[2]-x[2]; f=(y[1]-x[1])-s-c; if (f<0) f=0; printf "%d", (t > 0 ? 100*f/t : 0)}')
  echo "fio $tag ($exp): $iops IOPS, $ios reads, server $((s1 - s0)) ticks ($A_US us/read), fio $((c1 - c0)) ticks, foreign ${A_FOREIGN}%" >>"$LOGS/details.txt"
}

part_a() {
  log "warming the page cache (nbdcopy of flat@1 and layered@10 to null:)"
  nbdcopy "$NBD/flat@1" null: && nbdcopy "$NBD/layered@10" null: || die "nbdcopy warm-up failed"
  local i exp f_iops=() l_iops=() f_us=() l_us=() pairs=() foreign=0 pf=0 pl=0
  wait_quiet "the fio runs" "${BENCH_QUIET_WAIT:-60}"
  # A B B A, AB_ROUNDS times: drift and other work fall on both exports alike.
  for ((i = 0; i < 4 * AB_ROUNDS; i++)); do
    case $((i % 4)) in 0 | 3) exp=flat@1 ;; *) exp=layered@10 ;; esac
    log "a. fio 4 KiB randread QD32 on $exp (${RUNTIME} s, run $((i + 1)) of $((4 * AB_ROUNDS)))"
    fio_run "$exp" "$((i + 1))-${exp%@*}"
    if [ "$exp" = flat@1 ]; then
      f_iops+=("$A_IOPS"); f_us+=("$A_US"); pf=$((pf + A_IOPS))
    else
      l_iops+=("$A_IOPS"); l_us+=("$A_US"); pl=$((pl + A_IOPS))
    fi
    [ "$A_FOREIGN" -gt "$foreign" ] && foreign=$A_FOREIGN
    if [ $((i % 4)) = 3 ]; then
      pairs+=("$(awk -v l="$pl" -v f="$pf" 'BEGIN{printf "%.3f", l/f}')"); pf=0; pl=0
    fi
  done
  local f l ratio
  f=$(median "${f_iops[@]}"); l=$(median "${l_iops[@]}")
  ratio=$(awk -v l="$l" -v f="$f" 'BEGIN{printf "%.3f", l/f}')
  row "a. 4 KiB randread QD32, flat@1 (1 layer), IOPS: median (runs)" "$f (${f_iops[*]})"
  row "a. 4 KiB randread QD32, layered@10 (10 layers), IOPS: median (runs)" "$l (${l_iops[*]})"
  row "a. server CPU per read, flat@1 / layered@10, median (µs)" "$(median "${f_us[@]}") / $(median "${l_us[@]}")"
  row "a. IOPS ratio layered@10 / flat@1, of the medians" "$ratio" "≥ 0.95" "$(awk -v r="$ratio" 'BEGIN{print (r >= 0.95 ? "met" : "MISSED")}')"
  row "a. the same ratio within each A B B A block" "${pairs[*]}"
  row "a. most CPU taken by other work during a run" "${foreign} %"
}

# --- b. promote time -----------------------------------------------------------------------------
MAC=16
# change_into DEVICE BYTES: writes BYTES at 1 GiB into the device's export (fio, 1 MiB writes).
change_into() {
  fio --ioengine=nbd --uri="$NBD/device/$1" --rw=write --bs=1M --iodepth=8 --offset=1G --size="$2" \
    --name=w --output="$LOGS/fio-write.log" >/dev/null 2>&1 || die "writing $2 into device/$1 failed"
}
# timed_promote VDISK N: sets P_SECS (wall time of the CLI call alone).
timed_promote() {
  local t0 t1
  t0=$(now_ns)
  vsq version promote "$1" "$2" --to production
  t1=$(now_ns)
  P_SECS=$(secs $((t1 - t0)))
}
# promote_point VDISK DISK_SIZE CHANGE: fresh vDisk, one maintenance version with CHANGE
# written into it, promoted; sets P_SECS.
promote_once() {
  local v=$1 size=$2 change=$3 dev=m-$1
  vsq vdisk create "$v" --size "$size"
  vnew "$v"
  MAC=$((MAC + 1))
  vsq device add "$dev" --mac "02:00:00:00:01:$MAC" --vdisk "$v"
  vsq device set "$dev" --type maintenance
  change_into "$dev" "$change"
  wait_disconnected "$dev"
  sync -f "$DATA"   # writeback of the change itself is not promote's
  timed_promote "$v" "$NEWV"
  echo "promote: $change change on a $size vDisk ($v, 1 layer below): $P_SECS s" >>"$LOGS/details.txt"
}
# promote_point NAME DISK_SIZE CHANGE: PROMOTE_RUNS fresh vDisks NAME-1..; sets P_SECS (median)
# and P_ALL; NAME-1 stays for later use.
promote_point() {
  local i all=()
  for i in $(seq "$PROMOTE_RUNS"); do
    promote_once "$1-$i" "$2" "$3"
    all+=("$P_SECS")
  done
  P_ALL="${all[*]}"
  P_SECS=$(median "${all[@]}")
}

part_b() {
  local base t0 t1 n
  # What a CLI call costs by itself.
  t0=$(now_ns); vs version list layered >/dev/null 2>&1 || vs vdisk list >/dev/null; t1=$(now_ns)
  base=$(secs $((t1 - t0)))
  log "b. promote after 64 MiB, 256 MiB and 1 GiB changes on 64 GiB vDisks, 256 MiB on 16 GiB"
  local what="(s; median of $PROMOTE_RUNS, then all runs)"
  local t64m t256m t1g t16
  promote_point p64-64m 64GiB 64M;   t64m=$P_SECS
  row "b. promote, 64 GiB vDisk, 64 MiB change $what" "$P_SECS ($P_ALL)"
  promote_point p64-256m 64GiB 256M; t256m=$P_SECS
  row "b. promote, 64 GiB vDisk, 256 MiB change $what" "$P_SECS ($P_ALL)"
  promote_point p64-1g 64GiB 1G;     t1g=$P_SECS
  row "b. promote, 64 GiB vDisk, 1 GiB change $what" "$P_SECS ($P_ALL)"
  promote_point p16-256m 16GiB 256M; t16=$P_SECS
  row "b. promote, 16 GiB vDisk, 256 MiB change $what" "$P_SECS ($P_ALL)"
  row "b. 64 GiB vDisk: fixed part + per GiB of change (line through 64 MiB and 1 GiB)" \
    "$(awk -v a="$t64m" -v b="$t1g" 'BEGIN{s=(b-a)/(1-1/16); printf "%.3f s + %.3f s/GiB", a-s/16, s}')"
  local dr
  dr=$(awk -v a="$t256m" -v b="$t16" 'BEGIN{printf "%.2f", a/b}')
  row "b. 256 MiB change: promote on 64 GiB ÷ on 16 GiB" "$dr" "≈ 1 (change size, not disk size)" \
    "$(awk -v r="$dr" 'BEGIN{print (r <= 1.2 ? "met" : "MISSED")}')"
  log "b. 8 empty versions on p64-64m-1, then a 64 MiB change with 10 layers below"
  local empties=()
  for n in $(seq 3 10); do
    vnew p64-64m-1
    timed_promote p64-64m-1 "$NEWV"
    empties+=("$P_SECS")
  done
  echo "promote: empty versions on p64-64m-1 (64 GiB), 2..9 layers below: ${empties[*]} s" >>"$LOGS/details.txt"
  vnew p64-64m-1
  change_into m-p64-64m-1 64M
  wait_disconnected m-p64-64m-1
  sync -f "$DATA"
  timed_promote p64-64m-1 "$NEWV"
  echo "promote: 64M change on a 64GiB vDisk (10 layers below): $P_SECS s" >>"$LOGS/details.txt"
  row "b. promote, 64 GiB vDisk, empty change, 2 → 9 layers below (s)" "${empties[0]} → ${empties[7]}"
  row "b. promote, 64 GiB vDisk, 64 MiB change, 10 layers below (s)" "$P_SECS"
  row "b. one CLI call that does nothing (s)" "$base"
}

# --- c. merge ------------------------------------------------------------------------------------
# merge_round VDISK: cp --sparse=always + sync of its 10 layer files, rm of the copies, then
# `version merge VDISK --upto 10`. Sets C_CP C_CPS C_RM C_MERGE (seconds).
merge_round() {
  local v=$1 files t0 t1 t2 t3 hash merged
  files=("$DATA/vdisks/$v"/*.layer)
  [ "${#files[@]}" = 10 ] || die "$v has ${#files[@]} layer files, not 10"
  log "c. cp --sparse=always of the 10 layer files of $v, then sync; then version merge $v --upto 10"
  rm -rf "$WORK/cp"; mkdir -p "$WORK/cp"
  sync
  t0=$(now_ns)
  cp --sparse=always "${files[@]}" "$WORK/cp/"
  t1=$(now_ns)
  sync "$WORK"/cp/*
  t2=$(now_ns)
  rm -rf "$WORK/cp"
  t3=$(now_ns)
  sync; sleep 2
  C_CP=$(secs $((t1 - t0))); C_CPS=$(secs $((t2 - t0))); C_RM=$(secs $((t3 - t2)))
  t0=$(now_ns)
  vsq version merge "$v" --upto 10
  t1=$(now_ns)
  C_MERGE=$(secs $((t1 - t0)))
  hash=$(vs version list "$v" --json | json '[v["content_hash"] for v in d if v["number"] == 10][0]')
  [ "$hash" = "$FLAT_HASH" ] || die "merge changed the content hash of $v@10"
  merged=$(vs version list "$v" --json | json '[v["layers"] for v in d if v["number"] == 10][0]')
  [ "$merged" = 1 ] || die "$v@10 has $merged layers after the merge"
  echo "merge $v: $LAYERED_BYTES bytes; cp $C_CP s, cp+sync $C_CPS s, rm of the copies $C_RM s, merge $C_MERGE s" >>"$LOGS/details.txt"
}

part_c() {
  local gib cp=() cps=() rms=() mg=() r
  gib=$(awk -v b="$LAYERED_BYTES" 'BEGIN{printf "%.3f", b/1073741824}')
  merge_round layered
  cp+=("$C_CP"); cps+=("$C_CPS"); rms+=("$C_RM"); mg+=("$C_MERGE")
  build_layered layered2 02:00:00:00:00:02
  merge_round layered2
  cp+=("$C_CP"); cps+=("$C_CPS"); rms+=("$C_RM"); mg+=("$C_MERGE")
  # rate: 2 x the data over the summed times of the two rounds.
  rate() { awk -v g="$gib" -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", 2*g/(a+b)}'; }
  row "c. cp --sparse=always of the 10 layer files, $gib GiB (s per round; GiB/s)" "${cp[*]}; $(rate "${cp[@]}")"
  row "c. the same cp, then sync of the copies (s per round; GiB/s)" "${cps[*]}; $(rate "${cps[@]}")"
  row "c. rm of the 10 copies afterwards, not counted (s per round)" "${rms[*]}"
  row "c. version merge --upto 10, same data (s per round; GiB/s)" "${mg[*]}; $(rate "${mg[@]}")"
  r=$(awk -v a="$(rate "${mg[@]}")" -v b="$(rate "${cps[@]}")" 'BEGIN{printf "%.2f", a/b}')
  row "c. merge GiB/s ÷ (cp + sync) GiB/s" "$r" "≥ 0.8" "$(awk -v r="$r" 'BEGIN{print (r >= 0.8 ? "met" : "MISSED")}')"
  # Like for like: merge also removes the old layer files.
  r=$(awk -v m1="${mg[0]}" -v m2="${mg[1]}" -v c1="${cps[0]}" -v c2="${cps[1]}" -v r1="${rms[0]}" -v r2="${rms[1]}" \
    'BEGIN{printf "%.2f", (c1+c2+r1+r2)/(m1+m2)}')
  row "c. the same ratio with the rm counted on the cp side (merge removes the old layers too)" "$r"
}

# --- run -------------------------------------------------------------------------------------------
STARTED_AT=$(date -u '+%Y-%m-%d %H:%M UTC')
T_START=$(now_ns)
start_server
if [[ $STEPS == *" a "* || $STEPS == *" c "* ]]; then
  make_image
  log "importing flat (the whole image)"
  vsq vdisk import flat "$IMAGE"
  FLAT_HASH=$(vs version list flat --json | json '[v["content_hash"] for v in d if v["number"] == 1][0]')
  build_layered layered 02:00:00:00:00:01
fi
[[ $STEPS == *" a "* ]] && part_a
[[ $STEPS == *" b "* ]] && part_b
[[ $STEPS == *" c "* ]] && part_c

TABLE=$WORK/last-table.md
{
  echo "bench/versions.sh, $STARTED_AT, commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) CPUs, whole run $(secs $(($(now_ns) - T_START))) s"
  echo
  echo "| measurement | value | target | |"
  echo "|---|---:|---|---|"
  for r in "${ROWS[@]}"; do
    IFS='|' read -r a b c d <<<"$r"
    echo "| $a | $b | $c | $d |"
  done
} >"$TABLE"
cat "$TABLE"
echo
echo "(details: $LOGS/details.txt)"
