"""The reference Gateway's streamed answers: ``POST /invoke`` with ``"stream": true`` as SSE.

Data events carry a chunk as JSON with ``id`` = the chunk's index; ``event: done`` carries the
final CallToolResult; a :class:`ToolFailure` becomes ``event: error`` with
``{"error", "status_code"}``. A request with ``Last-Event-ID: n`` resumes at index ``n + 1``.

Test knobs, read from the tool's parameters (the tool ignores them):
``retry`` (ms, sent with the first event), ``drop_after`` (cut the connection abruptly after that
many events; the first ``drops`` (1) connections of a request id are cut), ``malformed`` /
``non_json`` (index whose event is replaced by an event without data / with non-JSON data),
``no_done`` (end the stream without ``done``), ``keepalive`` (send a comment line first),
``replay`` (ignore ``Last-Event-ID``: a resumed stream starts again from index 0).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import JSONResponse, Response, StreamingResponse

from devkit.gateway.tools import BUILTIN_TOOLS, STREAM_TOOLS, ToolFailure, text_result

__all__ = ["sse_response"]

#: Connections seen per request id (to cut only the first ``drops``), oldest forgotten first.
_connections: OrderedDict[str, int] = OrderedDict()
_REMEMBERED = 10_000


class DropConnection(Exception):
    """Raised inside the body iterator to make the server cut the connection mid-response."""


def _event(data: Any, *, event: str | None = None, ident: str | None = None, retry: int | None = None) -> bytes:
    lines = []
    if event:
        lines.append(f"event: {event}")
    if ident is not None:
        lines.append(f"id: {ident}")
    if retry is not None:
        lines.append(f"retry: {retry}")
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    lines += [f"data: {line}" for line in text.split("\n")]
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def _count_connection(request_id: str) -> int:
    seen = _connections.pop(request_id, 0) + 1
    _connections[request_id] = seen
    while len(_connections) > _REMEMBERED:
        _connections.popitem(last=False)
    return seen


def _int(params: dict[str, Any], name: str) -> int | None:
    value = params.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _failure_event(failure: ToolFailure) -> bytes:
    body = failure.body if isinstance(failure.body, dict) else {"error": failure.body}
    return _event({**body, "status_code": failure.status}, event="error")


async def _stream_events(
    tool: str, params: dict[str, Any], request_id: str, last_event_id: str | None
) -> AsyncIterator[bytes]:
    started = time.perf_counter()
    connection = _count_connection(request_id)
    drop_after = _int(params, "drop_after")
    cut = drop_after is not None and connection <= (_int(params, "drops") or 1)
    retry = _int(params, "retry")
    if params.get("keepalive"):
        yield b": keep-alive\n\n"
    resumable = last_event_id and last_event_id.isdigit() and not params.get("replay")
    start = int(last_event_id) + 1 if resumable else 0  # type: ignore[arg-type]
    sent = 0
    try:
        async for chunk in STREAM_TOOLS[tool]({**params, "start": start}):
            index = int(chunk.get("index", start + sent))
            if cut and sent >= (drop_after or 0):
                raise DropConnection(f"dropped after {sent} events (test knob)")
            if index == params.get("malformed"):
                yield f"id: {index}\nevent: message\nthis line has no colon\n\n".encode()
            elif index == params.get("non_json"):
                yield _event("{not json", ident=str(index))
            else:
                yield _event(chunk, ident=str(index), retry=retry if sent == 0 else None)
            sent += 1
    except ToolFailure as failure:
        yield _failure_event(failure)
        return
    if params.get("no_done"):
        return
    result = text_result({"chunks": start + sent, "resumed_at": start})
    result["execution_time_ms"] = round((time.perf_counter() - started) * 1000, 3)
    yield _event(result, event="done")


async def _single_result(tool: str, params: dict[str, Any]) -> AsyncIterator[bytes]:
    """A non-streaming tool asked to stream: no data events, its result as ``done``."""
    started = time.perf_counter()
    try:
        result = await BUILTIN_TOOLS[tool].fn(params)
    except ToolFailure as failure:
        yield _failure_event(failure)
        return
    result["execution_time_ms"] = round((time.perf_counter() - started) * 1000, 3)
    yield _event(result, event="done")


def sse_response(tool: str, params: dict[str, Any], request_id: str, last_event_id: str | None) -> Response:
    """The ``text/event-stream`` answer to a streamed invocation (404 JSON for an unknown tool)."""
    if tool in STREAM_TOOLS:
        body = _stream_events(tool, params, request_id, last_event_id)
    elif tool in BUILTIN_TOOLS:
        body = _single_result(tool, params)
    else:
        return JSONResponse({"error": f"unknown tool {tool!r}"}, status_code=404)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body, media_type="text/event-stream", headers=headers)
