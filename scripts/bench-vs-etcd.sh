#!/usr/bin/env bash
# Berth vs etcd 3.4: replicated writes on a 3-member loopback cluster of each,
# with 1 and 256 concurrent writers, default durability on both sides.
# Not part of CI. Run as root (it apt-get installs etcd-server, etcd-client,
# protobuf-compiler, libprotobuf-dev and jq when missing) on a Debian machine:
#
#   sudo DURATION=10s PAIRS=5 scripts/bench-vs-etcd.sh
#
# PAIRS (default 5) single-writer runs of each side, back to back in pairs;
# then one 256-writer run of each.
# etcd side:  bench/etcd-load (a standalone cargo project mirroring
#             `berth bench writes`: same workload shape, report and JSON keys).
# Berth side: target/release/berth bench writes.
# Both clusters are up together, but only one is loaded at a time. Data dirs live under one mktemp
# dir (same filesystem for both); set KEEP=1 to keep it (and the logs).
set -euo pipefail

DURATION="${DURATION:-10s}"
PAIRS="${PAIRS:-5}"
if ! [[ "$PAIRS" =~ ^[1-9][0-9]*$ ]]; then
    echo "bench-vs-etcd: PAIRS=$PAIRS: must be a whole number >= 1 (the single-writer runs per side)" >&2
    exit 2
fi
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
LOAD_DIR="$ROOT/bench/etcd-load"

if [[ $EUID -ne 0 ]]; then
    echo "bench-vs-etcd: run as root (installs packages with apt-get)" >&2
    exit 1
fi

log() { echo "==> $*" >&2; }

# ---------------------------------------------------------------- packages
missing=()
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler) # etcd-client crate's build.rs
# ... which also needs protoc's well-known types (google/protobuf/*.proto),
# only recommended by protobuf-compiler, so not installed with it here.
[[ -f /usr/include/google/protobuf/descriptor.proto ]] || missing+=(libprotobuf-dev)
command -v jq >/dev/null 2>&1 || missing+=(jq)
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi
command -v cargo >/dev/null 2>&1 || { echo "bench-vs-etcd: cargo not found" >&2; exit 1; }
case "$(uname -m)" in
    x86_64 | aarch64) ;;
    *) export ETCD_UNSUPPORTED_ARCH="$(dpkg --print-architecture)" ;;
esac
export ETCDCTL_API=3
log "$(etcd --version | head -1)"

# ---------------------------------------------------------------- plumbing
WORK="$(mktemp -d -t bench-vs-etcd.XXXXXX)"
PIDS=()
USED_PORTS=" "

stop_all() {
    local p
    for p in "${PIDS[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    for p in "${PIDS[@]}"; do
        for _ in $(seq 100); do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    PIDS=()
}

cleanup() {
    local rc=$?
    stop_all
    if [[ -n "${KEEP:-}" || $rc -ne 0 ]]; then
        echo "bench-vs-etcd: logs and data kept in $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Writer i talks to endpoint i % 3 on both sides, so the endpoints are put
# leader first: the single writer then reaches its leader directly on both
# sides, instead of one side's paying a forward to its leader and the
# other's not (etcd's first member is a follower in two runs of three).
leader_first() {
    local leader=$1 all=$2
    echo "$leader$(tr ',' '\n' <<<"$all" | grep -vxF "$leader" | sed 's/^/,/' | tr -d '\n')"
}

# A loopback port that no socket uses and this script has not handed out.
# Ports come from below the kernel's ephemeral range, so that no outgoing
# connection (the etcd members' among them) can hold one between the check
# and the bind; the check covers sockets in any state.
EPHEMERAL_LOW=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range)
PORT_LOW=10000
if ((EPHEMERAL_LOW - PORT_LOW < 1000)); then PORT_LOW=1024; fi
free_port() {
    local p
    while :; do
        p=$((PORT_LOW + RANDOM % (EPHEMERAL_LOW - PORT_LOW)))
        [[ "$USED_PORTS" == *" $p "* ]] && continue
        if [[ -z "$(ss -Htan "sport = :$p")" ]]; then
            USED_PORTS+="$p "
            echo "$p"
            return
        fi
    done
}

# --------------------------------------------------------------- etcd side
log "building bench/etcd-load (release)"
(cd "$LOAD_DIR" && cargo build --release --locked)
ETCD_LOAD="$LOAD_DIR/target/release/etcd-load"
log "building berth (cargo build --release --bins)"
(cd "$ROOT" && cargo build --release --bins)
sync

log "starting a 3-member etcd cluster in $WORK/etcd"
declare -a ETCD_CLIENT ETCD_PEER
initial=""
for i in 1 2 3; do
    ETCD_CLIENT[i]=$(free_port)
    ETCD_PEER[i]=$(free_port)
    initial+="${initial:+,}e$i=http://127.0.0.1:${ETCD_PEER[i]}"
done
mkdir -p "$WORK/etcd"
for i in 1 2 3; do
    # Default durability: no --unsafe-no-fsync; every other flag is addressing.
    etcd --name "e$i" \
        --data-dir "$WORK/etcd/e$i" \
        --listen-client-urls "http://127.0.0.1:${ETCD_CLIENT[i]}" \
        --advertise-client-urls "http://127.0.0.1:${ETCD_CLIENT[i]}" \
        --listen-peer-urls "http://127.0.0.1:${ETCD_PEER[i]}" \
        --initial-advertise-peer-urls "http://127.0.0.1:${ETCD_PEER[i]}" \
        --initial-cluster "$initial" \
        --initial-cluster-token "bench-vs-etcd-$$" \
        --initial-cluster-state new \
        --logger zap --log-outputs stderr \
        >"$WORK/etcd/e$i.log" 2>&1 &
    PIDS+=($!)
done
ETCD_ENDPOINTS="127.0.0.1:${ETCD_CLIENT[1]},127.0.0.1:${ETCD_CLIENT[2]},127.0.0.1:${ETCD_CLIENT[3]}"

healthy=0
for _ in $(seq 300); do
    if etcdctl --endpoints "$ETCD_ENDPOINTS" endpoint health >/dev/null 2>&1; then
        healthy=1
        break
    fi
    sleep 0.1
done
if ((!healthy)); then
    etcdctl --endpoints "$ETCD_ENDPOINTS" endpoint health >&2 || true
    tail -n 20 "$WORK"/etcd/e*.log >&2
    echo "bench-vs-etcd: etcd cluster not healthy within 30s" >&2
    exit 1
fi
etcdctl --endpoints "$ETCD_ENDPOINTS" endpoint status -w table >&2
# `simple` output: endpoint, id, version, db size, is leader, ...
ETCD_LEADER=$(etcdctl --endpoints "$ETCD_ENDPOINTS" endpoint status -w simple | awk -F', ' '$5 == "true" {print $1}')
if [[ -z "$ETCD_LEADER" ]]; then
    echo "bench-vs-etcd: etcd reports no leader" >&2
    exit 1
fi
ETCD_ENDPOINTS=$(leader_first "$ETCD_LEADER" "$ETCD_ENDPOINTS")
log "etcd leader: $ETCD_LEADER; endpoints in writer order: $ETCD_ENDPOINTS"

# -------------------------------------------------------------- Berth side
BERTH="$ROOT/target/release/berth"
BERTH_CONTROL="$ROOT/target/release/berth-control"

mkdir -p "$WORK/berth"
declare -a BERTH_ADDR
for i in 1 2 3; do
    BERTH_ADDR[i]="127.0.0.1:$(free_port)"
done
BERTH_SERVERS="${BERTH_ADDR[1]},${BERTH_ADDR[2]},${BERTH_ADDR[3]}"

start_member() {
    local i=$1
    shift
    "$BERTH_CONTROL" --id "$i" --listen "${BERTH_ADDR[i]}" \
        --data-dir "$WORK/berth/member-$i" --insecure "$@" \
        >"$WORK/berth/member-$i.log" 2>&1 &
    PIDS+=($!)
}

# Prints the number of voters when a leader is known, else nothing.
berth_voters() {
    "$BERTH" --server "$BERTH_SERVERS" cluster status --output json 2>/dev/null |
        jq -r 'select(.leader_id != null) | [.members[] | select(.role != "learner")] | length' 2>/dev/null || true
}

wait_voters() {
    local want=$1 v
    for _ in $(seq 600); do
        v=$(berth_voters)
        [[ -n "$v" && "$v" -ge "$want" ]] && return 0
        sleep 0.1
    done
    tail -n 20 "$WORK"/berth/member-*.log >&2
    echo "bench-vs-etcd: berth cluster did not reach $want voters within 60s" >&2
    exit 1
}

log "starting a 3-member berth cluster in $WORK/berth"
start_member 1 --bootstrap
wait_voters 1
start_member 2 --join "${BERTH_ADDR[1]}"
start_member 3 --join "${BERTH_ADDR[1]}"
wait_voters 3
"$BERTH" --server "$BERTH_SERVERS" cluster status >&2
BERTH_LEADER=$("$BERTH" --server "$BERTH_SERVERS" cluster status --output json | jq -r '.leader_addr // empty')
if [[ -z "$BERTH_LEADER" ]]; then
    echo "bench-vs-etcd: berth reports no leader" >&2
    exit 1
fi
BERTH_SERVERS=$(leader_first "$BERTH_LEADER" "$BERTH_SERVERS")
log "berth leader: $BERTH_LEADER; servers in writer order: $BERTH_SERVERS"

# -------------------------------------------------------------------- runs
# Both clusters stay up; the one not measured only heartbeats. On a shared
# VM the same binary's p50 moves by half between runs minutes apart (the
# disk's fsync time drifts), so one run per side compares two moments, not
# two systems. The single-writer runs therefore come in pairs, one run of
# each side back to back, the order alternating (etcd first in odd pairs),
# and each pair is compared on its own. `sync` before every run writes back
# the previous run's dirty pages (etcd preallocates 64 MiB WAL files) so
# that they do not land in the next run's fsyncs.
run_etcd() {
    "$ETCD_LOAD" --endpoints "$ETCD_ENDPOINTS" --clients "$1" --duration "$DURATION" \
        --output json >"$WORK/$2.json"
}
run_berth() {
    "$BERTH" --server "$BERTH_SERVERS" bench writes --clients "$1" --duration "$DURATION" \
        --output json >"$WORK/$2.json"
}
measure() {
    local sys=$1 clients=$2 name=$3 what=$4
    sync
    log "$sys: $clients clients for $DURATION$what"
    "run_$sys" "$clients" "$name"
    cat "$WORK/$name.json" >&2
}
for ((k = 1; k <= PAIRS; k++)); do
    if ((k % 2)); then order=(etcd berth); else order=(berth etcd); fi
    for sys in "${order[@]}"; do
        measure "$sys" 1 "$sys-1-$k" " (pair $k of $PAIRS)"
    done
done
for sys in etcd berth; do
    measure "$sys" 256 "$sys-256" ""
done

log "stopping both clusters"
stop_all

# ----------------------------------------------------------------- summary
field() { jq -r ".$2" "$WORK/$1.json"; }

echo
echo "berth vs etcd $(etcd --version | awk '/etcd Version/ {print $3}'), 3 members on loopback, $DURATION per run, $(nproc) CPUs"
echo "writer i talks to member i % 3, the leader first: the single writer talks to the leader on both sides"
printf '%-7s %8s %6s %10s %9s %9s %9s %7s\n' SYSTEM CLIENTS PAIR WRITES/S P50_MS P99_MS MAX_MS ERRORS
row() {
    local name=$1 sys=$2 clients=$3 pair=$4
    printf '%-7s %8s %6s %10.0f %9.2f %9.2f %9.2f %7s\n' "$sys" "$clients" "$pair" \
        "$(field "$name" writes_per_sec)" "$(field "$name" p50_ms)" \
        "$(field "$name" p99_ms)" "$(field "$name" max_ms)" "$(field "$name" errors)"
}
for ((k = 1; k <= PAIRS; k++)); do
    row "etcd-1-$k" etcd 1 "$k"
    row "berth-1-$k" berth 1 "$k"
done
row etcd-256 etcd 256 -
row berth-256 berth 256 -
echo
awk -v b="$(field berth-256 writes_per_sec)" -v e="$(field etcd-256 writes_per_sec)" 'BEGIN {
    r = (e > 0) ? b / e : 0
    printf "writes/s at 256 clients, berth/etcd: %.2fx (goal >= 1.5x: %s)\n", r, (r >= 1.5) ? "met" : "NOT met"
}'
# One line per pair: berth p50, etcd p50. The goal is judged on the median
# of the pairs' ratios; how many pairs met it on their own is printed too.
for ((k = 1; k <= PAIRS; k++)); do
    echo "$(field "berth-1-$k" p50_ms) $(field "etcd-1-$k" p50_ms)"
done | awk '{ printf "%.6f %d\n", ($2 > 0) ? $1 / $2 : 0, ($1 <= $2) }' | sort -n | awk '
    { r[NR] = $1; met += $2 }
    END {
        m = (NR % 2) ? r[(NR + 1) / 2] : (r[NR / 2] + r[NR / 2 + 1]) / 2
        printf "p50 at 1 client, berth/etcd: median of %d paired runs %.2fx (range %.2f-%.2fx; %d of %d pairs <= 1.0x; goal <= 1.0x: %s)\n",
            NR, m, r[1], r[NR], met, NR, (m <= 1.0) ? "met" : "NOT met"
    }'
