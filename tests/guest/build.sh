#!/usr/bin/env bash
# Build the guest kit used by the end-to-end NBD boot tests.
#
#   tests/guest/build.sh OUTDIR
#
# Produces OUTDIR/vmlinuz (+ OUTDIR/vmlinux, the same kernel uncompressed for
# fast PVH boot, when it can be extracted), OUTDIR/initrd.img (busybox + virtio/ext4 modules)
# and OUTDIR/rootfs.img (raw ext4 with busybox and the test /sbin/init).
# Idempotent: does nothing when OUTDIR/.stamp matches the inputs. It downloads
# nothing: the Debian kernel .deb comes from fetch-kernel.sh's cache (filled by
# `tests/guest/fetch-kernel.sh`, which .ci/install-deps runs) and is linked into
# OUTDIR, where it stays.
#
# Needs: busybox-static, e2fsprogs (mkfs.ext4 -d), cpio, gzip, kmod (depmod,
# modprobe), dpkg, xz-utils / zstd only if the kernel ships compressed modules.
#
# Environment knobs (all optional):
#   VSTREAM_GUEST_KERNEL_DEB    path to a linux-image-*.deb to use instead
#   VSTREAM_GUEST_KERNEL_PKG    the kernel package (default: what
#                               linux-image-amd64 depends on)
#   VSTREAM_GUEST_KERNEL_CACHE  fetch-kernel.sh's cache folder
#   VSTREAM_GUEST_BUSYBOX     static busybox binary (default /bin/busybox)
#   VSTREAM_GUEST_ROOTFS_MB   rootfs image size in MiB (default 64)
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/guest/lib.sh
. "$HERE/lib.sh"
guest_build_init build.sh "$1"
ROOTFS_MB="${VSTREAM_GUEST_ROOTFS_MB:-64}"
# Root-disk modules; their dependencies are resolved with modprobe.
GUEST_MODULES="virtio_pci virtio_blk crc32c_generic ext4"

guest_need_tools "apt-get install -y e2fsprogs cpio gzip dpkg kmod util-linux" \
    mkfs.ext4 cpio gzip dpkg-deb depmod modprobe sha256sum flock
[ -x "$BUSYBOX" ] || die "no busybox at $BUSYBOX (apt-get install -y busybox-static)"
if ldd "$BUSYBOX" >/dev/null 2>&1; then
    die "$BUSYBOX is dynamically linked; install busybox-static"
fi

# Serialize concurrent builds into the same OUTDIR.
exec 9>"$OUT/.lock"
flock 9

# ---- kernel package (cached in OUT) -------------------------------------
# The one VSTREAM_GUEST_KERNEL_DEB names, else the newest in OUT, else the
# one fetch-kernel.sh cached, linked (or copied) into OUT first.
if [ -z "${VSTREAM_GUEST_KERNEL_DEB:-}" ] && ! guest_kernel_deb "$OUT" 2>/dev/null; then
    src="$(bash "$HERE/fetch-kernel.sh" --find)" || exit 1
    ln -f "$src" "$OUT/" 2>/dev/null || cp "$src" "$OUT/"
fi
guest_kernel_deb "$OUT" || die "no kernel package"

# ---- up-to-date check --------------------------------------------------
KEY="$(
    {
        cat "$HERE/build.sh" "$HERE/lib.sh" "$HERE/init-lib.sh" "$HERE/initramfs-init.sh" "$HERE/rootfs-init.sh"
        guest_deb_ids "$DEB"
        sha256sum <"$BUSYBOX"
        echo "rootfs_mb=$ROOTFS_MB modules=$GUEST_MODULES"
    } | sha256sum | cut -d' ' -f1
)"
guest_exit_if_fresh "$OUT/.stamp" "$KEY" "$OUT/vmlinuz" "$OUT/initrd.img" "$OUT/rootfs.img"
guest_workdir "$OUT/.work"

# ---- extract kernel + modules ------------------------------------------
log "extracting $(basename "$DEB")"
K="$WORK/kpkg"
mkdir -p "$K"
dpkg-deb -x "$DEB" "$K"
VMLINUZ="$(ls -1 "$K"/boot/vmlinuz-* 2>/dev/null | head -n1)"
[ -n "$VMLINUZ" ] || die "no /boot/vmlinuz-* in $DEB"
KVER="${VMLINUZ##*/vmlinuz-}"
# shellcheck disable=SC2086
guest_modules "$K" "$KVER" $GUEST_MODULES || die "cannot resolve the modules $GUEST_MODULES"

# ---- initramfs --------------------------------------------------------
I="$WORK/initramfs"
mkdir -p "$I"/{dev,proc,sys,newroot,lib/modules}
guest_install_busybox "$BUSYBOX" "$I"
guest_install_init "$I" "$HERE/initramfs-init.sh" init
guest_install_modules "$I/lib/modules" || die "cannot install the modules"
log "initramfs modules: $(tr '\n' ' ' <"$I/lib/modules/load-order")"
guest_cpio "$I" | gzip -9n >"$WORK/initrd.img"

# ---- root filesystem ----------------------------------------------------
R="$WORK/rootfs"
mkdir -p "$R"/{sbin,dev,proc,sys,tmp,data,etc,root,mnt}
guest_install_busybox "$BUSYBOX" "$R"
install -m 755 "$HERE/rootfs-init.sh" "$R/sbin/init"
echo "vstest" >"$R/etc/hostname"
echo "$KVER" >"$R/etc/vstest-kernel"
truncate -s "${ROOTFS_MB}M" "$WORK/rootfs.img"
mkfs.ext4 -F -q -L vstest-root -E root_owner=0:0 -d "$R" "$WORK/rootfs.img" >&2

# ---- uncompressed kernel for PVH boot ------------------------------------
# Under TCG the bzImage's own xz decompressor costs ~3 s of every boot. QEMU
# boots an uncompressed ELF vmlinux directly via its PVH entry point
# (CONFIG_PVH=y), skipping firmware real-mode setup and decompression.
# Best effort: if anything does not fit, only vmlinuz is published.
u32() { od -An -tu4 -j "$2" -N4 "$1" | tr -d ' '; }
extract_vmlinux() { # BZIMAGE OUT
    local bz="$1" out="$2" ss poff plen start magic usize dec len
    [ "$(od -An -c -j $((0x202)) -N4 "$bz" | tr -d ' ')" = HdrS ] || return 1
    ss="$(od -An -tu1 -j $((0x1f1)) -N1 "$bz" | tr -d ' ')"
    [ "$ss" = 0 ] && ss=4
    poff="$(u32 "$bz" $((0x248)))"
    plen="$(u32 "$bz" $((0x24c)))"
    start=$(((ss + 1) * 512 + poff))
    magic="$(od -An -tx1 -j "$start" -N6 "$bz" | tr -d ' \n')"
    usize="$(u32 "$bz" $((start + plen - 4)))" # the kernel appends le32 size
    len=$((plen - 4))
    case "$magic" in
        fd377a585a00) dec="xz -dc" ;;
        28b52ffd*) dec="zstd -q -dc" ;;
        1f8b*) dec="gzip -dc"; len=$plen ;; # size is gzip's own trailer
        *) return 1 ;;
    esac
    command -v "${dec%% *}" >/dev/null || return 1
    head -c $((start + len)) "$bz" | tail -c "$len" | $dec >"$out" 2>/dev/null || return 1
    [ "$(stat -c %s "$out")" = "$usize" ] || return 1
    [ "$(od -An -tx1 -N4 "$out" | tr -d ' \n')" = 7f454c46 ] || return 1
}
HAVE_VMLINUX=0
if grep -qx 'CONFIG_PVH=y' "$K/boot/config-$KVER" 2>/dev/null &&
    extract_vmlinux "$VMLINUZ" "$WORK/vmlinux"; then
    HAVE_VMLINUX=1
else
    log "note: no PVH vmlinux extracted; guests boot the (slower) bzImage"
    rm -f "$WORK/vmlinux"
fi

# ---- publish -----------------------------------------------------------
cp "$VMLINUZ" "$WORK/vmlinuz"
rm -f "$OUT/vmlinux"
for f in vmlinuz initrd.img rootfs.img; do mv -f "$WORK/$f" "$OUT/$f"; done
[ "$HAVE_VMLINUX" = 0 ] || mv -f "$WORK/vmlinux" "$OUT/vmlinux"
echo "$KVER" >"$OUT/kernel-version"
echo "$KEY" >"$OUT/.stamp"
log "built kernel $KVER in $OUT ($(guest_elapsed)s):"
ls -l "$OUT"/vmlinu[xz] "$OUT/initrd.img" "$OUT/rootfs.img" >&2
