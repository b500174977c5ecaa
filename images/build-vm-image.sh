#!/usr/bin/env bash
# Builds a bootable minimal Debian (bookworm) disk image with reimage-agent
# installed and enabled, without loop mounts: debootstrap into a directory,
# `mkfs.ext4 -d` to turn directories into file systems, `mkfs.vfat -C` and
# `mcopy` for the EFI system partition, `sgdisk` for the partition tables,
# `dd conv=notrunc` to put each file system in place.
#
# The image boots by itself through UEFI: its ESP holds a standalone GRUB
# at the removable path \EFI\BOOT\BOOTX64.EFI whose built-in config finds
# that ESP by its FAT volume id (new with each build) and boots the kernel
# and initramfs next to it with `reimage.image=TAG` on the command line.
#
#   images/build-vm-image.sh OUTDIR [--marker TEXT] [--token-file FILE]
#       [--agent BINARY] [--cache DIR] [--disk-size SIZE] [--storage-size SIZE]
#       [--staging auto|memory|state_dir]
#
# OUTDIR gets:
#   vmlinuz, initrd.img    the guest's kernel and initramfs (also on the ESP)
#   esp.img                the EFI system partition (FAT, PARTLABEL `esp`)
#   root.img               the root file system (ext4, label and PARTLABEL `root`)
#   disk.img               the whole disk: GPT, 1: esp, 2: root, 3 (last):
#                          local-storage
#   os.img                 the OS image: GPT with `esp` and `root`, ending
#                          before local-storage starts on disk.img
#   os.img.zst(.manifest.json, .index.json)  os.img packed by
#                          `reimage-agent image pack --block-index`
#   saved.sha256           sha256sum line of saved.txt on local-storage
#   admin.token            the API admin token (unless --token-file names one)
#   image.env              shell variables describing all of the above
#
# TAG is --marker with every character but letters, digits, `.`, `_` and
# `-` turned into `-` ("old image" boots with `reimage.image=old-image`).
# Two builds with different --marker give an "old" and a "new" image; give
# both the same --token-file so one token works before and after a reimage.
# The debootstrapped root file system is cached under --cache (default
# /var/cache/reimage-vm), keyed by a hash of its recipe, and OUTDIR is left
# alone when nothing that goes into it changed: reruns take seconds.
#
# Needs root (debootstrap). Without root, or when the tools cannot be
# installed, it prints `skipping: <reason>` and exits 0.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
    exit 2
}
die() { echo "error: build-vm-image: $*" >&2; exit 1; }
say() { echo "build-vm-image: $*"; }

repo=$(cd "$(dirname "$0")/.." && pwd)
out=""
marker="reimage-vm"
token_file=""
agent=""
cache=${REIMAGE_VM_CACHE:-/var/cache/reimage-vm}
disk_size=4G
storage_size=1G
staging=auto
while [ $# -gt 0 ]; do
    case "$1" in
        --marker) marker=${2:?--marker needs TEXT}; shift 2 ;;
        --token-file) token_file=${2:?--token-file needs FILE}; shift 2 ;;
        --agent) agent=${2:?--agent needs BINARY}; shift 2 ;;
        --cache) cache=${2:?--cache needs DIR}; shift 2 ;;
        --disk-size) disk_size=${2:?--disk-size needs SIZE}; shift 2 ;;
        --storage-size) storage_size=${2:?--storage-size needs SIZE}; shift 2 ;;
        --staging) staging=${2:?--staging needs auto, memory or state_dir}; shift 2 ;;
        -h|--help) usage ;;
        -*) die "unknown option $1" ;;
        *) [ -z "$out" ] || die "one OUTDIR only"; out=$1; shift ;;
    esac
done
[ -n "$out" ] || usage
case "$staging" in auto|memory|state_dir) ;; *) die "--staging must be auto, memory or state_dir" ;; esac

if [ "$(id -u)" -ne 0 ]; then
    echo "skipping: build-vm-image.sh needs root (debootstrap chroots and sets owners)"
    exit 0
fi
for tool in debootstrap sgdisk mkfs.ext4 zstd mkfs.vfat mcopy grub-mkstandalone jq; do
    if ! command -v "$tool" >/dev/null; then
        bash "$repo/images/install-vm-tools.sh" ||
            { echo "skipping: cannot install the VM tools (see the error above)"; exit 0; }
        break
    fi
done

# Sizes in MiB, so every offset below stays MiB-aligned.
to_mib() {
    local n
    n=$(numfmt --from=iec "$1") || die "bad size $1"
    [ $((n % (1 << 20))) -eq 0 ] || die "size $1 is not a whole number of MiB"
    echo $((n >> 20))
}
disk_mib=$(to_mib "$disk_size")
storage_mib=$(to_mib "$storage_size")

if [ -z "$agent" ]; then
    say "building reimage-agent (release)"
    (cd "$repo" && cargo build --release --quiet --bin reimage-agent)
    agent=${CARGO_TARGET_DIR:-$repo/target}/release/reimage-agent
fi
[ -x "$agent" ] || die "no agent binary at $agent"
agent=$(realpath "$agent")

mkdir -p "$out" "$cache"
out=$(realpath "$out")

# --- the cached root file system -------------------------------------------
# Everything that decides its content is in the recipe, so a change to any of
# it makes a new cache entry instead of reusing a stale one.
suite=bookworm
mirror=${REIMAGE_VM_MIRROR:-http://deb.debian.org/debian}
# systemd-networkd (part of systemd) does DHCP: no ifupdown or dhclient.
# efibootmgr: the VM test reads the firmware's boot entries in the guest.
include=systemd-sysv,udev,linux-image-cloud-amd64,busybox-static,e2fsprogs,kmod,iproute2,ca-certificates,efibootmgr
recipe="suite=$suite variant=minbase include=$include tidy=3"
rootfs_key=$(printf %s "$recipe" | sha256sum | cut -c1-16)
rootfs=$cache/rootfs-$rootfs_key

# One builder at a time per cache: a second one waits, then reuses the result.
exec 9>"$cache/.lock"
flock 9

if [ ! -d "$rootfs" ]; then
    say "debootstrap $suite (minbase) into $rootfs: 1-3 minutes"
    partial=$rootfs.partial
    rm -rf "$partial"
    started=$SECONDS
    debootstrap --variant=minbase --include="$include" "$suite" "$partial" "$mirror" \
        >"$cache/debootstrap-$rootfs_key.log" 2>&1 ||
        die "debootstrap failed; its log: $cache/debootstrap-$rootfs_key.log"
    # Smaller images write and hash faster in the emulated guest.
    rm -rf "$partial"/usr/share/doc/* "$partial"/usr/share/man/* \
        "$partial"/usr/share/info/* "$partial"/usr/share/locale/* \
        "$partial"/var/cache/apt/archives/*.deb "$partial"/var/cache/apt/*.bin \
        "$partial"/var/lib/apt/lists/* "$partial"/var/cache/debconf/*-old \
        "$partial"/var/log/*.log
    # Periodic jobs only steal the emulated CPU from the test.
    rm -f "$partial"/etc/systemd/system/timers.target.wants/*
    mv "$partial" "$rootfs"
    say "root file system cached ($((SECONDS - started))s)"
else
    say "using the cached root file system $rootfs"
fi

# --- is OUTDIR already up to date? -----------------------------------------
if [ -n "$token_file" ]; then
    [ -s "$token_file" ] || die "--token-file $token_file is missing or empty"
else
    token_file=$out/admin.token
    if [ ! -s "$token_file" ]; then
        (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$token_file")
    fi
fi
token_file=$(realpath "$token_file")
token_sha=$(tr -d '\n' <"$token_file" | sha256sum | cut -d' ' -f1)

build_key=$({
    echo "$recipe"
    echo "marker=$marker token=$token_sha disk=$disk_mib storage=$storage_mib staging=$staging"
    sha256sum "$agent" "$repo/systemd/reimage-agent.service" "$repo/systemd/reimage-agent.sysusers" "$0" | cut -d' ' -f1
} | sha256sum | cut -d' ' -f1)
outputs=(vmlinuz initrd.img esp.img root.img disk.img os.img os.img.zst os.img.zst.manifest.json
    os.img.zst.index.json saved.sha256 image.env)
up_to_date=1
[ "$(cat "$out/build.key" 2>/dev/null)" = "$build_key" ] || up_to_date=0
for f in "${outputs[@]}"; do [ -e "$out/$f" ] || up_to_date=0; done
if [ "$up_to_date" -eq 1 ]; then
    say "$out is up to date (marker \"$marker\")"
    exit 0
fi
rm -f "$out/build.key"

# --- this image's root: the cached one plus the agent and its config ------
work=$out/.work
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
say "copying the root file system"
cp -a "$rootfs" "$work/rootfs"
r=$work/rootfs

# Without debug info the release binary is a sixth of its size: less to
# write and hash in the emulated guest.
if command -v strip >/dev/null; then
    strip --strip-debug -o "$r/usr/bin/reimage-agent" "$agent"
    chmod 0755 "$r/usr/bin/reimage-agent"
else
    install -m 0755 "$agent" "$r/usr/bin/reimage-agent"
fi
install -m 0644 "$repo/systemd/reimage-agent.service" "$r/etc/systemd/system/reimage-agent.service"
# The account pool-scoped tasks run as ([tasks] user), made now rather than
# left to systemd-sysusers.service at first boot.
install -D -m 0644 "$repo/systemd/reimage-agent.sysusers" "$r/usr/lib/sysusers.d/reimage-agent.conf"
systemd-sysusers --root="$r" "$r/usr/lib/sysusers.d/reimage-agent.conf"
mkdir -p "$r/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/reimage-agent.service \
    "$r/etc/systemd/system/multi-user.target.wants/reimage-agent.service"
mkdir -p "$r/etc/reimage-agent" "$r/var/lib/reimage-agent"
cat >"$r/etc/reimage-agent/agent.toml" <<EOF
# reimage-agent in the test VM (images/build-vm-image.sh).
[agent]
node_id = "vm"
# The local-storage partition (see /etc/fstab): survives every reimage.
state_dir = "/var/lib/reimage-agent"

[api]
# Reached from the host through QEMU's hostfwd to 127.0.0.1.
listen = "0.0.0.0:7480"

[[api.tokens]]
sha256 = "$token_sha"
role = "admin"

[disk]
# The whole virtio disk the guest runs from (QEMU -drive if=virtio).
target = "/dev/vda"
save_partlabel = ["local-storage"]
# The guest runs from /dev/vda: reimages are in place, staged here first.
staging = "$staging"

[reboot]
method = "systemd"
EOF
printf '%s\n' "$marker" >"$r/etc/reimage-marker"

# By PARTLABEL: a new image brings new file system UUIDs.
cat >"$r/etc/fstab" <<'EOF'
PARTLABEL=root           /                       ext4  defaults,errors=remount-ro  0 1
PARTLABEL=local-storage  /var/lib/reimage-agent  ext4  defaults                    0 2
EOF
echo vm >"$r/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 vm\n' >"$r/etc/hosts"
# A set machine id: no first-boot units, and each build is its own machine.
head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$r/etc/machine-id"
echo >>"$r/etc/machine-id"

# DHCP on the virtio NIC (QEMU user networking hands out 10.0.2.15).
mkdir -p "$r/etc/systemd/network" "$r/etc/systemd/system/sockets.target.wants" \
    "$r/etc/systemd/system/network-online.target.wants"
cat >"$r/etc/systemd/network/50-dhcp.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=ipv4
EOF
ln -sf /lib/systemd/system/systemd-networkd.service \
    "$r/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
ln -sf /lib/systemd/system/systemd-networkd.socket \
    "$r/etc/systemd/system/sockets.target.wants/systemd-networkd.socket"
ln -sf /lib/systemd/system/systemd-networkd-wait-online.service \
    "$r/etc/systemd/system/network-online.target.wants/systemd-networkd-wait-online.service"

kernel=$(find "$r/boot" -maxdepth 1 -name 'vmlinuz-*' | sort | tail -n 1)
initrd=$(find "$r/boot" -maxdepth 1 -name 'initrd.img-*' | sort | tail -n 1)
if [ -z "$kernel" ] || [ -z "$initrd" ]; then die "no kernel or initramfs in $rootfs/boot"; fi
cp "$kernel" "$work/vmlinuz"
cp "$initrd" "$work/initrd.img"

# --- the EFI system partition -------------------------------------------------
# GRUB finds its ESP by the FAT volume id, drawn anew for each build, so two
# builds never boot each other's kernel by mistake.
tag=$(printf %s "$marker" | tr -c 'A-Za-z0-9._-' '-')
volume_id=$(head -c 4 /dev/urandom | od -An -tx1 | tr -d ' \n' | tr a-f A-F)
cmdline="root=PARTLABEL=root ro console=ttyS0 reimage.image=$tag"
cat >"$work/grub.cfg" <<EOF
set timeout=0
search --no-floppy --fs-uuid --set=root ${volume_id:0:4}-${volume_id:4:4}
linux /vmlinuz $cmdline
initrd /initrd.img
boot
EOF
say "making esp.img: GRUB at \\EFI\\BOOT\\BOOTX64.EFI, kernel, initramfs (reimage.image=$tag)"
grub-mkstandalone -O x86_64-efi -o "$work/BOOTX64.EFI" \
    --modules="part_gpt fat search search_fs_uuid linux normal" \
    --install-modules="part_gpt fat search search_fs_uuid linux normal boot echo configfile" \
    --locales= --fonts= --themes= \
    "boot/grub/grub.cfg=$work/grub.cfg"
esp_bytes=$(stat -c %s "$work/BOOTX64.EFI" "$work/vmlinuz" "$work/initrd.img" | awk '{ n += $1 } END { print n }')
# The files, 16 MiB to spare, rounded up to 16 MiB; at least 64 MiB.
esp_mib=$(( ((esp_bytes >> 20) + 1 + 16 + 15) / 16 * 16 ))
[ "$esp_mib" -ge 64 ] || esp_mib=64
mkfs.vfat -C -i "$volume_id" -n ESP "$work/esp.img" $((esp_mib * 1024)) >/dev/null
mmd -i "$work/esp.img" ::/EFI ::/EFI/BOOT
mcopy -i "$work/esp.img" "$work/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$work/esp.img" "$work/vmlinuz" ::/vmlinuz
mcopy -i "$work/esp.img" "$work/initrd.img" ::/initrd.img

# --- file systems ------------------------------------------------------------
# Root: what the files take, plus a quarter and 128 MiB for logs and
# metadata, rounded up to 64 MiB.
used_mib=$(( $(du -sk "$r" | cut -f1) / 1024 ))
root_mib=$(( (used_mib * 5 / 4 + 128 + 63) / 64 * 64 ))
say "making root.img: ${root_mib} MiB ext4 from ${used_mib} MiB of files"
# Reproducible, as a release pipeline makes it: a fixed UUID, hash seed and
# time, so that two builds differ only where their files do and a write
# through the block index moves only those blocks.
E2FSPROGS_FAKE_TIME=1700000000 mkfs.ext4 -q -F -L root \
    -U 5f3c2a1e-8d4b-4e6f-9a0b-1c2d3e4f5a6b -E hash_seed=0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d \
    -d "$r" "$work/root.img" "${root_mib}M" >/dev/null

say "making local-storage: ${storage_mib} MiB ext4 holding saved.txt"
mkdir "$work/storage"
head -c 1M /dev/urandom | od -An -tx1 >"$work/storage/saved.txt"
(cd "$work/storage" && sha256sum saved.txt >"$work/saved.sha256")
mkfs.ext4 -q -F -L local-storage -d "$work/storage" "$work/storage.img" "${storage_mib}M" >/dev/null

# --- partition tables, partitions put in place ---------------------------
# Layout in MiB: [0,1) GPT | [1, 1+esp) esp | [root_at, +root) root | … |
# [storage_at, +storage) local-storage | backup GPT. Each table gets random
# partition GUIDs: the ESP of every build (and of os.img and disk.img) has
# a GUID of its own, as images built separately do.
esp_at=1
root_at=$((esp_at + esp_mib))
os_mib=$((root_at + root_mib + 1))
storage_at=$((disk_mib - storage_mib - 1))
[ "$os_mib" -le "$storage_at" ] ||
    die "a ${root_mib} MiB root and ${storage_mib} MiB local-storage do not fit in $disk_size"
mib_sectors() { echo $(($1 * 2048)); }

place() { # place FILE IMAGE AT_MIB
    dd if="$1" of="$2" bs=1M seek="$3" conv=notrunc,sparse status=none
}

os_parts=(-n "1:$(mib_sectors $esp_at):+${esp_mib}M" -t 1:EF00 -c 1:esp
    -n "2:$(mib_sectors $root_at):+${root_mib}M" -t 2:8300 -c 2:root)
say "making os.img: ${os_mib} MiB, GPT with esp and root"
truncate -s "${os_mib}M" "$work/os.img"
sgdisk -o "${os_parts[@]}" "$work/os.img" >/dev/null
place "$work/esp.img" "$work/os.img" "$esp_at"
place "$work/root.img" "$work/os.img" "$root_at"

say "making disk.img: ${disk_mib} MiB, GPT with esp, root and local-storage at ${storage_at} MiB"
truncate -s "${disk_mib}M" "$work/disk.img"
sgdisk -o "${os_parts[@]}" \
    -n "3:$(mib_sectors "$storage_at"):+${storage_mib}M" -t 3:8300 -c 3:local-storage \
    "$work/disk.img" >/dev/null
place "$work/esp.img" "$work/disk.img" "$esp_at"
place "$work/root.img" "$work/disk.img" "$root_at"
place "$work/storage.img" "$work/disk.img" "$storage_at"

# What the firmware and the kernel will read: fail here rather than at the
# guest's boot.
labels() { sgdisk -p "$1" | awk '/^ +[0-9]+ / {printf "%s ", $NF}'; }
[ "$(labels "$work/os.img")" = "esp root " ] || die "os.img: partitions: $(labels "$work/os.img")"
[ "$(labels "$work/disk.img")" = "esp root local-storage " ] ||
    die "disk.img: partitions: $(labels "$work/disk.img")"

say "packing os.img"
"$agent" image pack --block-index "$work/os.img" -o "$work/os.img.zst" >/dev/null

cat >"$work/image.env" <<EOF
# Written by images/build-vm-image.sh; sizes and offsets in MiB.
VM_MARKER='${marker//\'/\'\\\'\'}'
VM_TOKEN_FILE='$token_file'
VM_KERNEL_CMDLINE='$cmdline'
VM_BOOT_TAG='$tag'
VM_DISK_MIB=$disk_mib
VM_ESP_AT_MIB=$esp_at
VM_ESP_MIB=$esp_mib
VM_ROOT_AT_MIB=$root_at
VM_ROOT_MIB=$root_mib
VM_STORAGE_AT_MIB=$storage_at
VM_STORAGE_MIB=$storage_mib
VM_OS_IMAGE_MIB=$os_mib
VM_OS_IMAGE_SHA256=$(jq -r .sha256 "$work/os.img.zst.manifest.json")
EOF

for f in "${outputs[@]}"; do
    mv -f "$work/$f" "$out/$f"
done
echo "$build_key" >"$out/build.key"
say "done: $out (marker \"$marker\", token in $token_file)"
