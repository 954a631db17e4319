"""Malformed-input matrix: each bad input gets a clear typed error, and the worker keeps serving.

Also: a token sent with an invocation is found nowhere — not in any Redis key (broker messages
included, with the operator's sealing key on), not in Flower's view of the events, not in the log.
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import pytest
from celery import Celery

from devkit.gateway import make_token
from devkit.stack import DEFAULT_JWT_SECRET, DevStack, Proc
from tests.helpers import invoke, redis_values, settings_with, token_headers
from workers.contract import TASK_GET_SERVER, TASK_INVOKE, TASK_LIST_TOOLS, TOKEN_HEADER
from workers.errors import (
    AuthenticationFailed,
    InvalidInvocation,
    InvalidToken,
    PayloadTooLarge,
    SarkError,
    TokenExpired,
    UnknownServer,
)

pytestmark = pytest.mark.usefixtures("worker")

OK = {"server": "echo", "tool": "echo", "arguments": {"x": 1}}
BAD_INVOCATIONS: list[tuple[str, Any, type[SarkError]]] = [
    ("not an object", "echo", InvalidInvocation),
    ("a list", ["echo", "echo"], InvalidInvocation),
    ("null", None, InvalidInvocation),
    ("missing server", {"tool": "echo"}, InvalidInvocation),
    ("missing tool", {"server": "echo"}, InvalidInvocation),
    ("server not a string", {"server": 42, "tool": "echo"}, InvalidInvocation),
    ("empty tool", {"server": "echo", "tool": ""}, InvalidInvocation),
    ("tool with spaces", {"server": "echo", "tool": "rm -rf"}, InvalidInvocation),
    ("path traversal server", {"server": "../../etc", "tool": "echo"}, InvalidInvocation),
    ("arguments a string", {**OK, "arguments": "x=1"}, InvalidInvocation),
    ("arguments a list", {**OK, "arguments": [1, 2]}, InvalidInvocation),
    ("a command field", {**OK, "command": "/bin/sh"}, InvalidInvocation),
    ("an env field", {**OK, "env": {"LD_PRELOAD": "/tmp/x.so"}}, InvalidInvocation),
    ("unknown transport", {**OK, "transport": "carrier-pigeon"}, InvalidInvocation),
    ("stdio transport for a Gateway server", {**OK, "transport": "stdio"}, InvalidInvocation),
    ("negative timeout", {**OK, "timeout": -5}, InvalidInvocation),
    ("timeout above the maximum", {**OK, "timeout": 10_000}, InvalidInvocation),
    ("timeout below the minimum", {**OK, "timeout": 1e-9}, InvalidInvocation),
    ("stream not a bool", {**OK, "stream": "yes please"}, InvalidInvocation),
    ("unknown server", {**OK, "server": "nobody-home"}, UnknownServer),
    ("oversized arguments", {**OK, "arguments": {"blob": "y" * 1_200_000}}, PayloadTooLarge),
    ("deeply nested arguments", {**OK, "arguments": {"a": [[[[[[[[[[{"b": 1}]]]]]]]]]]}}, SarkError),
]


def test_malformed_invocation_matrix(celery_client: Celery, user_token: str, worker: Proc) -> None:
    pendings = []
    for name, raw, expected in BAD_INVOCATIONS:
        task_id = str(uuid.uuid4())
        pending = celery_client.send_task(TASK_INVOKE, task_id=task_id, kwargs={"invocation": raw},
                                          headers=token_headers(user_token, task_id))
        pendings.append((name, pending, expected))
    outcomes: Counter[str] = Counter()
    for name, pending, expected in pendings:
        if expected is SarkError:  # valid after all: must succeed (deep nesting is fine JSON)
            assert pending.get(timeout=30)["is_error"] is False, name
            outcomes["ok"] += 1
            continue
        with pytest.raises(expected) as info:
            pending.get(timeout=30)
        assert info.value.message, name
        outcomes[type(info.value).__name__] += 1
    print(f"\nMALFORMED INPUT: {len(pendings)} inputs -> {dict(outcomes)}; lost 0")
    assert worker.alive()
    assert invoke(celery_client, "echo", "echo", {"still": "alive"}, token=user_token)["is_error"] is False


def test_malformed_task_messages(celery_client: Celery) -> None:
    # Not even the right task signature: Celery-level errors, the worker survives.
    with pytest.raises(TypeError):
        celery_client.send_task(TASK_INVOKE, args=[1, 2, 3]).get(timeout=30)
    with pytest.raises(TypeError):
        celery_client.send_task(TASK_INVOKE, kwargs={"nope": 1}).get(timeout=30)
    with pytest.raises(InvalidInvocation):
        celery_client.send_task(TASK_GET_SERVER, kwargs={"server_id": ""}).get(timeout=30)
    with pytest.raises(UnknownServer):
        celery_client.send_task(TASK_LIST_TOOLS, kwargs={"server": "nobody-home"}).get(timeout=30)


def test_token_checks_at_dequeue(celery_client: Celery) -> None:
    expired = make_token(DEFAULT_JWT_SECRET, ttl=-30)
    with pytest.raises(TokenExpired) as info:
        invoke(celery_client, "echo", "echo", token=expired)
    assert info.value.detail["expired_for"] >= 29
    with pytest.raises(AuthenticationFailed) as denied:
        invoke(celery_client, "echo", "echo", token="not-a-jwt")  # opaque: the Gateway decides (401)
    assert denied.value.detail["status_code"] == 401
    with pytest.raises(InvalidToken, match="could not be opened"):
        celery_client.send_task(TASK_INVOKE, kwargs={"invocation": OK},
                                headers={TOKEN_HEADER: "fernet:gAAAAABnot-really"}).get(timeout=30)
    user = make_token(DEFAULT_JWT_SECRET, sub="clear-user")
    with pytest.raises(InvalidToken, match="clear tokens are refused"):
        celery_client.send_task(TASK_INVOKE, kwargs={"invocation": OK}, headers={TOKEN_HEADER: user}).get(timeout=30)
    # A sealed header re-sent under its own task id with other arguments is refused: bound to its invocation.
    task_id = str(uuid.uuid4())
    sealed_for_ok = token_headers(user, task_id, invocation=OK)
    with pytest.raises(InvalidToken, match="another invocation"):
        celery_client.send_task(TASK_INVOKE, task_id=task_id, kwargs={"invocation": {**OK, "tool": "add"}},
                                headers=sealed_for_ok).get(timeout=30)
    # A sealed header copied from another task's message is refused: it is bound to its own task.
    stolen = token_headers(user, "some-other-task-id")
    with pytest.raises(InvalidToken, match="another task"):
        celery_client.send_task(TASK_INVOKE, kwargs={"invocation": OK}, headers=stolen).get(timeout=30)


def _scan_redis(url: str, needle: bytes) -> list[str]:
    """Keys whose name or value holds ``needle``."""
    return [key for key, blob in redis_values(url).items() if needle in blob]


def test_token_found_nowhere(stack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> None:
    from cryptography.fernet import Fernet

    from workers.client import SarkClient

    key = Fernet.generate_key().decode()
    queue = "sark.http.sealed"
    env = {"SARK_TOKEN_KEY": key, "SARK_QUEUE_HTTP": queue, "SARK_QUEUE_SSE": queue + ".sse"}
    proc = stack.worker("sealed", env=env, queues=f"{queue},{queue}.sse")
    client = SarkClient(settings_with(env))
    token = make_token(DEFAULT_JWT_SECRET, sub="canary-user-7f3a", teams=["users"])
    try:
        # queued while paused, so the sealed message sits in Redis when we scan
        handles = [client.invoke("echo", "add", {"a": 1, "b": i}, token=token) for i in range(3)]
        streamed = client.invoke("echo-stream", "stream_data", {"count": 3}, token=token, stream=True)
        failing = client.invoke("restricted", "echo", {}, token=token)
        for handle in handles:
            assert handle.result(timeout=30).is_error is False
        assert len(list(streamed.stream())) == 3
        with pytest.raises(SarkError):
            failing.result(timeout=30)
        assert stack.redis is not None
        assert _scan_redis(stack.redis.url, token.encode()) == []
        assert _scan_redis(stack.redis.url, token.split(".")[1].encode()) == []  # not even the claims
        assert token not in proc.log()
        assert token.split(".")[1] not in proc.log()
    finally:
        proc.stop()
        client.close()
