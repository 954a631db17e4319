"""sark-workers: Celery workers carrying out MCP tool invocations over HTTP, SSE and stdio.

The public API is what ``__all__`` lists (guarded by a test); everything else is internal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "ENQUEUED_HEADER",
    "OPERATOR_HEADER",
    "TASK_BREAKERS",
    "TASK_GET_SERVER",
    "TASK_HEALTH",
    "TASK_INVOKE",
    "TASK_LIST_SERVERS",
    "TASK_LIST_TOOLS",
    "TOKEN_HEADER",
    "AlreadyRunning",
    "AsyncSarkClient",
    "AuthenticationFailed",
    "AuthorizationDenied",
    "Cancelled",
    "Chunk",
    "CircuitOpen",
    "DiscoveryTimeout",
    "GatewayServerInfo",
    "GatewayToolInfo",
    "GatewayUnavailable",
    "InternalError",
    "InvalidInvocation",
    "InvalidToken",
    "Invocation",
    "InvocationHandle",
    "InvocationResult",
    "InvocationTimeout",
    "NotServedHere",
    "PayloadTooLarge",
    "ProtocolError",
    "ResultTooLarge",
    "SarkClient",
    "SarkError",
    "ServerCrashed",
    "ServerUnavailable",
    "StoreUnavailable",
    "TokenExpired",
    "ToolError",
    "TransportError",
    "UnknownServer",
    "__version__",
    "astream",
    "stream",
]

from workers.contract import (
    ENQUEUED_HEADER,
    OPERATOR_HEADER,
    TASK_BREAKERS,
    TASK_GET_SERVER,
    TASK_HEALTH,
    TASK_INVOKE,
    TASK_LIST_SERVERS,
    TASK_LIST_TOOLS,
    TOKEN_HEADER,
)
from workers.errors import (
    AlreadyRunning,
    AuthenticationFailed,
    AuthorizationDenied,
    Cancelled,
    CircuitOpen,
    DiscoveryTimeout,
    GatewayUnavailable,
    InternalError,
    InvalidInvocation,
    InvalidToken,
    InvocationTimeout,
    NotServedHere,
    PayloadTooLarge,
    ProtocolError,
    ResultTooLarge,
    SarkError,
    ServerCrashed,
    ServerUnavailable,
    StoreUnavailable,
    TokenExpired,
    ToolError,
    TransportError,
    UnknownServer,
)

_LAZY = {
    "AsyncSarkClient": "workers.client",
    "InvocationHandle": "workers.client",
    "SarkClient": "workers.client",
    "stream": "workers.streams.reader",
    "astream": "workers.streams.reader",
    "Chunk": "workers.models",
    "GatewayServerInfo": "workers.models",
    "GatewayToolInfo": "workers.models",
    "Invocation": "workers.models",
    "InvocationResult": "workers.models",
}

if TYPE_CHECKING:
    from workers.client import AsyncSarkClient, InvocationHandle, SarkClient
    from workers.models import Chunk, GatewayServerInfo, GatewayToolInfo, Invocation, InvocationResult
    from workers.streams.reader import astream, stream

def __getattr__(name: str) -> Any:
    # Clients and models are imported on first use so `import workers.errors` stays light.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'workers' has no attribute {name!r}")
