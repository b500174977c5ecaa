"""What the SDK scripts share: the test's environment, raw calls to the
agent's own API (to check what the SDK claims), and one line per case."""

import json
import os
import ssl
import sys
import time
import urllib.request

URL = os.environ["REIMAGE_SDK_URL"]
TOKEN = os.environ["REIMAGE_SDK_TOKEN"]
CA = os.environ["REIMAGE_SDK_CA"]
POOL = os.environ.get("REIMAGE_SDK_POOL", "pool-1")
NODE = os.environ["REIMAGE_SDK_NODE"]
RELEASE = os.environ.get("REIMAGE_SDK_RELEASE", "")


def agent(method, path, body=None):
    """One request to the agent's own API, as (status, JSON body)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(URL + path, data=data, method=method)
    request.add_header("Authorization", "Bearer " + TOKEN)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    context = ssl.create_default_context(cafile=CA) if URL.startswith("https") else None
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def wait_until(what, check, seconds=60):
    """Polls `check` until it returns something true, and returns that."""
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def add_blocking_task(task_id):
    """A task that runs until the test creates the release file."""
    status, body = agent("POST", "/v1/tasks", {
        "id": task_id,
        "commandLine": f"until [ -e {RELEASE} ]; do sleep 0.1; done",
    })
    expect(status == 201, f"task added: {status} {body}")
    wait_until(f"task {task_id} running",
               lambda: agent("GET", f"/v1/tasks/{task_id}")[1]["state"] == "running")


def release_tasks():
    with open(RELEASE, "w") as f:
        f.write("go\n")


def latest_operation(kind):
    """The newest operation of `kind` from GET /v1/operations."""
    status, body = agent("GET", "/v1/operations")
    expect(status == 200, f"GET /v1/operations: {status} {body}")
    ops = [op for op in body["value"] if op["kind"] == kind]
    expect(ops, f"no {kind} operation in {body}")
    return max(ops, key=lambda op: op["createdAt"])


def expect(condition, message):
    if not condition:
        fail(message)


def fail(message):
    print(f"FAILED: {message}", flush=True)
    sys.exit(1)


def ok(case, **facts):
    """Reports a case that passed, with facts the Rust test checks."""
    print("ok " + json.dumps({"case": case, **facts}), flush=True)
