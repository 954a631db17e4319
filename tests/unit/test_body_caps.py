"""Every body read from the Gateway is capped, against a real loopback server sending far too much.

The server writes up to 32 MiB (or an endless line) and records how much it got out before the
client hung up; the client must fail with the typed error while holding a few MB at most.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar, TypeVar

import httpx
import pytest
from httpx_sse._decoders import SSELineDecoder

from config.registry import GatewayServer
from config.settings import Settings
from devkit.stack import wait_for
from tests.helpers import http_server
from workers.errors import ResultTooLarge, ToolError
from workers.gateway.backend import asyncio_pool
from workers.gateway.client import GatewayClient
from workers.gateway.post import ERROR_BODY_BYTES, JsonPost
from workers.models import Invocation
from workers.transports.base import Call
from workers.transports.sse import EVENT_OVERHEAD, SseTransport, bounded_lines

TOTAL = 32 * 1024 * 1024
LIMIT = 100_000  # max_result_bytes of the clients under test
PIECE = 64 * 1024
#: 32 MiB of JSON in ~32 KiB of gzip (made once here, so that the server's work is not traced).
BOMB = gzip.compress(b'{"servers":"' + b"0" * TOTAL + b'"}')
T = TypeVar("T")


class _Flood(BaseHTTPRequestHandler):
    """The first path segment picks what is sent; ``sent[mode]`` is how many bytes went out."""

    sent: ClassVar[dict[str, int]] = {}

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._answer()

    def _answer(self) -> None:
        mode = self.path.split("/")[1]
        sse, js = "text/event-stream", "application/json"
        if mode == "noline":  # an SSE line that never ends
            self._flood(200, sse, b"data: ", b"x" * PIECE)
        elif mode == "nodispatch":  # SSE lines that never end an event
            self._flood(200, sse, b"", b"data: " + b"x" * 1000 + b"\n")
        elif mode == "json":  # a JSON answer to a stream request, without a length
            self._flood(200, js, b'{"a":"', b"x" * PIECE)
        elif mode == "declared":
            self._flood(200, js, b'{"a":"', b"x" * PIECE, length=TOTAL)
        elif mode == "error":
            self._flood(500, js, b'{"error":"', b"x" * PIECE, length=TOTAL)
        elif mode == "error-nolength":
            self._flood(503, "text/html", b"<html>", b"x" * PIECE)
        elif mode == "bomb":
            self._send(200, js, BOMB, encoding="gzip")
        elif mode == "done-multibyte":  # 'done' data of 129 bytes in 69 characters
            done = json.dumps({"s": "é" * 60}, ensure_ascii=False).encode()
            self._send(200, sse, b"event: done\ndata: " + done + b"\n\n")

    def _send(self, status: int, ctype: str, body: bytes, encoding: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if encoding:
            self.send_header("Content-Encoding", encoding)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _flood(self, status: int, ctype: str, head: bytes, filler: bytes, length: int | None = None) -> None:
        mode, sent = self.path.split("/")[1], 0
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            if length is not None:
                self.send_header("Content-Length", str(length))
            self.end_headers()  # HTTP/1.0 without a length: the body ends when the connection does
            self.wfile.write(head)
            sent = len(head)
            while sent < TOTAL:
                self.wfile.write(filler)
                sent += len(filler)
        except OSError:
            pass  # the client hung up: what we want
        finally:
            self.sent[mode] = sent

    def log_message(self, *args: Any) -> None:
        """Quiet."""


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with http_server(_Flood) as base:
        yield base


def _bounded(coro: Awaitable[T], *, max_peak: int = 8 * 1024 * 1024) -> T:
    """Run ``coro``; fail when this process's traced memory peaked over ``max_peak`` meanwhile."""
    async def run() -> T:
        return await coro

    tracemalloc.start()
    try:
        return asyncio.run(run())
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < max_peak, f"peak {peak} bytes"


def _cut_off(mode: str) -> None:
    """The server could not send everything: the client stopped reading and closed."""
    wait_for(lambda: mode in _Flood.sent, 10, f"server side of {mode}")
    assert _Flood.sent[mode] < TOTAL


def _settings(url: str, mode: str) -> Settings:
    return Settings(gateway_url=f"{url}/{mode}", gateway_api_key=None, max_result_bytes=LIMIT,
                    discovery_wait_min=0.01, discovery_wait_max=0.02)


async def _stream(url: str, mode: str) -> dict[str, Any]:
    client = GatewayClient(_settings(url, mode))
    transport = SseTransport(client, max_result_bytes=LIMIT, reconnects=0)
    call = Call(server=GatewayServer(name="s", transport="sse"), invocation=Invocation(server="s", tool="t"),
                request_id="r1", timeout=10)
    try:
        return (await transport.invoke(call)).result
    finally:
        await client.close()


async def _discover(url: str, mode: str) -> object:
    client = GatewayClient(_settings(url, mode))
    try:
        return await client.list_servers()
    finally:
        await client.close()


@pytest.mark.parametrize("mode", ["noline", "nodispatch"])
def test_sse_event_that_never_ends_is_cut_at_the_cap(url: str, mode: str) -> None:
    _Flood.sent.pop(mode, None)
    with pytest.raises(ResultTooLarge, match=f"SSE event or line over {LIMIT + EVENT_OVERHEAD} bytes"):
        _bounded(_stream(url, mode))
    _cut_off(mode)


def test_sse_json_answer_is_capped(url: str) -> None:
    _Flood.sent.pop("json", None)
    with pytest.raises(ResultTooLarge, match=f"result exceeds {LIMIT} bytes"):  # as over HTTP
        _bounded(_stream(url, "json"))
    _cut_off("json")


@pytest.mark.parametrize("mode", ["error", "error-nolength"])
def test_sse_error_answer_is_read_only_for_its_message(url: str, mode: str) -> None:
    _Flood.sent.pop(mode, None)
    with pytest.raises(ToolError) as caught:
        _bounded(_stream(url, mode))
    assert caught.value.status_code in (500, 503)
    assert len(str(caught.value)) < ERROR_BODY_BYTES + 100
    _cut_off(mode)


def test_sse_done_event_cap_counts_bytes(url: str) -> None:
    async def small() -> None:
        client = GatewayClient(_settings(url, "done-multibyte"))
        transport = SseTransport(client, max_result_bytes=100)
        call = Call(server=GatewayServer(name="s", transport="sse"), invocation=Invocation(server="s", tool="t"),
                    request_id="r1", timeout=10)
        try:
            await transport.invoke(call)
        finally:
            await client.close()

    with pytest.raises(ResultTooLarge, match="'done' event is 129 bytes"):
        asyncio.run(small())


@pytest.mark.parametrize("mode", ["json", "declared", "bomb"])
def test_discovery_body_is_capped(url: str, mode: str) -> None:
    _Flood.sent.pop(mode, None)
    with pytest.raises(ResultTooLarge, match=f"exceeds {LIMIT} bytes"):
        _bounded(_discover(url, mode))
    if mode != "bomb":
        _cut_off(mode)


@pytest.mark.parametrize("mode", ["error", "error-nolength"])
def test_discovery_error_body_is_read_only_for_its_message(url: str, mode: str) -> None:
    with pytest.raises(ToolError) as caught:  # 5xx: retried, each time reading only the head
        _bounded(_discover(url, mode))
    assert caught.value.status_code in (500, 503)
    assert len(str(caught.value)) < 400


@pytest.mark.parametrize("mode", ["error", "error-nolength"])
def test_invoke_error_body_is_read_only_for_its_message(url: str, mode: str) -> None:
    async def post() -> tuple[int, bytes]:
        pool = asyncio_pool(limits=httpx.Limits())
        try:
            poster = JsonPost(pool, f"{url}/{mode}", {})
            return await poster.post("/invoke", {}, {}, timeout=10, max_bytes=LIMIT)
        finally:
            await pool.aclose()

    _Flood.sent.pop(mode, None)
    status, body = _bounded(post())
    assert status in (500, 503)  # the status, not ResultTooLarge: a 5xx stays a 5xx for retries and breakers
    assert len(body) == ERROR_BODY_BYTES
    _cut_off(mode)


# --- the bounded SSE line reader on its own ---------------------------------------------------------

SAMPLE = b"id: 1\r\ndata: a\r\rdata: b\n\nevent: done\r\ndata: {}\r\n\r\n:comment\rdata: \xc3\xa9\n\n"


async def _pieces(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        if part:
            yield part


async def _lines(limit: int, *parts: bytes) -> list[str]:
    return [line async for line in bounded_lines(_pieces(*parts), limit)]


def test_bounded_lines_split_like_httpx_sse_wherever_the_pieces_break() -> None:
    reference = SSELineDecoder()
    expected = reference.decode(SAMPLE.decode()) + reference.flush()
    for i in range(len(SAMPLE) + 1):
        for j in range(i, len(SAMPLE) + 1):
            got = asyncio.run(_lines(1000, SAMPLE[:i], SAMPLE[i:j], SAMPLE[j:]))
            assert got == expected, (i, j)


def test_bounded_lines_count_the_bytes_of_an_event_across_its_lines() -> None:
    two_events = (b"data: 12345\ndata: 6\n\n", b"data: 12345\n\n")  # 18 bytes, then 11
    assert asyncio.run(_lines(18, *two_events)) == ["data: 12345", "data: 6", "", "data: 12345", ""]
    with pytest.raises(ResultTooLarge):
        asyncio.run(_lines(17, *two_events))
    with pytest.raises(ResultTooLarge):  # 10 characters, 14 bytes
        asyncio.run(_lines(13, "data: éééé\n\n".encode()))
