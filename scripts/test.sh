#!/bin/sh
# Runs chime's whole test suite: installs what the tests need (see deps.sh),
# then every unit, property, integration and interop test of the workspace.
# Tests that need root (network namespaces, XDP) print why they skip when run
# unprivileged; as root they run.
#
# With cargo-nextest installed (it is on the project's machines) the tests run
# under nextest, which isolates each test in its own process and ends with a
# one-line summary; the doc-tests, which nextest does not run, run first
# under cargo test. Without nextest, plain cargo test runs everything.
set -eu
cd "$(dirname "$0")/.."
./scripts/deps.sh
# promtool checks the Prometheus rules (server/tests/observe.rs skips without
# it, or fails if CHIME_REQUIRE_PROMTOOL is set, as in CI).
if PROMTOOL=$(./scripts/promtool.sh); then
    export PROMTOOL
else
    echo "test.sh: no promtool; the Prometheus rule checks will skip" >&2
fi
if cargo nextest --version >/dev/null 2>&1; then
    cargo test --workspace --locked --doc
    exec cargo nextest run --workspace --locked --no-fail-fast "$@"
fi
exec cargo test --workspace --locked "$@"
