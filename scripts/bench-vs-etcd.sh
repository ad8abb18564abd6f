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
#
# TLS=1 runs both sides with TLS (default TLS=0: plaintext on both sides,
# Berth's members and CLI with --insecure):
#
#   sudo TLS=1 DURATION=10s PAIRS=5 scripts/bench-vs-etcd.sh
#
# etcd side:  a throwaway CA and certificates made with openssl in the mktemp
#             dir (ECDSA P-256 like Berth's CA, SAN IP:127.0.0.1): one per
#             member, for its client and peer URLs, and one client
#             certificate; https client and peer URLs with --client-cert-auth
#             and --peer-client-cert-auth; etcdctl and etcd-load present the
#             client certificate (--cacert, --cert, --key).
# Berth side: secure, its default: member 1 bootstraps the cluster CA (no
#             --insecure), members 2 and 3 join with one-use member tokens
#             made with the admin.conf bootstrap wrote; mTLS between members;
#             the CLI (and so `bench writes`) verifies the members against the
#             CA and authenticates with admin.conf's token over TLS (Berth's
#             CLI has no client certificate).
set -euo pipefail

DURATION="${DURATION:-10s}"
PAIRS="${PAIRS:-5}"
TLS="${TLS:-0}"
if ! [[ "$PAIRS" =~ ^[1-9][0-9]*$ ]]; then
    echo "bench-vs-etcd: PAIRS=$PAIRS: must be a whole number >= 1 (the single-writer runs per side)" >&2
    exit 2
fi
if [[ "$TLS" != 0 && "$TLS" != 1 ]]; then
    echo "bench-vs-etcd: TLS=$TLS: must be 0 (plaintext) or 1 (TLS on both sides)" >&2
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
if ((TLS)); then command -v openssl >/dev/null 2>&1 || missing+=(openssl); fi
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

# TLS=1: a throwaway CA, a certificate per etcd member (for server and client
# use: it serves the client and peer URLs and dials the other members) and
# one client certificate, for etcdctl and etcd-load.
ETCD_SCHEME=http
ETCD_TLS_FLAGS=() # etcdctl's and etcd-load's
TLS_NOTE=""       # for the log lines
if ((TLS)); then
    ETCD_SCHEME=https
    TLS_NOTE=" (TLS)"
    tls="$WORK/etcd-tls"
    mkdir -p "$tls"
    cat >"$tls/ext.cnf" <<'EXT'
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[member]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
EXT
    # ECDSA P-256 keys (PKCS#8), signed with ECDSA and SHA-256.
    newkey() { (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"); }
    newkey "$tls/ca.key"
    openssl req -x509 -new -key "$tls/ca.key" -sha256 -days 2 -subj "/CN=bench-vs-etcd CA" \
        -config "$tls/ext.cnf" -extensions ca -out "$tls/ca.pem"
    # sign NAME CN SECTION: a key NAME.key and its certificate NAME.pem.
    sign() {
        newkey "$tls/$1.key"
        openssl req -new -key "$tls/$1.key" -subj "/CN=$2" -config "$tls/ext.cnf" -out "$tls/$1.csr"
        openssl x509 -req -in "$tls/$1.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" \
            -CAcreateserial -sha256 -days 2 -extfile "$tls/ext.cnf" -extensions "$3" \
            -out "$tls/$1.pem" 2>/dev/null
    }
    for i in 1 2 3; do sign "e$i" "e$i" member; done
    sign client bench-vs-etcd-client client
    for c in e1 e2 e3 client; do openssl verify -CAfile "$tls/ca.pem" "$tls/$c.pem" >/dev/null; done
    ETCD_TLS_FLAGS=(--cacert "$tls/ca.pem" --cert "$tls/client.pem" --key "$tls/client.key")
    log "etcd TLS: CA and certificates in $tls"
fi
etcd_ctl() {
    etcdctl --endpoints "$ETCD_ENDPOINTS" "${ETCD_TLS_FLAGS[@]}" "$@"
}

log "starting a 3-member etcd cluster in $WORK/etcd$TLS_NOTE"
declare -a ETCD_CLIENT ETCD_PEER
initial=""
for i in 1 2 3; do
    ETCD_CLIENT[i]=$(free_port)
    ETCD_PEER[i]=$(free_port)
    initial+="${initial:+,}e$i=$ETCD_SCHEME://127.0.0.1:${ETCD_PEER[i]}"
done
mkdir -p "$WORK/etcd"
for i in 1 2 3; do
    member_tls=()
    if ((TLS)); then
        member_tls=(--cert-file "$tls/e$i.pem" --key-file "$tls/e$i.key"
            --trusted-ca-file "$tls/ca.pem" --client-cert-auth
            --peer-cert-file "$tls/e$i.pem" --peer-key-file "$tls/e$i.key"
            --peer-trusted-ca-file "$tls/ca.pem" --peer-client-cert-auth)
    fi
    # Default durability: no --unsafe-no-fsync; every other flag is addressing
    # (or, with TLS=1, certificates).
    etcd --name "e$i" \
        --data-dir "$WORK/etcd/e$i" \
        --listen-client-urls "$ETCD_SCHEME://127.0.0.1:${ETCD_CLIENT[i]}" \
        --advertise-client-urls "$ETCD_SCHEME://127.0.0.1:${ETCD_CLIENT[i]}" \
        --listen-peer-urls "$ETCD_SCHEME://127.0.0.1:${ETCD_PEER[i]}" \
        --initial-advertise-peer-urls "$ETCD_SCHEME://127.0.0.1:${ETCD_PEER[i]}" \
        --initial-cluster "$initial" \
        --initial-cluster-token "bench-vs-etcd-$$" \
        --initial-cluster-state new \
        "${member_tls[@]}" \
        --logger zap --log-outputs stderr \
        >"$WORK/etcd/e$i.log" 2>&1 &
    PIDS+=($!)
done
# TLS=0: host:port, as ever; TLS=1: https:// URLs (etcdctl and etcd-load take
# them, and etcdctl prints them back as given, for the leader's lookup).
ETCD_URL_PREFIX=""
if ((TLS)); then ETCD_URL_PREFIX="https://"; fi
ETCD_ENDPOINTS=""
for i in 1 2 3; do
    ETCD_ENDPOINTS+="${ETCD_ENDPOINTS:+,}${ETCD_URL_PREFIX}127.0.0.1:${ETCD_CLIENT[i]}"
done

healthy=0
for _ in $(seq 300); do
    if etcd_ctl endpoint health >/dev/null 2>&1; then
        healthy=1
        break
    fi
    sleep 0.1
done
if ((!healthy)); then
    etcd_ctl endpoint health >&2 || true
    tail -n 20 "$WORK"/etcd/e*.log >&2
    echo "bench-vs-etcd: etcd cluster not healthy within 30s" >&2
    exit 1
fi
etcd_ctl endpoint status -w table >&2
# `simple` output: endpoint, id, version, db size, is leader, ...
ETCD_LEADER=$(etcd_ctl endpoint status -w simple | awk -F', ' '$5 == "true" {print $1}')
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

# TLS=1: members secure (their default), and the CLI uses the admin.conf
# (servers, CA, admin token) that member 1's bootstrap writes; TLS=0: both
# --insecure (plaintext, no authentication).
if ((TLS)); then
    BERTH_MEMBER_FLAGS=()
    BERTH_CLI=("$BERTH" --config "$WORK/berth/member-1/admin.conf")
else
    BERTH_MEMBER_FLAGS=(--insecure)
    BERTH_CLI=("$BERTH" --insecure)
fi
berth() { "${BERTH_CLI[@]}" "$@"; }

start_member() {
    local i=$1
    shift
    "$BERTH_CONTROL" --id "$i" --listen "${BERTH_ADDR[i]}" \
        --data-dir "$WORK/berth/member-$i" "${BERTH_MEMBER_FLAGS[@]}" "$@" \
        >"$WORK/berth/member-$i.log" 2>&1 &
    PIDS+=($!)
}

# Prints the number of voters when a leader is known, else nothing.
berth_voters() {
    berth --server "$BERTH_SERVERS" cluster status --output json 2>/dev/null |
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

log "starting a 3-member berth cluster in $WORK/berth$TLS_NOTE"
start_member 1 --bootstrap
wait_voters 1 # with TLS=1 this also waits for admin.conf
join=()
for i in 2 3; do
    if ((TLS)); then
        # A member join token for one use, made with admin.conf's token.
        join=(--token "$(berth --server "${BERTH_ADDR[1]}" token create --role member \
            --uses 1 --description bench-vs-etcd)")
    fi
    start_member "$i" --join "${BERTH_ADDR[1]}" "${join[@]}"
done
wait_voters 3
berth --server "$BERTH_SERVERS" cluster status >&2
BERTH_LEADER=$(berth --server "$BERTH_SERVERS" cluster status --output json | jq -r '.leader_addr // empty')
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
    "$ETCD_LOAD" --endpoints "$ETCD_ENDPOINTS" "${ETCD_TLS_FLAGS[@]}" --clients "$1" \
        --duration "$DURATION" --output json >"$WORK/$2.json"
}
run_berth() {
    berth --server "$BERTH_SERVERS" bench writes --clients "$1" --duration "$DURATION" \
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
if ((TLS)); then
    echo "TLS on (TLS=1): etcd https client and peer URLs, client certificates required on both; berth mTLS between members, the CLI over TLS with a token"
else
    echo "TLS off (TLS=0): plaintext on both sides (berth --insecure)"
fi
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
