#!/bin/busybox sh
# /nbd-client-init of the network-boot initramfs (tests/guest/build-netboot.sh
# packs it beside /init; the kernel runs it with rdinit=/nbd-client-init).
# Debian's nbd-client attaches the guest kernel's /dev/nbd0 to an export over
# TLS, with a client certificate, the way a host with storage would use a
# device credential (`vstream device credential NAME --out DIR`). The disk
# holds the kit's root file system: the guest mounts it, reports what an
# earlier boot wrote, writes a file of its own, reads it back uncached,
# detaches and powers off. crates/vstream/tests/e2e/guest_boot.rs drives it.
#
#   eth0                10.0.2.15/24 (QEMU user networking; the host's
#                       loopback is 10.0.2.2)
#   vstest.nbd=HOST:PORT  the server, as the guest reaches it
#   vstest.export=NAME  the export (device/NAME)
#   vstest.tls=DIR      the credential: DIR/ca-cert.pem, client-cert.pem,
#                       client-key.pem (the host appends them to the initrd)
#   vstest=TOKEN        what to write into /data/nbdc-token
#
# Console lines for the host:
#   GUEST-NBDC plain refused      nbd-client without TLS did not attach
#   GUEST-NBDC attached ...       nbd-client with TLS did
#   GUEST-TOKEN <token|NONE>      /data/token, as an earlier boot left it
#   GUEST-BIGFILE OK|NONE         /data/big against its md5, if there
#   GUEST-NBDC-MD5 <sum>          of the 1 MiB file this boot wrote
#   GUEST-OK nbd-client TOKEN     all done, the device detached
# Any failure prints "GUEST-ERROR: ..." and powers the VM off.
export PATH=/bin:/sbin
. /lib/init-lib.sh
init_start nbd-client-init /mnt
INIT_DIE_LOG=/run/nbdc.log
INIT_DIE_LOG_TAG=GUEST-NBDC-LOG

echo "GUEST-INITRD nbd-client"
init_load_modules

NBD="$(karg vstest.nbd)"
EXPORT="$(karg vstest.export)"
TLS="$(karg vstest.tls)"
TOKEN="$(karg vstest)"
[ -n "$NBD" ] && [ -n "$EXPORT" ] && [ -n "$TLS" ] && [ -n "$TOKEN" ] ||
    die "need vstest.nbd=HOST:PORT vstest.export=NAME vstest.tls=DIR vstest=TOKEN"
HOST="${NBD%:*}"
PORT="${NBD##*:}"
for f in ca-cert.pem client-cert.pem client-key.pem; do
    [ -r "$TLS/$f" ] || die "$TLS/$f missing"
done

init_net_up

[ -b /dev/nbd0 ] || die "/dev/nbd0 missing: no nbd module?"
attached() { [ "$(cat /sys/block/nbd0/size 2>/dev/null)" != 0 ] && [ -e /sys/block/nbd0/pid ]; }

# Without TLS the server (--tls require) must not let it attach.
if timeout 30 nbd-client "$HOST" "$PORT" /dev/nbd0 -N "$EXPORT" >/run/plain.log 2>&1 && attached; then
    die "nbd-client attached $EXPORT without TLS"
fi
echo "GUEST-NBDC plain refused: $(grep -v -x "Exiting." /run/plain.log | tail -n 1)"

# With TLS: nbd-client stays as the proxy between the kernel's socket and
# the TLS connection, so it keeps running in the background.
nbd-client "$HOST" "$PORT" /dev/nbd0 -N "$EXPORT" \
    -certfile "$TLS/client-cert.pem" -keyfile "$TLS/client-key.pem" \
    -cacertfile "$TLS/ca-cert.pem" >/run/nbdc.log 2>&1 ||
    die "nbd-client over TLS failed"
wait_for 300 "/dev/nbd0 not attached within 30 s" attached
echo "GUEST-NBDC attached /dev/nbd0 $(($(cat /sys/block/nbd0/size) / 2048)) MiB export=$EXPORT pid=$(cat /sys/block/nbd0/pid)"

mount -t ext4 -o rw /dev/nbd0 /mnt || die "mount /dev/nbd0 failed"
if [ -f /mnt/data/token ]; then
    echo "GUEST-TOKEN $(cat /mnt/data/token)"
else
    echo "GUEST-TOKEN NONE"
fi
if [ -f /mnt/data/big.md5 ]; then
    (cd /mnt/data && md5sum -c -s big.md5) || die "checksum mismatch for /data/big"
    echo "GUEST-BIGFILE OK"
else
    echo "GUEST-BIGFILE NONE"
fi

mkdir -p /mnt/data || die "mkdir /data"
dd if=/dev/urandom of=/mnt/data/nbdc.bin bs=1M count=1 2>/dev/null || die "write /data/nbdc.bin"
echo "$TOKEN" >/mnt/data/nbdc-token || die "write /data/nbdc-token"
(cd /mnt/data && md5sum nbdc.bin >nbdc.md5) || die "md5sum"
sync || die "sync"
# Uncached: the read-back crosses nbd-client's TLS connection.
echo 3 >/proc/sys/vm/drop_caches
(cd /mnt/data && md5sum -c -s nbdc.md5) || die "read-back checksum mismatch for /data/nbdc.bin"
[ "$(cat /mnt/data/nbdc-token)" = "$TOKEN" ] || die "token read back wrong"
echo "GUEST-NBDC-MD5 $(cut -d' ' -f1 /mnt/data/nbdc.md5)"
umount /mnt || die "umount /dev/nbd0 failed"
nbd-client -d /dev/nbd0 >>/run/nbdc.log 2>&1 || die "nbd-client -d failed"
echo "GUEST-OK nbd-client $TOKEN"
init_poweroff
