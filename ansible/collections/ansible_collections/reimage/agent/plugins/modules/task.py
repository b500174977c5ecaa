#!/usr/bin/python
# SPDX-License-Identifier: Apache-2.0

from __future__ import annotations

DOCUMENTATION = r'''
module: task
short_description: Add or delete a local task on a node through its reimage-agent
description:
  - Adds a task (C(POST /v1/tasks)) that the node runs when it takes tasks, or deletes one
    (C(DELETE /v1/tasks/{id})), stopping it if it runs and removing its files.
  - Idempotent by O(id), so a task with that id that exists already (running, or completed and not yet
    deleted) is left alone; deleting a task that is not there changes nothing.
  - A task cannot be changed once added. When the task O(id) exists with another command line or
    environment the module fails (code C(TaskExists)); delete it first with O(state=absent).
  - Needs an C(operator) token, an C(admin) token for O(elevation_level=admin).
author: reimage-agent maintainers (@reimage-agent)
extends_documentation_fragment:
  - reimage.agent.agent
attributes:
  check_mode:
    support: full
    description: Reports whether the task would be added or deleted.
  diff_mode:
    support: none
    description: The module reports no diff.
options:
  id:
    description:
      - The task's id, 1 to 64 characters of C([A-Za-z0-9_-]).
    type: str
    required: true
  state:
    description:
      - V(present) adds the task unless it exists; V(absent) deletes it if it exists.
    type: str
    choices: [present, absent]
    default: present
  command_line:
    description:
      - The command the task runs, with C(sh -c) semantics. Required with O(state=present).
    type: str
  environment:
    description:
      - Environment variables of the task's process.
    type: dict
    default: {}
  retention_time:
    description:
      - ISO 8601 duration for which the task's files are kept after it completed (the agent's default is 7 days).
    type: str
  max_wall_clock_time:
    description:
      - ISO 8601 duration after which a running task is stopped.
    type: str
  elevation_level:
    description:
      - V(admin) runs the task as root; it needs an C(admin) token.
    type: str
    choices: [nonadmin, admin]
    default: nonadmin
  scope:
    description:
      - The auto-user's scope.
    type: str
    choices: [task, pool]
    default: task
seealso:
  - module: reimage.agent.scheduling
'''

EXAMPLES = r'''
- name: Warm the node's cache, keeping the output for a day
  reimage.agent.task:
    agent_url: "{{ reimage_agent_url }}"
    id: warm-cache
    command_line: /opt/jobs/warm-cache --size "$SIZE"
    environment:
      SIZE: 20G
    retention_time: P1D
    max_wall_clock_time: PT2H

- name: Delete it again
  reimage.agent.task:
    agent_url: "{{ reimage_agent_url }}"
    id: warm-cache
    state: absent
'''

RETURN = r'''
task:
  description:
    - The task as the agent knows it (C(GET /v1/tasks/{id})), with its C(state) (C(active), C(running),
      C(completed)) and C(executionInfo).
    - With O(state=absent), the task that was deleted.
  returned: when the task exists or was added
  type: dict
  sample:
    id: warm-cache
    commandLine: /opt/jobs/warm-cache --size "$SIZE"
    environmentSettings: [{name: SIZE, value: 20G}]
    constraints: {retentionTime: P1D, maxWallClockTime: PT2H}
    state: running
code:
  description: The agent's error code (C(InvalidTaskId), C(NodeNotAcceptingTasks), C(TaskExists), ...).
  returned: failure
  type: str
  sample: NodeNotAcceptingTasks
'''

from urllib.parse import quote

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.reimage.agent.plugins.module_utils.agent_client import (
    AgentError,
    agent_argument_spec,
    run_module,
)


def existing_task(client, task_id):
    """The task ``task_id``, or ``None`` when the agent has none of that id."""
    try:
        return client.get('/v1/tasks/%s' % quote(task_id, safe=''))
    except AgentError as err:
        if err.code == 'TaskNotFound':
            return None
        raise


def environment_of(task):
    return dict((s.get('name'), s.get('value')) for s in task.get('environmentSettings') or [])


def add_request(params):
    constraints = {}
    if params['retention_time']:
        constraints['retentionTime'] = params['retention_time']
    if params['max_wall_clock_time']:
        constraints['maxWallClockTime'] = params['max_wall_clock_time']
    return dict(
        id=params['id'],
        commandLine=params['command_line'],
        environmentSettings=[dict(name=k, value=str(v)) for k, v in sorted(params['environment'].items())],
        constraints=constraints,
        userIdentity=dict(autoUser=dict(scope=params['scope'], elevationLevel=params['elevation_level'])),
    )


def present(module, client):
    params = module.params
    task = existing_task(client, params['id'])
    if task is not None:
        wanted = dict((k, str(v)) for k, v in params['environment'].items())
        if task.get('commandLine') != params['command_line'] or environment_of(task) != wanted:
            raise AgentError(
                'TaskExists',
                'task %s exists with another command line or environment; tasks cannot be changed: '
                'delete it first (state=absent)' % params['id'],
            )
        return dict(changed=False, task=task)
    if module.check_mode:
        return dict(changed=True)
    return dict(changed=True, task=client.post('/v1/tasks', add_request(params))[1])


def absent(module, client):
    task_id = module.params['id']
    task = existing_task(client, task_id)
    if task is None:
        return dict(changed=False)
    if not module.check_mode:
        try:
            client.delete('/v1/tasks/%s' % quote(task_id, safe=''))
        except AgentError as err:
            # Deleted meanwhile (its retention expired): what was asked holds.
            if err.code != 'TaskNotFound':
                raise
    return dict(changed=True, task=task)


def main():
    argument_spec = agent_argument_spec()
    argument_spec.update(
        id=dict(type='str', required=True),
        state=dict(type='str', default='present', choices=['present', 'absent']),
        command_line=dict(type='str'),
        environment=dict(type='dict', default={}),
        retention_time=dict(type='str'),
        max_wall_clock_time=dict(type='str'),
        elevation_level=dict(type='str', default='nonadmin', choices=['nonadmin', 'admin']),
        scope=dict(type='str', default='task', choices=['task', 'pool']),
    )
    module = AnsibleModule(
        argument_spec=argument_spec,
        required_if=[('state', 'present', ['command_line'])],
        supports_check_mode=True,
    )
    action = present if module.params['state'] == 'present' else absent
    run_module(module, lambda client: action(module, client))


if __name__ == '__main__':
    main()
