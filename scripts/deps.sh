#!/bin/sh
# Installs the Debian packages chime's build and tests need. Idempotent: when
# everything is present it installs nothing and touches no package list.
#
#   libelf-dev zlib1g-dev pkg-config  build of libbpf-rs (XDP backend)
#   clang-14 llvm libbpf-dev           rebuilding the XDP object (check only)
#   chrony ntpsec-ntpdate              real NTP clients for interop tests
#   iproute2                           network namespaces for root-only tests
#   iputils-ping ethtool               test bed: ping across it, per-queue counters
#   bpftool libcap2-bin                inspecting XDP programs, capabilities
#   systemd procps openssl             the unit: systemd-analyze verify, and
#                                      chimed under a namespaced systemd
#                                      (pgrep; a test certificate)
#   adduser binutils                   the Debian package test (postinst;
#                                      strip and objdump in build-deb.sh)
#
# chrony's package ships a daemon; it is never started by this script (the
# tests run chronyd -Q themselves), and on systemd hosts it is stopped and
# disabled so it does not hold UDP port 123.
set -eu

PKGS="libelf-dev zlib1g-dev pkg-config clang-14 llvm libbpf-dev chrony ntpsec-ntpdate iproute2 iputils-ping ethtool
      bpftool libcap2-bin systemd procps openssl adduser binutils"

missing=""
for p in $PKGS; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done

if [ -z "$missing" ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "deps.sh: missing packages:$missing" >&2
    echo "deps.sh: run as root (or: sudo $0) to install them" >&2
    exit 1
fi

echo "deps.sh: installing:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >/dev/null

if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now chrony.service >/dev/null 2>&1 || true
fi
