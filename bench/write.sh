#!/usr/bin/env bash
# Benchmark: `reimage-agent write` (SHA-256 and read-back on) against what an
# operator would otherwise run, each writing a zstd -3 image served from
# 127.0.0.1 onto the same loop device. Fair by construction:
#   - the loop device runs with --direct-io=on over a backing file written
#     in full beforehand, so no host page cache sits between a tool and the
#     "disk" and no write allocates blocks;
#   - the image server (tests/support/range_server.py) sends with
#     sendfile(2), so it takes almost no CPU from the peers on this host;
#   - every peer is durable (dd conv=fsync, O_DIRECT where it has it;
#     bmaptool fsyncs at its end);
#   - best of 3, the peers interleaved round by round; timings on a shared
#     disk drift between runs, so only the ratios of one run mean anything.
# Peers:
#   agent     reimage-agent write --image URL --sha256 H (read-back, GPT)
#   pipe      curl | zstd -dc | dd oflag=direct conv=fsync   (no check)
#   pipe+sha  the same with tee >(sha256sum)                  (no read-back)
#   bmaptool  bmaptool copy --bmap (zero runs skipped, no read-back)
#   floor     the verified floor: dd of the image's non-zero bytes from RAM
#             (oflag=direct conv=fsync), then dd iflag=direct reading them back
# Ratios are time / floor (below 1: faster than writing and reading back the
# data serially). Also prints the agent's peak RSS. Needs root.
# BENCH_MIB="1024 512" sets the two image sizes (half-zero, random).
# BENCH_DISK_MBPS=N caps the loop device's reads and writes at N MB/s each
# (blk-throttle, through the blkio or io cgroup controller), for the same
# comparison on a disk slower than this machine's, one that the CPU can
# keep up with.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "bench/write.sh needs root for loop devices" >&2; exit 1; }
for tool in curl zstd sgdisk python3 bc bmaptool /usr/bin/time; do
    command -v "$tool" >/dev/null || missing="${missing:-} $tool"
done
if [ -n "${missing:-}" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q curl zstd gdisk time python3 bc bmap-tools
fi

cargo build --release --bin reimage-agent
agent=$PWD/target/release/reimage-agent
read -r half_mib random_mib <<<"${BENCH_MIB:-1024 512}"
rounds=3
work=$(mktemp -d /var/tmp/reimage-bench.XXXXXX)
shm=$(mktemp -d /dev/shm/reimage-bench.XXXXXX)
server_pid=
loopdev=
group=
cleanup() {
    if [ -n "$group" ]; then
        echo $$ > "$(dirname "$group")/cgroup.procs" 2>/dev/null || true
        rmdir "$group" 2>/dev/null || true
    fi
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
    [ -n "$loopdev" ] && losetup -d "$loopdev" 2>/dev/null || true
    rm -rf "$work" "$shm"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# sendfile(2) keeps the server off the CPU the peers share (a node and its
# image server are different machines).
python3 tests/support/range_server.py "$port" "$work" >/dev/null 2>&1 &
server_pid=$!

seconds() { local start; start=$(date +%s.%N); "$@" >/dev/null; echo "$(date +%s.%N) - $start" | bc -l; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
min() { if [ -z "$1" ] || (( $(echo "$2 < $1" | bc -l) )); then echo "$2"; else echo "$1"; fi; }

# With BENCH_DISK_MBPS, moves this shell (and so every peer it starts) into
# a cgroup whose reads and writes of DEVICE are capped at that rate.
throttle() {
    [ -n "${BENCH_DISK_MBPS:-}" ] || return 0
    local bps=$(( BENCH_DISK_MBPS * 1000000 )) dev
    dev=$(lsblk -dno MAJ:MIN "$1" | tr -d ' ')
    if [ -d /sys/fs/cgroup/blkio ]; then
        group=/sys/fs/cgroup/blkio/reimage-bench
        mkdir -p "$group"
        echo "$dev $bps" > "$group/blkio.throttle.write_bps_device"
        echo "$dev $bps" > "$group/blkio.throttle.read_bps_device"
    else
        group=/sys/fs/cgroup/reimage-bench
        echo +io > /sys/fs/cgroup/cgroup.subtree_control
        mkdir -p "$group"
        echo "$dev rbps=$bps wbps=$bps" > "$group/io.max"
    fi
    echo $$ > "$group/cgroup.procs"
}

# Writes the whole device with data: the agent's zeroing punches holes in
# the backing file (the loop device's write-zeroes), and the next peer must
# not pay for allocating them again.
prefill() {
    dd if=/dev/zero of="$loopdev" bs=4M oflag=direct conv=fsync status=none 2>/dev/null || true
}

# One image: KIND MIB. Appends its table row to $work/rows.
bench_image() {
    local kind=$1 mibs=$2 sha url allocated floor_mib rss_kib=0
    sha=$(BMAP=1 bench/make-image.sh "$work" "$mibs" "$kind")
    url="http://127.0.0.1:$port/os.img.zst"
    for _ in $(seq 100); do curl -sfI "$url" >/dev/null && break; sleep 0.1; done
    # The non-zero bytes, as the sparse raw image holds them.
    allocated=$(du --block-size=1 "$work/os.img" | cut -f1)
    floor_mib=$(( (allocated + (1 << 20) - 1) >> 20 ))
    head -c "${floor_mib}M" /dev/urandom > "$shm/data"

    # The backing file is written in full (no holes) before the device is
    # set up; the loop device reads and writes it with O_DIRECT.
    local disk_mib=$(( mibs + 64 ))
    dd if=/dev/zero of="$work/backing.img" bs=4M count=$(( disk_mib / 4 )) oflag=direct conv=fsync status=none
    loopdev=$(bench/attach.sh "$work/backing.img")
    throttle "$loopdev"

    local -A best=()
    for round in $(seq "$rounds"); do
        drop
        t=$(seconds bash -c "/usr/bin/time -f '%M' -o '$work/rss' '$agent' write --image '$url' --sha256 '$sha' --target $loopdev 2>'$work/agent.log'") || {
            cat "$work/agent.log" >&2; exit 1; }
        best[agent]=$(min "${best[agent]:-}" "$t")
        prefill
        rss_kib=$(( $(tail -1 "$work/rss") > rss_kib ? $(tail -1 "$work/rss") : rss_kib ))
        drop
        t=$(seconds bash -c "curl -sf '$url' | zstd -dc | dd of=$loopdev bs=4M iflag=fullblock oflag=direct conv=fsync status=none")
        best[pipe]=$(min "${best[pipe]:-}" "$t")
        drop
        rm -f "$work/sum"
        t=$(seconds bash -c "curl -sf '$url' | zstd -dc | tee >(sha256sum > '$work/sum') | dd of=$loopdev bs=4M iflag=fullblock oflag=direct conv=fsync status=none; while [ ! -s '$work/sum' ]; do sleep 0.01; done")
        [ "$(cut -d' ' -f1 "$work/sum")" = "$sha" ] || { echo "pipe+sha: wrong sha256" >&2; exit 1; }
        best[pipe_sha]=$(min "${best[pipe_sha]:-}" "$t")
        drop
        t=$(seconds bmaptool -q copy --bmap "$work/os.img.bmap" "$url" "$loopdev")
        best[bmaptool]=$(min "${best[bmaptool]:-}" "$t")
        drop
        t=$(seconds bash -c "dd if='$shm/data' of=$loopdev bs=4M oflag=direct conv=fsync status=none && dd if=$loopdev of=/dev/null bs=4M iflag=direct count=$(( floor_mib / 4 )) status=none")
        best[floor]=$(min "${best[floor]:-}" "$t")
        echo "  round $round of $kind: agent ${best[agent]} pipe ${best[pipe]} pipe+sha ${best[pipe_sha]} bmaptool ${best[bmaptool]} floor ${best[floor]} (best so far)" >&2
    done
    losetup -d "$loopdev"
    loopdev=
    rm -f "$work/backing.img"

    local f=${best[floor]} label
    label="$mibs MiB, $kind ($(( floor_mib )) MiB non-zero)"
    printf '| %-36s | %5.2f s (%4.2f×) | %5.2f s (%4.2f×) | %5.2f s (%4.2f×) | %5.2f s (%4.2f×) | %5.2f s |\n' "$label" >> "$work/rows" \
        "${best[agent]}" "$(echo "${best[agent]} / $f" | bc -l)" \
        "${best[pipe]}" "$(echo "${best[pipe]} / $f" | bc -l)" \
        "${best[pipe_sha]}" "$(echo "${best[pipe_sha]} / $f" | bc -l)" \
        "${best[bmaptool]}" "$(echo "${best[bmaptool]} / $f" | bc -l)" \
        "$f"
    printf 'agent peak RSS (%s): %d MiB; agent / pipe: %.2f×\n' "$kind" "$(( rss_kib / 1024 ))" \
        "$(echo "${best[agent]} / ${best[pipe]}" | bc -l)" >> "$work/notes"
}

bench_image half-zero "$half_mib"
bench_image random "$random_mib"
echo
echo "best of $rounds, zstd -3 from 127.0.0.1 to a loop device (--direct-io=on${BENCH_DISK_MBPS:+, reads and writes capped at $BENCH_DISK_MBPS MB/s}); × = time / verified floor"
echo "| image | agent (SHA-256 + read-back) | curl\|zstd -dc\|dd oflag=direct conv=fsync | same with tee >(sha256sum) | bmaptool copy --bmap | verified floor |"
echo "|---|---|---|---|---|---|"
cat "$work/rows"
cat "$work/notes"
