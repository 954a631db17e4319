"""HTTP transport end to end: a separate client ``send_task``s, a real worker calls the real Gateway."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from celery import Celery

from devkit.gateway import make_token
from devkit.stack import DEFAULT_API_KEY, DEFAULT_JWT_SECRET, DevStack, Proc
from tests.conftest import GatewayControl
from tests.helpers import invoke, send_invoke, settings_with
from workers.errors import (
    AuthenticationFailed,
    AuthorizationDenied,
    InvalidInvocation,
    InvocationTimeout,
    PayloadTooLarge,
    ProtocolError,
    ResultTooLarge,
    ToolError,
    UnknownServer,
)

pytestmark = pytest.mark.usefixtures("worker")


# --- discovery -------------------------------------------------------------------------------------
def test_list_servers(celery_client: Celery) -> None:
    servers = celery_client.send_task("sark.list_servers").get(timeout=20)
    by_id = {s["server_id"]: s for s in servers}
    assert {"echo", "restricted"} <= set(by_id)
    assert by_id["restricted"]["sensitivity_level"] == "critical"
    assert by_id["restricted"]["authorized_teams"] == ["admins"]
    assert by_id["echo"]["tools_count"] >= 1


def test_get_server_info(celery_client: Celery) -> None:
    info = celery_client.send_task("sark.get_server", kwargs={"server_id": "echo"}).get(timeout=20)
    assert info["server_id"] == "echo"
    assert info["tools_count"] >= 0


def test_get_server_info_not_found_is_none(celery_client: Celery) -> None:
    assert celery_client.send_task("sark.get_server", kwargs={"server_id": "nope"}).get(timeout=20) is None


def test_get_server_id_cannot_reach_another_endpoint(celery_client: Celery, gateway_control: GatewayControl) -> None:
    # Sent raw, "../_control/stats" reached the control endpoint (its JSON failed as a server: ProtocolError).
    get = "sark.get_server"
    assert celery_client.send_task(get, kwargs={"server_id": "../_control/stats"}).get(timeout=20) is None
    for bad in ("..", ".", ""):
        with pytest.raises(InvalidInvocation, match="server_id must be"):
            celery_client.send_task(get, kwargs={"server_id": bad}).get(timeout=20)
    assert gateway_control.stats()["discovery_calls"] == 0  # none of them reached GET /servers/{id}


def test_list_tools_all_and_filtered(celery_client: Celery) -> None:
    tools = celery_client.send_task("sark.list_tools").get(timeout=20)
    assert {t["server_name"] for t in tools} >= {"echo", "restricted"}
    echo_tools = celery_client.send_task("sark.list_tools", kwargs={"server": "echo"}).get(timeout=20)
    assert echo_tools and {t["server_name"] for t in echo_tools} == {"echo"}
    assert "add" in {t["tool_name"] for t in echo_tools}


def test_discovery_retried_on_5xx(celery_client: Celery, gateway_control: GatewayControl) -> None:
    gateway_control.mode("fail", status=503, remaining=2, scope="all")
    servers = celery_client.send_task("sark.list_servers").get(timeout=20)
    assert servers
    assert gateway_control.stats()["discovery_calls"] == 3


def test_discovery_gives_up_after_three_attempts(celery_client: Celery, gateway_control: GatewayControl) -> None:
    gateway_control.mode("fail", status=500, body="<html>oops</html>", scope="all")
    with pytest.raises(ToolError) as info:
        celery_client.send_task("sark.list_tools").get(timeout=20)
    assert info.value.status_code == 500
    assert "oops" in str(info.value)
    assert gateway_control.stats()["discovery_calls"] == 3


def test_health(celery_client: Celery) -> None:
    health = celery_client.send_task("sark.health").get(timeout=20)
    assert health["gateway"] is True
    assert "http" in health["transports"]


# --- invocations -----------------------------------------------------------------------------------
def test_invoke_success(celery_client: Celery, user_token: str) -> None:
    pending = send_invoke(celery_client, "echo", "add", {"a": 2, "b": 3}, token=user_token)
    result = pending.get(timeout=20)
    assert result["result"]["structuredContent"] == {"sum": 5.0}
    assert result["request_id"] == pending.id
    assert result["transport"] == "http"
    assert result["is_error"] is False
    assert result["execution_time_ms"] is not None and result["duration_ms"] > 0


def test_invoke_sends_contract_headers_and_request_id(
    celery_client: Celery, user_token: str, gateway_control: GatewayControl
) -> None:
    pending = send_invoke(celery_client, "echo", "echo", {"hello": "world"}, token=user_token)
    pending.get(timeout=20)
    stats = gateway_control.stats()
    assert stats["request_ids"] == {pending.id: 1}
    headers = stats["headers"][-1]
    assert headers["authorization"] == f"Bearer {user_token}"
    assert headers["x-api-key"] == DEFAULT_API_KEY
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"].startswith("sark-workers/")


def test_tool_reporting_is_error_is_a_result(celery_client: Celery, user_token: str) -> None:
    result = invoke(celery_client, "echo", "tool_error", {"message": "bad input"}, token=user_token)
    assert result["is_error"] is True
    assert result["result"]["content"][0]["text"] == "bad input"


def test_authorization_denied_is_not_retried(
    celery_client: Celery, user_token: str, gateway_control: GatewayControl
) -> None:
    with pytest.raises(AuthorizationDenied) as info:
        invoke(celery_client, "restricted", "echo", token=user_token)
    assert "not in a team authorized" in str(info.value)
    assert gateway_control.stats()["invocations"] == 1


def test_authorized_team_is_allowed(celery_client: Celery, admin_token: str) -> None:
    assert invoke(celery_client, "restricted", "echo", {"x": 1}, token=admin_token)["is_error"] is False


def test_deny_rule(celery_client: Celery, admin_token: str) -> None:
    with pytest.raises(AuthorizationDenied, match="admin tools"):
        invoke(celery_client, "echo", "admin_wipe", token=admin_token)


def test_non_json_403_body(celery_client: Celery, user_token: str) -> None:
    with pytest.raises(AuthorizationDenied, match="plain text refusal"):
        invoke(celery_client, "echo", "fail", {"status": 403, "body": "plain text refusal"}, token=user_token)


def test_tool_error_carries_status_and_is_not_retried(
    celery_client: Celery, user_token: str, gateway_control: GatewayControl
) -> None:
    with pytest.raises(ToolError) as info:
        invoke(celery_client, "echo", "fail", {"status": 500, "body": {"error": "disk on fire"}}, token=user_token)
    assert info.value.status_code == 500
    assert "disk on fire" in str(info.value)
    assert gateway_control.stats()["invocations"] == 1


def test_non_json_5xx_body(celery_client: Celery, user_token: str) -> None:
    with pytest.raises(ToolError) as info:
        invoke(celery_client, "echo", "fail", {"status": 502, "body": "<html>Bad Gateway</html>"}, token=user_token)
    assert info.value.status_code == 502
    assert "Bad Gateway" in str(info.value)


def test_unknown_tool_on_gateway(celery_client: Celery, user_token: str) -> None:
    with pytest.raises(ToolError) as info:
        invoke(celery_client, "echo", "no_such_tool", token=user_token)
    assert info.value.status_code == 404


def test_server_unknown_to_gateway(celery_client: Celery, user_token: str) -> None:
    with pytest.raises(ToolError) as info:
        invoke(celery_client, "missing-on-gateway", "echo", token=user_token)
    assert info.value.status_code == 404


def test_unknown_server_refused_before_network(
    celery_client: Celery, user_token: str, gateway_control: GatewayControl
) -> None:
    with pytest.raises(UnknownServer, match="not-registered"):
        invoke(celery_client, "not-registered", "echo", token=user_token)
    assert gateway_control.stats()["invocations"] == 0


@pytest.mark.parametrize(
    "invocation",
    [
        {"server": "echo", "tool": "echo", "arguments": ["not", "an", "object"]},
        {"server": "echo", "tool": "bad tool name!"},
        {"server": "echo", "tool": "echo", "command": "rm -rf /"},
        {"server": "../etc/passwd", "tool": "echo"},
        {"server": "echo", "tool": "echo", "timeout": -1},
        {"tool": "echo"},
        "just a string",
    ],
)
def test_invalid_invocations(
    celery_client: Celery, invocation: object, gateway_control: GatewayControl
) -> None:
    pending = celery_client.send_task("sark.invoke", kwargs={"invocation": invocation})
    with pytest.raises(InvalidInvocation) as info:
        pending.get(timeout=20)
    assert "rm -rf" not in str(info.value)  # values are never echoed
    assert gateway_control.stats()["invocations"] == 0


def test_timeout_retried_once_then_invocation_timeout(
    celery_client: Celery, user_token: str, gateway_control: GatewayControl
) -> None:
    pending = send_invoke(celery_client, "echo", "sleep", {"seconds": 5}, token=user_token, timeout=1)
    with pytest.raises(InvocationTimeout) as info:
        pending.get(timeout=20)
    assert not isinstance(info.value, ToolError)  # no answer came (a Gateway that answers 504 is a ToolError)
    assert info.value.status_code == 504  # the Gateway contract's "timeout -> 504"
    assert gateway_control.stats()["request_ids"] == {pending.id: 2}  # same idempotency key twice


def test_timeout_then_success_on_retry(
    celery_client: Celery, user_token: str, gateway_control: GatewayControl
) -> None:
    gateway_control.mode("hang", remaining=1)
    result = invoke(celery_client, "echo", "echo", {"n": 1}, token=user_token, timeout=1)
    assert result["result"]["structuredContent"] == {"n": 1}
    assert gateway_control.stats()["invocations"] == 2


def test_success_body_not_json(celery_client: Celery, user_token: str, gateway_control: GatewayControl) -> None:
    gateway_control.mode("garbage")
    with pytest.raises(ProtocolError, match="non-JSON"):
        invoke(celery_client, "echo", "echo", token=user_token)


def test_missing_and_expired_token(celery_client: Celery) -> None:
    with pytest.raises(AuthenticationFailed) as info:
        invoke(celery_client, "echo", "echo")
    assert info.value.detail["status_code"] == 401
    expired = make_token(DEFAULT_JWT_SECRET, ttl=-10)
    with pytest.raises((AuthenticationFailed, InvalidInvocation)):
        invoke(celery_client, "echo", "echo", token=expired)


def test_oversized_arguments(celery_client: Celery, user_token: str, gateway_control: GatewayControl) -> None:
    with pytest.raises(PayloadTooLarge, match="arguments"):
        invoke(celery_client, "echo", "echo", {"blob": "x" * 1_100_000}, token=user_token)
    assert gateway_control.stats()["invocations"] == 0


def test_oversized_result(celery_client: Celery, user_token: str) -> None:
    with pytest.raises(ResultTooLarge, match="result"):
        invoke(celery_client, "echo", "big", {"bytes": 11_000_000}, token=user_token)


def test_worker_survives_errors_and_serves_concurrently(celery_client: Celery, user_token: str) -> None:
    pendings = [send_invoke(celery_client, "echo", "add", {"a": i, "b": 1}, token=user_token) for i in range(40)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda p: p.get(timeout=30), pendings))
    assert [r["result"]["structuredContent"]["sum"] for r in results] == [i + 1.0 for i in range(40)]
    assert len({r["request_id"] for r in results}) == 40


# --- processes coming and going ---------------------------------------------------------------------
def _private_client(env: dict[str, str]) -> Celery:
    from workers.app import create_app

    return create_app(settings_with(env))


def test_worker_restarted_between_invocations(stack: DevStack, user_token: str) -> None:
    env = {"SARK_QUEUE_HTTP": "sark.http.restart"}
    client = _private_client(env)
    first = stack.worker("restart-a", env=env, queues="sark.http.restart")
    assert invoke(client, "echo", "echo", {"call": 1}, token=user_token)["result"]["structuredContent"] == {"call": 1}
    assert first.stop() is not None
    pending = send_invoke(client, "echo", "echo", {"call": 2}, token=user_token)  # queued while no worker runs
    time.sleep(0.2)
    assert pending.state == "PENDING"
    second: Proc = stack.worker("restart-b", env=env, queues="sark.http.restart")
    try:
        assert pending.get(timeout=30)["result"]["structuredContent"] == {"call": 2}
    finally:
        second.stop()
        client.close()


def test_gateway_down_gives_typed_error(stack: DevStack, user_token: str) -> None:
    from devkit.stack import free_port
    from workers.errors import GatewayUnavailable

    dead = f"http://127.0.0.1:{free_port()}"
    env = {"SARK_QUEUE_HTTP": "sark.http.down", "SARK_GATEWAY_URL": dead}
    client = _private_client(env)
    proc = stack.worker("gateway-down", env=env, queues="sark.http.down")
    try:
        with pytest.raises(GatewayUnavailable):
            invoke(client, "echo", "echo", token=user_token)
        assert client.send_task("sark.health").get(timeout=20)["gateway"] is False
        # the worker is still alive and answering
        assert proc.alive()
    finally:
        proc.stop()
        client.close()


def test_path_prefix(stack: DevStack, user_token: str) -> None:
    from devkit.stack import start_gateway

    gateway = start_gateway(stack.log_dir, stack.base_env(), prefix="/api/v1")
    env = {"SARK_QUEUE_HTTP": "sark.http.prefix", "SARK_GATEWAY_URL": gateway.url,
           "SARK_GATEWAY_PATH_PREFIX": "/api/v1"}
    client = _private_client(env)
    proc = stack.worker("prefix", env=env, queues="sark.http.prefix")
    try:
        assert invoke(client, "echo", "add", {"a": 1, "b": 1}, token=user_token)["result"]["structuredContent"] == {
            "sum": 2.0
        }
        assert client.send_task("sark.get_server", kwargs={"server_id": "echo"}).get(timeout=20)["server_id"] == "echo"
    finally:
        proc.stop()
        gateway.stop()
        client.close()


def test_a_plain_celery_app_reads_the_typed_error_as_the_readme_says(stack: DevStack, worker: Proc) -> None:
    # README "Without installing this project": an app that never imports this project (a fresh process: Celery
    # rebuilds an error's class only from modules already imported) gets a class Celery generates with the
    # error's name; its args are (message, detail), detail holding status_code and the rest.
    import json
    import subprocess
    import sys

    user = make_token(DEFAULT_JWT_SECRET, sub="alice", teams=["users"])
    script = """
import json, os, sys, uuid
from celery import Celery
from cryptography.fernet import Fernet

app = Celery(broker=os.environ["SARK_BROKER_URL"], backend=os.environ["SARK_BROKER_URL"])
app.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"])
task_id = str(uuid.uuid4())
sealed = Fernet(os.environ["SARK_TOKEN_KEY"]).encrypt(
    json.dumps({"v": 1, "tid": task_id, "tok": os.environ["USER_JWT"]}).encode()).decode()
result = app.send_task("sark.invoke", task_id=task_id, queue="sark.http",
                       kwargs={"invocation": {"server": "restricted", "tool": "echo", "arguments": {}}},
                       headers={"sark_token": "fernet:" + sealed})
try:
    print(result.get(timeout=30))
except Exception as exc:
    message, detail = exc.args
    print(json.dumps({"type": type(exc).__name__, "module": type(exc).__module__, "message": message,
                      "detail": detail, "imported": "workers" in sys.modules}))
"""
    done = subprocess.run([sys.executable, "-c", script], env={**stack.base_env(), "USER_JWT": user},
                          capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["type"] == "AuthorizationDenied" and not seen["imported"]
    assert not seen["module"].startswith("workers")  # a generated class, not the project's
    assert seen["detail"]["status_code"] == 403 and user not in done.stdout
