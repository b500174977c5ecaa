#!/usr/bin/env bash
# make-image.sh DIR MIB KIND: writes DIR/os.img (a sparse MIB MiB GPT image),
# DIR/os.img.zst (zstd -3), with BMAP=1 also DIR/os.img.bmap (for
# bmaptool), and prints the raw image's SHA-256. KIND is `half-zero` (random data in 8 MiB runs with
# 8 MiB zero runs between them, the zeros left as holes) or `random`.
set -euo pipefail
dir=$1
mibs=$2
kind=$3
rm -f "$dir/os.img"
truncate -s "${mibs}M" "$dir/os.img"
sgdisk -n 1:1M:+64M -c 1:efi -n 2:0:0 -c 2:root "$dir/os.img" >/dev/null
case $kind in
    half-zero) step=16 ;;
    random) step=8 ;;
    *) echo "make-image.sh: KIND is half-zero or random, not $kind" >&2; exit 2 ;;
esac
# The tables' sectors (first and last MiB) stay as sgdisk wrote them.
for (( mib = 1; mib + 1 < mibs; mib += step )); do
    run=$(( mibs - 1 - mib < 8 ? mibs - 1 - mib : 8 ))
    head -c "${run}M" /dev/urandom | dd of="$dir/os.img" bs=1M seek="$mib" conv=notrunc status=none
done
zstd -q -f -T0 -3 "$dir/os.img" -o "$dir/os.img.zst"
if [ "${BMAP:-0}" = 1 ]; then
    bmaptool create -o "$dir/os.img.bmap" "$dir/os.img"
fi
sha256sum "$dir/os.img" | cut -d' ' -f1
