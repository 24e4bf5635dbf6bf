#!/usr/bin/env bash
# Boot the test guest with its root filesystem on a (NBD or iSCSI) drive.
#
#   tests/guest/run-guest.sh OUTDIR DRIVE_URL VSTEST [TIMEOUT_S]
#
#   OUTDIR     output of tests/guest/build.sh (vmlinux or vmlinuz, initrd.img)
#   DRIVE_URL  nbd://HOST:PORT/EXPORT, nbd+unix:///EXPORT?socket=PATH,
#              iscsi://[USER@]HOST[:PORT]/TARGET/LUN (QEMU's libiscsi driver,
#              package qemu-block-extra; USER is the CHAP user, whose secret
#              comes from VSTREAM_GUEST_ISCSI_SECRET_FILE, never the URL), or
#              any other QEMU drive file name (e.g. a local raw image, for
#              debugging)
#   VSTEST     write:TOKEN | read   (see rootfs-init.sh)
#   TIMEOUT_S  kill QEMU after this many seconds (default 120)
#
# The serial console is copied to stdout (CR stripped); a summary line
# "run-guest: ..." goes to stderr. Exit status:
#   0  GUEST-OK seen and no GUEST-ERROR
#   1  guest reported GUEST-ERROR, or QEMU ended without GUEST-OK
#   2  usage / missing files
#   3  timeout (QEMU killed)
#
# Optional environment:
#   QEMU                   qemu binary (default qemu-system-x86_64)
#   VSTREAM_GUEST_KERNEL   kernel file (default OUTDIR/vmlinux if present, i.e.
#                          PVH boot without decompression, else OUTDIR/vmlinuz)
#   VSTREAM_GUEST_CPU      -cpu value (default Nehalem: has SSE4.2, boots
#                          faster under TCG than "max")
#   VSTREAM_GUEST_MACHINE  -machine value (default pc)
#   VSTREAM_GUEST_MEM      memory in MiB (default 512)
#   VSTREAM_GUEST_APPEND   extra kernel command-line words
#   VSTREAM_GUEST_QEMU_ARGS extra QEMU arguments (word-split)
#   VSTREAM_GUEST_LOG      also write the console to this file
#   VSTREAM_GUEST_TLS_CREDS  NBD over TLS: QEMU's client credentials folder
#                          (ca-cert.pem, client-cert.pem, client-key.pem, as
#                          `vstream device credential NAME --out DIR` writes
#                          them), given to the NBD drive as a tls-creds-x509
#                          object; DRIVE_URL must then be an nbd:// URL
#   VSTREAM_GUEST_TLS_HOSTNAME  the name to check the server's certificate
#                          against (default: the host of DRIVE_URL)
#   VSTREAM_GUEST_ISCSI_SECRET_FILE  iscsi:// with a USER: the file holding
#                          that user's CHAP secret, given to QEMU as a secret
#                          object read from the file (so the secret is on no
#                          command line)
#   VSTREAM_GUEST_ISCSI_INITIATOR  iscsi://: the initiator name QEMU logs in
#                          with (default QEMU's own, iqn.2008-11.org.linux-kvm)
set -uo pipefail
# shellcheck source=tests/guest/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { echo "usage: $0 OUTDIR DRIVE_URL VSTEST [TIMEOUT_S]" >&2; exit 2; }
[ $# -ge 3 ] && [ $# -le 4 ] || usage
OUT="$1"
URL="$2"
VSTEST="$3"
TIMEOUT="${4:-120}"
case "$TIMEOUT" in '' | *[!0-9]*) usage ;; esac
case "$VSTEST" in *[[:space:]]*) echo "run-guest: VSTEST must not contain spaces" >&2; exit 2 ;; esac
guest_kernel_and_qemu run-guest "$OUT" "$OUT/initrd.img" "run tests/guest/build.sh $OUT"

APPEND="console=ttyS0 root=/dev/vda rootfstype=ext4 rw panic=-1 quiet loglevel=3"
APPEND+=" mitigations=off nokaslr no_timer_check tsc=unstable vstest=$VSTEST"
[ -n "${VSTREAM_GUEST_APPEND:-}" ] && APPEND+=" $VSTREAM_GUEST_APPEND"

# Commas separate -drive options: double them inside the file name.
DRIVE="file=${URL//,/,,},format=raw,if=virtio,cache=none"
TLS=()
if [ -n "${VSTREAM_GUEST_TLS_CREDS:-}" ]; then
    case "$URL" in nbd://* | nbd+tcp://*) ;; *) echo "run-guest: VSTREAM_GUEST_TLS_CREDS needs an nbd:// DRIVE_URL" >&2; exit 2 ;; esac
    for f in ca-cert.pem client-cert.pem client-key.pem; do
        [ -r "$VSTREAM_GUEST_TLS_CREDS/$f" ] || { echo "run-guest: $VSTREAM_GUEST_TLS_CREDS/$f missing" >&2; exit 2; }
    done
    TLS=(-object "tls-creds-x509,id=tls0,endpoint=client,dir=${VSTREAM_GUEST_TLS_CREDS//,/,,}")
    DRIVE+=",file.tls-creds=tls0"
    [ -n "${VSTREAM_GUEST_TLS_HOSTNAME:-}" ] && DRIVE+=",file.tls-hostname=${VSTREAM_GUEST_TLS_HOSTNAME//,/,,}"
fi

# iSCSI: QEMU's URL form would take the secret in the URL only, so the drive
# is given as options, with the secret in a secret object read from a file.
SECRET=()
case "$URL" in
    iscsi://*)
        rest="${URL#iscsi://}"
        authority="${rest%%/*}"
        path="${rest#*/}"
        [ "$path" != "$rest" ] && [ "${path%/*}" != "$path" ] ||
            { echo "run-guest: $URL is not iscsi://[USER@]HOST[:PORT]/TARGET/LUN" >&2; exit 2; }
        target="${path%/*}"
        lun="${path##*/}"
        case "$lun" in '' | *[!0-9]*) echo "run-guest: the LUN in $URL is not a number" >&2; exit 2 ;; esac
        user=
        case "$authority" in
            *%*@*) echo "run-guest: no secret in the URL: use VSTREAM_GUEST_ISCSI_SECRET_FILE" >&2; exit 2 ;;
            *@*) user="${authority%%@*}"; authority="${authority#*@}" ;;
        esac
        case "$authority" in *:*) portal="$authority" ;; *) portal="$authority:3260" ;; esac
        for v in "$target" "$portal" "$user" "${VSTREAM_GUEST_ISCSI_INITIATOR:-}"; do
            case "$v" in *,*) echo "run-guest: commas in $URL or the initiator name" >&2; exit 2 ;; esac
        done
        DRIVE="format=raw,if=virtio,cache=none,file.driver=iscsi,file.transport=tcp"
        DRIVE+=",file.portal=$portal,file.target=$target,file.lun=$lun"
        if [ -n "$user" ]; then
            f="${VSTREAM_GUEST_ISCSI_SECRET_FILE:-}"
            [ -n "$f" ] && [ -r "$f" ] ||
                { echo "run-guest: $URL names a CHAP user: set VSTREAM_GUEST_ISCSI_SECRET_FILE to a file with the secret" >&2; exit 2; }
            SECRET=(-object "secret,id=iscsisec0,format=raw,file=${f//,/,,}")
            DRIVE+=",file.user=$user,file.password-secret=iscsisec0"
        fi
        [ -n "${VSTREAM_GUEST_ISCSI_INITIATOR:-}" ] && DRIVE+=",file.initiator-name=$VSTREAM_GUEST_ISCSI_INITIATOR"
        ;;
esac

# shellcheck disable=SC2206
EXTRA=(${VSTREAM_GUEST_QEMU_ARGS:-})
CMD=("$QEMU" -machine "${VSTREAM_GUEST_MACHINE:-pc}" -accel tcg -cpu "${VSTREAM_GUEST_CPU:-Nehalem}" -smp 1
    -m "${VSTREAM_GUEST_MEM:-512}" -nodefaults -no-user-config -display none
    -no-reboot -serial stdio -monitor none
    -kernel "$KERNEL" -initrd "$OUT/initrd.img" -append "$APPEND"
    "${TLS[@]}" "${SECRET[@]}" -drive "$DRIVE" "${EXTRA[@]}")

run_guest_console run-guest "$TIMEOUT" "$VSTEST" "${CMD[@]}"
