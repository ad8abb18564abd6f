#!/usr/bin/env bash
# The test command: format check, clippy with warnings as errors, then every
# test (unit, property, data-driven, end-to-end with real processes).
# End-to-end tests start the binaries, so they are built first.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --bins --locked
# The real llama.cpp server for tests/tests/llama_cpp.rs: built once into a
# cache outside the clone (about 9 minutes the first time), then reused.
BERTH_LLAMA_SERVER="$(./scripts/llama-server.sh)"
BERTH_LLAMA_PYTHON="$(./scripts/llama-server.sh --python)"
export BERTH_LLAMA_SERVER BERTH_LLAMA_PYTHON
# promtool checks every binary's /metrics in tests/tests/gpu_health.rs.
BERTH_PROMTOOL="$(./scripts/promtool.sh)"
export BERTH_PROMTOOL
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast
else
    # nextest is the runner CI uses (it serializes the end-to-end tests through
    # the test group in .config/nextest.toml); plain cargo test must be told.
    cargo test --workspace --locked --no-fail-fast -- --test-threads=1
fi

# The bounded fault suite (needs root): members and agents as separate
# hosts, seeded partitions, kills, pauses, membership and disk faults, and
# the recorded history checked (README, Fault suite). About 20 minutes.
./scripts/faults.sh
