"""Tracing is off without ``OTEL_*`` settings, and then costs no import and no work (workers/tracing.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from workers import tracing

ENDPOINT = "http://127.0.0.1:4318"


@pytest.mark.parametrize(("environ", "on"), [
    ({}, False),
    ({"OTEL_SERVICE_NAME": "x"}, False),  # no endpoint: nowhere to send
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ENDPOINT + "/v1/traces"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_TRACES_EXPORTER": "otlp"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_TRACES_EXPORTER": "none"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_TRACES_EXPORTER": "console"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_TRACES_EXPORTER": "console, OTLP"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_TRACES_EXPORTER": ""}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_SDK_DISABLED": "TRUE"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_SDK_DISABLED": "false"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
])
def test_the_rule_for_on(environ: dict[str, str], on: bool) -> None:
    assert tracing.enabled(environ) is on


def test_off_the_hooks_hand_back_one_shared_nothing() -> None:
    assert not tracing.active  # no test of this process turns it on for good (the integration test resets it)
    assert tracing.capture() is None
    assert tracing.invocation_span("id", None) is tracing.OFF
    assert tracing.gateway_span("/invoke", "echo") is tracing.OFF
    assert tracing.mcp_span("stdio", "time", "get_current_time") is tracing.OFF
    with tracing.OFF as traced:
        assert traced is None


#: Modules that mean OpenTelemetry work: our own OTel module, the SDK's tracing, the exporter, the
#: instrumentation, the propagators. (redis-py imports the API's metrics, and the SDK's metrics when the SDK is
#: installed, at its own import whatever we do; the mcp SDK imports the API's trace and propagate: those are
#: theirs, and without a provider they do nothing.)
FORBIDDEN = ("workers.otel", "opentelemetry.sdk.trace", "opentelemetry.exporter", "opentelemetry.instrumentation",
             "opentelemetry.propagate", "opentelemetry.propagators")


def test_without_otel_variables_the_worker_and_client_import_nothing_of_tracing() -> None:
    code = """
import sys
from workers import tracing
import workers.app as app
import tasks.invoke, workers.invoker, workers.transports.http, workers.transports.sse, workers.gateway.client
from workers.client import SarkClient
app._start_tracing()          # what worker_init and worker_process_init run
SarkClient()                  # what an enqueuing app runs
assert not tracing.active
assert tracing.invocation_span("t", tracing.capture()) is tracing.OFF
assert tracing.gateway_span("/invoke", "echo") is tracing.OFF
app._flush_traces()
print(sorted(m for m in sys.modules if m.startswith(FORBIDDEN)))
""".replace("FORBIDDEN", repr(FORBIDDEN))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_with_otel_variables_a_client_turns_tracing_on() -> None:
    code = """
import sys
from workers import tracing
from workers.client import SarkClient
SarkClient()
from opentelemetry.instrumentation.celery import CeleryInstrumentor
print(tracing.active, CeleryInstrumentor().is_instrumented_by_opentelemetry)
tracing.shutdown()
"""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
           "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_BSP_SCHEDULE_DELAY": "60000"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True"]
