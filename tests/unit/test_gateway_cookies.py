"""One pooled Gateway client serves every user: a cookie set for one never rides along with the next."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest

from config.settings import Settings
from tests.helpers import http_server
from workers.gateway.client import GatewayClient


class _CookieGateway(BaseHTTPRequestHandler):
    """Answers POST /invoke with the Cookie header it received, and sets a session cookie."""

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        request = json.loads(self.rfile.read(length))
        body = json.dumps({
            "content": [{"type": "text", "text": "ok"}],
            "cookie_seen": self.headers.get("Cookie"),
            "user": self.headers.get("Authorization"),
            "request_id": request["request_id"],
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Set-Cookie", f"session={self.headers.get('Authorization')}; Path=/")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        """Quiet."""


@pytest.fixture()
def gateway_url() -> Iterator[str]:
    with http_server(_CookieGateway) as url:
        yield url


def test_no_cookie_crosses_from_one_users_call_to_the_next(gateway_url: str) -> None:
    async def scenario() -> list[dict[str, Any]]:
        client = GatewayClient(Settings(gateway_url=gateway_url, gateway_api_key=None))
        try:
            return [
                await client.invoke_tool("s", "t", {}, user, f"r{i}", timeout=5)
                for i, user in enumerate(["alice-token", "bob-token", "bob-token"])
            ]
        finally:
            await client.close()

    answers = asyncio.run(scenario())
    assert [a["user"] for a in answers] == ["Bearer alice-token", "Bearer bob-token", "Bearer bob-token"]
    assert [a["cookie_seen"] for a in answers] == [None, None, None]
