#!/usr/bin/env bash
# Build the bootable disk that the sanboot test (crates/vstream/tests/e2e/sanboot.rs)
# imports as a vDisk and boots by iPXE `sanboot` over iSCSI: a whole BIOS disk
# with its own boot loader, as a Windows golden image has, made without any
# loop device or mount.
#
#   tests/guest/build-sanboot.sh OUTDIR
#
# Runs tests/guest/build.sh OUTDIR first (the kernel, rootfs.img and the cached
# kernel .deb), then writes
#   OUTDIR/sanboot-initrd.img  busybox-static, the virtio_pci/virtio_net,
#                              iscsi_ibft, iscsi_tcp, sd_mod and ext4 modules
#                              with their deps (modprobe --show-depends), Debian's
#                              iscsistart (open-iscsi, from fetch-kernel.sh's cache,
#                              never installed) with its libraries, and
#                              /init = sanboot-init.sh
#   OUTDIR/sanboot-disk.img    an MBR disk: syslinux's mbr.bin in sector 0,
#     partition 1 (FAT16, active, 1 MiB..): syslinux (`syslinux --install`, which
#       writes through mtools), syslinux.cfg, vmlinuz, sanboot-initrd.img, and for
#       UEFI firmware syslinux.efi as /EFI/BOOT/BOOTX64.EFI with ldlinux.e64 and
#       the same syslinux.cfg beside it (iPXE's EFI sanboot runs that file)
#     partition 2 (ext4): rootfs.img as it is (its /sbin/init is rootfs-init.sh)
# The kernel command line is in syslinux.cfg: `vstest=write:sanboot
# vstest.readdisk` unless VSTREAM_SANBOOT_VSTEST says otherwise.
# Idempotent: does nothing when OUTDIR/.sanboot-stamp matches the inputs.
#
# Needs what build.sh needs, plus syslinux, syslinux-common, syslinux-efi,
# mtools, dosfstools and fdisk (sfdisk); .ci/install-deps installs them.
#
# Environment knobs (all optional):
#   VSTREAM_GUEST_KERNEL_DEB, VSTREAM_GUEST_KERNEL_PKG, VSTREAM_GUEST_BUSYBOX
#                             as for build.sh
#   VSTREAM_SANBOOT_VSTEST    the vstest words on the kernel command line
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/guest/lib.sh
. "$HERE/lib.sh"
guest_build_init build-sanboot.sh "$1"
VSTEST="${VSTREAM_SANBOOT_VSTEST:-vstest=write:sanboot vstest.bigmb=4 vstest.readdisk}"
# The NIC, the iBFT, the iSCSI initiator and the root disk; their
# dependencies (libiscsi_tcp, libiscsi, scsi_transport_iscsi, scsi_mod, ...)
# come from modprobe.
SANBOOT_MODULES="virtio_pci virtio_net iscsi_ibft iscsi_tcp sd_mod crc32c_generic ext4"
MBR_BIN="${VSTREAM_SANBOOT_MBR:-/usr/lib/syslinux/mbr/mbr.bin}"
EFI_BIN=/usr/lib/SYSLINUX.EFI/efi64/syslinux.efi
EFI_LDLINUX=/usr/lib/syslinux/modules/efi64/ldlinux.e64
FAT_MIB=32
# open-iscsi's iscsistart links libopeniscsiusr, which the host may lack.
ISCSI_PKGS="open-iscsi libopeniscsiusr"

guest_need_tools "apt-get install -y syslinux syslinux-common mtools dosfstools fdisk cpio kmod" \
    cpio gzip dpkg-deb depmod modprobe sha256sum flock sfdisk mkfs.vfat syslinux mcopy mmd ldd
[ -f "$MBR_BIN" ] || die "no $MBR_BIN (apt-get install -y syslinux-common)"
[ -f "$EFI_BIN" ] || die "no $EFI_BIN (apt-get install -y syslinux-efi)"
[ -f "$EFI_LDLINUX" ] || die "no $EFI_LDLINUX (apt-get install -y syslinux-common)"

# The kit first: kernel, rootfs.img, and the kernel .deb cached in OUT.
bash "$HERE/build.sh" "$OUT"

exec 7>"$OUT/.sanboot.lock"
flock 7

guest_kernel_deb "$OUT" || die "no kernel package"
KVER="$(cat "$OUT/kernel-version" 2>/dev/null)" || true
[ -n "$KVER" ] || die "$OUT/kernel-version missing"

# shellcheck disable=SC2086
guest_package_debs "$OUT" $ISCSI_PKGS || die "no package of $ISCSI_PKGS"
ISCSI_DEBS=("${PKG_DEBS[@]}")

# ---- up-to-date check ---------------------------------------------------
KEY="$(
    {
        cat "$HERE/build-sanboot.sh" "$HERE/lib.sh" "$HERE/init-lib.sh" "$HERE/sanboot-init.sh" "$OUT/.stamp"
        guest_deb_ids "$DEB" "${ISCSI_DEBS[@]}"
        sha256sum <"$BUSYBOX"
        sha256sum <"$MBR_BIN"
        sha256sum <"$EFI_BIN"
        sha256sum <"$EFI_LDLINUX"
        syslinux --version 2>&1 | head -n1
        echo "modules=$SANBOOT_MODULES vstest=$VSTEST fat=$FAT_MIB"
    } | sha256sum | cut -d' ' -f1
)"
guest_exit_if_fresh "$OUT/.sanboot-stamp" "$KEY" "$OUT/sanboot-disk.img" "$OUT/sanboot-initrd.img"
guest_workdir "$OUT/.sanboot-work"

# ---- initramfs ------------------------------------------------------------
K="$WORK/kpkg"
guest_extract_modules "$DEB" "$K" || die "cannot extract the modules from $DEB"
# shellcheck disable=SC2086
guest_modules "$K" "$KVER" $SANBOOT_MODULES || die "cannot resolve the modules $SANBOOT_MODULES"

I="$WORK/initramfs"
mkdir -p "$I"/{bin,sbin,dev,proc,sys,run,newroot,etc/iscsi,lib/modules}
guest_install_busybox "$BUSYBOX" "$I"
guest_install_init "$I" "$HERE/sanboot-init.sh" init
guest_install_modules "$I/lib/modules" || die "cannot install the modules"
log "modules: $(tr '\n' ' ' <"$I/lib/modules/load-order")"

# iscsistart from its .deb, libopeniscsiusr from its own, the other libraries
# (libcrypto, libkmod, ...) from the host, found with ldd.
N="$WORK/iscsi"
guest_extract_debs "$N" "${ISCSI_DEBS[@]}" || die "cannot extract the packages"
guest_install_deb_tool "$I" "$N" iscsistart || die "cannot install iscsistart from ${ISCSI_DEBS[0]}"
log "iscsistart $(stat -c %s "$I/sbin/iscsistart") bytes, $GUEST_NLIBS libraries"

guest_cpio "$I" | gzip -6n >"$WORK/sanboot-initrd.img"

# ---- the disk -------------------------------------------------------------
# Partition 1 at 1 MiB (sector 2048), FAT16, active; partition 2 right after
# it, the size of rootfs.img.
ROOT_BYTES="$(stat -c %s "$OUT/rootfs.img")"
[ $((ROOT_BYTES % 512)) = 0 ] || die "rootfs.img is not a whole number of sectors"
P1_START=2048
P1_SECTORS=$((FAT_MIB * 2048))
P2_START=$((P1_START + P1_SECTORS))
P2_SECTORS=$((ROOT_BYTES / 512))
DISK="$WORK/sanboot-disk.img"
truncate -s $(((P2_START + P2_SECTORS) * 512)) "$DISK"
sfdisk --quiet --no-reread --no-tell-kernel "$DISK" >/dev/null <<EOF || die "sfdisk failed"
label: dos
start=$P1_START, size=$P1_SECTORS, type=e, bootable
start=$P2_START, size=$P2_SECTORS, type=83
EOF
# mbr.bin is boot code only (440 bytes): the partition table stays.
dd if="$MBR_BIN" of="$DISK" bs=440 count=1 conv=notrunc status=none

# The FAT file system as a file of its own: -h tells its boot sector where
# it sits on the disk (syslinux's boot sector reads ldlinux.sys by it).
FAT="$WORK/fat.img"
mkfs.vfat -F 16 -h "$P1_START" -n SANBOOT -C "$FAT" $((P1_SECTORS / 2)) >/dev/null ||
    die "mkfs.vfat failed"
syslinux --install "$FAT" || die "syslinux --install failed"
cat >"$WORK/syslinux.cfg" <<EOF
SERIAL 0 115200
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND console=ttyS0 panic=-1 quiet loglevel=3 $VSTEST
EOF
export MTOOLS_SKIP_CHECK=1
mcopy -i "$FAT" "$WORK/syslinux.cfg" ::syslinux.cfg || die "mcopy syslinux.cfg failed"
mcopy -i "$FAT" "$OUT/vmlinuz" ::vmlinuz || die "mcopy vmlinuz failed"
mcopy -i "$FAT" "$WORK/sanboot-initrd.img" ::initrd.img || die "mcopy initrd.img failed"
# UEFI: the removable-media path, which iPXE's EFI sanboot (as any firmware)
# runs; syslinux.efi reads its syslinux.cfg from its own folder.
mmd -i "$FAT" ::/EFI ::/EFI/BOOT || die "mmd failed"
mcopy -i "$FAT" "$EFI_BIN" ::/EFI/BOOT/BOOTX64.EFI || die "mcopy BOOTX64.EFI failed"
mcopy -i "$FAT" "$EFI_LDLINUX" ::/EFI/BOOT/ldlinux.e64 || die "mcopy ldlinux.e64 failed"
mcopy -i "$FAT" "$WORK/syslinux.cfg" ::/EFI/BOOT/syslinux.cfg || die "mcopy syslinux.cfg failed"
dd if="$FAT" of="$DISK" bs=512 seek="$P1_START" conv=notrunc,sparse status=none
dd if="$OUT/rootfs.img" of="$DISK" bs=512 seek="$P2_START" conv=notrunc,sparse status=none

mv -f "$WORK/sanboot-initrd.img" "$OUT/sanboot-initrd.img"
mv -f "$DISK" "$OUT/sanboot-disk.img"
echo "$KEY" >"$OUT/.sanboot-stamp"
log "built $OUT/sanboot-disk.img ($(stat -c %s "$OUT/sanboot-disk.img") bytes; initrd $(stat -c %s "$OUT/sanboot-initrd.img") bytes) in $(guest_elapsed)s"
