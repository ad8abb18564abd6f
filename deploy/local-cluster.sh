#!/usr/bin/env bash
# Starts a 3-member Berth control plane on this machine (ports 7400, 7410,
# 7420; data in ${BERTH_LOCAL_DIR:-/tmp/berth-local}) and waits for it,
# then two agents with simulated GPUs (nodes gpu-1 on 7500, gpu-2 on 7510;
# BERTH_LOCAL_AGENTS=0 leaves them out) and a gateway, the OpenAI-compatible
# endpoint, on 127.0.0.1:8080 (BERTH_LOCAL_GATEWAY=0 leaves it out; it has
# its own gateway token). Secure like a real cluster: member 1
# bootstraps the CA, the others join with member tokens, agents with the
# agent token; the CLI uses $dir/1/admin.conf (export BERTH_CONFIG=...).
# Stop it with: deploy/local-cluster.sh stop
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${BERTH_LOCAL_DIR:-/tmp/berth-local}
bin=${BERTH_BIN_DIR:-target/release}

if [[ "${1:-}" == "stop" ]]; then
    for i in gateway agent-1 agent-2 1 2 3; do
        [[ -f "$dir/$i.pid" ]] && kill "$(cat "$dir/$i.pid")" 2>/dev/null || true
    done
    echo "stopped"
    exit 0
fi

[[ -x "$bin/berth-control" ]] || cargo build --release --bins
mkdir -p "$dir"
start() {
    local id=$1 port=$2; shift 2
    local args=(--listen "127.0.0.1:$port" --data-dir "$dir/$id")
    if [[ ! -f "$dir/$id/member.toml" ]]; then args+=(--id "$id" "$@"); fi
    "$bin/berth-control" "${args[@]}" >>"$dir/$id.log" 2>&1 &
    echo $! >"$dir/$id.pid"
}
start 1 7400 --bootstrap
export BERTH_CONFIG="$dir/1/admin.conf"
for _ in $(seq 100); do [[ -f "$BERTH_CONFIG" ]] && break; sleep 0.1; done
for _ in $(seq 50); do "$bin/berth" --server 127.0.0.1:7400 cluster status >/dev/null 2>&1 && break; sleep 0.1; done
member_token() {
    "$bin/berth" --server 127.0.0.1:7400 token create --role member --uses 1 --description "local-cluster.sh"
}
[[ -f "$dir/2/member.toml" ]] || start 2 7410 --join 127.0.0.1:7400 --token "$(member_token)"
[[ -f "$dir/2/member.toml" ]] && [[ ! -f "$dir/2.pid" || -z "$(ps -p "$(cat "$dir/2.pid")" -o pid= 2>/dev/null)" ]] && start 2 7410
[[ -f "$dir/3/member.toml" ]] || start 3 7420 --join 127.0.0.1:7400 --token "$(member_token)"
[[ -f "$dir/3/member.toml" ]] && [[ ! -f "$dir/3.pid" || -z "$(ps -p "$(cat "$dir/3.pid")" -o pid= 2>/dev/null)" ]] && start 3 7420
export BERTH_SERVER=127.0.0.1:7400,127.0.0.1:7410,127.0.0.1:7420
for _ in $(seq 100); do
    voters=$("$bin/berth" cluster members --output json 2>/dev/null | grep -c '"role": "\(leader\|follower\)"' || true)
    [[ "$voters" == 3 ]] && break
    sleep 0.1
done
"$bin/berth" cluster status
if [[ "${BERTH_LOCAL_AGENTS:-1}" != 0 ]]; then
    agent() {
        local n=$1 port=$2 gpus=$3
        "$bin/berth-agent" --control "$BERTH_SERVER" --node-name "gpu-$n" --listen "127.0.0.1:$port" \
            --data-dir "$dir/agent-$n" --simulate-gpus "$gpus" --token "$(cat "$dir/1/agent.token")" \
            >>"$dir/agent-$n.log" 2>&1 &
        echo $! >"$dir/agent-$n.pid"
    }
    agent 1 7500 2xA100-80GB
    agent 2 7510 4xL4-24GB
    for _ in $(seq 100); do
        ready=$("$bin/berth" node list --output json 2>/dev/null | grep -c '"state": "ready"' || true)
        [[ "$ready" == 2 ]] && break
        sleep 0.1
    done
    echo
    "$bin/berth" node list
fi
if [[ "${BERTH_LOCAL_GATEWAY:-1}" != 0 ]]; then
    if [[ ! -s "$dir/gateway.token" ]]; then
        (umask 077 && "$bin/berth" token create --role gateway --description "local-cluster.sh gateway" >"$dir/gateway.token")
    fi
    BERTH_GATEWAY_TOKEN="$(cat "$dir/gateway.token")" "$bin/berth-gateway" --listen 127.0.0.1:8080 \
        --control "$BERTH_SERVER" --name local-gateway >>"$dir/gateway.log" 2>&1 &
    echo $! >"$dir/gateway.pid"
    for _ in $(seq 100); do curl -sf http://127.0.0.1:8080/health >/dev/null 2>&1 && break; sleep 0.1; done
    echo
    echo "gateway on http://127.0.0.1:8080/v1 (curl http://127.0.0.1:8080/v1/models)"
fi
echo
echo "logs in $dir/*.log; use: export BERTH_CONFIG=$BERTH_CONFIG BERTH_SERVER=$BERTH_SERVER"
