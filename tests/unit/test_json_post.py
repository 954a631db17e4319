"""The invocation hot path's POST against a real loopback server: the request it sends, and every
way an answer can be too big, compressed, corrupt or cut short."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar

import httpx
import pytest

from tests.helpers import http_server
from workers.errors import GatewayUnavailable, ProtocolError, ResultTooLarge
from workers.gateway.backend import asyncio_pool
from workers.gateway.post import JsonPost


class _Gateway(BaseHTTPRequestHandler):
    """Echoes what it received; the path chooses how the answer is sent."""

    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.seen.append({"path": self.path, "headers": dict(self.headers), "body": raw})
        echo = json.dumps({"got": json.loads(raw), "pad": "x" * 2000}).encode()
        mode = self.path.rsplit("/", 1)[-1]
        headers = {"Content-Type": "application/json"}
        if mode == "gzip":
            data, headers["Content-Encoding"] = gzip.compress(echo), "gzip"
        elif mode == "bomb":
            data, headers["Content-Encoding"] = gzip.compress(b"0" * 50_000_000), "gzip"
        elif mode == "corrupt":
            data, headers["Content-Encoding"] = b"\x1f\x8b\x08\x00garbage-not-deflate", "gzip"
        elif mode == "truncated":
            data, headers["Content-Encoding"] = gzip.compress(echo)[:-12], "gzip"
        elif mode == "brotli":
            data, headers["Content-Encoding"] = echo, "br"
        else:
            data = echo
        self.send_response(200)
        for name, value in headers.items():
            self.send_header(name, value)
        if mode == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(data), 500):
                piece = data[i:i + 500]
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        if mode == "cut":  # promises more than it sends, then hangs up
            self.send_header("Content-Length", str(len(data) + 100))
            self.end_headers()
            self.wfile.write(data)
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        """Quiet."""


@pytest.fixture()
def base_url() -> Iterator[str]:
    _Gateway.seen.clear()
    with http_server(_Gateway) as url:
        yield f"{url}/api/v1/"


def post(base_url: str, path: str, *, max_bytes: int | None = 100_000) -> tuple[int, bytes]:
    async def run() -> tuple[int, bytes]:
        pool = asyncio_pool(limits=httpx.Limits())
        try:
            poster = JsonPost(pool, base_url, {"X-API-Key": "k", "User-Agent": "sark-test"})
            headers = {"Authorization": "Bearer t", "X-Request-ID": "r1"}
            return await poster.post(path, {"tool": "é", "n": [1, 2]}, headers, timeout=5, max_bytes=max_bytes)
        finally:
            await pool.aclose()

    return asyncio.run(run())


def test_the_request_under_the_prefix_with_every_header(base_url: str) -> None:
    status, body = post(base_url, "/invoke")
    assert status == 200 and json.loads(body)["got"] == {"tool": "é", "n": [1, 2]}
    seen = _Gateway.seen[0]
    assert seen["path"] == "/api/v1/invoke"
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["host"] == base_url.split("/")[2]
    assert headers["content-type"] == "application/json"
    assert (headers["x-api-key"], headers["authorization"], headers["x-request-id"]) == ("k", "Bearer t", "r1")
    assert headers["accept-encoding"] == "gzip" and headers["user-agent"] == "sark-test"
    assert seen["body"] == json.dumps({"tool": "é", "n": [1, 2]}, ensure_ascii=False, separators=(",", ":")).encode()


def test_gzip_and_chunked_answers_are_decoded(base_url: str) -> None:
    plain = post(base_url, "/invoke")[1]
    assert post(base_url, "/invoke/gzip")[1] == plain
    assert post(base_url, "/invoke/chunked")[1] == plain


@pytest.mark.parametrize(
    ("path", "max_bytes", "error"),
    [
        ("/invoke", 1_000, ResultTooLarge),  # declared Content-Length over the cap
        ("/invoke/chunked", 1_000, ResultTooLarge),  # no length: counted as it arrives
        ("/invoke/bomb", 1_000_000, ResultTooLarge),  # 50 MB of zeros in 50 KB of gzip: never inflated
        ("/invoke/corrupt", None, ProtocolError),
        ("/invoke/truncated", None, ProtocolError),
        ("/invoke/brotli", None, ProtocolError),  # not asked for
        ("/invoke/cut", None, GatewayUnavailable),
    ],
)
def test_bad_answers_are_typed_errors(base_url: str, path: str, max_bytes: int | None, error: type[Exception]) -> None:
    with pytest.raises(error):
        post(base_url, path, max_bytes=max_bytes)
