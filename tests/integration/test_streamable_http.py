"""The ``streamable-http`` transport (issue 15) through a real worker, against real SDK servers
(``devkit/mcp_http_server.py``: stateful, stateless, bearer-protected) started on free loopback ports."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from celery import Celery
from celery.exceptions import TaskRevokedError

from devkit.gateway import make_token
from devkit.stack import DEFAULT_JWT_SECRET, DevStack, Proc, wait_for
from tests.helpers import clients_configured, invoke, send_invoke, settings_with, token_headers
from workers.client import CANCEL_COMMAND
from workers.errors import (
    AuthenticationFailed,
    AuthorizationDenied,
    Cancelled,
    InvocationTimeout,
    ResultTooLarge,
    ServerUnavailable,
    ToolError,
    TransportError,
)
from workers.streams import reader as stream_client

REPO = Path(__file__).resolve().parents[2]
QUEUE = "sark.streamable-http"
SECRET = "s3cret-bearer"


@dataclass
class McpServer:
    """One devkit server process."""

    popen: subprocess.Popen[str]
    port: int
    args: tuple[str, ...]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait(10)


def _start(*args: str, port: int = 0) -> McpServer:
    popen = subprocess.Popen([sys.executable, "-m", "devkit.mcp_http_server", "--port", str(port), *args],
                             stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert popen.stdout is not None
    line = popen.stdout.readline()
    assert line.startswith("READY "), line
    return McpServer(popen, int(line.split()[1]), args)


def _restart(server: McpServer) -> McpServer:
    server.kill()
    return _start(*server.args, port=server.port)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, McpServer]]:
    events = tmp_path_factory.mktemp("mcp-http") / "events.log"
    started = {
        "stateful": _start("--legacy", "--events", str(events)),  # 2025-11-25: initialize, Mcp-Session-Id
        "stateless": _start("--stateless"),  # 2026-07-28
        "dual": _start(),  # 2026-07-28 first, the 2025-11-25 handshake (with sessions) for clients that ask
        "secured": _start("--token", SECRET),
        "victim": _start("--legacy"),
        "victim-modern": _start("--stateless"),
        "failing": _start("--legacy", "--http-error", "down=503", "--http-error", "forbidden=403"),
        "failing-modern": _start("--stateless", "--http-error", "down=503", "--http-error", "forbidden=403"),
    }
    for name, ttl in (("cached", "60000"), ("uncached", "0")):
        noted = tmp_path_factory.mktemp(name) / "events.log"
        started[name] = _start("--stateless", "--list-ttl", ttl, "--events", str(noted))
        started[name].events = noted  # type: ignore[attr-defined]
    started["stateful"].events = events  # type: ignore[attr-defined]
    yield started
    for server in started.values():
        server.kill()


@pytest.fixture(scope="module")
def http_env(servers: dict[str, McpServer], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    registry = tmp_path_factory.mktemp("registry") / "servers.yaml"
    registry.write_text(f"""
servers:
  stateful: {{transport: streamable-http, url: "{servers['stateful'].url}", timeout: 10}}
  stateless: {{transport: streamable-http, url: "{servers['stateless'].url}"}}
  forwarded: {{transport: streamable-http, url: "{servers['stateful'].url}", auth: forward}}
  secured: {{transport: streamable-http, url: "{servers['secured'].url}", auth: bearer-env, token_env: MCP_GOOD}}
  secured-wrong: {{transport: streamable-http, url: "{servers['secured'].url}", auth: bearer-env,
                  token_env: MCP_WRONG}}
  secured-absent: {{transport: streamable-http, url: "{servers['secured'].url}"}}
  secured-forward: {{transport: streamable-http, url: "{servers['secured'].url}", auth: forward}}
  dual: {{transport: streamable-http, url: "{servers['dual'].url}"}}
  pinned: {{transport: streamable-http, url: "{servers['dual'].url}", protocol_version: "2025-11-25"}}
  pinned-other: {{transport: streamable-http, url: "{servers['stateful'].url}", protocol_version: "2026-07-28"}}
  failing: {{transport: streamable-http, url: "{servers['failing'].url}", breaker: {{fail_max: 50}}}}
  failing-modern: {{transport: streamable-http, url: "{servers['failing-modern'].url}", breaker: {{fail_max: 50}}}}
  victim: {{transport: streamable-http, url: "{servers['victim'].url}", breaker: {{fail_max: 50}}}}
  victim-modern: {{transport: streamable-http, url: "{servers['victim-modern'].url}", breaker: {{fail_max: 50}}}}
  cached: {{transport: streamable-http, url: "{servers['cached'].url}"}}
  uncached: {{transport: streamable-http, url: "{servers['uncached'].url}"}}
""")
    with clients_configured({"SARK_REGISTRY_PATH": str(registry)}) as env:
        yield {**env, "MCP_GOOD": SECRET, "MCP_WRONG": "not-it"}


@pytest.fixture(scope="module")
def http_worker(stack: DevStack, http_env: dict[str, str]) -> Iterator[Proc]:
    with stack.running_worker("streamable-http", env=http_env, queues=QUEUE, concurrency=4) as proc:
        yield proc


@pytest.fixture(scope="module")
def app(http_env: dict[str, str], http_worker: Proc) -> Iterator[Celery]:
    from workers.app import create_app

    celery = create_app(settings_with(http_env))
    yield celery
    celery.close()


def _text(result: dict[str, object]) -> str:
    content = result["result"]["content"]  # type: ignore[index]
    return str(content[0]["text"])  # type: ignore[index]


def _whoami(app: Celery, server: str, token: str | None = None) -> dict[str, object]:
    structured: dict[str, object] = invoke(app, server, "whoami", token=token)["result"]["structuredContent"]
    return structured


@pytest.mark.parametrize("server", ["stateful", "stateless"])
def test_tool_calls_are_routed_to_the_queue_and_answered(app: Celery, server: str) -> None:
    route = app.amqp.router.route({}, "sark.invoke", (), {"invocation": {"server": server, "tool": "add"}})
    assert route["queue"].name == QUEUE
    result = invoke(app, server, "add", {"a": 1, "b": 2})
    assert result["transport"] == "streamable-http" and not result["is_error"]
    assert result["result"]["structuredContent"]["result"] == 3
    assert _text(invoke(app, server, "echo", {"text": "hé"})) == "hé"
    failed = invoke(app, server, "error", {"message": "no luck"})
    assert failed["is_error"] and "no luck" in _text(failed)


def test_the_stateful_session_is_warm_and_the_stateless_server_has_none(app: Celery) -> None:
    first, second = _whoami(app, "stateful"), _whoami(app, "stateful")
    assert first["session"] and first["session"] == second["session"]
    assert second["calls"] == int(first["calls"]) + 1  # type: ignore[call-overload]
    assert _whoami(app, "stateless")["session"] is None


def test_concurrent_calls_share_the_warm_session(app: Celery) -> None:
    session = _whoami(app, "stateful")["session"]
    pending = [send_invoke(app, "stateful", "whoami") for _ in range(20)]
    assert {p.get(timeout=30)["result"]["structuredContent"]["session"] for p in pending} == {session}


def test_a_pinned_revision_is_the_one_spoken(app: Celery) -> None:
    # The same dual server: unpinned, the client negotiates 2026-07-28 (no session); pinned to 2025-11-25 it
    # makes the initialize handshake and gets an Mcp-Session-Id session.
    assert _whoami(app, "dual")["session"] is None
    assert _whoami(app, "pinned")["session"]
    assert invoke(app, "pinned", "add", {"a": 1, "b": 2})["result"]["structuredContent"]["result"] == 3
    # A 2025-11-25-only server refuses requests of the pinned 2026-07-28 (400, "Unsupported protocol version").
    with pytest.raises(ToolError, match=r"Unsupported protocol version|HTTP 400") as refused:
        invoke(app, "pinned-other", "add", {"a": 1, "b": 2})
    assert refused.value.status_code == 400


def test_list_tools(app: Celery) -> None:
    tools = app.send_task("sark.list_tools", kwargs={"server": "stateless"}, queue=QUEUE).get(timeout=30)
    assert {"echo", "add", "progress", "slow", "big", "error", "whoami"} <= {t["tool_name"] for t in tools}


def test_listing_a_forwarding_server_lists_as_the_caller(app: Celery) -> None:
    # auth: forward: the listing goes out with the caller's token (here the one the server accepts), and
    # without a token it is anonymous, which this server refuses.
    with pytest.raises(AuthenticationFailed):
        app.send_task("sark.list_tools", kwargs={"server": "secured-forward"}, queue=QUEUE).get(timeout=30)
    task_id = str(uuid.uuid4())
    tools = app.send_task("sark.list_tools", task_id=task_id, kwargs={"server": "secured-forward"}, queue=QUEUE,
                          headers=token_headers(SECRET, task_id)).get(timeout=30)
    assert "whoami" in {t["tool_name"] for t in tools}


@pytest.mark.parametrize(("server", "asked"), [("cached", 1), ("uncached", 4)])
def test_list_tools_follows_the_servers_cache_hint(app: Celery, servers: dict[str, McpServer], server: str,
                                                   asked: int) -> None:
    # The session lists the tools once when it starts; three sark.list_tools then come from its cache while
    # the server's ttlMs hint (60 s) says the listing is fresh, and reach the server when it says 0.
    for _ in range(3):
        tools = app.send_task("sark.list_tools", kwargs={"server": server}, queue=QUEUE).get(timeout=30)
        assert "whoami" in {t["tool_name"] for t in tools}
    events: Path = servers[server].events  # type: ignore[attr-defined]
    assert events.read_text().splitlines().count("rpc tools/list") == asked


@pytest.mark.parametrize("server", ["stateful", "stateless"])
def test_progress_notifications_become_stream_chunks(app: Celery, server: str) -> None:
    pending = send_invoke(app, server, "progress", {"count": 4}, stream=True)
    chunks = list(stream_client.stream(pending.id, idle_timeout=20))
    result = pending.get(timeout=30)
    assert [c.event_type for c in chunks] == ["progress"] * 4
    assert [c.seq for c in chunks] == [0, 1, 2, 3]
    assert chunks[-1].data == {"progress": 4.0, "total": 4.0, "message": "step 4"}
    assert result["chunks"] == 4 and _text(result) == "4 steps"


def test_timeout_cancels_the_call_on_the_server(app: Celery, servers: dict[str, McpServer]) -> None:
    started = time.monotonic()
    with pytest.raises(InvocationTimeout):
        invoke(app, "stateful", "slow", {"seconds": 30, "tag": "t1"}, timeout=1)
    assert time.monotonic() - started < 10
    events: Path = servers["stateful"].events  # type: ignore[attr-defined]
    wait_for(lambda: "cancelled t1" in events.read_text(), 10, "the server saw the cancellation")
    assert invoke(app, "stateful", "add", {"a": 2, "b": 2})["result"]["structuredContent"]["result"] == 4


def test_cancelling_the_task_cancels_the_call_on_the_server(app: Celery, servers: dict[str, McpServer]) -> None:
    events: Path = servers["stateful"].events  # type: ignore[attr-defined]
    pending = send_invoke(app, "stateful", "slow", {"seconds": 30, "tag": "c1"}, timeout=40)
    wait_for(lambda: "start c1" in events.read_text(), 15, "the call reached the server")
    started = time.monotonic()
    pending.revoke()
    app.control.broadcast(CANCEL_COMMAND, arguments={"request_id": pending.id})
    # Whichever the worker stores first: the revoke's REVOKED state or the cancelled call's Cancelled.
    with pytest.raises((Cancelled, TaskRevokedError)):
        pending.get(timeout=15)
    assert time.monotonic() - started < 10
    wait_for(lambda: "cancelled c1" in events.read_text(), 10, "the server saw the cancellation")


@pytest.mark.parametrize("server", ["stateful", "stateless"])  # an SSE event, a JSON body
def test_a_result_over_the_cap_is_result_too_large(app: Celery, server: str) -> None:
    with pytest.raises(ResultTooLarge):
        invoke(app, server, "big", {"size": 11 * 1024 * 1024}, timeout=30)
    assert invoke(app, server, "add", {"a": 1, "b": 1})["result"]["structuredContent"]["result"] == 2
    assert len(_text(invoke(app, server, "big", {"size": 1024 * 1024}))) == 1024 * 1024  # under the cap


def test_bearer_token_from_the_environment(app: Celery) -> None:
    assert invoke(app, "secured", "add", {"a": 1, "b": 2})["result"]["structuredContent"]["result"] == 3
    for server in ("secured-wrong", "secured-absent"):
        with pytest.raises(AuthenticationFailed) as raised:
            invoke(app, server, "add", {"a": 1, "b": 2})
        assert raised.value.detail["status_code"] == 401
        assert SECRET not in str(raised.value) and "not-it" not in str(raised.value)


@pytest.mark.parametrize("server", ["failing", "failing-modern"])  # 2025-11-25, 2026-07-28
def test_http_statuses_and_json_rpc_errors_follow_the_table(app: Celery, server: str) -> None:
    session = _whoami(app, server)["session"]
    with pytest.raises(ToolError) as down:
        invoke(app, server, "down")
    assert down.value.status_code == 503 and down.value.counts_as_failure
    with pytest.raises(AuthorizationDenied) as forbidden:
        invoke(app, server, "forbidden")
    assert forbidden.value.detail["status_code"] == 403
    with pytest.raises(ToolError) as rpc:
        invoke(app, server, "rpc_error", {"code": -32602, "message": "bad params"})
    assert rpc.value.status_code == 400 and "bad params" in str(rpc.value)
    with pytest.raises(ToolError) as internal:
        invoke(app, server, "rpc_error", {"code": -32603, "message": "oops"})
    assert internal.value.status_code >= 500 and "oops" in str(internal.value)
    assert _whoami(app, server)["session"] == session  # the session outlived every one of them


def test_forwarded_tokens_of_two_users_never_share_a_session(app: Celery) -> None:
    alice, bob = (make_token(DEFAULT_JWT_SECRET, sub=sub) for sub in ("alice", "bob"))
    a1, b1 = _whoami(app, "forwarded", alice), _whoami(app, "forwarded", bob)
    a2 = _whoami(app, "forwarded", make_token(DEFAULT_JWT_SECRET, sub="alice", ttl=1800))  # a fresh token, same user
    assert a1["session"] and b1["session"] and a1["session"] != b1["session"]
    assert a2["session"] == a1["session"]
    assert _whoami(app, "stateful")["session"] not in (a1["session"], b1["session"])  # the service's own


@pytest.mark.parametrize("victim", ["victim", "victim-modern"])
def test_server_killed_mid_call_then_restarted(app: Celery, servers: dict[str, McpServer], victim: str) -> None:
    before = _whoami(app, victim)["session"]
    sleeping = send_invoke(app, victim, "slow", {"seconds": 20}, timeout=25)
    time.sleep(1.0)  # the call reached the server
    servers[victim].kill()
    started = time.monotonic()
    with pytest.raises(TransportError) as raised:
        sleeping.get(timeout=15)
    assert isinstance(raised.value, ServerUnavailable), raised.value
    assert time.monotonic() - started < 10
    with pytest.raises(ServerUnavailable):  # nobody listens now: refused
        invoke(app, victim, "add", {"a": 1, "b": 2})
    servers[victim] = _start(*servers[victim].args, port=servers[victim].port)
    deadline = time.monotonic() + 20
    while True:  # the pool backs off (0.25 s, doubling) after the failed starts
        try:
            after = _whoami(app, victim)["session"]
            break
        except ServerUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    if victim == "victim":  # 2025-11-25: a new session (2026-07-28 has none: None both times)
        assert after and after != before


def test_a_404_answer_of_a_2026_server_is_never_sent_again(app: Celery, servers: dict[str, McpServer]) -> None:
    # A 2026-07-28 server answers a JSON-RPC METHOD_NOT_FOUND as HTTP 404 (here the tool raises it: it may have
    # done work first). That is the call's answer, not an expired session: exactly one tools/call reaches it.
    events: Path = servers["uncached"].events  # type: ignore[attr-defined]
    before = (events.read_text() if events.exists() else "").splitlines().count("rpc tools/call")
    with pytest.raises(ToolError) as raised:
        invoke(app, "uncached", "rpc_error", {"code": -32601, "message": "no such thing"})
    assert raised.value.status_code == 404 and "no such thing" in str(raised.value)
    assert events.read_text().splitlines().count("rpc tools/call") == before + 1


def test_restarted_server_expires_the_session_and_the_call_is_sent_again(
    app: Celery, servers: dict[str, McpServer]
) -> None:
    before = _whoami(app, "victim")["session"]
    servers["victim"] = _restart(servers["victim"])
    after = _whoami(app, "victim")  # 404 on the old session → a new session, the call sent once more
    assert after["session"] and after["session"] != before and after["calls"] == 1
