#!/usr/bin/python
# SPDX-License-Identifier: Apache-2.0

from __future__ import annotations

DOCUMENTATION = r'''
module: node_info
short_description: Read a node's state from its reimage-agent
description:
  - Returns the node as its reimage-agent reports it (C(GET /v1/node)), with its state, scheduling state, tasks,
    the image it runs, its disk and saved partitions.
  - Optionally also the node's operations (C(GET /v1/operations)) and tasks (C(GET /v1/tasks)).
  - Never changes anything. A C(reader) token is enough.
author: reimage-agent maintainers (@reimage-agent)
extends_documentation_fragment:
  - reimage.agent.agent
attributes:
  check_mode:
    support: full
    description: The module only reads.
  diff_mode:
    support: none
    description: The module reports no diff.
options:
  operations:
    description:
      - Also return the node's operations, oldest first.
    type: bool
    default: false
  tasks:
    description:
      - Also return the node's tasks.
    type: bool
    default: false
seealso:
  - module: reimage.agent.reimage
'''

EXAMPLES = r'''
- name: Read the node
  reimage.agent.node_info:
    agent_url: "{{ reimage_agent_url }}"
  register: info

- name: Stop unless the node is idle
  ansible.builtin.assert:
    that: info.node.state == 'idle'

- name: The node's last operation
  reimage.agent.node_info:
    agent_url: "{{ reimage_agent_url }}"
    operations: true
  register: info

- name: Show it
  ansible.builtin.debug:
    msg: "{{ info.operations | last | default('no operation yet') }}"
'''

RETURN = r'''
node:
  description: The node, as C(GET /v1/node) answers.
  returned: success
  type: dict
  sample:
    id: node-17
    state: idle
    schedulingState: enabled
    runningTasksCount: 0
    totalTasksRun: 12
    image: {name: os-2026.11.img.zst, sha256: 5f0c5d2b6e0cc8a3d0bb5a0b7f7b8e2d4c7e6a1f9b3c2d1e0f9a8b7c6d5e4f3a}
    disk:
      target: /dev/disk/by-id/nvme-example
      sizeBytes: 960197124096
      savedPartitions: [{index: 9, label: local-storage, startBytes: 64424509440, sizeBytes: 895772614656}]
    agentVersion: 0.1.0
operations:
  description: The node's operations, oldest first.
  returned: when O(operations=true)
  type: list
  elements: dict
tasks:
  description: The node's tasks.
  returned: when O(tasks=true)
  type: list
  elements: dict
code:
  description: The agent's error code (C(AuthenticationFailed), ...) or C(ConnectionFailed).
  returned: failure
  type: str
  sample: ConnectionFailed
'''

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.reimage.agent.plugins.module_utils.agent_client import (
    agent_argument_spec,
    run_module,
)


def main():
    argument_spec = agent_argument_spec()
    argument_spec.update(
        operations=dict(type='bool', default=False),
        tasks=dict(type='bool', default=False),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)

    def run(client):
        result = dict(changed=False, node=client.get('/v1/node'))
        if module.params['operations']:
            result['operations'] = client.get('/v1/operations').get('value', [])
        if module.params['tasks']:
            result['tasks'] = client.get('/v1/tasks').get('value', [])
        return result

    run_module(module, run)


if __name__ == '__main__':
    main()
