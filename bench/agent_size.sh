#!/usr/bin/env bash
# What a device's initramfs carries of vstream: the agent binary, stripped
# and compressed, and the network-boot initrd built with it.
#
#   bash bench/agent_size.sh            # builds target/release/{vstream,vstream-agent}
#   BENCH_NO_BUILD=1 bash bench/agent_size.sh
#
# Compares `vstream` (the whole program, which an initramfs carried before the
# agent had a binary of its own) with `vstream-agent` (the agent alone): file
# size as built (with debug info), stripped, stripped and `xz -9`; and the
# size of tests/guest's network-boot initrd (busybox, kernel modules, the
# agent) built around each. Prints one table with the ratios.
#
# Environment: BENCH_WORK=DIR (default bench/.work/agent_size), BENCH_NO_BUILD=1.
set -euo pipefail
cd "$(dirname "$0")/.."
work="${BENCH_WORK:-bench/.work/agent_size}"
mkdir -p "$work"
if [ "${BENCH_NO_BUILD:-}" != 1 ]; then
	cargo build --release -p vstream --bins >&2
fi
rel="${CARGO_TARGET_DIR:-target}/release"
kit="$work/kit"
bash tests/guest/build.sh "$kit" >&2
declare -A built stripped xzed initrd
for b in vstream vstream-agent; do
	[ -x "$rel/$b" ] || { echo "agent_size: $rel/$b is missing" >&2; exit 1; }
	built[$b]=$(stat -c %s "$rel/$b")
	cp "$rel/$b" "$work/$b.stripped"
	strip "$work/$b.stripped"
	stripped[$b]=$(stat -c %s "$work/$b.stripped")
	xzed[$b]=$(xz -9 -c "$work/$b.stripped" | wc -c)
	rm -rf "$work/kit-$b"
	cp -a "$kit" "$work/kit-$b"
	bash tests/guest/build-netboot.sh "$work/kit-$b" "$rel/$b" >"$work/kit-$b.log" 2>&1 || {
		echo "agent_size: building the initrd with $b failed; see $work/kit-$b.log" >&2
		exit 1
	}
	initrd[$b]=$(stat -c %s "$work/kit-$b/netboot-initrd.img")
done
mib() { awk -v n="$1" 'BEGIN { printf "%.1f MiB", n / 1048576 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
{
	echo "| | vstream | vstream-agent | agent ÷ vstream |"
	echo "|---|---:|---:|---:|"
	for row in built stripped xzed initrd; do
		declare -n v=$row
		case $row in
		built) name="as built (debug info)" ;;
		stripped) name="stripped" ;;
		xzed) name="stripped, xz -9" ;;
		initrd) name="network-boot initrd" ;;
		esac
		echo "| $name | $(mib "${v[vstream]}") | $(mib "${v[vstream-agent]}") | $(ratio "${v[vstream-agent]}" "${v[vstream]}") |"
	done
} | tee "$work/last-table.md"
rm -rf "$work"/kit-vstream "$work"/kit-vstream-agent "$work"/*.stripped
