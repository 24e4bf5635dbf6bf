# shellcheck shell=sh
# Shared by the guest kit's /init scripts (initramfs-init.sh, netboot-init.sh,
# power-init.sh, nbd-client-init.sh, iscsi-init.sh, sanboot-init.sh). It runs
# INSIDE the guest, under busybox sh (ash): POSIX sh only. The build scripts
# (build.sh, build-netboot.sh, build-iscsi.sh, build-sanboot.sh) install it
# into each initramfs as /lib/init-lib.sh, and every init sources it first:
#
#   export PATH=/bin
#   . /lib/init-lib.sh
#   init_start "NAME" [DIR...]
#
# (Not to be confused with lib.sh, the host-side library of the build and
# run scripts, which is bash.)

# init_start NAME [DIR...]: PID 1's first steps: DIR... made, devtmpfs on
# /dev, stdio (re)attached to the console, /proc, /sys and a tmpfs /run
# mounted. NAME is what die's GUEST-ERROR lines name.
init_start() {
    INIT_NAME="$1"
    shift
    /bin/busybox mkdir -p /dev /proc /sys /run "$@"
    /bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
    # The cpio has no /dev/console node: (re)attach stdio to the console now.
    [ -c /dev/console ] && exec </dev/console >/dev/console 2>&1
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
}

# die MSG...: "GUEST-ERROR: NAME: MSG" for the host, then the last 10 lines of
# $INIT_DIE_LOG (if set and not empty), each behind $INIT_DIE_LOG_TAG; then
# the VM powers off, so a test never hangs.
INIT_NAME=init
INIT_DIE_LOG=
INIT_DIE_LOG_TAG=GUEST-LOG
die() {
    echo "GUEST-ERROR: $INIT_NAME: $*"
    if [ -n "$INIT_DIE_LOG" ] && [ -s "$INIT_DIE_LOG" ]; then
        sed "s/^/$INIT_DIE_LOG_TAG /" "$INIT_DIE_LOG" | tail -n 10
    fi
    sync
    poweroff -f
    # poweroff -f should not return; if it does, exiting PID 1 panics the
    # kernel, and with panic=-1 + qemu -no-reboot that also ends the VM.
    exit 1
}

# init_load_modules: insmod the modules of /lib/modules in the order the
# build script wrote into /lib/modules/load-order (dependencies first). A
# failing insmod is only a warning (e.g. crc32c-intel on a CPU without
# SSE4.2); the real checks are that the devices the init needs come up.
init_load_modules() {
    [ -f /lib/modules/load-order ] || return 0
    while read -r m; do
        [ -n "$m" ] || continue
        insmod "/lib/modules/$m" 2>/dev/null || echo "GUEST-WARN: insmod $m failed"
    done </lib/modules/load-order
}

# karg NAME [DEFAULT]: prints the value of NAME=VALUE on the kernel command
# line (the last one, as the kernel takes it), else DEFAULT.
karg() {
    _karg_v="${2:-}"
    for _karg_a in $(cat /proc/cmdline); do
        case "$_karg_a" in
            "$1"=*) _karg_v="${_karg_a#"$1"=}" ;;
        esac
    done
    echo "$_karg_v"
}

# init_net_up: lo, and eth0 as QEMU user networking expects it: 10.0.2.15/24,
# the host (its loopback) at 10.0.2.2 as the default gateway.
init_net_up() {
    ifconfig lo 127.0.0.1 up || die "lo"
    ifconfig eth0 10.0.2.15 netmask 255.255.255.0 up || die "eth0 did not come up"
    route add default gw 10.0.2.2 2>/dev/null
}

# wait_for TENTHS WHAT COMMAND...: runs COMMAND every 0.1 s until it
# succeeds; dies with WHAT when it has not after TENTHS tries.
wait_for() {
    _wait_n="$1"
    _wait_what="$2"
    shift 2
    _wait_i=0
    until "$@"; do
        _wait_i=$((_wait_i + 1))
        [ "$_wait_i" -le "$_wait_n" ] || die "$_wait_what"
        usleep 100000
    done
}

# init_poweroff: what every path ends in: the disks synced, the VM off.
init_poweroff() {
    sync
    poweroff -f
}
