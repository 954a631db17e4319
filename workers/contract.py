"""Names other apps depend on: task names and the token header. Changing one is a breaking change."""

from __future__ import annotations

from typing import Final

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
]

#: ``kwargs={"invocation": {...}}`` → InvocationResult JSON.
TASK_INVOKE: Final = "sark.invoke"
#: ``kwargs={"user_id": str | None}`` → list of GatewayServerInfo JSON.
TASK_LIST_SERVERS: Final = "sark.list_servers"
#: ``kwargs={"server_id": str}`` → GatewayServerInfo JSON or None.
TASK_GET_SERVER: Final = "sark.get_server"
#: ``kwargs={"server": str | None}`` → list of GatewayToolInfo JSON.
TASK_LIST_TOOLS: Final = "sark.list_tools"
#: no arguments → {"gateway": bool, "hostname": str, "pid": int, "transports": [...]}.
TASK_HEALTH: Final = "sark.health"
#: ``kwargs={"action": "list" | "reset", "target": str | None}`` → breaker states.
TASK_BREAKERS: Final = "sark.breakers"

#: Message header carrying the user's bearer token (never a task argument).
TOKEN_HEADER: Final = "sark_token"

#: Message header signing an operator-only request (``sark.breakers`` reset): hex HMAC-SHA256 with
#: ``SARK_OPERATOR_KEY`` over ``"<task id>|<action>|<target>"`` (see :func:`workers.tokens.operator_signature`).
OPERATOR_HEADER: Final = "sark_operator"

#: Message header stamped on every ``sark.invoke`` an app built from :mod:`workers.app` publishes: epoch seconds
#: when the message became due (published, or its ETA if later). The worker observes start - this as
#: ``sark_queue_wait_seconds``; an app that does not set it gets no queue-wait figure, nothing else changes.
ENQUEUED_HEADER: Final = "sark_enqueued_at"
