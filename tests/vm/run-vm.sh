#!/usr/bin/env bash
# Starts the test VM in the background and prints QEMU's PID.
#
#   tests/vm/run-vm.sh DISK --uefi VARS [--port P] [--log FILE]
#       [--serve-port HP] [--no-reboot]
#   tests/vm/run-vm.sh DISK KERNEL INITRD [--port P] [--log FILE]
#       [--serve-port HP] [--append ARGS] [--no-reboot]
#
# Software emulation (there is no usable KVM on these machines), 2 vCPUs,
# 1 GiB. DISK is used in place (writable): boot a copy to keep it.
#
# With --uefi the firmware boots DISK by itself: OVMF's code read-only, VARS
# (a copy of OVMF_VARS_4M.fd the caller keeps) as its NVRAM, so boot entries
# persist across the guest's reboots and runs. Otherwise direct kernel boot:
# KERNEL and INITRD come from the host and stay the same across guest
# reboots; the root file system is found on DISK by PARTLABEL=root.
#
#   --uefi VARS      boot through UEFI firmware with VARS as its variables
#   --port P         host 127.0.0.1:P reaches the agent's API in the guest
#                    (guest port 7480); default 7480
#   --log FILE       serial console (kernel, systemd) and QEMU's messages;
#                    default DISK.log
#   --serve-port HP  the guest reaches the host's 127.0.0.1:HP at
#                    10.0.2.100:HP (e.g. an HTTP server with the images)
#   --append ARGS    more kernel command line
#   --no-reboot      QEMU exits when the guest reboots instead of resetting
#
# User networking is restricted: the guest gets 10.0.2.15 by DHCP and reaches
# nothing but the forwards above, so all traffic stays on the host's loopback.
# The disk is virtio (/dev/vda in the guest, also
# /dev/disk/by-id/virtio-reimage-vm), cache=unsafe (the host page cache
# survives a QEMU kill; only a host crash could lose writes), discard=unmap so
# the guest's zeroout leaves holes in DISK.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
    exit 2
}
die() { echo "error: run-vm: $*" >&2; exit 1; }

port=7480
log=""
serve_port=""
append=""
no_reboot=()
vars=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --port) port=${2:?--port needs P}; shift 2 ;;
        --log) log=${2:?--log needs FILE}; shift 2 ;;
        --serve-port) serve_port=${2:?--serve-port needs HP}; shift 2 ;;
        --append) append=${2:?--append needs ARGS}; shift 2 ;;
        --uefi) vars=${2:?--uefi needs VARS}; shift 2 ;;
        --no-reboot) no_reboot=(-no-reboot); shift ;;
        -h|--help) usage ;;
        -*) die "unknown option $1" ;;
        *) args+=("$1"); shift ;;
    esac
done
ovmf_code=/usr/share/OVMF/OVMF_CODE_4M.fd
if [ -n "$vars" ]; then
    [ "${#args[@]}" -eq 1 ] && [ -z "$append" ] || usage
    [ -f "$ovmf_code" ] || die "no $ovmf_code (images/install-vm-tools.sh installs ovmf)"
    [ -f "$vars" ] || die "no variables store $vars (copy /usr/share/OVMF/OVMF_VARS_4M.fd)"
    boot=(-drive "if=pflash,format=raw,unit=0,readonly=on,file=$ovmf_code"
        -drive "if=pflash,format=raw,unit=1,file=$vars")
else
    [ "${#args[@]}" -eq 3 ] || usage
    boot=(-kernel "${args[1]}" -initrd "${args[2]}" -append "root=PARTLABEL=root ro console=ttyS0 $append")
fi
disk=${args[0]}
for f in "${args[@]}"; do [ -f "$f" ] || die "no file $f"; done
log=${log:-$disk.log}

if ! command -v qemu-system-x86_64 >/dev/null; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "skipping: qemu-system-x86_64 is not installed and installing it needs root" >&2
        exit 0
    fi
    bash "$(dirname "$0")/../../images/install-vm-tools.sh" >&2 ||
        { echo "skipping: cannot install QEMU (see the error above)" >&2; exit 0; }
fi

net=user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:$port-:7480
if [ -n "$serve_port" ]; then
    command -v socat >/dev/null || die "--serve-port needs socat (images/install-vm-tools.sh)"
    # cmd: runs once per guest connection, so each HTTP request (and each
    # Range retry) gets its own connection to the host.
    net+=",guestfwd=tcp:10.0.2.100:$serve_port-cmd:socat - TCP:127.0.0.1:$serve_port"
fi

: >"$log"
# setsid: a Ctrl-C meant for the caller's shell does not reach QEMU; callers
# stop it by the printed PID.
setsid qemu-system-x86_64 \
    -name reimage-vm \
    -accel tcg,thread=multi -cpu max -m 1024 -smp 2 \
    -nographic -monitor none \
    "${no_reboot[@]}" \
    "${boot[@]}" \
    -drive "file=$disk,format=raw,if=none,id=disk0,cache=unsafe,discard=unmap" \
    -device virtio-blk-pci,drive=disk0,serial=reimage-vm \
    -nic "$net" \
    </dev/null >>"$log" 2>&1 &
pid=$!
# A bad option makes QEMU exit at once: report it instead of a dead PID.
sleep 0.5
if ! kill -0 "$pid" 2>/dev/null; then
    cat "$log" >&2
    die "qemu exited at start"
fi
echo "$pid"
