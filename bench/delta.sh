#!/usr/bin/env bash
# Benchmark: a write through the block index against the full verified
# write of the same image, on the same loop device that holds the previous
# release. v1 is a GPT image with an ext4 root made by `mkfs.ext4 -d` from
# base64 text files (about 70 % full); v2 is v1 with 4 of its files
# rewritten in place and the file system made again with the same UUIDs,
# so the change is what a small OS update makes. Both are packed with
# `image pack --block-index` and served from 127.0.0.1 by a server with
# byte ranges and If-Range (tests/support/range_server.py), which counts the bytes
# it sends.
#   delta  reimage-agent write --manifest v2 (with its block index) onto
#          the device holding v1: compare, fetch and write what differs,
#          SHA-256 of the whole extent read back before the commit
#   full   the same manifest without the index: the whole image streamed,
#          hashed, written and read back
# Fair by construction: the loop device runs with --direct-io=on over a
# backing file written in full beforehand; both writes start from v1 on
# the device, after dropping the page cache; best of 3, interleaved. Only
# the ratio of one run means anything. Needs root.
# BENCH_MIB sets the image size (default 1024).
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "bench/delta.sh needs root for loop devices" >&2; exit 1; }
for tool in sgdisk python3 bc mkfs.ext4; do
    command -v "$tool" >/dev/null || missing="${missing:-} $tool"
done
if [ -n "${missing:-}" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q gdisk python3 bc e2fsprogs
fi

cargo build --release --bin reimage-agent
agent=$PWD/target/release/reimage-agent
mibs=${BENCH_MIB:-1024}
rounds=3
work=$(mktemp -d /var/tmp/reimage-bench.XXXXXX)
server_pid=
loopdev=
cleanup() {
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
    [ -n "$loopdev" ] && losetup -d "$loopdev" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

seconds() { local start; start=$(date +%s.%N); "$@" >/dev/null; echo "$(date +%s.%N) - $start" | bc -l; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
min() { if [ -z "$1" ] || (( $(echo "$2 < $1" | bc -l) )); then echo "$2"; else echo "$1"; fi; }

# The root's files: 8 MiB of base64 text each, about 70 % of the file system.
fs_mib=$(( mibs - 4 ))
files=$(( fs_mib * 7 / 10 / 8 ))
mkdir -p "$work/root/usr/lib" "$work/www"
text_file() { head -c 6M /dev/urandom | base64 -w 76 > "$1"; truncate -s 8M "$1"; }
for (( n = 0; n < files; n++ )); do
    text_file "$work/root/usr/lib/file$n"
done
head -c 2M /dev/urandom > "$work/efi.bin"

# image NAME: the root as it is now, made into www/NAME.img and packed.
image() {
    local name=$1 raw=$work/$1.img
    rm -f "$work/root.ext4" "$raw"
    E2FSPROGS_FAKE_TIME=1700000000 mkfs.ext4 -q -F -b 4096 \
        -U 2b4e5c9a-6f0d-4a55-9e3c-1f2a3b4c5d6e \
        -E hash_seed=7d1f0e2c-3b4a-4c5d-8e9f-0a1b2c3d4e5f,root_owner=0:0 \
        -d "$work/root" "$work/root.ext4" "${fs_mib}M"
    truncate -s "${mibs}M" "$raw"
    sgdisk -U 11111111-2222-3333-4444-555555555555 \
        -n 1:1M:+2M -c 1:efi -u 1:aaaaaaaa-0000-0000-0000-000000000001 \
        -n 2:3M:0 -c 2:root -u 2:aaaaaaaa-0000-0000-0000-000000000002 "$raw" >/dev/null
    dd if="$work/efi.bin" of="$raw" bs=1M seek=1 conv=notrunc status=none
    dd if="$work/root.ext4" of="$raw" bs=1M seek=3 conv=notrunc status=none
    "$agent" image pack --block-index -o "$work/www/$name.img.zst" "$raw" >/dev/null
    rm -f "$raw"
}
image v1
for n in 3 $(( files / 3 )) $(( files / 2 )) $(( files - 2 )); do
    text_file "$work/root/usr/lib/file$n.new"
    cat "$work/root/usr/lib/file$n.new" > "$work/root/usr/lib/file$n"
    rm "$work/root/usr/lib/file$n.new"
done
image v2
# The same release without its index: the full write's manifest.
python3 - "$work/www" <<'PY'
import json, sys
with open(sys.argv[1] + "/v2.img.zst.manifest.json") as f:
    manifest = json.load(f)
del manifest["blockIndex"]
with open(sys.argv[1] + "/v2-full.manifest.json", "w") as f:
    json.dump(manifest, f)
PY

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 tests/support/range_server.py "$port" "$work/www" &
server_pid=$!
base="http://127.0.0.1:$port"
for _ in $(seq 100); do python3 -c "import urllib.request; urllib.request.urlopen('$base/v1.img.zst.manifest.json')" 2>/dev/null && break; sleep 0.1; done

dd if=/dev/zero of="$work/backing.img" bs=4M count=$(( (mibs + 64) / 4 )) oflag=direct conv=fsync status=none
loopdev=$(bench/attach.sh "$work/backing.img")

write() { "$agent" write --manifest "$base/$1" --target "$loopdev" >"$work/last.out" 2>"$work/agent.log" || { cat "$work/agent.log" >&2; exit 1; }; }
served() { awk -v p="$1" '$1 == p { n += $2 } END { print n + 0 }' "$work/www/.served"; }

write v1.img.zst.manifest.json
declare -A best=()
for round in $(seq "$rounds"); do
    : > "$work/www/.served"
    drop
    t=$(seconds write v2.img.zst.manifest.json)
    best[delta]=$(min "${best[delta]:-}" "$t")
    fetched=$(served /v2.img.zst)
    written=$(sed -n 's/.*wrote \([0-9]*\) bytes, kept.*/\1/p' "$work/last.out")
    write v1.img.zst.manifest.json
    drop
    t=$(seconds write v2-full.manifest.json)
    best[full]=$(min "${best[full]:-}" "$t")
    write v1.img.zst.manifest.json
    echo "  round $round: delta ${best[delta]} s, full ${best[full]} s (best so far)" >&2
done
packed=$(stat -c %s "$work/www/v2.img.zst")
image_bytes=$(( mibs << 20 ))
echo
echo "best of $rounds, $mibs MiB image (ext4 root, 4 of $files files changed), from 127.0.0.1 to a loop device (--direct-io=on) holding v1"
echo "| write of v2 | time | × full |"
echo "|---|---|---|"
printf '| through the block index | %5.2f s | %4.2f× |\n' "${best[delta]}" "$(echo "${best[delta]} / ${best[full]}" | bc -l)"
printf '| full verified write | %5.2f s | 1.00× |\n' "${best[full]}"
printf 'fetched %d of %d compressed bytes (%.1f %%); wrote %d of %d bytes (%.1f %%)\n' \
    "$fetched" "$packed" "$(echo "$fetched * 100 / $packed" | bc -l)" \
    "$written" "$image_bytes" "$(echo "$written * 100 / $image_bytes" | bc -l)"
