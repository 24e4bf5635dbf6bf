#!/usr/bin/env bash
# Build the initramfs of the iSCSI guest: Debian's open-iscsi initiator
# (iscsiadm + iscsid) in a diskless VM that logs in to a vstream device
# target over QEMU user networking (iscsi-init.sh says what it does).
#
#   tests/guest/build-iscsi.sh OUTDIR
#
# Runs tests/guest/build.sh OUTDIR first (the kernel and the cached kernel
# .deb), then writes OUTDIR/iscsi-initrd.img:
#   busybox-static; the virtio_pci/virtio_net, iscsi_tcp (with libiscsi_tcp,
#   libiscsi, scsi_transport_iscsi), sd_mod and ext4 modules and their deps
#   from the same kernel .deb (modprobe --show-depends, as build.sh does);
#   iscsiadm and iscsid from Debian's open-iscsi .deb, with libisns and
#   libopeniscsiusr from theirs (fetch-kernel.sh's cache, copied into OUTDIR,
#   never installed) and their other libraries from the host (ldd);
#   the host's mke2fs as /sbin/mkfs.ext4 with its libraries (busybox makes
#   ext2 only); /init = iscsi-init.sh.
# Idempotent: does nothing when OUTDIR/.iscsi-stamp matches the inputs.
# Boot it with run-netboot-guest.sh (VSTREAM_GUEST_INITRD=OUTDIR/iscsi-initrd.img)
# as crates/vstream/tests/e2e/iscsi_guest.rs does.
#
# Needs what build.sh needs, plus ldd and e2fsprogs (mke2fs), and the host
# libraries open-iscsi links (libssl3, libkmod2, libmount1, libsystemd0).
#
# Environment knobs (all optional):
#   VSTREAM_GUEST_KERNEL_DEB, VSTREAM_GUEST_KERNEL_PKG, VSTREAM_GUEST_BUSYBOX
#                            as for build.sh
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/guest/lib.sh
. "$HERE/lib.sh"
guest_build_init build-iscsi.sh "$1"
# The network, the initiator's transport and the SCSI disk, ext4 on it; their
# dependencies are resolved with modprobe.
ISCSI_MODULES="virtio_pci virtio_net virtio_rng iscsi_tcp sd_mod crc32c_generic ext4"

guest_need_tools "apt-get install -y libc-bin cpio gzip dpkg kmod e2fsprogs util-linux" \
    ldd cpio gzip dpkg-deb depmod modprobe mke2fs sha256sum flock
MKE2FS="$(command -v mke2fs)"

# The kit first: the kernel and its .deb cached in OUT.
bash "$HERE/build.sh" "$OUT"

# Apart from build.sh's lock (.lock) and build-netboot.sh's (.netboot.lock).
exec 7>"$OUT/.iscsi.lock"
flock 7

guest_kernel_deb "$OUT" || die "no kernel package"
KVER="$(cat "$OUT/kernel-version" 2>/dev/null)" || true
[ -n "$KVER" ] || die "$OUT/kernel-version missing"

# open-iscsi and the libraries of its that the host may lack, as build-netboot.sh
# takes nbd-client: from fetch-kernel.sh's cache, copied into OUT, never installed.
ISCSI_PKGS="open-iscsi libisns0 libopeniscsiusr"
# shellcheck disable=SC2086
guest_package_debs "$OUT" $ISCSI_PKGS || die "no package of $ISCSI_PKGS"
ISCSI_DEBS=("${PKG_DEBS[@]}")

# ---- up-to-date check ---------------------------------------------------
KEY="$(
    {
        cat "$HERE/build-iscsi.sh" "$HERE/lib.sh" "$HERE/init-lib.sh" "$HERE/iscsi-init.sh"
        guest_deb_ids "$DEB" "${ISCSI_DEBS[@]}"
        sha256sum <"$BUSYBOX"
        sha256sum <"$MKE2FS"
        cat /etc/mke2fs.conf 2>/dev/null || true
        echo "modules=$ISCSI_MODULES"
    } | sha256sum | cut -d' ' -f1
)"
guest_exit_if_fresh "$OUT/.iscsi-stamp" "$KEY" "$OUT/iscsi-initrd.img"
guest_workdir "$OUT/.iscsi-work"

# ---- kernel modules ------------------------------------------------------
log "extracting modules from $(basename "$DEB")"
K="$WORK/kpkg"
guest_extract_modules "$DEB" "$K" || die "cannot extract the modules from $DEB"
# shellcheck disable=SC2086
guest_modules "$K" "$KVER" $ISCSI_MODULES || die "cannot resolve the modules $ISCSI_MODULES"

# ---- initramfs tree ------------------------------------------------------
I="$WORK/initramfs"
mkdir -p "$I"/{bin,sbin,dev,proc,sys,run,mnt,etc/iscsi,lib/modules}
guest_install_busybox "$BUSYBOX" "$I"
guest_install_init "$I" "$HERE/iscsi-init.sh" init

# iscsiadm and iscsid from the .deb, libisns and libopeniscsiusr from
# theirs, the rest from the host (ldd with the extracted libraries first).
P="$WORK/pkgs"
guest_extract_debs "$P" "${ISCSI_DEBS[@]}" || die "cannot extract the packages"
for tool in iscsiadm iscsid; do
    guest_install_deb_tool "$I" "$P" "$tool" || die "cannot install $tool from ${ISCSI_DEBS[0]}"
done
# iscsid answers only root, whom it looks up by uid.
printf 'root:x:0:0:root:/:/bin/sh\n' >"$I/etc/passwd"
printf 'root:x:0:\n' >"$I/etc/group"
printf 'passwd: files\ngroup: files\nhosts: files\n' >"$I/etc/nsswitch.conf"
# mke2fs picks the file system from the name it is run by.
install -m 755 "$MKE2FS" "$I/sbin/mkfs.ext4"
guest_copy_libs "$I" "" "$(ldd "$MKE2FS")" || die "cannot copy mke2fs's libraries"
if [ -r /etc/mke2fs.conf ]; then install -m 644 /etc/mke2fs.conf "$I/etc/mke2fs.conf"; fi

guest_install_modules "$I/lib/modules" || die "cannot install the modules"
log "modules: $(tr '\n' ' ' <"$I/lib/modules/load-order")"
log "iscsiadm $(stat -c %s "$I/sbin/iscsiadm") bytes, iscsid $(stat -c %s "$I/sbin/iscsid") bytes, $GUEST_NLIBS libraries"

guest_cpio "$I" | gzip -6n >"$WORK/iscsi-initrd.img"

mv -f "$WORK/iscsi-initrd.img" "$OUT/iscsi-initrd.img"
echo "$KEY" >"$OUT/.iscsi-stamp"
log "built $OUT/iscsi-initrd.img ($(stat -c %s "$OUT/iscsi-initrd.img") bytes, $(guest_elapsed)s)"
