# shellcheck shell=bash
# Helpers for the VM tests; source it. Uses curl and jq.
#
# Set VM_API (http://127.0.0.1:PORT) and VM_TOKEN before calling vm_api.

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

# vm_run_task ID COMMAND [SECONDS]: runs COMMAND as a task on the guest's
# agent, waits for it to complete (default 60s) and prints its stdout.
# Fails when it does not complete in time or exits non-zero.
vm_run_task() {
    local id=$1 command=$2 deadline=$((SECONDS + ${3:-60})) task state code
    vm_api POST /v1/tasks "$(jq -cn --arg id "$id" --arg cmd "$command" \
        '{id: $id, commandLine: $cmd}')" >/dev/null || return 1
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
