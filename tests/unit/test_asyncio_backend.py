"""The Gateway client's asyncio network backend against real loopback servers: plain, TLS, keep-alive
connections the server dropped, hangs, resets and refusals, each surfacing as httpx's own errors."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from config.settings import Settings
from devkit.stack import free_port
from tests.helpers import http_server
from workers.errors import GatewayUnavailable, InvocationTimeout
from workers.gateway.backend import AsyncioBackend, asyncio_pool, transport_on
from workers.gateway.client import GatewayClient


class _Echo(BaseHTTPRequestHandler):
    """Answers POST with the body's length and its connection's client port; closes after ``close_after``."""

    protocol_version = "HTTP/1.1"
    close_after = 0  # 0: keep-alive forever; n: close the connection (silently) after n answers
    served: ClassVar[dict[tuple[str, int], int]] = {}

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        peer = self.client_address
        self.served[peer] = self.served.get(peer, 0) + 1
        data = json.dumps({"size": len(body), "port": peer[1]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        if self.close_after and self.served[peer] >= self.close_after:
            self.close_connection = True  # no "Connection: close" header: the client finds out later

    def log_message(self, *args: Any) -> None:
        """Quiet."""


@pytest.fixture()
def echo_url() -> Iterator[str]:
    with http_server(_Echo) as url:
        yield url


def _self_signed(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(cert_path))
    return server, client


def _client(verify: ssl.SSLContext | bool = True) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=transport_on(asyncio_pool(limits=httpx.Limits(), verify=verify)), timeout=2)


def test_gateway_client_pool_runs_on_the_asyncio_backend() -> None:
    async def scenario() -> object:
        client = GatewayClient(Settings(gateway_url="http://127.0.0.1:9"))
        backend = client.http._transport._pool._network_backend  # type: ignore[attr-defined]
        await client.close()
        return backend

    assert isinstance(asyncio.run(scenario()), AsyncioBackend)


def test_keep_alive_reuse_and_large_bodies(echo_url: str) -> None:
    async def scenario() -> list[dict[str, int]]:
        async with _client() as client:
            answers = []
            for size in (10, 3_000_000, 10):  # a body larger than any socket buffer, both ways of it
                response = await client.post(echo_url, content=b"x" * size)
                answers.append(response.raise_for_status().json())
            return answers

    answers = asyncio.run(scenario())
    assert [a["size"] for a in answers] == [10, 3_000_000, 10]
    assert len({a["port"] for a in answers}) == 1  # one connection, kept alive


def test_connection_the_server_dropped_while_idle_is_not_reused(echo_url: str) -> None:
    _Echo.close_after = 1
    try:
        async def scenario() -> list[int]:
            async with _client() as client:
                ports = []
                for _ in range(5):
                    response = await client.post(echo_url, content=b"hi")
                    ports.append(response.raise_for_status().json()["port"])
                    await asyncio.sleep(0.05)  # the server's FIN arrives while the connection idles
                return ports

        ports = asyncio.run(scenario())
    finally:
        _Echo.close_after = 0
    assert len(set(ports)) == 5


def test_tls(tmp_path: Path) -> None:
    server_context, client_context = _self_signed(tmp_path)
    async def post(url: str, verify: ssl.SSLContext | bool) -> dict[str, int]:
        async with _client(verify) as client:
            return (await client.post(url, content=b"secret")).raise_for_status().json()  # type: ignore[no-any-return]

    with http_server(_Echo, server_context) as url:
        assert asyncio.run(post(url, client_context))["size"] == 6
        with pytest.raises(httpx.ConnectError):  # the system store does not know this certificate
            asyncio.run(post(url, True))


def _raw_server(behaviour: str) -> tuple[socket.socket, threading.Thread]:
    listener = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        if behaviour == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            conn.close()
        elif behaviour == "hang":
            threading.Event().wait(5)
            conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return listener, thread


def test_failures_surface_as_httpx_errors_and_then_as_typed_gateway_errors() -> None:
    async def post(url: str, timeout: float = 2) -> None:
        async with _client() as client:
            await client.post(url, content=b"x", timeout=timeout)

    listener, _ = _raw_server("hang")
    with pytest.raises(httpx.ReadTimeout):
        asyncio.run(post(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=0.3))
    listener.close()
    listener, _ = _raw_server("reset")
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        asyncio.run(post(f"http://127.0.0.1:{listener.getsockname()[1]}"))
    listener.close()
    with pytest.raises(httpx.ConnectError):
        asyncio.run(post(f"http://127.0.0.1:{free_port()}"))

    async def gateway_call(url: str, timeout: float) -> None:
        client = GatewayClient(Settings(gateway_url=url, gateway_api_key=None, invoke_attempts=1))
        try:
            await client.invoke_tool("s", "t", {}, None, "r1", timeout=timeout)
        finally:
            await client.close()

    listener, _ = _raw_server("hang")
    with pytest.raises(InvocationTimeout):
        asyncio.run(gateway_call(f"http://127.0.0.1:{listener.getsockname()[1]}", 0.3))
    listener.close()
    with pytest.raises(GatewayUnavailable):
        asyncio.run(gateway_call(f"http://127.0.0.1:{free_port()}", 2))
