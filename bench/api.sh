#!/usr/bin/env bash
# Benchmark of the daemon: idle RSS of `reimage-agent serve`, and the
# latency of GET /v1/node under an open-loop 1,000 requests/s, idle and
# while a reimage writes a 2 GiB zstd image (IMAGE_GIB) to a disk file;
# also how much that load slows the write. Printed, not asserted.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in curl zstd sgdisk python3 bc; do
    command -v "$tool" >/dev/null || missing="${missing:-} $tool"
done
if [ -n "${missing:-}" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q curl zstd gdisk python3 bc
fi
cargo build --release --bin reimage-agent --bin api-load
agent=$PWD/target/release/reimage-agent
load=$PWD/target/release/api-load
gib=${IMAGE_GIB:-2}
rate=${RATE:-1000}
work=$(mktemp -d /var/tmp/reimage-api-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

echo "== making a ${gib} GiB image"
sha=$(bench/make-image.sh "$work" "$(( gib * 1024 ))" half-zero)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
image_port=$(free_port)
python3 tests/support/range_server.py "$image_port" "$work" >/dev/null 2>&1 &
pids+=($!)
url="http://127.0.0.1:$image_port/os.img.zst"

echo "== making a $(( gib + 1 )) GiB target with local-storage at its end"
truncate -s "$(( gib + 1 ))G" "$work/disk.img"
sgdisk -n 1:1M:+64M -c 1:old-root -n 2:-256M:0 -c 2:local-storage "$work/disk.img" >/dev/null

token=bench-admin-token
api_port=$(free_port)
cat > "$work/agent.toml" <<TOML
[agent]
node_id = "bench"
state_dir = "$work/state"
[api]
listen = "127.0.0.1:$api_port"
[[api.tokens]]
sha256 = "$(printf %s "$token" | sha256sum | cut -d' ' -f1)"
role = "admin"
[disk]
target = "$work/disk.img"
save_partlabel = ["local-storage"]
[reboot]
method = "none"
TOML
RUST_LOG=warn "$agent" serve --config "$work/agent.toml" 2>"$work/agent.log" &
agent_pid=$!
pids+=($agent_pid)
api="http://127.0.0.1:$api_port"
for _ in $(seq 100); do curl -sf "$api/healthz" >/dev/null && break; sleep 0.1; done
sleep 2
idle_rss=$(awk '/VmRSS/ {print $2}' "/proc/$agent_pid/status")

reimage() {
    curl -sf -X POST -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
        -d "{\"image\":{\"url\":\"$url\",\"sha256\":\"$sha\"}}" "$api/v1/node/reimage" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])'
}
wait_op() {
    while :; do
        status=$(curl -sf -H "Authorization: Bearer $token" "$api/v1/operations/$1" |
            python3 -c 'import json,sys; o=json.load(sys.stdin); print(o["status"], o["createdAt"], o["updatedAt"])')
        case $status in InProgress*) sleep 0.2 ;; *) echo "$status"; return ;; esac
    done
}
op_seconds() { python3 -c 'import sys,datetime as d; f=lambda s: d.datetime.fromisoformat(s[:26].rstrip("Z")); print((f(sys.argv[2])-f(sys.argv[1])).total_seconds())' "$1" "$2"; }

echo "== GET /v1/node at $rate req/s, idle, 5 s"
idle=$("$load" "$api/v1/node" "$token" "$rate" 5)

echo "== a reimage without load"
read -r status created updated < <(wait_op "$(reimage)")
[ "$status" = Succeeded ] || { echo "reimage failed: $status" >&2; tail "$work/agent.log" >&2; exit 1; }
quiet=$(op_seconds "$created" "$updated")

# Load for as long as the write took alone, so it covers the write.
busy_seconds=$(python3 -c "import math,sys; print(max(2, math.ceil(float(sys.argv[1]))))" "$quiet")
echo "== a reimage under $rate req/s for ${busy_seconds} s"
op=$(reimage)
busy=$("$load" "$api/v1/node" "$token" "$rate" "$busy_seconds")
read -r status created updated < <(wait_op "$op")
[ "$status" = Succeeded ] || { echo "reimage failed: $status" >&2; exit 1; }
loaded=$(op_seconds "$created" "$updated")
peak_rss=$(awk '/VmHWM/ {print $2}' "/proc/$agent_pid/status")

printf '\nidle RSS of serve: %d KiB (%.1f MiB); peak RSS over the run: %.1f MiB\n' "$idle_rss" "$(echo "$idle_rss / 1024" | bc -l)" "$(echo "$peak_rss / 1024" | bc -l)"
printf 'GET /v1/node, idle:          %s\n' "$idle"
printf 'GET /v1/node, during write:  %s\n' "$busy"
printf 'reimage of %s GiB: %.2f s alone, %.2f s under load (slowdown %.1f%%)\n' "$gib" "$quiet" "$loaded" \
    "$(echo "($loaded / $quiet - 1) * 100" | bc -l)"
