"""OpenTelemetry, once :mod:`workers.tracing` says tracing is on: the provider, Celery's instrumentation and
this project's spans. Imported only then (never on the path of a process without ``OTEL_*`` settings).

What a span may hold: names (server, tool, transport, task), ids (request id = task id), codes (error
``code``, HTTP status) and counts. Never argument values, results, tokens, headers or error messages:
those can quote what the caller sent (exceptions are not recorded on our spans for that reason).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.trace import SpanKind, StatusCode

from workers import __version__
from workers.errors import SarkError

__all__ = ["Traced", "configure", "current_context", "flush", "gateway", "invocation", "mcp_call"]

log = logging.getLogger("sark.tracing")

_tracer = trace.get_tracer("sark-workers", __version__)
#: The provider :func:`configure` installed (None when the process brought its own).
_provider: Any = None
#: Milliseconds :func:`flush` waits for the exporter at shutdown.
_FLUSH_TIMEOUT_MS = 5_000


def configure(service_name: str) -> None:
    """A ``TracerProvider`` exporting OTLP/HTTP (protobuf) through a ``BatchSpanProcessor``, unless the
    process set one already; then Celery's instrumentation (publish spans inject the trace into the
    message headers, run spans continue it in the worker)."""
    global _provider
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                    or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
        if protocol != "http/protobuf":
            log.warning("OTLP protocol %r is not supported: traces are sent as http/protobuf", protocol)
        resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: service_name}))
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        _provider = provider
    instrumentor = CeleryInstrumentor()  # type: ignore[no-untyped-call]  # untyped upstream
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument()
    log.info("tracing on: OTLP/HTTP to %s", os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
             or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def flush() -> None:
    """Export what is buffered and stop the provider :func:`configure` installed (never raises)."""
    if _provider is None:
        return
    try:
        _provider.force_flush(_FLUSH_TIMEOUT_MS)
        _provider.shutdown()
    except Exception as exc:  # an unreachable collector must not spoil a shutdown
        log.warning("could not flush traces: %s", type(exc).__name__)


def current_context() -> context.Context:
    """This thread's (or task's) trace context."""
    return context.get_current()


class Traced:
    """One of this project's spans, as the code around it sees it."""

    __slots__ = ("span",)

    def __init__(self, span: trace.Span) -> None:
        self.span = span

    def resolved(self, *, server: str, tool: str, transport: str) -> None:
        """The invocation's server entry and transport are known: name the span after them."""
        self.span.update_name(f"sark.invoke {server}.{tool}")
        self.span.set_attributes({"sark.server": server, "sark.tool": tool, "sark.transport": transport})

    def set(self, key: str, value: str | int | float | bool) -> None:
        """One more attribute (a name, an id, a code or a count: never a value the caller sent)."""
        self.span.set_attribute(key, value)

    def headers(self, headers: dict[str, str]) -> dict[str, str]:
        """``headers`` plus ``traceparent`` (and ``tracestate``) of this span, for the target."""
        carried = dict(headers)
        propagate.inject(carried)
        return carried


@contextmanager
def _span(name: str, kind: SpanKind, attributes: dict[str, Any], parent: context.Context | None = None,
          ) -> Iterator[Traced]:
    """A current span that ends with the block: ``sark.outcome`` ok/error/cancelled, the error's ``code`` as
    ``sark.error.code`` and status description (never its message)."""
    with _tracer.start_as_current_span(name, context=parent, kind=kind, attributes=attributes,
                                       record_exception=False, set_status_on_exception=False) as span:
        try:
            yield Traced(span)
        except SarkError as exc:
            span.set_attributes({"sark.outcome": "error", "sark.error.code": exc.code})
            span.set_status(StatusCode.ERROR, exc.code)
            raise
        except asyncio.CancelledError:
            span.set_attribute("sark.outcome", "cancelled")
            raise
        except BaseException as exc:
            span.set_attributes({"sark.outcome": "error", "error.type": type(exc).__name__})
            span.set_status(StatusCode.ERROR, type(exc).__name__)
            raise
        span.set_attribute("sark.outcome", "ok")


def invocation(request_id: str, parent: object | None) -> AbstractContextManager[Traced]:
    """The ``sark.invoke`` span (renamed ``sark.invoke <server>.<tool>`` once resolved)."""
    return _span("sark.invoke", SpanKind.INTERNAL, {"sark.request_id": request_id},
                 parent if isinstance(parent, context.Context) else None)


def gateway(path: str, server_id: str, *, stream: bool, resume: bool) -> AbstractContextManager[Traced]:
    """``gateway POST <path>``: one request to the Gateway (one attempt; one connection of a stream)."""
    attributes: dict[str, Any] = {"http.request.method": "POST", "url.path": path, "sark.gateway.server_id": server_id}
    if stream:
        attributes["sark.stream"] = True
        attributes["sark.stream.resume"] = resume
    return _span(f"gateway POST {path}", SpanKind.CLIENT, attributes)


def mcp_call(transport: str, server: str, tool: str) -> AbstractContextManager[Traced]:
    """``mcp tools/call``: one tool call on an MCP session (waiting for the session included)."""
    return _span("mcp tools/call", SpanKind.CLIENT, {"mcp.method.name": "tools/call", "gen_ai.tool.name": tool,
                                                     "sark.server": server, "sark.transport": transport})
