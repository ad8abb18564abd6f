#!/bin/sh
# The roles of the compose topology (docker-compose.yml), run by busybox sh
# inside the berth:local image. Member 1's data dir is mounted read-only at
# /m1 in the other containers: they take the agent token and the admin
# credentials from it (a demo on one machine; a real cluster hands tokens
# out with `berth token create`).
# Its settings come in as SEED_ADDR, HOST_ADDR, MEMBER_ID, BOOTSTRAP, SERVERS
# and GPUS, not BERTH_*: the binaries read BERTH_* variables as their own
# flags.
set -eu
role=${1:?usage: entrypoint.sh member|agent|gateway}

wait_for() {
    i=0
    while [ ! -s "$1" ]; do
        i=$((i + 1))
        if [ "$i" -gt 600 ]; then
            echo "error: waited 60 s for $1 (is member 1 up? docker-compose logs m1)" >&2
            exit 1
        fi
        sleep 0.1
    done
}

# A token of ROLE made through member 1 with the admin credentials, retried
# while the cluster is still starting.
token() {
    wait_for /m1/admin.conf
    i=0
    until berth --config /m1/admin.conf --server "$SEED_ADDR" token create --role "$1" \
        --description "compose $HOSTNAME" 2>/tmp/token.err; do
        i=$((i + 1))
        if [ "$i" -gt 100 ]; then cat /tmp/token.err >&2; exit 1; fi
        sleep 0.3
    done
}

case "$role" in
member)
    if [ -f /data/member.toml ]; then
        # A restart: the data dir knows the member and its cluster.
        exec berth-control --listen "$HOST_ADDR" --data-dir /data
    elif [ "${BOOTSTRAP:-}" = 1 ]; then
        exec berth-control --id "$MEMBER_ID" --listen "$HOST_ADDR" --data-dir /data --bootstrap
    else
        t=$(token member)
        exec berth-control --id "$MEMBER_ID" --listen "$HOST_ADDR" --data-dir /data \
            --join "$SEED_ADDR" --token "$t"
    fi
    ;;
agent)
    wait_for /m1/agent.token
    exec berth-agent --control "$SERVERS" --node-name "$HOSTNAME" --listen "$HOST_ADDR" \
        --data-dir /data --simulate-gpus "$GPUS" --token "$(cat /m1/agent.token)"
    ;;
gateway)
    if [ ! -s /data/gateway.token ]; then
        token gateway >/data/gateway.token.new && mv /data/gateway.token.new /data/gateway.token
    fi
    BERTH_GATEWAY_TOKEN=$(cat /data/gateway.token) exec berth-gateway --listen 0.0.0.0:8080 \
        --control "$SERVERS" --name "$HOSTNAME"
    ;;
*)
    echo "error: unknown role $role: it must be member, agent or gateway" >&2
    exit 2
    ;;
esac
