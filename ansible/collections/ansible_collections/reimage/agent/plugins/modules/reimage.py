#!/usr/bin/python
# SPDX-License-Identifier: Apache-2.0

from __future__ import annotations

DOCUMENTATION = r'''
module: reimage
short_description: Reimage a node through its reimage-agent and wait for the outcome
description:
  - Asks the node's reimage-agent (C(POST /v1/node/reimage)) to write a new OS image to the node's disk,
    keeping its local-storage partitions, and follows the operation until it succeeds or fails.
  - Idempotent when the target image is known (O(image_sha256), or the C(sha256) of the manifest at
    O(manifest_url)) and the node reports that it already runs it; then nothing is requested and the
    result is not changed.
  - A reimage of the target image already in flight on the node (an earlier run that was cut off) is
    followed instead of requesting a second one; without a known target image, any reimage in flight is.
  - Fails with the agent's error code and message when the agent refuses the request or the operation fails.
author: reimage-agent maintainers (@reimage-agent)
extends_documentation_fragment:
  - reimage.agent.agent
attributes:
  check_mode:
    support: full
    description: Reports whether the node would be reimaged, without requesting it.
  diff_mode:
    support: none
    description: The module reports no diff.
options:
  option:
    description:
      - What happens to the tasks on the node (C(nodeReimageOption)).
      - V(requeue) stops running tasks now and runs them again on the new image; V(terminate) stops them
        and marks them completed with a failure; V(taskcompletion) waits for running tasks to end;
        V(retaineddata) also waits until every task's retained data has expired.
    type: str
    choices: [requeue, terminate, taskcompletion, retaineddata]
    default: requeue
  image_url:
    description:
      - HTTP(S) URL of the image (raw, gzip, xz or zstd). Needs O(image_sha256).
      - Without O(image_url) and O(manifest_url) the agent writes the image its configuration names;
        then the module cannot tell whether the node already runs it and always reimages.
    type: str
  image_sha256:
    description:
      - Hex SHA-256 of the raw (decoded) image. The agent refuses an image that does not match it.
    type: str
  image_size:
    description:
      - Size in bytes of the raw image, when known; the agent then refuses one of another size early.
    type: int
  manifest_url:
    description:
      - URL of an image manifest (C(*.manifest.json), as written by C(reimage-agent image pack)), instead of
        O(image_url).
      - The module reads the manifest too, with the same TLS options, to learn the image's SHA-256.
    type: str
  force:
    description:
      - Reimage even when the node already runs the target image.
    type: bool
    default: false
  wait:
    description:
      - Follow the operation until it ends. With V(false) the module returns once the agent accepted it.
    type: bool
    default: true
  wait_timeout:
    description:
      - Seconds to wait for the operation to end (download, write, read-back and reboot) before failing
        with code C(Timeout). The operation itself goes on on the node.
    type: float
    default: 3600
  poll_interval:
    description:
      - Seconds between two looks at the operation while waiting. While the node reboots its agent does
        not answer; such polls are not failures.
    type: float
    default: 2
notes:
  - Run it with the C(local) connection (or delegated to a host that reaches the agents); roll a fleet in waves
    with the play's C(serial) and C(max_fail_percentage), as C(ansible/playbooks/rollout.yml) does.
seealso:
  - module: reimage.agent.node_info
'''

EXAMPLES = r'''
- name: Reimage the node with an image given by URL and hash
  reimage.agent.reimage:
    agent_url: "https://{{ inventory_hostname }}:7480"
    token: "{{ reimage_admin_token }}"
    ca_path: /etc/pki/reimage/ca.pem
    image_url: https://images.example/os-2026.11.img.zst
    image_sha256: 5f0c5d2b6e0cc8a3d0bb5a0b7f7b8e2d4c7e6a1f9b3c2d1e0f9a8b7c6d5e4f3a
  delegate_to: localhost

- name: Reimage from a manifest, letting running tasks finish first
  reimage.agent.reimage:
    agent_url: "{{ reimage_agent_url }}"
    manifest_url: https://images.example/os-2026.11.img.zst.manifest.json
    option: taskcompletion
    wait_timeout: 7200

- name: Only request it; follow it elsewhere
  reimage.agent.reimage:
    agent_url: "{{ reimage_agent_url }}"
    manifest_url: https://images.example/os-2026.11.img.zst.manifest.json
    wait: false
  register: request

- name: Show the operation's id
  ansible.builtin.debug:
    msg: "{{ request.operation.id }}"
'''

RETURN = r'''
image_sha256:
  description: SHA-256 of the target image, when it is known.
  returned: when O(image_sha256) or O(manifest_url) is given
  type: str
  sample: 5f0c5d2b6e0cc8a3d0bb5a0b7f7b8e2d4c7e6a1f9b3c2d1e0f9a8b7c6d5e4f3a
adopted:
  description: Whether a reimage already in flight on the node was followed instead of requesting one.
  returned: always
  type: bool
  sample: false
operation:
  description:
    - The agent's operation (C(GET /v1/operations/{id})), as it was when the module returned.
    - Its C(status) is C(Succeeded) or C(Failed) when O(wait=true), C(InProgress) otherwise.
  returned: when a reimage was requested or followed
  type: dict
  sample:
    id: 0f8e4c1a-6d2b-4f3e-9a7c-1b2d3e4f5a6b
    kind: reimage
    status: Succeeded
    phase: done
    nodeReimageOption: requeue
    progress: {bytesWritten: 8388608, totalBytes: 8388608, bytesPerSecond: 52428800}
    requeuedTasks: []
    terminatedTasks: []
    image: {name: os-2026.11.img.zst, sha256: 5f0c5d2b6e0cc8a3d0bb5a0b7f7b8e2d4c7e6a1f9b3c2d1e0f9a8b7c6d5e4f3a}
node:
  description: The node (C(GET /v1/node)) before the request, or after the operation succeeded.
  returned: always, except when a request to the agent failed
  type: dict
  sample:
    id: node-17
    state: idle
    schedulingState: enabled
    image: {name: os-2026.11.img.zst, sha256: 5f0c5d2b6e0cc8a3d0bb5a0b7f7b8e2d4c7e6a1f9b3c2d1e0f9a8b7c6d5e4f3a}
code:
  description: The agent's error code (C(SavedPartitionCollision), C(ImageChecksumMismatch), ...), C(Timeout) or C(ConnectionFailed).
  returned: failure
  type: str
  sample: SavedPartitionCollision
'''

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.reimage.agent.plugins.module_utils.agent_client import (
    AgentError,
    agent_argument_spec,
    run_module,
    wait_for_operation,
)


def target_sha256(client, params):
    """The SHA-256 the node should end up running, or ``None`` when the
    agent's configured image is to be written."""
    if params['image_sha256']:
        return params['image_sha256'].lower()
    if params['manifest_url']:
        sha256 = client.fetch_json(params['manifest_url']).get('sha256')
        if not isinstance(sha256, str):
            raise AgentError('ManifestInvalid', '%s has no sha256' % params['manifest_url'])
        return sha256.lower()
    return None


def reimage_in_flight(client, target):
    """A reimage of ``target`` the node is still doing, to follow rather
    than request again (the agent would answer 409 NodeBeingReimaged)."""
    operations = client.get('/v1/operations').get('value', [])
    for operation in reversed(operations):
        if operation.get('kind') != 'reimage' or operation.get('status') != 'InProgress':
            continue
        image = operation.get('image') or {}
        if target is None or str(image.get('sha256', '')).lower() == target:
            return operation
    return None


def request_body(params):
    body = dict(nodeReimageOption=params['option'])
    if params['manifest_url']:
        body['manifestUrl'] = params['manifest_url']
    elif params['image_url']:
        body['image'] = dict(url=params['image_url'], sha256=params['image_sha256'].lower())
        if params['image_size'] is not None:
            body['image']['size'] = params['image_size']
    return body


def runs_image(node, target):
    image = node.get('image') or {}
    return target is not None and str(image.get('sha256', '')).lower() == target


def run(module, client):
    params = module.params
    result = dict(changed=False, adopted=False)
    target = target_sha256(client, params)
    if target is not None:
        result['image_sha256'] = target
    result['node'] = client.get('/v1/node')
    operation = reimage_in_flight(client, target)
    if operation is None:
        if runs_image(result['node'], target) and not params['force']:
            result['msg'] = 'the node already runs image %s' % target
            return result
        result['changed'] = True
        if module.check_mode:
            result['msg'] = 'the node would be reimaged'
            return result
        operation = client.post('/v1/node/reimage', request_body(params))[1]
    else:
        result.update(changed=True, adopted=True)
    result['operation'] = operation
    if module.check_mode or not params['wait']:
        return result

    operation, ended = wait_for_operation(client, operation['id'], params['wait_timeout'], params['poll_interval'])
    result['operation'] = operation or result['operation']
    if not ended:
        module.fail_json(
            msg='reimage %s still in progress after %s s' % (result['operation']['id'], params['wait_timeout']),
            code='Timeout',
            **result
        )
    if operation.get('status') != 'Succeeded':
        error = operation.get('error') or {}
        module.fail_json(
            msg='reimage %s failed: %s: %s' % (operation['id'], error.get('code'), error.get('message')),
            code=error.get('code', 'OperationFailed'),
            **result
        )
    result['node'] = client.get('/v1/node')
    return result


def main():
    argument_spec = agent_argument_spec()
    argument_spec.update(
        option=dict(type='str', default='requeue', choices=['requeue', 'terminate', 'taskcompletion', 'retaineddata']),
        image_url=dict(type='str'),
        image_sha256=dict(type='str'),
        image_size=dict(type='int'),
        manifest_url=dict(type='str'),
        force=dict(type='bool', default=False),
        wait=dict(type='bool', default=True),
        wait_timeout=dict(type='float', default=3600.0),
        poll_interval=dict(type='float', default=2.0),
    )
    module = AnsibleModule(
        argument_spec=argument_spec,
        mutually_exclusive=[('image_url', 'manifest_url')],
        required_together=[('image_url', 'image_sha256')],
        required_by=dict(image_size='image_url'),
        supports_check_mode=True,
    )
    run_module(module, lambda client: run(module, client))


if __name__ == '__main__':
    main()
