"""The transport contract: every transport (http, sse, stdio, plug-ins) implements :class:`Transport`.

Tasks never know which transport they hold: they build a :class:`Call`, hand it to
``transport.invoke`` and get a :class:`ToolOutcome` or a :class:`~workers.errors.SarkError`.
A worker builds each transport it needs once, with the factory its catalog entry names
(:mod:`config.transports`), from a :class:`BuildContext`.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from config.registry import Registry, ServerBase
from config.settings import Settings
from workers.models import Chunk, GatewayToolInfo, Invocation

if TYPE_CHECKING:
    from workers.gateway.client import GatewayClient

__all__ = ["BuildContext", "Call", "ChunkSink", "ToolOutcome", "Transport"]

#: Receives each chunk a streaming call produces, in order. Awaited before the next is read,
#: so a slow sink slows the producer down instead of growing memory.
ChunkSink = Callable[[Chunk], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Call:
    """One invocation as a transport sees it."""

    server: ServerBase
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

    name: str

    async def open(self) -> None:
        """Acquire long-lived resources (pools, eager subprocesses)."""

    async def close(self) -> None:
        """Release everything :meth:`open` or later calls acquired."""

    async def invoke(self, call: Call) -> ToolOutcome:
        """Carry out one tool call; stream chunks to ``call.sink`` when it is set."""

    async def list_tools(self, server: ServerBase | None, *, token: str | None = None) -> list[GatewayToolInfo]:
        """Tools of ``server`` (or of every server the transport reaches, when None). ``token``: the caller's
        (clear) token when the listing task carried one; a transport that forwards tokens lists as that caller."""


@dataclass
class BuildContext:
    """What a transport factory may use: this worker's settings, registry and launch environment, and the
    Gateway client shared by every transport that needs it (created on first use, closed by the runtime)."""

    settings: Settings
    registry: Registry
    #: The environment stdio servers draw from (the worker's own secrets removed).
    environ: Mapping[str, str]

    def servers(self, transport: str) -> list[ServerBase]:
        """The registry entries of ``transport``, in file order."""
        return self.registry.of_transport(transport)

    @functools.cached_property
    def gateway(self) -> GatewayClient:
        """The Gateway client of this process (one connection pool for every Gateway transport)."""
        from workers.gateway.client import GatewayClient

        return GatewayClient(self.settings)
