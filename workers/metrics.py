"""Prometheus metrics of a worker process, served on ``SARK_METRICS_PORT`` (0: not served).

Every metric lives in one private :class:`~prometheus_client.CollectorRegistry` (:data:`METRICS`): a
library must not fill the default registry of the app that imports it, and tests build their own
:class:`Metrics`. There is one set per process, like the runtime: the hooks are called from modules that
hold no reference to the runtime (the session pools of the transports), and prometheus_client's own
metrics are process-wide objects anyway. :data:`METRICS` records nothing until :func:`serve` runs (a worker
with ``SARK_METRICS_PORT`` set): every hook returns at once before that, so a worker without metrics runs the
code it ran before they existed (``bench/metrics_bench.py`` measures both in one run).

Metrics (labels in braces)::

    sark_invocations_total{server,tool,transport,outcome}    invocations ended, by outcome
    sark_invocation_duration_seconds{server,transport}       from the start of the task to its outcome
    sark_queue_wait_seconds{queue}                           start - the message's sark_enqueued_at header
    sark_invocations_in_flight                               invocations being carried out now
    sark_breaker_state{target}                               0 closed, 1 half-open, 2 open (read from Redis)
    sark_session_starts_total{transport,server}              MCP sessions started (stdio processes, ...)
    sark_session_failures_total{transport,server}            sessions that failed to start or crashed
    sark_stream_chunks_total{server,transport}               chunks published to invocation streams

``outcome`` is ``ok``, ``is_error`` (the tool answered with its own ``isError``) or the
:class:`~workers.errors.SarkError` code (``tool_error`` is a :class:`~workers.errors.ToolError`: a 4xx/5xx or
JSON-RPC error, which is why the tool's own error is not called that too).

**Labels stay bounded, and hold no secret.** No token, argument value or error text is ever a label:

* ``server`` is a registry name, or :data:`UNKNOWN` for a name the registry does not have (the caller
  chooses it: one series per bogus name would let any caller grow every scrape without bound).
* ``tool`` is chosen by the caller too. A tool name becomes a label value once this process has seen that
  server answer it without error (outcome ``ok``) or list it; until then it is :data:`OTHER`. An
  ``is_error`` answer does not count: MCP servers answer an unknown tool that way. Even so a server may
  answer any name (an echo), so each server gets at most ``max_tools`` names (:data:`MAX_TOOLS_PER_SERVER`),
  the rest are :data:`OTHER`.
* ``transport``, ``outcome``, ``target``, ``queue``: the catalog's names, the error codes, the registry's
  breaker targets, the queues this worker consumes; capped all the same (:class:`_Bounded`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "BREAKER_STATES",
    "MAX_TOOLS_PER_SERVER",
    "METRICS",
    "OTHER",
    "UNKNOWN",
    "InvocationLabels",
    "Metrics",
    "serve",
]

log = logging.getLogger("sark.metrics")

T = TypeVar("T")

#: Label of a server the registry does not name (and of a transport not resolved yet).
UNKNOWN = "unknown"
#: Label of a tool (or other value) past its bound, or not yet proven by the server.
OTHER = "other"
#: Tool names kept as labels per server; the others are :data:`OTHER`.
MAX_TOOLS_PER_SERVER = 100
#: Distinct values kept for a label chosen by the operator (transports, queues, targets, codes).
_MAX_VALUES = 1_000
#: ``sark_breaker_state`` values.
BREAKER_STATES = {"closed": 0.0, "half-open": 1.0, "open": 2.0}

# Invocations last from milliseconds (a warm stdio call) to the 600 s maximum timeout.
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# A healthy queue waits about a millisecond; a backlog minutes.
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class _Bounded:
    """At most ``limit`` distinct values of one label; later ones become :data:`OTHER` (logged once)."""

    def __init__(self, name: str, limit: int = _MAX_VALUES) -> None:
        self._name = name
        self._limit = limit
        self._seen: set[str] = set()
        self._warned = False

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            if not self._warned:
                self._warned = True
                log.warning("metrics: more than %d values of label %s; the others are counted as %r",
                            self._limit, self._name, OTHER)
            return OTHER
        self._seen.add(value)  # a race between threads may let one or two more in: still bounded
        return value


@dataclass(slots=True)
class InvocationLabels:
    """What an invocation's metrics are labelled with, filled in as the invocation is resolved."""

    #: A registry name, or :data:`UNKNOWN`.
    server: str = UNKNOWN
    #: As asked by the caller (bounded when recorded), or None before the invocation was parsed.
    tool: str | None = None
    transport: str = UNKNOWN
    started: float = field(default_factory=time.perf_counter)
    #: Counted in flight at its start (metrics were on): :meth:`Metrics.invocation_ended` records it.
    counted: bool = False


class _BreakerCollector(Collector):
    """``sark_breaker_state``, read at scrape time from the fleet's breakers (off the invocations' path)."""

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[tuple[str, str]]] | None = None

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        source = self.source
        if source is not None:
            try:
                states = list(source())
            except Exception as exc:  # Redis down, the worker stopping: no samples, never a failed scrape
                log.debug("metrics: breaker states unavailable (%s)", type(exc).__name__)
                states = []
            for target, state in states:
                family.add_metric([target], BREAKER_STATES.get(state, 2.0))
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("sark_breaker_state", "Circuit breaker of each target: 0 closed, 1 half-open, "
                                 "2 open (the fleet's state, in Redis)", labels=["target"])


class Metrics:
    """The metrics of one process, in their own registry (``registry``: a fresh one by default).

    Args:
        enabled: Record (False: every hook returns at once; :func:`serve` turns :data:`METRICS` on).
        max_tools: Tool names kept as labels per server.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, enabled: bool = True,
                 max_tools: int = MAX_TOOLS_PER_SERVER) -> None:
        self.enabled = enabled
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.invocations = Counter("sark_invocations", "Invocations ended, by outcome (ok, is_error or the "
                                   "SarkError code)", ["server", "tool", "transport", "outcome"], registry=r)
        self.duration = Histogram("sark_invocation_duration_seconds", "Seconds from the start of an invocation "
                                  "in the worker to its outcome", ["server", "transport"], buckets=_DURATION_BUCKETS,
                                  registry=r)
        self.queue_wait = Histogram("sark_queue_wait_seconds", "Seconds an invocation waited in its queue (start "
                                    "- sark_enqueued_at header)", ["queue"], buckets=_WAIT_BUCKETS, registry=r)
        self.in_flight = Gauge("sark_invocations_in_flight", "Invocations being carried out in this process",
                               registry=r)
        self.session_starts = Counter("sark_session_starts", "MCP sessions started (a stdio server process, a "
                                      "streamable-http session)", ["transport", "server"], registry=r)
        self.session_failures = Counter("sark_session_failures", "MCP sessions that failed to start or died "
                                        "(a stdio server crashed)", ["transport", "server"], registry=r)
        self.stream_chunks = Counter("sark_stream_chunks", "Chunks published to invocation streams",
                                     ["server", "transport"], registry=r)
        self.breakers = _BreakerCollector()
        r.register(self.breakers)
        # The worker process itself (CPU, memory, open files; the Python version), as the default registry has.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self._max_tools = max_tools
        self._tools: dict[str, set[str]] = {}
        self._tools_warned: set[str] = set()
        self._transport = _Bounded("transport")
        self._outcome = _Bounded("outcome")
        self._queue = _Bounded("queue")
        self._waits: dict[str, Histogram] = {}
        # Children by label values: a dict lookup instead of prometheus_client's lock in .labels() per call.
        self._ended: dict[tuple[str, str, str, str], tuple[Counter, Histogram]] = {}

    # --- label bounds ---------------------------------------------------------------------------------
    def tool_label(self, server: str, tool: str | None) -> str:
        """``tool`` if this server proved it (see the module docstring), else :data:`OTHER`."""
        if tool is None or server == UNKNOWN:
            return OTHER
        known = self._tools.get(server)
        return tool if known is not None and tool in known else OTHER

    def admit_tools(self, server: str, tools: Iterable[str]) -> None:
        """``server`` (a registry name) has ``tools``: they become label values, up to the bound."""
        if server == UNKNOWN or not self.enabled:
            return
        known = self._tools.setdefault(server, set())
        for tool in tools:
            if tool in known:
                continue
            if len(known) >= self._max_tools:
                if server not in self._tools_warned:
                    self._tools_warned.add(server)
                    log.warning("metrics: server %s answered more than %d tool names; the others are counted "
                                "as %r", server, self._max_tools, OTHER)
                return
            known.add(tool)

    # --- hooks ----------------------------------------------------------------------------------------
    def invocation_started(self) -> InvocationLabels:
        """An invocation starts in this process: fill the labels in, then :meth:`invocation_ended`."""
        labels = InvocationLabels()
        if self.enabled:
            labels.counted = True
            self.in_flight.inc()
        return labels

    def invocation_ended(self, labels: InvocationLabels, outcome: str) -> None:
        """Count the invocation under ``outcome`` and observe its duration."""
        if not labels.counted:
            return
        self.in_flight.dec()
        if outcome == "ok" and labels.tool is not None:
            known = self._tools.get(labels.server)
            if known is None or labels.tool not in known:
                self.admit_tools(labels.server, (labels.tool,))
        key = (labels.server, self.tool_label(labels.server, labels.tool), labels.transport, outcome)
        children = self._ended.get(key)
        if children is None:
            server, tool, transport, code = key
            transport, code = self._transport(transport), self._outcome(code)
            children = (self.invocations.labels(server, tool, transport, code),
                        self.duration.labels(server, transport))
            if len(self._ended) < 4 * _MAX_VALUES:  # the cache is bounded too; past it, prometheus' lookup
                self._ended[key] = children
        counter, histogram = children
        counter.inc()
        histogram.observe(time.perf_counter() - labels.started)

    def queue_waited(self, enqueued_at: object, queue: object, now: float | None = None) -> None:
        """Observe ``now - enqueued_at`` (clamped at 0: clocks differ between hosts) for a message that
        carried the ``sark_enqueued_at`` header; nothing when it did not (plain Celery apps)."""
        if not self.enabled:
            return
        if isinstance(enqueued_at, bool) or not isinstance(enqueued_at, int | float) or not math.isfinite(enqueued_at):
            return
        waited = max(0.0, (time.time() if now is None else now) - float(enqueued_at))
        name = queue if isinstance(queue, str) else UNKNOWN
        child = self._waits.get(name)
        if child is None:
            child = self.queue_wait.labels(self._queue(name))
            if len(self._waits) < _MAX_VALUES:
                self._waits[name] = child
        child.observe(waited)

    def session_started(self, transport: str, server: str) -> None:
        """A session (generation) of ``server`` starts."""
        if self.enabled:
            self.session_starts.labels(self._transport(transport), server).inc()

    def session_failed(self, transport: str, server: str) -> None:
        """A session of ``server`` failed to start or died."""
        if self.enabled:
            self.session_failures.labels(self._transport(transport), server).inc()

    def counting_chunks(self, sink: Callable[[T], Awaitable[None]], server: str,
                        transport: str) -> Callable[[T], Awaitable[None]]:
        """``sink`` counting each chunk it accepted (``sink`` itself when metrics are off)."""
        if not self.enabled:
            return sink
        child = self.stream_chunks.labels(server, self._transport(transport))

        async def counted(chunk: T) -> None:
            await sink(chunk)
            child.inc()

        return counted

    def watch_breakers(self, source: Callable[[], Iterable[tuple[str, str]]] | None) -> None:
        """Where ``sark_breaker_state`` reads ``(target, state)`` pairs at each scrape (None: no samples)."""
        self.breakers.source = source

    def names(self) -> set[str]:
        """Every metric family name this registry exposes (``sark_invocations``, ``sark_breaker_state``…)."""
        return {metric.name for metric in self.registry.collect()}


#: The metrics of this process (off until :func:`serve`).
METRICS = Metrics(enabled=False)

_served: tuple[object, threading.Thread] | None = None


def serve(port: int, address: str, metrics: Metrics = METRICS) -> bool:
    """Serve ``/metrics`` on ``address:port`` in a daemon thread (once per process) and start recording;
    False when the port cannot be bound (logged: the worker carries on without metrics rather than not at all)."""
    global _served
    if _served is not None:
        return True
    # No `*_created` series beside every counter and histogram (half the series; Prometheus does not read them
    # by default). A process-wide switch of prometheus_client: this is the worker's own process.
    disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client 0.26
    try:
        _served = start_http_server(port, addr=address, registry=metrics.registry)
    except OSError as exc:
        log.error("metrics: cannot serve on %s:%d (%s); this worker exports no metrics", address, port, exc)
        return False
    metrics.enabled = True
    log.info("metrics served on http://%s:%d/metrics", address, port, extra={"event": "metrics.serving"})
    return True

