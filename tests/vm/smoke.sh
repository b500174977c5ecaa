#!/usr/bin/env bash
# VM smoke test: builds the test VM image (cached), boots a copy of its disk
# in QEMU, and checks through the agent's API, from the host:
#   - /healthz answers `ok` (through QEMU's hostfwd) within 3 minutes;
#   - GET /v1/node: state `idle`, target /dev/vda, `local-storage` saved;
#   - a task reads /etc/reimage-marker: the image that was built booted;
#   - a task hashes saved.txt on local-storage: the build's saved.sha256;
#   - a task fetches the manifest from the host's 127.0.0.1 (run-vm.sh
#     --serve-port): the path a reimage downloads its image by.
# Before booting, on the host: os.img.zst writes onto a copy of disk.img with
# `reimage-agent write`, keeping local-storage (the layouts fit together).
# Then stops the VM and prints how long each phase took.
#
#   tests/vm/smoke.sh            (as root; REIMAGE_VM_WORK=DIR to move its
#                                 files from /var/cache/reimage-vm/smoke)
#
# Not root, or QEMU cannot be installed: prints `skipping: <reason>`, exit 0.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=tests/vm/lib.sh
. "$repo/tests/vm/lib.sh"

vm_preflight "VM smoke test" "$repo"

work=${REIMAGE_VM_WORK:-/var/cache/reimage-vm/smoke}
images=$work/image
run=$work/run
marker="smoke $(printf %s "$repo" | sha256sum | cut -c1-8)"
fail() { echo "FAIL: $*" >&2; exit 1; }
phase_start=$SECONDS
timings=()
phase_done() { timings+=("$(printf '%-22s %4ds' "$1" $((SECONDS - phase_start)))"); phase_start=$SECONDS; }

echo "== build (cached after the first run)"
bash "$repo/images/build-vm-image.sh" "$images" --marker "$marker"
[ -f "$images/disk.img" ] || fail "the image build produced no disk.img"
rm -rf "$run" && mkdir -p "$run"
# The guest writes its disk: boot a copy, so the built image stays pristine.
cp --sparse=always "$images/disk.img" "$run/disk.img"
phase_done build

echo "== host: os.img.zst onto a copy of disk.img, keeping local-storage"
agent=${CARGO_TARGET_DIR:-$repo/target}/release/reimage-agent
cp --sparse=always "$images/disk.img" "$run/layout.img"
"$agent" write --manifest "$images/os.img.zst.manifest.json" --target "$run/layout.img" \
    --save-partlabel local-storage 2>"$run/layout.log" | tail -n 1 ||
    { cat "$run/layout.log" >&2; fail "os.img.zst does not fit the layout of disk.img"; }
layout=$(sgdisk -p "$run/layout.img" | awk '/^ +[0-9]+ / {printf "%s ", $NF}')
[ "$layout" = "root local-storage " ] || fail "after the write, disk.img holds: $layout"
rm -f "$run/layout.img"
phase_done "host layout check"

vm_session "$images/admin.token" "$images" "$run/http.log"

echo "== boot (API on $VM_API, serial console in $run/serial.log)"
vm_pid=$(bash "$repo/tests/vm/run-vm.sh" "$run/disk.img" "$images/vmlinuz" "$images/initrd.img" \
    --port "$port" --serve-port "$serve_port" --log "$run/serial.log")
[ -n "$vm_pid" ] || { echo "skipping: QEMU could not be started"; exit 0; }
if ! vm_wait_healthz 180 "$vm_pid"; then
    tail -n 40 "$run/serial.log" >&2
    fail "the agent in the VM did not come up"
fi
phase_done "boot to healthz"

echo "== checks"
node=$(vm_api GET /v1/node)
echo "node: $(jq -c '{id, state, disk: {target: .disk.target, saved: [.disk.savedPartitions[].label]}}' <<<"$node")"
[ "$(jq -r .state <<<"$node")" = idle ] || fail "node state is not idle"
[ "$(jq -r .disk.target <<<"$node")" = /dev/vda ] || fail "target is not /dev/vda"
jq -e '[.disk.savedPartitions[].label] | index("local-storage")' <<<"$node" >/dev/null ||
    fail "local-storage is not among the saved partitions"

got=$(vm_run_task marker "cat /etc/reimage-marker")
echo "marker: $got"
[ "$got" = "$marker" ] || fail "the marker is \"$got\", not \"$marker\""

got=$(vm_run_task saved "cd /var/lib/reimage-agent && sha256sum saved.txt")
[ "$got" = "$(cat "$images/saved.sha256")" ] || fail "saved.txt on local-storage: $got"
echo "local-storage: saved.txt intact"

got=$(vm_run_task fetch "busybox wget -q -O - http://10.0.2.100:$serve_port/os.img.zst.manifest.json")
[ "$(jq -r .sha256 <<<"$got")" = "$(jq -r .sha256 "$images/os.img.zst.manifest.json")" ] ||
    fail "the guest fetched a different manifest from the host: $got"
echo "host files: the guest reads http://10.0.2.100:$serve_port/ (the host's 127.0.0.1:$serve_port)"

# shellcheck disable=SC2016 # expanded by the guest's shell
echo "facts: $(vm_run_task facts 'printf "kernel %s, boot id %s, /run: %s" "$(uname -r)" "$(cat /proc/sys/kernel/random/boot_id)" "$(awk '\''$5 == "/run" {print $6, $NF}'\'' /proc/1/mountinfo)"')"
phase_done checks

vm_stop "$vm_pid"
vm_pid=""
phase_done shutdown

echo "== timings"
printf '%s\n' "${timings[@]}"
echo "vm smoke: passed"
