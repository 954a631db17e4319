"""HTTP transport: invocations through the Gateway REST API (``POST /invoke``)."""

from __future__ import annotations

from typing import Any

from config.registry import GatewayServer, ServerBase
from workers.errors import InvalidInvocation
from workers.gateway.client import GatewayClient
from workers.models import GatewayToolInfo
from workers.transports.base import BuildContext, Call, ToolOutcome

__all__ = ["HttpTransport", "build", "outcome_from_gateway"]


def outcome_from_gateway(data: dict[str, Any], chunks: int = 0) -> ToolOutcome:
    """Wrap a Gateway tool result (MCP ``CallToolResult`` shape, maybe ``execution_time_ms``)."""
    elapsed = data.get("execution_time_ms")
    return ToolOutcome(
        result=data,
        is_error=bool(data.get("isError") or data.get("is_error")),
        execution_time_ms=float(elapsed) if isinstance(elapsed, int | float) else None,
        chunks=chunks,
    )


def gateway_server(call_server: ServerBase) -> GatewayServer:
    """The call's server, which must be a Gateway one."""
    if not isinstance(call_server, GatewayServer):
        raise InvalidInvocation(f"server {call_server.name!r} is not reached through the Gateway")
    return call_server


class HttpTransport:
    """Carries out invocations with one ``POST /invoke`` on the shared Gateway client."""

    name = "http"

    def __init__(self, gateway: GatewayClient, *, max_result_bytes: int) -> None:
        self._gateway = gateway
        self._max_result_bytes = max_result_bytes

    async def open(self) -> None:
        """Nothing to open: the Gateway client's pool connects lazily."""

    async def close(self) -> None:
        """The Gateway client is owned (and closed) by the runtime."""

    async def invoke(self, call: Call) -> ToolOutcome:
        """``POST /invoke`` with the user's bearer token and ``request_id`` = task id."""
        server = gateway_server(call.server)
        data = await self._gateway.invoke_tool(
            server.gateway_id,
            call.invocation.tool,
            dict(call.invocation.arguments),
            call.token,
            call.request_id,
            timeout=call.timeout,
            max_bytes=self._max_result_bytes,
        )
        return outcome_from_gateway(data)

    async def list_tools(self, server: ServerBase | None, *, token: str | None = None) -> list[GatewayToolInfo]:
        """``GET /tools`` for one server (by Gateway id) or for all."""
        if server is None:
            return await self._gateway.list_tools()
        return await self._gateway.list_tools(server_id=gateway_server(server).gateway_id)


def build(context: BuildContext) -> HttpTransport:
    """The ``http`` transport of one worker process (catalog factory)."""
    return HttpTransport(context.gateway, max_result_bytes=context.settings.max_result_bytes)
