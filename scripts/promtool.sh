#!/usr/bin/env bash
# promtool.sh: make sure Prometheus's `promtool` is installed and print its path.
# The end-to-end tests check every binary's /metrics with `promtool check
# metrics` (BERTH_PROMTOOL). Debian's `prometheus` package has it; it is
# installed with apt-get (needs root) when missing. Only the path goes to
# stdout; progress goes to stderr.
set -euo pipefail
if ! command -v promtool >/dev/null 2>&1; then
    echo "promtool: installing Debian's prometheus package (for promtool)" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >&2
fi
command -v promtool
