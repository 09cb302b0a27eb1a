#!/bin/bash
# Tunes a network interface for chimed: NIC queues, RSS on addresses only,
# IRQ affinity on the worker cores, ring sizes, GRO/LRO off, and the sysctls
# that matter for a UDP server at high packet rates.
#
# Usage: tune-nic.sh IFACE [--queues N] [--cores LIST] [--ring N]
#                          [--busy-poll USEC] [--dry-run]
#
#   --queues N      set the NIC's queue count (ethtool -L; combined channels,
#                   or RX and TX where the driver has no combined ones).
#                   Default: one per --cores entry, else left as it is.
#   --cores LIST    worker cores, as chimed's server.cores ("2-9", "2,4,6",
#                   "0-3,8-11"): the IRQ of queue i goes to core i of the
#                   list (/proc/irq/N/smp_affinity_list). Without it, IRQ
#                   affinity is left alone.
#   --ring N        RX and TX ring entries (ethtool -G). Default: the
#                   driver's maximum, at most 4096.
#   --busy-poll USEC  net.core.busy_poll and busy_read (system-wide busy
#                   polling of sockets: lower latency for the socket
#                   backend at the cost of CPU). Default: left alone.
#   --dry-run       print every command that would change something, change
#                   nothing (reading the current settings still happens).
#
# What it does, each step on its own (a step the driver refuses is reported
# and the others still run):
#   1. queue count              ethtool -L IFACE combined N   (or rx N tx N)
#   2. RSS hashing of UDP on source and destination addresses only, so a
#      client always reaches the same queue and worker (rate limiting and
#      interleaved mode keep per-worker state; chronyd sends each request
#      from a new port)         ethtool -N IFACE rx-flow-hash udp4 sd (udp6)
#   3. ring sizes               ethtool -G IFACE rx N tx N
#   4. GRO and LRO off (per-packet latency; XDP needs LRO off)
#                               ethtool -K IFACE gro off / lro off
#   5. IRQ affinity             echo CORE > /proc/irq/IRQ/smp_affinity_list
#   6. sysctls, only ever raised: net.core.rmem_max >= 4 MiB and
#      net.core.wmem_max >= 1 MiB (chimed's socket buffers, when it lacks
#      CAP_NET_ADMIN to force them), net.core.netdev_max_backlog >= 16384;
#      net.core.busy_poll/busy_read with --busy-poll.
#
# Nothing here survives a reboot or a driver reload: run it at boot before
# chimed starts (the chime-tune-nic@IFACE.service unit does).
#
# Exit status: 0 everything applied (or already so), 3 some settings were
# refused or are unavailable (see the summary), 1 usage or fatal error.
set -uo pipefail

usage() {
    sed -n '2,/^$/p' "$0" | sed -n '/^# Usage/,/^# What/p' | sed 's/^# \{0,1\}//' | head -n -1 >&2
    exit 1
}

iface=""
queues=""
cores=""
ring=""
busy_poll=""
dry_run=0
while [ $# -gt 0 ]; do
    case "$1" in
        --queues) queues=${2:-}; shift 2 || usage ;;
        --cores) cores=${2:-}; shift 2 || usage ;;
        --ring) ring=${2:-}; shift 2 || usage ;;
        --busy-poll) busy_poll=${2:-}; shift 2 || usage ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage ;;
        -*) echo "tune-nic: unknown option $1" >&2; usage ;;
        *) [ -z "$iface" ] || usage; iface=$1; shift ;;
    esac
done
[ -n "$iface" ] || usage
# Tests read a made-up interrupt table instead of the machine's.
interrupts=${CHIME_TUNE_NIC_INTERRUPTS:-/proc/interrupts}
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
for v in queues ring busy_poll; do
    val=${!v}
    if [ -n "$val" ] && ! is_uint "$val"; then
        echo "tune-nic: --${v//_/-} takes a number, got \"$val\"" >&2
        exit 1
    fi
done
[ -z "$queues" ] || [ "$queues" -ge 1 ] || { echo "tune-nic: --queues must be at least 1" >&2; exit 1; }
[ -d "/sys/class/net/$iface" ] || { echo "tune-nic: no interface \"$iface\"" >&2; exit 1; }
if [ "$dry_run" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
    echo "tune-nic: changing $iface needs root (or use --dry-run)" >&2
    exit 1
fi
command -v ethtool >/dev/null || { echo "tune-nic: ethtool is not installed" >&2; exit 1; }

# "2-4,7" -> "2 3 4 7"
core_list=()
if [ -n "$cores" ]; then
    IFS=, read -ra parts <<< "$cores"
    for p in "${parts[@]}"; do
        if [[ "$p" =~ ^([0-9]+)-([0-9]+)$ ]] && [ "${BASH_REMATCH[1]}" -le "${BASH_REMATCH[2]}" ]; then
            for ((c = BASH_REMATCH[1]; c <= BASH_REMATCH[2]; c++)); do core_list+=("$c"); done
        elif is_uint "$p"; then
            core_list+=("$p")
        else
            echo "tune-nic: --cores: \"$p\" is not a core or a range" >&2
            exit 1
        fi
    done
    [ -n "$queues" ] || queues=${#core_list[@]}
fi

applied=()
refused=()
skipped=()
say() { printf '%s\n' "$*"; }

# change DESCRIPTION CHECK CMD...: runs (or, with --dry-run, prints) CMD,
# which changes a setting, then CHECK (a function and its arguments, split
# on spaces) must confirm it: ethtool exits 0 after some refusals (-N on a
# driver without RSS, -K on a fixed feature). A failure is reported and
# remembered, never fatal.
change() {
    local what=$1 check=$2
    shift 2
    if [ "$dry_run" -eq 1 ]; then
        say "+ $*"
        applied+=("$what (dry run)")
        return 0
    fi
    local out rc
    out=$("$@" 2>&1)
    rc=$?
    # shellcheck disable=SC2086 # CHECK is a function name and its words
    if [ "$rc" -eq 0 ] && $check; then
        say "ok: $what"
        applied+=("$what")
        return 0
    fi
    out=$(printf '%s' "$out" | tr '\n' ' ' | sed 's/  */ /g; s/ $//')
    [ "$rc" -eq 0 ] && out="not applied${out:+ ($out)}"
    say "refused: $what: ${out:-failed}"
    refused+=("$what: ${out:-failed}")
    return 1
}

# Checks that read a setting back (called through change's CHECK).
# shellcheck disable=SC2317
channels_are() { # KIND N: the current count of KIND ("Combined", "RX", "TX") is N
    [ "$(ethtool -l "$iface" 2>/dev/null | field cur "$1")" = "$2" ]
}
# shellcheck disable=SC2317
rss_is_sd() { # PROTO: hashed on source and destination addresses only
    local current
    current=$(ethtool -n "$iface" rx-flow-hash "$1" 2>/dev/null) || return 1
    grep -q "IP SA" <<< "$current" && grep -q "IP DA" <<< "$current" && ! grep -q "L4 bytes" <<< "$current"
}
# shellcheck disable=SC2317
ring_is() { # KIND N: the current ring of KIND ("RX", "TX") has N entries
    [ "$(ethtool -g "$iface" 2>/dev/null | field cur "$1")" = "$2" ]
}
# shellcheck disable=SC2317
feature_off() { # NAME: the long feature name shows "off"
    ethtool -k "$iface" 2>/dev/null | grep -q "^$1: off"
}
# shellcheck disable=SC2317
sysctl_at_least() { # KEY N
    local cur
    cur=$(cat "/proc/sys/${1//.//}" 2>/dev/null) && is_uint "$cur" && [ "$cur" -ge "$2" ]
}

# write_file DESCRIPTION VALUE FILE: like change, for /proc and /sys files.
write_file() {
    local what=$1 value=$2 file=$3
    if [ "$dry_run" -eq 1 ]; then
        say "+ echo $value > $file"
        applied+=("$what (dry run)")
        return 0
    fi
    local out
    if out=$( { printf '%s\n' "$value" > "$file"; } 2>&1); then
        say "ok: $what"
        applied+=("$what")
    else
        out=$(printf '%s' "$out" | sed 's/.*: //' | tr '\n' ' ')
        say "refused: $what: ${out:-failed}"
        refused+=("$what: ${out:-failed}")
    fi
}

skip() {
    say "skipped: $*"
    skipped+=("$*")
}

# field SECTION NAME: a value from `ethtool -l` or `ethtool -g` output.
# SECTION is "max" (Pre-set maximums) or "cur" (Current hardware settings).
field() {
    awk -v want="$1" -v name="$2" '
        /^Pre-set maximums/ { sec = "max"; next }
        /^Current hardware settings/ { sec = "cur"; next }
        sec == want && $1 == name":" { print $2; exit }
    '
}

say "tune-nic: $iface$( [ "$dry_run" -eq 1 ] && echo " (dry run: nothing is changed)")"

# --- 1. queue count --------------------------------------------------------
if [ -z "$queues" ]; then
    skip "queue count: neither --queues nor --cores given; left as it is"
elif ! channels=$(ethtool -l "$iface" 2>&1); then
    refused+=("queue count: the driver does not report its channels ($(echo "$channels" | head -1))")
    say "refused: queue count: the driver does not report its channels"
else
    max_combined=$(field max Combined <<< "$channels")
    cur_combined=$(field cur Combined <<< "$channels")
    max_rx=$(field max RX <<< "$channels")
    cur_rx=$(field cur RX <<< "$channels")
    cur_tx=$(field cur TX <<< "$channels")
    max_tx=$(field max TX <<< "$channels")
    if is_uint "${max_combined:-}" && [ "$max_combined" -gt 0 ]; then
        if [ "$queues" -gt "$max_combined" ]; then
            refused+=("queue count: $queues asked, the driver allows at most $max_combined combined channels")
            say "refused: queue count: $queues asked, at most $max_combined"
        elif [ "${cur_combined:-}" = "$queues" ]; then
            skip "queue count: already $queues combined channels"
        else
            change "queue count: $queues combined channels" "channels_are Combined $queues" \
                ethtool -L "$iface" combined "$queues"
        fi
    elif is_uint "${max_rx:-}" && is_uint "${max_tx:-}"; then
        if [ "$queues" -gt "$max_rx" ] || [ "$queues" -gt "$max_tx" ]; then
            refused+=("queue count: $queues asked, the driver allows at most $max_rx RX / $max_tx TX")
            say "refused: queue count: $queues asked, at most $max_rx RX / $max_tx TX"
        elif [ "${cur_rx:-}" = "$queues" ] && [ "${cur_tx:-}" = "$queues" ]; then
            skip "queue count: already $queues RX and TX channels"
        else
            change "queue count: $queues RX and TX channels" "channels_are RX $queues" \
                ethtool -L "$iface" rx "$queues" tx "$queues"
        fi
    else
        refused+=("queue count: the driver reports no settable channel count")
        say "refused: queue count: the driver reports no settable channel count"
    fi
fi

# --- 2. RSS on addresses only ------------------------------------------------
for proto in udp4 udp6; do
    if rss_is_sd "$proto"; then
        skip "RSS $proto: already hashed on source and destination addresses only"
    else
        change "RSS $proto: hash on source and destination addresses only" "rss_is_sd $proto" \
            ethtool -N "$iface" rx-flow-hash "$proto" sd
    fi
done

# --- 3. ring sizes -------------------------------------------------------------
if ! rings=$(ethtool -g "$iface" 2>&1); then
    refused+=("ring sizes: the driver does not report its rings ($(echo "$rings" | tail -1))")
    say "refused: ring sizes: the driver does not report its rings"
else
    max_rx=$(field max RX <<< "$rings")
    max_tx=$(field max TX <<< "$rings")
    cur_rx=$(field cur RX <<< "$rings")
    cur_tx=$(field cur TX <<< "$rings")
    args=()
    want_rx=""
    for dir in rx tx; do
        max_var="max_$dir"
        cur_var="cur_$dir"
        max=${!max_var:-}
        cur=${!cur_var:-}
        is_uint "$max" || continue
        want=${ring:-$(( max < 4096 ? max : 4096 ))}
        [ "$want" -gt "$max" ] && want=$max
        [ "$dir" = rx ] && want_rx=$want
        [ "$cur" = "$want" ] || args+=("$dir" "$want")
    done
    if [ ${#args[@]} -eq 0 ]; then
        skip "ring sizes: already as wanted (RX ${cur_rx:-?}, TX ${cur_tx:-?})"
    else
        check="true"
        [ -n "$want_rx" ] && check="ring_is RX $want_rx"
        change "ring sizes: ${args[*]}" "$check" ethtool -G "$iface" "${args[@]}"
    fi
fi

# --- 4. GRO and LRO off ----------------------------------------------------------
features=$(ethtool -k "$iface" 2>/dev/null || true)
for f in gro:generic-receive-offload lro:large-receive-offload; do
    short=${f%%:*}
    long=${f#*:}
    line=$(grep "^$long:" <<< "$features" || true)
    if [ -z "$line" ]; then
        skip "$short: not reported by the driver"
    elif grep -q ": off" <<< "$line"; then
        skip "$short: already off"
    elif grep -q "\[fixed\]" <<< "$line"; then
        refused+=("$short off: fixed on by the driver")
        say "refused: $short off: fixed on by the driver"
    else
        change "$short off" "feature_off $long" ethtool -K "$iface" "$short" off
    fi
done

# --- 5. IRQ affinity -----------------------------------------------------------------
if [ ${#core_list[@]} -eq 0 ]; then
    skip "IRQ affinity: no --cores given; left alone"
else
    # The interface's queue IRQs from /proc/interrupts: names such as
    # enp1s0f0-TxRx-3, enp1s0f0-rx-3 (and -tx-3), iavf-enp1s0f0-TxRx-3; the
    # number at the end is the queue, and queue q goes to core q of the list.
    # Drivers that name their IRQs otherwise (mlx5_comp3@pci:...): the
    # device's MSI IRQs in order, which may include a control IRQ first.
    pairs=$(awk -v dev="$iface" '
        { name = $NF }
        index(name, dev "-") == 1 || index(name, "-" dev "-") > 0 {
            irq = $1; sub(":", "", irq); q = name; sub(/.*[^0-9]/, "", q)
            if (q != "") print q, irq
        }
    ' "$interrupts" | sort -n -k1,1 -k2,2)
    source="$interrupts"
    if [ -z "$pairs" ] && [ -d "/sys/class/net/$iface/device/msi_irqs" ]; then
        pairs=$(find "/sys/class/net/$iface/device/msi_irqs" -mindepth 1 -maxdepth 1 -printf '%f\n' |
            sort -n | awk '{ print NR - 1, $1 }')
        source="the device's MSI IRQs in order (check /proc/interrupts)"
    fi
    if [ -z "$pairs" ]; then
        skip "IRQ affinity: $iface has no IRQs of its own (a virtual device?)"
    else
        if pgrep -x irqbalance >/dev/null 2>&1; then
            say "warning: irqbalance is running and may move these IRQs again; stop it, or ban the worker cores (IRQBALANCE_BANNED_CPULIST=$cores in /etc/default/irqbalance)"
        fi
        while read -r q irq; do
            core=${core_list[$(( q % ${#core_list[@]} ))]}
            file="/proc/irq/$irq/smp_affinity_list"
            write_file "IRQ $irq (queue $q, from $source) on core $core" "$core" "$file"
        done <<< "$pairs"
    fi
fi

# --- 6. sysctls (only raised) --------------------------------------------------------
raise_sysctl() {
    local key=$1 want=$2 file
    file="/proc/sys/${key//.//}"
    if [ ! -e "$file" ]; then
        skip "$key: not available here (a network namespace shows only some net.core keys)"
        return
    fi
    local cur
    cur=$(cat "$file")
    if is_uint "$cur" && [ "$cur" -ge "$want" ]; then
        skip "$key: already $cur (>= $want)"
    else
        change "$key = $want (was $cur)" "sysctl_at_least $key $want" sysctl -q -w "$key=$want"
    fi
}
raise_sysctl net.core.rmem_max 4194304
raise_sysctl net.core.wmem_max 1048576
raise_sysctl net.core.netdev_max_backlog 16384
if [ -n "$busy_poll" ]; then
    raise_sysctl net.core.busy_poll "$busy_poll"
    raise_sysctl net.core.busy_read "$busy_poll"
fi

# --- summary --------------------------------------------------------------------------
if [ "$dry_run" -eq 1 ]; then
    say "summary (dry run): ${#applied[@]} to change, ${#skipped[@]} already so or not applicable, ${#refused[@]} refused"
else
    say "summary: ${#applied[@]} applied, ${#skipped[@]} already so or not applicable, ${#refused[@]} refused"
fi
for r in "${refused[@]}"; do
    say "  refused: $r"
done
[ ${#refused[@]} -eq 0 ] || exit 3
exit 0
