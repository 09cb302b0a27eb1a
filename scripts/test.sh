#!/bin/sh
# Runs chime's whole test suite: installs what the tests need (see deps.sh),
# then every unit, property, integration and interop test of the workspace.
# Tests that need root (network namespaces, XDP) print why they skip when run
# unprivileged; as root they run.
set -eu
cd "$(dirname "$0")/.."
./scripts/deps.sh
exec cargo test --workspace --locked -j"$(nproc)" "$@"
