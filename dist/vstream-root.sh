# vstream-root.sh: mount a diskless machine's root file system from its vDisk.
# -*- shell-script -*-
#
# A POSIX sh library (busybox ash, or klibc's dash), sourced by
#   - initramfs-tools: /scripts/vstream, for boot=vstream, which calls
#     `vstream_mountroot "$rootmnt"` from its mountroot();
#   - the test initramfs' /init (tests/guest/netboot-init.sh).
#
# vstream_mountroot MOUNTPOINT brings the network up, loads nbd, connects
# the kernel device, waits until it is connected and mounts the root file
# system from it. Two clients can connect it (vstream.client=):
#   agent       (the default) `vstream target --attach /dev/nbd0`, started in
#               the background: it keeps the device's write cache when the
#               vDisk says so, and moves to another server when one dies;
#   nbd-client  Debian's nbd-client, the kernel's own NBD client: the script
#               logs in itself (POST /api/v1/login with busybox wget) and runs
#               `nbd-client HOST PORT /dev/nbd0 -N EXPORT`. The kernel then
#               holds the connection to that one server: no failover, no
#               reconnect, and the vDisk's write cache must be on the server
#               (cache type server; a `base/...` export is refused).
# Either way the boot is told apart from a reconnect by its boot token:
# vstream.boot= (added by the boot script GET /boot/ipxe), else the kernel's
# /proc/sys/kernel/random/boot_id. The agent reads it itself; nbd-client
# sends it at login and opens the export the reply names
# (device/KEY;boot=TOKEN), so the server knows this boot from the last and
# the device starts clean.
# On failure it prints `vstream: ...` lines (and the end of the client's log)
# and returns 1; VSTREAM_ERROR then holds the reason.
#
# The agent stays alive after switch_root: it serves the root file system.
# Its pid is in /run/vstream/agent.pid, its log in /run/vstream/agent.log,
# this script's own messages in /run/vstream/boot.log (initramfs-tools moves
# /run into the new root; so does netboot-init.sh). It runs with argv[0] =
# "@vstream" when the shell has `exec -a` (busybox ash): systemd's shutdown
# spares such processes (https://systemd.io/ROOT_STORAGE_DAEMONS/).
#
# Kernel command line:
#   vstream.bootstrap=HOST:PORT[,HOST:PORT...]  the servers' API addresses
#                         (required; use IP addresses, see docs/netboot.md)
#   vstream.mac=MAC       the device's identity (default: BOOTIF=, else the
#                         MAC of the interface the network came up on)
#   vstream.client=agent|nbd-client  what connects the kernel device
#                         (default agent; see above)
#   vstream.boot=TOKEN    this boot's identity ([A-Za-z0-9-], at most 64;
#                         the boot script adds it; default: the kernel's
#                         boot_id)
#   vstream.enroll=TOKEN  a one-time enrollment token (the boot script adds
#                         it on a farm with TLS): the agent trades it for the
#                         device's certificate; read by the agent itself
#   vstream.tls=DIR       the agent's --tls-certificates: DIR/ca-cert.pem, the
#                         farm's CA (default /etc/vstream/tls when that holds
#                         one; the initramfs hook copies it there)
#   vstream.cache=SPEC    the agent's --cache (default ram:256MiB)
#   vstream.deadline_ms=MS  the agent's --deadline-ms (default: the agent's)
#   vstream.dev=/dev/nbdN the kernel NBD device (default /dev/nbd0)
#   vstream.root=DEV      what to mount: /dev/nbd0p1, LABEL=x, UUID=x
#                         (default: root= when it names one of those, else
#                         vstream.dev itself)
#   vstream.iface=IFACE   the interface to bring up (default: the one whose
#                         MAC is vstream.mac or BOOTIF, else the first Ethernet)
#   vstream.cachedev=DEV  mount DEV (a local disk's file system) on
#                         /run/vstream/cache first, for
#                         vstream.cache=disk:/run/vstream/cache/FILE:SIZE
#   vstream.timeout=SECS  how long to wait for the disk (default 300; 0: forever)
#   vstream.netwait=SECS  how long to wait for a network interface, and for
#                         a DHCP lease (busybox udhcpc; default 60)
#   vstream.log=FILTER    the agent's RUST_LOG (default info)
#   vstream.nbd_timeout=SECS  nbd-client only: its -timeout, how long a
#                         request may go unanswered before the kernel gives
#                         up on the connection (default: none, nbd-client's)
#   rootfstype=, rootflags=, ro, rw   as for any root file system (default ro)
#
# Settings from the environment (e.g. /conf/conf.d/vstream in initramfs-tools)
# are defaults the command line overrides: VSTREAM_BOOTSTRAP, VSTREAM_MAC,
# VSTREAM_CLIENT, VSTREAM_CACHE, VSTREAM_DEADLINE_MS, VSTREAM_DEV,
# VSTREAM_ROOT, VSTREAM_IFACE, VSTREAM_CACHEDEV, VSTREAM_TIMEOUT, VSTREAM_LOG,
# VSTREAM_NBD_TIMEOUT, VSTREAM_TLS; and VSTREAM_BIN (the agent, default /bin/vstream),
# VSTREAM_NBD_CLIENT (default: nbd-client on PATH, else /sbin/nbd-client),
# VSTREAM_NETWAIT.
#
# With nbd-client, /run/vstream also holds nbd-client.log, nbd-client.cmdline
# and login.json (the login reply).

# shellcheck shell=sh disable=SC1090,SC2030,SC2031,SC2034,SC2119,SC2120,SC3038
# (SC3038: `exec -a` is probed for before use.)

VSTREAM_BIN="${VSTREAM_BIN:-/bin/vstream}"
VSTREAM_RUN=/run/vstream
VSTREAM_ERROR=
VSTREAM_AGENT_PID=
VSTREAM_CLIENT_PID=

vstream_msg() {
	echo "vstream: $*"
	[ -d "$VSTREAM_RUN" ] && echo "vstream: $*" >>"$VSTREAM_RUN/boot.log" 2>/dev/null
	return 0
}

# vstream_fail MESSAGE: reports a failure; always returns 1.
vstream_fail() {
	VSTREAM_ERROR="$*"
	vstream_msg "error: $*"
	return 1
}

# _vs_log_tail FILE WHAT [N]: the last N (15) lines of FILE, each prefixed,
# on the console.
_vs_log_tail() {
	[ -s "$1" ] || {
		echo "vstream: ($2 $1 is empty)"
		return 0
	}
	echo "vstream: last lines of $2 $1:"
	tail -n "${3:-15}" "$1" 2>/dev/null | while IFS= read -r l; do
		echo "vstream:   $l"
	done
}

# The log of what connects the device: the agent's, or nbd-client's.
_vs_client_log() {
	if [ "${VSTREAM_CLIENT:-agent}" = nbd-client ]; then
		echo "$VSTREAM_RUN/nbd-client.log"
	else
		echo "$VSTREAM_RUN/agent.log"
	fi
}

# The last lines of the agent's log (or nbd-client's), on the console.
vstream_agent_log_tail() {
	_vs_log_tail "$(_vs_client_log)" "the log" "$@"
}

_vs_nap() { # a fifth of a second where the shell can, else one second
	usleep 200000 2>/dev/null || sleep 0.2 2>/dev/null || sleep 1
}

_vs_lower() {
	if command -v tr >/dev/null 2>&1; then
		echo "$1" | tr 'A-F' 'a-f'
	else
		echo "$1"
	fi
}

_vs_is_mounted() { # MOUNTPOINT
	while read -r _ _vs_m _; do
		[ "$_vs_m" = "$1" ] && return 0
	done </proc/mounts
	return 1
}

_vs_alive() { # PID: running (not gone, not a zombie)
	[ -r "/proc/$1/status" ] || return 1
	while read -r _vs_k _vs_v _; do
		if [ "$_vs_k" = "State:" ]; then
			[ "$_vs_v" != Z ] && [ "$_vs_v" != X ]
			return
		fi
	done <"/proc/$1/status"
	return 1
}

# Reads /proc/cmdline into the VSTREAM_* settings.
vstream_parse_cmdline() {
	VSTREAM_CACHE="${VSTREAM_CACHE:-ram:256MiB}"
	VSTREAM_CLIENT="${VSTREAM_CLIENT:-agent}"
	VSTREAM_DEV="${VSTREAM_DEV:-/dev/nbd0}"
	VSTREAM_TIMEOUT="${VSTREAM_TIMEOUT:-300}"
	VSTREAM_NETWAIT="${VSTREAM_NETWAIT:-60}"
	VSTREAM_ROOTMODE=ro
	VSTREAM_ROOTFSTYPE=
	VSTREAM_ROOTFLAGS=
	_vs_rootarg=
	_vs_bootif=
	set -f
	# shellcheck disable=SC2013
	for _vs_x in $(cat /proc/cmdline); do
		case "$_vs_x" in
		vstream.bootstrap=*) VSTREAM_BOOTSTRAP="${_vs_x#vstream.bootstrap=}" ;;
		vstream.mac=*) VSTREAM_MAC="${_vs_x#vstream.mac=}" ;;
		vstream.client=*) VSTREAM_CLIENT="${_vs_x#vstream.client=}" ;;
		vstream.boot=*) VSTREAM_BOOT="${_vs_x#vstream.boot=}" ;;
		vstream.cache=*) VSTREAM_CACHE="${_vs_x#vstream.cache=}" ;;
		vstream.tls=*) VSTREAM_TLS="${_vs_x#vstream.tls=}" ;;
		vstream.deadline_ms=*) VSTREAM_DEADLINE_MS="${_vs_x#vstream.deadline_ms=}" ;;
		vstream.dev=*) VSTREAM_DEV="${_vs_x#vstream.dev=}" ;;
		vstream.root=*) VSTREAM_ROOT="${_vs_x#vstream.root=}" ;;
		vstream.iface=*) VSTREAM_IFACE="${_vs_x#vstream.iface=}" ;;
		vstream.cachedev=*) VSTREAM_CACHEDEV="${_vs_x#vstream.cachedev=}" ;;
		vstream.timeout=*) VSTREAM_TIMEOUT="${_vs_x#vstream.timeout=}" ;;
		vstream.netwait=*) VSTREAM_NETWAIT="${_vs_x#vstream.netwait=}" ;;
		vstream.log=*) VSTREAM_LOG="${_vs_x#vstream.log=}" ;;
		vstream.nbd_timeout=*) VSTREAM_NBD_TIMEOUT="${_vs_x#vstream.nbd_timeout=}" ;;
		BOOTIF=*) _vs_bootif="${_vs_x#BOOTIF=}" ;;
		root=*) _vs_rootarg="${_vs_x#root=}" ;;
		rootfstype=*) VSTREAM_ROOTFSTYPE="${_vs_x#rootfstype=}" ;;
		rootflags=*) VSTREAM_ROOTFLAGS="${_vs_x#rootflags=}" ;;
		ro) VSTREAM_ROOTMODE=ro ;;
		rw) VSTREAM_ROOTMODE=rw ;;
		esac
	done
	set +f
	case "$VSTREAM_TIMEOUT" in '' | *[!0-9]*) VSTREAM_TIMEOUT=300 ;; esac
	case "$VSTREAM_NETWAIT" in '' | *[!0-9]*) VSTREAM_NETWAIT=60 ;; esac
	# BOOTIF=01-52-54-00-12-34-56 (pxelinux IPAPPEND 2, or iPXE) names the
	# interface the machine booted from.
	_vs_bootmac=
	if [ -n "$_vs_bootif" ]; then
		_vs_old_ifs="$IFS"
		IFS=-
		for _vs_x in ${_vs_bootif#*-}; do
			_vs_bootmac="${_vs_bootmac:+$_vs_bootmac:}$_vs_x"
		done
		IFS="$_vs_old_ifs"
		_vs_bootmac="$(_vs_lower "$_vs_bootmac")"
	fi
	if [ -z "${VSTREAM_ROOT:-}" ]; then
		case "$_vs_rootarg" in
		/dev/nbd* | LABEL=* | UUID=* | PARTUUID=* | PARTLABEL=*) VSTREAM_ROOT="$_vs_rootarg" ;;
		*) VSTREAM_ROOT="$VSTREAM_DEV" ;;
		esac
	fi
}

# Ethernet interfaces, physical ones first.
_vs_ifaces() {
	for _vs_d in /sys/class/net/*; do
		[ -e "$_vs_d/device" ] || continue
		[ "$(cat "$_vs_d/type" 2>/dev/null)" = 1 ] && echo "${_vs_d##*/}"
	done
	for _vs_d in /sys/class/net/*; do
		[ -e "$_vs_d/device" ] && continue
		[ "${_vs_d##*/}" = lo ] && continue
		[ "$(cat "$_vs_d/type" 2>/dev/null)" = 1 ] && echo "${_vs_d##*/}"
	done
	return 0
}

# The interface to use, or nothing yet: vstream.iface, else the one with
# the device's MAC (vstream.mac, BOOTIF), else the first Ethernet one.
_vs_pick_iface() {
	if [ -n "${VSTREAM_IFACE:-}" ]; then
		[ -e "/sys/class/net/$VSTREAM_IFACE" ] && echo "$VSTREAM_IFACE"
		return 0
	fi
	_vs_want="$(_vs_lower "${VSTREAM_MAC:-$_vs_bootmac}")"
	_vs_first=
	for _vs_i in $(_vs_ifaces); do
		[ -n "$_vs_first" ] || _vs_first="$_vs_i"
		if [ -n "$_vs_want" ] && [ "$(cat "/sys/class/net/$_vs_i/address")" = "$_vs_want" ]; then
			echo "$_vs_i"
			return 0
		fi
	done
	# A device MAC that no interface has is only an identity: use the first.
	echo "$_vs_first"
}

_vs_ipv4() { # IFACE: prints its first IPv4 address/prefix, if any
	if command -v ip >/dev/null 2>&1; then
		ip -4 -o addr show dev "$1" 2>/dev/null | while read -r _ _ _vs_fam _vs_a _; do
			[ "$_vs_fam" = inet ] && echo "$_vs_a" && break
		done
	elif [ -r "/run/net-$1.conf" ]; then
		(. "/run/net-$1.conf" && echo "${IPV4ADDR:-}")
	fi
}

# The event script busybox udhcpc runs (written at boot, so that the
# library stays one file).
_vs_write_udhcpc_script() {
	cat >"$1" <<'EOF'
#!/bin/sh
# udhcpc event script (from vstream-root.sh): address, route, resolv.conf,
# and /run/net-IFACE.conf as initramfs-tools' ipconfig writes it.
case "$1" in
deconfig)
	ip link set dev "$interface" up
	;;
bound | renew)
	if ! ip -4 -o addr show dev "$interface" | grep -q " inet $ip/"; then
		ip -4 addr flush dev "$interface"
		ip -4 addr add "$ip/${mask:-$subnet}" ${broadcast:+broadcast "$broadcast"} dev "$interface"
	fi
	ip link set dev "$interface" up
	for r in $router; do
		ip -4 route add default via "$r" dev "$interface" 2>/dev/null && break
	done
	if [ -n "$dns" ]; then
		: >/etc/resolv.conf
		[ -n "$domain" ] && echo "search $domain" >>/etc/resolv.conf
		for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
	fi
	{
		echo "DEVICE='$interface'"
		echo "PROTO='dhcp'"
		echo "IPV4ADDR='$ip'"
		echo "IPV4BROADCAST='$broadcast'"
		echo "IPV4NETMASK='$subnet'"
		echo "IPV4GATEWAY='${router%% *}'"
		set -- $dns
		echo "IPV4DNS0='${1:-}'"
		echo "IPV4DNS1='${2:-}'"
		echo "HOSTNAME='$hostname'"
		echo "DNSDOMAIN='$domain'"
		echo "ROOTSERVER='$siaddr'"
		echo "filename='$boot_file'"
	} >"/run/net-$interface.conf"
	;;
esac
exit 0
EOF
	chmod 755 "$1"
}

# Brings the network up, unless an interface has an IPv4 address already
# (ip= on the kernel command line, an earlier script). Sets VSTREAM_IFACE.
vstream_net_up() {
	# Already configured (kernel ip=, initramfs-tools' ipconfig earlier)?
	for _vs_i in $(_vs_ifaces); do
		_vs_a="$(_vs_ipv4 "$_vs_i")"
		if [ -n "$_vs_a" ] && { [ -z "${VSTREAM_IFACE:-}" ] || [ "$VSTREAM_IFACE" = "$_vs_i" ]; }; then
			VSTREAM_IFACE="$_vs_i"
			vstream_msg "network: $_vs_i is up already ($_vs_a)"
			return 0
		fi
	done

	if command -v configure_networking >/dev/null 2>&1; then
		# initramfs-tools: ipconfig (DHCP unless ip= says otherwise) on
		# DEVICE, or on the BOOTIF one, or on any interface.
		[ -n "${VSTREAM_IFACE:-}" ] && [ -z "${DEVICE:-}" ] && DEVICE="$VSTREAM_IFACE"
		vstream_msg "network: configure_networking${DEVICE:+ on $DEVICE}"
		configure_networking
		[ -n "${DEVICE:-}" ] && [ -z "${VSTREAM_IFACE:-}" ] && VSTREAM_IFACE="$DEVICE"
		if [ -z "${VSTREAM_IFACE:-}" ]; then
			for _vs_f in /run/net-*.conf; do
				[ -e "$_vs_f" ] || continue
				_vs_f="${_vs_f#/run/net-}"
				VSTREAM_IFACE="${_vs_f%.conf}"
				break
			done
		fi
		[ -n "${VSTREAM_IFACE:-}" ] || VSTREAM_IFACE="$(_vs_pick_iface)"
		_vs_a="$(_vs_ipv4 "$VSTREAM_IFACE")"
		[ -n "$_vs_a" ] ||
			vstream_fail "no network: ${VSTREAM_IFACE:-no interface} got no IPv4 address (DHCP failed? ip= on the kernel command line?)" ||
			return 1
		vstream_msg "network: $VSTREAM_IFACE is $_vs_a"
		return 0
	fi

	command -v udhcpc >/dev/null 2>&1 ||
		vstream_fail "cannot configure the network: neither initramfs-tools' configure_networking nor busybox udhcpc is here" ||
		return 1
	ip link set lo up 2>/dev/null
	_vs_n=0
	_vs_iface="$(_vs_pick_iface)"
	while [ -z "$_vs_iface" ]; do
		_vs_n=$((_vs_n + 1))
		[ "$_vs_n" -le $((VSTREAM_NETWAIT * 5)) ] ||
			vstream_fail "no network: no ${VSTREAM_IFACE:-Ethernet} interface appeared within ${VSTREAM_NETWAIT}s (is the NIC's driver in the initramfs?)" ||
			return 1
		_vs_nap
		_vs_iface="$(_vs_pick_iface)"
	done
	VSTREAM_IFACE="$_vs_iface"
	_vs_script="$VSTREAM_RUN/udhcpc.script"
	_vs_write_udhcpc_script "$_vs_script"
	vstream_msg "network: DHCP on $VSTREAM_IFACE ($(cat "/sys/class/net/$VSTREAM_IFACE/address"))"
	# -t tries, 3 s apart by default; -n: fail rather than wait forever.
	if ! udhcpc -i "$VSTREAM_IFACE" -f -q -n -t $(((VSTREAM_NETWAIT + 2) / 3)) \
		-s "$_vs_script" >>"$VSTREAM_RUN/udhcpc.log" 2>&1; then
		sed 's/^/vstream:   /' "$VSTREAM_RUN/udhcpc.log" 2>/dev/null | tail -n 5
		vstream_fail "no network: DHCP on $VSTREAM_IFACE got no lease within ${VSTREAM_NETWAIT}s"
		return 1
	fi
	_vs_a="$(_vs_ipv4 "$VSTREAM_IFACE")"
	[ -n "$_vs_a" ] || vstream_fail "no network: DHCP on $VSTREAM_IFACE ended without an address" || return 1
	vstream_msg "network: $VSTREAM_IFACE is $_vs_a"
}

# Loads nbd and makes sure VSTREAM_DEV exists and is free.
vstream_load_nbd() {
	_vs_name="${VSTREAM_DEV##*/}"
	if [ ! -e "/sys/block/$_vs_name" ]; then
		modprobe nbd >/dev/null 2>&1 || true
	fi
	_vs_n=0
	while [ ! -e "/sys/block/$_vs_name" ]; do
		_vs_n=$((_vs_n + 1))
		[ "$_vs_n" -le 25 ] ||
			vstream_fail "$VSTREAM_DEV does not exist: is the nbd kernel module in the initramfs? (modprobe nbd failed)" ||
			return 1
		_vs_nap
	done
	if [ ! -b "$VSTREAM_DEV" ] && [ -r "/sys/block/$_vs_name/dev" ]; then
		IFS=: read -r _vs_maj _vs_min <"/sys/block/$_vs_name/dev"
		mknod "$VSTREAM_DEV" b "$_vs_maj" "$_vs_min" 2>/dev/null
	fi
	[ -b "$VSTREAM_DEV" ] || vstream_fail "$VSTREAM_DEV is not a block device" || return 1
	[ ! -e "/sys/block/$_vs_name/pid" ] ||
		vstream_fail "$VSTREAM_DEV is connected already (by pid $(cat "/sys/block/$_vs_name/pid")); set vstream.dev=/dev/nbdN" ||
		return 1
}

_vs_mount_cachedev() {
	[ -n "${VSTREAM_CACHEDEV:-}" ] || return 0
	_vs_n=0
	while [ ! -b "$VSTREAM_CACHEDEV" ]; do
		_vs_n=$((_vs_n + 1))
		[ "$_vs_n" -le 50 ] || vstream_fail "the cache disk $VSTREAM_CACHEDEV did not appear within 10s" || return 1
		_vs_nap
	done
	mkdir -p "$VSTREAM_RUN/cache"
	mount "$VSTREAM_CACHEDEV" "$VSTREAM_RUN/cache" ||
		vstream_fail "could not mount the cache disk $VSTREAM_CACHEDEV on $VSTREAM_RUN/cache" || return 1
	vstream_msg "cache disk $VSTREAM_CACHEDEV mounted on $VSTREAM_RUN/cache"
}

# Starts the agent in the background; sets VSTREAM_AGENT_PID.
vstream_start_agent() {
	[ -x "$VSTREAM_BIN" ] || vstream_fail "the agent $VSTREAM_BIN is not in the initramfs" || return 1
	if ! "$VSTREAM_BIN" --version >"$VSTREAM_RUN/agent.version" 2>&1; then
		sed 's/^/vstream:   /' "$VSTREAM_RUN/agent.version"
		vstream_fail "$VSTREAM_BIN does not run (its shared libraries missing from the initramfs?)"
		return 1
	fi
	# The RAM cache is a file in /dev/shm, unlinked at once. A tmpfs of our
	# own, detached again once the agent holds its file (see vstream_wait_device).
	_vs_own_shm=
	if ! _vs_is_mounted /dev/shm; then
		mkdir -p /dev/shm
		mount -t tmpfs -o nosuid,nodev,mode=1777,size=100% vstream-shm /dev/shm &&
			_vs_own_shm=1
	fi
	_vs_mount_cachedev || return 1

	set -- target --bootstrap "$VSTREAM_BOOTSTRAP" --mac "$VSTREAM_MAC" \
		--cache "$VSTREAM_CACHE" --attach "$VSTREAM_DEV"
	[ -n "${VSTREAM_DEADLINE_MS:-}" ] && set -- "$@" --deadline-ms "$VSTREAM_DEADLINE_MS"
	if [ -z "${VSTREAM_TLS:-}" ] && [ -r /etc/vstream/tls/ca-cert.pem ]; then
		VSTREAM_TLS=/etc/vstream/tls
	fi
	[ -n "${VSTREAM_TLS:-}" ] && set -- "$@" --tls-certificates "$VSTREAM_TLS"
	echo "$VSTREAM_BIN $*" >"$VSTREAM_RUN/agent.cmdline"
	vstream_msg "starting the agent: vstream $*"
	# argv[0] "@vstream": systemd-shutdown's final kill spares it. busybox ash
	# has `exec -a`; klibc's dash has not, and the agent then keeps its name.
	_vs_argv0=
	if (exec -a @vstream "$VSTREAM_BIN" --version) >/dev/null 2>&1; then
		_vs_argv0=@vstream
	else
		vstream_msg "warning: this shell has no 'exec -a': the agent runs without the '@' argv[0] that keeps systemd's shutdown from killing it"
	fi
	if [ -n "$_vs_argv0" ]; then
		(
			export RUST_LOG="${VSTREAM_LOG:-info}"
			cd /
			exec -a "$_vs_argv0" "$VSTREAM_BIN" "$@"
		) </dev/null >>"$VSTREAM_RUN/agent.log" 2>&1 &
	else
		(
			export RUST_LOG="${VSTREAM_LOG:-info}"
			cd /
			exec "$VSTREAM_BIN" "$@"
		) </dev/null >>"$VSTREAM_RUN/agent.log" 2>&1 &
	fi
	VSTREAM_AGENT_PID=$!
	echo "$VSTREAM_AGENT_PID" >"$VSTREAM_RUN/agent.pid"
}

# Checks VSTREAM_BOOT, this boot's identity: vstream.boot= (the boot
# script's token), else the kernel's boot_id (a new one every boot).
vstream_boot_token() {
	if [ -z "${VSTREAM_BOOT:-}" ]; then
		VSTREAM_BOOT="$(cat /proc/sys/kernel/random/boot_id 2>/dev/null)"
		[ -n "$VSTREAM_BOOT" ] ||
			vstream_fail "no vstream.boot= on the kernel command line and no /proc/sys/kernel/random/boot_id: this boot has no identity" ||
			return 1
	fi
	case "$VSTREAM_BOOT" in
	*[!A-Za-z0-9-]*)
		vstream_fail "vstream.boot=$VSTREAM_BOOT: a boot token is letters, digits and '-' only"
		return 1
		;;
	esac
	[ "${#VSTREAM_BOOT}" -le 64 ] ||
		vstream_fail "vstream.boot=: a boot token is 64 characters at most (this one has ${#VSTREAM_BOOT})" ||
		return 1
}

# _vs_json_str KEY FILE: the string value of KEY in the one-line JSON object
# in FILE; nothing when it is absent or has escapes in it.
_vs_json_str() {
	sed -n 's/.*"'"$1"'"[[:space:]]*:[[:space:]]*"\([^"\\]*\)".*/\1/p' "$2" 2>/dev/null | head -n 1
}

# Logs in once to each server of VSTREAM_BOOTSTRAP in turn (POST
# /api/v1/login {"mac","boot"}, no token) until one answers; sets _vs_nbd
# (HOST:PORT) and _vs_export from its reply. Returns 1 with the last
# failure in _vs_login_error when none does.
_vs_login() {
	_vs_body="{\"mac\":\"$VSTREAM_MAC\",\"boot\":\"$VSTREAM_BOOT\"}"
	_vs_to=
	command -v timeout >/dev/null 2>&1 && _vs_to="timeout 10"
	_vs_login_error="no server in vstream.bootstrap=$VSTREAM_BOOTSTRAP"
	set -f
	_vs_old_ifs="$IFS"
	IFS=,
	set -- $VSTREAM_BOOTSTRAP
	IFS="$_vs_old_ifs"
	set +f
	for _vs_s in "$@"; do
		case "$_vs_s" in
		'') continue ;;
		http://* | https://*) _vs_url="${_vs_s%/}/api/v1/login" ;;
		*) _vs_url="http://$_vs_s/api/v1/login" ;;
		esac
		rm -f "$VSTREAM_RUN/login.json"
		# shellcheck disable=SC2086
		if ! $_vs_to wget -q -O "$VSTREAM_RUN/login.json" --header "Content-Type: application/json" \
			--post-data "$_vs_body" "$_vs_url" >"$VSTREAM_RUN/login.err" 2>&1; then
			_vs_login_error="$_vs_url: $(tail -n 1 "$VSTREAM_RUN/login.err" 2>/dev/null)"
			echo "login $_vs_login_error" >>"$VSTREAM_RUN/nbd-client.log"
			continue
		fi
		_vs_nbd="$(_vs_json_str nbd "$VSTREAM_RUN/login.json")"
		_vs_export="$(_vs_json_str export "$VSTREAM_RUN/login.json")"
		if [ -z "$_vs_nbd" ] || [ -z "$_vs_export" ]; then
			_vs_login_error="$_vs_url: a reply without \"nbd\" and \"export\": $(head -c 300 "$VSTREAM_RUN/login.json")"
			echo "login $_vs_login_error" >>"$VSTREAM_RUN/nbd-client.log"
			continue
		fi
		echo "login $_vs_url: nbd=$_vs_nbd export=$_vs_export" >>"$VSTREAM_RUN/nbd-client.log"
		return 0
	done
	return 1
}

# The kernel client: logs in (retrying for VSTREAM_TIMEOUT seconds), then
# runs nbd-client on the server and export the reply names. It configures
# the device over netlink (its default) and exits: the kernel holds the
# connection, and no process is left for a signal (systemd's shutdown
# SIGSTOPs everything) to break it out of NBD_DO_IT. Neither of its modes
# reconnects a lost connection on Linux 6.1, -persist included (measured:
# with -nonetlink -persist, a SIGSTOP made it reconnect in a loop, 257 times
# in 30 s, and the disk stayed dead), so it gets neither -persist nor
# -nonetlink.
vstream_start_nbd_client() {
	_vs_nbdc="${VSTREAM_NBD_CLIENT:-$(command -v nbd-client 2>/dev/null)}"
	_vs_nbdc="${_vs_nbdc:-/sbin/nbd-client}"
	[ -x "$_vs_nbdc" ] ||
		vstream_fail "vstream.client=nbd-client, but nbd-client is not in the initramfs ($_vs_nbdc; apt-get install nbd-client and rebuild it)" ||
		return 1
	command -v wget >/dev/null 2>&1 ||
		vstream_fail "vstream.client=nbd-client needs busybox wget to log in, and there is no wget here" ||
		return 1
	case "$VSTREAM_MAC" in
	*[!0-9A-Za-z:.-]*)
		vstream_fail "vstream.mac=$VSTREAM_MAC is not a MAC address"
		return 1
		;;
	esac
	case "${VSTREAM_NBD_TIMEOUT:-}" in
	*[!0-9]*)
		vstream_fail "vstream.nbd_timeout=$VSTREAM_NBD_TIMEOUT is not a number of seconds"
		return 1
		;;
	esac
	vstream_boot_token || return 1
	: >>"$VSTREAM_RUN/nbd-client.log"
	vstream_msg "logging in to ${VSTREAM_BOOTSTRAP} as $VSTREAM_MAC, boot $VSTREAM_BOOT"
	read -r _vs_t0 _ </proc/uptime
	_vs_n=0
	while ! _vs_login; do
		_vs_n=$((_vs_n + 1))
		read -r _vs_t1 _ </proc/uptime
		if [ "$VSTREAM_TIMEOUT" != 0 ] && [ $((${_vs_t1%.*} - ${_vs_t0%.*})) -ge "$VSTREAM_TIMEOUT" ]; then
			vstream_fail "no server took the login within ${VSTREAM_TIMEOUT}s (is MAC $VSTREAM_MAC a device of theirs? the servers' logs say why they refused it): $_vs_login_error"
			return 1
		fi
		[ $((_vs_n % 10)) = 1 ] && vstream_msg "login failed, retrying: $_vs_login_error"
		sleep 1
	done
	case "$_vs_export" in
	base/*)
		vstream_fail "the vDisk keeps its write cache on the device (export $_vs_export), which nbd-client cannot do: boot with vstream.client=agent, or give the vDisk the server's cache (vstream vdisk set NAME --cache-type server)"
		return 1
		;;
	esac
	_vs_port="${_vs_nbd##*:}"
	_vs_host="${_vs_nbd%:*}"
	_vs_host="${_vs_host#[}"
	_vs_host="${_vs_host%]}"
	case "$_vs_port" in
	'' | *[!0-9]*)
		vstream_fail "the login reply names no NBD port: nbd=$_vs_nbd"
		return 1
		;;
	esac
	set -- "$_vs_host" "$_vs_port" "$VSTREAM_DEV" -N "$_vs_export"
	[ -n "${VSTREAM_NBD_TIMEOUT:-}" ] && set -- "$@" -timeout "$VSTREAM_NBD_TIMEOUT"
	echo "$_vs_nbdc $*" >"$VSTREAM_RUN/nbd-client.cmdline"
	vstream_msg "starting the kernel client: nbd-client $*"
	if ! (cd / && exec "$_vs_nbdc" "$@") </dev/null >>"$VSTREAM_RUN/nbd-client.log" 2>&1; then
		vstream_agent_log_tail
		vstream_fail "nbd-client could not connect $VSTREAM_DEV to $_vs_export on $_vs_nbd"
		return 1
	fi
}

# Waits until the kernel device is connected (its size set and a task
# recorded in /sys/block/nbdN/pid), for VSTREAM_TIMEOUT seconds and, with
# the agent, while the agent lives. Sets VSTREAM_CLIENT_PID: the agent's pid
# (nbd-client leaves no process).
vstream_wait_device() {
	_vs_name="${VSTREAM_DEV##*/}"
	_vs_n=0
	read -r _vs_t0 _ </proc/uptime
	while :; do
		_vs_size="$(cat "/sys/block/$_vs_name/size" 2>/dev/null)"
		if [ "${_vs_size:-0}" != 0 ] && [ -e "/sys/block/$_vs_name/pid" ]; then
			break
		fi
		if [ -n "$VSTREAM_AGENT_PID" ] && ! _vs_alive "$VSTREAM_AGENT_PID"; then
			wait "$VSTREAM_AGENT_PID" 2>/dev/null
			_vs_rc=$?
			vstream_agent_log_tail
			vstream_fail "the agent exited (status $_vs_rc) before $VSTREAM_DEV was connected"
			return 1
		fi
		_vs_n=$((_vs_n + 1))
		if [ "$VSTREAM_TIMEOUT" != 0 ] && [ "$_vs_n" -gt $((VSTREAM_TIMEOUT * 5)) ]; then
			vstream_agent_log_tail
			vstream_fail "$VSTREAM_DEV was not connected within ${VSTREAM_TIMEOUT}s (are the servers ${VSTREAM_BOOTSTRAP} up, and is MAC $VSTREAM_MAC a device of theirs?)"
			return 1
		fi
		if [ $((_vs_n % 50)) = 0 ]; then
			vstream_msg "still waiting for $VSTREAM_DEV ($((_vs_n / 5))s); $VSTREAM_CLIENT says: $(tail -n 1 "$(_vs_client_log)" 2>/dev/null)"
		fi
		_vs_nap
	done
	read -r _vs_t1 _ </proc/uptime
	VSTREAM_CLIENT_PID="$VSTREAM_AGENT_PID"
	if [ -n "$VSTREAM_AGENT_PID" ]; then
		vstream_msg "$VSTREAM_DEV connected: $((_vs_size / 2048)) MiB, agent pid $VSTREAM_AGENT_PID${_vs_argv0:+ ($_vs_argv0)} (uptime ${_vs_t0:-?}s -> ${_vs_t1:-?}s)"
	else
		vstream_msg "$VSTREAM_DEV connected: $((_vs_size / 2048)) MiB by nbd-client, the kernel holds the connection (uptime ${_vs_t0:-?}s -> ${_vs_t1:-?}s)"
	fi
	# The agent holds its cache file now: let the OS mount its own /dev/shm.
	[ -n "${_vs_own_shm:-}" ] && umount -l /dev/shm 2>/dev/null
	return 0
}

# Resolves VSTREAM_ROOT (a path, LABEL=, UUID=, ...) to a block device.
_vs_resolve_root() {
	case "$VSTREAM_ROOT" in
	/*)
		echo "$VSTREAM_ROOT"
		return 0
		;;
	esac
	if command -v findfs >/dev/null 2>&1; then
		findfs "$VSTREAM_ROOT" 2>/dev/null && return 0
	fi
	if command -v blkid >/dev/null 2>&1; then
		blkid -l -o device -t "$VSTREAM_ROOT" 2>/dev/null && return 0
	fi
	_vs_k="${VSTREAM_ROOT%%=*}"
	_vs_v="${VSTREAM_ROOT#*=}"
	case "$_vs_k" in
	LABEL) _vs_l="/dev/disk/by-label/$_vs_v" ;;
	UUID) _vs_l="/dev/disk/by-uuid/$_vs_v" ;;
	PARTUUID) _vs_l="/dev/disk/by-partuuid/$_vs_v" ;;
	PARTLABEL) _vs_l="/dev/disk/by-partlabel/$_vs_v" ;;
	*) return 1 ;;
	esac
	[ -e "$_vs_l" ] && echo "$_vs_l"
}

# Mounts the root file system from the vDisk on MOUNTPOINT.
vstream_mount_root() {
	_vs_mnt="$1"
	# A partition table is read when the device is next opened.
	dd if="$VSTREAM_DEV" of=/dev/null bs=4096 count=1 2>/dev/null
	_vs_n=0
	while :; do
		_vs_dev="$(_vs_resolve_root)"
		[ -n "$_vs_dev" ] && [ -b "$_vs_dev" ] && break
		_vs_n=$((_vs_n + 1))
		if [ "$_vs_n" -gt 50 ]; then
			_vs_parts=
			for _vs_p in "/sys/block/${VSTREAM_DEV##*/}/${VSTREAM_DEV##*/}"p*; do
				[ -e "$_vs_p" ] && _vs_parts="$_vs_parts ${_vs_p##*/}"
			done
			vstream_fail "root device $VSTREAM_ROOT not found on $VSTREAM_DEV within 10s (its partitions: ${_vs_parts:-none}; set vstream.root= or root=)"
			return 1
		fi
		[ $((_vs_n % 10)) = 0 ] && command -v blockdev >/dev/null 2>&1 && blockdev --rereadpt "$VSTREAM_DEV" 2>/dev/null
		_vs_nap
	done
	_vs_type="$VSTREAM_ROOTFSTYPE"
	if [ -z "$_vs_type" ] && command -v get_fstype >/dev/null 2>&1; then
		_vs_type="$(get_fstype "$_vs_dev")"
		[ "$_vs_type" = unknown ] && _vs_type=
	fi
	[ -n "$_vs_type" ] && modprobe "$_vs_type" >/dev/null 2>&1
	_vs_opts="$VSTREAM_ROOTMODE${VSTREAM_ROOTFLAGS:+,$VSTREAM_ROOTFLAGS}"
	if ! mount ${_vs_type:+-t "$_vs_type"} -o "$_vs_opts" "$_vs_dev" "$_vs_mnt"; then
		vstream_fail "could not mount $_vs_dev (${_vs_type:-auto}, $_vs_opts) on $_vs_mnt"
		return 1
	fi
	vstream_msg "root file system $_vs_dev (${_vs_type:-auto}, $_vs_opts) mounted on $_vs_mnt"
}

# The whole boot: network, nbd, agent, device, mount. MOUNTPOINT is where
# the root goes (initramfs-tools: $rootmnt).
vstream_mountroot() {
	mkdir -p "$VSTREAM_RUN" || { echo "vstream: error: cannot create $VSTREAM_RUN"; return 1; }
	vstream_parse_cmdline
	[ -n "${VSTREAM_BOOTSTRAP:-}" ] ||
		vstream_fail "no vstream.bootstrap=HOST:PORT[,HOST:PORT...] on the kernel command line: which servers should this device log in to?" ||
		return 1
	vstream_net_up || return 1
	if [ -z "${VSTREAM_MAC:-}" ]; then
		VSTREAM_MAC="${_vs_bootmac:-$(cat "/sys/class/net/$VSTREAM_IFACE/address" 2>/dev/null)}"
		[ -n "$VSTREAM_MAC" ] ||
			vstream_fail "no vstream.mac= on the kernel command line, and no MAC address on ${VSTREAM_IFACE:-any interface}" ||
			return 1
		vstream_msg "device MAC $VSTREAM_MAC (from ${_vs_bootmac:+BOOTIF=}${_vs_bootmac:-$VSTREAM_IFACE})"
	fi
	vstream_load_nbd || return 1
	case "$VSTREAM_CLIENT" in
	agent) vstream_start_agent || return 1 ;;
	nbd-client) vstream_start_nbd_client || return 1 ;;
	*)
		vstream_fail "vstream.client=$VSTREAM_CLIENT: the client is agent or nbd-client"
		return 1
		;;
	esac
	vstream_wait_device || return 1
	vstream_mount_root "$1" || return 1
}
