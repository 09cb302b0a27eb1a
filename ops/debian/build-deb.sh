#!/bin/bash
# Builds the Debian package chime_VERSION_ARCH.deb with dpkg-deb (no
# debhelper, no cargo-deb): the binaries, the systemd units, the default
# configuration as a conffile, the documentation and the maintainer scripts
# in this directory (the user chime is made in postinst, removed on purge).
#
# Usage: build-deb.sh [--bin-dir DIR] [--out DIR] [--fast]
#   --bin-dir DIR  take chimed, chime-nts-ke and chime-load from DIR (e.g.
#                  target/debug, for tests) instead of building them with
#                  cargo build --release --locked
#   --out DIR      where the .deb goes (default: target/debian)
#   --fast         gzip -1 instead of xz (tests)
#
# Prints the path of the package on its last line. Contents:
#   /usr/sbin/chimed, /usr/sbin/chime-nts-ke, /usr/sbin/chime-tune-nic,
#   /usr/bin/chime-load (stripped; the Depends line is worked out from the
#   libraries chimed links against),
#   /lib/systemd/system/chimed.service, chime-tune-nic@.service,
#   /etc/chime/chimed.toml (conffile: ops/chimed.toml, all defaults),
#   /usr/share/doc/chime/ (README.md, README.ops.md, DEPLOYMENT.md,
#   METRICS.md, CHANGELOG.md, copyright, examples/, bird/),
#   /usr/share/chime/chime-healthcheck.sh (the anycast health check).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
bin_dir=""
out="$repo/target/debian"
compress=(-Zxz)
while [ $# -gt 0 ]; do
    case "$1" in
        --bin-dir) bin_dir=$(realpath "$2"); shift 2 ;;
        --out) out=$2; shift 2 ;;
        --fast) compress=(-Zgzip -z1); shift ;;
        *) echo "usage: $0 [--bin-dir DIR] [--out DIR] [--fast]" >&2; exit 2 ;;
    esac
done
for prog in dpkg-deb dpkg-query strip objdump; do
    command -v "$prog" >/dev/null || { echo "build-deb: $prog is not installed" >&2; exit 1; }
done

if [ -z "$bin_dir" ]; then
    (cd "$repo" && cargo build --release --locked -p chime-server -p chime-nts-ke -p chime-loadgen >&2)
    bin_dir="${CARGO_TARGET_DIR:-$repo/target}/release"
fi
for b in chimed chime-nts-ke chime-load; do
    [ -x "$bin_dir/$b" ] || { echo "build-deb: no $b in $bin_dir" >&2; exit 1; }
done

version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -1)
[ -n "$version" ] || { echo "build-deb: no version in Cargo.toml" >&2; exit 1; }
deb_version="$version-1"
arch=$(dpkg --print-architecture)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root="$stage/root"
install -d -m 0755 "$root/DEBIAN" "$root/usr/sbin" "$root/usr/bin" "$root/lib/systemd/system" \
    "$root/etc/chime" "$root/usr/share/doc/chime/examples"

install -m 0755 "$bin_dir/chimed" "$bin_dir/chime-nts-ke" "$root/usr/sbin/"
install -m 0755 "$bin_dir/chime-load" "$root/usr/bin/"
strip --strip-unneeded "$root/usr/sbin/chimed" "$root/usr/sbin/chime-nts-ke" "$root/usr/bin/chime-load"
install -m 0755 "$repo/ops/tune-nic.sh" "$root/usr/sbin/chime-tune-nic"
install -m 0644 "$repo/ops/systemd/chimed.service" "$repo/ops/systemd/chime-tune-nic@.service" \
    "$root/lib/systemd/system/"
install -m 0644 "$repo/ops/chimed.toml" "$root/etc/chime/chimed.toml"
doc="$root/usr/share/doc/chime"
install -m 0644 "$repo/README.md" "$repo/CHANGELOG.md" "$doc/"
install -m 0644 "$repo/ops/README.md" "$doc/README.ops.md"
install -m 0644 "$repo"/ops/examples/*.toml "$doc/examples/"
install -m 0644 "$repo/ops/DEPLOYMENT.md" "$repo/ops/METRICS.md" "$doc/"
install -d -m 0755 "$root/usr/share/chime" "$doc/bird"
install -m 0755 "$repo/ops/bird/chime-healthcheck.sh" "$root/usr/share/chime/"
install -m 0644 "$repo/ops/bird/bird.conf" "$repo/ops/bird/chime-healthcheck.service" "$doc/bird/"
{
    cat <<'EOF'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: chime
Source: https://example.invalid/chime

Files: *
Copyright: The chime engineers
License: MIT or Apache-2.0
 chime is dual-licensed under either of the Apache License, Version 2.0, or
 the MIT license, at your option. On Debian systems the Apache License 2.0
 is in /usr/share/common-licenses/Apache-2.0. The MIT license follows.
 .
EOF
    sed 's/^/ /; s/^ $/ ./' "$repo/LICENSE-MIT"
    cat <<'EOF'

Files: ebpf/xdp/*
Copyright: The chime engineers
License: MIT or GPL-2.0
 The XDP program chimed loads into the kernel is dual-licensed MIT OR
 GPL-2.0. On Debian systems the GPL 2 is in
 /usr/share/common-licenses/GPL-2.
EOF
} > "$doc/copyright"
chmod 0644 "$doc/copyright"

# Depends: the packages that own the libraries chimed and the others link
# against, at least the versions built against.
depends=$(
    for b in "$root/usr/sbin/chimed" "$root/usr/sbin/chime-nts-ke" "$root/usr/bin/chime-load"; do
        objdump -p "$b" | awk '$1 == "NEEDED" { print $2 }'
    done | sort -u | while read -r lib; do
        path=$(ldconfig -p | awk -v lib="$lib" '$1 == lib && /x86-64|64bit|AArch64/ { print $NF; exit }')
        [ -n "$path" ] || path=$(ldconfig -p | awk -v lib="$lib" '$1 == lib { print $NF; exit }')
        [ -n "$path" ] || { echo "build-deb: cannot find $lib" >&2; exit 1; }
        real=$(realpath "$path")
        pkg=$(dpkg-query -S "$path" 2>/dev/null || dpkg-query -S "$real" 2>/dev/null || true)
        [ -n "$pkg" ] || { echo "build-deb: no package owns $path" >&2; exit 1; }
        pkg=${pkg%%:*}
        pkg=${pkg%%,*}
        ver=$(dpkg-query -W -f='${Version}' "$pkg" | sed 's/-[^-]*$//')
        echo "$pkg (>= $ver)"
    done | sort -u | paste -sd, | sed 's/,/, /g'
)
[ -n "$depends" ] || { echo "build-deb: could not work out Depends" >&2; exit 1; }

size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$deb_version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" -e "s/@DEPENDS@/$depends/" \
    "$here/control.in" > "$root/DEBIAN/control"
echo /etc/chime/chimed.toml > "$root/DEBIAN/conffiles"
install -m 0755 "$here/postinst" "$here/prerm" "$here/postrm" "$root/DEBIAN/"
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) \
    > "$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/conffiles" "$root/DEBIAN/md5sums"

mkdir -p "$out"
deb="$(realpath "$out")/chime_${deb_version}_${arch}.deb"
dpkg-deb --root-owner-group "${compress[@]}" --build "$root" "$deb" >&2
echo "$deb"
