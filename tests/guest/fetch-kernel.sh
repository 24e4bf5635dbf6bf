#!/usr/bin/env bash
# The guest kit's packages: Debian's linux-image .deb, nbd-client with the libnl
# libraries it links (for the guests that mount root with vstream.client=nbd-client),
# and open-iscsi with its libisns and libopeniscsiusr libraries (for the iSCSI guests),
# downloaded once into a cache folder, so that building the kit (tests/guest/build.sh and
# build-netboot.sh, run by `cargo test`) downloads nothing.
#
#   tests/guest/fetch-kernel.sh               # download them unless cached (.ci/install-deps
#                                             # runs this); prints the kernel's path
#   tests/guest/fetch-kernel.sh --find [DIR]  # print the path of the kernel .deb to use, or
#                                             # say on stderr how to get one and exit 1
#   tests/guest/fetch-kernel.sh --find-deb PKG  # the same for PKG, one of the nbd-client
#                                             # or open-iscsi packages
#
# --find looks at VSTREAM_GUEST_KERNEL_DEB, then each DIR (a kit folder that already
# holds one), then the cache. The download uses `apt-get download` (nothing is
# installed on the host; `apt-get update` must have run).
#
# Environment knobs (all optional):
#   VSTREAM_GUEST_KERNEL_CACHE  cache folder (default
#                               ${XDG_CACHE_HOME:-$HOME/.cache}/vstream/guest-kernel)
#   VSTREAM_GUEST_KERNEL_DEB    path to a linux-image-*.deb to use instead
#   VSTREAM_GUEST_KERNEL_PKG    package to download (default: what linux-image-amd64
#                               depends on)
set -euo pipefail

die() { echo "fetch-kernel.sh: error: $*" >&2; exit 1; }

CACHE="${VSTREAM_GUEST_KERNEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vstream/guest-kernel}"
PAT="linux-image-*.deb"
[ -n "${VSTREAM_GUEST_KERNEL_PKG:-}" ] && PAT="${VSTREAM_GUEST_KERNEL_PKG}_*.deb"

# newest first, by name; the full path, or nothing
newest_in() {
    local name
    # shellcheck disable=SC2086
    name="$(cd "$1" 2>/dev/null && ls -1 $PAT 2>/dev/null | sort -V | tail -n1)" || true
    [ -z "$name" ] || echo "$(cd "$1" && pwd)/$name"
}

# The nbd-client packages, and open-iscsi (iscsiadm, iscsid and iscsistart, for the
# guests that log in to an iSCSI target themselves or take their disk from the iBFT)
# with the libraries it links that the guest kit may not find on the host, kept in
# CACHE/debs.
DEB_PKGS="nbd-client libnl-3-200 libnl-genl-3-200 open-iscsi libisns0 libopeniscsiusr"
cached_deb() {
    local name
    # shellcheck disable=SC2012
    name="$(cd "$CACHE/debs" 2>/dev/null && ls -1 "${1}"_*.deb 2>/dev/null | sort -V | tail -n1)" || true
    [ -z "$name" ] || echo "$CACHE/debs/$name"
}
if [ "${1:-}" = --find-deb ]; then
    [ $# -eq 2 ] || { echo "usage: $0 --find-deb PKG" >&2; exit 2; }
    deb="$(cached_deb "$2")"
    [ -n "$deb" ] || die "no $2 package in $CACHE/debs: run tests/guest/fetch-kernel.sh" \
        "(.ci/install-deps does)"
    echo "$deb"
    exit 0
fi

if [ "${1:-}" = --find ]; then
    shift
    if [ -n "${VSTREAM_GUEST_KERNEL_DEB:-}" ]; then
        [ -f "$VSTREAM_GUEST_KERNEL_DEB" ] ||
            die "VSTREAM_GUEST_KERNEL_DEB=$VSTREAM_GUEST_KERNEL_DEB does not exist"
        echo "$VSTREAM_GUEST_KERNEL_DEB"
        exit 0
    fi
    for dir in "$@" "$CACHE"; do
        deb="$(newest_in "$dir")"
        if [ -n "$deb" ]; then
            echo "$deb"
            exit 0
        fi
    done
    die "no guest kernel package ($PAT) in $CACHE: run tests/guest/fetch-kernel.sh" \
        "(.ci/install-deps does) or set VSTREAM_GUEST_KERNEL_DEB"
fi
[ $# -eq 0 ] || { echo "usage: $0 [--find [DIR...]]" >&2; exit 2; }

mkdir -p "$CACHE"
deb="$(newest_in "$CACHE")"
if [ -z "$deb" ]; then
    pkg="${VSTREAM_GUEST_KERNEL_PKG:-}"
    if [ -z "$pkg" ]; then
        pkg="$(apt-cache depends linux-image-amd64 2>/dev/null |
            awk '$1=="Depends:" && $2 ~ /^linux-image-/ && !n++ {print $2}')"
        [ -n "$pkg" ] || die "cannot resolve linux-image-amd64 (run 'apt-get update' first)"
    fi
    echo "fetch-kernel.sh: downloading $pkg into $CACHE (apt-get download; not installed)" >&2
    (cd "$CACHE" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2) ||
        die "apt-get download $pkg failed"
    deb="$(newest_in "$CACHE")"
    [ -n "$deb" ] || die "the download of $pkg left no $PAT in $CACHE"
fi
mkdir -p "$CACHE/debs"
for p in $DEB_PKGS; do
    [ -z "$(cached_deb "$p")" ] || continue
    echo "fetch-kernel.sh: downloading $p into $CACHE/debs (apt-get download; not installed)" >&2
    (cd "$CACHE/debs" && apt-get download -q -o APT::Sandbox::User=root "$p" >&2) ||
        die "apt-get download $p failed"
done
echo "$deb"
