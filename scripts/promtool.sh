#!/bin/sh
# Prints the path of a promtool (Prometheus's rule and config checker) for
# the alert-rule tests in server/tests/observe.rs, fetching one if needed:
#
#   1. $PROMTOOL, if set and executable;
#   2. promtool on PATH;
#   3. a copy cached in ${XDG_CACHE_HOME:-~/.cache}/chime/promtool-<version>,
#      extracted from Debian's prometheus package: `apt-get download` and
#      `dpkg-deb`, no installation, so no prometheus service is started or
#      enabled, no user is made and dpkg records nothing. Needs the package
#      lists (apt-get update) and network access the first time only.
#
# Exits 1, saying why on stderr, when none can be had.
set -eu

if [ -n "${PROMTOOL:-}" ] && [ -x "$PROMTOOL" ]; then
    echo "$PROMTOOL"
    exit 0
fi
if command -v promtool >/dev/null 2>&1; then
    command -v promtool
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
    echo "promtool.sh: no promtool, and no apt-get/dpkg-deb to fetch Debian's" >&2
    exit 1
fi
version=$(apt-cache show --no-all-versions prometheus 2>/dev/null | sed -n 's/^Version: //p' | head -n 1)
if [ -z "$version" ]; then
    echo "promtool.sh: no promtool, and apt knows no prometheus package (apt-get update?)" >&2
    exit 1
fi
cache="${XDG_CACHE_HOME:-$HOME/.cache}/chime/promtool-$version"
if [ -x "$cache/promtool" ]; then
    echo "$cache/promtool"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# apt-get download writes to the current directory; as root its sandbox
# user _apt cannot write to a mktemp directory, so do not ask it to.
if ! (cd "$tmp" && apt-get download -o APT::Sandbox::User=root -qq "prometheus=$version" >/dev/null 2>&1); then
    echo "promtool.sh: apt-get download prometheus=$version failed" >&2
    exit 1
fi
dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool
mkdir -p "$cache"
mv "$tmp/usr/bin/promtool" "$cache/promtool"
echo "promtool.sh: promtool $version extracted to $cache" >&2
echo "$cache/promtool"
