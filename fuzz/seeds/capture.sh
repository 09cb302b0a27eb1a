#!/bin/bash
# Captures fuzz seeds from real clients, on loopback only, inside a network
# namespace of its own (removed on exit), into fuzz/seeds/<target>/.
#
#   - chimed (socket backend, NTS on) with the committed test key ring
#     fuzz/harness/data/nts-keys, so every cookie it hands out opens with
#     the key ring the fuzz harness uses;
#   - a UDP relay (recorder.py) in front of chimed's NTP port records every
#     request and reply: chrony `chronyd -Q` (plain and as an NTS client),
#     ntpsec's `ntpdate -q`, and chime-load (plain, interleaved, NTS);
#   - a TLS server with ALPN ntske/1 (recorder.py) records the NTS-KE
#     requests of chrony and chime-load in plaintext;
#   - the other targets get their seeds from files: chimed configurations
#     (ops/), leap-seconds files, cookies cut out of the captured NTS
#     requests, and the key ring file.
#
# Needs root (ip netns), chrony, ntpsec-ntpdate, openssl, python3, and
# cargo to build chimed and chime-load. Usage: fuzz/seeds/capture.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SEEDS="$ROOT/fuzz/seeds"
NTP_PORT=12300     # chimed
RELAY_PORT=12301   # recorder in front of chimed; chimed's NTS-KE sends clients here
KE_PORT=14460      # chimed's NTS-KE
KE_REC_PORT=14461  # recorder of NTS-KE requests

if [ "${1:-}" != "--inside" ]; then
    [ "$(id -u)" = 0 ] || { echo "capture.sh: needs root (network namespace)" >&2; exit 1; }
    cargo build -q --bin chimed --bin chime-load --manifest-path "$ROOT/Cargo.toml"
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug"
    NS="chime-fuzz-seeds-$$"
    ip netns add "$NS"
    trap 'ip netns del "$NS"' EXIT
    ip netns exec "$NS" ip link set lo up
    ip netns exec "$NS" "$0" --inside "$BIN"
    exit 0
fi

BIN=$2
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
wait_bound() { # PROTO(u|t) PORT: until something listens there (5 s at most)
    for _ in $(seq 50); do
        [ -n "$(ss -Hl"$1"n "sport = :$2")" ] && return 0
        sleep 0.1
    done
    echo "capture.sh: nothing listens on $2" >&2
}

for t in ntp_packet responder_plain responder_nts nts_ke cookie config leap; do
    rm -rf "${SEEDS:?}/$t"
    mkdir -p "$SEEDS/$t"
done

# A CA and a certificate for 127.0.0.1 signed by it.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj /CN=chime-fuzz-ca \
    -keyout "$WORK/ca.key" -out "$WORK/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
    -keyout "$WORK/key.pem" -out "$WORK/req.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > "$WORK/ext"
openssl x509 -req -in "$WORK/req.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" -CAcreateserial -days 30 \
    -extfile "$WORK/ext" -out "$WORK/leaf.pem" 2>/dev/null
cat "$WORK/leaf.pem" "$WORK/ca.pem" > "$WORK/cert.pem"
chmod 600 "$WORK/key.pem"
install -m 600 "$ROOT/fuzz/harness/data/nts-keys" "$WORK/nts-keys"

cat > "$WORK/chimed.toml" <<EOF
[server]
backend = "socket"
listen = ["127.0.0.1:$NTP_PORT"]
workers = 1
user = "root"

[nts]
enabled = true
tls_cert = "$WORK/cert.pem"
tls_key = "$WORK/key.pem"
listen = ["127.0.0.1:$KE_PORT"]
key_file = "$WORK/nts-keys"
keep_keys = 1
ntp_server = "127.0.0.1"
ntp_port = $RELAY_PORT

[metrics]
listen = "127.0.0.1:19123"
EOF
"$BIN/chimed" -c "$WORK/chimed.toml" > "$WORK/chimed.log" 2>&1 &
PIDS+=($!)
wait_bound t $KE_PORT
wait_bound u $NTP_PORT

REC="python3 $SEEDS/recorder.py"
relay() { # PREFIX SECONDS: records requests into responder_plain or _nts, replies into ntp_packet
    $REC udp $RELAY_PORT $NTP_PORT "$WORK/req/$1" "$SEEDS/ntp_packet" "$1" "$2" &
    PIDS+=($!)
    wait_bound u $RELAY_PORT
}
stop_relay() { kill "${PIDS[-1]}" 2>/dev/null || true; wait "${PIDS[-1]}" 2>/dev/null || true; unset 'PIDS[-1]'; }
chrony_conf() { # FILE SERVER-LINE
    printf 'pidfile %s/chronyd.pid\ncmdport 0\n%s\n' "$WORK" "$2" > "$1"
    if [ -n "${3:-}" ]; then printf '%s\n' "$3" >> "$1"; fi
}

# chrony, plain.
relay chrony 12
chrony_conf "$WORK/chrony.conf" "server 127.0.0.1 port $RELAY_PORT iburst minpoll -2 maxpoll -2 maxsamples 6"
timeout 10 chronyd -u root -Q -f "$WORK/chrony.conf" -t 8 > "$WORK/chrony.log" 2>&1 || true
stop_relay

# chrony with interleaved mode (xleave).
relay chrony-xleave 8
chrony_conf "$WORK/chrony.conf" "server 127.0.0.1 port $RELAY_PORT iburst xleave minpoll -2 maxpoll -2 maxsamples 6"
timeout 7 chronyd -u root -Q -f "$WORK/chrony.conf" -t 6 >> "$WORK/chrony.log" 2>&1 || true
stop_relay

# ntpsec's ntpdate (ntpdig) knows no port option: the relay takes port 123
# of this namespace's loopback for it.
$REC udp 123 $NTP_PORT "$WORK/req/ntpdate" "$SEEDS/ntp_packet" ntpdate 6 &
PIDS+=($!)
wait_bound u 123
timeout 6 ntpdate -q 127.0.0.1 > "$WORK/ntpdate.log" 2>&1 || true
stop_relay

# chrony as an NTS client: NTS-KE to chimed, then NTP through the relay.
relay chrony-nts 14
chrony_conf "$WORK/chrony.conf" \
    "server 127.0.0.1 port $RELAY_PORT nts ntsport $KE_PORT iburst minpoll -2 maxpoll -2 maxsamples 6" \
    "ntstrustedcerts $WORK/ca.pem"
timeout 12 chronyd -u root -Q -f "$WORK/chrony.conf" -t 10 >> "$WORK/chrony.log" 2>&1 || true
stop_relay

# chime-load: plain, interleaved and NTS requests.
for kind in plain interleaved nts; do
    relay "chime-load-$kind" 4
    timeout 6 "$BIN/chime-load" "127.0.0.1:$RELAY_PORT" --kind "$kind" --rate 4 --duration 1 --no-progress \
        --nts-ke-port $KE_PORT --ca "$WORK/ca.pem" --tls-name 127.0.0.1 > "$WORK/load-$kind.log" 2>&1 || true
    stop_relay
done

# NTS-KE requests, recorded in plaintext by a TLS server of our own.
$REC ntske $KE_REC_PORT "$WORK/cert.pem" "$WORK/key.pem" "$SEEDS/nts_ke" chrony 8 &
PIDS+=($!)
wait_bound t $KE_REC_PORT
chrony_conf "$WORK/chrony.conf" "server 127.0.0.1 port $RELAY_PORT nts ntsport $KE_REC_PORT iburst" \
    "ntstrustedcerts $WORK/ca.pem"
timeout 4 chronyd -u root -Q -f "$WORK/chrony.conf" -t 3 >> "$WORK/chrony.log" 2>&1 || true
stop_relay
$REC ntske $KE_REC_PORT "$WORK/cert.pem" "$WORK/key.pem" "$SEEDS/nts_ke" chime-load 6 &
PIDS+=($!)
wait_bound t $KE_REC_PORT
timeout 5 "$BIN/chime-load" "127.0.0.1:$RELAY_PORT" --kind nts --rate 1 --duration 1 --no-progress \
    --nts-ke-port $KE_REC_PORT --ca "$WORK/ca.pem" --tls-name 127.0.0.1 > "$WORK/load-ke.log" 2>&1 || true
stop_relay

# Sort the captured requests: NTS ones (a cookie field, 0x0204, after the
# header) to responder_nts, all to responder_plain and ntp_packet.
python3 - "$WORK/req" "$SEEDS" <<'EOF'
import os, sys, shutil
src, seeds = sys.argv[1], sys.argv[2]
def fields(data):
    at = 48
    while at + 4 <= len(data):
        ftype, flen = int.from_bytes(data[at:at+2], "big"), int.from_bytes(data[at+2:at+4], "big")
        if flen < 16 or at + flen > len(data):
            return
        yield ftype, data[at+4:at+flen]
        at += flen
for client in sorted(os.listdir(src)):
    for name in sorted(os.listdir(os.path.join(src, client))):
        path = os.path.join(src, client, name)
        data = open(path, "rb").read()
        cookies = [v for t, v in fields(data) if t == 0x0204]
        for target in ["responder_plain", "ntp_packet"] + (["responder_nts"] if cookies else []):
            shutil.copy(path, os.path.join(seeds, target, name))
        for i, c in enumerate(cookies):
            open(os.path.join(seeds, "cookie", f"{name}-cookie-{i}"), "wb").write(c)
EOF

kill "${PIDS[0]}" 2>/dev/null || true

# File seeds.
cp "$ROOT/fuzz/harness/data/nts-keys" "$SEEDS/cookie/nts-keys"
cp "$ROOT/ops/chimed.toml" "$SEEDS/config/chimed.toml"
for f in "$ROOT"/ops/examples/*.toml; do cp "$f" "$SEEDS/config/example-$(basename "$f")"; done
sed "s|$WORK|/tmp/chime-fuzz|g" "$WORK/chimed.toml" > "$SEEDS/config/capture.toml"
cp "$ROOT/proto/tests/data/leap-seconds.list" "$SEEDS/leap/proto-test-data.list"
if [ -f /usr/share/zoneinfo/leap-seconds.list ]; then
    cp /usr/share/zoneinfo/leap-seconds.list "$SEEDS/leap/zoneinfo.list"
fi

echo "--- chrony"; grep -v '^$' "$WORK/chrony.log" | grep -iv 'starting\|exiting\|privileges\|Disabled' || true
echo "--- ntpdate"; cat "$WORK/ntpdate.log" || true
echo "--- chime-load"; grep -h 'NTS\|answered\|chime-load:' "$WORK"/load-*.log || true
for t in ntp_packet responder_plain responder_nts nts_ke cookie config leap; do
    printf '%-16s %3d files\n' "$t" "$(find "$SEEDS/$t" -type f | wc -l)"
done
