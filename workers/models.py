"""Public schemas: invocations, results, stream chunks and the Gateway's own records.

Every invocation is validated by :func:`parse_invocation` before any network call; every result
is validated before it is stored. Validation errors never echo input values (they may hold secrets).
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StringConstraints, ValidationError

from workers.errors import InvalidInvocation, PayloadTooLarge

__all__ = [
    "Chunk",
    "GatewayServerInfo",
    "GatewayToolInfo",
    "Invocation",
    "InvocationResult",
    "TransportName",
    "describe_validation_error",
    "json_size",
    "parse_invocation",
]

#: A transport's name (``http``, ``sse``, ``stdio`` or a plug-in's: see :mod:`config.transports`); the worker
#: refuses one its catalog does not have.
TransportName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{0,31}$")]
SensitivityLevel = Literal["low", "medium", "high", "critical"]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
_TOOL = r"^[A-Za-z0-9_][A-Za-z0-9_.\-/]{0,255}$"


class Invocation(BaseModel):
    """One tool invocation as enqueued by an app (kwargs ``invocation`` of ``sark.invoke``).

    The user's token is NOT part of it: it travels in the ``sark_token`` message header so that
    it never shows in task arguments, Flower or the result backend.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    server: str = Field(pattern=_NAME, description="a name from the operator's registry")
    tool: str = Field(pattern=_TOOL)
    arguments: dict[str, JsonValue] = Field(default_factory=dict)
    transport: TransportName | None = Field(default=None, description="defaults to the registry's")
    stream: bool = Field(default=False, description="publish chunks to the invocation's Redis stream")
    timeout: float | None = Field(default=None, gt=0, description="seconds; defaults to settings")


class InvocationResult(BaseModel):
    """What ``sark.invoke`` returns (and stores in the result backend)."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(description="the Celery task id, sent to the Gateway as request_id")
    server: str
    tool: str
    transport: TransportName
    result: dict[str, JsonValue] = Field(description="the tool's result as the target returned it")
    is_error: bool = Field(default=False, description="the tool reported an error (MCP isError)")
    execution_time_ms: float | None = Field(default=None, description="reported by the target")
    duration_ms: float = Field(ge=0, description="measured by the worker around the call")
    chunks: int = Field(default=0, ge=0, description="chunks published to the stream")
    attempt: int = Field(default=1, ge=1, description="delivery count seen by the worker")


class Chunk(BaseModel):
    """One streamed piece of an invocation's output, as published to Redis."""

    model_config = ConfigDict(extra="forbid")

    seq: int = Field(ge=0, description="0, 1, 2… within the invocation")
    event_id: str | None = None
    event_type: str = "message"
    data: JsonValue = None
    retry: int | None = None
    ts: float = Field(default_factory=time.time, description="unix time the worker received it")


class GatewayServerInfo(BaseModel):
    """A server as the Gateway describes it (``GET /servers``)."""

    model_config = ConfigDict(extra="ignore")

    server_id: str
    server_name: str
    server_url: str
    sensitivity_level: SensitivityLevel = "medium"
    authorized_teams: list[str] = Field(default_factory=list)
    access_restrictions: dict[str, Any] | None = None
    health_status: str = "unknown"
    tools_count: int = Field(default=0, ge=0)
    created_at: datetime | None = None
    updated_at: datetime | None = None


class GatewayToolInfo(BaseModel):
    """A tool as the Gateway describes it (``GET /tools``)."""

    model_config = ConfigDict(extra="ignore")

    tool_name: str
    server_name: str
    description: str = ""
    sensitivity_level: SensitivityLevel = "medium"
    parameters: list[dict[str, Any]] = Field(default_factory=list)
    sensitive_params: list[str] = Field(default_factory=list)
    required_capabilities: list[str] = Field(default_factory=list)


def describe_validation_error(exc: ValidationError) -> str:
    """``field: message`` pairs, without the offending values."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
        for err in exc.errors(include_input=False, include_url=False)
    )


def json_size(value: object) -> int:
    """Bytes of ``value`` as compact JSON."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def parse_invocation(raw: object, *, max_argument_bytes: int) -> Invocation:
    """Validate an enqueued invocation.

    Raises:
        InvalidInvocation: wrong shape or types.
        PayloadTooLarge: arguments over ``max_argument_bytes``.
    """
    if not isinstance(raw, dict):
        raise InvalidInvocation(f"invocation must be a JSON object, got {type(raw).__name__}")
    arguments = raw.get("arguments")
    if arguments is not None:
        size = json_size(arguments)
        if size > max_argument_bytes:
            raise PayloadTooLarge(
                f"arguments are {size} bytes, limit is {max_argument_bytes}",
                {"limit": max_argument_bytes, "size": size, "what": "arguments"},
            )
    try:
        return Invocation.model_validate(raw)
    except ValidationError as exc:
        raise InvalidInvocation(f"invalid invocation: {describe_validation_error(exc)}") from None
