#!/bin/sh
# /sbin/init of the vstream test root filesystem (an ext4 image served over
# NBD). Reads "vstest=" from the kernel command line, does the requested
# reads/writes on the NBD-backed root, reports on the serial console and
# powers off. Lines for the host all start with "GUEST-".
#
#   vstest=write:TOKEN  write TOKEN to /data/token, write an 8 MiB random file,
#                       record its md5, drop caches, read it back and verify.
#                       -> GUEST-MD5 <sum>, GUEST-OK write TOKEN
#   vstest=read         -> GUEST-TOKEN <token|NONE>,
#                          GUEST-MD5 <sum> + GUEST-BIGFILE OK (if present, verified)
#                          or GUEST-BIGFILE NONE, then GUEST-OK read
# Optional words, for a guest whose server is killed under it
# (crates/vstream/tests/e2e/netboot.rs):
#   vstest.pause=N      first -> GUEST-PAUSE N, then N seconds of nothing: the
#                       host kills a server then, and all the I/O below
#                       comes after
#   vstest.readdisk     after the test, drop the caches and read the whole
#                       root device -> GUEST-READDISK <dev> OK
#   vstest.hold=N       after the test, with its writes on the disk ->
#                       GUEST-HOLD N, then N seconds of nothing: the host
#                       looks at other disks while this one is still
#                       connected (crates/vstream/tests/e2e/iscsi_guest.rs)
#   vstest.agentlog     then copy the agent's log lines about enrollment,
#                       failover and errors (/run/vstream/agent.log) as
#                       GUEST-AGENT <line>
# Failure anywhere -> GUEST-ERROR <what>; the VM powers off in every case.
export PATH=/bin:/sbin
echo "GUEST-BOOTED"

# (busybox here has no "mountpoint" applet)
ismnt() { grep -q "^[^ ]* $1 " /proc/mounts 2>/dev/null; }
ismnt /proc || mount -t proc proc /proc
ismnt /sys || mount -t sysfs sysfs /sys
ismnt /dev || mount -t devtmpfs devtmpfs /dev
ismnt /tmp || mount -t tmpfs tmpfs /tmp

BIGMB=8

finish() {
    sync
    mount -o remount,ro / 2>/dev/null || echo "GUEST-WARN remount ro failed"
    sync
    echo "GUEST-POWEROFF"
    poweroff -f
    exit "${1:-0}"
}

fail() {
    echo "GUEST-ERROR $*"
    finish 1
}

VSTEST=
PAUSE=
HOLD=
READDISK=
AGENTLOG=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vstest=*) VSTEST="${arg#vstest=}" ;;
        vstest.bigmb=*) BIGMB="${arg#vstest.bigmb=}" ;;
        vstest.pause=*) PAUSE="${arg#vstest.pause=}" ;;
        vstest.hold=*) HOLD="${arg#vstest.hold=}" ;;
        vstest.readdisk) READDISK=1 ;;
        vstest.agentlog) AGENTLOG=1 ;;
    esac
done

if [ -n "$PAUSE" ]; then
    echo "GUEST-PAUSE $PAUSE"
    sleep "$PAUSE"
fi

case "$VSTEST" in
    write:?*)
        TOKEN="${VSTEST#write:}"
        mkdir -p /data || fail "mkdir /data"
        echo "$TOKEN" >/data/token.new || fail "write /data/token"
        mv /data/token.new /data/token || fail "rename /data/token"
        dd if=/dev/urandom of=/data/big bs=1M count="$BIGMB" 2>/dev/null || fail "write /data/big"
        (cd /data && md5sum big >big.md5) || fail "md5sum /data/big"
        sync || fail "sync"
        # Drop the page cache so the verification really reads from the disk.
        echo 3 >/proc/sys/vm/drop_caches
        (cd /data && md5sum -c -s big.md5) || fail "read-back checksum mismatch for /data/big"
        got="$(cat /data/token)" || fail "read /data/token"
        [ "$got" = "$TOKEN" ] || fail "token read back as '$got', expected '$TOKEN'"
        echo "GUEST-MD5 $(cut -d' ' -f1 /data/big.md5)"
        echo "GUEST-OK write $TOKEN"
        ;;
    read)
        if [ -f /data/token ]; then
            echo "GUEST-TOKEN $(cat /data/token)"
        else
            echo "GUEST-TOKEN NONE"
        fi
        if [ -f /data/big.md5 ]; then
            (cd /data && md5sum -c -s big.md5) || fail "checksum mismatch for /data/big"
            echo "GUEST-MD5 $(cut -d' ' -f1 /data/big.md5)"
            echo "GUEST-BIGFILE OK"
        else
            echo "GUEST-BIGFILE NONE"
        fi
        echo "GUEST-OK read"
        ;;
    "")
        fail "no vstest= on the kernel command line"
        ;;
    *)
        fail "unknown vstest=$VSTEST"
        ;;
esac

if [ -n "$READDISK" ]; then
    # The root file system's device (the last mount on /).
    dev="$(awk '$2 == "/" { d = $1 } END { print d }' /proc/mounts)"
    [ -b "$dev" ] || fail "readdisk: the root device '$dev' is not a block device"
    sync
    echo 3 >/proc/sys/vm/drop_caches
    dd if="$dev" of=/dev/null bs=1M 2>/dev/null || fail "readdisk: reading $dev failed"
    echo "GUEST-READDISK $dev OK"
fi
if [ -n "$AGENTLOG" ]; then
    [ -r /run/vstream/agent.log ] || fail "agentlog: no /run/vstream/agent.log"
    grep -E 'enrollment|failed over|ERROR|WARN' /run/vstream/agent.log | sed 's/^/GUEST-AGENT /'
fi

if [ -n "$HOLD" ]; then
    sync
    echo "GUEST-HOLD $HOLD"
    sleep "$HOLD"
fi

finish 0
