#!/usr/bin/env bash
# Where a lone write's time goes, from packet timestamps on loopback.
#
# Starts a 3-member cluster from target/release (member 1 leads), runs
# `berth bench writes --clients 1` against the leader, captures the three
# members' gRPC ports with tcpdump for CAPTURE seconds in the middle of the
# run, and prints, per write, the medians and p90 of:
#   ingress   the request's last packet at the leader -> its first AppendEntries out
#   follower  AppendEntries out -> the first follower's reply (its append and fsync)
#   egress    the first follower's reply -> the response to the client
#   total     the request's last packet -> the response (the member side of a write)
# and how many responses waited for the second follower's reply.
#
# Not part of CI. Run as root (it apt-get installs tcpdump, python3 and jq
# when missing):   sudo scripts/write-path.sh        (DURATION=8s CAPTURE=2)
# tcpdump adds some overhead: compare runs of this script with each other,
# not with `berth bench writes` alone.
set -euo pipefail

DURATION="${DURATION:-8s}"
CAPTURE="${CAPTURE:-2}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${BIN:-$ROOT/target/release}"

if [[ $EUID -ne 0 ]]; then
    echo "write-path: run as root (tcpdump needs it)" >&2
    exit 1
fi
missing=()
command -v tcpdump >/dev/null 2>&1 || missing+=(tcpdump)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v jq >/dev/null 2>&1 || missing+=(jq)
if ((${#missing[@]})); then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi
[[ -x "$BIN/berth-control" && -x "$BIN/berth" ]] || (cd "$ROOT" && cargo build --release --bins)

WORK="$(mktemp -d -t write-path.XXXXXX)"
PIDS=()
cleanup() {
    local rc=$?
    ((${#PIDS[@]})) && kill "${PIDS[@]}" 2>/dev/null
    wait 2>/dev/null || true
    if [[ -n "${KEEP:-}" || $rc -ne 0 ]]; then echo "write-path: kept $WORK" >&2; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT

# Three consecutive ports below the kernel's ephemeral range, unused.
low=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range)
while :; do
    P1=$((10000 + RANDOM % (low - 10003)))
    busy=0
    for p in $P1 $((P1 + 1)) $((P1 + 2)); do
        [[ -n "$(ss -Htan "sport = :$p")" ]] && busy=1
    done
    ((busy)) || break
done
P2=$((P1 + 1))
P3=$((P1 + 2))
member() {
    local id=$1 port=$2
    shift 2
    "$BIN/berth-control" --id "$id" --listen "127.0.0.1:$port" --data-dir "$WORK/$id" \
        --insecure "$@" >"$WORK/$id.log" 2>&1 &
    PIDS+=($!)
}
member 1 "$P1" --bootstrap
for _ in $(seq 100); do "$BIN/berth" --server "127.0.0.1:$P1" cluster status >/dev/null 2>&1 && break; sleep 0.1; done
member 2 "$P2" --join "127.0.0.1:$P1"
member 3 "$P3" --join "127.0.0.1:$P1"
voters=0
for _ in $(seq 300); do
    voters=$("$BIN/berth" --server "127.0.0.1:$P1" cluster status --output json 2>/dev/null |
        jq -r 'select(.leader_id == 1) | [.members[] | select(.role != "learner")] | length' 2>/dev/null || true)
    [[ "$voters" == 3 ]] && break
    sleep 0.1
done
if [[ "$voters" != 3 ]]; then
    tail -n 5 "$WORK"/*.log >&2
    echo "write-path: no 3-member cluster led by member 1 within 30 s" >&2
    exit 1
fi

"$BIN/berth" --server "127.0.0.1:$P1" bench writes --clients 1 --duration "$DURATION" \
    --output json >"$WORK/bench.json" 2>/dev/null &
bench=$!
sleep 2
timeout -s INT "$CAPTURE" tcpdump -i lo -s 96 -w "$WORK/cap.pcap" \
    "tcp port $P1 or tcp port $P2 or tcp port $P3" 2>/dev/null || true
wait "$bench"
tcpdump -r "$WORK/cap.pcap" -nn -tt 2>/dev/null >"$WORK/cap.txt"

echo "berth bench writes --clients 1: $(jq -c '{writes_per_sec, p50_ms, p99_ms}' "$WORK/bench.json")"
python3 - "$WORK/cap.txt" "$P1" "$P2" "$P3" <<'EOF'
import re, sys
path, leader, *followers = sys.argv[1:]
rx = re.compile(r"([\d.]+) IP 127\.0\.0\.1\.(\d+) > 127\.0\.0\.1\.(\d+): .* length (\d+)")
writes, w = [], None
for line in open(path):
    m = rx.match(line)
    if not m or int(m[4]) == 0:
        continue
    t, src, dst, n = float(m[1]), m[2], m[3], int(m[4])
    if dst == leader and src not in followers:
        # A request is a HEADERS and a DATA packet: keep the last one.
        if w is None or w["resp"] is not None:
            w = {"req": t, "ae": {}, "reply": {}, "resp": None}
        else:
            w["req"] = t
    elif w is None or w["resp"] is not None:
        continue
    elif dst in followers and n > 100:
        w["ae"].setdefault(dst, t)  # AppendEntries with the entry
    elif src in followers and dst not in followers and src in w["ae"]:
        w["reply"].setdefault(src, t)
    elif src == leader and dst not in followers and n > 100:
        w["resp"] = t
        if w["ae"] and w["reply"]:
            writes.append(w)
if not writes:
    sys.exit("write-path: no complete write in the capture")
def row(name, values):
    v = sorted(x * 1e6 for x in values)
    print(f"  {name:9s} p50 {v[len(v) // 2]:6.0f} us   p90 {v[int(len(v) * 0.9)]:6.0f} us")
print(f"{len(writes)} writes captured:")
row("ingress", [min(w["ae"].values()) - w["req"] for w in writes])
row("follower", [min(w["reply"].values()) - min(w["ae"].values()) for w in writes])
row("egress", [w["resp"] - min(w["reply"].values()) for w in writes])
row("total", [w["resp"] - w["req"] for w in writes])
late = sum(1 for w in writes if len(w["reply"]) == 2 and w["resp"] > max(w["reply"].values()))
print(f"  responses sent after both followers replied: {late} of {len(writes)}")
EOF
