"""stdio transport: warm MCP server processes owned by the worker, spoken to with the official ``mcp`` SDK.

Every registry ``transport: stdio`` server gets one :class:`ServerPool` per worker process: a
:class:`~workers.transports.session_pool.SessionPool` of :class:`StdioPipe` connections, which keeps
at most one live *generation* (one process + one ``mcp.Client`` session), shared by all concurrent
calls of that process, started on first use (or at worker start when ``eager``), recycled after the
entry's ``max_calls`` calls or ``idle_timeout`` without calls, and restarted after a backoff when
the server dies or breaks the protocol. A crash fails the calls in flight at once (the SDK wakes
pending requests when stdout ends) with the pipe's typed error.

Errors (the table is :data:`workers.errors.FAILURES`): a server that cannot start or exits → ``ServerCrashed``
(also: a ``${NAME}`` of its ``env`` not set, an unknown ``user``/``group``, a kill by a resource limit such as
SIGXCPU, no answer to the handshake within ``startup_timeout``); garbage on stdout → ``ProtocolError``; no
answer to a call within its timeout → ``InvocationTimeout`` (the SDK sends ``notifications/cancelled`` for an
abandoned call), to ``tools/list`` → ``DiscoveryTimeout``; an answer over ``max_output_bytes`` →
``ResultTooLarge``; a JSON-RPC error answer → ``ToolError``. A limit the tool
itself runs into (open files, address space) is the tool's own failure: an ``is_error`` result.

Progress notifications become stream chunks through a bounded queue per call: a flood is coalesced
(the newest state is kept), never buffered without limit (see :class:`~workers.transports.mcp_calls.ProgressForwarder`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import mcp_types as types
from mcp.shared.exceptions import MCPError
from pydantic import ValidationError

from config.registry import ServerBase, StdioServer
from workers import tracing
from workers.environment import launch_environment
from workers.errors import (
    DiscoveryTimeout,
    InvalidInvocation,
    InvocationTimeout,
    ProtocolError,
    ResultTooLarge,
    SarkError,
    ServerCrashed,
    ToolError,
)
from workers.models import GatewayToolInfo
from workers.transports.base import BuildContext, Call, ChunkSink, ToolOutcome
from workers.transports.mcp_calls import ProgressForwarder, list_every_tool, outcome_of
from workers.transports.session_pool import Generation, PoolSettings, SessionPool
from workers.transports.stdio_process import OUTPUT_TOO_LARGE, StdioPipe

__all__ = ["ServerPool", "StdioTransport", "build"]

log = logging.getLogger("sark.stdio")

_ENVELOPE = 65_536


def stdio_server(server: ServerBase) -> StdioServer:
    """The call's server, which must be a stdio one."""
    if not isinstance(server, StdioServer):
        raise InvalidInvocation(f"server {server.name!r} is not a stdio server")
    return server


class ServerPool:
    """The warm session of one stdio server in this worker process: a
    :class:`~workers.transports.session_pool.SessionPool` of :class:`StdioPipe` connections, with the
    entry's recycle settings, and this transport's calls and error wording.

    Args:
        server: The registry entry.
        max_output_bytes: Longest answer accepted when the entry sets no ``max_output_bytes``.
        environ: The environment ``inherit_env`` and ``${NAME}`` are read from (see :class:`StdioPipe`).
    """

    def __init__(self, server: StdioServer, *, max_output_bytes: int, environ: Mapping[str, str]) -> None:
        self.server = server
        max_line = (server.max_output_bytes or max_output_bytes) + _ENVELOPE
        settings = PoolSettings(startup_timeout=server.startup_timeout, max_calls=server.max_calls,
                                idle_timeout=server.idle_timeout, max_concurrency=server.max_concurrency)
        self._sessions: SessionPool[StdioPipe] = SessionPool(
            lambda: StdioPipe(server, max_line_bytes=max_line, environ=environ), name=server.name,
            settings=settings, startup_error=self._startup_error, kind="stdio")

    @property
    def pid(self) -> int | None:
        """Pid of the live server process, if any."""
        return self._sessions.pid

    def start(self) -> None:
        """Start the server now (in the background) if no generation runs."""
        self._sessions.start()

    def _startup_error(self, pipe: StdioPipe, exc: BaseException) -> SarkError:
        name = self.server.name
        if pipe.failure is not None:
            return pipe.failure
        if isinstance(exc, TimeoutError):  # a server that cannot start in time: the same for a call or a listing
            return ServerCrashed(
                f"stdio server {name!r} did not complete the MCP handshake within {self.server.startup_timeout:g}s",
                {"server": name, "phase": "initialize"})
        if isinstance(exc, SarkError):
            return exc
        if isinstance(exc, asyncio.CancelledError):
            return ServerCrashed(f"stdio server {name!r}: start interrupted", {"server": name})
        return ProtocolError(f"stdio server {name!r} failed the MCP handshake: {type(exc).__name__}: {exc}",
                             {"server": name, "phase": "initialize"})

    def _error(self, gen: Generation[StdioPipe], exc: MCPError, late: type[SarkError] = InvocationTimeout) -> SarkError:
        name, pipe = self.server.name, gen.connection
        if exc.code == types.CONNECTION_CLOSED:
            return pipe.failure or ServerCrashed(f"stdio server {name!r} closed the connection", {"server": name})
        if exc.code == OUTPUT_TOO_LARGE:
            data = exc.error.data if isinstance(exc.error.data, dict) else {}
            return ResultTooLarge(f"stdio server {name!r}: {exc.error.message}",
                                  {"server": name, "what": "result", **data})
        if exc.code == types.REQUEST_TIMEOUT:
            return late(f"stdio server {name!r}: {exc.error.message}", {"server": name})
        status = 400 if exc.code in (types.INVALID_PARAMS, types.METHOD_NOT_FOUND, types.INVALID_REQUEST) else 502
        return ToolError(f"stdio server {name!r} answered error {exc.code}: {exc.error.message}",
                         {"server": name, "code": exc.code}, status_code=status)

    async def call_tool(self, tool: str, arguments: dict[str, Any], *, timeout: float,
                        sink: ChunkSink | None) -> ToolOutcome:
        """Call ``tool`` on the warm session (starting it if needed) within ``timeout`` seconds in all.

        Raises:
            SarkError: see the module docstring.
        """
        if tracing.active:
            with tracing.mcp_span("stdio", self.server.name, tool):
                return await self._call_tool(tool, arguments, timeout=timeout, sink=sink)
        return await self._call_tool(tool, arguments, timeout=timeout, sink=sink)

    async def _call_tool(self, tool: str, arguments: dict[str, Any], *, timeout: float,
                         sink: ChunkSink | None) -> ToolOutcome:
        forwarder = ProgressForwarder(sink) if sink is not None else None
        gen: Generation[StdioPipe] | None = None
        try:
            async with asyncio.timeout(timeout), self._sessions.slots:
                gen, client = await self._sessions.session()
                async with gen.use():
                    result = await client.call_tool(
                        tool, arguments, progress_callback=forwarder.on_progress if forwarder else None)
                if forwarder is not None:
                    await forwarder.drain()
                    if forwarder.coalesced:
                        log.info("stdio server %s: %d progress notification(s) of %r coalesced (slow stream)",
                                 self.server.name, forwarder.coalesced, tool, extra={"stdio_server": self.server.name})
        except TimeoutError:
            raise InvocationTimeout(f"stdio server {self.server.name!r}: no answer to {tool!r} within {timeout:g}s",
                                    {"server": self.server.name, "tool": tool}) from None
        except MCPError as exc:
            assert gen is not None
            raise self._error(gen, exc) from None
        except ValidationError as exc:
            raise ProtocolError(f"stdio server {self.server.name!r} sent an invalid result: "
                                f"{exc.error_count()} validation error(s)", {"server": self.server.name}) from None
        finally:
            if forwarder is not None:
                forwarder.close()
        self._sessions.succeeded()
        return outcome_of(result, forwarder)

    async def list_tools(self, *, timeout: float) -> list[GatewayToolInfo]:
        """Every tool of the server, following ``nextCursor`` pages."""
        name = self.server.name
        gen: Generation[StdioPipe] | None = None
        try:
            async with asyncio.timeout(timeout):
                gen, client = await self._sessions.session()
                return await list_every_tool(client, "stdio", name)
        except TimeoutError:
            raise DiscoveryTimeout(f"stdio server {name!r}: tools/list not answered within {timeout:g}s",
                                   {"server": name}) from None
        except MCPError as exc:
            assert gen is not None
            raise self._error(gen, exc, DiscoveryTimeout) from None

    async def close(self) -> None:
        """Stop every generation (calls still in flight fail) and wait until its process is gone."""
        await self._sessions.close()


class StdioTransport:
    """The ``stdio`` transport: one :class:`ServerPool` per registry stdio server.

    Args:
        servers: The registry's stdio servers.
        max_result_bytes: Default cap on one answer (``max_output_bytes`` overrides per server).
        list_timeout: Seconds allowed for ``tools/list`` (all pages, including a cold start).
        environ: The environment servers' ``inherit_env`` and ``${NAME}`` are read from: the worker's as it
            was at start, without its secrets (default: :func:`workers.environment.launch_environment` now).
    """

    name = "stdio"

    def __init__(self, servers: list[StdioServer], *, max_result_bytes: int, list_timeout: float = 30.0,
                 environ: Mapping[str, str] | None = None) -> None:
        self._servers = {s.name: s for s in servers}
        self._environ = dict(launch_environment() if environ is None else environ)
        self._max_result_bytes = max_result_bytes
        self._list_timeout = list_timeout
        self._pools: dict[str, ServerPool] = {}

    def pool(self, server: StdioServer) -> ServerPool:
        """The pool of ``server`` (created on first use)."""
        pool = self._pools.get(server.name)
        if pool is None or pool.server != server:
            pool = self._pools[server.name] = ServerPool(server, max_output_bytes=self._max_result_bytes,
                                                         environ=self._environ)
        return pool

    async def open(self) -> None:
        """Start ``eager`` servers in the background (a failure shows on their first call)."""
        for server in self._servers.values():
            if server.eager:
                self.pool(server).start()

    async def close(self) -> None:
        """Stop every server process: close stdin → SIGTERM → SIGKILL, then reap."""
        pools, self._pools = list(self._pools.values()), {}
        await asyncio.gather(*(pool.close() for pool in pools), return_exceptions=True)

    async def invoke(self, call: Call) -> ToolOutcome:
        """``tools/call`` on the server's warm session; progress notifications go to ``call.sink``."""
        server = stdio_server(call.server)
        pool = self.pool(server)
        return await pool.call_tool(call.invocation.tool, dict(call.invocation.arguments), timeout=call.timeout,
                                    sink=call.sink)

    async def list_tools(self, server: ServerBase | None, *, token: str | None = None) -> list[GatewayToolInfo]:
        """``tools/list`` (every page) of one stdio server, or of all of them."""
        targets = [stdio_server(server)] if server is not None else list(self._servers.values())
        tools: list[GatewayToolInfo] = []
        for target in targets:
            tools.extend(await self.pool(target).list_tools(timeout=self._list_timeout))
        return tools



def build(context: BuildContext) -> StdioTransport:
    """The ``stdio`` transport of one worker process (catalog factory): the registry's stdio servers."""
    return StdioTransport([s for s in context.servers("stdio") if isinstance(s, StdioServer)],
                          max_result_bytes=context.settings.max_result_bytes,
                          list_timeout=context.settings.invoke_timeout, environ=context.environ)
