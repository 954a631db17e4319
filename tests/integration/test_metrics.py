"""Metrics of a real worker (issue 16): invocations over http, sse and stdio through real queues, then ``/metrics``
scraped over HTTP. Counters and histograms moved under the right labels; an unknown server is one fixed label;
no token, argument value or invented name appears anywhere in the scrape."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from devkit.stack import DevStack, free_port
from tests.helpers import invoke, settings_with
from workers.errors import ServerCrashed, ToolError, UnknownServer

#: Queues of this test's own worker: nothing else consumes them.
QUEUES = {"SARK_QUEUE_HTTP": "sark.http.metrics", "SARK_QUEUE_SSE": "sark.sse.metrics",
          "SARK_QUEUE_STDIO": "sark.stdio.metrics"}
#: Looked for where it must not be: an argument value, and a name a caller invented.
CANARY = "canary-7d41e2"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def metrics_url(stack: DevStack) -> Iterator[str]:
    port = free_port()
    env = {**QUEUES, "SARK_METRICS_PORT": str(port)}
    with stack.running_worker("metrics", env=env, queues=",".join(QUEUES.values()), concurrency=4):
        yield f"http://127.0.0.1:{port}/metrics"


@pytest.fixture(scope="module")
def app(stack: DevStack) -> Iterator[Celery]:
    from workers.app import create_app

    celery = create_app(settings_with(QUEUES))
    yield celery
    celery.close()


def _scrape(url: str) -> tuple[str, Samples]:
    response = httpx.get(url, timeout=5)
    response.raise_for_status()
    text = response.text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return text, samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_a_scrape_shows_what_the_worker_did_and_nothing_secret(metrics_url: str, app: Celery,
                                                               user_token: str) -> None:
    _, before = _scrape(metrics_url)
    assert _value(before, "sark_invocations_in_flight") == 0.0
    assert not [key for key in before if key[0] == "sark_invocations_total"]

    tools = app.send_task("sark.list_tools", kwargs={"server": "echo"}).get(timeout=30)  # lists: label values
    assert "tool_error" in {t["tool_name"] for t in tools}
    assert invoke(app, "echo", "add", {"a": 1, "b": 2}, token=user_token)["is_error"] is False
    assert invoke(app, "echo", "echo", {"secret": CANARY}, token=user_token)["is_error"] is False
    assert invoke(app, "echo", "tool_error", {"message": CANARY}, token=user_token)["is_error"] is True
    with pytest.raises(ToolError):
        invoke(app, "echo", "fail", {"status": 502, "message": CANARY}, token=user_token)
    with pytest.raises(ToolError):  # a tool name the caller invented: never a label
        invoke(app, "echo", f"nope-{CANARY}", {}, token=user_token)
    with pytest.raises(UnknownServer):  # a server name the caller invented: the fixed label
        invoke(app, f"no-such-server-{CANARY}", "x", {"v": CANARY}, token=user_token)
    streamed = invoke(app, "echo-stream", "stream_data", {"count": 3, "interval": 0.001}, token=user_token,
                      stream=True)
    assert streamed["chunks"] == 3
    invoke(app, "time", "get_current_time", {"timezone": "UTC"}, token=user_token)
    with pytest.raises(ServerCrashed):
        invoke(app, "fixture-exits", "echo", {}, token=user_token)

    text, after = _scrape(metrics_url)
    total = "sark_invocations_total"
    assert _value(after, total, server="echo", tool="add", transport="http", outcome="ok") == 1
    assert _value(after, total, server="echo", tool="echo", transport="http", outcome="ok") == 1
    assert _value(after, total, server="echo", tool="tool_error", transport="http", outcome="is_error") == 1
    assert _value(after, total, server="echo", tool="fail", transport="http", outcome="tool_error") == 1
    assert _value(after, total, server="echo", tool="other", transport="http", outcome="tool_error") == 1
    assert _value(after, total, server="unknown", tool="other", transport="unknown", outcome="unknown_server") == 1
    assert _value(after, total, server="echo-stream", tool="stream_data", transport="sse", outcome="ok") == 1
    assert _value(after, total, server="time", tool="get_current_time", transport="stdio", outcome="ok") == 1
    assert _value(after, total, server="fixture-exits", tool="other", transport="stdio",
                  outcome="server_crashed") == 1
    assert _value(after, "sark_invocation_duration_seconds_count", server="echo", transport="http") == 5
    assert _value(after, "sark_invocation_duration_seconds_bucket", server="echo", transport="http", le="+Inf") == 5
    assert _value(after, "sark_invocation_duration_seconds_sum", server="echo", transport="http") > 0
    # Every invocation, the unknown server's included, came through a queue with the app's stamp.
    waits = {queue: _value(after, "sark_queue_wait_seconds_count", queue=queue) for queue in QUEUES.values()}
    assert waits == {"sark.http.metrics": 6, "sark.sse.metrics": 1, "sark.stdio.metrics": 2}
    assert 0 < _value(after, "sark_queue_wait_seconds_sum", queue="sark.http.metrics") < 60
    assert _value(after, "sark_invocations_in_flight") == 0
    assert _value(after, "sark_stream_chunks_total", server="echo-stream", transport="sse") == 3
    assert _value(after, "sark_session_starts_total", transport="stdio", server="time") == 1
    assert _value(after, "sark_session_failures_total", transport="stdio", server="fixture-exits") >= 1
    assert ("sark_breaker_state", frozenset({("target", "gateway:echo")})) in after
    assert _value(after, "sark_breaker_state", target="gateway:echo") == 0  # closed

    assert "_created" not in text  # half the series, unread by Prometheus by default
    assert CANARY not in text  # no argument value, no invented server or tool name
    assert user_token not in text and user_token.split(".")[1] not in text
    assert "no-such-server" not in text and "nope-" not in text
