# SPDX-License-Identifier: Apache-2.0

"""The one HTTP client of the collection's modules: the agent's API v1.

Every module builds requests through :class:`AgentClient`, so the bearer
token, TLS settings, retries and the agent's error body are handled in one
place.
"""

from __future__ import annotations

import json
import time
import uuid

from ansible.module_utils.basic import env_fallback
from ansible.module_utils.urls import fetch_url

# Answers a proxy or a restarting agent gives; a POST that met one is sent
# again with the same client-request-id, so the agent never acts twice.
RETRIED_STATUSES = (502, 503, 504)
POST_TRIES = 4
RETRY_BACKOFF_SECONDS = 0.25


def agent_argument_spec():
    """The options every module of the collection takes (see the doc fragment)."""
    return dict(
        agent_url=dict(type='str', required=True, aliases=['url']),
        token=dict(type='str', no_log=True, fallback=(env_fallback, ['REIMAGE_TOKEN'])),
        ca_path=dict(type='path'),
        validate_certs=dict(type='bool', default=True),
        client_cert=dict(type='path'),
        client_key=dict(type='path', no_log=False),
        request_timeout=dict(type='float', default=30.0),
    )


class AgentError(Exception):
    """The agent refused a request, or could not be reached.

    ``code`` is the agent's stable error code (``NodeBeingReimaged``,
    ``TaskNotFound``, ...), or ``ConnectionFailed`` when no answer came.
    """

    def __init__(self, code, message, status=None):
        super().__init__('%s: %s' % (code, message))
        self.code = code
        self.status = status

    @property
    def unreachable(self):
        """No HTTP answer came at all (the node may be rebooting)."""
        return self.code == 'ConnectionFailed'


class AgentClient:
    """Requests to one agent, as the module's common options say."""

    def __init__(self, module):
        self.module = module
        self.base_url = module.params['agent_url'].rstrip('/')

    def get(self, path):
        """GET ``path``; returns the decoded JSON body."""
        return self.request('GET', path)[1]

    def post(self, path, body=None):
        """POST ``body`` to ``path``; returns ``(status, json)``.

        A fresh ``client-request-id`` goes with it, and a connection error
        or a 502/503/504 is retried with the same id: the agent answers a
        replay with what the first request did, never a second operation.
        """
        headers = {'client-request-id': str(uuid.uuid4())}
        attempt = 1
        while True:
            try:
                return self.request('POST', path, body, headers)
            except AgentError as err:
                retriable = err.unreachable or err.status in RETRIED_STATUSES
                if not retriable or attempt == POST_TRIES:
                    raise
            time.sleep(RETRY_BACKOFF_SECONDS * 2 ** (attempt - 1))
            attempt += 1

    def delete(self, path):
        """DELETE ``path``."""
        self.request('DELETE', path)

    def request(self, method, path, body=None, headers=None):
        """One exchange; returns ``(status, json)`` or raises :class:`AgentError`."""
        headers = dict(headers or {})
        headers['Accept'] = 'application/json'
        token = self.module.params.get('token')
        if token:
            headers['Authorization'] = 'Bearer %s' % token
        data = None
        if body is not None:
            data = json.dumps(body)
            headers['Content-Type'] = 'application/json'
        response, info = fetch_url(
            self.module,
            self.base_url + path,
            data=data,
            headers=headers,
            method=method,
            timeout=self.module.params['request_timeout'],
            ca_path=self.module.params.get('ca_path'),
            # An agent URL is never to be looked up in ~/.netrc: the token
            # is the only credential.
            use_netrc=False,
        )
        status = info.get('status', -1)
        if status < 0:
            raise AgentError('ConnectionFailed', '%s %s: %s' % (method, self.base_url + path, info.get('msg')))
        if response is not None and status < 300:
            payload = decode(response.read())
        else:
            payload = decode(info.get('body', b''))
        if status >= 400:
            raise error_from_body(status, payload, '%s %s' % (method, path))
        return status, payload

    def fetch_json(self, url):
        """GET a JSON document from any URL with the same TLS options
        (an image manifest), without the agent's token."""
        response, info = fetch_url(
            self.module,
            url,
            headers={'Accept': 'application/json'},
            timeout=self.module.params['request_timeout'],
            ca_path=self.module.params.get('ca_path'),
        )
        status = info.get('status', -1)
        if response is None or status != 200:
            raise AgentError('DownloadFailed', 'GET %s: %s' % (url, info.get('msg')), status if status > 0 else None)
        payload = decode(response.read())
        if not isinstance(payload, dict):
            raise AgentError('ManifestInvalid', '%s is not a JSON object' % url, status)
        return payload


def run_module(module, run):
    """Ends the module with the result of ``run(client)``, or with the
    agent's error code and message when it raises :class:`AgentError`."""
    result, failure = None, None
    try:
        result = run(AgentClient(module))
    except AgentError as err:
        failure = err
    # Outside the except block: there fail_json would report the agent's
    # refusal as a crash of the module, with a traceback.
    if failure is not None:
        module.fail_json(msg=str(failure), code=failure.code, status=failure.status)
    module.exit_json(**result)


def decode(text):
    """JSON of a body; an empty body is ``None``, anything else its text."""
    if isinstance(text, bytes):
        text = text.decode('utf-8', 'replace')
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def error_from_body(status, payload, what):
    """The agent's error body, ``{"code", "message": {"value"}}``, as an
    :class:`AgentError`; a body of another shape (a proxy's page) is
    ``Http<status>``, as reimagectl names it."""
    if isinstance(payload, dict) and isinstance(payload.get('code'), str):
        message = payload.get('message')
        if isinstance(message, dict):
            message = message.get('value')
        return AgentError(payload['code'], '%s: %s' % (what, message), status)
    return AgentError('Http%d' % status, '%s: %s' % (what, payload), status)


def wait_for_operation(client, operation_id, timeout, poll_interval):
    """Polls the operation until it is no longer ``InProgress``; returns
    ``(operation, ended)``.

    The agent may not answer for a while (the node reboots into its new
    image, its agent restarts): such polls are skipped, not failures, until
    the deadline.
    """
    deadline = time.monotonic() + timeout
    operation = None
    while True:
        try:
            operation = client.get('/v1/operations/%s' % operation_id)
            if operation.get('status') != 'InProgress':
                return operation, True
        except AgentError as err:
            if not err.unreachable and err.status not in RETRIED_STATUSES:
                raise
        if time.monotonic() + poll_interval > deadline:
            return operation, False
        time.sleep(poll_interval)
