#!/bin/busybox sh
# /init of the vstream test initramfs (packed by tests/guest/build.sh).
# Loads the virtio + ext4 modules, waits for the root disk, mounts it and
# switch_root's into its /sbin/init. Any failure prints "GUEST-ERROR: ..." and
# powers the VM off so a test never hangs.
export PATH=/bin
. /lib/init-lib.sh
init_start initramfs /newroot

echo "GUEST-INITRD"

ROOT="$(karg root /dev/vda)"
ROOTFSTYPE="$(karg rootfstype ext4)"
ROOTFLAGS="$(karg rootflags)"
ROOTWAIT="$(karg vstest.rootwait 30)"

# The virtio + ext4 modules (build.sh wrote their order).
init_load_modules

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

# /run (init_start's) stays out of the root file system, as before.
umount /run 2>/dev/null
for d in dev proc sys; do
    mkdir -p "/newroot/$d" 2>/dev/null
    mount --move "/$d" "/newroot/$d" || die "mount --move /$d failed"
done

exec switch_root /newroot /sbin/init
die "switch_root failed"
