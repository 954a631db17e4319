"""A ``server_id`` is one path segment of a Gateway URL, never a way to another endpoint."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from pydantic import ValidationError

from config.registry import GatewayServer, RegistryError, load_registry
from config.settings import Settings
from devkit.stack import DEFAULT_API_KEY, DEFAULT_JWT_SECRET, Proc, start_gateway
from tests.helpers import http_server
from workers.errors import InvalidInvocation
from workers.gateway.client import GatewayClient, server_path
from workers.models import GatewayServerInfo

TRAVERSAL = "../_control/stats"


class _Paths(BaseHTTPRequestHandler):
    """Answers 404 to everything and remembers the raw request targets."""

    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.seen.append(self.path)
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        """Quiet."""


def _info(url: str, server_id: object) -> GatewayServerInfo | None:
    async def run() -> GatewayServerInfo | None:
        client = GatewayClient(Settings(gateway_url=url, gateway_api_key=DEFAULT_API_KEY))
        try:
            return await client.get_server_info(server_id)  # type: ignore[arg-type]  # callers send anything
        finally:
            await client.close()

    return asyncio.run(run())


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """A reference Gateway with its control API on (the endpoint a traversal would reach)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SARK_")}
    env.update(SARK_GATEWAY_API_KEY=DEFAULT_API_KEY, SARK_GATEWAY_JWT_SECRET=DEFAULT_JWT_SECRET)
    proc = start_gateway(tmp_path_factory.mktemp("gw"), env, control=True)
    yield proc
    proc.stop()


def test_server_path_is_one_quoted_segment() -> None:
    assert server_path("echo") == "/servers/echo"
    assert server_path(TRAVERSAL) == "/servers/..%2F_control%2Fstats"
    assert server_path("a b?c#d%2e") == "/servers/a%20b%3Fc%23d%252e"


@pytest.mark.parametrize("bad", ["", ".", "..", None, 7, ["echo"], "x" * 257])
def test_unusable_server_ids_are_refused_without_echo(bad: object) -> None:
    with pytest.raises(InvalidInvocation) as caught:
        server_path(bad)
    assert caught.value.code == "invalid_invocation"
    assert "x" * 50 not in str(caught.value)


def test_the_request_target_holds_the_id_as_one_segment() -> None:
    _Paths.seen.clear()
    with http_server(_Paths) as url:
        assert _info(url, TRAVERSAL) is None
        with pytest.raises(InvalidInvocation):
            _info(url, "..")
    assert _Paths.seen == ["/servers/..%2F_control%2Fstats"]  # and nothing sent for ".."


def test_traversal_does_not_reach_the_reference_gateways_control_api(gateway: Proc) -> None:
    stats = f"{gateway.url}/_control/stats"
    key = {"X-API-Key": DEFAULT_API_KEY}
    assert httpx.get(stats, headers=key, timeout=5).status_code == 200  # it is there to be reached
    before = httpx.get(stats, headers=key, timeout=5).json()["discovery_calls"]
    assert _info(gateway.url, TRAVERSAL) is None  # a 404, not the control endpoint's answer
    echo = _info(gateway.url, "echo")
    assert echo is not None and echo.server_id == "echo"
    assert httpx.get(stats, headers=key, timeout=5).json()["discovery_calls"] == before + 1  # echo only


@pytest.mark.parametrize("bad", [TRAVERSAL, "..", ".", "", "a/b", ".hidden", "x" * 257])
def test_registry_refuses_server_ids_that_are_not_one_plain_segment(bad: str, tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        GatewayServer(name="n", transport="http", server_id=bad)
    path = tmp_path / "servers.yaml"
    path.write_text(f"servers:\n  n:\n    transport: http\n    server_id: {bad!r}\n")
    with pytest.raises(RegistryError) as caught:
        load_registry(path)
    assert "server_id" in str(caught.value)


def test_registry_keeps_ordinary_gateway_ids() -> None:
    for good in ("echo", "3f2c9a1e-7b1d-4c55-9a43-0e1b6d2f8c10", "team.tools:v2", "a" * 256):
        assert GatewayServer(name="n", transport="http", server_id=good).gateway_id == good
