"""azure-batch 15 (track 2, azure-core) against the agent over HTTPS: every
node call, the reimage poller with taskCompletion while a task drains, and
the SDK's own errors for a wrong node id and a reimage during a reimage."""

import time

from azure.batch import BatchClient, models
# begin_reimage_node and begin_reboot_node take these, which 15.1.0 does not
# export from azure.batch.models.
from azure.batch.models._models import BatchNodeRebootOptions, BatchNodeReimageOptions
from azure.core.credentials import AccessToken
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError

from common import (NODE, POOL, TOKEN, CA, URL, add_blocking_task, agent, expect,
                    latest_operation, ok, release_tasks, wait_until)


class AgentToken:
    """A TokenCredential that hands out the agent's bearer token."""

    def get_token(self, *scopes, **kwargs):
        return AccessToken(TOKEN, int(time.time()) + 3600)


client = BatchClient(URL, AgentToken(), connection_verify=CA)

node = client.get_node(POOL, NODE)
expect(node.id == NODE, f"get_node id: {node.id}")
expect(node.state == models.BatchNodeState.IDLE, f"get_node state: {node.state}")
expect(node.scheduling_state == models.SchedulingState.ENABLED, f"scheduling: {node.scheduling_state}")
expect(node.url.startswith("https://"), f"url: {node.url}")
ok("get_node", state=node.state, agentVersion=node.node_agent_info.version)

nodes = list(client.list_nodes(POOL))
expect([n.id for n in nodes] == [NODE], f"list_nodes: {[n.id for n in nodes]}")
ok("list_nodes", count=len(nodes))

try:
    client.get_node(POOL, "no-such-node")
    expect(False, "get_node of another id succeeded")
except ResourceNotFoundError as err:
    expect(err.status_code == 404, f"status {err.status_code}")
    expect(err.error.code == "NodeNotFound", f"code {err.error.code}")
try:
    # Without options 15.1.0 sends no content type and fails before the
    # request, so every reimage here names its option.
    client.begin_reimage_node(
        POOL, "no-such-node", BatchNodeReimageOptions(node_reimage_option="requeue"))
    expect(False, "begin_reimage_node of another id succeeded")
except ResourceNotFoundError as err:
    expect(err.error.code == "NodeNotFound", f"code {err.error.code}")
ok("not_found", code="NodeNotFound")

client.disable_node_scheduling(
    POOL, NODE, models.BatchNodeDisableSchedulingOptions(node_disable_scheduling_option="taskCompletion"))
state = client.get_node(POOL, NODE).scheduling_state
expect(state == models.SchedulingState.DISABLED, f"after disable: {state}")
client.enable_node_scheduling(POOL, NODE)
state = client.get_node(POOL, NODE).scheduling_state
expect(state == models.SchedulingState.ENABLED, f"after enable: {state}")
ok("scheduling")

poller = client.begin_reboot_node(
    POOL, NODE, BatchNodeRebootOptions(node_reboot_kind="requeue"), polling_interval=1)
poller.result(timeout=120)
reboot = latest_operation("reboot")
expect(reboot["status"] == "Succeeded", f"reboot operation: {reboot}")
ok("reboot", operation=reboot["id"])

add_blocking_task("drain-me")
poller = client.begin_reimage_node(
    POOL, NODE, BatchNodeReimageOptions(node_reimage_option="taskCompletion"), polling_interval=1)
reimage = latest_operation("reimage")
expect(client.get_node(POOL, NODE).state == models.BatchNodeState.REIMAGING, "node not reimaging")

try:
    client.begin_reimage_node(
        POOL, NODE, BatchNodeReimageOptions(node_reimage_option="requeue"))
    expect(False, "a reimage during a reimage was accepted")
except ResourceExistsError as err:
    expect(err.status_code == 409, f"status {err.status_code}")
    expect(err.error.code == "NodeBeingReimaged", f"code {err.error.code}")
ok("conflict", code="NodeBeingReimaged")

# The poller has polled a few times while the task holds the reimage back.
time.sleep(3)
expect(not poller.done(), "the poller ended while the task still ran")
status, task = agent("GET", "/v1/tasks/drain-me")
expect(task["state"] == "running", f"task: {task}")
release_tasks()
poller.result(timeout=120)
returned_at = time.time()
status, op = agent("GET", f"/v1/operations/{reimage['id']}")
expect(op["status"] == "Succeeded", f"operation after the poller returned: {op}")
ok("begin_reimage_node", operation=reimage["id"], pollerReturnedAt=returned_at)
