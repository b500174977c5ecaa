"""azure-batch 14 (track 1, msrest) against the agent over HTTPS: every
compute_node call, and the SDK's own BatchErrorException for a wrong node id
and for a reimage during a reimage. Track 1 has no poller: `reimage` returns
on the 202, so this script follows the operation through the agent's API."""

from azure.batch import BatchServiceClient
from azure.batch.models import BatchErrorException, ComputeNodeState, SchedulingState
from msrest.authentication import BasicTokenAuthentication

from common import (NODE, POOL, TOKEN, URL, add_blocking_task, agent, expect,
                    latest_operation, ok, release_tasks, wait_until)

# requests verifies against REQUESTS_CA_BUNDLE, which the test sets to its CA.
client = BatchServiceClient(BasicTokenAuthentication({"access_token": TOKEN}), batch_url=URL)

node = client.compute_node.get(POOL, NODE)
expect(node.id == NODE, f"get id: {node.id}")
expect(node.state == ComputeNodeState.idle, f"get state: {node.state}")
expect(node.scheduling_state == SchedulingState.enabled, f"scheduling: {node.scheduling_state}")
expect(node.node_agent_info.version, f"agent info: {node.node_agent_info}")
ok("get", state=node.state.value)

nodes = list(client.compute_node.list(POOL))
expect([n.id for n in nodes] == [NODE], f"list: {[n.id for n in nodes]}")
ok("list", count=len(nodes))

for call in (lambda: client.compute_node.get(POOL, "no-such-node"),
             lambda: client.compute_node.reimage(POOL, "no-such-node")):
    try:
        call()
        expect(False, "a call for another node id succeeded")
    except BatchErrorException as err:
        expect(err.response.status_code == 404, f"status {err.response.status_code}")
        expect(err.error.code == "NodeNotFound", f"code {err.error.code}")
ok("not_found", code="NodeNotFound")

client.compute_node.disable_scheduling(POOL, NODE, node_disable_scheduling_option="taskcompletion")
state = client.compute_node.get(POOL, NODE).scheduling_state
expect(state == SchedulingState.disabled, f"after disable: {state}")
client.compute_node.enable_scheduling(POOL, NODE)
state = client.compute_node.get(POOL, NODE).scheduling_state
expect(state == SchedulingState.enabled, f"after enable: {state}")
ok("scheduling")

client.compute_node.reboot(POOL, NODE, node_reboot_option="requeue")
reboot = wait_until("the reboot ended",
                    lambda: (op := latest_operation("reboot"))["status"] != "InProgress" and op)
expect(reboot["status"] == "Succeeded", f"reboot operation: {reboot}")
ok("reboot", operation=reboot["id"])

add_blocking_task("drain-me")
raw = client.compute_node.reimage(POOL, NODE, node_reimage_option="taskcompletion", raw=True)
headers = raw.response.headers
for name in ("request-id", "ETag", "Last-Modified", "DataServiceId"):
    expect(headers.get(name), f"no {name} on the 202: {dict(headers)}")
reimage = latest_operation("reimage")
state = client.compute_node.get(POOL, NODE).state
expect(state == ComputeNodeState.reimaging, f"node while draining: {state}")
try:
    client.compute_node.reimage(POOL, NODE, node_reimage_option="requeue")
    expect(False, "a reimage during a reimage was accepted")
except BatchErrorException as err:
    expect(err.response.status_code == 409, f"status {err.response.status_code}")
    expect(err.error.code == "NodeBeingReimaged", f"code {err.error.code}")
ok("conflict", code="NodeBeingReimaged")

release_tasks()
wait_until("the node idle again",
           lambda: client.compute_node.get(POOL, NODE).state == ComputeNodeState.idle, seconds=120)
status, op = agent("GET", f"/v1/operations/{reimage['id']}")
expect(op["status"] == "Succeeded", f"operation once the node is idle: {op}")
ok("reimage", operation=reimage["id"], etag=headers["ETag"])
