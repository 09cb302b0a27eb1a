#!/bin/bash
# End-to-end, side by side: chimed (XDP backend), chimed (socket backend) and
# chronyd (Debian's package) answering chime-load on the netns test bed, one
# after another with the same generator settings and CPU pinning.
#
#   sudo bench/e2e/run.sh [--quick] [--xdp-gen] [--out DIR] [--kinds "plain nts"]
#                         [--targets "chimed-xdp chimed-socket chronyd ntpsec"]
#
# Targets: chimed-xdp, chimed-socket, chronyd (Debian's package) and
# ntpsec (NTPsec's ntpd, in orphan mode at stratum 10 with its clock
# discipline off; Debian's ntpsec package conflicts with chrony, so when no
# ntpsec ntpd is installed the script downloads the package with
# `apt-get download` and runs ntpd from it unpacked in a temporary
# directory; without it the ntpsec rows say so).
#
# Generator: 64 UDP sockets from the client address, or with --xdp-gen
# chime-load's AF_XDP transport with clients drawn from 198.19.0.0/16
# (the server namespace gets a route back to it for the kernel-stack
# servers).
#
# Writes DIR/results.json and DIR/results.md (default bench/e2e/out/) and
# prints the table. Needs root, iproute2, chrony and python3 (for the table).
# Traffic stays inside the two namespaces the script makes (198.18.0.0/30,
# fdc4:1e::/64); the bed is removed at exit, also on failure.
#
# Kinds: plain NTP, and NTS (chime-load runs NTS-KE first, then sends
# authenticated requests, each with a cookie from its pool, and verifies
# every reply; chimed and chronyd serve NTS-KE on 198.18.0.1:4460 with a
# certificate from a throwaway CA made here).
#
# Method (ntpperf's): chime-load ramps the offered rate by 1.25x per step
# until loss reaches 1 %; the highest rate below it is the server's figure.
# The server runs on CPU 1, the generator on CPU 0. A first run against a
# target that drops every request in XDP (chimed with the client prefix on
# its kernel deny list) checks that the generator itself sustains the rates
# it offers; the table says how far it got.
#
# --xdp-gen: chime-load sends over AF_XDP from the client veth (raw frames
# from the 65,534 addresses of 198.19.0.0/16, one client each) instead of 64
# UDP sockets; the server namespace gets a route back to that prefix via
# the client's address for the kernel-stack servers (chimed's socket
# backend, chronyd; chimed's XDP backend needs none).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

QUICK=0
XDP_GEN=0
OUT=$ROOT/bench/e2e/out
KINDS="plain nts"
TARGETS="chimed-xdp chimed-socket chronyd ntpsec"
while [ $# -gt 0 ]; do
    case $1 in
        --quick) QUICK=1 ;;
        --xdp-gen) XDP_GEN=1 ;;
        --out) OUT=$2; shift ;;
        --kinds) KINDS=$2; shift ;;
        --targets) TARGETS=$2; shift ;;
        *) echo "usage: $0 [--quick] [--xdp-gen] [--out DIR] [--kinds \"plain nts\"] [--targets \"...\"]" >&2; exit 2 ;;
    esac
    shift
done
[ "$(id -u)" -eq 0 ] || { echo "$0: needs root (network namespaces, XDP)" >&2; exit 2; }
command -v chronyd >/dev/null || { echo "$0: chronyd missing (scripts/deps.sh installs it)" >&2; exit 2; }
command -v python3 >/dev/null || { echo "$0: python3 missing" >&2; exit 2; }
command -v openssl >/dev/null || { echo "$0: openssl missing" >&2; exit 2; }

if [ $QUICK -eq 1 ]; then STEP=1; STEPS=10; else STEP=3; STEPS=24; fi
START_RATE=20000
THREADS=1
CLIENTS=64

cargo build --release --locked -q -p chime-server --bin chimed -p chime-loadgen --bin chime-load
CHIMED=${CARGO_TARGET_DIR:-$ROOT/target}/release/chimed
LOAD=${CARGO_TARGET_DIR:-$ROOT/target}/release/chime-load

BED=e2e$$
mkdir -p "$OUT"
WORK=$(mktemp -d)
SERVER_PID=""
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
    sleep 0.3
    # ntpd leaves the kernel clock marked synchronized; put back what was.
    [ -f "$WORK/kernel-clock.json" ] && python3 "$ROOT/bench/e2e/kernel-clock.py" restore "$WORK/kernel-clock.json"
    "$ROOT/ops/testbed/testbed.sh" down "$BED" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
"$ROOT/ops/testbed/testbed.sh" up "$BED" >/dev/null
SRV=$BED-srv CLI=$BED-cli DEV=$BED-s CDEV=$BED-c

# The generator's transport: 64 UDP sockets, or AF_XDP from a prefix.
GEN_PREFIX=198.19.0.0/16
if [ $XDP_GEN -eq 1 ]; then
    GEN=(--xdp "$CDEV" --src-prefix "$GEN_PREFIX")
    GEN_NAME="xdp"
    ip -n "$SRV" route add "$GEN_PREFIX" via 198.18.0.2
else
    GEN=(--clients "$CLIENTS")
    GEN_NAME="udp"
fi
# On a veth pair the receiving side's stack runs in the softirq of the CPU
# that transmitted, so the server's receive path would be paid by the
# generator's core and the generator's by the server's. RPS on each end
# sends each side's receive processing to its own CPU, as a NIC's
# interrupts would: server side on CPU 1, generator side on CPU 0. (chimed's
# XDP program on veth runs in the transmitting CPU's NAPI before RPS, so
# with the native driver mode its XDP step stays on the generator's core;
# XDP_MODE=generic moves it behind RPS too.)
XDP_MODE=${XDP_MODE:-native}
ip netns exec "$SRV" sh -c "for q in /sys/class/net/$DEV/queues/rx-*; do echo 2 >\$q/rps_cpus; done"
ip netns exec "$CLI" sh -c "for q in /sys/class/net/$BED-c/queues/rx-*; do echo 1 >\$q/rps_cpus; done"

# A throwaway CA and a certificate for the server's address, for NTS-KE.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=chime-bench-ca \
    -keyout "$WORK/ca.key" -out "$WORK/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=198.18.0.1 \
    -keyout "$WORK/server.key" -out "$WORK/server.csr" 2>/dev/null
printf 'subjectAltName=IP:198.18.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$WORK/ext.cnf"
openssl x509 -req -in "$WORK/server.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" -CAcreateserial -days 2 \
    -extfile "$WORK/ext.cnf" -out "$WORK/server.pem" 2>/dev/null
chmod 600 "$WORK/server.key"

cat >"$WORK/chimed.toml" <<CFG
# One client address sends everything: rate limiting off for the benchmark.
[server]
cores = [1]
[rate_limit]
enabled = false
[nts]
enabled = true
tls_cert = "$WORK/server.pem"
tls_key = "$WORK/server.key"
listen = ["198.18.0.1:4460"]
key_file = "$WORK/nts-keys"
CFG
cat >"$WORK/chimed-drop.toml" <<CFG
[server]
cores = [1]
[rate_limit]
enabled = false
[access]
deny = ["198.18.0.0/30", "198.19.0.0/16"]
deny_response = "silent"
CFG
cat >"$WORK/chrony.conf" <<CFG
# chronyd as a plain NTP server on the bed: serves its own clock at
# stratum 10, never touches the host clock (-x), no rate limiting (the default).
local stratum 10
allow all
port 123
cmdport 0
pidfile $WORK/chronyd.pid
driftfile $WORK/chrony.drift
# NTS: NTS-KE on 4460, one helper process for the handshakes.
ntsservercert $WORK/server.pem
ntsserverkey $WORK/server.key
ntsprocesses 1
ntsdumpdir $WORK
CFG

cat >"$WORK/ntpsec.conf" <<CFG
# NTPsec as a server on the bed: no upstream, orphan mode makes it serve its
# own clock at stratum 10 after 1 s; "disable ntp" and "disable kernel"
# keep it from adjusting the host clock (it still marks the kernel clock
# synchronized at start: kernel-clock.py saves and restores that state); no rate limiting: the generator's prefix gets a restrict
# entry of its own with no flags (under "restrict default" alone this ntpd
# stops answering a source after ~20 requests) and the discard limits are
# zero.
tos orphan 10 orphanwait 1
disable ntp
disable kernel
restrict default
restrict 198.18.0.0 mask 255.254.0.0
discard average 0 minimum 0
driftfile $WORK/ntpsec.drift
statsdir $WORK/
nts enable
nts cert $WORK/server.pem
nts key $WORK/server.key
nts cookie $WORK/ntpsec-cookies
CFG
# NTPsec's ntpd: installed, or unpacked from the downloaded package.
NTPSEC=""
if command -v ntpd >/dev/null && ntpd --version 2>/dev/null | grep -q ntpsec; then
    NTPSEC=$(command -v ntpd)
elif [[ " $TARGETS " == *" ntpsec "* ]]; then
    if (cd "$WORK" && apt-get download ntpsec >/dev/null 2>&1) && dpkg-deb -x "$WORK"/ntpsec_*.deb "$WORK/ntpsec-root"; then
        NTPSEC=$WORK/ntpsec-root/usr/sbin/ntpd
    else
        echo "ntpsec: cannot download the package (apt-get download ntpsec); its rows are skipped" >&2
    fi
fi

# Server CPU seconds (user + system, all threads) of PID.
cpu_secs() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"; }

start_server() { # name
    case $1 in
        chimed-xdp) ip netns exec "$SRV" "$CHIMED" -c "$WORK/chimed.toml" --backend xdp --interface "$DEV" \
                        --xdp-mode "$XDP_MODE" --local-stratum 10 --no-metrics --log-level warn &
                    ;;
        chimed-socket) ip netns exec "$SRV" taskset -c 1 "$CHIMED" -c "$WORK/chimed.toml" --backend socket \
                        --workers 1 --local-stratum 10 --no-metrics --log-level warn &
                    ;;
        chronyd) ip netns exec "$SRV" taskset -c 1 chronyd -d -x -u root -f "$WORK/chrony.conf" \
                        >"$WORK/chronyd.log" 2>&1 &
                    ;;
        ntpsec) python3 "$ROOT/bench/e2e/kernel-clock.py" save "$WORK/kernel-clock.json"
                ip netns exec "$SRV" taskset -c 1 "$NTPSEC" -n -c "$WORK/ntpsec.conf" -l "$WORK/ntpsec.log" \
                        >/dev/null 2>&1 &
                    ;;
        xdp-drop) ip netns exec "$SRV" "$CHIMED" -c "$WORK/chimed-drop.toml" --backend xdp --interface "$DEV" \
                        --xdp-mode generic --local-stratum 10 --no-metrics --log-level warn &
                    ;;
    esac
    SERVER_PID=$!
    sleep 1.5
    # ntpd serves only once orphan mode starts (orphanwait 1 s after start).
    if [ "$1" = ntpsec ]; then sleep 3; fi
    # `ip netns exec` execs the server, so the PID is the server's.
}

stop_server() {
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
    sleep 0.5
    if [ -f "$WORK/kernel-clock.json" ]; then
        python3 "$ROOT/bench/e2e/kernel-clock.py" restore "$WORK/kernel-clock.json"
        rm -f "$WORK/kernel-clock.json"
    fi
}

run_target() { # server kind
    local name=$1-$2 kind_args=()
    if [ "$1" = ntpsec ] && [ -z "$NTPSEC" ]; then
        echo "skipped: $name (no ntpsec ntpd)"; return
    fi
    [ "$2" = nts ] && kind_args=(--nts --ca "$WORK/ca.pem")
    start_server "$1"
    local cpu0; cpu0=$(cpu_secs "$SERVER_PID")
    ip netns exec "$CLI" taskset -c 0 "$LOAD" 198.18.0.1 --ramp --rate $START_RATE --ramp-factor 1.25 \
        --step-secs $STEP --max-steps $STEPS --threads $THREADS "${GEN[@]}" --no-progress \
        "${kind_args[@]}" --json "$OUT/$name.json" --plot "$OUT/$name.svg" >"$OUT/$name.txt" 2>&1 || true
    local cpu1; cpu1=$(cpu_secs "$SERVER_PID")
    echo "$cpu0 $cpu1" >"$OUT/$name.cpu"
    stop_server
    echo "done: $name ($(grep -m1 'highest rate' "$OUT/$name.txt" || echo 'no result'))"
}

# The generator's own ceiling: every request dropped in XDP, so the only
# limit on "sent" is the generator (and the kernel path to the veth). The
# program is attached generic, so with RPS its drops run on CPU 1, not on
# the generator's core.
start_server xdp-drop
ip netns exec "$CLI" taskset -c 0 "$LOAD" 198.18.0.1 --rate 4000000 --duration 3 --threads $THREADS \
    "${GEN[@]}" --no-progress --send-only --json "$OUT/generator.json" >"$OUT/generator.txt" 2>&1 || true
stop_server

for k in $KINDS; do
    for t in $TARGETS; do run_target "$t" "$k"; done
done

python3 - "$OUT" "$GEN_NAME" "$KINDS" "$TARGETS" <<'PY'
import json, os, sys
out, gen_name, kinds, targets = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4].split()
def load(name):
    try:
        return json.load(open(os.path.join(out, name + ".json")))
    except Exception:
        return None
gen = load("generator")
gen_rate = gen["steps"][-1]["sent_rate"] if gen and gen.get("steps") else None
rows = []
for kind, target in [(k, t) for k in kinds for t in targets]:
    name = f"{target}-{kind}"
    d = load(name)
    if not d or not d.get("steps"):
        rows.append({"target": target, "kind": kind, "error": "no result"}); continue
    steps = d["steps"]
    ok = [s for s in steps if s["loss"] < d["loss_threshold"]]
    best = max(ok, key=lambda s: s["offered_rate"]) if ok else None
    peak = max(s["answered_rate"] for s in steps)
    c0, c1 = map(float, open(os.path.join(out, name + ".cpu")).read().split())
    replies = sum(s["valid"] for s in steps)
    rows.append({
        "target": target,
        "kind": kind,
        "highest_rate_below_1pct_loss": round(d["highest_rate_below_threshold"] or 0),
        "peak_replies_per_s": round(peak),
        "rtt_p50_us": best["rtt"]["p50_us"] if best else None,
        "rtt_p99_us": best["rtt"]["p99_us"] if best else None,
        "residence_p50_us": best["residence"]["p50_us"] if best else None,
        "residence_p99_us": best["residence"]["p99_us"] if best else None,
        "server_cpu_s_per_million_replies": round((c1 - c0) / replies * 1e6, 3) if replies else None,
        "generator_limited_steps": sum(1 for s in steps if s["generator_limited"]),
        "stop_reason": d.get("stop_reason"),
    })
for r in rows:
    ref = next((x for x in rows if x["target"] == "chronyd" and x["kind"] == r["kind"] and "error" not in x), None)
    if ref and "error" not in r and ref["highest_rate_below_1pct_loss"]:
        r["x_chronyd"] = round(r["highest_rate_below_1pct_loss"] / ref["highest_rate_below_1pct_loss"], 2)
result = {"generator": gen_name, "generator_max_sent_per_s": round(gen_rate) if gen_rate else None, "rows": rows}
json.dump(result, open(os.path.join(out, "results.json"), "w"), indent=1)
cols = ["target", "kind", "highest_rate_below_1pct_loss", "x_chronyd", "peak_replies_per_s", "rtt_p50_us", "rtt_p99_us",
        "residence_p50_us", "residence_p99_us", "server_cpu_s_per_million_replies", "generator_limited_steps"]
lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
for r in rows:
    lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
gen_desc = "AF_XDP, 65,534 client addresses" if gen_name == "xdp" else "UDP, 64 sockets"
gen_line = f"Generator ({gen_desc}) check: {gen_rate:.0f} requests/s sent against a target that drops " \
    "everything in XDP." if gen_rate else f"Generator ({gen_desc}) check: no result."
md = "\n".join(lines) + "\n\n" + gen_line + "\n"
open(os.path.join(out, "results.md"), "w").write(md)
print(md)
PY
