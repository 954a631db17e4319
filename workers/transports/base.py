"""The transport contract: every transport (http, sse, stdio) implements :class:`Transport`.

Tasks never know which transport they hold: they build a :class:`Call`, hand it to
``transport.invoke`` and get a :class:`ToolOutcome` or a :class:`~workers.errors.SarkError`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from config.registry import GatewayServer, StdioServer
from workers.models import Chunk, GatewayToolInfo, Invocation, TransportName

__all__ = ["Call", "ChunkSink", "ToolOutcome", "Transport"]

#: Receives each chunk a streaming call produces, in order. Awaited before the next is read,
#: so a slow sink slows the producer down instead of growing memory.
ChunkSink = Callable[[Chunk], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Call:
    """One invocation as a transport sees it."""

    server: GatewayServer | StdioServer
    invocation: Invocation
    request_id: str
    timeout: float
    token: str | None = field(default=None, repr=False)
    sink: ChunkSink | None = None


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    """What a target answered (before the worker wraps it in an InvocationResult)."""

    result: dict[str, Any]
    is_error: bool = False
    execution_time_ms: float | None = None
    chunks: int = 0


@runtime_checkable
class Transport(Protocol):
    """How a worker reaches one kind of target."""

    name: TransportName

    async def open(self) -> None:
        """Acquire long-lived resources (pools, eager subprocesses)."""

    async def close(self) -> None:
        """Release everything :meth:`open` or later calls acquired."""

    async def invoke(self, call: Call) -> ToolOutcome:
        """Carry out one tool call; stream chunks to ``call.sink`` when it is set."""

    async def list_tools(self, server: GatewayServer | StdioServer | None) -> list[GatewayToolInfo]:
        """Tools of ``server`` (or of every server the transport reaches, when None)."""
