"""OpenTelemetry tracing: off by default, configured by the standard ``OTEL_*`` variables, free when off.

**The rule for "on"** (:func:`enabled`, read once per process at :func:`setup`): tracing is on when

- ``OTEL_SDK_DISABLED`` is not ``true`` (any case), and
- ``OTEL_TRACES_EXPORTER`` is unset or names ``otlp`` (a comma-separated list may name others too, which are
  not shipped and ignored; ``none`` or a list without ``otlp``: off), and
- an OTLP endpoint is set: ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``.

With no ``OTEL_*`` variable at all it is off. When on, :mod:`workers.otel` sets up a ``TracerProvider``
exporting OTLP over HTTP/protobuf with a ``BatchSpanProcessor`` (the exporter reads its own standard
variables: endpoint, headers, timeout, compression; the sampler reads ``OTEL_TRACES_SAMPLER``), and Celery's
instrumentation, which carries the trace from the enqueuing app into the worker in the message headers.

**Free when off**: this module imports nothing but :mod:`os` and :mod:`contextlib`; :mod:`workers.otel` (and
with it the SDK, the exporter and the instrumentation) is imported only by :func:`setup` once the rule says
on. Every hook on the invocation path checks the module flag :data:`active` first and hands back :data:`OFF`,
one shared ``nullcontext``: no span, no header, no dict built. (``tests/unit/test_tracing.py`` checks both.)

Spans (:mod:`workers.otel`): ``sark.invoke <server>.<tool>`` per invocation, a child per transport call
(``gateway POST /invoke``, ``mcp tools/call``), and the trace carried to the target: a ``traceparent``
(+ ``tracestate``) header to the Gateway; ``_meta.traceparent`` on MCP ``tools/call`` (the SDK injects it).
No span carries argument values, tokens or error messages: names, codes and ids only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from workers.otel import Traced

__all__ = ["OFF", "active", "capture", "enabled", "gateway_span", "invocation_span", "mcp_span", "setup",
           "shutdown"]

#: True once :func:`setup` configured OpenTelemetry in this process; every hook reads it first.
active = False

#: What every span hook hands back when tracing is off (``with`` it yields None).
OFF: AbstractContextManager[None] = contextlib.nullcontext()


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """True when the standard ``OTEL_*`` variables ask for traces (the rule in the module docstring)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {name.strip() for name in env.get("OTEL_TRACES_EXPORTER", "").lower().split(",")} - {""}
    if exporters and "otlp" not in exporters:
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
                or env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip())


def setup(service_name: str) -> bool:
    """Configure tracing in this process if :func:`enabled` (idempotent); returns :data:`active`.

    ``service_name`` is the default of ``OTEL_SERVICE_NAME`` (``sark-worker`` in workers, ``sark-client`` in
    apps). A process that already set its own ``TracerProvider`` keeps it: only Celery's instrumentation
    is added.
    """
    global active
    if active or not enabled():
        return active
    from workers import otel

    otel.configure(service_name)
    active = True
    return active


def shutdown() -> None:
    """Export the spans still buffered and stop the provider this module set up (worker shutdown)."""
    if active:
        from workers import otel

        otel.flush()


def capture() -> object | None:
    """The current trace context (in a task thread: the task's span), for :func:`invocation_span` on the
    worker's event loop, which runs in another thread; None when off."""
    if not active:
        return None
    from workers import otel

    return otel.current_context()


def invocation_span(request_id: str, parent: object | None) -> AbstractContextManager[Traced | None]:
    """The ``sark.invoke`` span of one invocation under ``parent`` (:func:`capture`); :data:`OFF` when off."""
    if not active:
        return OFF
    from workers import otel

    return otel.invocation(request_id, parent)


def gateway_span(path: str, server_id: str, *, stream: bool = False,
                 resume: bool = False) -> AbstractContextManager[Traced | None]:
    """The client span of one Gateway request (``gateway POST <path>``); its ``Traced.headers`` carry the
    trace to the Gateway. :data:`OFF` when off."""
    if not active:
        return OFF
    from workers import otel

    return otel.gateway(path, server_id, stream=stream, resume=resume)


def mcp_span(transport: str, server: str, tool: str) -> AbstractContextManager[Traced | None]:
    """The span of one MCP ``tools/call`` (session wait included); the SDK's own send span is its child and
    puts ``traceparent`` in the request's ``_meta``. :data:`OFF` when off."""
    if not active:
        return OFF
    from workers import otel

    return otel.mcp_call(transport, server, tool)

