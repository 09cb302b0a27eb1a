#!/bin/bash
# End-to-end, side by side: chimed (XDP backend), chimed (socket backend) and
# chronyd (Debian's package) answering chime-load on the netns test bed, one
# after another with the same generator settings and CPU pinning.
#
#   sudo bench/e2e/run.sh [--quick] [--xdp-gen] [--out DIR]
#
# Writes DIR/results.json and DIR/results.md (default bench/e2e/out/) and
# prints the table. Needs root, iproute2, chrony and python3 (for the table).
# Traffic stays inside the two namespaces the script makes (198.18.0.0/30,
# fdc4:1e::/64); the bed is removed at exit, also on failure.
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
while [ $# -gt 0 ]; do
    case $1 in
        --quick) QUICK=1 ;;
        --xdp-gen) XDP_GEN=1 ;;
        --out) OUT=$2; shift ;;
        *) echo "usage: $0 [--quick] [--xdp-gen] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
done
[ "$(id -u)" -eq 0 ] || { echo "$0: needs root (network namespaces, XDP)" >&2; exit 2; }
command -v chronyd >/dev/null || { echo "$0: chronyd missing (scripts/deps.sh installs it)" >&2; exit 2; }
command -v python3 >/dev/null || { echo "$0: python3 missing" >&2; exit 2; }

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

cat >"$WORK/chimed.toml" <<CFG
# One client address sends everything: rate limiting off for the benchmark.
[server]
cores = [1]
[rate_limit]
enabled = false
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
CFG

# Server CPU seconds (user + system, all threads) of PID.
cpu_secs() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"; }

start_server() { # name
    case $1 in
        chimed-xdp) ip netns exec "$SRV" "$CHIMED" -c "$WORK/chimed.toml" --backend xdp --interface "$DEV" \
                        --local-stratum 10 --no-metrics --log-level warn &
                    ;;
        chimed-socket) ip netns exec "$SRV" taskset -c 1 "$CHIMED" -c "$WORK/chimed.toml" --backend socket \
                        --workers 1 --local-stratum 10 --no-metrics --log-level warn &
                    ;;
        chronyd) ip netns exec "$SRV" taskset -c 1 chronyd -d -x -u root -f "$WORK/chrony.conf" \
                        >"$WORK/chronyd.log" 2>&1 &
                    ;;
        xdp-drop) ip netns exec "$SRV" "$CHIMED" -c "$WORK/chimed-drop.toml" --backend xdp --interface "$DEV" \
                        --local-stratum 10 --no-metrics --log-level warn &
                    ;;
    esac
    SERVER_PID=$!
    sleep 1.5
    # `ip netns exec` execs the server, so the PID is the server's.
}

stop_server() {
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
    sleep 0.5
}

run_target() { # name
    local name=$1
    start_server "$name"
    local cpu0; cpu0=$(cpu_secs "$SERVER_PID")
    ip netns exec "$CLI" taskset -c 0 "$LOAD" 198.18.0.1 --ramp --rate $START_RATE --ramp-factor 1.25 \
        --step-secs $STEP --max-steps $STEPS --threads $THREADS "${GEN[@]}" --no-progress \
        --json "$OUT/$name.json" --plot "$OUT/$name.svg" >"$OUT/$name.txt" 2>&1 || true
    local cpu1; cpu1=$(cpu_secs "$SERVER_PID")
    echo "$cpu0 $cpu1" >"$OUT/$name.cpu"
    stop_server
    echo "done: $name ($(grep -m1 'highest rate' "$OUT/$name.txt" || echo 'no result'))"
}

# The generator's own ceiling: every request dropped in XDP, so the only
# limit on "sent" is the generator (and the kernel path to the veth).
start_server xdp-drop
ip netns exec "$CLI" taskset -c 0 "$LOAD" 198.18.0.1 --rate 4000000 --duration 3 --threads $THREADS \
    "${GEN[@]}" --no-progress --send-only --json "$OUT/generator.json" >"$OUT/generator.txt" 2>&1 || true
stop_server

for t in chimed-xdp chimed-socket chronyd; do run_target "$t"; done

python3 - "$OUT" "$GEN_NAME" <<'PY'
import json, os, sys
out, gen_name = sys.argv[1], sys.argv[2]
def load(name):
    try:
        return json.load(open(os.path.join(out, name + ".json")))
    except Exception:
        return None
gen = load("generator")
gen_rate = gen["steps"][-1]["sent_rate"] if gen and gen.get("steps") else None
rows = []
for name in ["chimed-xdp", "chimed-socket", "chronyd"]:
    d = load(name)
    if not d or not d.get("steps"):
        rows.append({"target": name, "error": "no result"}); continue
    steps = d["steps"]
    ok = [s for s in steps if s["loss"] < d["loss_threshold"]]
    best = max(ok, key=lambda s: s["offered_rate"]) if ok else None
    peak = max(s["answered_rate"] for s in steps)
    c0, c1 = map(float, open(os.path.join(out, name + ".cpu")).read().split())
    replies = sum(s["valid"] for s in steps)
    rows.append({
        "target": name,
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
ref = next((r for r in rows if r["target"] == "chronyd" and "error" not in r), None)
for r in rows:
    if ref and "error" not in r and ref["highest_rate_below_1pct_loss"]:
        r["x_chronyd"] = round(r["highest_rate_below_1pct_loss"] / ref["highest_rate_below_1pct_loss"], 2)
result = {"generator": gen_name, "generator_max_sent_per_s": round(gen_rate) if gen_rate else None,
          "kind": "plain", "rows": rows}
json.dump(result, open(os.path.join(out, "results.json"), "w"), indent=1)
cols = ["target", "highest_rate_below_1pct_loss", "x_chronyd", "peak_replies_per_s", "rtt_p50_us", "rtt_p99_us",
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
