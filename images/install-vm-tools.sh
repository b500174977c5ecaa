#!/usr/bin/env bash
# Installs what the VM image and VM test need: qemu-system-x86, debootstrap,
# gdisk, e2fsprogs, zstd, curl, jq, socat, and for the UEFI boot chain ovmf
# (the firmware), grub-efi-amd64-bin (grub-mkstandalone), dosfstools and
# mtools (an ESP without loop mounts). Idempotent: installs only what is
# missing.
#
# QEMU comes from <codename>-backports: this kind of machine ships
# qemu-utils from backports, and the base suite's qemu-system-x86 conflicts
# with it. The backports sources entry reuses the URIs and keyring of the
# existing Debian source, so it reaches the same mirror.
#
# Exit status: 0 when everything is installed; 1 with `error: …` otherwise
# (callers turn that into `skipping: …`).
set -euo pipefail

die() { echo "error: install-vm-tools: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (apt-get install)"
command -v apt-get >/dev/null || die "no apt-get: not a Debian system"

# shellcheck disable=SC1091
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ -n "$codename" ] || die "cannot read VERSION_CODENAME from /etc/os-release"
backports="$codename-backports"
export DEBIAN_FRONTEND=noninteractive

have_all() {
    command -v qemu-system-x86_64 >/dev/null &&
        command -v debootstrap >/dev/null &&
        command -v sgdisk >/dev/null &&
        command -v mkfs.ext4 >/dev/null &&
        command -v zstd >/dev/null &&
        command -v curl >/dev/null &&
        command -v jq >/dev/null &&
        command -v socat >/dev/null &&
        command -v grub-mkstandalone >/dev/null &&
        [ -d /usr/lib/grub/x86_64-efi ] &&
        command -v mkfs.vfat >/dev/null &&
        command -v mcopy >/dev/null &&
        [ -f /usr/share/OVMF/OVMF_CODE_4M.fd ]
}
if have_all; then
    echo "install-vm-tools: everything is installed"
    exit 0
fi

# Prints "URIS<TAB>SIGNED-BY" of the Debian source serving the suite
# $codename, from deb822 files first, then one-line sources.list files.
debian_source() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v suite="$codename" '
            function flush() {
                if (uris != "" && has_suite) { print uris "\t" key; found = 1; exit }
                uris = ""; key = ""; has_suite = 0
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            /^URIs:/ { uris = $0; sub(/^URIs:[ \t]*/, "", uris) }
            /^Signed-By:/ { key = $0; sub(/^Signed-By:[ \t]*/, "", key) }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) has_suite = 1 }
            END { if (!found) flush() }
        ' "$f"
    done | head -n 1 | grep . && return 0
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk -v suite="$codename" '
            $1 != "deb" { next }
            {
                key = ""; i = 2
                if ($2 ~ /^\[/) {
                    for (; i <= NF; i++) {
                        if ($i ~ /signed-by=/) { key = $i; sub(/.*signed-by=/, "", key); sub(/\]$/, "", key) }
                        if ($i ~ /\]$/) { i++; break }
                    }
                }
                if ($(i + 1) == suite) { print $i "\t" key; exit }
            }
        ' "$f"
    done | head -n 1 | grep .
}

backports_list=/etc/apt/sources.list.d/$backports.sources
if ! grep -rqs "$backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    source_line=$(debian_source) || die "no Debian source for suite $codename in /etc/apt to copy for $backports"
    uris=${source_line%%$'\t'*}
    key=${source_line#*$'\t'}
    echo "install-vm-tools: adding $backports_list ($uris)"
    {
        echo "# Added by reimage-agent images/install-vm-tools.sh: qemu-system-x86 for the VM test."
        echo "Types: deb"
        echo "URIs: $uris"
        echo "Suites: $backports"
        echo "Components: main"
        [ -z "$key" ] || echo "Signed-By: $key"
    } >"$backports_list"
fi

echo "install-vm-tools: apt-get update"
apt-get update -q >/dev/null || die "apt-get update failed"
base=(debootstrap gdisk e2fsprogs zstd curl jq socat ovmf grub-efi-amd64-bin dosfstools mtools)
echo "install-vm-tools: installing ${base[*]}"
apt-get install -y -q --no-install-recommends "${base[@]}" >/dev/null ||
    die "apt-get install ${base[*]} failed"
if ! command -v qemu-system-x86_64 >/dev/null; then
    echo "install-vm-tools: installing qemu-system-x86 from $backports"
    # Without recommends: no ipxe ROMs or GUI bits; direct kernel boot and
    # virtio need only the emulator and its seabios/qboot firmware.
    apt-get install -y -q --no-install-recommends -t "$backports" qemu-system-x86 >/dev/null ||
        die "apt-get install -t $backports qemu-system-x86 failed"
fi
have_all || die "tools still missing after the install"
echo "install-vm-tools: done ($(qemu-system-x86_64 --version | head -n 1))"
