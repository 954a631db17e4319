"""Built-in tools of the reference Gateway: small, deterministic, and able to fail on demand.

Each tool takes the invocation's parameters and returns an MCP ``CallToolResult``-shaped dict, or
raises :class:`ToolFailure` to make the Gateway answer with a chosen status and body.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BUILTIN_TOOLS", "STREAM_TOOLS", "BuiltinTool", "ToolFailure", "text_result"]


class ToolFailure(Exception):
    """Makes the Gateway answer ``status`` with ``body`` (JSON when ``body`` is a dict)."""

    def __init__(self, status: int, body: dict[str, Any] | str) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body


def text_result(value: Any, *, is_error: bool = False) -> dict[str, Any]:
    """A CallToolResult with one text block (and the value as structured content when a dict)."""
    text = value if isinstance(value, str) else json.dumps(value)
    result: dict[str, Any] = {"content": [{"type": "text", "text": text}], "isError": is_error}
    if isinstance(value, dict):
        result["structuredContent"] = value
    return result


def _number(params: dict[str, Any], name: str, default: float | None = None) -> float:
    value = params.get(name, default)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ToolFailure(400, {"error": f"parameter {name!r} must be a number"})
    return float(value)


async def _echo(params: dict[str, Any]) -> dict[str, Any]:
    return text_result(dict(params))


async def _add(params: dict[str, Any]) -> dict[str, Any]:
    return text_result({"sum": _number(params, "a") + _number(params, "b")})


async def _sleep(params: dict[str, Any]) -> dict[str, Any]:
    seconds = _number(params, "seconds", 0.05)
    await asyncio.sleep(seconds)
    return text_result({"slept": seconds})


async def _fail(params: dict[str, Any]) -> dict[str, Any]:
    status = int(_number(params, "status", 500))
    body = params.get("body", {"error": params.get("message", "requested failure")})
    raise ToolFailure(status, body if isinstance(body, dict | str) else str(body))


async def _tool_error(params: dict[str, Any]) -> dict[str, Any]:
    return text_result(str(params.get("message", "the tool reported an error")), is_error=True)


async def _big(params: dict[str, Any]) -> dict[str, Any]:
    size = int(_number(params, "bytes", 1024))
    return text_result("x" * size)


@dataclass
class _FlakyCounter:
    calls: dict[str, int] = field(default_factory=dict)


_flaky = _FlakyCounter()


async def _flaky_tool(params: dict[str, Any]) -> dict[str, Any]:
    """Fails with ``status`` (503) the first ``failures`` calls for ``key``, then succeeds."""
    key = str(params.get("key", "default"))
    failures = int(_number(params, "failures", 1))
    seen = _flaky.calls.get(key, 0) + 1
    _flaky.calls[key] = seen
    if seen <= failures:
        raise ToolFailure(int(_number(params, "status", 503)), {"error": f"flaky failure {seen}/{failures}"})
    return text_result({"key": key, "calls": seen})


async def _stream_data(params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """Yields ``count`` chunks ``{"index": i, "of": count}``, ``interval`` seconds apart.

    ``start`` skips the first indexes (a resumed stream), ``error_at`` fails with ``status`` (500)
    at that index, ``stamp`` adds the emit time ``"t"`` (unix seconds), ``pad`` adds that many bytes.
    """
    count = int(_number(params, "count", 5))
    interval = _number(params, "interval", 0.0)
    start = int(_number(params, "start", 0))
    error_at = params.get("error_at")
    stamp = bool(params.get("stamp"))
    pad = "x" * int(_number(params, "pad", 0))
    for index in range(start, count):
        if interval:
            await asyncio.sleep(interval)
        if error_at is not None and index == error_at:
            raise ToolFailure(int(_number(params, "status", 500)), {"error": f"requested failure at chunk {index}"})
        chunk: dict[str, Any] = {"index": index, "of": count}
        if pad:
            chunk["pad"] = pad
        if stamp:
            chunk["t"] = time.time()
        yield chunk


ToolFn = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
StreamFn = Callable[[dict[str, Any]], AsyncIterator[dict[str, Any]]]


@dataclass(frozen=True)
class BuiltinTool:
    """A built-in tool and its description for ``GET /tools``."""

    fn: ToolFn
    description: str
    parameters: list[dict[str, Any]] = field(default_factory=list)


def _p(name: str, kind: str, required: bool = False) -> dict[str, Any]:
    return {"name": name, "type": kind, "required": required}


BUILTIN_TOOLS: dict[str, BuiltinTool] = {
    "echo": BuiltinTool(_echo, "Returns its parameters."),
    "add": BuiltinTool(_add, "Adds a and b.", [_p("a", "number", True), _p("b", "number", True)]),
    "sleep": BuiltinTool(_sleep, "Sleeps for `seconds`.", [_p("seconds", "number")]),
    "fail": BuiltinTool(_fail, "Answers with `status` and `body`.", [_p("status", "integer"), _p("body", "any")]),
    "tool_error": BuiltinTool(_tool_error, "Returns a result with isError true.", [_p("message", "string")]),
    "big": BuiltinTool(_big, "Returns `bytes` bytes of text.", [_p("bytes", "integer")]),
    "flaky": BuiltinTool(_flaky_tool, "Fails the first `failures` calls per `key`.", [_p("key", "string")]),
}

#: Tools that stream (``"stream": true`` on ``POST /invoke``); called without streaming they
#: return every chunk at once.
STREAM_TOOLS: dict[str, StreamFn] = {"stream_data": _stream_data}
