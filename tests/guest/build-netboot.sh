#!/usr/bin/env bash
# Build the initramfs with which the test guest boots its root file system
# from a vDisk through the `vstream target` agent, without any disk of its own.
#
#   tests/guest/build-netboot.sh OUTDIR VSTREAM_BIN
#
# Runs tests/guest/build.sh OUTDIR first (the kernel, rootfs.img and the
# cached kernel .deb), then writes OUTDIR/netboot-initrd.img:
#   busybox-static, the virtio_pci/virtio_net/nbd/ext4 (+virtio_blk, for a
#   local cache disk) modules and their deps from the same kernel .deb,
#   VSTREAM_BIN with its debug info stripped + its shared libraries and the
#   dynamic loader (from ldd), Debian's nbd-client (for
#   vstream.client=nbd-client: with its libnl libraries, from fetch-kernel.sh's
#   cache, copied into OUTDIR, never installed; its other libraries from the host,
#   found with ldd), dist/vstream-root.sh as /scripts/vstream-root.sh
#   and /init = netboot-init.sh; also /power-init = power-init.sh, which
#   runs `vstream server` on the guest's own virtio disk instead (booted with
#   rdinit=/power-init by crates/vstream/tests/e2e/power_loss.rs), and
#   /nbd-client-init = nbd-client-init.sh, which attaches /dev/nbd0 with
#   nbd-client over TLS (rdinit=/nbd-client-init, guest_boot.rs).
# Idempotent: does nothing when OUTDIR/.netboot-stamp matches the inputs (the
# binary's hash included). Boot it with run-netboot-guest.sh.
#
# Needs what build.sh needs, plus binutils (objcopy), ldd and the host's
# libgnutls30 (which nbd-client links; qemu-system-x86 pulls it in).
#
# Environment knobs (all optional):
#   VSTREAM_GUEST_KERNEL_DEB, VSTREAM_GUEST_KERNEL_PKG, VSTREAM_GUEST_BUSYBOX
#                            as for build.sh
#   VSTREAM_NETBOOT_COMPRESS gzip (default) or none: an uncompressed cpio
#                            is bigger but skips in-guest decompression
set -euo pipefail

[ $# -eq 2 ] || { echo "usage: $0 OUTDIR VSTREAM_BIN" >&2; exit 2; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/guest/lib.sh
. "$HERE/lib.sh"
REPO="$(cd "$HERE/../.." && pwd)"
ROOT_SH="$REPO/dist/vstream-root.sh"
guest_build_init build-netboot.sh "$1"
[ -f "$2" ] || die "no vstream binary at $2 (cargo build -p vstream)"
VSTREAM="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"
COMPRESS="${VSTREAM_NETBOOT_COMPRESS:-gzip}"
case "$COMPRESS" in gzip | none) ;; *) die "VSTREAM_NETBOOT_COMPRESS must be gzip or none" ;; esac
# Network + root-disk modules; their dependencies are resolved with modprobe.
NETBOOT_MODULES="virtio_pci virtio_net nbd crc32c_generic ext4 virtio_blk"

guest_need_tools "apt-get install -y binutils libc-bin cpio gzip dpkg kmod util-linux" \
    objcopy ldd cpio gzip dpkg-deb depmod modprobe sha256sum flock
[ -f "$ROOT_SH" ] || die "missing $ROOT_SH"

# The kit first: kernel, rootfs.img, and the kernel .deb cached in OUT.
bash "$HERE/build.sh" "$OUT"

# Serialize concurrent builds into the same OUTDIR (build.sh's own lock is
# .lock; this one is separate so that calling build.sh above cannot deadlock).
exec 8>"$OUT/.netboot.lock"
flock 8

guest_kernel_deb "$OUT" || die "no kernel package"
[ "$(cat "$OUT/kernel-version" 2>/dev/null)" != "" ] || die "$OUT/kernel-version missing"

# nbd-client and the libnl libraries it links, which the host may lack: from
# fetch-kernel.sh's cache (.ci/install-deps fills it; `cargo test` downloads nothing),
# copied into OUT; never installed.
NBDC_PKGS="nbd-client libnl-3-200 libnl-genl-3-200"
# shellcheck disable=SC2086
guest_package_debs "$OUT" $NBDC_PKGS || die "no package of $NBDC_PKGS"
NBDC_DEBS=("${PKG_DEBS[@]}")

# ---- up-to-date check ---------------------------------------------------
LIBS="$(ldd "$VSTREAM" 2>/dev/null || true)"
KEY="$(
    {
        cat "$HERE/build-netboot.sh" "$HERE/lib.sh" "$HERE/init-lib.sh" "$HERE/netboot-init.sh" "$HERE/power-init.sh" \
            "$HERE/nbd-client-init.sh" "$ROOT_SH"
        guest_deb_ids "$DEB" "${NBDC_DEBS[@]}"
        sha256sum <"$BUSYBOX"
        sha256sum <"$VSTREAM"
        echo "$LIBS" | sed 's/ (0x[0-9a-f]*)$//'
        echo "modules=$NETBOOT_MODULES compress=$COMPRESS"
    } | sha256sum | cut -d' ' -f1
)"
guest_exit_if_fresh "$OUT/.netboot-stamp" "$KEY" "$OUT/netboot-initrd.img"
guest_workdir "$OUT/.netboot-work"

# ---- kernel modules ------------------------------------------------------
log "extracting modules from $(basename "$DEB")"
K="$WORK/kpkg"
guest_extract_modules "$DEB" "$K" || die "cannot extract the modules from $DEB"
KVER="$(cat "$OUT/kernel-version")"
# shellcheck disable=SC2086
guest_modules "$K" "$KVER" $NETBOOT_MODULES || die "cannot resolve the modules $NETBOOT_MODULES"

# ---- initramfs tree ------------------------------------------------------
I="$WORK/initramfs"
mkdir -p "$I"/{bin,sbin,dev,proc,sys,run,newroot,etc,scripts,lib/modules}
guest_install_busybox "$BUSYBOX" "$I"
guest_install_init "$I" "$HERE/netboot-init.sh" init
guest_install_init "$I" "$HERE/power-init.sh" power-init
guest_install_init "$I" "$HERE/nbd-client-init.sh" nbd-client-init
install -m 644 "$ROOT_SH" "$I/scripts/vstream-root.sh"

# The agent: symbols kept (readable backtraces), debug info dropped.
objcopy --strip-debug "$VSTREAM" "$I/bin/vstream"
chmod 755 "$I/bin/vstream"
# The agent's shared libraries and the dynamic loader.
guest_copy_libs "$I" "" "$LIBS" || die "cannot copy the agent's libraries"

# nbd-client from its .deb, its libnl libraries from theirs, the rest from
# the host (ldd with the extracted libraries first on the search path).
N="$WORK/nbdc"
guest_extract_debs "$N" "${NBDC_DEBS[@]}" || die "cannot extract the packages"
guest_install_deb_tool "$I" "$N" nbd-client || die "cannot install nbd-client from ${NBDC_DEBS[0]}"
# Name resolution for host names in vstream.bootstrap (glibc has files/dns built in).
printf 'hosts: files dns\n' >"$I/etc/nsswitch.conf"
printf '127.0.0.1 localhost\n' >"$I/etc/hosts"

guest_install_modules "$I/lib/modules" || die "cannot install the modules"
log "modules: $(tr '\n' ' ' <"$I/lib/modules/load-order")"
log "agent: $(stat -c %s "$I/bin/vstream") bytes, nbd-client $(stat -c %s "$I/sbin/nbd-client") bytes, $GUEST_NLIBS libraries"

guest_cpio "$I" >"$WORK/netboot-initrd.cpio"
if [ "$COMPRESS" = gzip ]; then
    gzip -6n <"$WORK/netboot-initrd.cpio" >"$WORK/netboot-initrd.img"
else
    mv "$WORK/netboot-initrd.cpio" "$WORK/netboot-initrd.img"
fi

mv -f "$WORK/netboot-initrd.img" "$OUT/netboot-initrd.img"
echo "$KEY" >"$OUT/.netboot-stamp"
log "built $OUT/netboot-initrd.img ($(stat -c %s "$OUT/netboot-initrd.img") bytes, $(guest_elapsed)s)"
