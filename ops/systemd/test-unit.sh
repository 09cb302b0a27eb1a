#!/bin/bash
# Runs chimed under its systemd unit, for real, on a machine where systemd is
# not PID 1 (a container, a CI VM): boots systemd in throwaway PID, mount,
# network, UTS, IPC and cgroup namespaces, starts the unit there and checks
#
#   - Type=notify: `systemctl start` returns once chimed said READY=1, and
#     systemd shows chimed's STATUS= text;
#   - it runs as user chime with no capability left in any thread (socket
#     backend) or only CAP_NET_ADMIN in the main thread (xdp backend), and
#     answers NTP (ntpdate -q);
#   - `systemctl reload` (SIGHUP: RELOADING=1, READY=1) keeps it running;
#   - the watchdog: a stopped chimed (SIGSTOP) sends no WATCHDOG=1, so
#     systemd kills and restarts it;
#   - `systemctl stop` ends it cleanly (and detaches the XDP program).
#
# Usage: test-unit.sh [--chimed BIN] [--unit FILE] [--xdp]
#   --chimed BIN  the chimed to run (default: target/debug/chimed)
#   --unit FILE   the unit to test (default: ops/systemd/chimed.service)
#   --xdp         also run the xdp backend on a veth pair (two queues)
#
# Needs root, util-linux (unshare, nsenter), iproute2, ntpsec-ntpdate and
# systemd installed, and the hybrid cgroup layout (a name=systemd v1
# hierarchy) that the namespaced systemd is booted on; otherwise it prints
# "skipping: ..." and exits 77. Everything it makes (namespaces, the user
# chime, which exists only inside, in a private copy of /etc, cgroups,
# files) is gone when it exits, also on failure. The unit is used as it is, except for a drop-in that
# points ExecStart at BIN and a config in /run, shortens WatchdogSec to 4 s
# for the watchdog check, and sends chimed's log to a file; and, where this
# machine cannot raise RLIMIT_MEMLOCK (no CAP_SYS_RESOURCE), LimitMEMLOCK is
# left at the current limit and the xdp check uses a small UMEM.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
chimed="$repo/target/debug/chimed"
unit="$here/chimed.service"
xdp=0
while [ $# -gt 0 ]; do
    case "$1" in
        --chimed) chimed=$(realpath "$2"); shift 2 ;;
        --unit) unit=$(realpath "$2"); shift 2 ;;
        --xdp) xdp=1; shift ;;
        *) echo "usage: $0 [--chimed BIN] [--unit FILE] [--xdp]" >&2; exit 2 ;;
    esac
done

skip() { echo "skipping: $*"; exit 77; }
[ "$(id -u)" -eq 0 ] || skip "needs root (namespaces, booting systemd)"
for prog in unshare nsenter ip ntpdate; do
    command -v "$prog" >/dev/null || skip "$prog is not installed"
done
[ -x /lib/systemd/systemd ] || skip "systemd is not installed"
[ -x "$chimed" ] || { echo "no chimed at $chimed" >&2; exit 2; }
hierarchies=()
grep -q ' - cgroup cgroup rw,.*name=systemd' /proc/self/mountinfo ||
    skip "no name=systemd cgroup v1 hierarchy (only the hybrid cgroup layout is supported here)"
for h in systemd unified devices; do
    [ -f "/sys/fs/cgroup/$h/cgroup.procs" ] && hierarchies+=("$h")
done

tag="chime-ut-$$"
# Interface names: at most 15 bytes.
ifs="cu$$s"
ifc="cu$$c"
work=$(mktemp -d /var/tmp/chime-unit-test.XXXXXX)
chmod 755 "$work"
init_pid=""
unshare_pid=""
client_ns="$tag-cli"

cleanup() {
    set +e
    # Killing a PID namespace's init kills everything inside it; unshare
    # runs it with --kill-child, so killing unshare does too.
    [ -n "$init_pid" ] && kill -KILL "$init_pid" 2>/dev/null
    if [ -n "$unshare_pid" ]; then
        kill -KILL "$unshare_pid" 2>/dev/null
        for _ in $(seq 50); do
            kill -0 "$unshare_pid" 2>/dev/null || break
            sleep 0.1
        done
    fi
    ip netns del "$client_ns" 2>/dev/null
    for h in "${hierarchies[@]}"; do
        local root="/sys/fs/cgroup/$h/$tag"
        [ -d "$root" ] || continue
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            find "$root" -depth -type d -exec rmdir {} + 2>/dev/null
            [ -d "$root" ] || break
            sleep 0.2
        done
        [ -d "$root" ] && echo "warning: could not remove $root" >&2
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 143' TERM INT HUP

# --- the namespace's file system: systemd's units, chimed's config -----
mkdir -p "$work/units/chimed.service.d"
cp "$unit" "$work/units/chimed.service"
cat > "$work/units/chime-test.target" <<'EOF'
[Unit]
Description=chime unit test
DefaultDependencies=no
EOF
# Nothing to wait for in an empty network namespace.
ln -s /dev/null "$work/units/network-online.target"
memlock=""
if ! (ulimit -l unlimited) 2>/dev/null; then
    memlock="LimitMEMLOCK=$(( $(ulimit -H -l) * 1024 ))"
    echo "note: RLIMIT_MEMLOCK cannot be raised here; testing with LimitMEMLOCK=$(ulimit -H -l)K and a small UMEM"
fi
# The binary is copied to /run/chime-test inside: the checkout may live
# under /tmp, which the namespace (and the unit's PrivateTmp=) hide.
cp "$chimed" "$work/chimed"
cat > "$work/units/chimed.service.d/test.conf" <<EOF
[Unit]
DefaultDependencies=no
[Service]
ExecStartPre=
ExecStartPre=/run/chime-test/chimed --check-config /run/chime-test/chimed.toml
ExecStart=
ExecStart=/run/chime-test/chimed --config /run/chime-test/chimed.toml
ConfigurationDirectory=
StandardOutput=append:/run/chime-test/chimed.log
StandardError=inherit
WatchdogSec=4s
RestartSec=1s
$memlock
EOF

cat > "$work/inner.sh" <<EOF
#!/bin/sh
set -e
mount --make-rprivate /
mount -t proc proc /proc
for d in /run /tmp /var/lib /var/log /var/cache; do mount -t tmpfs -o mode=755 tmpfs "\$d"; done
umount -l /sys/fs/cgroup
mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup
for h in ${hierarchies[*]}; do
    mkdir "/sys/fs/cgroup/\$h"
    case "\$h" in
        systemd) mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd ;;
        unified) mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified ;;
        *) mount -t cgroup -o "\$h" cgroup "/sys/fs/cgroup/\$h" ;;
    esac
done
# A private copy of /etc with the user chime in it (unless it exists): a
# mount over the directory, since tools on the host replace /etc/passwd by
# renaming, which would bypass a mount over the file.
mkdir /run/etc
cp -a /etc/. /run/etc/
if ! grep -q '^chime:' /run/etc/passwd; then
    echo 'chime:x:990:990:chime time server:/var/lib/chime:/usr/sbin/nologin' >> /run/etc/passwd
    echo 'chime:x:990:' >> /run/etc/group
fi
mount --bind /run/etc /etc
mkdir -p /run/systemd/system /run/chime-test
cp -r "$work/units/." /run/systemd/system/
chmod 755 /run/chime-test
install -m 0755 "$work/chimed" /run/chime-test/chimed
# Last, as $work is under /var/tmp: PrivateTmp= directories stay inside.
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
exec env container=chime-test /lib/systemd/systemd --system --unit=chime-test.target --log-target=null
EOF

# --- boot ----------------------------------------------------------------
(
    for h in "${hierarchies[@]}"; do
        mkdir "/sys/fs/cgroup/$h/$tag"
        echo "$BASHPID" > "/sys/fs/cgroup/$h/$tag/cgroup.procs"
    done
    exec unshare --pid --fork --kill-child=SIGKILL --mount --net --uts --ipc --cgroup sh "$work/inner.sh"
) 2> "$work/boot.log" &
unshare_pid=$!
disown "$unshare_pid"   # no job notice when the cleanup kills it
# The namespace's init: unshare's child, in a PID namespace other than ours
# (until the subshell has become unshare, its children are mkdir and the
# like, in ours).
our_pidns=$(readlink /proc/self/ns/pid)
for _ in $(seq 300); do
    kill -0 "$unshare_pid" 2>/dev/null || skip "cannot make the namespaces: $(tr '\n' ' ' < "$work/boot.log")"
    if [ "$(cat "/proc/$unshare_pid/comm" 2>/dev/null)" = unshare ]; then
        for p in $(pgrep -P "$unshare_pid"); do
            [ "$(readlink "/proc/$p/ns/pid" 2>/dev/null)" != "$our_pidns" ] && init_pid=$p
        done
        [ -n "$init_pid" ] && break
    fi
    sleep 0.1
done
[ -n "$init_pid" ] || { echo "FAIL: the namespace did not start within 30 s" >&2; exit 1; }
# Every command inside is bounded, so a hang fails the test instead of
# stalling it.
inside() { timeout 60 nsenter -t "$init_pid" -a "$@"; }
state=""
for _ in $(seq 600); do
    state=$(inside systemctl is-system-running 2>/dev/null || true)
    case "$state" in running|degraded) break ;; esac
    sleep 0.1
done
case "$state" in
    running|degraded) echo "ok: systemd $(inside systemctl --version | head -1 | cut -d' ' -f2) booted in a namespace" ;;
    *)
        echo "FAIL: systemd did not finish booting in the namespace within 60 s (state ${state:-unknown})" >&2
        cat "$work/boot.log" >&2
        exit 1
        ;;
esac

fail() {
    echo "FAIL: $*" >&2
    inside systemctl status --no-pager chimed >&2 || true
    inside sh -c 'tail -n 30 /run/chime-test/chimed.log' >&2 || true
    cat "$work/boot.log" >&2
    exit 1
}
prop() { inside systemctl show -p "$1" --value chimed; }
# Capabilities of chimed's threads: "tid:CapPrm:CapAmb" lines.
thread_caps() {
    local pid
    pid=$(prop MainPID)
    inside sh -c "for t in /proc/$pid/task/*; do echo \"\${t##*/}:\$(awk '/^CapPrm/{p=\$2} /^CapAmb/{a=\$2} END{print p\":\"a}' \$t/status)\"; done"
}
# chimed's log must have no warning or error beyond the expected ones (a
# system call the sandbox refuses shows up here, not as a crash).
log_clean() {
    local bad
    bad=$(inside sh -c 'grep -E " (WARN|ERROR) " /run/chime-test/chimed.log' |
        grep -Ev 'local_stratum|upstream lost|clock unsynchronized' || true)
    [ -z "$bad" ] || fail "unexpected warnings in chimed's log: $bad"
}
write_config() { inside sh -c "cat > /run/chime-test/chimed.toml && chmod 644 /run/chime-test/chimed.toml"; }

# --- socket backend, with NTS where openssl can make a certificate ----------
nts=""
if command -v openssl >/dev/null; then
    inside sh -c 'cd /run/chime-test &&
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=ntp.chime.test \
            -keyout key.pem -out cert.pem 2>/dev/null && chown chime key.pem && chmod 600 key.pem && chmod 644 cert.pem'
    nts=$'[nts]\nenabled = true\ntls_cert = "/run/chime-test/cert.pem"\ntls_key = "/run/chime-test/key.pem"\nlisten = ["127.0.0.1:4460"]'
fi
write_config <<EOF
[server]
backend = "socket"
listen = ["127.0.0.1:123"]
workers = 2
[upstream]
local_stratum = 10
$nts
EOF
inside systemctl start chimed || fail "systemctl start chimed"
[ "$(prop ActiveState)/$(prop SubState)" = "active/running" ] || fail "not active/running after start"
case "$(prop StatusText)" in
    "serving: socket backend, 2 workers"*) ;;
    *) fail "status text: $(prop StatusText)" ;;
esac
echo "ok: Type=notify start, status \"$(prop StatusText)\""
main=$(prop MainPID)
[ "$(inside stat -c %U "/proc/$main")" = chime ] || fail "not running as chime"
caps=$(thread_caps)
echo "$caps" | grep -qv ':0000000000000000:0000000000000000$' && fail "a thread kept capabilities: $caps"
echo "ok: user chime, no capabilities left in $(echo "$caps" | wc -l) threads"
# chimed's own seccomp filter, on top of the unit's (which must allow seccomp()).
inside grep -q "seccomp filter installed in every thread" /run/chime-test/chimed.log ||
    fail "chimed did not install its seccomp filter"
echo "ok: chimed's seccomp filter installed"
inside ntpdate -q 127.0.0.1 | grep -Eq ' 127\.0\.0\.1 s[0-9]+ ' || fail "no NTP answer"
echo "ok: answers NTP"
[ "$(inside stat -c %U:%a /var/lib/chime)" = "chime:700" ] || fail "StateDirectory /var/lib/chime"
[ "$(inside stat -c %U /run/chime)" = chime ] || fail "RuntimeDirectory /run/chime"
if [ -n "$nts" ]; then
    [ "$(inside stat -c %U:%a /var/lib/chime/nts-keys)" = "chime:600" ] || fail "NTS key file in /var/lib/chime"
    inside bash -c 'exec 3<>/dev/tcp/127.0.0.1/4460' || fail "NTS-KE not listening"
    echo "ok: NTS keys persisted in the StateDirectory, NTS-KE listening"
fi

inside systemctl reload chimed || fail "systemctl reload"
sleep 0.5
[ "$(prop ActiveState)/$(prop SubState)" = "active/running" ] || fail "not running after reload"
[ "$(prop MainPID)" = "$main" ] || fail "reload restarted chimed"
inside grep -q "SIGHUP" /run/chime-test/chimed.log || fail "SIGHUP not seen"
echo "ok: reload"

restarts=$(prop NRestarts)
[ "$(prop WatchdogTimestampMonotonic)" != 0 ] || fail "no watchdog ping seen"
# PIDs seen inside: systemd's MainPID is the namespace's.
inside kill -STOP "$main"
# Between the kill and the restart (RestartSec=1s) the unit's Result says
# why it went down.
why=""
for _ in $(seq 150); do
    result=$(prop Result)
    # The first failure seen is the one that brought it down.
    [ "$result" = success ] || [ -n "$why" ] || why=$result
    [ "$(prop NRestarts)" -gt "$restarts" ] && [ "$(prop SubState)" = running ] && break
    sleep 0.1
done
[ "$(prop NRestarts)" -gt "$restarts" ] || fail "a stopped chimed was not restarted by the watchdog"
[ "$(prop MainPID)" != "$main" ] || fail "same main PID after the watchdog restart"
[ "$why" = watchdog ] || fail "restarted, but for \"$why\", not the watchdog"
echo "ok: the watchdog restarts a stopped chimed"

inside systemctl stop chimed || fail "systemctl stop"
[ "$(prop ActiveState)" = inactive ] || fail "not inactive after stop"
inside grep -q "INFO chime_server::run: stopped" /run/chime-test/chimed.log || fail "no clean stop in the log"
log_clean
echo "ok: stop"

# --- xdp backend -------------------------------------------------------------
if [ "$xdp" -eq 1 ]; then
    ip netns add "$client_ns"
    ip link add "$ifs" numtxqueues 2 numrxqueues 2 type veth peer name "$ifc" \
        numtxqueues 2 numrxqueues 2 netns "$client_ns"
    ip link set "$ifs" netns "/proc/$init_pid/ns/net"
    inside ip addr add 198.18.0.1/30 dev "$ifs"
    inside ip link set "$ifs" up
    ip -n "$client_ns" addr add 198.18.0.2/30 dev "$ifc"
    ip -n "$client_ns" link set "$ifc" up
    umem=""
    [ -n "$memlock" ] && umem=$'frame_count = 1024\nring_size = 512'
    inside sh -c ': > /run/chime-test/chimed.log'
    write_config <<EOF
[server]
backend = "xdp"
interface = "$ifs"
listen = ["198.18.0.1:123"]
[upstream]
local_stratum = 10
[xdp]
mode = "native"
$umem
EOF
    inside systemctl start chimed || fail "systemctl start chimed (xdp)"
    case "$(prop StatusText)" in
        "serving: xdp backend on $ifs, 2 queues"*) ;;
        *) fail "status text: $(prop StatusText)" ;;
    esac
    main=$(prop MainPID)
    caps=$(thread_caps)
    echo "$caps" | grep -q "^$main:0000000000001000:0000000000000000$" || fail "main thread caps: $caps"
    echo "$caps" | grep -v "^$main:" | grep -qv ':0000000000000000:0000000000000000$' &&
        fail "a worker kept capabilities: $caps"
    inside ip link show "$ifs" | grep -q xdp || fail "no XDP program attached"
    ip netns exec "$client_ns" ntpdate -q 198.18.0.1 | grep -Eq ' 198\.18\.0\.1 s[0-9]+ ' || fail "no NTP answer over XDP"
    echo "ok: xdp backend, main thread keeps only CAP_NET_ADMIN, answers NTP"
    inside systemctl stop chimed || fail "systemctl stop (xdp)"
    inside ip link show "$ifs" | grep -q xdp && fail "XDP program still attached after stop"
    log_clean
    echo "ok: xdp stop detaches the program"
fi
echo "all unit checks passed"
