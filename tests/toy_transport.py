"""A toy transport that exists only in the tests: the proof that a transport is one module plus one entry.

Nothing outside this file names it. It is loaded as a plug-in (``SARK_TRANSPORT_PLUGINS=tests.toy_transport``)
and then routed, built, breaker-guarded, checked and listed like the built-in ones
(tests/integration/test_toy_transport.py).
"""

from __future__ import annotations

import os
from typing import Literal

from config.registry import ServerBase
from config.transports import TransportSpec
from workers.errors import TransportError
from workers.models import GatewayToolInfo
from workers.transports.base import BuildContext, Call, ToolOutcome

__all__ = ["TRANSPORT", "ToyServer", "ToyTransport", "build"]


class ToyServer(ServerBase):
    """A registry entry ``transport: toy``: a greeter."""

    transport: Literal["toy"]
    greeting: str = "hello"


class ToyTransport:
    """Greets (tool ``greet``), or fails like an unreachable target (tool ``fail``)."""

    name = "toy"

    def __init__(self, servers: list[ServerBase]) -> None:
        self.servers = {s.name: s for s in servers if isinstance(s, ToyServer)}

    async def open(self) -> None:
        """Nothing to open."""

    async def close(self) -> None:
        """Nothing to close."""

    async def invoke(self, call: Call) -> ToolOutcome:
        """``greet``: ``<greeting>, <name>`` with the worker's pid; ``fail``: a transport failure."""
        server = self.servers[call.server.name]
        if call.invocation.tool == "fail":
            raise TransportError(f"toy server {server.name!r} is unreachable")
        text = f"{server.greeting}, {call.invocation.arguments.get('name', 'world')} (pid {os.getpid()})"
        return ToolOutcome(result={"content": [{"type": "text", "text": text}], "isError": False})

    async def list_tools(self, server: ServerBase | None, *, token: str | None = None) -> list[GatewayToolInfo]:
        """``greet`` and ``fail`` of each toy server."""
        names = [server.name] if server is not None else list(self.servers)
        return [GatewayToolInfo(tool_name=tool, server_name=name) for name in names for tool in ("greet", "fail")]


def build(context: BuildContext) -> ToyTransport:
    """The factory the catalog entry names."""
    return ToyTransport(context.servers("toy"))


def check(server: ServerBase, settings: object) -> list[object]:
    """check-config: a toy server must greet with something."""
    from config.check import Problem

    if isinstance(server, ToyServer) and not server.greeting.strip():
        return [Problem("error", f"servers.{server.name}.greeting", "a toy server must greet with something")]
    return []


TRANSPORT = TransportSpec(name="toy", server_model=ToyServer, factory="tests.toy_transport:build",
                          check="tests.toy_transport:check", description="a greeter that lives in the tests")
