# shellcheck shell=bash
# Shared by the guest kit's host-side scripts (sourced, bash): build.sh,
# build-netboot.sh, build-iscsi.sh and build-sanboot.sh set themselves up,
# resolve kernel modules, unpack .debs and fill and pack initramfs trees with
# it; run-guest.sh and run-netboot-guest.sh run QEMU with it. (init-lib.sh is
# the guest-side library the init scripts source.)

# guest_build_init NAME OUTDIR: what each build script does first: die and
# log functions whose lines name NAME, OUT = OUTDIR (made, absolute),
# BUSYBOX ($VSTREAM_GUEST_BUSYBOX, else /bin/busybox), START (for
# guest_elapsed), and /sbin:/usr/sbin on PATH (depmod, mkfs.* ...).
guest_build_init() {
    GUEST_BUILD_NAME="$1"
    die() { echo "$GUEST_BUILD_NAME: error: $*" >&2; exit 1; }
    log() { echo "$GUEST_BUILD_NAME: $*" >&2; }
    mkdir -p "$2"
    OUT="$(cd "$2" && pwd)"
    BUSYBOX="${VSTREAM_GUEST_BUSYBOX:-/bin/busybox}"
    START=$(date +%s.%N)
    export PATH="$PATH:/sbin:/usr/sbin"
}

# guest_elapsed: the seconds since guest_build_init, as 1.2.
guest_elapsed() {
    awk -v s="$START" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}'
}

# guest_need_tools HINT TOOL...: dies naming the first TOOL missing, and
# HINT (what to install).
guest_need_tools() {
    local hint="$1" c
    shift
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 || die "missing tool '$c' ($hint)"
    done
}

# guest_deb_ids DEB...: a line per DEB (name and size) for a stamp's key.
guest_deb_ids() {
    local d
    for d in "$@"; do echo "deb=$(basename "$d") size=$(stat -c %s "$d")"; done
}

# guest_exit_if_fresh STAMP KEY FILE...: exits 0 (the script is done) when
# STAMP holds KEY and each FILE is there, not empty; else removes STAMP.
guest_exit_if_fresh() {
    local stamp="$1" key="$2" f
    shift 2
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
        for f in "$@"; do [ -s "$f" ] || break; done
        if [ -s "$f" ]; then
            log "up to date in $OUT"
            exit 0
        fi
    fi
    rm -f "$stamp"
}

# guest_workdir DIR: WORK = DIR, emptied, removed when the script exits.
guest_workdir() {
    WORK="$1"
    rm -rf "$WORK"
    mkdir -p "$WORK"
    trap 'rm -rf "$WORK"' EXIT
}

# guest_extract_modules DEB DIR: only the kernel package's modules
# (./lib/modules or ./usr/lib/modules), not the kernel, into DIR.
guest_extract_modules() {
    mkdir -p "$2"
    dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2" --wildcards './*lib/modules/*'
}

# guest_extract_debs DIR DEB...: the DEBs unpacked into DIR; sets
# GUEST_DEB_LIBPATH to the folders of their shared libraries (for ldd).
guest_extract_debs() {
    local dir="$1" d
    shift
    mkdir -p "$dir"
    for d in "$@"; do
        dpkg-deb -x "$d" "$dir" || { echo "cannot extract $d" >&2; return 1; }
    done
    GUEST_DEB_LIBPATH="$(find "$dir" -name 'lib*.so*' -printf '%h\n' | sort -u | paste -sd:)"
}

# guest_install_deb_tool DEST PKGDIR TOOL: the program TOOL of the packages
# guest_extract_debs unpacked into PKGDIR as DEST/sbin/TOOL, with the
# libraries it links: those of the packages first, the rest the host's.
guest_install_deb_tool() {
    local dest="$1" pkgs="$2" tool="$3" bin libs
    bin="$(find "$pkgs" -type f -name "$tool" -path '*bin/*' | head -n1)"
    [ -n "$bin" ] || { echo "no $tool in the packages" >&2; return 1; }
    libs="$(LD_LIBRARY_PATH="$GUEST_DEB_LIBPATH" ldd "$bin")" || { echo "ldd $bin failed" >&2; return 1; }
    mkdir -p "$dest/sbin"
    install -m 755 "$bin" "$dest/sbin/$tool"
    guest_copy_libs "$dest" "$pkgs" "$libs" || { echo "cannot copy $tool's libraries" >&2; return 1; }
}

# guest_cpio DIR: the tree DIR as a reproducible newc cpio archive on stdout
# (times zeroed, names sorted, owned by root), uncompressed.
guest_cpio() {
    find "$1" -exec touch -h -d @0 {} +
    (cd "$1" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
        cpio --quiet --null -o -H newc --owner=0:0 --reproducible)
}

# guest_modules KROOT KVER MODULE...: makes KROOT (an extracted kernel
# package) usable by modprobe, then sets MODLIST to the .ko files MODULE...
# need, dependencies first, each once ("builtin" ones need none).
guest_modules() {
    local k="$1" kver="$2" m deps verb path seen p
    shift 2
    if [ ! -d "$k/lib/modules/$kver" ] && [ -d "$k/usr/lib/modules/$kver" ]; then
        mkdir -p "$k/lib/modules"
        ln -s "../../usr/lib/modules/$kver" "$k/lib/modules/$kver"
    fi
    [ -d "$k/lib/modules/$kver" ] || { echo "no modules for $kver under $k" >&2; return 1; }
    depmod -b "$k" "$kver"
    MODLIST=()
    for m in "$@"; do
        deps="$(modprobe -d "$k" -S "$kver" --show-depends "$m")" ||
            { echo "modprobe cannot resolve $m" >&2; return 1; }
        while read -r verb path _; do
            [ "$verb" = insmod ] || continue
            seen=0
            for p in "${MODLIST[@]:-}"; do [ "$p" = "$path" ] && seen=1; done
            [ $seen = 1 ] || MODLIST+=("$path")
        done <<<"$deps"
    done
}

# guest_install_modules DIR: puts the MODLIST modules, decompressed, in DIR
# and their names, in load order, in DIR/load-order.
guest_install_modules() {
    local dir="$1" path base
    : >"$dir/load-order"
    for path in "${MODLIST[@]:-}"; do
        [ -n "$path" ] || continue
        base="$(basename "$path")"
        case "$base" in
            *.ko.xz) xz -dc "$path" >"$dir/${base%.xz}"; base="${base%.xz}" ;;
            *.ko.zst) zstd -q -dc "$path" >"$dir/${base%.zst}"; base="${base%.zst}" ;;
            *.ko.gz) gzip -dc "$path" >"$dir/${base%.gz}"; base="${base%.gz}" ;;
            *.ko) cp "$path" "$dir/$base" ;;
            *) echo "unexpected module file $path" >&2; return 1 ;;
        esac
        echo "$base" >>"$dir/load-order"
    done
}

# guest_install_busybox BUSYBOX DIR: DIR/bin/busybox (a copy of the static
# BUSYBOX) and a symlink to it per applet, but init and linuxrc (the /init
# scripts are ours).
guest_install_busybox() {
    local bb="$1" d="$2" a
    mkdir -p "$d/bin"
    cp "$bb" "$d/bin/busybox"
    chmod 755 "$d/bin/busybox"
    for a in $("$bb" --list); do
        [ "$a" = busybox ] || [ "$a" = init ] || [ "$a" = linuxrc ] || ln -sf busybox "$d/bin/$a"
    done
}

# guest_install_init DIR SCRIPT NAME: the guest-side init SCRIPT as DIR/NAME
# (e.g. init), and init-lib.sh, which every such script sources, as
# DIR/lib/init-lib.sh.
guest_install_init() {
    local d="$1" script="$2" name="$3"
    mkdir -p "$d/lib"
    install -m 755 "$script" "$d/$name"
    install -m 644 "$(dirname "${BASH_SOURCE[0]}")/init-lib.sh" "$d/lib/init-lib.sh"
}

# guest_copy_libs DEST ROOT LDD_OUTPUT: copies the shared libraries and the
# dynamic loader that LDD_OUTPUT (ldd's) names into the tree DEST, each at
# the path ldd names less ROOT (where extracted packages are; "" for the
# host's), once; counts the copies in GUEST_NLIBS. Fails on a library ldd
# does not find.
GUEST_NLIBS=0
guest_copy_libs() {
    local dest_root="$1" root="$2" a b c lib dest
    while read -r a b c _; do
        if [ "$b" = "=>" ] && [ "$c" = "not" ]; then
            echo "$a is not found (ldd); install the package that has it" >&2
            return 1
        elif [ "$b" = "=>" ] && [ "${c#/}" != "$c" ]; then
            lib="$c" # libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)
        elif [ "${a#/}" != "$a" ]; then
            lib="$a" # /lib64/ld-linux-x86-64.so.2 (0x...)
        else
            continue # linux-vdso.so.1, "statically linked"
        fi
        dest="${lib#"$root"}"
        [ -e "$dest_root$dest" ] && continue
        mkdir -p "$dest_root$(dirname "$dest")"
        cp -L "$lib" "$dest_root$dest"
        GUEST_NLIBS=$((GUEST_NLIBS + 1))
    done <<<"$3"
}

# guest_kernel_deb OUTDIR: sets DEB to the kernel package build.sh OUTDIR
# used ($VSTREAM_GUEST_KERNEL_DEB, else the newest one cached in OUTDIR, or
# the VSTREAM_GUEST_KERNEL_PKG one).
guest_kernel_deb() {
    local out="$1" pat name
    if [ -n "${VSTREAM_GUEST_KERNEL_DEB:-}" ]; then
        DEB="$(cd "$(dirname "$VSTREAM_GUEST_KERNEL_DEB")" && pwd)/$(basename "$VSTREAM_GUEST_KERNEL_DEB")"
    else
        pat="linux-image-*.deb"
        [ -n "${VSTREAM_GUEST_KERNEL_PKG:-}" ] && pat="${VSTREAM_GUEST_KERNEL_PKG}_*.deb"
        # shellcheck disable=SC2086
        name="$(cd "$out" && ls -1 $pat 2>/dev/null | sort -V | tail -n1)" || true
        [ -n "$name" ] || { echo "no cached kernel .deb in $out (build.sh should have fetched it)" >&2; return 1; }
        DEB="$out/$name"
    fi
    [ -f "$DEB" ] || { echo "kernel package $DEB missing" >&2; return 1; }
}

# guest_package_debs OUTDIR PKG...: sets PKG_DEBS to the .deb of each PKG
# in OUTDIR, copied there first from fetch-kernel.sh's cache (which
# .ci/install-deps fills: building the kit downloads nothing) if missing.
guest_package_debs() {
    local out="$1" p f cached
    shift
    PKG_DEBS=()
    for p in "$@"; do
        # shellcheck disable=SC2012
        f="$(cd "$out" && ls -1 "${p}"_*.deb 2>/dev/null | sort -V | tail -n1)" || true
        if [ -z "$f" ]; then
            cached="$(bash "$(dirname "${BASH_SOURCE[0]}")/fetch-kernel.sh" --find-deb "$p")" || return 1
            cp "$cached" "$out/"
            f="$(basename "$cached")"
        fi
        PKG_DEBS+=("$out/$f")
    done
}

# guest_kernel_and_qemu NAME OUTDIR INITRD HINT: sets KERNEL (the
# $VSTREAM_GUEST_KERNEL, else OUTDIR's uncompressed vmlinux for a fast PVH
# boot, else vmlinuz) and QEMU, and exits 2 with HINT when the kernel, the
# initrd or QEMU is missing.
guest_kernel_and_qemu() {
    local name="$1" out="$2" initrd="$3" hint="$4" f
    KERNEL="${VSTREAM_GUEST_KERNEL:-}"
    if [ -z "$KERNEL" ]; then
        KERNEL="$out/vmlinuz"
        [ -s "$out/vmlinux" ] && KERNEL="$out/vmlinux"
    fi
    for f in "$KERNEL" "$initrd"; do
        [ -s "$f" ] || { echo "$name: $f missing; $hint" >&2; exit 2; }
    done
    QEMU="${QEMU:-qemu-system-x86_64}"
    command -v "$QEMU" >/dev/null ||
        { echo "$name: $QEMU not found (apt-get install qemu-system-x86)" >&2; exit 2; }
}

# run_guest_console NAME TIMEOUT VSTEST COMMAND...: runs the QEMU COMMAND
# under a timeout, copies its serial console (stdio) to stdout without CRs,
# and to $VSTREAM_GUEST_LOG if set; a summary line "NAME: ..." goes to stderr.
# Exits 0 on GUEST-OK without GUEST-ERROR, 1 on GUEST-ERROR or no GUEST-OK,
# 3 on a timeout.
run_guest_console() {
    local name="$1" timeout="$2" vstest="$3" log t0 t1 ok="" err="" rc line
    shift 3
    log="${VSTREAM_GUEST_LOG:-/dev/null}"
    : >"$log" 2>/dev/null || log=/dev/null
    t0=$EPOCHREALTIME
    shopt -s lastpipe
    timeout --kill-after=5 "$timeout" "$@" </dev/null 2>&1 |
        while IFS= read -r line || [ -n "$line" ]; do
            line="${line//$'\r'/}"
            printf '%s\n' "$line"
            printf '%s\n' "$line" >>"$log"
            case "$line" in
                *GUEST-OK*) [ -n "$ok" ] || ok=$EPOCHREALTIME ;;
                *GUEST-ERROR*) err=1 ;;
            esac
        done
    rc=${PIPESTATUS[0]}
    t1=$EPOCHREALTIME
    secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", b-a}'; }
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        echo "$name: TIMEOUT after ${timeout}s (qemu killed) vstest=$vstest" >&2
        exit 3
    fi
    if [ -n "$err" ]; then
        echo "$name: FAIL guest reported GUEST-ERROR (qemu rc=$rc, $(secs "$t0" "$t1")s) vstest=$vstest" >&2
        exit 1
    fi
    if [ -z "$ok" ]; then
        echo "$name: FAIL no GUEST-OK (qemu rc=$rc, $(secs "$t0" "$t1")s) vstest=$vstest" >&2
        exit 1
    fi
    echo "$name: OK vstest=$vstest guest_ok_after=$(secs "$t0" "$ok")s qemu_exit_after=$(secs "$t0" "$t1")s qemu_rc=$rc" >&2
    exit 0
}
