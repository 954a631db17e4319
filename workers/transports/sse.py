"""SSE transport: ``POST /invoke`` with ``"stream": true``, read as Server-Sent Events (httpx-sse).

Runs on the shared pooled client of :class:`~workers.gateway.client.GatewayClient`. Each data event
becomes a :class:`~workers.models.Chunk` handed to ``call.sink``; ``event: done`` ends the call with
its JSON object as the result; ``event: error`` ends it with a typed error. A connection dropped
after the stream started (or a stream that ends without ``done``) is resumed with ``Last-Event-ID``
after the server's ``retry`` delay (capped), at most ``reconnects`` times in a row without progress;
events whose id was already seen are skipped (integer ids by value, others by memory), so no chunk
is delivered twice even by a server that replays. (Events that set no id of their own cannot be
told apart after a resume; the Gateway contract gives every data event an id.)

``call.timeout`` bounds connecting and each wait for the next event; ``max_duration`` bounds the
whole stream. Memory is bounded too: one line or one event may not pass ``max_result_bytes`` plus
:data:`EVENT_OVERHEAD` bytes (httpx-sse would buffer a line without a newline for ever), a JSON answer
not ``max_result_bytes``, an error answer is read up to its first ``ERROR_BODY_BYTES``; every
oversized answer is a :class:`~workers.errors.ResultTooLarge`, as over HTTP and stdio.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import EventSource, ServerSentEvent, aconnect_sse

# httpx-sse 0.4 bounds neither a line nor an event and has no option to (httpx2 added one:
# pydantic/httpx2#1071 "Add max_event_size to cap SSE event buffering"), so its line reader is
# replaced by bounded_lines() below and only its field decoder is kept; it is not re-exported.
# Back to EventSource.aiter_sse() once httpx-sse can cap an event.
from httpx_sse._decoders import SSEDecoder

from config.registry import ServerBase
from workers import tracing
from workers.errors import (
    GatewayUnavailable,
    InvocationTimeout,
    ProtocolError,
    ResultTooLarge,
    SarkError,
    ToolError,
    status_error,
)
from workers.gateway.client import GatewayClient
from workers.gateway.post import ERROR_BODY_BYTES, decoded, read_head, read_limited
from workers.models import Chunk, GatewayToolInfo, json_size
from workers.transports.base import BuildContext, Call, ToolOutcome
from workers.transports.http import gateway_server, outcome_from_gateway

__all__ = ["SseTransport", "build"]

log = logging.getLogger("sark.sse")

#: Reconnect delay when the server sent no ``retry`` field (seconds).
DEFAULT_RETRY = 0.1

#: Bytes an event may hold beyond its data's cap: field names, ``id``, ``event`` and ``retry`` lines.
EVENT_OVERHEAD = 65_536

_EOL = re.compile(rb"\r\n|\r|\n")


async def bounded_lines(pieces: AsyncIterable[bytes], limit: int) -> AsyncGenerator[str, None]:
    """The lines of an SSE byte stream (CRLF, CR or LF ends one), refusing any line or event over ``limit``.

    httpx-sse buffers a line until its newline arrives, without a limit; here the bytes of the line
    being read plus those of the event's earlier lines (an event ends at a blank line) are counted
    as they arrive.

    Raises:
        ResultTooLarge: a line or an event over ``limit`` bytes.
    """
    buffer = bytearray()
    event = 0  # bytes of the current event's complete lines
    async for piece in pieces:
        scan = b"\n" in piece or b"\r" in piece or buffer.endswith(b"\r")
        buffer += piece
        if scan:  # without a line end in sight, appending is all there is to do (no rescans)
            start = 0
            for match in _EOL.finditer(buffer):
                if match.group() == b"\r" and match.end() == len(buffer):
                    break  # maybe the first half of CRLF: the next piece decides
                line = bytes(buffer[start:match.start()])
                start = match.end()
                event = event + len(line) if line else 0
                if event > limit:
                    break
                yield line.decode("utf-8", "replace")
            del buffer[:start]
        if event + len(buffer) > limit:
            raise ResultTooLarge(f"SSE event or line over {limit} bytes", {"limit": limit, "what": "sse_event"})
    if buffer.endswith(b"\r"):
        yield bytes(buffer[:-1]).decode("utf-8", "replace")
    # anything else left is an unterminated last line: no event is dispatched without a blank line


@dataclass
class _StreamState:
    """What survives a reconnect: position, dedup memory, delay, counters."""

    last_event_id: str | None = None
    last_numeric: int | None = None
    seen: set[str] = field(default_factory=set)
    retry: float = DEFAULT_RETRY
    seq: int = 0
    result: dict[str, Any] | None = None

    def is_duplicate(self, event_id: str) -> bool:
        """True when ``event_id`` was delivered before (integer ids compare, others are remembered)."""
        if event_id.isdigit() and self.last_numeric is not None:
            return int(event_id) <= self.last_numeric
        return event_id in self.seen

    def remember(self, event_id: str) -> None:
        # An id that is not printable ASCII cannot go back in a Last-Event-ID header (the HTTP stack
        # would raise): such a stream is not resumable, as if it had set no id.
        if not (event_id.isascii() and event_id.isprintable()):
            self.seen.add(event_id)
            return
        self.last_event_id = event_id
        if event_id.isdigit():
            self.last_numeric = int(event_id)
        else:
            self.seen.add(event_id)


class _Dropped(Exception):
    """The connection ended before ``done`` (resumable)."""


def _error_event(sse: ServerSentEvent) -> SarkError:
    """The typed error an ``event: error`` carries (JSON ``{"error"|"reason", "status_code"}`` or text)."""
    try:
        body = json.loads(sse.data)
    except ValueError:
        body = sse.data
    if isinstance(body, dict):
        status = body.get("status_code", body.get("status", 500))
        status = status if isinstance(status, int) and 400 <= status <= 599 else 500
        message = body.get("error") or body.get("reason") or body.get("message") or "stream error"
        message = (message if isinstance(message, str) else json.dumps(message))[:ERROR_BODY_BYTES]
        prefix = {401: "Authentication failed", 403: "Authorization denied"}.get(status, "Tool execution failed")
        return status_error(status, f"{prefix}: {message}", {"event_id": sse.id or None})
    text = str(body).strip()[:200] or "no detail"
    return ToolError(f"Tool execution failed: {text}", {"event_id": sse.id or None}, status_code=500)


class SseTransport:
    """Streams invocations from the Gateway as Server-Sent Events.

    Args:
        gateway: the runtime's Gateway client (its pooled ``http`` client is used).
        max_result_bytes: largest final result or single chunk.
        reconnects: resumes allowed in a row without a new event.
        retry_max: cap (seconds) on the server's ``retry`` delay.
        max_duration: seconds the whole stream may take.
    """

    name = "sse"

    def __init__(
        self,
        gateway: GatewayClient,
        *,
        max_result_bytes: int,
        reconnects: int = 3,
        retry_max: float = 5.0,
        max_duration: float = 600.0,
    ) -> None:
        self._gateway = gateway
        self._max_bytes = max_result_bytes
        self._reconnects = reconnects
        self._retry_max = retry_max
        self._max_duration = max_duration

    async def open(self) -> None:
        """Nothing to open: the Gateway client's pool connects lazily."""

    async def close(self) -> None:
        """The Gateway client is owned (and closed) by the runtime."""

    async def list_tools(self, server: ServerBase | None, *, token: str | None = None) -> list[GatewayToolInfo]:
        """``GET /tools`` (same Gateway as the HTTP transport)."""
        if server is None:
            return await self._gateway.list_tools()
        return await self._gateway.list_tools(server_id=gateway_server(server).gateway_id)

    async def invoke(self, call: Call) -> ToolOutcome:
        """Stream one invocation; chunks go to ``call.sink`` (dropped when it is None)."""
        server = gateway_server(call.server)
        payload = {
            "server_id": server.gateway_id,
            "tool_name": call.invocation.tool,
            "parameters": dict(call.invocation.arguments),
            "request_id": call.request_id,
            "stream": True,
        }
        state = _StreamState()
        try:
            async with asyncio.timeout(self._max_duration):
                await self._run(call, payload, state)
        except TimeoutError:
            raise InvocationTimeout(
                f"stream did not finish within {self._max_duration:g}s", {"chunks": state.seq}
            ) from None
        assert state.result is not None
        return outcome_from_gateway(state.result, chunks=state.seq)

    async def _run(self, call: Call, payload: dict[str, Any], state: _StreamState) -> None:
        failures = 0
        started = False
        while True:
            progress_before = state.seq, state.last_event_id
            try:
                await self._connect(call, payload, state)
                return
            except _Dropped as drop:
                reason = str(drop)
            except httpx.TimeoutException:
                raise InvocationTimeout(
                    f"no event from the Gateway within {call.timeout:g}s", {"chunks": state.seq}
                ) from None
            except httpx.TransportError as exc:
                if not started and state.last_event_id is None and state.seq == 0:
                    raise GatewayUnavailable(f"cannot reach the Gateway ({type(exc).__name__}: {exc})") from exc
                reason = f"{type(exc).__name__}: {exc}"
            started = True
            failures = 0 if (state.seq, state.last_event_id) != progress_before else failures + 1
            if failures >= self._reconnects or state.last_event_id is None:
                raise ProtocolError(
                    f"SSE stream ended without 'done' ({reason}); "
                    f"{'no event id to resume from' if state.last_event_id is None else 'resume attempts exhausted'}",
                    {"chunks": state.seq, "last_event_id": state.last_event_id},
                )
            log.info("sse stream dropped (%s); resuming after %s in %.3fs", reason, state.last_event_id, state.retry)
            await asyncio.sleep(state.retry)

    async def _connect(self, call: Call, payload: dict[str, Any], state: _StreamState) -> None:
        headers = {"X-Request-ID": call.request_id, "Accept-Encoding": "gzip"}  # decoded() inflates it capped
        if call.token:
            headers["Authorization"] = f"Bearer {call.token}"
        if state.last_event_id is not None:
            headers["Last-Event-ID"] = state.last_event_id  # ASCII only: see _StreamState.remember
        if tracing.active:  # one span per connection (a resume is another), its traceparent to the Gateway
            with tracing.gateway_span("/invoke", str(payload["server_id"]), stream=True,
                                      resume=state.last_event_id is not None) as traced:
                assert traced is not None
                await self._stream(call, payload, traced.headers(headers), state)
            return
        await self._stream(call, payload, headers, state)

    async def _stream(self, call: Call, payload: dict[str, Any], headers: dict[str, str], state: _StreamState) -> None:
        async with aconnect_sse(
            self._gateway.http, "POST", "/invoke", json=payload, headers=headers, timeout=httpx.Timeout(call.timeout)
        ) as source:
            response = source.response
            if response.status_code >= 400:
                body = await read_head(self._pieces(response), ERROR_BODY_BYTES)  # the message is all we need
                GatewayClient._raise_for_status(response.status_code, body, "Tool execution")
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                # A Gateway that does not stream answers with the whole result at once.
                state.result = await self._json_answer(response)
                return
            await self._read_events(call, source, state)

    @staticmethod
    def _pieces(response: httpx.Response) -> AsyncIterable[bytes]:
        return decoded(response.aiter_raw(), response.headers.get("content-encoding", "identity"))

    async def _json_answer(self, response: httpx.Response) -> dict[str, Any]:
        limit = self._max_bytes

        def too_large() -> ResultTooLarge:
            return ResultTooLarge(f"result exceeds {limit} bytes", {"limit": limit, "what": "result"})

        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ResultTooLarge(f"result is {declared} bytes, limit is {limit}",
                                 {"limit": limit, "size": int(declared), "what": "result"})
        body = await read_limited(self._pieces(response), limit, too_large)
        data = GatewayClient._json(body, "invoke")
        if not isinstance(data, dict):
            raise ProtocolError(f"Gateway answered invoke with {type(data).__name__}, expected an object")
        return data

    async def _read_events(self, call: Call, source: EventSource, state: _StreamState) -> None:
        previous = ""  # the decoder repeats the last id on events that set none: only new ids count
        decoder = SSEDecoder()
        lines = bounded_lines(self._pieces(source.response), self._max_bytes + EVENT_OVERHEAD)
        async with aclosing(lines):
            async for line in lines:
                sse = decoder.decode(line)
                if sse is None:
                    continue
                fresh_id = sse.id if sse.id and sse.id != previous else None
                previous = sse.id
                if sse.retry is not None and sse.retry >= 0:
                    state.retry = min(sse.retry / 1000.0, self._retry_max)
                if sse.event == "error":
                    raise _error_event(sse)
                if sse.event == "done":
                    state.result = self._done(sse)
                    return
                await self._data_event(call, sse, state, fresh_id)
        raise _Dropped("the server closed the stream")

    def _done(self, sse: ServerSentEvent) -> dict[str, Any]:
        if not sse.data.strip():
            return {}
        size = len(sse.data.encode())
        if size > self._max_bytes:
            raise ResultTooLarge(f"'done' event is {size} bytes, limit is {self._max_bytes}",
                                 {"limit": self._max_bytes, "size": size, "what": "result"})
        try:
            data = json.loads(sse.data)
        except ValueError:
            raise ProtocolError(f"'done' event data is not JSON: {sse.data[:200]!r}") from None
        if not isinstance(data, dict):
            raise ProtocolError(f"'done' event data is {type(data).__name__}, expected a JSON object")
        return data

    async def _data_event(self, call: Call, sse: ServerSentEvent, state: _StreamState, fresh_id: str | None) -> None:
        """One data event. ``fresh_id``: the id this event set (None when it set none)."""
        if fresh_id is not None and state.is_duplicate(fresh_id):
            return  # replayed after a resume
        event_id = sse.id or None
        where = f"event {event_id or '#' + str(state.seq)}"
        if not sse.data:
            if fresh_id is None:
                return  # nothing to deliver (e.g. a bare `event:` line)
            # Every id is a chunk's position in this contract: an id without data is a lost chunk.
            raise ProtocolError(f"malformed SSE {where}: {sse.event!r} event without data")
        try:
            data = json.loads(sse.data)
        except ValueError:
            raise ProtocolError(f"non-JSON data in SSE {where}: {sse.data[:200]!r}") from None
        if json_size(data) > self._max_bytes:
            raise ResultTooLarge(f"SSE {where} is over {self._max_bytes} bytes",
                                 {"limit": self._max_bytes, "what": "chunk"})
        chunk = Chunk(
            seq=state.seq, event_id=event_id, event_type=sse.event, data=data, retry=sse.retry, ts=time.time()
        )
        if call.sink is not None:
            await call.sink(chunk)
        state.seq += 1
        if fresh_id is not None:
            state.remember(fresh_id)


def build(context: BuildContext) -> SseTransport:
    """The ``sse`` transport of one worker process (catalog factory)."""
    settings = context.settings
    return SseTransport(context.gateway, max_result_bytes=settings.max_result_bytes, reconnects=settings.sse_reconnects,
                        retry_max=settings.sse_retry_max, max_duration=settings.max_invoke_timeout)
