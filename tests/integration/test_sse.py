"""SSE transport end to end: a client ``send_task``s, a real worker streams from the real Gateway
into real Redis, and the client follows the invocation's Redis Stream."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis
from celery import Celery

from devkit.stack import DevStack
from tests.conftest import GatewayControl
from tests.helpers import send_invoke, token_headers
from workers.errors import ProtocolError, ResultTooLarge, ToolError, UnknownServer
from workers.keys import stream_key
from workers.models import Chunk
from workers.streams import reader as stream_client
from workers.streams.publisher import StreamEntry

pytestmark = pytest.mark.usefixtures("worker")

WAIT = 30


def _collect(task_id: str, **options: Any) -> list[Chunk]:
    return list(stream_client.stream(task_id, idle_timeout=WAIT, **options))


def _terminal(task_id: str) -> StreamEntry:
    *_, last = stream_client.follow(task_id, idle_timeout=WAIT)
    assert last.terminal
    return last


def _assert_contiguous(chunks: list[Chunk], count: int) -> None:
    assert [c.seq for c in chunks] == list(range(count))
    assert [c.data["index"] for c in chunks] == list(range(count))  # type: ignore[index,call-overload]
    assert [c.event_id for c in chunks] == [str(i) for i in range(count)]


def test_streamed_chunks_and_final_result(celery_client: Celery, user_token: str, stack: DevStack) -> None:
    pending = send_invoke(celery_client, "echo-stream", "stream_data", {"count": 20, "interval": 0.002},
                          token=user_token, stream=True)
    chunks = _collect(pending.id)
    _assert_contiguous(chunks, 20)
    assert all(c.event_type == "message" and c.ts > 0 for c in chunks)
    result = pending.get(timeout=WAIT)
    assert result["transport"] == "sse"
    assert result["chunks"] == 20
    assert result["result"]["structuredContent"] == {"chunks": 20, "resumed_at": 0}
    done = _terminal(pending.id)
    assert done.kind == "done" and done.chunks == 20
    assert done.result == result["result"]  # the final result is what `event: done` carried
    ttl = redis.Redis.from_url(stack.redis.url).ttl(stream_key(pending.id))  # type: ignore[union-attr]
    assert 0 < ttl <= 3_600


def test_server_drop_mid_stream_resumes_without_duplicates(
    celery_client: Celery, user_token: str, gateway_control: GatewayControl
) -> None:
    args = {"count": 30, "drop_after": 7, "drops": 2, "retry": 10}
    pending = send_invoke(celery_client, "echo-stream", "stream_data", args, token=user_token, stream=True)
    chunks = _collect(pending.id)
    _assert_contiguous(chunks, 30)
    result = pending.get(timeout=WAIT)
    assert result["chunks"] == 30
    assert result["result"]["structuredContent"] == {"chunks": 30, "resumed_at": 14}
    stats = gateway_control.stats()
    assert stats["request_ids"][pending.id] == 3  # first connection + two resumes
    resumes = [h["last-event-id"] for h in stats["headers"] if "last-event-id" in h]
    assert resumes == ["6", "13"]


def test_server_replaying_after_resume_is_deduplicated(celery_client: Celery, user_token: str) -> None:
    args = {"count": 20, "drop_after": 8, "retry": 5, "replay": True, "keepalive": True}
    pending = send_invoke(celery_client, "echo-stream", "stream_data", args, token=user_token, stream=True)
    _assert_contiguous(_collect(pending.id), 20)
    assert pending.get(timeout=WAIT)["chunks"] == 20


def test_error_event_ends_with_typed_error(celery_client: Celery, user_token: str) -> None:
    pending = send_invoke(celery_client, "echo-stream", "stream_data", {"count": 10, "error_at": 4, "status": 502},
                          token=user_token, stream=True)
    seen: list[Chunk] = []
    with pytest.raises(ToolError) as info:
        for chunk in stream_client.stream(pending.id, idle_timeout=WAIT):
            seen.append(chunk)
    assert info.value.status_code == 502
    assert "chunk 4" in str(info.value)
    _assert_contiguous(seen, 4)
    with pytest.raises(ToolError) as from_backend:
        pending.get(timeout=WAIT)
    assert from_backend.value.status_code == 502
    terminal = _terminal(pending.id)
    assert terminal.kind == "error" and terminal.chunks == 4
    assert terminal.error is not None and terminal.error["type"] == "ToolError"


@pytest.mark.parametrize(
    ("knob", "message"),
    [({"non_json": 3}, "non-JSON data in SSE event 3"), ({"malformed": 2}, "malformed SSE event 2")],
)
def test_bad_events_are_protocol_errors(
    celery_client: Celery, user_token: str, knob: dict[str, int], message: str
) -> None:
    pending = send_invoke(celery_client, "echo-stream", "stream_data", {"count": 6, **knob},
                          token=user_token, stream=True)
    with pytest.raises(ProtocolError, match=message):
        _collect(pending.id)
    with pytest.raises(ProtocolError, match=message):
        pending.get(timeout=WAIT)
    assert _terminal(pending.id).kind == "error"


def test_stream_that_stops_without_done(
    celery_client: Celery, user_token: str, gateway_control: GatewayControl
) -> None:
    pending = send_invoke(celery_client, "echo-stream", "stream_data", {"count": 3, "no_done": True, "retry": 5},
                          token=user_token, stream=True)
    with pytest.raises(ProtocolError, match="without 'done'"):
        _collect(pending.id)
    with pytest.raises(ProtocolError, match="resume attempts exhausted"):
        pending.get(timeout=WAIT)
    # one connection, then sse_reconnects (3) resumes that brought nothing new
    assert gateway_control.stats()["request_ids"][pending.id] == 4


def test_ten_thousand_chunks(celery_client: Celery, user_token: str, stack: DevStack) -> None:
    pending = send_invoke(celery_client, "echo-stream", "stream_data", {"count": 10_000},
                          token=user_token, stream=True)
    chunks = _collect(pending.id)
    _assert_contiguous(chunks, 10_000)
    assert pending.get(timeout=WAIT)["chunks"] == 10_000
    assert redis.Redis.from_url(stack.redis.url).xlen(stream_key(pending.id)) == 10_001  # type: ignore[union-attr]


def test_stream_flag_on_http_transport_gives_terminal_only(celery_client: Celery, user_token: str) -> None:
    pending = send_invoke(celery_client, "echo", "echo", {"x": 1}, token=user_token, stream=True, transport="http")
    assert _collect(pending.id) == []
    result = pending.get(timeout=WAIT)
    assert result["transport"] == "http" and result["chunks"] == 0
    assert _terminal(pending.id).result == result["result"]


def test_stream_of_non_streaming_tool(celery_client: Celery, user_token: str) -> None:
    pending = send_invoke(celery_client, "echo-stream", "add", {"a": 1, "b": 2}, token=user_token, stream=True)
    assert _collect(pending.id) == []
    assert pending.get(timeout=WAIT)["result"]["structuredContent"] == {"sum": 3.0}


def test_failure_before_the_call_still_ends_the_stream(celery_client: Celery, user_token: str) -> None:
    unknown = send_invoke(celery_client, "no-such-server", "x", token=user_token, stream=True)
    with pytest.raises(UnknownServer):
        _collect(unknown.id)
    missing_tool = send_invoke(celery_client, "echo-stream", "no_such_tool", token=user_token, stream=True)
    with pytest.raises(ToolError) as info:
        _collect(missing_tool.id)
    assert info.value.status_code == 404


def test_stream_limits_keep_redis_bounded(stack: DevStack, celery_client: Celery, user_token: str) -> None:
    env = {"SARK_MAX_STREAM_CHUNKS": "100", "SARK_STREAM_TTL": "120"}
    with stack.running_worker("limited", env=env, queues="sark.limited", concurrency=2):
        task_id = str(uuid.uuid4())
        pending = celery_client.send_task(
            "sark.invoke",
            task_id=task_id,
            kwargs={"invocation": {"server": "echo-stream", "tool": "stream_data", "arguments": {"count": 500},
                                   "stream": True}},
            headers=token_headers(user_token, task_id),
            queue="sark.limited",
        )
        with pytest.raises(ResultTooLarge, match="100 chunks"):
            pending.get(timeout=WAIT)
    seen = 0
    with pytest.raises(ResultTooLarge):
        for _ in stream_client.stream(pending.id, idle_timeout=WAIT):
            seen += 1
    assert seen == 100
    conn = redis.Redis.from_url(stack.redis.url)  # type: ignore[union-attr]
    assert conn.xlen(stream_key(pending.id)) == 101  # 100 chunks + terminal, nothing more
    assert 0 < conn.ttl(stream_key(pending.id)) <= 120


def test_worker_killed_mid_stream_redelivery_publishes_nothing_twice(
    stack: DevStack, celery_client: Celery, user_token: str
) -> None:
    import signal
    from pathlib import Path

    from devkit.stack import wait_for

    registry = str(Path(__file__).with_name("faults-servers.yaml"))
    env = {"SARK_MAX_INVOKE_TIMEOUT": "2", "SARK_INVOKE_TIMEOUT": "2", "SARK_REGISTRY_PATH": registry}
    conn = redis.Redis.from_url(stack.redis.url)  # type: ignore[union-attr]
    first = stack.worker("doomed", env=env, queues="sark.redeliver", concurrency=2)
    task_id = str(uuid.uuid4())
    pending = celery_client.send_task(
        "sark.invoke",
        task_id=task_id,
        kwargs={"invocation": {"server": "echo-stream", "tool": "stream_data",
                               "arguments": {"count": 100, "interval": 0.01}, "stream": True}},
        headers=token_headers(user_token, task_id),
        queue="sark.redeliver",
    )
    key = stream_key(pending.id)
    wait_for(lambda: conn.xlen(key) >= 20, WAIT, "the first chunks")
    first.stop(sig=signal.SIGKILL)
    killed_at = conn.xlen(key)
    assert killed_at < 101
    # The doomed worker's heartbeat lapses and a sweeper (the heir, once it has beaten for a heartbeat
    # timeout) puts the unacked task back; the heir
    # replays the stream from the Gateway and publishes only the chunks Redis does not have yet.
    with stack.running_worker("heir", env=env, queues="sark.redeliver", concurrency=2):
        result = pending.get(timeout=WAIT)
    chunks = _collect(pending.id)
    _assert_contiguous(chunks, 100)
    assert result["chunks"] == 100
    assert conn.xlen(key) == 101
