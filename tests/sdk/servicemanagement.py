"""azure-servicemanagement-legacy (Cloud Services, classic) against the
agent over HTTPS: "Reimage Role Instance", its operation followed with the
SDK's own status call, and the SDK's errors for another role instance and
for a reimage during a reimage (the error body is the agent's XML)."""

import requests
from azure.common import AzureConflictHttpError, AzureMissingResourceHttpError
from azure.servicemanagement import ServiceManagementService

from common import (CA, NODE, TOKEN, URL, add_blocking_task, agent, expect, ok,
                    release_tasks, wait_until)

SUBSCRIPTION = "00000000-0000-0000-0000-000000000001"

# A requests session carries the agent's bearer token and CA; the SDK then
# builds its URLs from `host` as given, port included.
session = requests.Session()
session.headers["Authorization"] = "Bearer " + TOKEN
session.verify = CA
sms = ServiceManagementService(SUBSCRIPTION, host=URL.removeprefix("https://"),
                               request_session=session)

try:
    sms.reimage_role_instance("service", "deployment", "no-such-role")
    expect(False, "a reimage of another role instance was accepted")
except AzureMissingResourceHttpError as err:
    expect(err.status_code == 404, f"status {err.status_code}")
    expect("ResourceNotFound" in str(err), f"error: {err}")
ok("not_found", code="ResourceNotFound")

# A reimage that waits for a task holds the node, so the SDK's reimage
# meets a reimage in progress.
add_blocking_task("drain-me")
status, body = agent("POST", "/v1/node/reimage", {"nodeReimageOption": "taskcompletion"})
expect(status == 202, f"v1 reimage: {status} {body}")
try:
    sms.reimage_role_instance("service", "deployment", NODE)
    expect(False, "a reimage during a reimage was accepted")
except AzureConflictHttpError as err:
    expect(err.status_code == 409, f"status {err.status_code}")
    expect("NodeBeingReimaged" in str(err), f"error: {err}")
release_tasks()
wait_until("the first reimage ended",
           lambda: agent("GET", f"/v1/operations/{body['id']}")[1]["status"] != "InProgress",
           seconds=120)
ok("conflict", code="NodeBeingReimaged")

result = sms.reimage_role_instance("service", "deployment", NODE)
expect(result.request_id, f"no x-ms-request-id: {vars(result)}")
done = wait_until(
    "the operation ended",
    lambda: (op := sms.get_operation_status(result.request_id)).status != "InProgress" and op,
    seconds=120)
expect(done.status == "Succeeded", f"final status: {done.status}")
ok("reimage", operation=result.request_id)
