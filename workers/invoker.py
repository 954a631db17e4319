"""The invocation pipeline: take the lease → validate → resolve server → call the transport → validate the result."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from config.registry import ServerBase
from config.settings import Settings
from config.transports import UnknownTransport, default_transport, reaches
from workers import tracing
from workers.authz import authorize
from workers.errors import (
    Cancelled,
    InternalError,
    InvalidInvocation,
    InvocationTimeout,
    NotServedHere,
    ProtocolError,
    ResultTooLarge,
    SarkError,
    UnknownServer,
)
from workers.metrics import METRICS, InvocationLabels
from workers.models import (
    Invocation,
    InvocationResult,
    describe_validation_error,
    json_size,
    parse_invocation,
)
from workers.runtime import Runtime
from workers.scrub import call_secrets, scrub_error
from workers.streams.publisher import StreamPublisher
from workers.tokens import ENCRYPTED_PREFIX, check_not_expired, open_token
from workers.transports.base import Call, ToolOutcome

if TYPE_CHECKING:
    from workers.otel import Traced

__all__ = ["execute", "open_call_token", "resolve", "resolve_timeout"]

log = logging.getLogger("sark.invoke")


def resolve(invocation: Invocation, server: ServerBase | None) -> tuple[ServerBase, str]:
    """The invocation's server entry and transport, checked against each other (:mod:`config.transports`).

    Raises:
        UnknownServer: the server is not in the registry.
        InvalidInvocation: no such transport, or it cannot reach that server.
    """
    if server is None:
        raise UnknownServer(f"unknown server {invocation.server!r}", {"server": invocation.server})
    try:
        transport = invocation.transport or default_transport(server, invocation.stream)
        compatible = reaches(transport, server)
    except UnknownTransport as exc:
        raise InvalidInvocation(str(exc), {"transport": invocation.transport}) from None
    if not compatible:
        raise InvalidInvocation(
            f"server {server.name!r} is reached over {server.transport}, not {transport}",
            {"server": server.name, "transport": transport},
        )
    return server, transport


def resolve_timeout(invocation: Invocation, server: ServerBase, settings: Settings) -> float:
    """Invocation timeout: the task's, else the server's, else the default; between the minimum and maximum.

    Raises:
        InvalidInvocation: the task asks for less than ``min_invoke_timeout`` or more than the maximum.
    """
    if invocation.timeout is not None and invocation.timeout < settings.min_invoke_timeout:
        raise InvalidInvocation(
            f"timeout {invocation.timeout:g}s is below the minimum {settings.min_invoke_timeout:g}s",
            {"limit": settings.min_invoke_timeout},
        )
    wanted = invocation.timeout or server.timeout or settings.invoke_timeout
    if wanted > settings.max_invoke_timeout:
        raise InvalidInvocation(
            f"timeout {wanted:g}s exceeds the maximum {settings.max_invoke_timeout:g}s",
            {"limit": settings.max_invoke_timeout},
        )
    return wanted


def open_call_token(settings: Settings, token_header: object, request_id: str,
                    invocation: object = None) -> str | None:
    """The clear token of the task ``request_id`` from its ``sark_token`` header (see :func:`open_token`)."""
    return open_token(
        token_header,
        key=settings.token_key.get_secret_value() if settings.token_key else None,
        task_id=request_id,
        ttl=settings.token_ttl,
        allow_clear=settings.allow_clear_tokens,
        max_bytes=settings.max_token_bytes,
        invocation=invocation,
    )


#: Reads the result an earlier start of an invocation stored, if it succeeded (blocking; run in a thread).
StoredResult = Callable[[], "dict[str, Any] | None"]


async def execute(
    runtime: Runtime,
    raw: object,
    *,
    token_header: object,
    request_id: str,
    lease: str,
    taken_attempt: int | None = None,
    taken_fresh: bool = False,
    previous: StoredResult | None = None,
    forwardable: bool = True,
    trace_context: object | None = None,
) -> InvocationResult:
    """Carry out one enqueued invocation and return its validated result (see :func:`_carry_out`); its
    outcome, duration and labels go to the process's metrics (:mod:`workers.metrics`)."""
    labels = METRICS.invocation_started()
    outcome = "internal_error"
    try:
        result = await _carry_out(runtime, raw, labels, token_header=token_header, request_id=request_id,
                                  lease=lease, taken_attempt=taken_attempt, taken_fresh=taken_fresh,
                                  previous=previous, forwardable=forwardable, trace_context=trace_context)
        outcome = "is_error" if result.is_error else "ok"
        if labels.tool is None:  # a stored result of an earlier start: label it as that start was
            _label(labels, runtime, result.server, result.tool, result.transport)
        return result
    except SarkError as exc:
        outcome = exc.code
        raise
    except asyncio.CancelledError:
        outcome = Cancelled.code
        raise
    finally:
        METRICS.invocation_ended(labels, outcome)


def _label(labels: InvocationLabels, runtime: Runtime, server: str, tool: str, transport: str) -> None:
    """Fill ``labels`` in: the server's name only if the registry has it (a caller's bogus name is not a label)."""
    entry = runtime.registry.get(server)
    if entry is not None:
        labels.server = entry.name
        labels.transport = transport
    labels.tool = tool


async def _carry_out(
    runtime: Runtime,
    raw: object,
    labels: InvocationLabels,
    *,
    token_header: object,
    request_id: str,
    lease: str,
    taken_attempt: int | None,
    taken_fresh: bool,
    previous: StoredResult | None,
    forwardable: bool,
    trace_context: object | None,
) -> InvocationResult:
    """Carry out one enqueued invocation and return its validated result.

    First of all, the invocation's lease is taken for the holder token ``lease``
    (:mod:`workers.leases`; ``taken_attempt``: the consumer took it with the message, it is only adopted):
    while another execution holds it, nothing happens and
    :class:`~workers.errors.AlreadyRunning` is raised. The caller releases the lease once the outcome is
    stored. On a later start (``attempt`` > 1), ``previous`` is asked for the stored result of an earlier
    one: when there is one, it is returned as it is, the tool is not called and no stream is published.

    ``token_header`` is the ``sark_token`` message header as received (sealed, clear or absent): it is
    opened and checked here, so that a refused token ends a streamed invocation's stream too.

    A streamed invocation (``"stream": true``) publishes its chunks to its Redis Stream, and
    always a terminal entry: done (with the final result), error, or cancelled.

    ``forwardable``: a :class:`~workers.errors.NotServedHere` will be forwarded to the transport's queue (its
    ``attempt`` attribute says which start to take back), so the stream stays open for the worker that
    carries the invocation out; when False (forwarded once already), it ends the stream like any error.

    ``trace_context``: the task's trace context (:func:`workers.tracing.capture`); with tracing on, the
    invocation is the span ``sark.invoke <server>.<tool>`` under it (ended after every exception handler
    below, so it sees the error the caller gets).

    Raises:
        SarkError: any typed failure, scrubbed of every secret the worker holds (:mod:`workers.scrub`)
            and never chained to a third-party exception; a fault of ours is :class:`InternalError`.
    """
    s = runtime.settings
    publisher: StreamPublisher | None = None
    attempt = 0
    with contextlib.ExitStack() as scope:
        traced = scope.enter_context(tracing.invocation_span(request_id, trace_context)) if tracing.active else None
        # A sealed header is ciphertext bound to this task; a clear one is the token itself.
        # (One longer than any accepted token is refused without being echoed: no need to scrub for it.)
        clear_header = token_header if (isinstance(token_header, str) and not token_header.startswith(
            ENCRYPTED_PREFIX) and len(token_header) <= s.max_token_bytes) else None
        scope.enter_context(call_secrets(clear_header))
        try:
            # Nothing observable happens before the lease is ours (no stream, no token opened).
            if taken_attempt and taken_fresh:  # the consumer took it with the message (leases.TAKEN_HEADER)
                runtime.leases.adopt(request_id, lease)
                attempt = taken_attempt
            else:
                attempt = await runtime.leases.acquire(request_id, lease, taken_attempt)
            if traced is not None:
                traced.set("sark.attempt", attempt)
            if attempt > 1:
                stored = await _stored_result(request_id, attempt, previous)
                if stored is not None:
                    return stored
            if isinstance(raw, dict) and raw.get("stream"):
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
            token = open_call_token(s, token_header, request_id, raw)
            scope.enter_context(call_secrets(token))
            result = await _execute(runtime, raw, labels, token=token, request_id=request_id, attempt=attempt,
                                    publisher=publisher, traced=traced)
        except SarkError as exc:
            error = scrub_error(exc)
            if isinstance(error, NotServedHere) and forwardable:
                # The task forwards the invocation unstarted: its stream stays open for the worker that
                # carries it out, and this start is taken back (the forwarded copy counts the same attempt).
                error.attempt = attempt  # type: ignore[attr-defined]
            elif publisher is not None:
                await _end_stream(publisher, error)
            raise error from None
        except asyncio.CancelledError:
            if publisher is not None:
                await _end_stream(publisher, Cancelled(
                    f"invocation {request_id} was interrupted (cancelled, or past the worker's deadline)",
                    {"request_id": request_id}))
            raise
        except Exception as exc:
            # A bug of ours (or a library's exception we failed to translate): its text may quote a
            # header, so it stays in the (scrubbed) worker log and the caller gets its type only.
            log.exception("internal error in invocation %s", request_id)
            internal = InternalError(f"internal error in the worker ({type(exc).__name__}); see the worker log",
                                     {"request_id": request_id})
            if publisher is not None:
                await _end_stream(publisher, internal)
            raise internal from None
        if publisher is not None:
            await publisher.done(result.result)
        return result


async def _stored_result(request_id: str, attempt: int, previous: StoredResult | None) -> InvocationResult | None:
    """The result an earlier start of this invocation stored, if it succeeded; logs the later start."""
    stored = await asyncio.to_thread(previous) if previous is not None else None
    if stored is not None:
        try:
            result = InvocationResult.model_validate(stored)
        except ValidationError:
            log.warning("invocation %s (attempt %d): the stored result of an earlier attempt does not validate; "
                        "carrying the invocation out again", request_id, attempt)
        else:
            # An earlier delivery finished (its message came back after the visibility timeout, or its
            # worker died before acknowledging): hand back its result instead of calling the tool again.
            log.warning("redelivered invocation %s (attempt %d) had already finished: its stored result is "
                        "returned, the tool is not called again", request_id, attempt)
            return result
    log.warning("redelivered invocation %s (attempt %d): same request_id sent again", request_id, attempt)
    return None


async def _end_stream(publisher: StreamPublisher, error: SarkError) -> None:
    """Write the error/cancelled terminal entry; never masks the invocation's own error."""
    try:
        await asyncio.wait_for(asyncio.shield(publisher.fail(error)), timeout=10)
    except BaseException:
        log.exception("could not end stream %s", publisher.key)


async def _execute(
    runtime: Runtime,
    raw: object,
    labels: InvocationLabels,
    *,
    token: str | None,
    request_id: str,
    attempt: int,
    publisher: StreamPublisher | None,
    traced: Traced | None = None,
) -> InvocationResult:
    settings = runtime.settings
    invocation = parse_invocation(raw, max_argument_bytes=settings.max_argument_bytes)
    entry = runtime.registry.get(invocation.server)
    labels.tool = invocation.tool
    if entry is not None:
        labels.server = entry.name
    check_not_expired(token, leeway=settings.token_leeway)
    server, transport_name = resolve(invocation, entry)
    labels.transport = transport_name
    timeout = resolve_timeout(invocation, server, settings)
    if traced is not None:
        traced.resolved(server=server.name, tool=invocation.tool, transport=transport_name)
    if server.policy is not None:
        authorize(server.name, server.policy, token, runtime.verifier, settings)
    transport = runtime.transport(transport_name)
    sink = METRICS.counting_chunks(publisher.sink, server.name, transport_name) if publisher is not None else None
    call = Call(server=server, invocation=invocation, request_id=request_id, timeout=timeout, token=token, sink=sink)
    # A timeout shorter than the operator's for this server is the caller's choice: when it runs out,
    # that says nothing about the target, and must not count against its fleet-wide breaker.
    shortened = timeout < (server.timeout or settings.invoke_timeout)

    async def carry_out() -> ToolOutcome:
        try:
            return await transport.invoke(call)
        except InvocationTimeout as exc:
            exc.caller_caused = shortened
            raise

    started = time.perf_counter()
    # The breaker's half-open trial lease outlives every retry of this call (then a crashed caller frees it).
    lease = settings.invoke_attempts * (timeout + settings.invoke_wait_max) + 5.0
    outcome = await runtime.breakers.call(server, carry_out, lease=lease)
    duration_ms = (time.perf_counter() - started) * 1000.0
    if traced is not None:
        traced.set("sark.is_error", outcome.is_error)
    size = json_size(outcome.result)
    if size > settings.max_result_bytes:  # after the breaker's verdict: the target answered (errors.FAILURES)
        raise ResultTooLarge(
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
