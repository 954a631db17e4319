"""Follow an invocation's chunks from any process: :func:`stream` (sync) and :func:`astream` (async).

Readers need only Redis: they read the invocation's Redis Stream (format in :mod:`workers.streams.publisher`)
from the beginning or from a position, block for new entries, and stop at the terminal entry. A
reader that attaches late gets everything from its position; one that reconnects passes the last
``seq`` it saw + 1 as ``from_seq`` (or the entry id as ``after``) and gets each chunk once::

    for chunk in stream(task_id):                    # every chunk, then returns on "done"
        print(chunk.seq, chunk.data)
    for chunk in stream(task_id, from_seq=42):       # resume: chunks 42, 43…

An ``error`` or ``cancelled`` terminal entry raises the invocation's typed error
(:class:`~workers.errors.SarkError` subclass) after the chunks before it were yielded.

A stream that will never end (the task failed before its stream opened, was not streamed, or its id is
wrong) would keep a reader waiting: ``timeout`` bounds the whole read, and ``finished`` (a callable
telling whether the task is over, e.g. from its state in the result backend) ends it at once with
:class:`~workers.errors.ProtocolError` when the task is over but its stream has no terminal entry::

    pending = app.AsyncResult(task_id)
    for chunk in stream(task_id, timeout=60, finished=pending.ready):
        ...
:func:`follow` / :func:`afollow` yield every :class:`~workers.streams.publisher.StreamEntry`, terminal included,
and raise nothing for a failed invocation.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import redis
import redis.asyncio as aioredis

from workers.errors import InvalidInvocation, InvocationTimeout, ProtocolError, error_from_dict
from workers.keys import stream_key
from workers.models import Chunk
from workers.streams.publisher import StreamEntry, decode_entry, entry_id, seq_of_entry_id

__all__ = ["DEFAULT_CHECK_EVERY", "DEFAULT_IDLE_TIMEOUT", "afollow", "astream", "follow", "stream"]

#: Seconds a reader waits without any new entry before giving up (the invocation may be queued,
#: or its worker died before writing a terminal entry, or the stream expired).
DEFAULT_IDLE_TIMEOUT = 600.0
#: Seconds between two calls of ``finished`` while no entry arrives.
DEFAULT_CHECK_EVERY = 1.0

#: Tells whether the invocation is over (its result is in); may be async for :func:`afollow`.
Finished = Callable[[], bool]
AsyncFinished = Callable[[], bool | Awaitable[bool]]


def _redis_url(redis_url: str | None) -> str:
    if redis_url:
        return redis_url
    from config.settings import get_settings

    return get_settings().redis_url


def _read_timeout(block_ms: int) -> float:
    """Socket timeout of an own client: above the longest ``XREAD BLOCK``.

    redis-py 8 gives every client a 5 s socket timeout by default, exactly the default block: a stream
    that stayed quiet for one whole block then raised ``TimeoutError`` instead of waiting on.
    """
    return block_ms / 1000 + 10.0


def _start(after: str | None, from_seq: int | None) -> str:
    if after is not None and from_seq is not None:
        raise InvalidInvocation("pass either after or from_seq, not both")
    if from_seq is not None:
        if from_seq < 0:
            raise InvalidInvocation("from_seq must be >= 0")
        return entry_id(from_seq - 1) if from_seq > 0 else "0-0"
    return after or "0-0"


class _Cursor:
    """Position of one reader; checks that chunks arrive contiguously and bounds the wait."""

    def __init__(self, task_id: str, after: str, idle_timeout: float | None, timeout: float | None = None,
                 check_every: float | None = None) -> None:
        self.task_id = task_id
        self.last_id = after
        try:
            self.expected: int | None = seq_of_entry_id(after) + 1
        except ValueError:
            self.expected = None
        self._idle_timeout = idle_timeout
        self._timeout = timeout
        self._last_seen = time.monotonic()
        self._deadline = None if timeout is None else self._last_seen + timeout
        self._check_ms = None if check_every is None else max(1, int(check_every * 1000))
        self._reads = 0
        self.finished = False

    def accept(self, raw_id: Any, raw: Any) -> StreamEntry:
        try:
            entry = decode_entry(raw_id, raw)
        except (ValueError, KeyError) as exc:
            raise ProtocolError(f"stream {self.task_id}: undecodable entry {raw_id!r}: {exc}") from None
        self.last_id = entry.id
        self._last_seen = time.monotonic()
        if entry.chunk is not None:
            seq = entry.chunk.seq
            if self.expected is not None and seq != self.expected:
                raise ProtocolError(
                    f"stream {self.task_id}: chunks {self.expected}..{seq - 1} are no longer in Redis "
                    "(trimmed or expired)",
                    {"expected_seq": self.expected, "got_seq": seq},
                )
            self.expected = seq + 1
        elif entry.terminal:
            self.finished = True
        return entry

    def block(self, block_ms: int) -> int | None:
        """Milliseconds the next ``XREAD`` may block (None: not at all), within the deadline.

        A reader that watches its task reads once without blocking first, so that a task already over
        ends the read at once.

        Raises:
            InvocationTimeout: the deadline has passed.
        """
        self._reads += 1
        if self._check_ms is not None and self._reads == 1:
            return None
        ms = block_ms if self._check_ms is None else min(block_ms, self._check_ms)
        if self._deadline is None:
            return ms
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise InvocationTimeout(
                f"stream {self.task_id}: not finished within {self._timeout:g}s (last entry {self.last_id})",
                {"after": self.last_id, "timeout": self._timeout},
            )
        if left * 1000 < ms:
            ms = max(1, math.ceil(left * 1000))  # BLOCK 0 would mean forever
        return ms

    def check_idle(self) -> None:
        if self._idle_timeout is not None and time.monotonic() - self._last_seen > self._idle_timeout:
            raise InvocationTimeout(
                f"stream {self.task_id}: no new entry for {self._idle_timeout:g}s after {self.last_id}",
                {"after": self.last_id},
            )

    def no_terminal(self) -> ProtocolError:
        """The error for a task that is over while its stream has no terminal entry."""
        return ProtocolError(
            f"stream {self.task_id}: the invocation is over but its stream has no terminal entry after "
            f"{self.last_id} (it was not streamed, it failed before its stream opened, or the stream expired)",
            {"after": self.last_id, "finished": True},
        )


def _entries(reply: Any) -> list[tuple[Any, Any]]:
    """The entries of a one-key XREAD reply (``[[key, [(id, fields), …]]]``)."""
    return [tuple(e) for e in reply[0][1]]


def follow(
    task_id: str,
    *,
    after: str | None = None,
    from_seq: int | None = None,
    redis_url: str | None = None,
    client: redis.Redis | None = None,
    block_ms: int = 5_000,
    count: int = 1_000,
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    timeout: float | None = None,
    finished: Finished | None = None,
    check_every: float = DEFAULT_CHECK_EVERY,
) -> Iterator[StreamEntry]:
    """Every entry of ``task_id``'s stream after the start position, ending with the terminal one.

    Args:
        task_id: the invocation's task id.
        after: Redis entry id to start after (``"0-0"``: the beginning).
        from_seq: first chunk ``seq`` wanted (alternative to ``after``).
        redis_url: Redis holding the streams (default: ``SARK_REDIS_URL``).
        client: an existing Redis client to use (not closed here); its socket timeout must be
            longer than ``block_ms``.
        block_ms: longest single ``XREAD BLOCK``.
        count: most entries fetched per read.
        idle_timeout: seconds without any new entry before :class:`InvocationTimeout` (None: forever).
        timeout: seconds the whole read may take before :class:`InvocationTimeout` (None: no bound).
        finished: called at the start and every ``check_every`` seconds while no entry arrives; True
            means the task is over, so a stream still without a terminal entry will never get one.
            What it raises propagates.
        check_every: seconds between two calls of ``finished``.

    Raises:
        InvocationTimeout: nothing new for ``idle_timeout`` seconds, or not over within ``timeout``.
        ProtocolError: chunks the position asks for are gone (trimmed or expired), an entry is corrupt,
            or ``finished`` says the task is over and the stream has no terminal entry
            (``detail["finished"]`` is True).
    """
    cursor = _Cursor(task_id, _start(after, from_seq), idle_timeout, timeout,
                     None if finished is None else check_every)
    key = stream_key(task_id)
    own = client is None
    conn = client if client is not None else redis.Redis.from_url(
        _redis_url(redis_url), socket_timeout=_read_timeout(block_ms))
    try:
        while not cursor.finished:
            reply = conn.xread({key: cursor.last_id}, count=count, block=cursor.block(block_ms))
            if not reply:
                cursor.check_idle()
                if finished is None or not finished():
                    continue
                # The terminal entry may have landed between the read and the check: read once more.
                reply = conn.xread({key: cursor.last_id}, count=count)
                if not reply:
                    raise cursor.no_terminal()
            for raw_id, raw in _entries(reply):
                entry = cursor.accept(raw_id, raw)
                yield entry
                if entry.terminal:
                    return
    finally:
        if own:
            conn.close()


async def _is_finished(finished: AsyncFinished) -> bool:
    answer = finished()
    return bool(await answer) if inspect.isawaitable(answer) else bool(answer)


async def afollow(
    task_id: str,
    *,
    after: str | None = None,
    from_seq: int | None = None,
    redis_url: str | None = None,
    client: aioredis.Redis | None = None,
    block_ms: int = 5_000,
    count: int = 1_000,
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    timeout: float | None = None,
    finished: AsyncFinished | None = None,
    check_every: float = DEFAULT_CHECK_EVERY,
) -> AsyncIterator[StreamEntry]:
    """Async :func:`follow` (same arguments; ``client`` is a ``redis.asyncio`` client, ``finished``
    may be a coroutine function)."""
    cursor = _Cursor(task_id, _start(after, from_seq), idle_timeout, timeout,
                     None if finished is None else check_every)
    key = stream_key(task_id)
    own = client is None
    conn = client if client is not None else aioredis.Redis.from_url(
        _redis_url(redis_url), socket_timeout=_read_timeout(block_ms))
    try:
        while not cursor.finished:
            reply = await conn.xread({key: cursor.last_id}, count=count, block=cursor.block(block_ms))
            if not reply:
                cursor.check_idle()
                if finished is None or not await _is_finished(finished):
                    continue
                # The terminal entry may have landed between the read and the check: read once more.
                reply = await conn.xread({key: cursor.last_id}, count=count)
                if not reply:
                    raise cursor.no_terminal()
            for raw_id, raw in _entries(reply):
                entry = cursor.accept(raw_id, raw)
                yield entry
                if entry.terminal:
                    return
    finally:
        if own:
            await conn.aclose()


def _chunk_or_raise(entry: StreamEntry) -> Chunk | None:
    if entry.chunk is not None:
        return entry.chunk
    if entry.error is not None:
        raise error_from_dict(entry.error)
    return None


def stream(task_id: str, **options: Any) -> Iterator[Chunk]:
    """Chunks of ``task_id`` (options as :func:`follow`); returns at ``done``.

    Raises:
        SarkError: the invocation ended with an error or was cancelled (its typed error), or as
            :func:`follow` raises.
    """
    for entry in follow(task_id, **options):
        chunk = _chunk_or_raise(entry)
        if chunk is not None:
            yield chunk


async def astream(task_id: str, **options: Any) -> AsyncIterator[Chunk]:
    """Async :func:`stream` (options as :func:`afollow`)."""
    async for entry in afollow(task_id, **options):
        chunk = _chunk_or_raise(entry)
        if chunk is not None:
            yield chunk
