#!/usr/bin/env bash
# VM end-to-end test of the in-place reimage: the guest runs from the disk
# it reimages, through the staging, the systemd shutdown handoff and the
# confirmation by the agent of the new image. The guest boots through UEFI
# firmware (OVMF, its variables kept in a file across reboots): each image
# brings its own GRUB, kernel and command line (`reimage.image=TAG`) on an
# ESP of its own GUID. From the host, over the API:
#
#   1. old → new, staged on local-storage (state_dir): a running task is
#      requeued; after `reimagectl op wait` the operation is Succeeded, the
#      guest runs the new image (its marker), saved.txt on local-storage has
#      its SHA-256, the requeued task ran again on the new image, and the node
#      reports the new image's hash. The new image's command line is in
#      /proc/cmdline; the agent wrote a boot entry for its ESP (another GUID
#      than the old one's), the firmware booted it (BootCurrent) and it is
#      first in BootOrder, as efibootmgr in the guest shows.
#   2. new → old, staged in RAM: Succeeded, the old marker and command line
#      are back, booted by an entry of their own; the new image's entry is
#      removed.
#   3. a corrupted image (its manifest's hash no longer matches): the
#      operation is Failed while staging, the node stayed up on its image,
#      saved.txt intact.
#   4. old → new with `"reboot": "kexec"` and a manifest naming the new
#      image's kernel, initramfs and command line: the firmware is skipped
#      (the operation says kexec), the new command line is in /proc/cmdline,
#      saved.txt intact.
#   5. new → old asking for kexec with a manifest whose kernel hash is
#      wrong: the kernel is not loaded, the node reboots through the
#      firmware (the operation says why), the old image boots by its entry.
#
# Prints each phase's time at the end, and the time from the operation's
# `rebooting` to the agent answering again for the firmware reboot of 1
# and the kexec of 4 (both include the shutdown handoff's write).
#
#   tests/vm/reimage.sh          (as root; REIMAGE_VM_WORK=DIR to move its
#                                 files from /var/cache/reimage-vm/reimage)
#
# Not root, or QEMU cannot be installed: prints `skipping: <reason>`, exit 0.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=tests/vm/lib.sh
. "$repo/tests/vm/lib.sh"

vm_preflight "VM reimage test" "$repo"

work=${REIMAGE_VM_WORK:-/var/cache/reimage-vm/reimage}
run=$work/run
fail() {
    echo "FAIL: $*" >&2
    [ ! -f "$run/serial.log" ] || { echo "--- last lines of the serial console" >&2; tail -n 60 "$run/serial.log" >&2; }
    exit 1
}
phase_start=$SECONDS
timings=()
phase_done() { timings+=("$(printf '%-34s %4ds' "$1" $((SECONDS - phase_start)))"); phase_start=$SECONDS; }

echo "== build the old and the new image (cached after the first run)"
mkdir -p "$work"
token_file=$work/admin.token
if [ ! -s "$token_file" ]; then
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$token_file")
fi
bash "$repo/images/build-vm-image.sh" "$work/old" --marker "old image" \
    --staging state_dir --token-file "$token_file"
bash "$repo/images/build-vm-image.sh" "$work/new" --marker "new image" \
    --staging memory --token-file "$token_file"
for image in old new; do
    [ -f "$work/$image/disk.img" ] || fail "the $image image build produced no disk.img"
done
(cd "$repo" && cargo build --release --quiet --bin reimagectl)
ctl=${CARGO_TARGET_DIR:-$repo/target}/release/reimagectl

# What the guest can fetch: both images, and a corrupted copy of the new one
# under its unchanged manifest.
serve=$work/serve
rm -rf "$serve" "$run"
mkdir -p "$serve/old" "$serve/new" "$serve/bad" "$run"
: >"$serve/.served"
for image in old new; do
    for file in os.img.zst os.img.zst.manifest.json os.img.zst.index.json; do
        ln -s "$work/$image/$file" "$serve/$image/$file"
    done
done
for file in os.img.zst os.img.zst.manifest.json os.img.zst.index.json; do
    cp "$work/new/$file" "$serve/bad/$file"
done
# The new image again, its manifest naming what kexec boots.
mkdir -p "$serve/kexec"
for file in os.img.zst os.img.zst.index.json vmlinuz initrd.img; do
    ln -s "$work/new/$file" "$serve/kexec/$file"
done
(
    . "$work/new/image.env"
    jq --arg k "$(sha256sum <"$work/new/vmlinuz" | cut -d' ' -f1)" \
        --arg i "$(sha256sum <"$work/new/initrd.img" | cut -d' ' -f1)" --arg c "$VM_KERNEL_CMDLINE" \
        '. + {boot: {kexec: {kernel: {url: "vmlinuz", sha256: $k}, initrd: {url: "initrd.img", sha256: $i}, cmdline: $c}}}' \
        "$work/new/os.img.zst.manifest.json" >"$serve/kexec/os.img.zst.manifest.json"
)
# The old image, its manifest naming a kernel by a hash it does not have.
mkdir -p "$serve/kexec-bad"
for file in os.img.zst os.img.zst.index.json vmlinuz initrd.img; do
    ln -s "$work/old/$file" "$serve/kexec-bad/$file"
done
jq --arg z "$(printf '0%.0s' $(seq 64))" \
    '. + {boot: {kexec: {kernel: {url: "vmlinuz", sha256: $z}, cmdline: "console=ttyS0"}}}' \
    "$work/old/os.img.zst.manifest.json" >"$serve/kexec-bad/os.img.zst.manifest.json"
# One byte in the middle of block 0's frame inverted (the block every write
# through the index fetches): it decodes to another block or not at all;
# either way the checks must stop it. (Inverted, not set: a byte set to a
# fixed value is already that value once in 256 runs.)
middle=$(jq '.blocks[0].offset + (.blocks[0].length / 2 | floor)' "$serve/bad/os.img.zst.index.json")
byte=$(od -An -tu1 -j "$middle" -N1 "$serve/bad/os.img.zst" | tr -d ' ')
printf "\\x$(printf %02x $((byte ^ 0xff)))" |
    dd of="$serve/bad/os.img.zst" bs=1 seek="$middle" conv=notrunc status=none
! cmp -s "$serve/bad/os.img.zst" "$work/new/os.img.zst" || fail "the corrupted copy equals the image"
cp --sparse=always "$work/old/disk.img" "$run/disk.img"
# The firmware's variables: a fresh store, kept across the guest's reboots.
cp /usr/share/OVMF/OVMF_VARS_4M.fd "$run/vars.fd"
phase_done "build"

vm_session "$token_file" "$serve" "$run/http.log"

# reimagectl against the guest's agent.
ctl() { "$ctl" --agent "$VM_API" --token-file "$token_file" "$@"; }

# reimage NAME OPTION [REBOOT]: POST /v1/node/reimage of image NAME from
# the host's server (REBOOT: "kexec" or "firmware"); prints the operation id.
reimage() {
    local body
    body=$(jq -cn --arg m "http://10.0.2.100:$serve_port/$1/os.img.zst.manifest.json" --arg o "$2" \
        --arg r "${3:-}" '{nodeReimageOption: $o, manifestUrl: $m} + (if $r == "" then {} else {reboot: $r} end)')
    vm_api POST /v1/node/reimage "$body" | jq -r .id
}

# reboot_seconds OP: prints "TOTAL DOWN": seconds from operation OP's phase
# `rebooting` (or the agent going away, if that comes first), and from the
# agent going away, to the agent answering /healthz again.
reboot_seconds() {
    local deadline=$((SECONDS + 900)) phase t0 t1
    healthy() { [ "$(curl -s --max-time 2 "$VM_API/healthz" 2>/dev/null)" = ok ]; }
    while :; do
        phase=$(curl -s --max-time 2 -H "Authorization: Bearer $VM_TOKEN" "$VM_API/v1/operations/$1" | jq -r .phase 2>/dev/null) || phase=""
        [ "$phase" != rebooting ] && healthy || break
        [ "$SECONDS" -lt "$deadline" ] || fail "operation $1 did not reach rebooting"
        sleep 0.2
    done
    t0=$(date +%s.%N)
    while healthy; do
        [ "$SECONDS" -lt "$deadline" ] || fail "the agent did not go down for operation $1"
        sleep 0.2
    done
    t1=$(date +%s.%N)
    until healthy; do
        [ "$SECONDS" -lt "$deadline" ] || fail "the agent did not come back after operation $1"
        sleep 0.2
    done
    awk -v a="$t0" -v b="$t1" -v c="$(date +%s.%N)" 'BEGIN { printf "%.0f %.0f", c - a, c - b }'
}

# wait_op ID: reimagectl op wait, through the guest's reboot; prints the
# operation as JSON (whatever its status).
wait_op() {
    ctl --output json op wait "$1" --timeout 900 >"$run/op.json" 2>"$run/op.err" || true
    [ -s "$run/op.json" ] || fail "reimagectl op wait $1: $(cat "$run/op.err")"
    jq -c . "$run/op.json"
}

marker() { vm_run_task "marker-$1" "cat /etc/reimage-marker"; }

# booted_tag NAME: the reimage.image= value the running kernel got from
# its boot loader.
booted_tag() { vm_run_task "cmdline-$1" "cat /proc/cmdline" | tr ' ' '\n' | sed -n 's/^reimage\.image=//p'; }
tag_of() { (. "$work/$1/image.env" && echo "$VM_BOOT_TAG"); }
# esp_guid FILE: the partition GUID of the ESP (partition 1) in FILE's GPT.
esp_guid() { sgdisk -i 1 "$1" | sed -n 's/^Partition unique GUID: //p' | tr A-F a-f; }

# boot_entry_ok NAME OPERATION: the operation's boot entry names image
# NAME's ESP, the firmware booted it, and it leads BootOrder; prints the
# entry (Boot####).
boot_entry_ok() {
    local entry shown number
    entry=$(jq -r '.bootEntry.entry // empty' <<<"$2")
    [ -n "$entry" ] || fail "no boot entry was written for the $1 image: $2"
    [ "$(jq -r '.bootEntry.error' <<<"$2")" = null ] || fail "boot entry error: $2"
    [ "$(jq -r .bootEntry.espPartUuid <<<"$2")" = "$(esp_guid "$work/$1/os.img")" ] ||
        fail "the boot entry does not name the $1 image's ESP ($(esp_guid "$work/$1/os.img")): $2"
    [ "$(jq -r .bootEntry.booted <<<"$2")" = true ] || fail "the firmware did not boot $entry: $2"
    [ "$(jq -r .bootEntry.firstInBootOrder <<<"$2")" = true ] || fail "$entry is not first in BootOrder: $2"
    shown=$(vm_run_task "efibootmgr-$1-$SECONDS" "efibootmgr -v")
    number=${entry#Boot}
    grep -qx "BootCurrent: $number" <<<"$shown" || fail "efibootmgr: BootCurrent is not $number: $shown"
    grep -q "^BootOrder: $number" <<<"$shown" || fail "efibootmgr: BootOrder does not start with $number: $shown"
    echo "boot entry: $(grep "^$entry" <<<"$shown"), removed: $(jq -c .bootEntry.removed <<<"$2")" >&2
    echo "$entry"
}

# moved NAME OPERATION: an in-place reimage through the block index fetched
# (staging, the running disk as the seed; as the agent and the server count
# it) and wrote (the handoff, after the old root was unmounted) less than
# the whole image; prints the figures and starts the server's count anew.
moved() {
    local packed fetched served written total
    packed=$(stat -L -c %s "$serve/$1/os.img.zst")
    served=$(awk -v p="/$1/os.img.zst" '$1 == p { n += $2 } END { print n + 0 }' "$serve/.served")
    : >"$serve/.served"
    fetched=$(jq -r '.progress.bytesDownloaded // empty' <<<"$2")
    written=$(jq -r .progress.bytesWritten <<<"$2")
    total=$(jq -r .progress.totalBytes <<<"$2")
    [ -n "$fetched" ] || fail "the $1 image was not staged through its block index: $2"
    echo "through the block index: fetched $fetched of $packed compressed bytes ($(( fetched * 100 / packed )) %; the server sent $served), wrote $written of $total ($(( written * 100 / total )) %)"
    [ "$fetched" -lt "$packed" ] && [ "$served" -lt "$packed" ] || fail "staging fetched the whole image: $2"
    [ "$written" -lt "$total" ] || fail "the handoff wrote the whole image: $2"
}
saved_ok() {
    local got
    got=$(vm_run_task "saved-$1" "cd /var/lib/reimage-agent && sha256sum saved.txt")
    [ "$got" = "$(cat "$work/old/saved.sha256")" ] || fail "saved.txt on local-storage after $1: $got"
}

echo "== boot the old image (API on $VM_API, serial console in $run/serial.log)"
vm_pid=$(bash "$repo/tests/vm/run-vm.sh" "$run/disk.img" --uefi "$run/vars.fd" \
    --port "$port" --serve-port "$serve_port" --log "$run/serial.log")
[ -n "$vm_pid" ] || { echo "skipping: QEMU could not be started"; exit 0; }
vm_wait_healthz 300 "$vm_pid" || fail "the agent in the VM did not come up"
[ "$(marker boot)" = "old image" ] || fail "the guest did not boot the old image"
[ "$(booted_tag boot)" = "$(tag_of old)" ] || fail "the old image's boot loader did not boot it: $(vm_run_task cmdline "cat /proc/cmdline")"
[ "$(esp_guid "$work/old/disk.img")" != "$(esp_guid "$work/new/os.img")" ] ||
    fail "the old and the new image have the same ESP GUID"
saved_ok boot
node=$(vm_api GET /v1/node)
[ "$(jq -r .taskIsolation <<<"$node")" = cgroup ] ||
    fail "tasks are not in cgroups under the guest's systemd: $(jq -c '{taskIsolation}' <<<"$node")"
[ "$(vm_run_task whoami "id -u" 60 null)" != 0 ] || fail "a task without userIdentity ran as root"
phase_done "boot old image"

echo "== 1. old → new, staged on local-storage, a running task requeued"
# The task notes each run on local-storage, then keeps running.
vm_api POST /v1/tasks "$(jq -cn --argjson who "$VM_ROOT_TASK" '{id: "worker", commandLine: "cat /etc/reimage-marker >>/var/lib/reimage-agent/worker-runs.txt; exec sleep 86400", userIdentity: $who}')" >/dev/null
deadline=$((SECONDS + 60))
until [ "$(vm_api GET /v1/tasks/worker | jq -r .state)" = running ]; do
    [ "$SECONDS" -lt "$deadline" ] || fail "the worker task did not start"
    sleep 0.5
done
boot_before=$(vm_run_task boot-before "cat /proc/sys/kernel/random/boot_id")
op=$(reimage new requeue)
echo "operation $op"
read -r firmware_seconds firmware_down <<<"$(reboot_seconds "$op")"
[ -n "${firmware_down:-}" ] || fail "the reboot of operation $op was not timed"
result=$(wait_op "$op")
echo "operation: $(jq -c '{status, phase, error, requeuedTasks}' <<<"$result")"
[ "$(jq -r .status <<<"$result")" = Succeeded ] || fail "the reimage to the new image did not succeed: $result"
jq -e '.requeuedTasks | index("worker")' <<<"$result" >/dev/null || fail "the worker task was not requeued: $result"
moved new "$result"
phase_done "reimage old → new (state_dir)"

[ "$(marker new)" = "new image" ] || fail "the guest does not run the new image"
[ "$(booted_tag new)" = "$(tag_of new)" ] || fail "the new image's boot loader did not boot it: $(vm_run_task cmdline-new "cat /proc/cmdline")"
new_entry=$(boot_entry_ok new "$result")
[ "$(vm_run_task boot-after "cat /proc/sys/kernel/random/boot_id")" != "$boot_before" ] ||
    fail "the boot id did not change"
saved_ok new
node=$(vm_api GET /v1/node)
[ "$(jq -r .image.sha256 <<<"$node")" = "$(jq -r .sha256 "$work/new/os.img.zst.manifest.json")" ] ||
    fail "the node reports image $(jq -c .image <<<"$node")"
deadline=$((SECONDS + 60))
until runs=$(vm_run_task "runs-$SECONDS" "cat /var/lib/reimage-agent/worker-runs.txt") &&
    [ "$runs" = "$(printf 'old image\nnew image')" ]; do
    [ "$SECONDS" -lt "$deadline" ] || fail "the requeued task did not run again on the new image: ${runs:-}"
    sleep 1
done
task=$(vm_api GET /v1/tasks/worker)
echo "worker: $(jq -c '{state, requeueCount: .executionInfo.requeueCount}' <<<"$task"), runs: $(tr '\n' ',' <<<"$runs")"
[ "$(jq -r .executionInfo.requeueCount <<<"$task")" -ge 1 ] || fail "requeueCount: $task"
vm_api DELETE /v1/tasks/worker >/dev/null || true
phase_done "checks on the new image"

echo "== 2. new → old, staged in RAM"
op=$(reimage old terminate)
result=$(wait_op "$op")
echo "operation: $(jq -c '{status, phase, error}' <<<"$result")"
[ "$(jq -r .status <<<"$result")" = Succeeded ] || fail "the reimage back to the old image did not succeed: $result"
moved old "$result"
[ "$(marker back)" = "old image" ] || fail "the guest does not run the old image again"
[ "$(booted_tag back)" = "$(tag_of old)" ] || fail "the old image's boot loader did not boot it again"
old_entry=$(boot_entry_ok old "$result")
[ "$old_entry" != "$new_entry" ] || fail "the old image's ESP reused the new one's entry $new_entry"
jq -e --arg e "$new_entry" '.bootEntry.removed | index($e)' <<<"$result" >/dev/null ||
    fail "the new image's entry $new_entry, whose ESP left the disk, was not removed: $result"
saved_ok back
phase_done "reimage new → old (memory)"

echo "== 3. a corrupted image: refused while staging, the node stays up"
boot_before=$(vm_run_task boot-bad "cat /proc/sys/kernel/random/boot_id")
op=$(reimage bad requeue)
result=$(wait_op "$op")
echo "operation: $(jq -c '{status, phase, error}' <<<"$result")"
[ "$(jq -r .status <<<"$result")" = Failed ] || fail "the corrupted image did not fail: $result"
case "$(jq -r .error.code <<<"$result")" in
    ImageChecksumMismatch | ImageCorrupt) ;;
    *) fail "unexpected error code: $result" ;;
esac
[ "$(marker bad)" = "old image" ] || fail "the guest left the old image"
[ "$(vm_run_task boot-bad-after "cat /proc/sys/kernel/random/boot_id")" = "$boot_before" ] ||
    fail "the node rebooted for a corrupted image"
[ "$(vm_api GET /v1/node | jq -r .state)" = idle ] || fail "the node is not idle after the refused image"
saved_ok bad
phase_done "corrupted image refused"

echo "== 4. old → new by kexec: the firmware skipped"
boot_before=$(vm_run_task boot-kexec "cat /proc/sys/kernel/random/boot_id")
serial_before=$(wc -l <"$run/serial.log")
op=$(reimage kexec requeue kexec)
read -r kexec_seconds kexec_down <<<"$(reboot_seconds "$op")"
[ -n "${kexec_down:-}" ] || fail "the reboot of operation $op was not timed"
result=$(wait_op "$op")
echo "operation: $(jq -c '{status, phase, error, reboot}' <<<"$result")"
[ "$(jq -r .status <<<"$result")" = Succeeded ] || fail "the kexec reimage did not succeed: $result"
[ "$(jq -r .reboot.method <<<"$result")" = kexec ] || fail "the node did not reboot by kexec: $result"
# The console since the request: the handoff ended in kexec, and the
# firmware never ran its boot manager.
console=$(tail -n +"$serial_before" "$run/serial.log" | tr -d '\r')
grep -q 'handoff: kexec: RB_KEXEC' <<<"$console" || fail "the shutdown handoff did not end in kexec"
grep -q 'kexec_core: Starting new kernel' <<<"$console" || fail "the kernel did not start the new kernel by kexec"
! grep -q 'BdsDxe: starting' <<<"$console" || fail "the firmware booted during the kexec reimage"
[ "$(booted_tag kexec)" = "$(tag_of new)" ] || fail "the kexec did not boot the new image's command line: $(vm_run_task cmdline-kexec "cat /proc/cmdline")"
[ "$(vm_run_task boot-kexec-after "cat /proc/sys/kernel/random/boot_id")" != "$boot_before" ] ||
    fail "the boot id did not change"
[ "$(marker kexec)" = "new image" ] || fail "the guest does not run the new image after the kexec"
saved_ok kexec
echo "to the agent answering again: firmware reboot ${firmware_seconds}s from rebooting, ${firmware_down}s from going down (case 1); kexec ${kexec_seconds}s from rebooting (it fetches and loads the kernel first), ${kexec_down}s from going down. Both include the shutdown handoff's write; OVMF's POST under TCG takes seconds, a real server's minutes."
phase_done "reimage old → new (kexec)"

echo "== 5. new → old, kexec asked for with a kernel of the wrong hash: the firmware reboots"
serial_before=$(wc -l <"$run/serial.log")
op=$(reimage kexec-bad requeue kexec)
result=$(wait_op "$op")
echo "operation: $(jq -c '{status, phase, error, reboot}' <<<"$result")"
[ "$(jq -r .status <<<"$result")" = Succeeded ] || fail "the reimage with a refused kernel did not succeed: $result"
[ "$(jq -r .reboot.method <<<"$result")" = firmware ] || fail "the refused kernel was not a firmware reboot: $result"
jq -r .reboot.fallback <<<"$result" | grep -q 'checksum mismatch' || fail "the fallback does not say why: $result"
console=$(tail -n +"$serial_before" "$run/serial.log" | tr -d '\r')
grep -q 'BdsDxe: starting' <<<"$console" || fail "the firmware did not boot after the refused kexec"
[ "$(booted_tag fallback)" = "$(tag_of old)" ] || fail "the old image's boot loader did not boot it"
boot_entry_ok old "$result" >/dev/null
saved_ok fallback
phase_done "kexec refused: firmware reboot"

vm_stop "$vm_pid"
vm_pid=""

echo "== timings"
printf '%s\n' "${timings[@]}"
echo "vm reimage: passed"
