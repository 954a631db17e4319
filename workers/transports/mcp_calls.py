"""What every transport speaking MCP through the official SDK's ``mcp.Client`` shares, whatever carries the
session (a stdio pipe, Streamable HTTP): tool listings, progress notifications turned into chunks, and the
result turned into a :class:`~workers.transports.base.ToolOutcome`."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import mcp_types as types
from mcp import Client

from workers.errors import ProtocolError
from workers.models import Chunk, GatewayToolInfo
from workers.transports.base import ChunkSink, ToolOutcome
from workers.transports.session_pool import LIST_PAGES_MAX

__all__ = ["ProgressForwarder", "list_every_tool", "outcome_of", "tool_info"]

# Progress notifications waiting for a slow sink (Redis) per call; past these, the newest replaces the rest.
_PROGRESS_PENDING = 256
_PROGRESS_PENDING_BYTES = 1_048_576


def tool_info(server: str, tool: types.Tool) -> GatewayToolInfo:
    """An MCP tool as the Gateway describes one (its input schema's properties as parameters)."""
    schema = tool.input_schema or {}
    required = set(schema.get("required") or [])
    properties = schema.get("properties") or {}
    parameters = [
        {"name": key, "required": key in required, **(value if isinstance(value, dict) else {})}
        for key, value in properties.items()
    ]
    return GatewayToolInfo(tool_name=tool.name, server_name=server, description=tool.description or "",
                           parameters=parameters)


async def list_every_tool(client: Client, kind: str, server: str) -> list[GatewayToolInfo]:
    """Every tool of ``server`` (a ``kind`` server: the word errors use), following ``nextCursor`` pages.

    Raises:
        ProtocolError: more than ``LIST_PAGES_MAX`` pages.
        MCPError: the server answered ``tools/list`` with an error (the caller maps it).
    """
    tools: list[GatewayToolInfo] = []
    cursor: str | None = None
    for _ in range(LIST_PAGES_MAX):
        page = await client.list_tools(cursor=cursor)
        tools.extend(tool_info(server, tool) for tool in page.tools)
        cursor = page.next_cursor
        if not cursor:
            return tools
    raise ProtocolError(f"{kind} server {server!r}: tools/list returned more than {LIST_PAGES_MAX} pages",
                        {"server": server})


def outcome_of(result: types.CallToolResult, forwarder: ProgressForwarder | None) -> ToolOutcome:
    """A ``tools/call`` result as a transport returns it (with the chunks its progress became)."""
    data = result.model_dump(mode="json", by_alias=True, exclude_none=True)
    return ToolOutcome(result=data, is_error=bool(result.is_error), chunks=forwarder.count if forwarder else 0)


class ProgressForwarder:
    """Turns progress notifications into chunks, delivered to the sink in order by one task.

    Bounded: at most ``limit`` notifications (``limit_bytes`` of messages) wait for the sink. Past
    that, notifications are coalesced: only the newest waits, and is delivered once the queue drained;
    the ones it replaced are counted in :attr:`coalesced` and never become chunks. Progress reports a
    state, so the newest one says everything the skipped ones did; chunk ``seq`` stays contiguous.

    Why not backpressure: the SDK spawns one task per notification and does not wait for it, so waiting
    here would pile up tasks (and reorder them) instead of slowing the server; and one session serves
    every concurrent call of the worker: a slow stream must not stall the others.
    """

    def __init__(self, sink: ChunkSink, *, limit: int = _PROGRESS_PENDING,
                 limit_bytes: int = _PROGRESS_PENDING_BYTES) -> None:
        self._sink = sink
        self._limit, self._limit_bytes = limit, limit_bytes
        self._pending: deque[dict[str, Any]] = deque()
        self._bytes = 0
        self._newest: dict[str, Any] | None = None
        self._more = asyncio.Event()
        self._ending = False
        self._task = asyncio.ensure_future(self._run())
        #: Chunks delivered to the sink so far (their ``seq`` run from 0).
        self.count = 0
        #: Notifications replaced by a newer one while the queue was full.
        self.coalesced = 0

    async def on_progress(self, progress: float, total: float | None, message: str | None) -> None:
        """The SDK's progress callback; never waits (see the class docstring)."""
        data: dict[str, Any] = {"progress": progress, "total": total, "message": message}
        size = len(message or "")
        if self._newest is None and len(self._pending) < self._limit and self._bytes + size <= self._limit_bytes:
            self._pending.append(data)
            self._bytes += size
        else:  # full: keep only the newest; queued ones go first, so the order is kept
            self.coalesced += self._newest is not None
            self._newest = data
        self._more.set()

    async def _run(self) -> None:
        while True:
            if not self._pending and self._newest is not None:
                self._pending.append(self._newest)
                self._newest = None
            if self._pending:
                data = self._pending.popleft()
                self._bytes -= len(data["message"] or "")
                await self._sink(Chunk(seq=self.count, event_type="progress", data=data))
                self.count += 1
            elif self._ending:
                return
            else:
                self._more.clear()
                await self._more.wait()

    async def drain(self) -> None:
        """Wait until every chunk so far reached the sink (re-raising the sink's error)."""
        self._ending = True
        self._more.set()
        await self._task

    def close(self) -> None:
        """Stop delivering (what was not delivered is dropped)."""
        if not self._task.done():
            self._task.cancel()
