"""The stream's byte cap counts UTF-8 bytes as Redis stores them, not characters (real redis-server)."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from workers.errors import ResultTooLarge
from workers.keys import stream_key
from workers.models import Chunk
from workers.streams.publisher import StreamPublisher

#: 3 bytes per character in UTF-8: a chunk of 48 characters and 128 bytes as stored.
DATA = {"s": "€" * 40}
STORED = json.dumps(DATA, separators=(",", ":"), ensure_ascii=False)


async def _publish_one(redis_url: str, request_id: str, max_bytes: int) -> None:
    conn = aioredis.Redis.from_url(redis_url)
    try:
        publisher = StreamPublisher(conn, request_id, maxlen=100, ttl=60, running_ttl=60, max_chunks=10,
                                    max_bytes=max_bytes)
        await publisher.open()
        await publisher.sink(Chunk(seq=0, data=DATA))
        await publisher.done({})
    finally:
        await conn.aclose()


def test_multibyte_chunk_counts_its_bytes(redis_url: str) -> None:
    assert (len(STORED), len(STORED.encode())) == (48, 128)
    with pytest.raises(ResultTooLarge) as caught:  # 48 characters would pass a cap of 127
        asyncio.run(_publish_one(redis_url, str(uuid.uuid4()), max_bytes=127))
    assert caught.value.to_dict()["what"] == "stream_bytes"


def test_a_cap_of_exactly_the_stored_bytes_passes(redis_url: str) -> None:
    request_id = str(uuid.uuid4())
    asyncio.run(_publish_one(redis_url, request_id, max_bytes=128))
    conn = redis.Redis.from_url(redis_url)
    try:
        entries: Any = conn.xrange(stream_key(request_id))
        (_, fields), _done = entries
        assert len(fields[b"data"]) == 128  # what the cap counted is what Redis holds
    finally:
        conn.close()
