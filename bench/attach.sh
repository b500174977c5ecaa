#!/usr/bin/env bash
# attach.sh BACKING: sets up a loop device over BACKING with direct I/O and
# full-size requests, and prints it. The same "disk" for every benchmark:
#   - --direct-io=on, checked: no host page cache between a tool and it;
#   - queue/max_sectors_kb at the device's maximum: the value outlives
#     `losetup -d`, so a clamp a test left on this loop device would split
#     every request for whoever gets the device next.
set -euo pipefail
loopdev=$(losetup --find --show --direct-io=on "$1")
queue=/sys/block/${loopdev#/dev/}/queue
cat "$queue/max_hw_sectors_kb" > "$queue/max_sectors_kb"
[ "$(cat "/sys/block/${loopdev#/dev/}/loop/dio")" = 1 ] || {
    losetup -d "$loopdev"
    echo "bench/attach.sh: $loopdev did not get direct I/O" >&2; exit 1; }
echo "$loopdev"
