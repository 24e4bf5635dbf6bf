#!/usr/bin/env bash
# Compares vstream with nbdkit (file plugin) and qemu-nbd serving the same 2 GiB raw
# image, with the same clients, one server at a time, and prints one table.
#
#   bash bench/compare.sh            # whole run, about 5 minutes
#
# Per server, in this order: vstream, nbdkit, qemu-nbd:
#   memory      VmRSS idle, then with N idle clients that completed the handshake (TCP)
#   sequential  nbdcopy URL null: of the whole image, SEQ_RUNS times (TCP, then unix)
#   random      fio --ioengine=nbd 4 KiB randread at iodepth 1 and 32 (TCP, then unix)
# Server CPU is utime+stime of the whole process (all threads) from /proc/PID/stat,
# read just before and just after each client run.
#
# Environment (all optional):
#   BENCH_WORK=DIR        work dir for the image, the vstream data and logs (default bench/.work)
#   BENCH_RUNTIME=S       fio run time per test, seconds (default 15)
#   BENCH_SEQ_RUNS=N      nbdcopy runs per transport (default 3; median wall time is reported)
#   BENCH_CONNS=N         idle connections for the memory test (default 1000)
#   BENCH_PORT=P          first of three TCP ports used (P: NBD, P+1: vstream API; default 20809)
#   BENCH_NO_BUILD=1      use target/release/vstream as it is
#   VSTREAM_BIN=PATH      the vstream binary to measure (default target/release/vstream;
#                         give BENCH_NO_BUILD=1 with it)
#   BENCH_SERVERS="..."   subset/order of servers (default "vstream nbdkit qemu-nbd")
#   BENCH_OLD_BIN=PATH    also run this (older) vstream binary as "vstream-old", with its
#                         own store imported by itself: the default order becomes
#                         "vstream vstream-old nbdkit qemu-nbd vstream-old vstream", each
#                         vstream value is the median of its two runs, and the table gets a
#                         vstream/vstream-old column: an A/B of two builds in one run
#   BENCH_SERVERS may also name vstream-tls and nbdkit-tls: the same servers with NBD over
#   TLS required (a certtool PKI made once in BENCH_WORK/pki; TCP only; no memory test),
#   read by clients that trust the PKI's CA. The table then gets vstream-tls/vstream and
#   vstream-tls/nbdkit-tls columns (issue 18's speed targets), e.g.
#   BENCH_SERVERS="vstream vstream-tls nbdkit-tls nbdkit-tls vstream-tls vstream"
set -euo pipefail
shopt -s inherit_errexit 2>/dev/null || true

cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(realpath -m "${BENCH_WORK:-$ROOT/bench/.work}")
RUNTIME=${BENCH_RUNTIME:-15}
SEQ_RUNS=${BENCH_SEQ_RUNS:-3}
CONNS=${BENCH_CONNS:-1000}
PORT=${BENCH_PORT:-20809}
API_PORT=$((PORT + 1))
OLD_BIN=${BENCH_OLD_BIN:-}
if [ -n "$OLD_BIN" ]; then
  SERVERS=${BENCH_SERVERS:-"vstream vstream-old nbdkit qemu-nbd vstream-old vstream"}
else
  SERVERS=${BENCH_SERVERS:-"vstream nbdkit qemu-nbd"}
fi
EXPORT=bench
IMAGE=$WORK/disk.raw
IMAGE_BYTES=$((2 << 30))
SOCK=$WORK/nbd.sock
VSDATA=$WORK/vstream-data
VSDATA_OLD=$WORK/vstream-old-data
LOGS=$WORK/logs
PY=/usr/bin/python3
VSTREAM=${VSTREAM_BIN:-$ROOT/target/release/vstream}
HZ=$(getconf CLK_TCK)
PKI=$WORK/pki
# Set while a TLS server runs: the clients' URL query and environment (libnbd finds the
# CA in $HOME/.pki/libnbd, the one way fio's nbd engine, which allows no local files in
# a URI, can use TLS).
TLS_ON=''
TLS_ENV=()

die() { echo "compare.sh: $*" >&2; exit 1; }
log() { printf '%s  %s\n' "$(date +%T)" "$*" >&2; }

# --- preflight -------------------------------------------------------------------
for t in nbdkit qemu-nbd nbdcopy nbdinfo fio ss awk sort; do
  command -v "$t" >/dev/null || die "$t not found on PATH (Debian: apt-get install nbdkit qemu-utils libnbd-bin fio iproute2)"
done
[ -x "$PY" ] || die "$PY not found (needed for bench/idle_conns.py)"
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine (fio --enghelp=nbd fails)"
nbdkit file --version >/dev/null 2>&1 || die "nbdkit has no file plugin"
for p in "$PORT" "$API_PORT"; do
  if [ -n "$(ss -Hltn "sport = :$p")" ]; then die "TCP port $p is in use; set BENCH_PORT"; fi
done
mkdir -p "$WORK" "$LOGS"
if [ -z "${BENCH_NO_BUILD:-}" ]; then
  command -v cargo >/dev/null || die "cargo not found (or set BENCH_NO_BUILD=1 with a built target/release/vstream)"
  log "building vstream (cargo build --release -p vstream)"
  cargo build --release -q -p vstream || die "cargo build failed"
fi
[ -x "$VSTREAM" ] || die "$VSTREAM missing"
[ -z "$OLD_BIN" ] || [ -x "$OLD_BIN" ] || die "BENCH_OLD_BIN=$OLD_BIN is not an executable"

# --- servers we start, and their cleanup ----------------------------------------------
declare -a STARTED=()
SERVER_PID=""
cleanup() {
  local pid
  for pid in "${STARTED[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
  for pid in "${STARTED[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  STARTED=()
  rm -f "$SOCK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

stop_server() {
  local pid=$SERVER_PID
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  local keep=() p
  for p in "${STARTED[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
  STARTED=("${keep[@]}")
  SERVER_PID=""
  rm -f "$SOCK"
}

# wait_ready URL LOG: polls until the server answers a handshake.
wait_ready() {
  local url=$1 logf=$2
  for _ in $(seq 200); do
    if "${TLS_ENV[@]}" nbdinfo --size "$url" >/dev/null 2>&1; then return 0; fi
    kill -0 "$SERVER_PID" 2>/dev/null || { tail -20 "$logf" >&2; die "server exited at start (log: $logf)"; }
    sleep 0.05
  done
  tail -20 "$logf" >&2
  die "server did not answer on $url within 10 s (log: $logf)"
}

# start_server NAME TRANSPORT(tcp|unix|both): sets SERVER_PID.
start_server() {
  local name=$1 transport=$2 logf=$LOGS/$1-$2.log
  rm -f "$SOCK"
  [ "$transport" = api ] && logf=$LOGS/$name-import-server.log
  case $name in
    vstream | vstream-old)
      "$(vs_bin "$name")" server --data "$(vs_data "$name")" --nbd "127.0.0.1:$PORT" --nbd "unix:$SOCK" \
        --api "127.0.0.1:$API_PORT" >"$logf" 2>&1 &
      ;;
    vstream-tls)
      "$VSTREAM" server --data "$VSDATA" --nbd "127.0.0.1:$PORT" --api "127.0.0.1:$API_PORT" \
        --tls require --tls-certificates "$PKI/server" >"$logf" 2>&1 &
      ;;
    nbdkit-tls)
      nbdkit -f -r -i 127.0.0.1 -p "$PORT" --tls=require --tls-certificates="$PKI/server" \
        file "$IMAGE" >"$logf" 2>&1 &
      ;;
    nbdkit)
      if [ "$transport" = tcp ]; then
        nbdkit -f -r -i 127.0.0.1 -p "$PORT" file "$IMAGE" >"$logf" 2>&1 &
      else
        nbdkit -f -r -U "$SOCK" file "$IMAGE" >"$logf" 2>&1 &
      fi
      ;;
    qemu-nbd)
      if [ "$transport" = tcp ]; then
        qemu-nbd -f raw -r -t -e 0 -x "$EXPORT" -b 127.0.0.1 -p "$PORT" "$IMAGE" >"$logf" 2>&1 &
      else
        qemu-nbd -f raw -r -t -e 0 -x "$EXPORT" -k "$SOCK" "$IMAGE" >"$logf" 2>&1 &
      fi
      ;;
  esac
  SERVER_PID=$!
  STARTED+=("$SERVER_PID")
  case $name in
    *-tls) TLS_ON=1; TLS_ENV=(env "HOME=$PKI/client-home") ;;
    *) TLS_ON=''; TLS_ENV=() ;;
  esac
  case $transport in
    unix) wait_ready "$(url unix)" "$logf" ;;
    tcp) wait_ready "$(url tcp)" "$logf" ;;
    api) wait_api "$logf" "$(vs_data "$name")" ;;
  esac
}

# The binary and the data folder of "vstream" (this build) and "vstream-old".
vs_bin() { if [ "$1" = vstream-old ]; then echo "$OLD_BIN"; else echo "$VSTREAM"; fi; }
vs_data() { if [ "$1" = vstream-old ]; then echo "$VSDATA_OLD"; else echo "$VSDATA"; fi; }

# wait_api LOG DATA: polls until vstream wrote its admin token and its API answers.
wait_api() {
  local logf=$1 data=$2
  for _ in $(seq 200); do
    if [ -s "$data/admin.token" ] && { ! command -v curl >/dev/null || curl -fs "http://127.0.0.1:$API_PORT/healthz" >/dev/null 2>&1; }; then
      return 0
    fi
    kill -0 "$SERVER_PID" 2>/dev/null || { tail -20 "$logf" >&2; die "vstream exited at start (log: $logf)"; }
    sleep 0.05
  done
  tail -20 "$logf" >&2
  die "vstream API did not come up within 10 s (log: $logf)"
}

url() {
  case $1 in
    tcp) if [ -n "$TLS_ON" ]; then echo "nbds://127.0.0.1:$PORT/$EXPORT"; else echo "nbd://127.0.0.1:$PORT/$EXPORT"; fi ;;
    unix) echo "nbd+unix:///$EXPORT?socket=$SOCK" ;;
  esac
}

# Server CPU time so far, in clock ticks (all threads; children too, if any).
cpu_ticks() {
  local stat
  stat=$(cat "/proc/$SERVER_PID/stat") || die "server $SERVER_PID is gone"
  # Fields after the ")" of comm: $12 utime, $13 stime, $14 cutime, $15 cstime.
  echo "${stat##*) }" | awk '{print $12 + $13 + $14 + $15}'
}

now_ns() { date +%s%N; }

# Machine-wide busy CPU in percent over the last second, from /proc/stat.
busy_pct() {
  local a b
  a=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat)
  sleep 1
  b=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat)
  awk -v a="$a" -v b="$b" 'BEGIN{split(a,x," "); split(b,y," "); t=y[2]-x[2]; printf "%d", (t > 0 ? 100*(y[1]-x[1])/t : 0)}'
}

# The machine is shared: wait (up to BENCH_QUIET_WAIT s) until other work leaves it
# mostly idle, so that it does not steal CPU from the server under test.
declare -a BUSY_NOTES=()
wait_quiet() {
  local what=$1 limit=${BENCH_QUIET_WAIT:-60} waited=0 b
  b=$(busy_pct)
  while [ "$b" -gt 10 ] && [ "$waited" -lt "$limit" ]; do
    [ "$waited" = 0 ] && log "machine is ${b}% busy with other work; waiting up to ${limit} s before $what"
    sleep 4
    waited=$((waited + 5))
    b=$(busy_pct)
  done
  if [ "$b" -gt 10 ]; then BUSY_NOTES+=("machine was ${b}% busy with other work before $what"); fi
  return 0
}

declare -A R=()   # R[row,server] = the values of its runs, space-separated
# put KEY VALUE: adds a run's value ("~" marks a noisy one).
put() { R[$1]="${R[$1]:+${R[$1]} }$2"; }
# get KEY: the median of its runs (the mean of the middle two), "~" if any run was noisy.
get() {
  local v=${R[$1]:-} mark=""
  [ -n "$v" ] || return 0
  [[ "$v" == *"~"* ]] && mark="~"
  printf '%s\n' ${v//\~/} | sort -g | awk -v mark="$mark" '{a[NR]=$1} END{
    m=(NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2);
    d=(index(a[1],".") ? length(a[1])-index(a[1],".") : 0);
    printf "%s%.*f", mark, d, m}'
}

# make_pki: a CA and a server certificate for 127.0.0.1 (certtool, as libnbd's tests
# make theirs), once; the clients get the CA only.
make_pki() {
  command -v certtool >/dev/null || die "certtool not found (Debian: gnutls-bin) for the TLS servers"
  [ -f "$PKI/server/server-key.pem" ] && return 0
  log "making a test PKI in $PKI"
  rm -rf "$PKI"
  mkdir -p "$PKI/server" "$PKI/client-home/.pki/libnbd"
  (
    cd "$PKI"
    certtool --generate-privkey --outfile ca-key.pem 2>/dev/null
    printf 'cn = bench CA\nca\ncert_signing_key\n' >ca.info
    certtool --generate-self-signed --load-privkey ca-key.pem --template ca.info --outfile ca-cert.pem 2>/dev/null
    certtool --generate-privkey --outfile server/server-key.pem 2>/dev/null
    printf '%s\n' 'cn = localhost' 'ip_address = 127.0.0.1' tls_www_server encryption_key signing_key >server.info
    certtool --generate-certificate --load-ca-certificate ca-cert.pem --load-ca-privkey ca-key.pem \
      --load-privkey server/server-key.pem --template server.info --outfile server/server-cert.pem 2>/dev/null
    cp ca-cert.pem server/ca-cert.pem
    cp ca-cert.pem client-home/.pki/libnbd/ca-cert.pem
  ) || die "certtool failed to make the test PKI"
}

# --- the image and the vstream store ---------------------------------------------------------
if [ ! -f "$IMAGE" ] || [ "$(stat -c %s "$IMAGE")" -ne "$IMAGE_BYTES" ]; then
  log "creating the 2 GiB random image $IMAGE"
  if command -v openssl >/dev/null; then
    openssl enc -aes-128-ctr -pass pass:vstream-bench -nosalt -pbkdf2 </dev/zero 2>/dev/null |
      head -c "$IMAGE_BYTES" >"$IMAGE.tmp" || true
  else
    head -c "$IMAGE_BYTES" /dev/urandom >"$IMAGE.tmp"
  fi
  [ "$(stat -c %s "$IMAGE.tmp")" -eq "$IMAGE_BYTES" ] || die "could not write $IMAGE"
  mv "$IMAGE.tmp" "$IMAGE"
fi

if [[ " $SERVERS " == *"-tls "* ]]; then
  make_pki
fi
for name in vstream vstream-old; do
  [[ " $SERVERS " == *" $name "* || ( $name == vstream && " $SERVERS " == *" vstream-tls "* ) ]] || continue
  data=$(vs_data "$name")
  log "importing the image into a fresh $name store ($data)"
  rm -rf "$data"
  mkdir -p "$data"
  start_server "$name" api
  VSTREAM_API="http://127.0.0.1:$API_PORT" VSTREAM_TOKEN_FILE="$data/admin.token" \
    "$(vs_bin "$name")" vdisk import "$EXPORT" "$IMAGE" >"$LOGS/$name-import.log" 2>&1 ||
    { cat "$LOGS/$name-import.log" >&2; die "$name vdisk import failed"; }
  if [ "$name" = vstream ] && [[ " $SERVERS " == *" vstream-tls "* ]]; then
    # The clients show no device's certificate: the vDisk is open to anonymous readers.
    VSTREAM_API="http://127.0.0.1:$API_PORT" VSTREAM_TOKEN_FILE="$data/admin.token" \
      "$VSTREAM" vdisk set "$EXPORT" --anonymous-read on >>"$LOGS/$name-import.log" 2>&1 ||
      { cat "$LOGS/$name-import.log" >&2; die "vdisk set --anonymous-read failed"; }
  fi
  stop_server   # measured on a fresh process, like the others
done

warm_cache() {
  local f
  for f in "$IMAGE" "$VSDATA"/vdisks/"$EXPORT"/*.layer "$VSDATA_OLD"/vdisks/"$EXPORT"/*.layer; do
    [ -f "$f" ] && cat "$f" >/dev/null
  done
  return 0
}

# --- the tests -----------------------------------------------------------------------------------
mem_test() {
  local name=$1 out idle loaded ok
  out=$("$PY" "$ROOT/bench/idle_conns.py" --pid "$SERVER_PID" --tcp "127.0.0.1:$PORT" --export "$EXPORT" -n "$CONNS" 2>>"$LOGS/$name-mem.log") ||
    die "idle_conns.py failed against $name (see $LOGS/$name-mem.log)"
  read -r idle loaded ok <<<"$out"
  put "rss_idle,$name" "$(awk -v k="$idle" 'BEGIN{printf "%.1f", k/1024}')"
  put "rss_conns,$name" "$(awk -v k="$loaded" 'BEGIN{printf "%.1f", k/1024}')"
  if [ "$ok" -gt 0 ]; then
    put "kib_conn,$name" "$(awk -v a="$idle" -v b="$loaded" -v n="$ok" 'BEGIN{printf "%.1f", (b-a)/n}')"
  fi
  [ "$ok" -eq "$CONNS" ] || R[conns_note,$name]="only $ok of $CONNS connected"
  echo "$name mem: idle ${idle} KiB, ${loaded} KiB with $ok connections" >>"$LOGS/details.txt"
  sleep 2   # let the server tear the connections down
}

# Interference check. The machine may be shared: CPU used during a test by anything
# other than the server under test and its client ("foreign") is measured as
# machine busy (user+nice+system from /proc/stat) - server - client (the shell's
# waited-for children). A test with more than BENCH_NOISE % of the machine foreign
# is run once more (BENCH_RETRY=0: never) and the quieter run is kept; a value
# still noisy is marked "~" in the table.
NOISE=${BENCH_NOISE:-10}
RETRY=${BENCH_RETRY:-1}
declare -a NOISY=()
client_ticks() { local s; s=$(cat "/proc/$$/stat"); echo "${s##*) }" | awk '{print $14 + $15}'; }
machine_ticks() { awk '/^cpu /{print $2 + $3 + $4, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9}' /proc/stat; }
M0=""
measure_begin() { M_S0=$(cpu_ticks); M_C0=$(client_ticks); M0=$(machine_ticks); }
# Sets M_SERVER (server ticks), M_CLIENT, M_FOREIGN_PCT.
measure_end() {
  local m1 s1 c1
  m1=$(machine_ticks); s1=$(cpu_ticks); c1=$(client_ticks)
  M_SERVER=$((s1 - M_S0))
  M_CLIENT=$((c1 - M_C0))
  M_FOREIGN_PCT=$(awk -v a="$M0" -v b="$m1" -v s="$M_SERVER" -v c="$M_CLIENT" \
    'BEGIN{split(a,x," "); split(b,y," "); t=y[2]-x[2]; f=(y[1]-x[1])-s-c; if (f<0) f=0; printf "%d", (t > 0 ? 100*f/t : 0)}')
}

# seq_once NAME TRANSPORT: sets A_GIBS A_CPU A_FOREIGN.
seq_once() {
  local name=$1 tr=$2 u t0 t1 times=() i med
  u=$(url "$tr")
  measure_begin
  for ((i = 0; i < SEQ_RUNS; i++)); do
    t0=$(now_ns)
    "${TLS_ENV[@]}" nbdcopy "$u" null: 2>>"$LOGS/$name-nbdcopy.log" || die "nbdcopy $u failed against $name"
    t1=$(now_ns)
    times+=($((t1 - t0)))
  done
  measure_end
  med=$(printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}')
  A_GIBS=$(awk -v ns="$med" -v b="$IMAGE_BYTES" 'BEGIN{printf "%.2f", b/1073741824/(ns/1e9)}')
  A_CPU=$(awk -v t="$M_SERVER" -v hz="$HZ" -v n="$SEQ_RUNS" -v b="$IMAGE_BYTES" \
    'BEGIN{printf "%.3f", (t/hz)/(n*b/1073741824)}')
  A_FOREIGN=$M_FOREIGN_PCT
  echo "$name seq $tr: wall ns ${times[*]}; server $M_SERVER ticks, nbdcopy $M_CLIENT ticks for $SEQ_RUNS x 2 GiB; foreign ${M_FOREIGN_PCT}% -> $A_GIBS GiB/s, $A_CPU s/GiB" >>"$LOGS/details.txt"
}

# fio_once NAME TRANSPORT QD: sets A_IOPS A_US A_FOREIGN.
fio_once() {
  local name=$1 tr=$2 qd=$3 u js out iops ios err
  u=$(url "$tr")
  js=$LOGS/fio-$name-$tr-qd$qd.json
  measure_begin
  "${TLS_ENV[@]}" fio --ioengine=nbd --uri="$u" --rw=randread --bs=4k --iodepth="$qd" --runtime="$RUNTIME" --time_based \
    --size=2G --name=x --output-format=json --output="$js" >>"$LOGS/$name-fio.log" 2>&1 ||
    die "fio against $name ($u, iodepth $qd) failed: see $LOGS/$name-fio.log"
  measure_end
  out=$("$PY" - "$js" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
job = j["jobs"][0]
r = job["read"]
print(f'{r["iops"]:.0f} {r["total_ios"]} {job["error"]}')
PY
  ) || die "cannot parse $js"
  read -r iops ios err <<<"$out"
  if [ "$err" != 0 ] || [ "$ios" -le 0 ]; then die "fio against $name ($u) reported error $err after $ios reads"; fi
  A_IOPS=$iops
  A_US=$(awk -v t="$M_SERVER" -v hz="$HZ" -v n="$ios" 'BEGIN{printf "%.1f", (t/hz)*1e6/n}')
  A_FOREIGN=$M_FOREIGN_PCT
  echo "$name fio $tr qd$qd: $iops IOPS, $ios reads, server $M_SERVER ticks, fio $M_CLIENT ticks; foreign ${M_FOREIGN_PCT}% -> $A_US us/read" >>"$LOGS/details.txt"
}

# run_test KIND NAME TRANSPORT [QD]: runs seq_once or fio_once, again if it was noisy.
run_test() {
  local kind=$1 name=$2 tr=$3 qd=${4:-} k1 k2 v1 v2 f1 try b1 b2
  if [ "$kind" = seq ]; then k1=seq_$tr; k2=seqcpu_$tr; else k1=iops${qd}_$tr; k2=us${qd}_$tr; fi
  for try in 1 2; do
    if [ "$kind" = seq ]; then seq_once "$name" "$tr"; v1=$A_GIBS; v2=$A_CPU
    else fio_once "$name" "$tr" "$qd"; v1=$A_IOPS; v2=$A_US; fi
    if [ "$try" = 1 ] || [ "$A_FOREIGN" -lt "$f1" ]; then
      b1=$v1; b2=$v2; f1=$A_FOREIGN
    fi
    if [ "$f1" -le "$NOISE" ] || [ "$RETRY" = 0 ] || [ "$try" = 2 ]; then break; fi
    log "  other work took ${A_FOREIGN}% of the machine during that test; running it again"
    wait_quiet "the rerun"
  done
  if [ "$f1" -gt "$NOISE" ]; then
    b1="~$b1"; b2="~$b2"
    NOISY+=("$name $k1: other work took ${f1}% of the machine")
  fi
  put "$k1,$name" "$b1"
  put "$k2,$name" "$b2"
  return 0
}

bench_transport() {
  local name=$1 tr=$2
  log "$name: sequential over $tr"
  run_test seq "$name" "$tr"
  log "$name: random 4 KiB reads over $tr (2 x ${RUNTIME} s)"
  run_test fio "$name" "$tr" 1
  run_test fio "$name" "$tr" 32
}

: >"$LOGS/details.txt"
START=$(date +%s)
for name in $SERVERS; do
  case $name in vstream | nbdkit | qemu-nbd | vstream-tls | nbdkit-tls) ;; vstream-old) [ -n "$OLD_BIN" ] || die "vstream-old needs BENCH_OLD_BIN" ;; *) die "unknown server $name" ;; esac
  warm_cache
  wait_quiet "$name"
  if [[ $name == *-tls ]]; then
    start_server "$name" tcp
    bench_transport "$name" tcp
    stop_server
  elif [ "$name" = vstream ] || [ "$name" = vstream-old ]; then
    start_server "$name" tcp
    log "$name: memory with $CONNS idle connections"
    mem_test "$name"
    bench_transport "$name" tcp
    bench_transport "$name" unix
    stop_server
  else
    start_server "$name" tcp
    log "$name: memory with $CONNS idle connections"
    mem_test "$name"
    bench_transport "$name" tcp
    stop_server
    wait_quiet "$name over unix"
    start_server "$name" unix
    bench_transport "$name" unix
    stop_server
  fi
done
ELAPSED=$(($(date +%s) - START))

# --- the table -------------------------------------------------------------------------------
ROWS=(
  "seq_tcp|sequential read, TCP (GiB/s)"
  "seqcpu_tcp|sequential read, TCP: server CPU s/GiB"
  "seq_unix|sequential read, unix (GiB/s)"
  "seqcpu_unix|sequential read, unix: server CPU s/GiB"
  "iops1_tcp|4K randread QD1, TCP (IOPS)"
  "us1_tcp|4K randread QD1, TCP: server CPU µs/read"
  "iops32_tcp|4K randread QD32, TCP (IOPS)"
  "us32_tcp|4K randread QD32, TCP: server CPU µs/read"
  "iops1_unix|4K randread QD1, unix (IOPS)"
  "us1_unix|4K randread QD1, unix: server CPU µs/read"
  "iops32_unix|4K randread QD32, unix (IOPS)"
  "us32_unix|4K randread QD32, unix: server CPU µs/read"
  "rss_idle|RSS idle (MiB)"
  "rss_conns|RSS with $CONNS idle connections (MiB)"
  "kib_conn|RSS per idle connection (KiB)"
)
ratio() {
  local a=${1#\~} b=${2#\~}
  if [ -z "$a" ] || [ -z "$b" ]; then echo "-"; return; fi
  awk -v a="$a" -v b="$b" 'BEGIN{ if (b + 0 == 0) print "-"; else printf "%.2f×", a/b }'
}
{
  echo
  echo "vstream vs nbdkit vs qemu-nbd — $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, 2 GiB random raw image in page cache, fio ${RUNTIME} s per test, ${ELAPSED} s of measurement"
  echo "versions: vstream $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- crates 2>/dev/null || echo '+local changes'), $(nbdkit --version | head -1), $(qemu-nbd --version | head -1 | cut -d' ' -f1-2), $(nbdcopy --version | head -1), $(fio --version), kernel $(uname -r)"
  echo "ratios = vstream ÷ peer: above 1 is better for GiB/s and IOPS, below 1 is better for CPU and memory"
  echo
  TLS_TABLE=''
  [[ " $SERVERS " == *"-tls "* ]] && TLS_TABLE=1
  if [ -n "$TLS_TABLE" ]; then
    echo "vstream-tls, nbdkit-tls: NBD over TLS required (TCP), certificates in $PKI; a value is the median of its runs"
    echo
    echo "| test | vstream | vstream-tls | nbdkit-tls | vstream-tls/vstream | vstream-tls/nbdkit-tls |"
    echo "|---|---:|---:|---:|---:|---:|"
  elif [ -n "$OLD_BIN" ]; then
    echo "vstream-old: $OLD_BIN ($("$OLD_BIN" --version 2>/dev/null | head -1)); a vstream value is the median of its runs"
    echo
    echo "| test | vstream | vstream-old | nbdkit | qemu-nbd | vstream/vstream-old | vstream/nbdkit | vstream/qemu-nbd |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
  else
    echo "| test | vstream | nbdkit | qemu-nbd | vstream/nbdkit | vstream/qemu-nbd |"
    echo "|---|---:|---:|---:|---:|---:|"
  fi
  for row in "${ROWS[@]}"; do
    key=${row%%|*}
    label=${row#*|}
    v=$(get "$key,vstream")
    o=$(get "$key,vstream-old")
    k=$(get "$key,nbdkit")
    q=$(get "$key,qemu-nbd")
    if [ -n "$TLS_TABLE" ]; then
      t=$(get "$key,vstream-tls")
      kt=$(get "$key,nbdkit-tls")
      [ -z "$t$kt" ] && continue
      echo "| $label | ${v:--} | ${t:--} | ${kt:--} | $(ratio "$t" "$v") | $(ratio "$t" "$kt") |"
    elif [ -n "$OLD_BIN" ]; then
      echo "| $label | ${v:--} | ${o:--} | ${k:--} | ${q:--} | $(ratio "$v" "$o") | $(ratio "$v" "$k") | $(ratio "$v" "$q") |"
    else
      echo "| $label | ${v:--} | ${k:--} | ${q:--} | $(ratio "$v" "$k") | $(ratio "$v" "$q") |"
    fi
  done
  for name in $(printf '%s\n' $SERVERS | sort -u); do
    if [ -n "${R[conns_note,$name]:-}" ]; then echo "note: $name: ${R[conns_note,$name]}"; fi
  done
  for n in "${BUSY_NOTES[@]}"; do echo "warning: $n (numbers may be low)"; done
  for n in "${NOISY[@]}"; do echo "~ noisy: $n during the test (value kept, but suspect)"; done
  echo
  echo "logs and raw fio JSON: $LOGS (per-run details in $LOGS/details.txt)"
} | tee "$WORK/last-table.md"
