"""``auth: oauth-client-credentials`` of the ``streamable-http`` transport through a real worker, against real
SDK servers that are their own OAuth authorization server (``devkit/mcp_http_server.py --oauth-client``):
the worker discovers the token endpoint from the server's 401, gets a token with its client secret
(HTTP Basic or form fields), reuses it, and gets a new one when it expires."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from celery import Celery

from devkit.stack import DevStack, Proc
from tests.helpers import clients_configured, invoke, send_invoke, settings_with
from tests.integration.test_streamable_http import McpServer, _start
from workers.errors import AuthenticationFailed, SarkError

QUEUE = "sark.streamable-http"
CLIENT_ID = "sark-fleet"
SECRET = "cc-s3cret/with:odd chars"  # form-urlencoded in HTTP Basic (RFC 6749 2.3.1)
WRONG = "cc-not-the-secret"


def _wire_forms(secret: str) -> list[str]:
    """``secret`` as given, form-urlencoded (client_secret_post's body, Basic's parts) and as the
    ``client_secret_basic`` credentials travel (RFC 6749 2.3.1): none of them may be logged."""
    encoded = quote(secret, safe="")
    return [secret, encoded, base64.b64encode(f"{quote(CLIENT_ID, safe='')}:{encoded}".encode()).decode()]


@pytest.fixture(scope="module")
def oauth_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, McpServer]]:
    client = f"{CLIENT_ID}:{SECRET}"
    options = {"basic": (), "post": (), "wrong": (), "short": ("--oauth-token-ttl", "1"), "json": ("--json",)}
    started: dict[str, McpServer] = {}
    for name, extra in options.items():
        events = tmp_path_factory.mktemp(f"oauth-{name}") / "events.log"
        events.touch()
        started[name] = _start("--stateless", "--oauth-client", client, "--events", str(events), *extra)
        started[name].events = events  # type: ignore[attr-defined]
    yield started
    for server in started.values():
        server.kill()


@pytest.fixture(scope="module")
def oauth_env(oauth_servers: dict[str, McpServer],
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    def entry(name: str, method: str, variable: str) -> str:
        server = oauth_servers[name]
        return (f'  oauth-{name}: {{transport: streamable-http, url: "{server.url}", auth: oauth-client-credentials,'
                f' oauth: {{client_id: {CLIENT_ID}, method: {method}, client_secret_env: {variable},'
                f' issuer: "http://127.0.0.1:{server.port}"}}}}\n')

    registry = tmp_path_factory.mktemp("oauth-registry") / "servers.yaml"
    registry.write_text("servers:\n" + entry("basic", "client_secret_basic", "MCP_OAUTH_SECRET")
                        + entry("post", "client_secret_post", "MCP_OAUTH_SECRET")
                        + entry("wrong", "client_secret_basic", "MCP_OAUTH_WRONG")
                        + entry("short", "client_secret_post", "MCP_OAUTH_SECRET")
                        + entry("json", "client_secret_basic", "MCP_OAUTH_SECRET"))
    with clients_configured({"SARK_REGISTRY_PATH": str(registry)}) as env:
        yield {**env, "MCP_OAUTH_SECRET": SECRET, "MCP_OAUTH_WRONG": WRONG}


@pytest.fixture(scope="module")
def oauth_worker(stack: DevStack, oauth_env: dict[str, str]) -> Iterator[Proc]:
    with stack.running_worker("streamable-http-oauth", env=oauth_env, queues=QUEUE, concurrency=4) as proc:
        yield proc


@pytest.fixture(scope="module")
def app(oauth_env: dict[str, str], oauth_worker: Proc) -> Iterator[Celery]:
    from workers.app import create_app

    celery = create_app(settings_with(oauth_env))
    yield celery
    celery.close()


#: Every error message the tests got (checked for the secret at the end).
_errors: list[str] = []


def _issued(server: McpServer) -> int:
    events: Path = server.events  # type: ignore[attr-defined]
    return events.read_text().splitlines().count("token issued")


def _add(app: Celery, server: str) -> object:
    return invoke(app, server, "add", {"a": 1, "b": 2})["result"]["structuredContent"]["result"]


@pytest.mark.parametrize("method", ["basic", "post"])  # client_secret_basic, client_secret_post
def test_a_token_is_obtained_once_and_reused(app: Celery, oauth_servers: dict[str, McpServer], method: str) -> None:
    assert _add(app, f"oauth-{method}") == 3
    assert _issued(oauth_servers[method]) == 1
    for _ in range(3):
        assert _add(app, f"oauth-{method}") == 3
    assert _issued(oauth_servers[method]) == 1


def test_calls_through_one_oauth_provider_run_concurrently(app: Celery) -> None:
    # The SDK's provider holds its lock across each request: with JSON answers (headers only when the tool is
    # done) four 1-second calls through it took 4 s. With the token valid they now go out together.
    assert _add(app, "oauth-json") == 3  # the token, fetched once
    started = time.monotonic()
    pending = [send_invoke(app, "oauth-json", "slow", {"seconds": 1.0}) for _ in range(4)]
    assert all(p.get(timeout=30)["result"]["structuredContent"]["result"] == "slept 1.0" for p in pending)
    assert time.monotonic() - started < 3.0


def test_a_wrong_client_secret_is_authentication_failed(app: Celery, oauth_servers: dict[str, McpServer]) -> None:
    # The token endpoint answers 401 invalid_client; the SDK raises OAuthTokenError inside the httpx auth flow
    # while the session starts, and the transport reports the last POST's status (the token request's 401).
    with pytest.raises(AuthenticationFailed) as raised:
        invoke(app, "oauth-wrong", "add", {"a": 1, "b": 2})
    _errors.append(f"{type(raised.value).__name__}: {raised.value} {raised.value.detail}")
    assert raised.value.detail == {"server": "oauth-wrong", "phase": "oauth", "status_code": 401}, _errors[-1]
    assert "refused the fleet's OAuth client credentials (HTTP 401 from the token endpoint)" in str(raised.value)
    assert not raised.value.counts_as_failure  # the server answered: not a breaker failure
    assert _issued(oauth_servers["wrong"]) == 0


def test_an_expired_token_is_renewed(app: Celery, oauth_servers: dict[str, McpServer]) -> None:
    assert _add(app, "oauth-short") == 3
    assert _issued(oauth_servers["short"]) == 1
    time.sleep(2.0)  # the 1 s token has expired
    assert _add(app, "oauth-short") == 3
    assert _issued(oauth_servers["short"]) == 2


def test_the_client_secret_is_never_logged_nor_in_an_error(app: Celery, oauth_worker: Proc) -> None:
    with pytest.raises(SarkError) as raised:  # one more failed exchange, whatever the earlier tests ran
        invoke(app, "oauth-wrong", "add", {"a": 1, "b": 2})
    _errors.append(f"{type(raised.value).__name__}: {raised.value} {raised.value.detail}")
    log = oauth_worker.log()
    assert "Token exchange failed (401)" in log  # the SDK logged the refused exchange: the log covers it
    for secret in _wire_forms(SECRET) + _wire_forms(WRONG):
        assert secret not in log
        assert all(secret not in message for message in _errors)
