"""The stream client for other apps, against real Redis and a real worker streaming from the Gateway."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import pytest
from celery import Celery

from devkit.stack import wait_for
from tests.helpers import send_invoke, token_headers
from workers.client import SarkClient
from workers.errors import Cancelled, InvalidInvocation, InvocationTimeout, ProtocolError
from workers.models import Chunk
from workers.streams import reader as stream_client
from workers.streams.publisher import entry_id

pytestmark = pytest.mark.usefixtures("worker")

WAIT = 30


def _start(celery_client: Celery, token: str, **arguments: Any) -> str:
    pending = send_invoke(celery_client, "echo-stream", "stream_data", arguments, token=token, stream=True)
    return str(pending.id)


def _seqs(chunks: list[Chunk]) -> list[int]:
    return [c.seq for c in chunks]


def test_late_subscriber_gets_everything(celery_client: Celery, user_token: str) -> None:
    pending = send_invoke(celery_client, "echo-stream", "stream_data", {"count": 50}, token=user_token, stream=True)
    pending.get(timeout=WAIT)  # the invocation is over before anyone reads
    chunks = list(stream_client.stream(pending.id, idle_timeout=WAIT))
    assert _seqs(chunks) == list(range(50))
    assert _seqs(list(stream_client.stream(pending.id, from_seq=30, idle_timeout=WAIT))) == list(range(30, 50))
    assert _seqs(list(stream_client.stream(pending.id, after=entry_id(44), idle_timeout=WAIT))) == list(range(45, 50))


def test_subscriber_attached_before_the_task_starts(celery_client: Celery, user_token: str) -> None:
    task_id = str(uuid.uuid4())
    got: list[Chunk] = []
    reader = threading.Thread(target=lambda: got.extend(stream_client.stream(task_id, idle_timeout=WAIT)))
    reader.start()
    celery_client.send_task(
        "sark.invoke", task_id=task_id, headers=token_headers(user_token, task_id),
        kwargs={"invocation": {"server": "echo-stream", "tool": "stream_data", "arguments": {"count": 25},
                               "stream": True}},
    )
    reader.join(WAIT)
    assert not reader.is_alive()
    assert _seqs(got) == list(range(25))


def test_reconnect_mid_stream_loses_nothing_and_repeats_nothing(celery_client: Celery, user_token: str) -> None:
    task_id = _start(celery_client, user_token, count=300, interval=0.002)
    got: list[Chunk] = []
    for _ in range(3):  # three readers in turn, each leaving after 40 chunks
        position = got[-1].seq + 1 if got else 0
        reader = stream_client.stream(task_id, from_seq=position, idle_timeout=WAIT, count=7)
        for chunk in reader:
            got.append(chunk)
            if chunk.seq - position >= 39:
                break
        reader.close()
    got.extend(stream_client.stream(task_id, from_seq=got[-1].seq + 1, idle_timeout=WAIT))
    assert _seqs(got) == list(range(300))


def test_async_stream_with_reconnect(celery_client: Celery, user_token: str) -> None:
    task_id = _start(celery_client, user_token, count=120, interval=0.002)

    async def read() -> list[Chunk]:
        got: list[Chunk] = []
        async for chunk in stream_client.astream(task_id, idle_timeout=WAIT):
            got.append(chunk)
            if len(got) == 60:
                break
        async for chunk in stream_client.astream(task_id, from_seq=60, idle_timeout=WAIT):
            got.append(chunk)
        return got

    assert _seqs(asyncio.run(read())) == list(range(120))


def test_slow_consumer_does_not_hold_the_worker(celery_client: Celery, user_token: str) -> None:
    pending = send_invoke(celery_client, "echo-stream", "stream_data", {"count": 2_000}, token=user_token, stream=True)
    reader = stream_client.stream(pending.id, idle_timeout=WAIT, count=10)
    first = [next(reader) for _ in range(10)]
    wait_for(pending.ready, WAIT, "the invocation to finish while its reader sleeps")
    assert pending.get(timeout=WAIT)["chunks"] == 2_000
    assert _seqs(first + list(reader)) == list(range(2_000))


def test_two_subscribers_each_get_every_chunk(celery_client: Celery, user_token: str) -> None:
    task_id = _start(celery_client, user_token, count=200, interval=0.001)
    results: list[list[Chunk]] = [[], []]
    readers = [threading.Thread(target=lambda i=i: results[i].extend(stream_client.stream(task_id, idle_timeout=WAIT)))
               for i in range(2)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(WAIT)
    assert [_seqs(r) for r in results] == [list(range(200))] * 2


def test_cancel_mid_stream_writes_cancelled_terminal(celery_client: Celery, user_token: str) -> None:
    client = SarkClient(app=celery_client)
    handle = client.invoke("echo-stream", "stream_data", {"count": 2_000, "interval": 0.01}, token=user_token,
                           stream=True)
    reader = handle.stream()
    assert [next(reader).seq for _ in range(5)] == [0, 1, 2, 3, 4]
    handle.cancel()
    with pytest.raises(Cancelled):
        for _ in reader:
            pass
    *_, last = stream_client.follow(handle.id, idle_timeout=WAIT)
    assert last.kind == "cancelled" and 5 <= last.chunks < 2_000


def test_idle_stream_times_out_clearly() -> None:
    with pytest.raises(InvocationTimeout, match="no new entry"):
        list(stream_client.stream(str(uuid.uuid4()), idle_timeout=0.3, block_ms=100))


def test_position_arguments_are_checked() -> None:
    with pytest.raises(InvalidInvocation):
        list(stream_client.stream("x", after="0-1", from_seq=2))
    with pytest.raises(InvalidInvocation):
        list(stream_client.stream("x", from_seq=-1))


def test_timeout_bounds_a_live_stream(celery_client: Celery, user_token: str) -> None:
    client = SarkClient(app=celery_client)
    handle = client.invoke("echo-stream", "stream_data", {"count": 200, "interval": 0.1}, token=user_token,
                           stream=True)
    over = celery_client.AsyncResult(handle.id).ready
    got: list[Chunk] = []
    start = time.monotonic()
    try:
        with pytest.raises(InvocationTimeout, match=r"not finished within 1\.5s"):
            for chunk in stream_client.stream(handle.id, timeout=1.5, finished=over):
                got.append(chunk)
        took = time.monotonic() - start
        assert 1.5 <= took < 2.0, took
        assert got and _seqs(got) == list(range(len(got)))  # a running task's stream is followed until then
    finally:
        handle.cancel()


def test_finished_task_without_a_stream_ends_at_once(celery_client: Celery, user_token: str) -> None:
    pending = send_invoke(celery_client, "echo", "add", {"a": 1, "b": 2}, token=user_token)  # not streamed
    pending.get(timeout=WAIT)
    start = time.monotonic()
    with pytest.raises(ProtocolError, match="no terminal entry") as raised:
        list(stream_client.stream(pending.id, timeout=WAIT, finished=pending.ready))
    assert raised.value.detail["finished"] is True
    assert time.monotonic() - start < 0.5  # one read, one check: no block


def test_finished_check_keeps_every_entry_of_a_finished_stream(celery_client: Celery, user_token: str) -> None:
    pending = send_invoke(celery_client, "echo-stream", "stream_data", {"count": 20}, token=user_token, stream=True)
    pending.get(timeout=WAIT)
    entries = list(stream_client.follow(pending.id, finished=lambda: True))  # over, yet its stream is read whole
    assert [e.kind for e in entries] == ["chunk"] * 20 + ["done"]


def test_finished_check_while_a_stream_runs(celery_client: Celery, user_token: str) -> None:
    """The check runs between reads of a quiet stream, and a True check never cuts the stream short."""
    pending = send_invoke(celery_client, "echo-stream", "stream_data", {"count": 10, "interval": 0.1},
                          token=user_token, stream=True)
    checks: list[bool] = []

    def finished() -> bool:
        checks.append(pending.ready())
        return checks[-1]

    assert _seqs(list(stream_client.stream(pending.id, timeout=WAIT, finished=finished, check_every=0.05))) == \
        list(range(10))
    assert checks  # called while the stream was quiet


def test_async_finished_check(celery_client: Celery, user_token: str) -> None:
    pending = send_invoke(celery_client, "echo", "add", {"a": 1, "b": 2}, token=user_token)
    pending.get(timeout=WAIT)

    async def finished() -> bool:
        return bool(await asyncio.to_thread(pending.ready))

    async def read() -> list[Chunk]:
        return [chunk async for chunk in stream_client.astream(pending.id, timeout=WAIT, finished=finished)]

    with pytest.raises(ProtocolError, match="no terminal entry"):
        asyncio.run(read())


def test_timeout_on_an_unknown_stream() -> None:
    start = time.monotonic()
    with pytest.raises(InvocationTimeout, match=r"not finished within 0\.3s"):
        list(stream_client.stream(str(uuid.uuid4()), timeout=0.3))
    assert time.monotonic() - start < 0.6
    with pytest.raises(InvocationTimeout):
        list(stream_client.stream(str(uuid.uuid4()), timeout=0.3, finished=lambda: False, check_every=0.1))


def test_a_running_streamed_invocation_has_its_stream_before_the_first_chunk(
    stack: Any, celery_client: Celery
) -> None:
    import redis

    from workers.keys import stream_key

    pending = send_invoke(celery_client, "fixture", "sleep", {"seconds": 2}, stream=True, timeout=30)
    conn = redis.Redis.from_url(stack.redis.url)
    try:
        wait_for(lambda: bool(conn.exists(stream_key(pending.id))), 20, "the stream to exist")
        assert conn.xlen(stream_key(pending.id)) == 0 and not pending.ready()  # running, nothing published yet
        assert conn.ttl(stream_key(pending.id)) > 0  # expires if its worker dies
        assert list(stream_client.stream(pending.id, idle_timeout=30)) == []  # then ends at its done entry
        assert pending.get(timeout=30)["chunks"] == 0
    finally:
        conn.close()
