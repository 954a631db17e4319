"""The worker's metrics (workers/metrics.py): bounded labels, queue wait, breaker states, the enqueue stamp, and a
Grafana dashboard whose every query names a metric the code registers."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from celery.signals import before_task_publish
from prometheus_client import generate_latest

from workers.contract import ENQUEUED_HEADER, TASK_INVOKE, TASK_LIST_TOOLS
from workers.metrics import METRICS, OTHER, UNKNOWN, InvocationLabels, Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "sark-workers.json"

#: Sample names a family of each type exposes (prometheus_client's text format; ``_created`` is not queried).
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "summary": (
    "", "_sum", "_count")}
#: PromQL words that are not metric names.
_PROMQL = {
    "sum", "min", "max", "avg", "count", "rate", "irate", "increase", "histogram_quantile", "by", "without",
    "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool", "topk", "bottomk",
    "clamp_min", "clamp_max", "abs", "delta", "deriv", "label_replace", "vector", "scalar", "time", "absent",
}


def _samples(metrics: Metrics) -> set[str]:
    """Every sample name the registry may expose, from its families' types (labelled ones have none until used)."""
    names = set()
    for family in metrics.registry.collect():
        names |= {family.name + suffix for suffix in _SUFFIXES[family.type]}
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label matchers, ranges, strings and grouping labels removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text))
    return {word for word in words if word not in _PROMQL}


def _exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_every_dashboard_query_names_a_metric_the_code_registers() -> None:
    exposed = _samples(METRICS)
    exprs = _exprs()
    assert len(exprs) >= 9
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= exposed, f"{expr!r} reads {sorted(names - exposed)}, not exported by workers/metrics.py"


def test_every_sark_metric_is_on_the_dashboard() -> None:
    read = set().union(*(metric_names(expr) for expr in _exprs()))
    for family in METRICS.registry.collect():
        if not family.name.startswith("sark_"):
            continue  # process_* and python_info: the dashboard shows CPU and memory only
        assert any(name.startswith(family.name) for name in read), f"{family.name} is on no panel"


def test_the_name_check_is_strict() -> None:
    assert metric_names('histogram_quantile(0.95, sum by (le, queue) (rate(sark_queue_wait_seconds_bucket'
                        '{queue=~"a|b"}[$__rate_interval])))') == {"sark_queue_wait_seconds_bucket"}
    exposed = _samples(METRICS)
    assert "sark_invocations_total" in exposed and "sark_invocation_duration_seconds_bucket" in exposed
    assert "sark_invocations_in_flight_total" not in exposed  # a gauge has no _total
    assert "sark_invocations_bucket" not in exposed  # a counter has no buckets


def _scrape(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def _ended(metrics: Metrics, server: str, tool: str | None, transport: str, outcome: str) -> None:
    labels = metrics.invocation_started()
    labels.server, labels.tool, labels.transport = server, tool, transport
    metrics.invocation_ended(labels, outcome)


def test_an_unknown_server_is_one_label_and_a_tool_becomes_one_only_once_proven() -> None:
    metrics = Metrics()
    for i in range(50):  # a caller inventing names: one series, whatever the names
        _ended(metrics, UNKNOWN, f"bogus-{i}", UNKNOWN, "unknown_server")
    _ended(metrics, "echo", "nope", "http", "tool_error")  # refused: not proven
    _ended(metrics, "echo", "nope", "http", "is_error")  # MCP servers answer unknown tools so: not proven
    _ended(metrics, "echo", "add", "http", "ok")
    _ended(metrics, "echo", "add", "http", "tool_error")  # proven once: its own label from now on
    text = _scrape(metrics)
    assert 'sark_invocations_total{outcome="unknown_server",server="unknown",tool="other",transport="unknown"} 50.0' \
        in text
    assert "bogus" not in text and "nope" not in text
    assert 'sark_invocations_total{outcome="ok",server="echo",tool="add",transport="http"} 1.0' in text
    assert 'sark_invocations_total{outcome="tool_error",server="echo",tool="add",transport="http"} 1.0' in text
    assert 'sark_invocations_total{outcome="is_error",server="echo",tool="other",transport="http"} 1.0' in text
    assert 'sark_invocation_duration_seconds_count{server="echo",transport="http"} 4.0' in text
    assert "sark_invocations_in_flight 0.0" in text


def test_tools_per_server_are_capped() -> None:
    metrics = Metrics(max_tools=3)
    for i in range(10):  # a server that answers any name (an echo)
        _ended(metrics, "echo", f"t{i}", "http", "ok")
    metrics.admit_tools("echo", ["listed"])
    text = _scrape(metrics)
    assert {f"t{i}" for i in range(3)} == set(re.findall(r'tool="(t\d)"', text))
    assert 'sark_invocations_total{outcome="ok",server="echo",tool="other",transport="http"} 7.0' in text
    assert 'tool="listed"' not in text
    assert metrics.tool_label("time", None) == OTHER
    metrics.admit_tools("time", ["get_current_time"])  # a listing proves tools too
    assert metrics.tool_label("time", "get_current_time") == "get_current_time"
    metrics.admit_tools(UNKNOWN, ["x"])
    assert metrics.tool_label(UNKNOWN, "x") == OTHER


def test_queue_wait_is_clamped_and_needs_the_header() -> None:
    metrics = Metrics()
    metrics.queue_waited(100.0, "sark.http", now=100.25)
    metrics.queue_waited(200.0, "sark.http", now=100.0)  # the publisher's clock is ahead: 0, not negative
    for missing in (None, "100", True, float("nan")):
        metrics.queue_waited(missing, "sark.http", now=100.0)
    text = _scrape(metrics)
    assert 'sark_queue_wait_seconds_count{queue="sark.http"} 2.0' in text
    assert 'sark_queue_wait_seconds_sum{queue="sark.http"} 0.25' in text
    assert 'sark_queue_wait_seconds_bucket{le="0.001",queue="sark.http"} 1.0' in text


def test_breaker_states_are_read_at_scrape_and_a_failing_read_only_drops_them() -> None:
    metrics = Metrics()
    assert "sark_breaker_state{" not in _scrape(metrics)
    metrics.watch_breakers(lambda: [("gateway:echo", "closed"), ("stdio:time", "half-open"), ("gateway:x", "open")])
    text = _scrape(metrics)
    assert 'sark_breaker_state{target="gateway:echo"} 0.0' in text
    assert 'sark_breaker_state{target="stdio:time"} 1.0' in text
    assert 'sark_breaker_state{target="gateway:x"} 2.0' in text

    def down() -> list[tuple[str, str]]:
        raise ConnectionError("redis is down")

    metrics.watch_breakers(down)
    text = _scrape(metrics)
    assert "sark_breaker_state{" not in text and "sark_invocations_in_flight" in text


def test_chunks_are_counted_once_accepted() -> None:
    asyncio.run(_count_chunks())


async def _count_chunks() -> None:
    metrics = Metrics()
    seen: list[int] = []

    async def sink(chunk: int) -> None:
        if chunk > 2:
            raise ValueError("over the cap")
        seen.append(chunk)

    counted = metrics.counting_chunks(sink, "echo-stream", "sse")
    for chunk in (1, 2):
        await counted(chunk)
    with pytest.raises(ValueError):
        await counted(3)
    assert seen == [1, 2]
    assert 'sark_stream_chunks_total{server="echo-stream",transport="sse"} 2.0' in _scrape(metrics)


def test_sessions_are_counted_per_server() -> None:
    metrics = Metrics()
    metrics.session_started("stdio", "time")
    metrics.session_started("stdio", "time")
    metrics.session_failed("stdio", "time")
    text = _scrape(metrics)
    assert 'sark_session_starts_total{server="time",transport="stdio"} 2.0' in text
    assert 'sark_session_failures_total{server="time",transport="stdio"} 1.0' in text


def test_labels_start_unknown() -> None:
    labels = InvocationLabels()
    assert (labels.server, labels.tool, labels.transport) == (UNKNOWN, None, UNKNOWN)


def test_every_invoke_published_by_the_app_is_stamped_when_due() -> None:
    import workers.app  # noqa: F401 - connects the handler, as every app built from it has it

    headers: dict[str, object] = {"eta": None}
    before = datetime.now(UTC).timestamp()
    before_task_publish.send(sender=TASK_INVOKE, headers=headers)
    stamped = headers[ENQUEUED_HEADER]
    assert isinstance(stamped, float) and before <= stamped <= datetime.now(UTC).timestamp()
    later = datetime.now(UTC) + timedelta(seconds=30)  # a re-queue with a countdown is due at its ETA
    headers = {"eta": later.isoformat(), ENQUEUED_HEADER: 1.0}
    before_task_publish.send(sender=TASK_INVOKE, headers=headers)
    assert headers[ENQUEUED_HEADER] == pytest.approx(later.timestamp())
    other: dict[str, object] = {}
    before_task_publish.send(sender=TASK_LIST_TOOLS, headers=other)
    assert other == {}


def test_off_until_served_records_nothing() -> None:
    metrics = Metrics(enabled=False)

    async def sink(chunk: int) -> None:
        return None

    assert metrics.counting_chunks(sink, "echo-stream", "sse") is sink  # no wrapper on the chunk path
    labels = metrics.invocation_started()
    metrics.enabled = True  # turned on mid-invocation: that invocation was not counted in flight, nor is it now
    metrics.invocation_ended(labels, "ok")
    metrics.enabled = False
    metrics.queue_waited(1.0, "sark.http")
    metrics.session_started("stdio", "time")
    metrics.admit_tools("echo", ["add"])
    text = _scrape(metrics)
    assert "sark_invocations_in_flight 0.0" in text
    assert not re.search(r"^sark_(invocations_total|queue_wait_seconds_count|session_starts_total)\{", text, re.M)
    assert metrics.tool_label("echo", "add") == OTHER


def test_serving_turns_recording_on_and_a_taken_port_is_only_logged(caplog: pytest.LogCaptureFixture) -> None:
    import socket

    import httpx

    from devkit.stack import free_port
    from workers.metrics import serve

    metrics = Metrics(enabled=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert serve(taken.getsockname()[1], "127.0.0.1", metrics) is False
    assert not metrics.enabled and "exports no metrics" in caplog.text
    port = free_port()
    assert serve(port, "127.0.0.1", metrics) is True
    assert metrics.enabled
    metrics.queue_waited(1.0, "sark.http", now=1.5)
    scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert 'sark_queue_wait_seconds_count{queue="sark.http"} 1.0' in scraped
