#!/bin/busybox sh
# /init of the vstream network-boot test initramfs (packed by
# tests/guest/build-netboot.sh). Loads the virtio-net/nbd/ext4 modules, then
# dist/vstream-root.sh (in /scripts) brings the network up with DHCP, starts
# the agent (`vstream target --attach /dev/nbd0`; or, with
# vstream.client=nbd-client, logs in and runs Debian's nbd-client), waits for
# the device and mounts the root file system; /init moves /dev, /proc, /sys
# and /run into it and switch_root's into its /sbin/init, the client still
# running.
# Any failure prints "GUEST-ERROR: ..." and powers the VM off, so a test
# never hangs. With vstest.stopagent on the kernel command line it also
# stops and continues the agent first, as systemd-shutdown does, and checks
# that the disk still reads.
export PATH=/bin
. /lib/init-lib.sh
init_start "netboot initramfs" /newroot

echo "GUEST-INITRD netboot"
# The virtio-net/nbd/ext4 modules (build-netboot.sh wrote their order).
init_load_modules

[ -r /scripts/vstream-root.sh ] || die "/scripts/vstream-root.sh is missing"
. /scripts/vstream-root.sh

vstream_mountroot /newroot || die "vstream: ${VSTREAM_ERROR:-mounting the root file system failed}"
[ -x /newroot/sbin/init ] || die "/sbin/init missing on $VSTREAM_DEV"

# What the host checks: the client runs, under the name systemd spares.
argv0="$(tr '\0' '\n' <"/proc/$VSTREAM_CLIENT_PID/cmdline" 2>/dev/null | head -n 1)"
echo "GUEST-NETBOOT attached $VSTREAM_DEV client=$VSTREAM_CLIENT pid=$VSTREAM_CLIENT_PID agent_pid=$VSTREAM_AGENT_PID argv0=$argv0 iface=$VSTREAM_IFACE mac=$VSTREAM_MAC boot=${VSTREAM_BOOT:-}"

# vstest.stopagent: stop and continue the agent, as systemd-shutdown does to
# every process (kill(-1, SIGSTOP) ... SIGCONT, '@' ones included), then
# read from the disk: the device must survive it.
if grep -qw vstest.stopagent /proc/cmdline && [ -n "$VSTREAM_AGENT_PID" ]; then
    kill -STOP "$VSTREAM_AGENT_PID"
    usleep 200000
    kill -CONT "$VSTREAM_AGENT_PID"
    usleep 200000
    sync
    echo 3 >/proc/sys/vm/drop_caches
    dd if="$VSTREAM_DEV" of=/dev/null bs=4096 count=16 skip=1000 2>/dev/null ||
        die "$VSTREAM_DEV unreadable after SIGSTOP/SIGCONT of the agent ($(tail -n 1 /run/vstream/agent.log))"
    echo "GUEST-NETBOOT agent survived SIGSTOP/SIGCONT"
fi

for d in dev proc sys run; do
    mkdir -p "/newroot/$d" 2>/dev/null
    if [ -d "/newroot/$d" ]; then
        mount --move "/$d" "/newroot/$d" || die "mount --move /$d failed"
    elif [ "$d" != run ]; then
        die "/$d missing on the root file system"
    fi
    # A read-only root without /run: /run (the agent's log) stays behind,
    # still mounted, out of sight.
done

exec switch_root /newroot /sbin/init
die "switch_root failed"
