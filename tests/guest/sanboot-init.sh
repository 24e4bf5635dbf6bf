#!/bin/busybox sh
# /init of the sanboot disk's initramfs (packed by tests/guest/build-sanboot.sh).
# The machine got here by iPXE `sanboot`: the BIOS read syslinux, this kernel
# and this initramfs from an iSCSI disk through iPXE's INT13 hook, and iPXE left
# an iBFT (iSCSI Boot Firmware Table) saying which target, portal, initiator
# name and CHAP secrets it used. As a Windows or distribution initramfs does,
# this one takes the disk over from the iBFT with Debian's open-iscsi:
#   iscsi_ibft        -> /sys/firmware/ibft/{initiator,ethernet0,target0}
#   iscsistart -N     -> the NIC set up as the iBFT says
#   iscsistart -b     -> the iBFT's session logged in, its LUN 0 as /dev/sda
# then mounts the disk's second partition (ext4) as root and switch_root's to
# its /sbin/init (rootfs-init.sh), which reads vstest= as always.
# Lines for the host start with GUEST- (the secrets never appear):
#   GUEST-INITRD sanboot
#   GUEST-IBFT initiator=IQN target=IQN portal=IP:PORT mac=MAC chap=yes|no
#   GUEST-ISCSI session=sessionN target=IQN portal=IP:PORT disk=sdX
#   GUEST-ROOT DEV on iSCSI target IQN
# Any failure: GUEST-ERROR ..., then the VM powers off.
export PATH=/bin:/sbin
. /lib/init-lib.sh
init_start "sanboot initramfs" /newroot /etc/iscsi

echo "GUEST-INITRD sanboot"
# The modules in dependency order (build-sanboot.sh wrote it).
init_load_modules

IBFT=/sys/firmware/ibft
[ -d "$IBFT/target0" ] || die "no iBFT target in $IBFT: the firmware (iPXE) wrote no iBFT"
rd() { cat "$IBFT/$1" 2>/dev/null; }
chap=no
[ -n "$(rd target0/chap-name)" ] && chap=yes
echo "GUEST-IBFT initiator=$(rd initiator/initiator-name) target=$(rd target0/target-name)" \
    "portal=$(rd target0/ip-addr):$(rd target0/port) mac=$(rd ethernet0/mac) chap=$chap"

# The initiator name iscsistart falls back to (-b takes the iBFT's own).
echo "InitiatorName=$(rd initiator/initiator-name)" >/etc/iscsi/initiatorname.iscsi
iscsistart -N || die "iscsistart -N could not set up the NIC from the iBFT"
iscsistart -b || die "iscsistart -b could not log in to the iBFT's target"

# The disk of the session: the SCSI disk whose device path runs through an
# iSCSI session.
disk=
i=0
while [ $i -lt 100 ]; do
    for b in /sys/block/sd*; do
        [ -e "$b" ] || continue
        case "$(readlink -f "$b/device")" in
            */session*) disk="${b##*/}" ;;
        esac
    done
    [ -n "$disk" ] && [ -b "/dev/${disk}2" ] && break
    sleep 0.1
    i=$((i + 1))
done
[ -n "$disk" ] || die "no SCSI disk on an iSCSI session after iscsistart -b"
[ -b "/dev/${disk}2" ] || die "/dev/$disk has no second partition"
sess="$(readlink -f "/sys/block/$disk/device")"
sess="$(echo "$sess" | sed -n 's,.*/\(session[0-9]*\)/.*,\1,p')"
tn="$(cat "/sys/class/iscsi_session/$sess/targetname" 2>/dev/null)"
conn="$(ls -d /sys/class/iscsi_connection/connection"${sess#session}":* 2>/dev/null | head -n1)"
addr="$(cat "$conn/persistent_address" 2>/dev/null):$(cat "$conn/persistent_port" 2>/dev/null)"
echo "GUEST-ISCSI session=$sess target=$tn portal=$addr disk=$disk"

mount -t ext4 -o rw "/dev/${disk}2" /newroot || die "cannot mount /dev/${disk}2"
echo "GUEST-ROOT /dev/${disk}2 on iSCSI target $tn"
[ -x /newroot/sbin/init ] || die "no /sbin/init on the root partition"
umount /run 2>/dev/null
mount --move /dev /newroot/dev 2>/dev/null || umount /dev 2>/dev/null
umount /sys /proc 2>/dev/null
exec switch_root /newroot /sbin/init
die "switch_root failed"
