#!/bin/busybox sh
# /init of the vstream test initramfs (packed by tests/guest/build.sh).
# Loads the virtio + ext4 modules, waits for the root disk, mounts it and
# switch_root's into its /sbin/init. Any failure prints "GUEST-ERROR: ..." and
# powers the VM off so a test never hangs.
export PATH=/bin

/bin/busybox mkdir -p /dev /proc /sys /newroot
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
# The cpio has no /dev/console node: (re)attach stdio to the console now.
[ -c /dev/console ] && exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys

die() {
    echo "GUEST-ERROR: initramfs: $*"
    sync
    poweroff -f
    # poweroff -f should not return; if it does, exiting PID 1 panics the
    # kernel, and with panic=-1 + qemu -no-reboot that also ends the VM.
    exit 1
}

echo "GUEST-INITRD"

ROOT=/dev/vda
ROOTFSTYPE=ext4
ROOTFLAGS=
ROOTWAIT=30
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        root=*) ROOT="${arg#root=}" ;;
        rootfstype=*) ROOTFSTYPE="${arg#rootfstype=}" ;;
        rootflags=*) ROOTFLAGS="${arg#rootflags=}" ;;
        vstest.rootwait=*) ROOTWAIT="${arg#vstest.rootwait=}" ;;
    esac
done

# Modules in dependency order (written by build.sh). A failing insmod is only
# a warning (e.g. crc32c-intel on a CPU without SSE4.2); the real checks are
# that the disk shows up and mounts.
if [ -f /lib/modules/load-order ]; then
    while read -r m; do
        [ -n "$m" ] || continue
        insmod "/lib/modules/$m" 2>/dev/null || echo "GUEST-WARN: insmod $m failed"
    done </lib/modules/load-order
fi

# devtmpfs creates the node by itself; fall back to mknod from sysfs.
i=0
while [ ! -b "$ROOT" ]; do
    name="${ROOT#/dev/}"
    if [ -r "/sys/class/block/$name/dev" ]; then
        IFS=: read -r maj min <"/sys/class/block/$name/dev"
        mknod "$ROOT" b "$maj" "$min" 2>/dev/null
        continue
    fi
    i=$((i + 1))
    [ "$i" -le $((ROOTWAIT * 10)) ] || die "root device $ROOT did not appear within ${ROOTWAIT}s"
    usleep 100000
done

if [ -n "$ROOTFLAGS" ]; then
    mount -t "$ROOTFSTYPE" -o "rw,$ROOTFLAGS" "$ROOT" /newroot || die "mount $ROOT ($ROOTFSTYPE) failed"
else
    mount -t "$ROOTFSTYPE" -o rw "$ROOT" /newroot || die "mount $ROOT ($ROOTFSTYPE) failed"
fi
[ -x /newroot/sbin/init ] || die "/sbin/init missing on $ROOT"

for d in dev proc sys; do
    mkdir -p "/newroot/$d" 2>/dev/null
    mount --move "/$d" "/newroot/$d" || die "mount --move /$d failed"
done

exec switch_root /newroot /sbin/init
die "switch_root failed"
