"""Stream publisher and reader on a real redis-server (no worker): ids, dedup, limits, gaps, TTL."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio as aioredis
from httpx_sse import ServerSentEvent

from devkit.stack import DevStack
from workers.errors import AuthorizationDenied, Cancelled, ProtocolError, ResultTooLarge, ToolError
from workers.keys import stream_key
from workers.models import Chunk
from workers.streams import reader as stream_client
from workers.streams.publisher import StreamPublisher, entry_id, seq_of_entry_id
from workers.transports.sse import _error_event, _StreamState


@pytest.fixture()
def redis_url(stack: DevStack) -> str:
    assert stack.redis is not None
    return stack.redis.url


@pytest.fixture()
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(redis_url)
    yield conn
    conn.close()


async def _publish(redis_url: str, request_id: str, count: int, *, finish: bool = True,
                   **limits: int) -> StreamPublisher:
    conn = aioredis.Redis.from_url(redis_url)
    try:
        options = {"maxlen": 10_000, "ttl": 60, "running_ttl": 120, "max_chunks": 10_000, "max_bytes": 1 << 20}
        publisher = StreamPublisher(conn, request_id, **{**options, **limits})
        await publisher.open()
        for i in range(count):
            await publisher.sink(Chunk(seq=0, data={"i": i}))  # the publisher numbers chunks itself
        if finish:
            await publisher.done({"ok": True})
        else:
            await publisher.flush()
        return publisher
    finally:
        await conn.aclose()


def test_entry_ids_follow_positions() -> None:
    assert entry_id(0) == "0-1"
    assert seq_of_entry_id(entry_id(41)) == 41
    assert seq_of_entry_id("0-0") == -1
    with pytest.raises(ValueError):
        seq_of_entry_id("1700000000000-0")


def test_publish_and_read_back(redis_url: str, sync_redis: redis.Redis) -> None:
    rid = str(uuid.uuid4())
    asyncio.run(_publish(redis_url, rid, 3_000))
    entries = list(stream_client.follow(rid, redis_url=redis_url, idle_timeout=5))
    assert [e.chunk.seq for e in entries[:-1] if e.chunk] == list(range(3_000))
    assert entries[-1].kind == "done" and entries[-1].chunks == 3_000 and entries[-1].result == {"ok": True}
    assert 0 < sync_redis.ttl(stream_key(rid)) <= 60


def test_redelivered_invocation_publishes_nothing_twice(redis_url: str, sync_redis: redis.Redis) -> None:
    rid = str(uuid.uuid4())
    asyncio.run(_publish(redis_url, rid, 10, finish=False))  # first delivery dies after 10 chunks
    asyncio.run(_publish(redis_url, rid, 15))  # the redelivery replays from the start
    chunks = list(stream_client.stream(rid, redis_url=redis_url, idle_timeout=5))
    assert [c.data for c in chunks] == [{"i": i} for i in range(15)]
    assert sync_redis.xlen(stream_key(rid)) == 16
    asyncio.run(_publish(redis_url, rid, 15))  # a delivery after the end writes nothing
    assert sync_redis.xlen(stream_key(rid)) == 16


def test_limits_refuse_chunks_before_buffering(redis_url: str) -> None:
    with pytest.raises(ResultTooLarge, match="5 chunks"):
        asyncio.run(_publish(redis_url, str(uuid.uuid4()), 6, max_chunks=5))
    with pytest.raises(ResultTooLarge, match="bytes"):
        asyncio.run(_publish(redis_url, str(uuid.uuid4()), 100, max_bytes=200))
    with pytest.raises(ResultTooLarge, match="9 chunks"):  # never more chunks than MAXLEN keeps
        asyncio.run(_publish(redis_url, str(uuid.uuid4()), 20, maxlen=10))


def test_error_and_cancelled_terminals(redis_url: str) -> None:
    async def run(rid: str, error: Exception) -> None:
        conn = aioredis.Redis.from_url(redis_url)
        publisher = StreamPublisher(conn, rid, maxlen=10, ttl=60, running_ttl=60, max_chunks=10, max_bytes=1000)
        await publisher.sink(Chunk(seq=0, data=1))
        assert isinstance(error, ToolError | Cancelled)
        await publisher.fail(error)
        await conn.aclose()

    failed, cancelled = str(uuid.uuid4()), str(uuid.uuid4())
    asyncio.run(run(failed, ToolError("boom", status_code=503)))
    asyncio.run(run(cancelled, Cancelled("stop")))
    with pytest.raises(ToolError) as info:
        list(stream_client.stream(failed, redis_url=redis_url, idle_timeout=5))
    assert info.value.status_code == 503
    *_, last = stream_client.follow(cancelled, redis_url=redis_url, idle_timeout=5)
    assert last.kind == "cancelled" and last.chunks == 1
    with pytest.raises(Cancelled):
        list(stream_client.stream(cancelled, redis_url=redis_url, idle_timeout=5))


def test_reader_detects_lost_chunks(redis_url: str, sync_redis: redis.Redis) -> None:
    rid = str(uuid.uuid4())
    asyncio.run(_publish(redis_url, rid, 20))
    sync_redis.xtrim(stream_key(rid), maxlen=5, approximate=False)
    with pytest.raises(ProtocolError, match="no longer in Redis"):
        list(stream_client.stream(rid, redis_url=redis_url, idle_timeout=5))
    assert len(list(stream_client.stream(rid, redis_url=redis_url, from_seq=16, idle_timeout=5))) == 4


def test_reader_rejects_foreign_entries(redis_url: str, sync_redis: redis.Redis) -> None:
    rid = str(uuid.uuid4())
    sync_redis.xadd(stream_key(rid), {"kind": "surprise"}, id="0-1")
    with pytest.raises(ProtocolError, match="undecodable"):
        list(stream_client.stream(rid, redis_url=redis_url, idle_timeout=5))


def test_error_events_map_to_typed_errors() -> None:
    denied = _error_event(ServerSentEvent(event="error", data='{"reason": "no", "status_code": 403}'))
    assert isinstance(denied, AuthorizationDenied)
    failed = _error_event(ServerSentEvent(event="error", data='{"error": "bad gateway", "status_code": 502}'))
    assert isinstance(failed, ToolError) and failed.status_code == 502
    text = _error_event(ServerSentEvent(event="error", data="plain text"))
    assert isinstance(text, ToolError) and text.status_code == 500 and "plain text" in str(text)


def test_resume_dedup_state() -> None:
    state = _StreamState()
    state.remember("7")
    assert state.is_duplicate("7") and state.is_duplicate("3") and not state.is_duplicate("8")
    state = _StreamState()
    state.remember("abc")
    assert state.is_duplicate("abc") and not state.is_duplicate("abd")


def test_redis_failure_is_a_typed_error() -> None:
    from devkit.stack import free_port
    from workers.errors import SarkError

    async def run() -> None:
        conn = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
        publisher = StreamPublisher(conn, "x", maxlen=10, ttl=60, running_ttl=60, max_chunks=10, max_bytes=1000)
        try:
            with pytest.raises(SarkError, match="cannot publish to stream"):
                await publisher.open()
            await publisher.sink(Chunk(seq=0, data=1))
            with pytest.raises(SarkError, match="cannot publish to stream"):
                await publisher.done({})
        finally:
            await conn.aclose()

    asyncio.run(run())


def test_a_stream_quiet_for_longer_than_one_block_is_still_followed(redis_url: str) -> None:
    """A pause of more than one whole ``XREAD BLOCK`` (5 s) between chunks: the reader waits on."""
    rid = f"quiet-{uuid.uuid4()}"

    async def slow_publisher() -> None:
        conn = aioredis.Redis.from_url(redis_url)
        try:
            publisher = StreamPublisher(conn, rid, maxlen=100, ttl=60, running_ttl=120, max_chunks=100,
                                        max_bytes=1 << 20)
            await publisher.open()
            await publisher.sink(Chunk(seq=0, data={"i": 0}))
            await publisher.flush()
            await asyncio.sleep(5.6)
            await publisher.sink(Chunk(seq=0, data={"i": 1}))
            await publisher.done({"ok": True})
        finally:
            await conn.aclose()

    writer = threading.Thread(target=lambda: asyncio.run(slow_publisher()))
    writer.start()
    try:
        chunks = list(stream_client.stream(rid, redis_url=redis_url, idle_timeout=30))
    finally:
        writer.join(30)
    assert [c.data for c in chunks] == [{"i": 0}, {"i": 1}]


def test_a_pipeline_sent_again_after_a_lost_reply_is_not_a_failure(redis_url: str, sync_redis: redis.Redis) -> None:
    """The client re-sends a pipeline whose connection died after Redis had run it (a Redis restart)."""
    rid = str(uuid.uuid4())

    async def run() -> None:
        conn = aioredis.Redis.from_url(redis_url)
        try:
            publisher = StreamPublisher(conn, rid, maxlen=100, ttl=60, running_ttl=120, max_chunks=50,
                                        max_bytes=1 << 20)
            await publisher.open()
            # What the first sending wrote before its reply was lost:
            sync_redis.xadd(stream_key(rid), {"kind": "chunk", "seq": 0, "event_type": "message", "data": "{}",
                                              "ts": 0.0}, id=entry_id(0))
            await publisher.sink(Chunk(seq=0, data={}))
            await publisher.flush()
            await publisher.done({"ok": True})
        finally:
            await conn.aclose()

    asyncio.run(run())
    entries = list(stream_client.follow(rid, redis_url=redis_url, idle_timeout=5))
    assert [e.kind for e in entries] == ["chunk", "done"]
