#!/usr/bin/env bash
# Builds a small GPT test image and its manifest, for integration tests and
# trying the agent by hand. Needs no root: sgdisk and dd on a plain file.
#
#   images/build-test-image.sh OUTDIR [SIZE] [--agent BINARY] [--name NAME]
#
# OUTDIR gets NAME.img (default test.img), NAME.img.zst and
# NAME.img.zst.manifest.json (`reimage-agent image pack`). SIZE defaults to
# 128M and must be a whole number of MiB, at least 16M. Layout: GPT with
# `efi` (EF00, an eighth of the image from 1 MiB) and `root` (8300, the
# rest); every other sixteenth of the image, from the start of `efi`, is
# random, the rest zeros: the agent's zeroout path and its data path both
# get exercised, and the first MiB (partition table) is untouched.
#
# Without --agent the release binary is built with cargo.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
    exit 2
}
die() { echo "error: build-test-image: $*" >&2; exit 1; }

repo=$(cd "$(dirname "$0")/.." && pwd)
args=()
agent=""
name="test"
while [ $# -gt 0 ]; do
    case "$1" in
        --agent) agent=${2:?--agent needs BINARY}; shift 2 ;;
        --name) name=${2:?--name needs NAME}; shift 2 ;;
        -h|--help) usage ;;
        -*) die "unknown option $1" ;;
        *) args+=("$1"); shift ;;
    esac
done
if [ "${#args[@]}" -lt 1 ] || [ "${#args[@]}" -gt 2 ]; then usage; fi
out=${args[0]}
size=${args[1]:-128M}

bytes=$(numfmt --from=iec "$size") || die "bad size $size"
[ $((bytes % (1 << 20))) -eq 0 ] || die "size $size is not a whole number of MiB"
mib=$((bytes >> 20))
[ "$mib" -ge 16 ] || die "size $size is below 16M"

if ! command -v sgdisk >/dev/null; then
    echo "skipping: sgdisk is not installed (apt-get install gdisk)"
    exit 0
fi
if [ -z "$agent" ]; then
    (cd "$repo" && cargo build --release --quiet --bin reimage-agent)
    agent=${CARGO_TARGET_DIR:-$repo/target}/release/reimage-agent
fi
[ -x "$agent" ] || die "no agent binary at $agent"

mkdir -p "$out"
img=$out/$name.img
rm -f "$img"
truncate -s "${mib}M" "$img"
efi_mib=$((mib / 8))
sgdisk -o -n "1:1M:+${efi_mib}M" -t 1:ef00 -c 1:efi -n 2:0:0 -t 2:8300 -c 2:root "$img" >/dev/null
# Sixteenths, rounded down to MiB; the last MiB keeps the backup GPT.
chunk=$((mib / 16))
for ((at = 1; at + chunk < mib; at += 2 * chunk)); do
    head -c "${chunk}M" /dev/urandom | dd of="$img" bs=1M seek="$at" conv=notrunc status=none
done
"$agent" image pack "$img" -o "$img.zst"
