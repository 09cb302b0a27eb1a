#!/bin/bash
# The soak run: chimed (release, socket backend on loopback) under a steady
# load for a long time, with its memory, drops and the clients' latency
# sampled over time. Loopback only.
#
#   bench/soak/run.sh [OUTDIR]
#
# Environment (defaults in brackets):
#   SOAK_MINUTES   length of the steady run, in minutes [60]
#   SOAK_RATE      requests/s of the steady run; unset: half the maximum rate
#                  a ramp measures first (the highest rate with < 1 % loss)
#   SOAK_THREADS   chime-load threads [1]
#   SOAK_WORKERS   chimed workers [1]
#
# The steady run is chime-load in back-to-back one-minute runs (each gives
# that minute's sent/answered/loss and RTT percentiles); a sampler reads
# chimed's RSS (/proc) and its metrics every 10 s. bench/soak/report.py turns
# OUTDIR into report.md, minutes.csv, samples.csv and soak.svg.
# Rate limiting is off: every simulated client is 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-bench/soak/results/$(date -u +%Y-%m-%d)-socket}
MINUTES=${SOAK_MINUTES:-60}
THREADS=${SOAK_THREADS:-1}
WORKERS=${SOAK_WORKERS:-1}
PORT=12323
METRICS=127.0.0.1:9323
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

cargo build --release --locked -q -p chime-server --bin chimed -p chime-loadgen --bin chime-load
BIN=${CARGO_TARGET_DIR:-target}/release

cat > "$OUT/chimed.toml" <<CONF
[server]
backend = "socket"
listen = ["127.0.0.1:$PORT"]
workers = $WORKERS
seccomp = "enforce"
[upstream]
local_stratum = 10
[rate_limit]
enabled = false
[metrics]
listen = "$METRICS"
CONF

"$BIN/chimed" -c "$OUT/chimed.toml" 2> "$OUT/chimed.log" &
CHIMED=$!
SAMPLER=
cleanup() {
    [ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null || true
    kill "$CHIMED" 2>/dev/null || true
    wait "$CHIMED" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 50); do
    curl -sf "http://$METRICS/metrics" > /dev/null 2>&1 && break
    sleep 0.2
done
kill -0 "$CHIMED"

metric() { # NAME: the sum of the samples of NAME in the scrape on stdin
    awk -v n="$1" '$1 == n || index($1, n "{") == 1 { s += $NF } END { printf "%.0f", s }'
}
sample() {
    echo "unix_s,rss_kib,requests,replies,drops,kod,loadavg1" > "$OUT/samples.csv"
    while kill -0 "$CHIMED" 2>/dev/null; do
        local m rss
        m=$(curl -sf "http://$METRICS/metrics" || true)
        rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$CHIMED/status" 2>/dev/null || echo "")
        printf '%s,%s,%s,%s,%s,%s,%s\n' "$(date +%s)" "$rss" \
            "$(metric chime_requests_received_total <<< "$m")" "$(metric chime_replies_sent_total <<< "$m")" \
            "$(metric chime_drops_total <<< "$m")" "$(metric chime_kod_sent_total <<< "$m")" \
            "$(cut -d' ' -f1 /proc/loadavg)" >> "$OUT/samples.csv"
        sleep 10
    done
}

if [ -z "${SOAK_RATE:-}" ]; then
    echo "soak: measuring the maximum rate (ramp)" >&2
    "$BIN/chime-load" "127.0.0.1:$PORT" --ramp --rate 20000 --ramp-factor 1.25 --step-secs 3 \
        --threads "$THREADS" --json "$OUT/ramp.json" --no-progress > "$OUT/ramp.txt"
    SOAK_RATE=$(python3 - "$OUT/ramp.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
ok = [s["offered_rate"] for s in r["steps"] if s["loss"] < 0.01 and not s.get("generator_limited")]
print(int(max(ok) / 2) if ok else 10000)
PY
)
fi
echo "soak: $MINUTES min at $SOAK_RATE/s" >&2
echo "$SOAK_RATE" > "$OUT/rate.txt"

sample &
SAMPLER=$!
sleep 1
for i in $(seq -w 1 "$MINUTES"); do
    "$BIN/chime-load" "127.0.0.1:$PORT" --rate "$SOAK_RATE" --duration 60 --threads "$THREADS" \
        --json "$OUT/minute-$i.json" --no-progress > /dev/null 2>> "$OUT/load.log" \
        || echo "minute $i: chime-load exited $?" >> "$OUT/load.log"
done
sleep 11
python3 bench/soak/report.py "$OUT"
