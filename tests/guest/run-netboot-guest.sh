#!/usr/bin/env bash
# Boot the test guest diskless: its root file system comes from a vDisk
# through the `vstream target` agent inside OUTDIR/netboot-initrd.img
# (build-netboot.sh), which reaches the servers over QEMU user networking.
#
#   tests/guest/run-netboot-guest.sh OUTDIR BOOTSTRAP MAC VSTEST [TIMEOUT_S]
#
#   OUTDIR     output of tests/guest/build-netboot.sh
#   BOOTSTRAP  vstream.bootstrap for the agent, as the guest sees the servers:
#              the host's loopback is 10.0.2.2 (e.g. 10.0.2.2:7080); the
#              servers must advertise 10.0.2.2 addresses too
#              (vstream server --advertise-api http://10.0.2.2:PORT
#              --advertise-nbd 10.0.2.2:PORT)
#   MAC        the guest NIC's MAC, registered with `vstream device add`
#   VSTEST     write:TOKEN | read   (see rootfs-init.sh)
#   TIMEOUT_S  kill QEMU after this many seconds (default 180)
#
# The serial console is copied to stdout (CR stripped); a summary line
# "run-netboot-guest: ..." goes to stderr. Exit status, as run-guest.sh:
#   0  GUEST-OK seen and no GUEST-ERROR
#   1  guest reported GUEST-ERROR, or QEMU ended without GUEST-OK
#   2  usage / missing files
#   3  timeout (QEMU killed)
#
# Optional environment (as run-guest.sh):
#   QEMU, VSTREAM_GUEST_KERNEL, VSTREAM_GUEST_CPU, VSTREAM_GUEST_MACHINE,
#   VSTREAM_GUEST_MEM, VSTREAM_GUEST_QEMU_ARGS, VSTREAM_GUEST_LOG
#   VSTREAM_GUEST_APPEND   extra kernel command-line words (e.g.
#                          vstream.cache=ram:64MiB vstream.timeout=30)
#   VSTREAM_GUEST_NETDEV   -netdev value (default user,id=n0)
#   VSTREAM_GUEST_INITRD   the initrd to boot (default OUTDIR/netboot-initrd.img;
#                          e.g. a copy with credentials appended)
set -uo pipefail
# shellcheck source=tests/guest/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { echo "usage: $0 OUTDIR BOOTSTRAP MAC VSTEST [TIMEOUT_S]" >&2; exit 2; }
if [ $# -lt 4 ] || [ $# -gt 5 ]; then usage; fi
OUT="$1"
BOOTSTRAP="$2"
MAC="$3"
VSTEST="$4"
TIMEOUT="${5:-180}"
case "$TIMEOUT" in '' | *[!0-9]*) usage ;; esac
for v in "$BOOTSTRAP" "$MAC" "$VSTEST"; do
    case "$v" in '' | *[[:space:]]*) echo "run-netboot-guest: arguments must be non-empty, without spaces" >&2; exit 2 ;; esac
done
INITRD="${VSTREAM_GUEST_INITRD:-$OUT/netboot-initrd.img}"
guest_kernel_and_qemu run-netboot-guest "$OUT" "$INITRD" "run tests/guest/build-netboot.sh $OUT VSTREAM_BIN"

APPEND="console=ttyS0 rootfstype=ext4 rw panic=-1 quiet loglevel=3"
APPEND+=" mitigations=off nokaslr no_timer_check tsc=unstable"
APPEND+=" vstream.bootstrap=$BOOTSTRAP vstream.mac=$MAC vstest=$VSTEST"
[ -n "${VSTREAM_GUEST_APPEND:-}" ] && APPEND+=" $VSTREAM_GUEST_APPEND"

# shellcheck disable=SC2206
EXTRA=(${VSTREAM_GUEST_QEMU_ARGS:-})
CMD=("$QEMU" -machine "${VSTREAM_GUEST_MACHINE:-pc}" -accel tcg -cpu "${VSTREAM_GUEST_CPU:-Nehalem}" -smp 1
    -m "${VSTREAM_GUEST_MEM:-512}" -nodefaults -no-user-config -display none
    -no-reboot -serial stdio -monitor none
    -kernel "$KERNEL" -initrd "$INITRD" -append "$APPEND"
    -netdev "${VSTREAM_GUEST_NETDEV:-user,id=n0}" -device "virtio-net-pci,netdev=n0,mac=$MAC,romfile="
    "${EXTRA[@]}")

run_guest_console run-netboot-guest "$TIMEOUT" "$VSTEST" "${CMD[@]}"
