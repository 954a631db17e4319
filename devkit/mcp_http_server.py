"""A small Streamable HTTP MCP server built with the official SDK (``MCPServer``), for tests and the demo.

Tools: ``echo``, ``add``, ``progress`` (``count`` progress notifications), ``slow`` (sleeps ``seconds``),
``big`` (``size`` bytes of text), ``error`` (raises), ``whoami`` (the ``Mcp-Session-Id`` of the request and
a per-session call counter), ``trace_meta`` (the ``traceparent``/``tracestate`` of the call's ``_meta``).
Options: ``--stateless`` (no sessions), ``--json`` (JSON answers instead of SSE), ``--token T`` (every
request needs ``Authorization: Bearer T``, else 401), ``--events FILE`` (one line per tool start, end and
cancellation: what the server saw), ``--legacy`` (2025-11-25 only:
``initialize`` and ``Mcp-Session-Id``), ``--http-error TOOL=STATUS`` (that HTTP status for a call of
``TOOL``), ``--list-ttl MS`` (``tools/list`` answers carry that ``ttlMs`` cache hint; ``--events`` also
notes ``rpc <method>`` per request naming its method); tool ``rpc_error`` answers a JSON-RPC error.
``--oauth-client ID:SECRET`` makes the server its own OAuth 2.1 authorization server for the client
credentials grant (the MCP authorization discovery the SDK's ``ClientCredentialsOAuthProvider`` follows):
a request without a valid, unexpired issued token gets 401 with ``WWW-Authenticate: Bearer
resource_metadata="<base>/.well-known/oauth-protected-resource/mcp"``; that protected resource metadata
(RFC 9728) names the server itself as authorization server, whose metadata (RFC 8414,
``/.well-known/oauth-authorization-server``; issuer = ``scheme://Host`` of the request) names
``/token``, which takes ``grant_type=client_credentials`` with the client authenticated by HTTP Basic
(``client_secret_basic``) or form fields (``client_secret_post``) and answers a random bearer token
valid ``--oauth-token-ttl SECONDS`` (default 3600), or 401 ``invalid_client``; ``--events`` notes
``token issued`` per token. (``/authorize`` only answers 400: the metadata names it because the SDK's model
requires the field.) ``--token`` and ``--oauth-client`` exclude each other.
On start it prints ``READY <port>``.

Run: ``python -m devkit.mcp_http_server --port 0 [--host 127.0.0.1] [--stateless] [--token T | --oauth-client
ID:SECRET [--oauth-token-ttl S]]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hmac
import json
import secrets
import socket
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

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
              list_ttl_ms: int | None = None, oauth_client: tuple[str, str] | None = None,
              oauth_token_ttl: int = 3600) -> App:
    """The ASGI app: the SDK's Streamable HTTP app at ``/mcp``, behind a bearer check when ``token`` is set,
    or behind its own OAuth client-credentials authorization server when ``oauth_client`` (id, secret) is.

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

    @server.tool()
    def trace_meta(ctx: Context) -> dict[str, Any]:
        """The W3C trace context the call's ``_meta`` carried (``traceparent``, ``tracestate``; None: absent)."""
        meta: Any = ctx.request_context.meta or {}
        return {"traceparent": meta.get("traceparent"), "tracestate": meta.get("tracestate")}

    inner: App = server.streamable_http_app(stateless_http=stateless, json_response=json_response)
    app = inner if not http_errors else _failing(inner, http_errors)
    if legacy:
        app = _handshake_era_only(app)
    if events is not None:
        app = _noting_methods(app, note)
    if token is not None and oauth_client is not None:
        raise ValueError("token and oauth_client exclude each other")
    if oauth_client is not None:
        return _OAuthServer(app, *oauth_client, ttl=oauth_token_ttl, note=note)
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


_PRM_PATH = "/.well-known/oauth-protected-resource"
_ASM_PATH = "/.well-known/oauth-authorization-server"


async def _answer(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None,
                  ) -> None:
    """A JSON answer (``Cache-Control: no-store``, as RFC 6749 asks of token responses)."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"cache-control", b"no-store"),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


async def _body(receive: Receive, limit: int = 65_536) -> bytes:
    """The request body (at most ``limit`` bytes are kept)."""
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = bool(message.get("more_body"))
    return body[:limit]


class _OAuthServer:
    """``app`` behind an OAuth 2.1 authorization server of its own, for one client (client credentials).

    Serves the protected resource metadata (RFC 9728; at ``/.well-known/oauth-protected-resource`` and
    under it, e.g. ``…/mcp``), the authorization server metadata (RFC 8414) and ``POST /token``; every
    other request needs ``Authorization: Bearer <an issued, unexpired token>``, else 401 naming the
    protected resource metadata. Base URL and issuer: ``scheme://Host`` of each request.
    """

    def __init__(self, app: App, client_id: str, client_secret: str, *, ttl: int,
                 note: Callable[[str], None]) -> None:
        self._app, self._ttl, self._note = app, ttl, note
        self._client_id, self._client_secret = client_id.encode(), client_secret.encode()
        self._tokens: dict[str, float] = {}  # token -> monotonic expiry

    @staticmethod
    def _base(scope: Scope) -> str:
        host = dict(scope.get("headers") or []).get(b"host", b"").decode(errors="replace")
        if not host:
            server = scope.get("server") or ("127.0.0.1", 80)
            host = f"{server[0]}:{server[1]}"
        return f"{scope.get('scheme', 'http')}://{host}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        base = self._base(scope)
        if path == _PRM_PATH or path.startswith(_PRM_PATH + "/"):
            resource = base + (path[len(_PRM_PATH):] or "/mcp")
            await _answer(send, 200, {"resource": resource, "authorization_servers": [base],
                                      "bearer_methods_supported": ["header"]})
        elif path == _ASM_PATH:
            await _answer(send, 200, {
                "issuer": base, "token_endpoint": f"{base}/token", "authorization_endpoint": f"{base}/authorize",
                "response_types_supported": [], "grant_types_supported": ["client_credentials"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"]})
        elif path == "/token":
            await self._token(scope, receive, send)
        elif path == "/authorize":  # named in the metadata (the SDK's model requires it), never used
            await _answer(send, 400, {"error": "unsupported_response_type"})
        elif self._authorized(scope):
            await self._app(scope, receive, send)
        else:
            challenge = f'Bearer resource_metadata="{base}{_PRM_PATH}/mcp"'.encode()
            await _answer(send, 401, {"error": "invalid_token"}, [(b"www-authenticate", challenge)])

    def _authorized(self, scope: Scope) -> bool:
        given = dict(scope.get("headers") or []).get(b"authorization", b"").decode(errors="replace")
        kind, _, token = given.partition(" ")
        expiry = self._tokens.get(token) if kind.lower() == "bearer" and token else None
        return expiry is not None and time.monotonic() < expiry

    def _client_of(self, scope: Scope, form: dict[str, list[str]]) -> tuple[bytes, bytes] | None:
        """The client id and secret the request presents: HTTP Basic (RFC 6749 2.3.1: each form-urlencoded)
        or the ``client_id`` / ``client_secret`` form fields."""
        given = dict(scope.get("headers") or []).get(b"authorization", b"").decode(errors="replace")
        kind, _, credentials = given.partition(" ")
        if kind.lower() == "basic":
            try:
                decoded = base64.b64decode(credentials, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return None
            client_id, colon, secret = decoded.partition(":")
            return (unquote(client_id).encode(), unquote(secret).encode()) if colon else None
        if "client_id" in form and "client_secret" in form:
            return form["client_id"][0].encode(), form["client_secret"][0].encode()
        return None

    async def _token(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method") != "POST":
            await _answer(send, 405, {"error": "invalid_request"}, [(b"allow", b"POST")])
            return
        form = parse_qs((await _body(receive)).decode(errors="replace"))
        presented = self._client_of(scope, form)
        # Both compared whatever the first says (no early exit telling a wrong id from a wrong secret).
        id_ok = presented is not None and hmac.compare_digest(presented[0], self._client_id)
        secret_ok = presented is not None and hmac.compare_digest(presented[1], self._client_secret)
        if not (id_ok and secret_ok):
            await _answer(send, 401, {"error": "invalid_client"}, [(b"www-authenticate", b'Basic realm="token"')])
            return
        if form.get("grant_type", [""])[0] != "client_credentials":
            await _answer(send, 400, {"error": "unsupported_grant_type"})
            return
        now = time.monotonic()
        for stale in [t for t, expiry in self._tokens.items() if expiry <= now]:
            del self._tokens[stale]
        token = secrets.token_urlsafe(32)
        self._tokens[token] = now + self._ttl
        self._note("token issued")
        await _answer(send, 200, {"access_token": token, "token_type": "Bearer", "expires_in": self._ttl})


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
    secured = parser.add_mutually_exclusive_group()
    secured.add_argument("--token", help="every request needs Authorization: Bearer TOKEN")
    secured.add_argument("--oauth-client", metavar="ID:SECRET",
                         help="be an OAuth authorization server for this client (client credentials)")
    parser.add_argument("--oauth-token-ttl", type=int, default=3600, metavar="SECONDS",
                        help="lifetime of the tokens --oauth-client issues")
    parser.add_argument("--events", type=Path)
    parser.add_argument("--legacy", action="store_true", help="2025-11-25 only: initialize + Mcp-Session-Id")
    parser.add_argument("--list-ttl", type=int, metavar="MS",
                        help="tools/list answers carry this ttlMs cache hint (2026-07-28, SEP-2549)")
    parser.add_argument("--http-error", action="append", default=[], metavar="TOOL=STATUS",
                        help="answer a tools/call of TOOL with that HTTP status")
    args = parser.parse_args(argv)
    oauth_client: tuple[str, str] | None = None
    if args.oauth_client is not None:
        client_id, colon, client_secret = args.oauth_client.partition(":")
        if not (client_id and colon and client_secret):
            parser.error("--oauth-client takes ID:SECRET")
        oauth_client = (client_id, client_secret)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit it; without it every 2026-07-28 answer (headers and body written apart)
    # waited ~42 ms for the client's delayed ACK (measured: body 42 ms after headers).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((args.host, args.port))
    sock.listen(128)  # connections wait in the backlog from READY on
    http_errors = {tool: int(code) for tool, _, code in (e.partition("=") for e in args.http_error)}
    app = build_app(stateless=args.stateless, json_response=args.json, token=args.token, events=args.events,
                    legacy=args.legacy, http_errors=http_errors, list_ttl_ms=args.list_ttl,
                    oauth_client=oauth_client, oauth_token_ttl=args.oauth_token_ttl)
    print(f"READY {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
    sys.exit(0)


if __name__ == "__main__":
    main()
