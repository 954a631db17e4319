"""The invocation pipeline: validate → resolve server → call the transport → validate the result."""

from __future__ import annotations

import asyncio
import logging
import time

from pydantic import ValidationError

from config.registry import GatewayServer, StdioServer
from config.settings import Settings
from workers.errors import Cancelled, InvalidInvocation, PayloadTooLarge, ProtocolError, SarkError, UnknownServer
from workers.models import (
    Invocation,
    InvocationResult,
    TransportName,
    default_transport,
    describe_validation_error,
    json_size,
    parse_invocation,
)
from workers.runtime import Runtime
from workers.streams import StreamPublisher
from workers.tokens import check_not_expired
from workers.transports.base import Call

__all__ = ["execute", "resolve", "resolve_timeout"]

log = logging.getLogger("sark.invoke")


def resolve(
    invocation: Invocation, runtime_registry_get: GatewayServer | StdioServer | None
) -> tuple[GatewayServer | StdioServer, TransportName]:
    """The invocation's server entry and transport, checked against each other.

    Raises:
        UnknownServer: the server is not in the registry.
        InvalidInvocation: the transport cannot reach that server.
    """
    server = runtime_registry_get
    if server is None:
        raise UnknownServer(f"unknown server {invocation.server!r}", {"server": invocation.server})
    transport: TransportName = invocation.transport or default_transport(server.transport, invocation.stream)
    gateway_pair = {"http", "sse"}
    compatible = transport == server.transport or (transport in gateway_pair and server.transport in gateway_pair)
    if not compatible:
        raise InvalidInvocation(
            f"server {server.name!r} is reached over {server.transport}, not {transport}",
            {"server": server.name, "transport": transport},
        )
    return server, transport


def resolve_timeout(invocation: Invocation, server: GatewayServer | StdioServer, settings: Settings) -> float:
    """Invocation timeout: the task's, else the server's, else the default; capped by the maximum."""
    wanted = invocation.timeout or server.timeout or settings.invoke_timeout
    if wanted > settings.max_invoke_timeout:
        raise InvalidInvocation(
            f"timeout {wanted:g}s exceeds the maximum {settings.max_invoke_timeout:g}s",
            {"limit": settings.max_invoke_timeout},
        )
    return wanted


async def execute(
    runtime: Runtime, raw: object, *, token: str | None, request_id: str, attempt: int = 1
) -> InvocationResult:
    """Carry out one enqueued invocation and return its validated result.

    A streamed invocation (``"stream": true``) publishes its chunks to its Redis Stream, and
    always a terminal entry: done (with the final result), error, or cancelled.

    Raises:
        SarkError: any typed failure; nothing else escapes for foreseeable problems.
    """
    if not (isinstance(raw, dict) and raw.get("stream")):
        return await _execute(runtime, raw, token=token, request_id=request_id, attempt=attempt, publisher=None)
    s = runtime.settings
    publisher = StreamPublisher(
        runtime.redis,
        request_id,
        maxlen=s.stream_maxlen,
        ttl=s.stream_ttl,
        running_ttl=s.stream_ttl + int(s.invoke_attempts * (s.max_invoke_timeout + s.invoke_wait_max)),
        max_chunks=s.max_stream_chunks,
        max_bytes=s.max_stream_bytes,
    )
    await publisher.open()
    try:
        result = await _execute(runtime, raw, token=token, request_id=request_id, attempt=attempt,
                                publisher=publisher)
    except SarkError as exc:
        await _end_stream(publisher, exc)
        raise
    except asyncio.CancelledError:
        await _end_stream(publisher, Cancelled(
            f"invocation {request_id} was interrupted (cancelled, or past the worker's deadline)",
            {"request_id": request_id}))
        raise
    except Exception as exc:
        await _end_stream(publisher, SarkError(f"internal error: {type(exc).__name__}"))
        raise
    await publisher.done(result.result)
    return result


async def _end_stream(publisher: StreamPublisher, error: SarkError) -> None:
    """Write the error/cancelled terminal entry; never masks the invocation's own error."""
    try:
        await asyncio.wait_for(asyncio.shield(publisher.fail(error)), timeout=10)
    except BaseException:
        log.exception("could not end stream %s", publisher.key)


async def _execute(
    runtime: Runtime,
    raw: object,
    *,
    token: str | None,
    request_id: str,
    attempt: int,
    publisher: StreamPublisher | None,
) -> InvocationResult:
    settings = runtime.settings
    invocation = parse_invocation(raw, max_argument_bytes=settings.max_argument_bytes)
    check_not_expired(token, leeway=settings.token_leeway)
    server, transport_name = resolve(invocation, runtime.registry.get(invocation.server))
    timeout = resolve_timeout(invocation, server, settings)
    transport = runtime.transport(transport_name)
    sink = publisher.sink if publisher is not None else None
    call = Call(server=server, invocation=invocation, request_id=request_id, timeout=timeout, token=token, sink=sink)
    started = time.perf_counter()
    # The breaker's half-open trial lease outlives every retry of this call (then a crashed caller frees it).
    lease = settings.invoke_attempts * (timeout + settings.invoke_wait_max) + 5.0
    outcome = await runtime.breakers.call(server, lambda: transport.invoke(call), lease=lease)
    duration_ms = (time.perf_counter() - started) * 1000.0
    size = json_size(outcome.result)
    if size > settings.max_result_bytes:
        raise PayloadTooLarge(
            f"result is {size} bytes, limit is {settings.max_result_bytes}",
            {"limit": settings.max_result_bytes, "size": size, "what": "result"},
        )
    try:
        return InvocationResult(
            request_id=request_id,
            server=server.name,
            tool=invocation.tool,
            transport=transport_name,
            result=outcome.result,
            is_error=outcome.is_error,
            execution_time_ms=outcome.execution_time_ms,
            duration_ms=duration_ms,
            chunks=publisher.count if publisher is not None else outcome.chunks,
            attempt=attempt,
        )
    except ValidationError as exc:
        raise ProtocolError(f"result does not validate: {describe_validation_error(exc)}") from None
