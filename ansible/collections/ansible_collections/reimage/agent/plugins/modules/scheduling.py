#!/usr/bin/python
# SPDX-License-Identifier: Apache-2.0

from __future__ import annotations

DOCUMENTATION = r'''
module: scheduling
short_description: Enable or disable task scheduling on a node through its reimage-agent
description:
  - Disables task scheduling (C(POST /v1/node/disablescheduling)), so the node takes no new tasks, or
    enables it again (C(POST /v1/node/enablescheduling)).
  - Idempotent by the node's C(schedulingState), so nothing is requested when it already is as asked.
  - Needs an C(operator) token.
author: reimage-agent maintainers (@reimage-agent)
extends_documentation_fragment:
  - reimage.agent.agent
attributes:
  check_mode:
    support: full
    description: Reports whether the scheduling state would change.
  diff_mode:
    support: none
    description: The module reports no diff.
options:
  state:
    description:
      - V(disabled) or V(enabled).
    type: str
    choices: [enabled, disabled]
    required: true
  option:
    description:
      - With O(state=disabled), what happens to the tasks running now (C(nodeDisableSchedulingOption)).
      - V(requeue) stops them and runs them again once scheduling is enabled; V(terminate) stops them and
        marks them completed with a failure; V(taskcompletion) lets them finish.
    type: str
    choices: [requeue, terminate, taskcompletion]
    default: requeue
seealso:
  - module: reimage.agent.task
'''

EXAMPLES = r'''
- name: Drain the node, letting running tasks finish
  reimage.agent.scheduling:
    agent_url: "{{ reimage_agent_url }}"
    state: disabled
    option: taskcompletion

- name: Let it take tasks again
  reimage.agent.scheduling:
    agent_url: "{{ reimage_agent_url }}"
    state: enabled
'''

RETURN = r'''
scheduling_state:
  description: The node's scheduling state after the module ran (before it, in check mode).
  returned: success
  type: str
  sample: disabled
node:
  description: The node (C(GET /v1/node)) after the module ran (before it, in check mode).
  returned: success
  type: dict
  sample:
    id: node-17
    state: idle
    schedulingState: disabled
code:
  description: The agent's error code (C(OperationInvalidForCurrentState), ...) or C(ConnectionFailed).
  returned: failure
  type: str
  sample: OperationInvalidForCurrentState
'''

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.reimage.agent.plugins.module_utils.agent_client import (
    agent_argument_spec,
    run_module,
)


def run(module, client):
    wanted = module.params['state']
    node = client.get('/v1/node')
    changed = node.get('schedulingState') != wanted
    if changed and not module.check_mode:
        if wanted == 'disabled':
            client.post('/v1/node/disablescheduling', dict(nodeDisableSchedulingOption=module.params['option']))
        else:
            client.post('/v1/node/enablescheduling')
        node = client.get('/v1/node')
    return dict(changed=changed, scheduling_state=node.get('schedulingState'), node=node)


def main():
    argument_spec = agent_argument_spec()
    argument_spec.update(
        state=dict(type='str', required=True, choices=['enabled', 'disabled']),
        option=dict(type='str', default='requeue', choices=['requeue', 'terminate', 'taskcompletion']),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    run_module(module, lambda client: run(module, client))


if __name__ == '__main__':
    main()
