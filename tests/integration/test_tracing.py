"""Tracing end to end (issue 16): a client's trace goes through the queue into a real worker and on to the
target, and every span arrives at a real OTLP/HTTP endpoint on loopback.

The receiver below is a minimal OTLP/HTTP collector (``POST /v1/traces``, protobuf
``ExportTraceServiceRequest``). The worker is a private one started with the standard ``OTEL_*`` variables;
the client is this process, with its own ``TracerProvider`` exporting to the same receiver.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

from devkit.stack import DevStack, Proc, wait_for
from tests.conftest import GatewayControl
from tests.helpers import settings_with
from workers import tracing
from workers.client import InvocationHandle, SarkClient
from workers.errors import ToolError

QUEUE_HTTP = "sark.traced"
QUEUE_SSE = "sark.traced-sse"
QUEUE_STDIO = "sark.traced-stdio"
MCP_QUEUE = "sark.streamable-http"


@dataclass
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]


@dataclass
class Receiver:
    """Spans received so far (appended by the server's threads)."""

    url: str
    spans: list[ReceivedSpan] = field(default_factory=list)

    def of_trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [span for span in list(self.spans) if span.trace_id == trace_id]


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path != "/v1/traces":
                self.send_response(404)
                self.end_headers()
                return
            request = ExportTraceServiceRequest.FromString(body)
            for resource_spans in request.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        receiver.spans.append(ReceivedSpan(
                            service=str(resource.get("service.name")), name=span.name,
                            trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in span.attributes}))
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


class _Switch(Sampler):
    """Samples every span while ``on``, none after."""

    on = True

    def should_sample(self, parent_context: Any, trace_id: int, name: str, kind: Any = None,
                      attributes: Any = None, links: Any = None, trace_state: Any = None) -> SamplingResult:
        return SamplingResult(Decision.RECORD_AND_SAMPLE if self.on else Decision.DROP, attributes)

    def get_description(self) -> str:
        return "test switch"


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(Receiver("")))
    received = Receiver(f"http://127.0.0.1:{server.server_address[1]}")
    server.RequestHandlerClass = _handler(received)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield received
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[str]:
    popen = subprocess.Popen([sys.executable, "-m", "devkit.mcp_http_server", "--port", "0", "--stateless"],
                             stdout=subprocess.PIPE, text=True)
    assert popen.stdout is not None
    line = popen.stdout.readline()
    assert line.startswith("READY "), line
    yield f"http://127.0.0.1:{int(line.split()[1])}/mcp"
    popen.kill()
    popen.wait(10)


@pytest.fixture(scope="module")
def traced_env(stack: DevStack, receiver: Receiver, mcp_server: str,
               tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    registry: Path = tmp_path_factory.mktemp("traced") / "servers.yaml"
    registry.write_text(f"""
servers:
  echo: {{transport: http}}
  echo-stream: {{transport: sse, server_id: echo}}
  traced-mcp: {{transport: streamable-http, url: "{mcp_server}", timeout: 10}}
  traced-stdio: {{transport: stdio, command: "{{python}}", args: ["tests/fixtures/mcp_fixture_server.py"]}}
""")
    return {"SARK_REGISTRY_PATH": str(registry), "SARK_QUEUE_HTTP": QUEUE_HTTP, "SARK_QUEUE_SSE": QUEUE_SSE,
            "SARK_QUEUE_STDIO": QUEUE_STDIO}


@pytest.fixture(scope="module")
def traced_worker(stack: DevStack, traced_env: dict[str, str], receiver: Receiver) -> Iterator[Proc]:
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    queues = ",".join((QUEUE_HTTP, QUEUE_SSE, QUEUE_STDIO, MCP_QUEUE))
    with stack.running_worker("traced", env={**traced_env, **otel}, queues=queues, concurrency=2) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(traced_env: dict[str, str], receiver: Receiver, traced_worker: Proc) -> Iterator[SarkClient]:
    """A client with tracing on: this process's own provider, then SarkClient adds Celery's instrumentation as
    for any app. Undone after the module, so no other test is traced: the instrumentation is removed and the
    provider (a process can set one only once) samples nothing from then on."""
    mp = pytest.MonkeyPatch()
    mp.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    mp.setattr(tracing, "active", False)  # restored to off afterwards
    switch = _Switch()
    provider = TracerProvider(resource=Resource.create({"service.name": "test-client"}), sampler=switch)
    exporter = SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{receiver.url}/v1/traces"))
    provider.add_span_processor(exporter)
    trace.set_tracer_provider(provider)
    assert trace.get_tracer_provider() is provider, "another test set a provider first"
    sark = SarkClient(settings_with(traced_env))
    assert tracing.active
    yield sark
    sark.close()
    CeleryInstrumentor().uninstrument()
    switch.on = False  # (the provider shuts its exporter down at exit)
    mp.undo()


def _spans(receiver: Receiver, trace_id: str, *names: str) -> dict[str, ReceivedSpan]:
    """The spans of ``trace_id`` by name, once every name in ``names`` arrived (batches come every 0.1 s)."""
    def arrived() -> bool:
        got = {span.name for span in receiver.of_trace(trace_id)}
        return all(name in got for name in names)

    wait_for(arrived, 20, f"spans {names} of trace {trace_id}", interval=0.1)
    return {span.name: span for span in receiver.of_trace(trace_id)}


def _names(traceparent: str, trace_id: str, span_id: str) -> bool:
    """``traceparent`` (W3C: version-trace-parent-flags) names that span of that trace, sampled."""
    version, trace_part, parent, flags = traceparent.split("-")
    return (version, trace_part, parent) == ("00", trace_id, span_id) and int(flags, 16) & 1 == 1


def _no_secret_in(spans: list[ReceivedSpan], *secrets: str) -> None:
    for span in spans:
        for key, value in span.attributes.items():
            for secret in secrets:
                assert secret not in str(value), f"{span.name}: attribute {key} holds a secret"


def _invoke_in_a_trace(client: SarkClient, *args: Any, **options: Any) -> tuple[InvocationHandle, str]:
    """``client.invoke(...)`` under the app's own span "client request"; the handle and its trace id (hex)."""
    with trace.get_tracer("test").start_as_current_span("client request") as root:
        handle = client.invoke(*args, **options)
        return handle, format(root.get_span_context().trace_id, "032x")


def test_one_trace_spans_client_worker_and_gateway(client: SarkClient, receiver: Receiver, user_token: str,
                                                   gateway_control: GatewayControl) -> None:
    handle, trace_id = _invoke_in_a_trace(client, "echo", "add", {"a": 20, "b": 22}, token=user_token)
    assert handle.result(timeout=30).result["structuredContent"] == {"sum": 42.0}

    spans = _spans(receiver, trace_id, "client request", "apply_async/sark.invoke", "run/sark.invoke",
                   "sark.invoke echo.add", "gateway POST /invoke")
    publish, run = spans["apply_async/sark.invoke"], spans["run/sark.invoke"]
    invoke, post = spans["sark.invoke echo.add"], spans["gateway POST /invoke"]
    # client → worker → target, each the child of the one before
    assert publish.parent_id == spans["client request"].span_id and publish.service == "test-client"
    assert run.parent_id == publish.span_id and run.service == "sark-worker"
    assert invoke.parent_id == run.span_id and invoke.service == "sark-worker"
    assert post.parent_id == invoke.span_id
    assert invoke.attributes == {"sark.request_id": handle.id, "sark.attempt": 1, "sark.server": "echo",
                                 "sark.tool": "add", "sark.transport": "http", "sark.is_error": False,
                                 "sark.outcome": "ok"}
    assert post.attributes["http.response.status_code"] == 200
    assert post.attributes["sark.gateway.server_id"] == "echo"

    # the Gateway received the trace: its traceparent names the gateway span
    seen = [h for h in gateway_control.stats()["headers"] if h.get("x-request-id") == handle.id]
    assert seen and _names(seen[-1]["traceparent"], trace_id, post.span_id)
    _no_secret_in(receiver.of_trace(trace_id), user_token, "Bearer")


def test_a_failed_invocation_is_an_error_span_with_its_code_only(client: SarkClient, receiver: Receiver,
                                                                  user_token: str) -> None:
    handle, trace_id = _invoke_in_a_trace(client, "echo", "no_such_tool", {"secret-ish": "s3cr3t-value"},
                                          token=user_token)
    with pytest.raises(ToolError) as failed:
        handle.result(timeout=30)
    assert failed.value.status_code == 404
    spans = _spans(receiver, trace_id, "sark.invoke echo.no_such_tool", "gateway POST /invoke")
    invoke = spans["sark.invoke echo.no_such_tool"]
    assert invoke.attributes["sark.outcome"] == "error"
    assert invoke.attributes["sark.error.code"] == "tool_error"
    assert spans["gateway POST /invoke"].attributes["http.response.status_code"] == 404
    _no_secret_in(receiver.of_trace(trace_id), user_token, "s3cr3t-value")


def test_mcp_servers_get_the_trace_in_meta(client: SarkClient, receiver: Receiver) -> None:
    handle, trace_id = _invoke_in_a_trace(client, "traced-mcp", "trace_meta", {})
    seen = handle.result(timeout=30).result["structuredContent"]

    spans = _spans(receiver, trace_id, "run/sark.invoke", "sark.invoke traced-mcp.trace_meta", "mcp tools/call",
                   "MCP send tools/call trace_meta")
    invoke, call = spans["sark.invoke traced-mcp.trace_meta"], spans["mcp tools/call"]
    sent = spans["MCP send tools/call trace_meta"]  # the SDK's own span: it injects _meta.traceparent
    assert invoke.parent_id == spans["run/sark.invoke"].span_id
    assert call.parent_id == invoke.span_id and sent.parent_id == call.span_id
    assert invoke.attributes["sark.transport"] == "streamable-http"
    assert _names(seen["traceparent"], trace_id, sent.span_id)


def test_a_streamed_invocation_carries_the_trace_to_the_gateway(client: SarkClient, receiver: Receiver,
                                                               user_token: str,
                                                               gateway_control: GatewayControl) -> None:
    handle, trace_id = _invoke_in_a_trace(client, "echo-stream", "stream_data", {"count": 3}, token=user_token,
                                          stream=True)
    assert [chunk.seq for chunk in handle.stream()] == [0, 1, 2]

    spans = _spans(receiver, trace_id, "sark.invoke echo-stream.stream_data", "gateway POST /invoke")
    invoke, post = spans["sark.invoke echo-stream.stream_data"], spans["gateway POST /invoke"]
    assert invoke.attributes["sark.transport"] == "sse" and post.parent_id == invoke.span_id
    assert post.attributes["sark.stream"] is True and post.attributes["sark.stream.resume"] is False
    seen = [h for h in gateway_control.stats()["headers"] if h.get("x-request-id") == handle.id]
    assert seen and _names(seen[-1]["traceparent"], trace_id, post.span_id)
    _no_secret_in(receiver.of_trace(trace_id), user_token, "Bearer")


def test_stdio_servers_get_the_trace_in_meta(client: SarkClient, receiver: Receiver) -> None:
    handle, trace_id = _invoke_in_a_trace(client, "traced-stdio", "trace_meta", {})
    seen = handle.result(timeout=30).result["structuredContent"]

    spans = _spans(receiver, trace_id, "sark.invoke traced-stdio.trace_meta", "mcp tools/call",
                   "MCP send tools/call trace_meta")
    call, sent = spans["mcp tools/call"], spans["MCP send tools/call trace_meta"]
    assert call.parent_id == spans["sark.invoke traced-stdio.trace_meta"].span_id and sent.parent_id == call.span_id
    assert call.attributes["sark.transport"] == "stdio"
    assert _names(seen["traceparent"], trace_id, sent.span_id)


def test_a_prefork_worker_traces_too(stack: DevStack, traced_env: dict[str, str], receiver: Receiver,
                                     client: SarkClient, user_token: str) -> None:
    # Tasks run in forked children: the provider set up before the fork exports from each child.
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    env = {**traced_env, "SARK_QUEUE_HTTP": "sark.traced-prefork", **otel}
    with stack.running_worker("traced-prefork", env=env, queues="sark.traced-prefork", pool="prefork",
                              concurrency=1):
        sark = SarkClient(settings_with(env))
        try:
            with trace.get_tracer("test").start_as_current_span("client request") as root:
                handle = sark.invoke("echo", "add", {"a": 1, "b": 2}, token=user_token)
                trace_id = format(root.get_span_context().trace_id, "032x")
            handle.result(timeout=30)
        finally:
            sark.close()
        spans = _spans(receiver, trace_id, "run/sark.invoke", "sark.invoke echo.add", "gateway POST /invoke")
    assert spans["sark.invoke echo.add"].parent_id == spans["run/sark.invoke"].span_id


def test_the_worker_flushes_its_spans_when_it_stops(stack: DevStack, traced_env: dict[str, str],
                                                    receiver: Receiver, user_token: str) -> None:
    # A schedule delay longer than the test: only the shutdown flush can deliver the spans.
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "600000"}
    env = {**traced_env, "SARK_QUEUE_HTTP": "sark.traced-flush", **otel}
    with stack.running_worker("traced-flush", env=env, queues="sark.traced-flush", concurrency=1):
        sark = SarkClient(settings_with(env))
        try:
            handle = sark.invoke("echo", "echo", {"text": "hi"}, token=user_token)
            handle.result(timeout=30)
        finally:
            sark.close()
        time.sleep(0.5)
        assert not [s for s in receiver.spans if s.attributes.get("sark.request_id") == handle.id]
    wait_for(lambda: any(s.attributes.get("sark.request_id") == handle.id for s in receiver.spans), 10,
             "the flushed span")
