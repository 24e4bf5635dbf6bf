#!/bin/busybox sh
# /power-init of the network-boot initramfs (tests/guest/build-netboot.sh
# packs it beside /init; the kernel runs it with rdinit=/power-init).
# It runs a real `vstream server` inside the guest, its data folder on the
# guest's virtio disk, so that killing QEMU is a power cut for the server:
# whatever the guest kernel held in its page cache is gone, and only what
# reached the virtual disk survives. crates/vstream/tests/e2e/power_loss.rs
# drives it.
#
#   /dev/vda    ext4, mounted on /data; the server's data folder is
#               /data/vstream (the host seeds admin.token there)
#   eth0        10.0.2.15/24 (QEMU user networking); the server listens on
#               0.0.0.0:10809 (NBD) and 0.0.0.0:7080 (API), which the host
#               forwards (hostfwd)
#   vstest.writeback=hold|fast|default
#               hold:  the kernel writes no dirty page back by itself (no
#                      periodic writeback, nothing expires, high dirty
#                      limits): only what the server syncs reaches the disk,
#                      the worst case for a power cut
#               fast:  dirty pages go back to the disk within ~50 ms, so a
#                      cut finds unsynced writes half on the disk
#               default: the kernel's own settings
#
# Console lines for the host: the server's log, "GUEST-SERVER ready" once
# it listens, "GUEST-SERVER exited RC" if it ends; any failure prints
# "GUEST-ERROR: ..." and powers the VM off.
export PATH=/bin
. /lib/init-lib.sh
init_start power-init /data

up() { cut -d' ' -f1 /proc/uptime; }
echo "GUEST-INITRD power uptime=$(up)"
init_load_modules

WRITEBACK="$(karg vstest.writeback default)"
vm() { echo "$2" >"/proc/sys/vm/$1" || die "cannot set vm.$1=$2"; }
case "$WRITEBACK" in
    hold)
        vm dirty_writeback_centisecs 0
        vm dirty_expire_centisecs 360000
        vm dirty_background_ratio 80
        vm dirty_ratio 90
        ;;
    fast)
        vm dirty_writeback_centisecs 5
        vm dirty_expire_centisecs 1
        ;;
    default) ;;
    *) die "vstest.writeback=$WRITEBACK: want hold, fast or default" ;;
esac

wait_for 300 "/dev/vda did not appear within 30 s" [ -b /dev/vda ]
# A power cut leaves the journal to replay: mount does it.
mount -t ext4 -o rw /dev/vda /data || die "mount /dev/vda failed"
[ -d /data/vstream ] || die "/data/vstream missing on /dev/vda"

init_net_up

echo "GUEST-SERVER starting uptime=$(up)"
# Its log goes to the console, where the host reads it, through a pipe (on
# a terminal it would be coloured).
mkfifo /run/log || die "mkfifo"
cat /run/log >/dev/console &
RUST_LOG=info /bin/vstream server --data /data/vstream --name power-guest \
    --nbd 0.0.0.0:10809 --api 0.0.0.0:7080 </dev/null >/dev/null 2>/run/log &
SERVER=$!
listens() { netstat -ltn 2>/dev/null | grep -q ":$1 "; }
i=0
until listens 10809 && listens 7080; do
    kill -0 "$SERVER" 2>/dev/null || break
    i=$((i + 1))
    [ "$i" -le 1200 ] || die "the server did not listen within 120 s"
    usleep 100000
done
if kill -0 "$SERVER" 2>/dev/null; then
    echo "GUEST-SERVER ready writeback=$WRITEBACK uptime=$(up)"
fi
wait "$SERVER"
rc=$?
echo "GUEST-SERVER exited $rc"
init_poweroff
