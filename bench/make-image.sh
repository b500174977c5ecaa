#!/usr/bin/env bash
# make-image.sh DIR GIB: writes DIR/os.img.zst (a GIB GiB GPT image, half
# random data in 8 MiB runs, half zero runs) and prints its raw SHA-256.
set -euo pipefail
dir=$1
gib=$2
truncate -s "${gib}G" "$dir/os.img"
sgdisk -n 1:1M:+64M -c 1:efi -n 2:0:0 -c 2:root "$dir/os.img" >/dev/null
mibs=$(( gib * 1024 ))
for (( mib = 1; mib + 8 < mibs; mib += 16 )); do
    head -c 8M /dev/urandom | dd of="$dir/os.img" bs=1M seek="$mib" conv=notrunc status=none
done
zstd -q -T0 -3 "$dir/os.img" -o "$dir/os.img.zst"
sha256sum "$dir/os.img" | cut -d' ' -f1
rm "$dir/os.img"
