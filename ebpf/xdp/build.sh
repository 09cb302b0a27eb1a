#!/bin/sh
# Builds chime's XDP objects reproducibly: the same clang-14 and headers give
# the same bytes wherever the checkout lives. The objects are committed
# (ebpf/xdp/*.o) so `cargo build` needs no clang; the test
# `committed_object_is_reproducible` runs this script into a temporary
# directory and compares bytes.
#
#   ebpf/xdp/build.sh [OUTDIR]      (default: ebpf/xdp itself)
#
# Needs: clang-14, llvm-strip-14 (llvm-14), libbpf-dev (bpf/bpf_helpers.h),
# linux-libc-dev (linux/*.h). Debian 12 paths are pinned below.
set -eu

CLANG=${CLANG:-clang-14}
STRIP=${STRIP:-llvm-strip-14}
MULTIARCH_INC=/usr/include/x86_64-linux-gnu

OUT=${1:-$(dirname "$0")}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")"

for req in "$CLANG" "$STRIP"; do
    command -v "$req" >/dev/null 2>&1 || { echo "build.sh: $req not found" >&2; exit 2; }
done
[ -f /usr/include/bpf/bpf_helpers.h ] || { echo "build.sh: /usr/include/bpf/bpf_helpers.h missing (install libbpf-dev)" >&2; exit 2; }
[ -d "$MULTIARCH_INC/asm" ] || { echo "build.sh: $MULTIARCH_INC/asm missing (install linux-libc-dev)" >&2; exit 2; }

# -g is needed for BTF (maps, kfuncs, line info); DWARF is stripped after.
# The prefix maps make the only path recorded (BTF line info) "./<name>.c".
for src in chime_xdp chime_load_xdp test_foreign; do
    "$CLANG" -O2 -g -target bpf -mcpu=v3 \
        -Wall -Werror \
        -idirafter "$MULTIARCH_INC" \
        -fdebug-prefix-map="$PWD"=. -ffile-prefix-map="$PWD"=. \
        -fno-ident \
        -c "$src.c" -o "$OUT/$src.o.tmp"
    "$STRIP" --strip-debug "$OUT/$src.o.tmp" -o "$OUT/$src.o"
    rm -f "$OUT/$src.o.tmp"
done
