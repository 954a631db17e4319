"""Redis Stream of one invocation: the worker's publisher and the entry format readers decode.

One stream per invocation, ``keys.stream_key(request_id)``. Entry ids are derived from the chunk's
position, so a reader can resume from a sequence number and a redelivered task never writes a
chunk twice (Redis refuses ids that do not grow)::

    0-<seq+1>   {"kind": "chunk", "seq", "event_type", "data" (JSON), "ts", ["event_id"], ["retry"]}
    0-<n+1>     {"kind": "done", "chunks": n, "ts", "result" (JSON object from ``event: done``)}
                {"kind": "error" | "cancelled", "chunks": n, "ts", "error" (JSON of SarkError.to_dict())}

Exactly one terminal entry (done / error / cancelled) ends every stream. The stream is capped
(``MAXLEN ~ stream_maxlen``, and at most ``max_stream_chunks`` chunks / ``max_stream_bytes`` bytes
of data are published), expires ``stream_ttl`` seconds after its terminal entry, and expires
anyway ``stream_ttl`` seconds after its deadline if the worker died before writing one.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from workers.errors import Cancelled, ResultTooLarge, SarkError, StoreUnavailable
from workers.keys import stream_key
from workers.models import Chunk

__all__ = [
    "TERMINAL_KINDS",
    "StreamEntry",
    "StreamPublisher",
    "decode_entry",
    "entry_id",
    "seq_of_entry_id",
]

EntryKind = Literal["chunk", "done", "error", "cancelled"]
TERMINAL_KINDS: frozenset[str] = frozenset({"done", "error", "cancelled"})

#: Consumer group made when a stream opens (XGROUP CREATE … MKSTREAM): it only makes the stream exist.
_OPENED_GROUP = "sark-opened"

#: Chunks buffered while a write is in flight before the producer has to wait for Redis.
_MAX_BUFFER = 2_000


def entry_id(position: int) -> str:
    """Redis entry id of the entry at ``position`` (chunk ``seq``; the terminal entry is at ``chunks``)."""
    return f"0-{position + 1}"


def seq_of_entry_id(value: str) -> int:
    """Position of an entry id made by :func:`entry_id` (``"0-0"`` → -1: before the first entry).

    Raises:
        ValueError: not an id of this scheme.
    """
    major, _, minor = value.partition("-")
    if major != "0" or not minor.isdigit():
        raise ValueError(f"not a sark stream entry id: {value!r}")
    return int(minor) - 1


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """One decoded entry: a chunk, or the terminal entry (with its result or error)."""

    id: str
    kind: EntryKind
    chunk: Chunk | None = None
    chunks: int = 0
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None

    @property
    def terminal(self) -> bool:
        """True for done / error / cancelled."""
        return self.kind in TERMINAL_KINDS


def _chunk_fields(chunk: Chunk) -> dict[str, str | int | float]:
    fields: dict[str, str | int | float] = {
        "kind": "chunk",
        "seq": chunk.seq,
        "event_type": chunk.event_type,
        "data": _dumps(chunk.data),
        "ts": chunk.ts,
    }
    if chunk.event_id is not None:
        fields["event_id"] = chunk.event_id
    if chunk.retry is not None:
        fields["retry"] = chunk.retry
    return fields


def decode_entry(raw_id: Any, raw: Any) -> StreamEntry:
    """Decode one XREAD/XRANGE entry of this scheme.

    Raises:
        ValueError: the entry is not of this scheme.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"stream entry {raw_id!r} has no fields")
    fields = {_text(k): _text(v) for k, v in raw.items()}
    ident = _text(raw_id)
    kind = fields.get("kind")
    if kind == "chunk":
        retry = fields.get("retry")
        chunk = Chunk(
            seq=int(fields["seq"]),
            event_id=fields.get("event_id"),
            event_type=fields.get("event_type", "message"),
            data=json.loads(fields["data"]),
            retry=int(retry) if retry is not None else None,
            ts=float(fields["ts"]),
        )
        return StreamEntry(id=ident, kind="chunk", chunk=chunk)
    if kind == "done":
        return StreamEntry(id=ident, kind="done", chunks=int(fields["chunks"]), result=json.loads(fields["result"]))
    if kind == "error":
        return StreamEntry(id=ident, kind="error", chunks=int(fields["chunks"]), error=json.loads(fields["error"]))
    if kind == "cancelled":
        return StreamEntry(id=ident, kind="cancelled", chunks=int(fields["chunks"]), error=json.loads(fields["error"]))
    raise ValueError(f"stream entry {ident} has unknown kind {kind!r}")


def _raise_unless_written(replies: list[Any]) -> None:
    """Raise the first error among a pipeline's replies, except an XADD whose entry is already there.

    A pipeline sent again after a lost connection (the client's retry) may find that its first sending
    did reach Redis before the connection died: its XADDs are refused ("equal or smaller than the
    target stream top item"). Ids are derived from the chunk's position, so the entry there is this
    one (seen after a Redis restart under load: the re-sent pipeline failed a streamed invocation).
    """
    for reply in replies:
        if isinstance(reply, ResponseError) and "equal or smaller" in str(reply):
            continue
        if isinstance(reply, Exception):
            raise reply


class StreamPublisher:
    """Publishes one invocation's chunks and terminal entry (used by the worker as ``call.sink``).

    Chunks are written as soon as they arrive; chunks that arrive while a write is in flight are
    sent together in the next pipeline, so a fast producer gets batching and a slow one gets no
    added latency. Limits are enforced before anything is buffered.

    Args:
        redis: the runtime's async Redis client.
        request_id: the invocation's task id.
        maxlen: ``MAXLEN ~`` cap of the stream.
        ttl: seconds the stream is kept after its terminal entry.
        running_ttl: seconds the stream is kept while running (refreshed on every write).
        max_chunks: chunks allowed (also kept below ``maxlen`` so that none is ever trimmed).
        max_bytes: bytes of chunk data allowed (UTF-8, as stored).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        request_id: str,
        *,
        maxlen: int,
        ttl: int,
        running_ttl: int,
        max_chunks: int,
        max_bytes: int,
    ) -> None:
        self._redis = redis
        self.request_id = request_id
        self.key = stream_key(request_id)
        self._maxlen = maxlen
        self._ttl = ttl
        self._running_ttl = running_ttl
        self._max_chunks = max(0, min(max_chunks, maxlen - 1))
        self._max_bytes = max_bytes
        self.count = 0
        self._bytes = 0
        self._skip_below = 0
        self._sealed = False
        self._buffer: list[tuple[str, dict[str, str | int | float]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        #: True once :meth:`open` succeeded: from then on the invocation may have reached its target.
        self._opened = False

    async def open(self) -> None:
        """Find what an earlier delivery of this invocation already published (redeliveries).

        Raises:
            StoreUnavailable: Redis cannot be reached (``reached_target`` false: nothing was called yet).
        """
        try:
            # In the same round trip, the stream is created (empty, by a consumer group nobody reads with),
            # so a reader attaching before the first chunk sees an invocation that is running, not an
            # unknown id; it expires like any running stream if the worker dies.
            pipe = self._redis.pipeline(transaction=False)
            pipe.xrevrange(self.key, count=1)
            pipe.xgroup_create(self.key, _OPENED_GROUP, id="$", mkstream=True)
            pipe.expire(self.key, self._running_ttl)
            last, _, _ = await pipe.execute(raise_on_error=False)
        except RedisError as exc:
            raise self._redis_failure(exc) from None
        if isinstance(last, Exception):  # BUSYGROUP from XGROUP CREATE is expected on a redelivery
            raise self._redis_failure(last) if isinstance(last, RedisError) else last
        self._opened = True
        if not last:
            return
        raw_id, raw = last[0]
        entry = decode_entry(raw_id, raw)
        if entry.terminal:
            self._sealed = True  # an earlier delivery finished it: publish nothing twice
        elif entry.chunk is not None:
            self._skip_below = entry.chunk.seq + 1

    async def sink(self, chunk: Chunk) -> None:
        """Publish one chunk (renumbered to this invocation's next ``seq``).

        Raises:
            ResultTooLarge: the stream would exceed ``max_chunks`` or ``max_bytes``.
            StoreUnavailable: an earlier write to Redis failed.
        """
        if self._failure is not None:
            raise self._failure
        seq = self.count
        if seq >= self._max_chunks:
            raise ResultTooLarge(
                f"stream exceeds {self._max_chunks} chunks", {"limit": self._max_chunks, "what": "stream_chunks"}
            )
        fields = _chunk_fields(chunk if chunk.seq == seq else chunk.model_copy(update={"seq": seq}))
        self._bytes += len(str(fields["data"]).encode())  # UTF-8 bytes, as Redis stores them (not characters)
        if self._bytes > self._max_bytes:
            raise ResultTooLarge(
                f"stream data exceeds {self._max_bytes} bytes", {"limit": self._max_bytes, "what": "stream_bytes"}
            )
        self.count += 1
        if self._sealed or seq < self._skip_below:
            return
        self._buffer.append((entry_id(seq), fields))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
        elif len(self._buffer) >= _MAX_BUFFER:
            await asyncio.shield(self._writer)

    async def _drain(self) -> None:
        try:
            while self._buffer:
                batch, self._buffer = self._buffer, []
                pipe = self._redis.pipeline(transaction=False)
                for ident, fields in batch:
                    pipe.xadd(self.key, fields, id=ident, maxlen=self._maxlen, approximate=True)  # type: ignore[arg-type]
                pipe.expire(self.key, self._running_ttl)
                _raise_unless_written(await pipe.execute(raise_on_error=False))
        except RedisError as exc:
            self._failure = self._redis_failure(exc)
        except BaseException as exc:
            self._failure = exc
            raise

    def _redis_failure(self, exc: RedisError) -> StoreUnavailable:
        return StoreUnavailable(f"cannot publish to stream {self.key}: {type(exc).__name__}: {exc}",
                                {"what": "stream", "reached_target": self._opened})

    async def flush(self) -> None:
        """Wait until every chunk handed to :meth:`sink` is in Redis."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)
        if self._failure is not None:
            raise self._failure

    async def _terminal(self, fields: dict[str, str | int | float]) -> None:
        try:
            await self.flush()
        finally:
            if not self._sealed:
                self._sealed = True
                pipe = self._redis.pipeline(transaction=False)
                ident = entry_id(max(self.count, self._skip_below))
                pipe.xadd(self.key, fields, id=ident, maxlen=self._maxlen, approximate=True)  # type: ignore[arg-type]
                pipe.expire(self.key, self._ttl)
                try:
                    _raise_unless_written(await pipe.execute(raise_on_error=False))
                except RedisError as exc:
                    raise self._redis_failure(exc) from exc

    async def done(self, result: dict[str, Any]) -> None:
        """Write the ``done`` terminal entry carrying the final result."""
        await self._terminal({"kind": "done", "chunks": self.count, "ts": time.time(), "result": _dumps(result)})

    async def fail(self, error: SarkError) -> None:
        """Write the ``error`` (or, for :class:`~workers.errors.Cancelled`, ``cancelled``) terminal entry."""
        kind = "cancelled" if isinstance(error, Cancelled) else "error"
        await self._terminal({"kind": kind, "chunks": self.count, "ts": time.time(), "error": _dumps(error.to_dict())})
