# shellcheck shell=bash
# Helpers for the VM tests; source it. Uses curl and jq.
#
# Set VM_API (http://127.0.0.1:PORT) and VM_TOKEN before calling vm_api.

# vm_preflight NAME REPO: exits 0 with `skipping: <reason>` unless this is
# root and QEMU and the image tools are (or can be) installed; fails without
# python3 (it serves files to the guest).
vm_preflight() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "skipping: the $1 needs root (debootstrap, apt-get)"
        exit 0
    fi
    if ! bash "$2/images/install-vm-tools.sh" >/dev/null; then
        echo "skipping: cannot install QEMU and the image tools (see the error above)"
        exit 0
    fi
    command -v python3 >/dev/null || { echo "error: $1: python3 is needed to serve files to the guest" >&2; exit 1; }
}

# Prints a TCP port on 127.0.0.1 that nothing listens on.
vm_free_port() {
    local port
    for port in $(shuf -i 20000-40000 -n 50); do
        if ! ss -Htln "sport = :$port" | grep -q .; then
            echo "$port"
            return 0
        fi
    done
    echo "error: no free port found" >&2
    return 1
}

# vm_session TOKEN_FILE SERVE_DIR HTTP_LOG: picks the API port ($port) and
# the port the guest fetches files by ($serve_port), exports VM_API and
# VM_TOKEN, serves SERVE_DIR on 127.0.0.1:$serve_port (with byte ranges:
# tests/support/range_server.py), and sets an EXIT
# trap that stops QEMU ($vm_pid, once the caller sets it) and the server.
vm_session() {
    port=$(vm_free_port)
    serve_port=$(vm_free_port)
    export VM_API=http://127.0.0.1:$port
    VM_TOKEN=$(tr -d '\n' <"$1")
    export VM_TOKEN
    # Byte ranges and If-Range, for writes through a block index; it counts
    # the bytes it sends in SERVE_DIR/.served.
    python3 "$(dirname "${BASH_SOURCE[0]}")/../support/range_server.py" "$serve_port" "$2" >"$3" 2>&1 &
    vm_http_pid=$!
    vm_pid=""
    trap vm_session_end EXIT
}

vm_session_end() {
    [ -z "${vm_pid:-}" ] || vm_stop "$vm_pid"
    kill "$vm_http_pid" 2>/dev/null || true
}

# vm_wait_healthz SECONDS [PID]: polls $VM_API/healthz until it answers `ok`.
# Fails when the deadline passes or QEMU (PID) exits first.
vm_wait_healthz() {
    local deadline=$((SECONDS + $1)) pid=${2:-}
    while [ "$SECONDS" -lt "$deadline" ]; do
        if [ "$(curl -s --max-time 2 "$VM_API/healthz" 2>/dev/null)" = ok ]; then
            return 0
        fi
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            echo "error: qemu (pid $pid) exited before the agent answered" >&2
            return 1
        fi
        sleep 1
    done
    echo "error: $VM_API/healthz did not answer ok within $1s" >&2
    return 1
}

# vm_api METHOD PATH [JSON]: one API call with the token; prints the body,
# fails (with the body on stderr) on a non-2xx status.
vm_api() {
    local method=$1 path=$2 body=${3:-} out status
    out=$(mktemp)
    status=$(curl -sS --max-time 20 -o "$out" -w '%{http_code}' -X "$method" \
        -H "Authorization: Bearer $VM_TOKEN" \
        ${body:+-H 'Content-Type: application/json' --data "$body"} \
        "$VM_API$path") || { rm -f "$out"; return 1; }
    if [ "${status:0:1}" != 2 ]; then
        echo "error: $method $path: HTTP $status: $(cat "$out")" >&2
        rm -f "$out"
        return 1
    fi
    cat "$out"
    rm -f "$out"
}

# The identity of the test's own probes: they read the agent's state
# directory (saved.txt on local-storage), which unprivileged tasks cannot.
VM_ROOT_TASK='{"autoUser": {"elevationLevel": "admin"}}'

# vm_run_task ID COMMAND [SECONDS] [IDENTITY]: runs COMMAND as a task on
# the guest's agent (as root unless IDENTITY, a userIdentity JSON, says
# otherwise; "null" for the default), waits for it to complete (default
# 60s) and prints its stdout. Fails when it does not complete in time or
# exits non-zero.
vm_run_task() {
    local id=$1 command=$2 deadline=$((SECONDS + ${3:-60})) identity=${4:-$VM_ROOT_TASK} task state code
    vm_api POST /v1/tasks "$(jq -cn --arg id "$id" --arg cmd "$command" --argjson who "$identity" \
        '{id: $id, commandLine: $cmd} + (if $who == null then {} else {userIdentity: $who} end)')" >/dev/null || return 1
    while :; do
        task=$(vm_api GET "/v1/tasks/$id") || return 1
        state=$(jq -r .state <<<"$task")
        [ "$state" = completed ] && break
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "error: task $id is still $state after ${3:-60}s" >&2
            return 1
        fi
        sleep 0.5
    done
    code=$(jq -r '.executionInfo.exitCode // "none"' <<<"$task")
    if [ "$code" != 0 ]; then
        echo "error: task $id ($command) exited with $code: $(vm_api GET "/v1/tasks/$id/files/stderr.txt")" >&2
        return 1
    fi
    vm_api GET "/v1/tasks/$id/files/stdout.txt"
}

# vm_stop PID: stops QEMU (the guest gets no shutdown; its disk file keeps
# whatever it wrote).
vm_stop() {
    local pid=$1 _
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
}
