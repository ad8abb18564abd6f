#!/usr/bin/env bash
# Berth's fault suite (needs root: network namespaces, iptables, tc).
#   scripts/faults.sh                 the bounded suite (4 seeds and the regression schedules, 104 faults; run by scripts/test.sh)
#   scripts/faults.sh --soak 2h       random seeds, 3 and 5 members, for that long
#   scripts/faults.sh run --seed 7    one run (see `berth-faults run --help`),
#                                     or --schedule FILE to replay a failed run
# A failing run keeps its folder under target/faults/ and prints its path.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v iptables >/dev/null || missing+=(iptables)
command -v tc >/dev/null || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
    echo "faults: installing ${missing[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi

cargo build --workspace --bins --locked >&2
bin=target/debug/berth-faults
case "${1:-suite}" in
    --soak) exec "$bin" soak --duration "${2:?--soak needs a duration, e.g. 2h}" ;;
    suite) shift || true; exec "$bin" suite "$@" ;;
    *) exec "$bin" "$@" ;;
esac
