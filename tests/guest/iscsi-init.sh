#!/bin/busybox sh
# /init of the iSCSI initramfs (tests/guest/build-iscsi.sh). Debian's
# open-iscsi (iscsid + iscsiadm) in a diskless guest does what an iSCSI
# client of a vstream server does, on QEMU user networking:
# SendTargets discovery (without CHAP, then with the device's), then, at the
# node discovery made, a login with a wrong CHAP secret and with the right
# one; mkfs.ext4 on the disk, a file written, sync, logout; a second login
# that reads the file back; logout.
# crates/vstream/tests/e2e/iscsi_guest.rs drives it and checks the disk from
# the host afterwards.
#
#   eth0                  10.0.2.15/24 (the host's loopback is 10.0.2.2)
#   vstest.portal=HOST:PORT  the server's iSCSI portal, as the guest reaches it
#   vstest.initiator=IQN  the initiator name (the device's)
#   vstest.user=NAME      the CHAP user name (the device's)
#   vstest.secret=FILE    a file holding the CHAP secret (the host appends it
#                         to the initrd: no secret on a command line)
#   vstest=TOKEN          what to write into /iscsi-token
#
# Console lines for the host:
#   GUEST-ISCSI-DISCOVERY noauth refused|allowed: MSG   discovery without CHAP
#   GUEST-ISCSI-TARGET PORTAL,TPGT IQN    one per target discovery showed (the
#                                         portal must be one the guest reaches)
#   GUEST-ISCSI-DISCOVERY N targets
#   GUEST-ISCSI-WRONG-CHAP refused: MSG   the login with a wrong secret
#   GUEST-ISCSI-LOGIN N DEV MIB           login N, the disk it brought
#   GUEST-ISCSI-MKFS DEV                  mkfs.ext4 done
#   GUEST-ISCSI-MD5 SUM                   of the 1 MiB /iscsi.bin written
#   GUEST-ISCSI-LOGOUT N                  logout N, the disk gone
#   GUEST-ISCSI-READBACK SUM              /iscsi.bin after login 2
#   GUEST-OK iscsi TOKEN                  all done
# Any failure prints "GUEST-ERROR: ..." (with iscsid's last lines); every
# path powers the VM off.
export PATH=/bin:/sbin
. /lib/init-lib.sh
init_start iscsi-init /mnt
INIT_DIE_LOG=/run/iscsid.log
INIT_DIE_LOG_TAG=GUEST-ISCSID-LOG

echo "GUEST-INITRD iscsi"
init_load_modules

PORTAL="$(karg vstest.portal)"
INITIATOR="$(karg vstest.initiator)"
USER="$(karg vstest.user)"
SECRET_FILE="$(karg vstest.secret)"
TOKEN="$(karg vstest)"
[ -n "$PORTAL" ] && [ -n "$INITIATOR" ] && [ -n "$USER" ] && [ -n "$SECRET_FILE" ] && [ -n "$TOKEN" ] ||
    die "need vstest.portal=HOST:PORT vstest.initiator=IQN vstest.user=NAME vstest.secret=FILE vstest=TOKEN"
[ -s "$SECRET_FILE" ] || die "$SECRET_FILE missing"
SECRET="$(cat "$SECRET_FILE")"
WRONG="Wrong${SECRET#?????}"
[ "$WRONG" != "$SECRET" ] || WRONG="wRONG${SECRET#?????}"

init_net_up

# open-iscsi's state lives in /etc/iscsi (Debian's build); short timeouts, as
# nothing here should wait long.
mkdir -p /etc/iscsi /run/lock/iscsi
echo "InitiatorName=$INITIATOR" >/etc/iscsi/initiatorname.iscsi
cat >/etc/iscsi/iscsid.conf <<EOF
iscsid.startup = /bin/false
node.startup = manual
node.session.initial_login_retry_max = 2
node.conn[0].timeo.login_timeout = 15
node.conn[0].timeo.logout_timeout = 15
node.session.timeo.replacement_timeout = 15
node.session.scan = auto
EOF
iscsid -f >/run/iscsid.log 2>&1 &
# Up once it listens on its abstract socket.
wait_for 100 "iscsid did not start" grep -q ISCSIADM_ABSTRACT_NAMESPACE /proc/net/unix

# Discovery: without CHAP first (the server should refuse), then with it.
if iscsiadm -m discovery -t st -p "$PORTAL" >/run/noauth.log 2>&1; then
    echo "GUEST-ISCSI-DISCOVERY noauth allowed: $(tr '\n' ' ' </run/noauth.log)"
else
    echo "GUEST-ISCSI-DISCOVERY noauth refused: $(grep -v '^$' /run/noauth.log | tr '\n' ' ')"
fi
disc() { iscsiadm -m discoverydb -t st -p "$PORTAL" "$@"; }
disc -o new >/dev/null 2>&1 || disc >/dev/null 2>&1 || die "discoverydb: no record"
disc -o update -n discovery.sendtargets.auth.authmethod -v CHAP >/dev/null || die "discoverydb authmethod"
disc -o update -n discovery.sendtargets.auth.username -v "$USER" >/dev/null || die "discoverydb username"
disc -o update -n discovery.sendtargets.auth.password -v "$SECRET" >/dev/null || die "discoverydb password"
disc --discover >/run/disc.log 2>&1 || die "discovery with CHAP failed: $(tail -n 1 /run/disc.log)"
n=0
while read -r portal iqn _; do
    case "$iqn" in iqn.* | eui.*) ;; *) continue ;; esac
    echo "GUEST-ISCSI-TARGET $portal $iqn"
    n=$((n + 1))
    TARGET="$iqn"
    NODE_PORTAL="${portal%,*}"
done </run/disc.log
echo "GUEST-ISCSI-DISCOVERY $n targets"
[ "$n" = 1 ] || die "discovery showed $n targets, not 1"

# The node discovery made, at the portal it named.
node() { iscsiadm -m node -T "$TARGET" -p "$NODE_PORTAL" "$@"; }
node_set() { node -o update -n "$1" -v "$2" >/dev/null || die "iscsiadm: setting $1"; }
node_set node.session.auth.authmethod CHAP
node_set node.session.auth.username "$USER"

node_set node.session.auth.password "$WRONG"
if node --login >/run/wrong.log 2>&1; then
    die "a login with a wrong CHAP secret got in"
fi
iscsiadm -m session >/dev/null 2>&1 && die "a session is up after the wrong login"
echo "GUEST-ISCSI-WRONG-CHAP refused: $(grep -i 'error\|fail' /run/wrong.log | head -n 1)"
node_set node.session.auth.password "$SECRET"

# The session's SCSI disk (sd*), once the kernel has scanned it.
disk() {
    for d in /sys/block/sd*; do
        [ -e "$d" ] && [ "$(cat "$d/size")" != 0 ] && { echo "${d##*/}"; return 0; }
    done
    return 1
}
login() {
    node --login >/run/login.log 2>&1 || die "login $1 failed: $(tail -n 1 /run/login.log)"
    i=0
    until DEV="$(disk)"; do
        i=$((i + 1))
        [ "$i" -le 200 ] || die "no disk within 20 s of login $1"
        usleep 100000
    done
    wait_for 50 "/dev/$DEV missing" [ -b "/dev/$DEV" ]
    echo "GUEST-ISCSI-LOGIN $1 $DEV $(($(cat "/sys/block/$DEV/size") / 2048))"
}
logout() {
    node --logout >/run/logout.log 2>&1 || die "logout $1 failed: $(tail -n 1 /run/logout.log)"
    i=0
    while disk >/dev/null; do
        i=$((i + 1))
        [ "$i" -le 100 ] || die "the disk stayed after logout $1"
        usleep 100000
    done
    echo "GUEST-ISCSI-LOGOUT $1"
}

login 1
mkfs.ext4 -q -F -L vstest-iscsi "/dev/$DEV" >/run/mkfs.log 2>&1 || die "mkfs.ext4: $(tail -n 1 /run/mkfs.log)"
echo "GUEST-ISCSI-MKFS $DEV"
mount -t ext4 "/dev/$DEV" /mnt || die "mount /dev/$DEV failed"
dd if=/dev/urandom of=/mnt/iscsi.bin bs=1M count=1 2>/dev/null || die "write /iscsi.bin"
echo "$TOKEN" >/mnt/iscsi-token || die "write /iscsi-token"
(cd /mnt && md5sum iscsi.bin >iscsi.md5) || die "md5sum"
sync || die "sync"
echo "GUEST-ISCSI-MD5 $(cut -d' ' -f1 /mnt/iscsi.md5)"
umount /mnt || die "umount"
logout 1

login 2
mount -t ext4 -o ro "/dev/$DEV" /mnt || die "mount /dev/$DEV after login 2 failed"
(cd /mnt && md5sum -c -s iscsi.md5) || die "/iscsi.bin does not match its md5 after login 2"
[ "$(cat /mnt/iscsi-token)" = "$TOKEN" ] || die "/iscsi-token read back wrong"
echo "GUEST-ISCSI-READBACK $(md5sum /mnt/iscsi.bin | cut -d' ' -f1)"
umount /mnt || die "umount after login 2"
logout 2

echo "GUEST-OK iscsi $TOKEN"
init_poweroff
