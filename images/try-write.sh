#!/usr/bin/env bash
# Sets up and runs one full `reimage-agent write` in a sandbox directory:
# builds the agent, makes an OS image and a target disk whose local-storage
# partition holds random data, writes the image, and shows that the
# partition survived byte for byte. Safe: it only touches files under
# ${SANDBOX:-./reimage-sandbox}.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v sgdisk >/dev/null || ! command -v zstd >/dev/null; then
    echo "== installing gdisk and zstd"
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q gdisk zstd
fi

echo "== building reimage-agent (release)"
cargo build --release --bin reimage-agent
agent=$PWD/target/release/reimage-agent

sandbox=${SANDBOX:-$PWD/reimage-sandbox}
rm -rf "$sandbox" && mkdir -p "$sandbox" && cd "$sandbox"

echo "== making a 128 MiB OS image: GPT with efi and root, random and zero regions"
truncate -s 128M os.img
sgdisk -n 1:1M:+32M -t 1:ef00 -c 1:efi -n 2:0:0 -t 2:8300 -c 2:root os.img >/dev/null
for mib in 1 8 40 64 100; do
    head -c 4M /dev/urandom | dd of=os.img bs=1M seek="$mib" conv=notrunc status=none
done
"$agent" image pack os.img -o os.img.zst

echo "== making a 512 MiB target: an old root and local-storage (64 MiB of data) at the end"
truncate -s 512M disk.img
sgdisk -n 1:1M:+400M -c 1:old-root -n 2:0:0 -c 2:local-storage disk.img >/dev/null
start=$(sgdisk -i 2 disk.img | awk '/First sector/ {print $3}')
head -c 64M /dev/urandom | dd of=disk.img bs=512 seek="$start" conv=notrunc status=none
storage_sha() { sgdisk -i "$1" disk.img >/dev/null; dd if=disk.img bs=512 skip="$start" count="$(( $(sgdisk -i "$1" disk.img | awk '/Last sector/ {print $3}') - start + 1 ))" status=none | sha256sum | cut -d' ' -f1; }
before=$(storage_sha 2)
echo "local-storage sha256 before: $before"

echo "== reimage-agent write --manifest os.img.zst.manifest.json --target disk.img --save-partlabel local-storage"
"$agent" write --manifest os.img.zst.manifest.json --target disk.img --save-partlabel local-storage

echo "== the new partition table"
sgdisk -p disk.img | sed -n '/^Number/,$p'
index=$(sgdisk -p disk.img | awk '$NF == "local-storage" {print $1}')
after=$(storage_sha "$index")
echo "local-storage sha256 after:  $after"
if [ "$before" = "$after" ]; then
    echo "== local-storage kept byte for byte; the image is written, verified and read back"
else
    echo "!! local-storage changed" >&2
    exit 1
fi
