#!/usr/bin/env bash
# Network boot: seconds from QEMU's start to the root filesystem mounted, for 1 VM and for
# VSTREAM_BENCH_VMS (default 10) VMs booting at once against two servers; and the TFTP rate
# of the iPXE binaries, vstream's TFTP beside dnsmasq's in the same run.
#
#   bash bench/netboot.sh           # as root; about 5 minutes on 2 cores after the release build;
#                                   # root (network namespaces, taps); the packages of
#                                   # .ci/install-deps (qemu-system-x86, ovmf, ipxe,
#                                   # dnsmasq-base, etcd-server)
#
# The setup is the CI test's (crates/vstream/tests/e2e/netboot.rs), on a release build: a LAN
# bridge in a network namespace with dnsmasq giving addresses only, two servers (etcd farm)
# each in a namespace of its own with --proxy-dhcp and --tftp, one vDisk (the guest kit's
# 64 MiB ext4 root, Standard mode, device-side cache) whose boot files are the kit's Debian
# kernel and the network-boot initramfs (tests/guest/build-netboot.sh: the release
# `vstream target` in it). Each VM: QEMU TCG, UEFI (OVMF) with the NIC's option ROM removed,
# so the firmware's own PXE gets snponly.efi over TFTP, then iPXE fetches /boot/ipxe, the
# kernel and the initrd over HTTP; the initramfs attaches /dev/nbd0 through the agent and
# mounts root. "Root mounted" is the console line GUEST-BOOTED from the root's /sbin/init.
# The TFTP rate is the median of 20 `curl tftp://` downloads from the host, per file and
# block size.
set -euo pipefail
cd "$(dirname "$0")/.."
export VSTREAM_BENCH_VMS="${VSTREAM_BENCH_VMS:-10}"
# The run's whole output goes to a log; its result lines are shown. A failed run (or one
# that skipped, and so measured nothing) fails the script with the end of that log.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --release -q -p vstream --test e2e -- --ignored --nocapture netboot::bench_network_boot \
    >"$log" 2>&1 || status=$?
grep -E '^BENCH|panicked|FAILED|SKIP' "$log" || echo "netboot.sh: no result line in the output" >&2
if [ "$status" -ne 0 ] || ! grep -q '^BENCH' "$log"; then
    echo "netboot.sh: the benchmark failed (cargo test exit status $status, $(grep -c '^BENCH' "$log") BENCH lines); the end of its output:" >&2
    tail -n 40 "$log" >&2
    exit "$(( status == 0 ? 1 : status ))"
fi
