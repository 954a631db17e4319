"""Small helpers shared by the tests."""

from __future__ import annotations

import contextlib
import os
import ssl
import threading
import uuid
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult

from config.settings import Settings
from workers.contract import OPERATOR_HEADER, TASK_INVOKE, TOKEN_HEADER
from workers.display import invocation_repr
from workers.tokens import operator_signature, seal_token


@contextlib.contextmanager
def http_server(handler: type[BaseHTTPRequestHandler], ssl_context: ssl.SSLContext | None = None) -> Iterator[str]:
    """A real HTTP(S) server on a free loopback port, serving ``handler`` in threads; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.handle_error = lambda request, address: None  # type: ignore[method-assign]  # clients hanging up early
    if ssl_context is not None:
        server.socket = ssl_context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https' if ssl_context else 'http'}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def clients_configured(env: Mapping[str, str]) -> Iterator[dict[str, str]]:
    """``env`` (a registry path, a plug-in…) set in this process's environment for its clients, with the
    transport catalog re-read, for the ``with`` block; then both as they were. Yields ``env``."""
    from config.transports import reset_catalog

    patch = pytest.MonkeyPatch()
    for key, value in env.items():
        patch.setenv(key, value)
    reset_catalog()
    try:
        yield dict(env)
    finally:
        patch.undo()
        reset_catalog()


def settings_with(env: Mapping[str, str]) -> Settings:
    """Settings as a worker started with ``env`` reads them: this process's ``SARK_*`` with ``env`` on top."""
    merged = {**{k: v for k, v in os.environ.items() if k.startswith("SARK_")}, **env}
    return Settings(**{k.removeprefix("SARK_").lower(): v for k, v in merged.items() if k.startswith("SARK_")})


def token_headers(token: str | None, task_id: str, key: str | None = None,
                  invocation: dict[str, Any] | None = None) -> dict[str, str] | None:
    """Message headers carrying ``token`` sealed for ``task_id``, as an app does (the default mode).

    ``key``: the sealing key (default: ``SARK_TOKEN_KEY`` of this process, set by the test stack).
    """
    if not token:
        return None
    key = key or os.environ["SARK_TOKEN_KEY"]
    return {TOKEN_HEADER: seal_token(token, key, task_id, invocation=invocation)}


def operator_headers(task_id: str, action: str, target: str | None, key: str | None = None) -> dict[str, str]:
    """Headers signing an operator action (``sark.breakers`` reset) for ``task_id`` with ``SARK_OPERATOR_KEY``."""
    return {OPERATOR_HEADER: operator_signature(key or os.environ["SARK_OPERATOR_KEY"], task_id, action, target)}


def send_invoke(
    app: Celery,
    server: str,
    tool: str,
    arguments: dict[str, Any] | None = None,
    *,
    token: str | None = None,
    queue: str | None = None,
    **fields: Any,
) -> AsyncResult:
    """Enqueue ``sark.invoke`` by name, exactly as an app without this project would (``queue``: instead
    of the app's routing)."""
    invocation: dict[str, Any] = {"server": server, "tool": tool, "arguments": arguments or {}, **fields}
    task_id = str(uuid.uuid4())
    return app.send_task(TASK_INVOKE, task_id=task_id, kwargs={"invocation": invocation},
                         headers=token_headers(token, task_id, invocation=invocation), argsrepr="()",
                         kwargsrepr=invocation_repr(invocation), **({"queue": queue} if queue else {}))


def invoke(app: Celery, server: str, tool: str, arguments: dict[str, Any] | None = None, *,
           token: str | None = None, wait: float = 30, **fields: Any) -> dict[str, Any]:
    """Enqueue and wait for the result (re-raising the task's typed error)."""
    result: dict[str, Any] = send_invoke(app, server, tool, arguments, token=token, **fields).get(timeout=wait)
    return result


def redis_values(url: str) -> dict[str, bytes]:
    """Every key of the Redis at ``url`` with its name and values joined (strings, lists, hashes, streams,
    sets, zsets): what a scan for a leaked secret reads."""
    client = redis.Redis.from_url(url)
    out: dict[str, bytes] = {}
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == b"string":
            values = [client.get(key) or b""]
        elif kind == b"list":
            values = client.lrange(key, 0, -1)
        elif kind == b"hash":
            values = [v for pair in client.hgetall(key).items() for v in pair]
        elif kind == b"stream":
            values = [v for _, fields in client.xrange(key) for pair in fields.items() for v in pair]
        elif kind == b"set":
            values = list(client.smembers(key))
        elif kind == b"zset":
            values = client.zrange(key, 0, -1)
        else:
            values = []
        out[key.decode(errors="replace")] = key + b"\n" + b"\n".join(values)
    client.close()
    return out


def aof_commands(data_dir: Path) -> Iterator[list[bytes]]:
    """Every command a redis-server (``start_redis(..., appendonly=True)``) logged to its AOF, oldest first."""
    aof_dir = data_dir / "appendonlydir"
    for line in (aof_dir / "appendonly.aof.manifest").read_text().splitlines():
        fields = dict(zip(line.split()[::2], line.split()[1::2], strict=False))
        if fields.get("type") == "i":  # incremental files; the base is empty here (no rewrites in a test)
            yield from _resp_commands((aof_dir / fields["file"]).read_bytes())


def _resp_commands(data: bytes) -> Iterator[list[bytes]]:
    pos = 0
    while data.startswith(b"*", pos):
        end = data.find(b"\r\n", pos)
        count, pos, args = int(data[pos + 1:end]), end + 2, []
        for _ in range(count):
            end = data.find(b"\r\n", pos)
            if end < 0:
                return  # a command cut short by kill -9
            size = int(data[pos + 1:end])
            args.append(data[end + 2:end + 2 + size])
            pos = end + 2 + size + 2
        if pos > len(data):
            return
        yield args


def popped_and_never_recorded(redis_url: str, data_dir: Path, lost_ids: list[str]) -> dict[str, str]:
    """Where each lost invocation's message ended, from the Redis AOF: ``"in transit"`` when it was proven
    popped from its queue and recorded nowhere (its last logged command is the ``LPUSH`` that queued it, and
    it is no longer in that list nor in kombu's unacknowledged hash), else the last command that named it."""
    last: dict[str, list[bytes]] = {}
    wanted = {rid.encode(): rid for rid in lost_ids}
    for command in aof_commands(data_dir):
        for needle, rid in wanted.items():
            if any(needle in arg for arg in command[1:]):
                last[rid] = command
    client = redis.Redis.from_url(redis_url)
    try:
        unacked = b"".join(client.hvals("unacked"))
        verdicts = {}
        for rid, needle in ((rid, rid.encode()) for rid in lost_ids):
            command = last.get(rid)
            if command is None:
                verdicts[rid] = "never in the AOF"
            elif (command[0].upper() == b"LPUSH" and needle not in b"".join(client.lrange(command[1], 0, -1))
                    and needle not in unacked):
                verdicts[rid] = "in transit"
            else:
                verdicts[rid] = "last: " + b" ".join(a[:60] for a in command[:3]).decode(errors="replace")
        return verdicts
    finally:
        client.close()


def xfail_if_only_lost_in_transit(verdicts: dict[str, str]) -> None:
    """Mark the test xfail when every lost invocation is proven (``popped_and_never_recorded``) to have
    been popped by ``BRPOP`` and never recorded.

    Known residual (README, "What is not covered"): kombu's Redis transport takes a message with ``BRPOP``,
    which removes it from its list before the reply reaches the worker. When the worker is SIGKILLed, or
    Redis shuts down, while that reply is in flight, the message is in no queue and no unacknowledged
    record: nothing can recover it (seen in 2 of about 8 runs of the 150-task restart test, and in 1 CI run
    of the mid-sweep kill, whose sweepers consume the messages they put back one by one). Any other loss
    fails the test, and the verdicts printed say where each message ended.
    """
    import pytest

    print(f"\nlost: {verdicts}")
    if verdicts and all(v == "in transit" for v in verdicts.values()):
        pytest.xfail(f"{len(verdicts)} message(s) popped by BRPOP and never delivered, proven from the AOF "
                     "(kombu's Redis transport; known residual)")
