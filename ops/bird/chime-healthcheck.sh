#!/bin/sh
# Anycast health check for chimed: announce the service prefix through BIRD
# only while `chimed status` says the server is synchronized and serving.
#
#   chime-healthcheck.sh [--once] [--interval SECS] [--protocol NAME]...
#
# Every SECS seconds (default 5) it runs `chimed status` (exit 0: healthy;
# 1: unsynchronized or not serving; 2: unreachable). After FAIL_AFTER
# consecutive failures (default 2) it disables the BIRD protocols that
# announce the service addresses (default "chime_anycast chime_anycast6",
# see bird.conf; --protocol, repeated, names others);
# after RISE_AFTER consecutive successes (default 3) it enables it again.
# Transitions are logged to stderr (the journal under systemd). --once
# runs one check and acts at once (for tests and cron).
#
# Environment: CHIMED (default chimed), CHIMED_ARGS (e.g. "-c
# /etc/chime/chimed.toml"), BIRDC (default birdc), FAIL_AFTER, RISE_AFTER.
set -u

CHIMED=${CHIMED:-chimed}
CHIMED_ARGS=${CHIMED_ARGS:-}
BIRDC=${BIRDC:-birdc}
FAIL_AFTER=${FAIL_AFTER:-2}
RISE_AFTER=${RISE_AFTER:-3}
INTERVAL=5
PROTOCOLS=""
ONCE=0

while [ $# -gt 0 ]; do
    case $1 in
        --once) ONCE=1 ;;
        --interval) INTERVAL=$2; shift ;;
        --protocol) PROTOCOLS="$PROTOCOLS $2"; shift ;;
        *) echo "usage: $0 [--once] [--interval SECS] [--protocol NAME]..." >&2; exit 2 ;;
    esac
    shift
done
[ -n "$PROTOCOLS" ] || PROTOCOLS="chime_anycast chime_anycast6"

state=unknown   # announced | withdrawn | unknown
fails=0
oks=0

set_route() { # enable|disable
    ok=0
    for p in $PROTOCOLS; do
        # shellcheck disable=SC2086
        if $BIRDC $1 "$p" >/dev/null; then
            echo "chime-healthcheck: $1d BIRD protocol $p" >&2
        else
            echo "chime-healthcheck: birdc $1 $p failed" >&2
            ok=1
        fi
    done
    return $ok
}

check() {
    # shellcheck disable=SC2086
    $CHIMED $CHIMED_ARGS status >/dev/null 2>&1
    code=$?
    if [ "$code" -eq 0 ]; then
        oks=$((oks + 1)); fails=0
        if [ "$state" != announced ] && { [ "$ONCE" -eq 1 ] || [ "$oks" -ge "$RISE_AFTER" ]; }; then
            set_route enable && state=announced
        fi
    else
        fails=$((fails + 1)); oks=0
        if [ "$state" != withdrawn ] && { [ "$ONCE" -eq 1 ] || [ "$fails" -ge "$FAIL_AFTER" ]; }; then
            echo "chime-healthcheck: chimed status exited $code" >&2
            set_route disable && state=withdrawn
        fi
    fi
}

if [ "$ONCE" -eq 1 ]; then
    check
    [ "$state" = announced ]
    exit $?
fi
while :; do
    check
    sleep "$INTERVAL"
done
