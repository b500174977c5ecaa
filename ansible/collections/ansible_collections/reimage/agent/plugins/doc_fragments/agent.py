# SPDX-License-Identifier: Apache-2.0

from __future__ import annotations


class ModuleDocFragment:
    """The options every module of the collection takes: where the agent is
    and how to authenticate to it."""

    DOCUMENTATION = r'''
options:
  agent_url:
    description:
      - Base URL of the node's reimage-agent API, such as C(https://node-17.example:7480).
      - The module runs where Ansible runs it (usually the controller, with the C(local) connection) and
        talks to the agent over HTTP(S); nothing is executed on the node itself.
    type: str
    required: true
    aliases: [url]
  token:
    description:
      - Bearer token of the agent's API.
      - Reading needs a C(reader) token, tasks and scheduling an C(operator) token, reimaging an C(admin) token.
      - If not set, the environment variable E(REIMAGE_TOKEN) is used.
    type: str
  ca_path:
    description:
      - PEM file of the CA certificates that sign the agent's TLS certificate (and the manifest server's),
        when they are not in the system's trust store.
    type: path
  validate_certs:
    description:
      - Whether to verify the agent's TLS certificate. Only set to V(false) on a lab network.
    type: bool
    default: true
  client_cert:
    description:
      - PEM client certificate, for agents whose API requires one (C([api] client_ca) in their config).
    type: path
  client_key:
    description:
      - PEM private key of O(client_cert), when the certificate file does not hold it.
    type: path
  request_timeout:
    description:
      - Seconds to wait for the answer to one HTTP request.
    type: float
    default: 30
notes:
  - Every POST carries a fresh C(client-request-id) and is retried on a connection error or a 502, 503 or 504
    answer with the same id, so the agent never acts twice on one request.
  - Failures return the agent's stable error code in the C(code) return value (C(NodeBeingReimaged),
    C(SavedPartitionCollision), ..., or C(ConnectionFailed) when the agent did not answer).
'''
