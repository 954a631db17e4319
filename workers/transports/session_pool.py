"""Warm ``mcp`` client sessions of one MCP server, over any ``mcp`` client transport.

A :class:`SessionPool` keeps at most one live *generation* (one connection + one ``mcp.Client``
session), shared by all concurrent calls of the worker process, started on first use (or by
:meth:`SessionPool.start`). It knows nothing of how a connection is made: a factory gives it a
:class:`Connection` (a stdio child: :class:`~workers.transports.stdio_process.StdioPipe`; any other
``mcp`` transport, such as ``streamablehttp_client``: :class:`Link`).

Each generation has an owner task on the runtime loop that enters and leaves the ``mcp.Client``
(anyio contexts must be entered and exited by the same task); calls run from other tasks. The
owner stops its generation when the pool closes, when the connection dies, after ``max_calls``
calls (once the last one finished) or after ``idle_timeout`` without calls. The next call starts a
new generation, after a backoff that doubles with each consecutive failure (0.25 s … 30 s) and
resets on a successful call (:meth:`SessionPool.succeeded`).

What a call does with the session, and how its errors are worded, is the transport's
(:class:`workers.transports.stdio.ServerPool`); so is the error for a session that cannot start
(``startup_error``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import mcp_types as types
from mcp import Client
from mcp.client import Transport
from mcp.client.caching import CacheConfig
from mcp.shared.exceptions import MCPError

from workers.errors import SarkError, ServerCrashed
from workers.metrics import METRICS

if TYPE_CHECKING:
    from mcp.client._transport import TransportStreams  # the SDK exports no public name for the pair

__all__ = ["LIST_PAGES_MAX", "Connection", "Generation", "Link", "PoolSettings", "SessionPool"]

#: Most ``tools/list`` pages followed (here and by the transports' own listings).
LIST_PAGES_MAX = 100
#: Seconds allowed to leave a session whose start failed half-way.
_LEAVE_TIMEOUT = 5.0
_BACKOFF_BASE = 0.25
_BACKOFF_MAX = 30.0
_CLIENT_INFO = types.Implementation(name="sark-workers", version="0.1.0")


class Connection(Transport, Protocol):
    """One connection to an MCP server: an ``mcp`` client transport (an async context manager yielding
    the (read, write) streams ``mcp.Client`` takes) that also reports on itself."""

    @property
    def pid(self) -> int | None:
        """The server's process id, when the connection owns one (else None)."""

    @property
    def dead(self) -> asyncio.Event:
        """Set once the connection ended (the server exited, broke the protocol, or it was left)."""

    @property
    def failure(self) -> SarkError | None:
        """Why the server ended the connection, when it did (None: still up, or we closed it)."""


class Link:
    """Any ``mcp`` client transport as a :class:`Connection`: no process, no failure of its own.

    ``dead`` is set once the transport was left; a connection lost while in use shows on its calls
    (the SDK answers them ``CONNECTION_CLOSED``), which retires its generation (:meth:`Generation.use`).
    """

    pid: int | None = None
    failure: SarkError | None = None

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self.dead = asyncio.Event()

    async def __aenter__(self) -> TransportStreams:
        return await self._transport.__aenter__()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        try:
            await self._transport.__aexit__(exc_type, exc, traceback)
        finally:
            self.dead.set()


@dataclass(frozen=True)
class PoolSettings:
    """How a pool starts and recycles its sessions (for stdio: read from the registry entry).

    Args:
        startup_timeout: Seconds for the connection, the MCP handshake and the first ``tools/list``.
        max_calls: Calls after which a session is recycled (None: never).
        idle_timeout: Seconds without calls after which a session is stopped (None: never).
        max_concurrency: Calls at once on the session (:attr:`SessionPool.slots`).
        mode: What the session speaks: ``auto`` negotiates, ``legacy`` the ``initialize`` handshake, a revision
            (``2026-07-28``) that one.
        response_cache: Keep list answers (``tools/list``…) for as long as the server's ``ttlMs`` hint says
            (SEP-2549, 2026-07-28; the SDK's per-session cache, dropped with the session); off: always ask.
    """

    startup_timeout: float
    max_calls: int | None = None
    idle_timeout: float | None = None
    max_concurrency: int = 1
    response_cache: bool = False
    #: The SDK client's ``mode``: ``auto`` (negotiate), ``legacy`` (the 2025-11-25 handshake) or a revision.
    mode: str = "auto"


C = TypeVar("C", bound=Connection)


@dataclass(eq=False)
class Generation(Generic[C]):
    """One connection and its session."""

    number: int
    connection: C
    ready: asyncio.Future[Client]
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    owner: asyncio.Task[None] | None = None
    calls: int = 0
    inflight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    retiring: bool = False
    ended: bool = False
    stop_reason: str = ""

    def retire(self, reason: str) -> None:
        """Take no new calls; stop once the calls in flight are done."""
        if not self.retiring:
            self.retiring, self.stop_reason = True, reason
        self.wake.set()

    @asynccontextmanager
    async def use(self) -> AsyncIterator[None]:
        """One call on this session: counts towards ``max_calls``, holds off its stop until it ends."""
        self.calls += 1
        self.inflight += 1
        try:
            yield
        except MCPError as exc:
            if exc.code == types.CONNECTION_CLOSED:  # nothing more will pass on this session
                self.retire("connection closed")
            raise
        finally:
            self.inflight -= 1
            self.last_used = time.monotonic()
            if self.retiring:  # the owner waits for the last call of a retiring generation;
                self.wake.set()  # otherwise it wakes by itself when the idle time may be up


class SessionPool(Generic[C]):
    """The warm session of one MCP server in this worker process.

    Args:
        connect: Makes a new (not yet entered) connection; called once per generation.
        name: The server's name, in logs and errors.
        settings: Start and recycle settings.
        startup_error: The error for a session that could not start, from its connection and what
            was raised (a :class:`TimeoutError` past ``startup_timeout``, a cancellation, the SDK's error).
        kind: The transport's name, in logs (logger ``sark.<kind>``, ``extra`` key ``<kind>_server``)
            and errors.
    """

    def __init__(self, connect: Callable[[], C], *, name: str, settings: PoolSettings,
                 startup_error: Callable[[C, BaseException], SarkError], kind: str) -> None:
        self.name = name
        self.settings = settings
        self._connect = connect
        self._startup_error = startup_error
        self._kind = kind
        self._log = logging.getLogger(f"sark.{kind}")
        self._extra = {f"{kind}_server": name}
        self._gen: Generation[C] | None = None
        self._numbers = itertools.count(1)
        self._failures = 0
        self._retry_at = 0.0
        #: Calls at once on the session (``max_concurrency``): hold one around each call.
        self.slots = asyncio.Semaphore(settings.max_concurrency)
        self._live: set[Generation[C]] = set()
        self._closed = False

    @property
    def pid(self) -> int | None:
        """Pid of the live connection's server process, if any."""
        gen = self._gen
        return gen.connection.pid if gen and not gen.ended else None

    # -- generations --------------------------------------------------------------------------
    def _current(self) -> Generation[C]:
        """The generation new calls use, starting one when needed (no await: atomic on the loop)."""
        if self._closed:
            raise ServerCrashed(f"{self._kind} server {self.name!r}: the worker is shutting down")
        gen = self._gen
        max_calls = self.settings.max_calls
        spent = bool(max_calls and gen is not None and gen.calls >= max_calls)
        if gen is not None and not (gen.retiring or gen.ended or gen.connection.dead.is_set() or spent):
            return gen
        if gen is not None:
            gen.retire("max_calls reached" if spent else "replaced")
        delay = max(0.0, self._retry_at - time.monotonic())
        loop = asyncio.get_running_loop()
        gen = Generation(next(self._numbers), self._connect(), loop.create_future())
        gen.ready.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "never retrieved"
        gen.owner = loop.create_task(self._own(gen, delay), name=f"{self._kind}-owner-{self.name}-{gen.number}")
        self._live.add(gen)
        self._gen = gen
        return gen

    @property
    def idle(self) -> bool:
        """No generation runs or starts (the last one stopped: idle, closed, or dead)."""
        return not self._live

    def start(self) -> None:
        """Start the session now (in the background) if no generation runs."""
        self._current()

    async def _own(self, gen: Generation[C], delay: float) -> None:
        """Owner task: enter the session, keep it until told to stop, leave it (same task)."""
        name, log, extra = self.name, self._log, self._extra
        try:
            if delay:
                log.info("%s server %s: restarting in %.2fs", self._kind, name, delay, extra=extra)
                # Retiring the generation (the pool closes) ends the backoff at once: a worker's shutdown
                # must not wait out up to 30 s of it.
                woke = asyncio.ensure_future(gen.wake.wait())
                try:
                    await asyncio.wait({woke}, timeout=delay)
                finally:
                    woke.cancel()
                if gen.retiring:
                    return  # the outer finally fails the callers waiting for it (stopped before it was ready)
            started = time.perf_counter()
            METRICS.session_started(self._kind, name)
            cache = CacheConfig() if self.settings.response_cache else None  # honours the server's hints only
            client = Client(gen.connection, mode=self.settings.mode, cache=cache, client_info=_CLIENT_INFO)
            entered = False
            try:
                async with asyncio.timeout(self.settings.startup_timeout):
                    await client.__aenter__()
                    entered = True
                    await _absorb_tools(client)
            except BaseException as exc:
                error = self._startup_error(gen.connection, exc)
                self._failed()
                if not gen.ready.done():
                    gen.ready.set_exception(error)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                if entered:  # the session started, the tool listing failed: leave it (same task), bounded
                    await self._leave(client, exc)
                return
            pid = gen.connection.pid
            log.info("%s server %s ready in %.0f ms (pid %s, protocol %s)", self._kind, name,
                     1000 * (time.perf_counter() - started), pid, client.protocol_version,
                     extra={**extra, "server_pid": pid})
            # Idle time counts from readiness: a start slower than idle_timeout (seen: 1.5 s on a slow
            # machine) would otherwise retire the generation before the calls waiting for it could run.
            gen.last_used = time.monotonic()
            gen.ready.set_result(client)
            try:
                await self._hold(gen)
            finally:
                gen.ended = True
                await client.__aexit__(None, None, None)
        finally:
            gen.ended = True
            if not gen.ready.done():
                gen.ready.set_exception(ServerCrashed(f"{self._kind} server {name!r} stopped before it was ready"))
            self._live.discard(gen)
            if self._gen is gen:
                self._gen = None

    async def _leave(self, client: Client, exc: BaseException) -> None:
        """Exit a session whose start failed after it was entered (its connection and the server's session
        would otherwise stay open until garbage collection, in another task)."""
        try:
            async with asyncio.timeout(_LEAVE_TIMEOUT):
                await client.__aexit__(type(exc), exc, exc.__traceback__)
        except Exception as left:
            self._log.debug("%s server %s: leaving a failed session: %r", self._kind, self.name, left,
                            extra=self._extra)

    async def _hold(self, gen: Generation[C]) -> None:
        """Wait until the generation must stop: closed, dead, drained after retirement, or idle."""
        idle = self.settings.idle_timeout
        connection = gen.connection
        dead = asyncio.ensure_future(connection.dead.wait())
        try:
            while True:
                if self._closed:
                    return
                if connection.dead.is_set():
                    if not self._closed and connection.failure is not None:
                        self._failed()
                    return
                if gen.retiring and gen.inflight == 0:
                    self._log.info("%s server %s: recycling (%s)", self._kind, self.name, gen.stop_reason,
                                   extra=self._extra)
                    return
                if idle and gen.inflight == 0 and time.monotonic() - gen.last_used >= idle:
                    gen.retire("idle")
                    continue
                gen.wake.clear()
                timeout = None if not idle else max(0.01, gen.last_used + idle - time.monotonic())
                woke = asyncio.ensure_future(gen.wake.wait())
                await asyncio.wait({dead, woke}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                woke.cancel()
        finally:
            dead.cancel()

    def _failed(self) -> None:
        METRICS.session_failed(self._kind, self.name)
        self._failures += 1
        self._retry_at = time.monotonic() + min(_BACKOFF_BASE * 2 ** (self._failures - 1), _BACKOFF_MAX)

    def succeeded(self) -> None:
        """A call went through: the next restart needs no backoff."""
        self._failures = 0

    # -- calls --------------------------------------------------------------------------------
    async def session(self) -> tuple[Generation[C], Client]:
        """The ready session (starting one if needed) and its generation; a call wraps itself in
        :meth:`Generation.use` (a listing need not).

        Raises:
            SarkError: the session could not start (``startup_error``), or the pool is closed.
        """
        gen = self._current()
        client = await asyncio.shield(gen.ready)
        if gen.connection.dead.is_set():  # died between becoming ready and now
            gen = self._current()
            client = await asyncio.shield(gen.ready)
        return gen, client

    async def close(self) -> None:
        """Stop every generation (calls still in flight fail) and wait until its connection is left."""
        self._closed = True
        live = list(self._live)
        for gen in live:
            gen.retire("worker shutdown")
        await asyncio.gather(*(gen.owner for gen in live if gen.owner is not None), return_exceptions=True)


async def _absorb_tools(client: Client) -> None:
    """List the tools once, so the SDK can check structured results against their output schemas."""
    cursor: str | None = None
    for _ in range(LIST_PAGES_MAX):
        try:
            page = await client.list_tools(cursor=cursor)
        except MCPError:
            return  # a server without tools/list can still be called
        cursor = page.next_cursor
        if not cursor:
            return
