"""The transports shipped with sark-workers (entries of :data:`config.transports.BUILTIN`).

Light on purpose: clients read the catalog. Each factory lives with its transport in ``workers.transports``.
"""

from __future__ import annotations

from config.registry import GatewayServer, StdioServer
from config.transports import TransportSpec

__all__ = ["TRANSPORT"]

TRANSPORT = (
    TransportSpec(
        name="http", server_model=GatewayServer, factory="workers.transports.http:build", family="gateway",
        stream_via="sse", description="the Gateway's REST API: one POST /tools/invoke per call",
    ),
    TransportSpec(
        name="sse", server_model=GatewayServer, factory="workers.transports.sse:build", family="gateway",
        list_via="http", description="the Gateway's SSE stream: chunks published as they arrive",
    ),
    TransportSpec(
        name="stdio", server_model=StdioServer, factory="workers.transports.stdio:build",
        check="config.check:check_stdio", description="local MCP servers started by the worker, warm sessions",
    ),
)
