#!/usr/bin/env bash
# Benchmark: `reimage-agent write` (SHA-256 and read-back on) against the
# pipes an operator would otherwise use, writing a zstd image served from
# 127.0.0.1 onto a loop device:
#   A: curl | zstd -d | dd oflag=direct bs=4M
#   B: curl | zstd -d | tee >(sha256sum) | dd oflag=direct bs=4M
#   C: reimage-agent write --image URL --sha256 H --target /dev/loopN
# Prints each time, the ratios (higher = the agent is faster) and the
# agent's peak RSS. Needs root (loop devices). IMAGE_GIB (default 2) sets
# the image size; half of it is random data, the rest zero runs.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "bench/write.sh needs root for loop devices" >&2; exit 1; }
for tool in curl zstd sgdisk python3 bc /usr/bin/time; do
    command -v "$tool" >/dev/null || missing="${missing:-} $tool"
done
if [ -n "${missing:-}" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q curl zstd gdisk time python3 bc
fi

cargo build --release --bin reimage-agent
agent=$PWD/target/release/reimage-agent
gib=${IMAGE_GIB:-2}
work=$(mktemp -d /var/tmp/reimage-bench.XXXXXX)
server_pid=
loopdev=
cleanup() {
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
    [ -n "$loopdev" ] && losetup -d "$loopdev" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

echo "== making a ${gib} GiB image (random and zero regions, GPT)"
sha=$(bench/make-image.sh "$work" "$gib")
echo "compressed: $(stat -c %s "$work/os.img.zst") bytes"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 -m http.server "$port" --bind 127.0.0.1 --directory "$work" >/dev/null 2>&1 &
server_pid=$!
url="http://127.0.0.1:$port/os.img.zst"
for _ in $(seq 100); do curl -sfI "$url" >/dev/null && break; sleep 0.1; done

truncate -s "$(( gib + 1 ))G" "$work/disk.img"
loopdev=$(losetup --find --show "$work/disk.img")
echo "target: $loopdev"

seconds() { local start=$(date +%s.%N); "$@"; echo "$(date +%s.%N) - $start" | bc -l; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }

drop
t_a=$(seconds bash -c "curl -sf '$url' | zstd -dc | dd of=$loopdev oflag=direct bs=4M iflag=fullblock status=none")
drop
t_b=$(seconds bash -c "curl -sf '$url' | zstd -dc | tee >(sha256sum > '$work/sum') | dd of=$loopdev oflag=direct bs=4M iflag=fullblock status=none")
drop
t_c=$(seconds bash -c "/usr/bin/time -f '%M' -o '$work/rss' '$agent' write --image '$url' --sha256 '$sha' --target $loopdev >'$work/agent.log' 2>&1") || {
    cat "$work/agent.log" >&2
    exit 1
}
rss_kib=$(tail -1 "$work/rss")

printf '\n%-58s %8s\n' "pipeline (${gib} GiB image, zstd, 127.0.0.1 -> $loopdev)" "seconds"
printf '%-58s %8.2f\n' "A curl | zstd -d | dd oflag=direct bs=4M" "$t_a"
printf '%-58s %8.2f\n' "B curl | zstd -d | tee >(sha256sum) | dd oflag=direct" "$t_b"
printf '%-58s %8.2f\n' "C reimage-agent write (sha256 + read-back + GPT)" "$t_c"
printf '\nratio A/C: %.2f   ratio B/C: %.2f   (above 1: the agent is faster)\n' \
    "$(echo "$t_a / $t_c" | bc -l)" "$(echo "$t_b / $t_c" | bc -l)"
printf 'agent peak RSS: %d MiB\n' "$(( rss_kib / 1024 ))"
