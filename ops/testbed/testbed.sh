#!/bin/bash
# chime's network-namespace test bed: two namespaces joined by a veth pair
# with two RX/TX queues on each end, so per-queue XDP workers and RSS-like
# spreading can be exercised without a NIC.
#
#   testbed.sh up     [NAME]   create NAME-srv and NAME-cli (default NAME: chime)
#   testbed.sh down   [NAME]   remove them (idempotent; kills what runs inside)
#   testbed.sh status [NAME]   show namespaces, links, addresses, queues
#
#   NAME-srv: veth NAME-s, 198.18.0.1/30, fdc4:1e::1/64
#   NAME-cli: veth NAME-c, 198.18.0.2/30, fdc4:1e::2/64
#
# The addresses (benchmarking range 198.18.0.0/15, unique-local fdc4:1e::/64)
# exist only inside the two namespaces; nothing touches the host's network.
# Needs root and iproute2. See README.md for running chimed and clients.
set -euo pipefail

cmd=${1:-}
name=${2:-chime}
queues=2

if [[ ! "$name" =~ ^[A-Za-z0-9_]{1,13}$ ]]; then
    echo "testbed.sh: NAME must be 1-13 letters, digits or _ (interface names are at most 15 bytes)" >&2
    exit 2
fi

srv="$name-srv"
cli="$name-cli"
sdev="$name-s"
cdev="$name-c"

have_ns() { ip netns list | awk '{print $1}' | grep -qx "$1"; }

up() {
    if have_ns "$srv" || have_ns "$cli"; then
        echo "testbed.sh: $srv or $cli exists already; run: $0 down $name" >&2
        exit 1
    fi
    ip netns add "$srv"
    ip netns add "$cli"
    ip -n "$srv" link set lo up
    ip -n "$cli" link set lo up
    ip link add "$sdev" numtxqueues "$queues" numrxqueues "$queues" netns "$srv" type veth \
        peer name "$cdev" numtxqueues "$queues" numrxqueues "$queues" netns "$cli"
    ip -n "$srv" addr add 198.18.0.1/30 dev "$sdev"
    ip -n "$srv" addr add fdc4:1e::1/64 dev "$sdev" nodad
    ip -n "$cli" addr add 198.18.0.2/30 dev "$cdev"
    ip -n "$cli" addr add fdc4:1e::2/64 dev "$cdev" nodad
    ip -n "$srv" link set "$sdev" up
    ip -n "$cli" link set "$cdev" up
    echo "testbed $name up: $srv ($sdev 198.18.0.1 fdc4:1e::1) <-> $cli ($cdev 198.18.0.2 fdc4:1e::2)," \
        "$queues queues each way"
}

down() {
    for ns in "$srv" "$cli"; do
        if have_ns "$ns"; then
            # Processes left inside keep the namespace alive.
            for pid in $(ip netns pids "$ns" 2>/dev/null); do
                kill -KILL "$pid" 2>/dev/null || true
            done
            ip netns del "$ns"
        fi
    done
    echo "testbed $name down"
}

status() {
    local rc=0
    for ns in "$srv" "$cli"; do
        if have_ns "$ns"; then
            echo "== $ns"
            ip -n "$ns" -br addr
            ip netns exec "$ns" sh -c 'for d in /sys/class/net/*; do
                n=$(basename "$d"); [ "$n" = lo ] && continue
                echo "$n: rx queues $(ls -d "$d"/queues/rx-* | wc -l), tx queues $(ls -d "$d"/queues/tx-* | wc -l)"
                ip link show dev "$n" | grep -o "xdp[a-z]*.*prog/xdp id [0-9]*" || true
            done'
        else
            echo "== $ns: absent"
            rc=1
        fi
    done
    return $rc
}

case "$cmd" in
    up) up ;;
    down) down ;;
    status) status ;;
    *)
        echo "usage: $0 up|down|status [NAME]" >&2
        exit 2
        ;;
esac
