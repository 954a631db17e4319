"""A small Streamable HTTP MCP server built with the official SDK (``MCPServer``), for tests and the demo.

Tools: ``echo``, ``add``, ``progress`` (``count`` progress notifications), ``slow`` (sleeps ``seconds``),
``big`` (``size`` bytes of text), ``error`` (raises), ``whoami`` (the ``Mcp-Session-Id`` of the request and
a per-session call counter). Options: ``--stateless`` (no sessions), ``--json`` (JSON answers instead of
SSE), ``--token T`` (every request needs ``Authorization: Bearer T``, else 401), ``--events FILE`` (one
line per tool start, end and cancellation: what the server saw), ``--legacy`` (2025-11-25 only:
``initialize`` and ``Mcp-Session-Id``), ``--http-error TOOL=STATUS`` (that HTTP status for a call of
``TOOL``), ``--list-ttl MS`` (``tools/list`` answers carry that ``ttlMs`` cache hint; ``--events`` also
notes ``rpc <method>`` per request naming its method); tool ``rpc_error`` answers a JSON-RPC error.
On start it prints ``READY <port>``.

Run: ``python -m devkit.mcp_http_server --port 0 [--host 127.0.0.1] [--stateless] [--token T]``.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import socket
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from mcp.server.caching import CacheableMethod, CacheHint
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.shared.exceptions import MCPError

__all__ = ["build_app", "main"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


def build_app(*, stateless: bool = False, json_response: bool = False, token: str | None = None,
              events: Path | None = None, legacy: bool = False, http_errors: dict[str, int] | None = None,
              list_ttl_ms: int | None = None) -> App:
    """The ASGI app: the SDK's Streamable HTTP app at ``/mcp``, behind a bearer check when ``token`` is set.

    ``legacy``: ``server/discover`` lists only 2025-11-25, so clients fall back to the ``initialize``
    handshake and a ``Mcp-Session-Id`` session (the SDK server otherwise speaks 2026-07-28 first).
    """
    hints: dict[CacheableMethod, CacheHint] | None = (
        {"tools/list": CacheHint(ttl_ms=list_ttl_ms)} if list_ttl_ms is not None else None)
    server = MCPServer("sark-devkit-http", cache_hints=hints)
    if legacy:
        import mcp_types as types

        async def discover(ctx: Any, params: types.RequestParams) -> types.DiscoverResult:
            return types.DiscoverResult(supported_versions=["2025-11-25"], capabilities=types.ServerCapabilities())

        server._lowlevel_server.add_request_handler("server/discover", types.RequestParams, discover)
    calls: Counter[str] = Counter()

    def note(line: str) -> None:
        if events is not None:
            with events.open("a") as out:
                out.write(line + "\n")

    @server.tool()
    def echo(text: str) -> str:
        """Return ``text``."""
        return text

    @server.tool()
    def add(a: float, b: float) -> float:
        """``a + b``."""
        return a + b

    @server.tool()
    async def progress(count: int, ctx: Context) -> str:
        """Send ``count`` progress notifications, then answer."""
        for i in range(count):
            await ctx.report_progress(i + 1, count, f"step {i + 1}")
        return f"{count} steps"

    @server.tool()
    async def slow(seconds: float, tag: str = "") -> str:
        """Sleep ``seconds`` (``--events`` records the start, the end or the cancellation with ``tag``)."""
        note(f"start {tag}")
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            note(f"cancelled {tag}")
            raise
        note(f"end {tag}")
        return f"slept {seconds}"

    @server.tool()
    def big(size: int) -> str:
        """``size`` bytes of text."""
        return "x" * size

    @server.tool()
    def error(message: str = "boom") -> str:
        """Fail: the SDK answers an ``isError`` result with ``message``."""
        raise ToolError(message)

    @server.tool()
    def rpc_error(code: int = -32602, message: str = "bad params") -> str:
        """Answer a JSON-RPC error (not an ``isError`` result)."""
        raise MCPError(code, message)

    @server.tool()
    def whoami(ctx: Context) -> dict[str, Any]:
        """The request's ``Mcp-Session-Id`` (None when stateless) and how many calls that session made."""
        request = ctx.request_context.request
        headers = getattr(request, "headers", None)
        session = headers.get("mcp-session-id") if headers is not None else None
        key = session or "none"
        calls[key] += 1
        return {"session": session, "calls": calls[key]}

    inner: App = server.streamable_http_app(stateless_http=stateless, json_response=json_response)
    app = inner if not http_errors else _failing(inner, http_errors)
    if legacy:
        app = _handshake_era_only(app)
    if events is not None:
        app = _noting_methods(app, note)
    if token is None:
        return app
    expected = f"Bearer {token}".encode()

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, expected):
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": b'{"error": "invalid_token"}'})
                return
        await app(scope, receive, send)

    return guarded


def _handshake_era_only(app: App) -> App:
    """``app``, but like a 2025-11-25 server it answers 400 to a request of a later revision (its
    ``MCP-Protocol-Version`` header), except the ``server/discover`` probe it answers with its versions."""

    async def refusing(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            headers = dict(scope.get("headers") or [])
            version = headers.get(b"mcp-protocol-version", b"").decode(errors="replace")
            if version > "2025-11-25" and headers.get(b"mcp-method") != b"server/discover":
                body = (b'{"jsonrpc": "2.0", "id": null, "error": {"code": -32600, "message": '
                        b'"Unsupported protocol version: ' + version.encode() + b'"}}')
                await send({"type": "http.response.start", "status": 400,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return refusing


def _noting_methods(app: App, note: Callable[[str], None]) -> App:
    """``app``, noting ``rpc <method>`` for each POST that names its method (``Mcp-Method``, 2026-07-28)."""

    async def noting(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            method = dict(scope.get("headers") or []).get(b"mcp-method")
            if method:
                note(f"rpc {method.decode(errors='replace')}")
        await app(scope, receive, send)

    return noting


def _failing(app: App, statuses: dict[str, int]) -> App:
    """``app``, but a ``tools/call`` of a tool named in ``statuses`` is answered with that HTTP status."""

    async def failing(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = bool(message.get("more_body"))
        status = next((code for tool, code in statuses.items() if f'"name":"{tool}"'.encode() in body), None)
        if status is not None:
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"failing on purpose"})
            return
        replayed = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await app(scope, replay, send)

    return failing


def main(argv: list[str] | None = None) -> None:
    """Serve (on loopback unless ``--host`` says otherwise) until killed."""
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (compose: 0.0.0.0)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--stateless", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--token")
    parser.add_argument("--events", type=Path)
    parser.add_argument("--legacy", action="store_true", help="2025-11-25 only: initialize + Mcp-Session-Id")
    parser.add_argument("--list-ttl", type=int, metavar="MS",
                        help="tools/list answers carry this ttlMs cache hint (2026-07-28, SEP-2549)")
    parser.add_argument("--http-error", action="append", default=[], metavar="TOOL=STATUS",
                        help="answer a tools/call of TOOL with that HTTP status")
    args = parser.parse_args(argv)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit it; without it every 2026-07-28 answer (headers and body written apart)
    # waited ~42 ms for the client's delayed ACK (measured: body 42 ms after headers).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((args.host, args.port))
    sock.listen(128)  # connections wait in the backlog from READY on
    http_errors = {tool: int(code) for tool, _, code in (e.partition("=") for e in args.http_error)}
    app = build_app(stateless=args.stateless, json_response=args.json, token=args.token, events=args.events,
                    legacy=args.legacy, http_errors=http_errors, list_ttl_ms=args.list_ttl)
    print(f"READY {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
    sys.exit(0)


if __name__ == "__main__":
    main()
