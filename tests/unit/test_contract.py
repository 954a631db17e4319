"""Unit tests of the public contract: API surface, errors, schemas, settings, registry, routing."""

from __future__ import annotations

from pathlib import Path

import pytest
from celery.backends.base import Backend

import workers
from config.registry import RegistryError, StdioServer, load_registry
from config.settings import Settings
from workers import errors
from workers.models import Chunk, parse_invocation

PUBLIC_API = {
    "TASK_BREAKERS", "TASK_GET_SERVER", "TASK_HEALTH", "TASK_INVOKE", "TASK_LIST_SERVERS", "TASK_LIST_TOOLS",
    "TOKEN_HEADER", "OPERATOR_HEADER", "ENQUEUED_HEADER", "AlreadyRunning", "AsyncSarkClient", "AuthenticationFailed",
    "AuthorizationDenied", "Cancelled", "Chunk", "CircuitOpen", "DiscoveryTimeout", "ResultTooLarge",
    "GatewayServerInfo", "GatewayToolInfo", "GatewayUnavailable", "ServerUnavailable", "InternalError",
    "InvalidInvocation",
    "InvalidToken", "Invocation", "NotServedHere",
    "InvocationHandle", "InvocationResult", "InvocationTimeout", "PayloadTooLarge", "ProtocolError", "SarkClient",
    "SarkError", "ServerCrashed", "StoreUnavailable", "TokenExpired", "ToolError", "TransportError", "UnknownServer",
    "__version__",
    "stream", "astream",
}


def test_public_api_is_stable() -> None:
    assert set(workers.__all__) == PUBLIC_API
    for name in workers.__all__:
        assert getattr(workers, name) is not None


def test_task_names_are_stable() -> None:
    assert (workers.TASK_INVOKE, workers.TASK_LIST_SERVERS, workers.TASK_LIST_TOOLS, workers.TASK_HEALTH) == (
        "sark.invoke", "sark.list_servers", "sark.list_tools", "sark.health")
    assert workers.TOKEN_HEADER == "sark_token"
    assert workers.ENQUEUED_HEADER == "sark_enqueued_at"


@pytest.mark.parametrize(
    "exc",
    [
        errors.ToolError("boom", status_code=502),
        errors.InvocationTimeout("slow"),
        errors.AuthorizationDenied("no", {"status_code": 403}),
        errors.CircuitOpen("open", {"retry_after": 12.5}),
        errors.AlreadyRunning("invocation x is being carried out by another worker; this delivery waits for it",
                              {"request_id": "x", "retry_after": 7.5}),
        errors.PayloadTooLarge("big", {"limit": 10, "size": 11}),
        errors.ResultTooLarge("result is 11 bytes, limit is 10", {"limit": 10, "size": 11, "what": "result"}),
        errors.AuthenticationFailed("Authentication failed: invalid token", {"status_code": 401}),
        errors.DiscoveryTimeout("Gateway did not answer GET /tools within 5s"),
        errors.ServerCrashed("died"),
        errors.InvalidToken("the token is empty"),
        errors.StoreUnavailable("cannot publish to stream", {"what": "stream", "reached_target": False}),
        errors.InternalError("internal error in the worker (TypeError); see the worker log"),
    ],
)
def test_errors_survive_celery_json_backend(exc: errors.SarkError) -> None:
    from celery import Celery

    backend = Backend(app=Celery(set_as_current=False), serializer="json")
    stored = backend.prepare_exception(exc, "json")
    rebuilt = backend.exception_to_python(stored)
    assert type(rebuilt) is type(exc)
    assert str(rebuilt) == str(exc)
    assert rebuilt.detail == exc.detail
    assert errors.error_from_dict(exc.to_dict()).to_dict() == exc.to_dict()


def test_error_classification() -> None:
    assert issubclass(errors.InvocationTimeout, errors.TransportError)
    assert not issubclass(errors.InvocationTimeout, errors.ToolError)
    assert errors.InvocationTimeout("t").counts_as_failure
    assert errors.ToolError("x", status_code=503).counts_as_failure
    assert not errors.ToolError("x", status_code=404).counts_as_failure
    assert errors.GatewayUnavailable("x").counts_as_failure
    assert not errors.AuthorizationDenied("x").counts_as_failure
    assert issubclass(errors.UnknownServer, errors.InvalidInvocation)
    assert errors.CircuitOpen("o", {"retry_after": 3}).retry_after == 3
    assert errors.AlreadyRunning("a", {"retry_after": 2.5}).retry_after == 2.5
    assert not errors.AlreadyRunning("a").counts_as_failure


def test_invalid_invocation_never_echoes_values() -> None:
    with pytest.raises(errors.InvalidInvocation) as info:
        parse_invocation({"server": "s", "tool": "t", "token": "secret-token-value"}, max_argument_bytes=100)
    assert "secret-token-value" not in str(info.value)
    assert "token" in str(info.value)
    with pytest.raises(errors.PayloadTooLarge):
        parse_invocation({"server": "s", "tool": "t", "arguments": {"x": "y" * 200}}, max_argument_bytes=100)


def test_chunk_schema() -> None:
    chunk = Chunk(seq=0, event_id="1", data={"a": 1})
    assert set(chunk.model_dump()) == {"seq", "event_id", "event_type", "data", "retry", "ts"}


def test_settings_refuse_timeouts_above_visibility() -> None:
    with pytest.raises(ValueError, match="visibility_timeout"):
        Settings(visibility_timeout=100, max_invoke_timeout=90, invoke_timeout=10)
    assert Settings(visibility_timeout=1000, max_invoke_timeout=100).queue_for("stdio") == "sark.stdio"


def test_registry_expands_placeholders_and_refuses_unknown_keys(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("servers:\n  t:\n    transport: stdio\n    command: '{bin}/mcp-server-time'\n")
    server = load_registry(good).get("t")
    assert isinstance(server, StdioServer) and Path(server.command).is_absolute()
    bad = tmp_path / "bad.yaml"
    bad.write_text("servers:\n  t:\n    transport: http\n    colour: blue\n")
    with pytest.raises(RegistryError, match="colour"):
        load_registry(bad)
    with pytest.raises(RegistryError):
        load_registry(tmp_path / "missing.yaml")


def test_router_sends_invocations_to_their_transport_queue() -> None:
    from workers.app import InvocationRouter

    router = InvocationRouter(Settings())
    route = lambda inv: router("sark.invoke", (), {"invocation": inv}, {})  # noqa: E731
    assert route({"server": "echo", "tool": "x"}) == {"queue": "sark.http"}
    assert route({"server": "echo", "tool": "x", "stream": True}) == {"queue": "sark.sse"}
    assert route({"server": "whatever", "tool": "x", "transport": "stdio"}) == {"queue": "sark.stdio"}
    assert router("sark.health", (), {}, {}) == {"queue": "sark.http"}


def test_a_client_does_not_load_the_runtime_nor_the_mcp_sdk() -> None:
    import subprocess
    import sys

    heavy = ("mcp", "httpx", "anyio", "starlette", "workers.runtime", "workers.transports", "workers.gateway",
             "workers.breaker", "workers.streams", "devkit")
    code = ("import sys; from workers.client import SarkClient; c = SarkClient(); "
            "c.app.amqp.router.route({}, 'sark.invoke', (), {'invocation': {'server': 'time', 'tool': 'x'}}); "
            f"print(sorted(m for m in sys.modules if m.startswith({heavy!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout
