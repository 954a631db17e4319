"""streamable-http transport: MCP servers over Streamable HTTP, spoken to with the official ``mcp`` SDK client.

Registry entries are :class:`config.streamable_http_spec.StreamableHttpServer`. Each (server, identity)
gets its own warm session (:class:`~workers.transports.session_pool.SessionPool` of :class:`HttpLink`
connections over the SDK's ``streamable_http_client``); the identity is ``service`` (``auth: none`` or
``bearer-env``) or, for ``auth: forward``, the caller's token's issuer and subject (read from the JWT
payload, not verified: only to keep users apart; an opaque token: its SHA-256). Sessions are never shared
between identities, and each call's requests carry that call's own token. Every session of the process
shares one ``httpx2`` connection pool.

``auth: oauth-client-credentials``: the SDK's client-credentials provider (:func:`oauth_provider`) on each
session's ``httpx2`` client, one per server and worker process, so its token outlives sessions; a token
request the authorization server refuses → ``AuthenticationFailed`` (phase ``oauth``).

Errors (the table is :data:`workers.errors.FAILURES`): HTTP 401 → ``AuthenticationFailed``, 403 →
``AuthorizationDenied``, other statuses >= 400 → ``ToolError(status)`` (:func:`workers.errors.status_error`);
connection refused, reset or lost mid-call → ``ServerUnavailable`` (a breaker failure); a JSON-RPC error →
``ToolError`` (its HTTP status if any, else 400 for bad params or an unknown method, else 502); an
``isError`` result is a normal outcome; an answer over ``max_result_bytes`` (a JSON body, or one SSE event:
the SDK's ``max_sse_event_size``) → ``ResultTooLarge``; a pinned ``protocol_version`` is what the session
speaks (the SDK's ``mode``: ``legacy`` for a 2025-era pin, the revision itself for a later one), and a
session that negotiated another anyway → ``ProtocolError``; no answer in time → ``InvocationTimeout``
(the SDK abandons the request: ``notifications/cancelled`` on 2025-11-25, the response stream closed on
2026-07-28); a session the
server no longer knows (404 on ``Mcp-Session-Id``: it restarted) → a new session and the call sent once
more (a 404 proves the tool was not reached).

SDK limitation worked around here: the SDK's Streamable HTTP client drops the HTTP status of an error
answer (any status but 404 becomes JSON-RPC ``INTERNAL_ERROR "Server returned an error response"``) and a
connection error crashes the transport's task group. Each session's ``httpx2`` client therefore wraps the
shared pool in :class:`_Recorder`, which notes statuses and connection errors for the call that sent the
request (a context variable: the SDK sends each request in a task copied from the caller's context).
Upstream issue text: "streamable_http_client: expose the HTTP status of a non-2xx answer (e.g. as
``ErrorData.data = {"http_status": 401}``) and turn connection errors of a request's POST into a JSON-RPC
error for that request instead of crashing the transport's task group".
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import logging
import warnings
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx2
import mcp_types as types
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError

from config.registry import ServerBase
from config.streamable_http_spec import StreamableHttpServer
from workers import tracing
from workers.errors import (
    AuthenticationFailed,
    DiscoveryTimeout,
    InvalidInvocation,
    InvocationTimeout,
    ProtocolError,
    ResultTooLarge,
    SarkError,
    ServerUnavailable,
    ToolError,
    status_error,
)
from workers.models import GatewayToolInfo
from workers.scrub import register_secret
from workers.transports.base import BuildContext, Call, ChunkSink, ToolOutcome
from workers.transports.mcp_calls import ProgressForwarder, list_every_tool, outcome_of
from workers.transports.session_pool import Generation, PoolSettings, SessionPool

if TYPE_CHECKING:
    from mcp.client._transport import TransportStreams

__all__ = ["HttpLink", "StreamableHttpTransport", "build", "identity_of"]

log = logging.getLogger("sark.streamable-http")

_KIND = "streamable-http"
_ENVELOPE = 65_536
_CONNECT_TIMEOUT = 10.0
#: What the SDK says of an SSE event over ``max_sse_event_size`` (httpx2's ``SSEError`` text, as of 2.16).
_EVENT_TOO_LARGE = "byte limit"
#: The SDK's words for an error status without a JSON-RPC body (its stand-ins; the status says more).
_STAND_INS = ("Server returned an error response", "Session terminated", "Not Found")


@dataclass
class _Probe:
    """What the HTTP layer saw for one call, or for one session (its handshake included)."""

    status: int | None = None
    error: httpx2.TransportError | None = None
    too_large: int | None = None
    #: The error status of the last POST that was not to the MCP endpoint: an OAuth token request's.
    token_status: int | None = None
    #: The call's own token (``auth: forward``): sent with its requests, whoever else shares the session.
    token: str | None = field(default=None, repr=False)


_probe: contextvars.ContextVar[_Probe | None] = contextvars.ContextVar("sark_streamable_http_probe", default=None)


class _TooLarge(httpx2.StreamError):
    """An answer over the cap (a ``StreamError``, so the SDK resolves the request instead of crashing)."""


class _Capped(httpx2.AsyncByteStream):
    """A JSON response body that stops past ``limit`` bytes (the SDK reads JSON bodies without a cap)."""

    def __init__(self, inner: httpx2.AsyncByteStream, limit: int, probes: list[_Probe]) -> None:
        self._inner, self._limit, self._probes = inner, limit, probes

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self._inner:
            seen += len(chunk)
            if seen > self._limit:
                for probe in self._probes:
                    probe.too_large = seen
                raise _TooLarge(f"answer over {self._limit} bytes")
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


def _same_endpoint(url: httpx2.URL, endpoint: httpx2.URL) -> bool:
    return (url.scheme, url.host, url.port, url.path.rstrip("/")) == (
        endpoint.scheme, endpoint.host, endpoint.port, endpoint.path.rstrip("/"))


class _Recorder(httpx2.AsyncBaseTransport):
    """The shared connection pool, noting what each POST met (see the module docstring); never closes it."""

    def __init__(self, inner: httpx2.AsyncBaseTransport, session: _Probe, limit: int, endpoint: str) -> None:
        self._inner, self._session, self._limit = inner, session, limit
        self._endpoint = httpx2.URL(endpoint)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        call = _probe.get()
        probes = [self._session] if call is None else [self._session, call]
        post = request.method == "POST"
        try:
            response = await self._inner.handle_async_request(request)
        except httpx2.TransportError as exc:
            if post:
                for probe in probes:
                    probe.error = exc
            raise
        if post and not _same_endpoint(request.url, self._endpoint):  # an OAuth token request
            for probe in probes:
                probe.token_status = response.status_code if response.status_code >= 400 else None
        elif post:  # the last POST's error status (an OAuth flow's 401 before its token is not the answer)
            for probe in probes:
                probe.status = response.status_code if response.status_code >= 400 else None
        json_body = response.headers.get("content-type", "").lower().startswith("application/json")
        if not (post and json_body and isinstance(response.stream, httpx2.AsyncByteStream)):
            return response  # SSE bodies: the SDK caps each event (max_sse_event_size); a stream may run long
        return httpx2.Response(response.status_code, headers=response.headers,
                               stream=_Capped(response.stream, self._limit, probes),
                               extensions=response.extensions)


class _Bearer(httpx2.Auth):
    """``Authorization: Bearer <token>``: a call's requests carry the call's own token (its probe's), the
    session's own requests (handshake, GET stream, DELETE) the newest token of the identity (None: no header).

    Per request, not per session: the identity comes from unverified claims, so two callers presenting the
    same ``sub`` may share a session, but neither ever sends the other's token.
    """

    def __init__(self, token: str | None) -> None:
        self.token = token

    def auth_flow(self, request: httpx2.Request) -> Generator[httpx2.Request, httpx2.Response, None]:
        call = _probe.get()
        token = call.token if call is not None and call.token else self.token
        if token:
            request.headers["Authorization"] = f"Bearer {token}"
        yield request


class _Pools(httpx2.AsyncBaseTransport):
    """The process's connections to streamable-http servers: requests (POST, DELETE) in one pool, the
    long-lived GET event streams of 2025-11-25 sessions in another. Each such session holds its GET stream
    open until the session stops (``idle_timeout``), so with many forwarded users sharing one pool the
    streams would take every connection and leave tool calls waiting for one."""

    def __init__(self) -> None:
        self._calls = httpx2.AsyncHTTPTransport(
            limits=httpx2.Limits(max_connections=200, max_keepalive_connections=50, keepalive_expiry=30.0))
        self._streams = httpx2.AsyncHTTPTransport(
            limits=httpx2.Limits(max_connections=500, max_keepalive_connections=0))

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        pool = self._streams if request.method == "GET" else self._calls
        return await pool.handle_async_request(request)

    async def aclose(self) -> None:
        await self._calls.aclose()
        await self._streams.aclose()


class HttpLink:
    """One Streamable HTTP connection (one SDK client transport) as a session-pool ``Connection``.

    ``failure`` is a :class:`ServerUnavailable` once a request met a connection error (the SDK then
    ends the transport): the pool backs off before the next session.
    """

    pid: int | None = None

    def __init__(self, server: StreamableHttpServer, pool: httpx2.AsyncBaseTransport, *, headers: dict[str, str],
                 auth: httpx2.Auth, limit: int) -> None:
        self.server = server
        self.probe = _Probe()
        self.dead = asyncio.Event()
        timeout = httpx2.Timeout(_CONNECT_TIMEOUT, read=None)  # the call's own deadline bounds reads
        self._client = httpx2.AsyncClient(transport=_Recorder(pool, self.probe, limit, server.url),
                                          headers=headers,
                                          auth=auth, timeout=timeout)
        self._transport = streamable_http_client(server.url, http_client=self._client, max_sse_event_size=limit)

    @property
    def failure(self) -> SarkError | None:
        """Why the connection ended, when a connection error ended it."""
        if self.probe.error is None:
            return None
        return ServerUnavailable(f"streamable-http server {self.server.name!r} cannot be reached: "
                                  f"{type(self.probe.error).__name__}", {"server": self.server.name})

    async def __aenter__(self) -> TransportStreams:
        return await self._transport.__aenter__()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        try:
            await self._transport.__aexit__(exc_type, exc, traceback)
        except Exception as crash:  # the SDK's task group ended by a request's connection error (see above)
            if self.probe.error is None:
                self.probe.error = httpx2.TransportError(type(crash).__name__)
            log.debug("streamable-http server %s: connection ended: %r", self.server.name, crash)
        finally:
            self.dead.set()


class _TokenMemory:
    """The SDK's ``TokenStorage`` in this process's memory: the fleet's token of one server."""

    def __init__(self) -> None:
        self._tokens: OAuthToken | None = None
        self._client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self._tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self._tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self._client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self._client = client_info


def oauth_provider(server: StreamableHttpServer, environ: Mapping[str, str]) -> httpx2.Auth:
    """The SDK's OAuth client-credentials provider for ``server`` (its secret read from ``environ``, and
    registered with the scrubber). Without ``oauth.issuer`` the SDK warns once per provider; check-config
    says so instead, so the warning is not repeated in the worker's log."""
    from mcp.client.auth.extensions.client_credentials import (
        ClientCredentialsOAuthProvider,
        PrivateKeyJWTOAuthProvider,
        SignedJWTParameters,
    )

    oauth = server.oauth
    assert oauth is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MCPDeprecationWarning)
        if oauth.method == "private_key_jwt":
            key = environ.get(oauth.private_key_env or "", "")
            register_secret(key)
            assertions = SignedJWTParameters(issuer=oauth.client_id, subject=oauth.client_id, signing_key=key,
                                             signing_algorithm=oauth.signing_algorithm)
            return PrivateKeyJWTOAuthProvider(server.url, _TokenMemory(), oauth.client_id,
                                              assertions.create_assertion_provider(), scope=oauth.scope,
                                              issuer=oauth.issuer)
        secret = environ.get(oauth.client_secret_env or "", "")
        register_secret(secret)
        return ClientCredentialsOAuthProvider(server.url, _TokenMemory(), oauth.client_id, secret,
                                              token_endpoint_auth_method=oauth.method, scope=oauth.scope,
                                              issuer=oauth.issuer)


class _SharedOAuth(httpx2.Auth):
    """The SDK's OAuth provider, shared by every call of one server without serialising them.

    SDK limitation worked around here: ``OAuthClientProvider`` holds its context lock across the whole
    request (``async with self.context.lock: … response = yield request``), so concurrent calls through one
    provider run one at a time until each answer's headers arrive (for a JSON-answering server: until the
    tool finishes). While its token is valid, the request carries it without the lock; a 401 (or a 403
    ``insufficient_scope``) hands the request to the provider's own flow, which discovers, fetches a new
    token under its lock and re-sends. Upstream issue text: "OAuthClientProvider: do not hold
    context.lock across the yielded request; take it only to read or renew the token".
    """

    def __init__(self, provider: httpx2.Auth) -> None:
        self._provider = provider

    async def async_auth_flow(self, request: httpx2.Request) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        context = getattr(self._provider, "context", None)
        if context is not None and context.is_token_valid():
            request.headers["Authorization"] = f"Bearer {context.current_tokens.access_token}"
            response = yield request
            if response.status_code not in (401, 403):
                return
            await response.aread()
        flow = self._provider.async_auth_flow(request)
        try:
            outgoing = await flow.__anext__()
            while True:
                incoming = yield outgoing
                outgoing = await flow.asend(incoming)
        except StopAsyncIteration:
            return


def _session_expired(exc: MCPError, probe: _Probe, protocol_version: str) -> bool:
    """The server refused this request's ``Mcp-Session-Id`` (it restarted, or expired the session), so it never
    dispatched it: a 404 answering the call's own request on a 2025-era session, as ``INVALID_REQUEST`` (the
    SDK server's "Session not found", or the SDK client's "Session terminated" stand-in for a body-less 404).
    On 2025-era sessions tool errors travel in the answer, not as HTTP statuses, so a 404 there is the
    session's. 2026-07-28 has no sessions, and its servers answer METHOD_NOT_FOUND as a 404 (a tool may
    raise it after doing work): never a reason to re-send."""
    return (protocol_version not in MODERN_PROTOCOL_VERSIONS and probe.status == 404
            and exc.code == types.INVALID_REQUEST)


def client_mode(pin: str | None) -> str:
    """The SDK client's ``mode`` for a registry pin: negotiate (none), the handshake (a 2025-era revision), or
    speak exactly that revision (2026-07-28 and later)."""
    if pin is None:
        return "auto"
    return pin if pin in MODERN_PROTOCOL_VERSIONS else "legacy"


def identity_of(server: StreamableHttpServer, token: str | None,
                verify: Callable[[str], Mapping[str, Any]] | None = None) -> str:
    """Whose session a call uses: ``service``; for ``auth: forward``, the token's issuer and subject when
    ``verify`` (the worker's user-token verifier, ``SARK_AUTH_*``) accepts it, else the token's own SHA-256
    (an unverified ``sub`` could be forged to join or disturb another user's session), or ``anonymous``."""
    if server.auth != "forward":
        return "service"
    if not token:
        return "anonymous"
    if verify is not None:
        try:
            claims = verify(token)
        except SarkError:
            claims = {}
        sub = claims.get("sub")
        if isinstance(sub, str) and sub:
            return "sub:" + json.dumps([claims.get("iss"), sub])
    return "token:" + hashlib.sha256(token.encode()).hexdigest()


class ServerSessions:
    """The warm session of one (server, identity) in this worker process, with this transport's calls."""

    def __init__(self, server: StreamableHttpServer, pool: httpx2.AsyncBaseTransport, *,
                 environ: Mapping[str, str], max_result_bytes: int, token: str | None) -> None:
        self.server = server
        self._pool, self._environ = pool, environ
        self._limit = max_result_bytes + _ENVELOPE
        self.auth = _Bearer(token)
        #: auth: oauth-client-credentials: the SDK's provider (its token outlives sessions; built on first use).
        self._oauth: httpx2.Auth | None = None
        settings = PoolSettings(startup_timeout=server.startup_timeout, idle_timeout=server.idle_timeout,
                                max_concurrency=server.max_concurrency, response_cache=True,
                                mode=client_mode(server.protocol_version))
        self._sessions: SessionPool[HttpLink] = SessionPool(
            self._connect, name=server.name, settings=settings, startup_error=self._startup_error, kind=_KIND)
        #: Calls and listings using these sessions right now.
        self.users = 0

    @property
    def unused(self) -> bool:
        """Nothing uses it and its session has stopped (idle_timeout): it may be dropped."""
        return self.users == 0 and self._sessions.idle

    def _connect(self) -> HttpLink:
        headers: dict[str, str] = {}
        for header, variable in self.server.headers.items():
            headers[header] = self._environ.get(variable, "")
        auth: httpx2.Auth = self.auth
        if self.server.oauth is not None:
            if self._oauth is None:
                self._oauth = _SharedOAuth(oauth_provider(self.server, self._environ))
            auth = self._oauth
        return HttpLink(self.server, self._pool, headers=headers, auth=auth, limit=self._limit)

    def _missing(self) -> SarkError | None:
        """The error for a header, token or OAuth secret variable the worker's environment lacks (checked
        before a call)."""
        missing = [n for n in self.server.variables() if not self._environ.get(n)]
        if not missing:
            return None
        return ServerUnavailable(f"streamable-http server {self.server.name!r}: environment variable(s) "
                                  f"{', '.join(missing)} not set in the worker", {"server": self.server.name})

    def _startup_error(self, link: HttpLink, exc: BaseException) -> SarkError:
        name = self.server.name
        if link.probe.token_status is not None:  # the authorization server refused the fleet's credentials
            return self._oauth_refused(link.probe.token_status)
        if link.probe.status is not None:  # the server answered the handshake with an error status
            return self._status_error(link.probe.status, "initialize")
        if link.failure is not None:
            return link.failure
        if isinstance(exc, TimeoutError):
            return ServerUnavailable(f"streamable-http server {name!r}: no session within "
                                      f"{self.server.startup_timeout:g}s", {"server": name, "phase": "initialize"})
        if isinstance(exc, SarkError):
            return exc
        return ProtocolError(f"streamable-http server {name!r} failed the MCP handshake: {type(exc).__name__}",
                             {"server": name, "phase": "initialize"})

    def _oauth_refused(self, status: int) -> SarkError:
        name = self.server.name
        return AuthenticationFailed(f"streamable-http server {name!r}: its authorization server refused the "
                                    f"fleet's OAuth client credentials (HTTP {status} from the token endpoint)",
                                    {"server": name, "phase": "oauth", "status_code": status})

    def _status_error(self, status: int, what: str) -> SarkError:
        name = self.server.name
        return status_error(status, f"streamable-http server {name!r} answered HTTP {status} to {what}",
                            {"server": name})

    def _error(self, exc: MCPError, probe: _Probe, what: str, session: _Probe | None = None) -> SarkError:
        """The error for ``exc``, from what this call's requests met (``probe``) and, for a connection that
        ended, what the session's did (``session``: a token renewal another call made may have ended it)."""
        name = self.server.name
        if (session is not None and session.token_status is not None and exc.code == types.CONNECTION_CLOSED
                and probe.token_status is None):
            return self._oauth_refused(session.token_status)
        if probe.too_large is not None:
            return ResultTooLarge(f"streamable-http server {name!r}: answer over {self._limit - _ENVELOPE} bytes",
                                  {"server": name, "what": "result", "limit": self._limit - _ENVELOPE,
                                   "size": probe.too_large})
        if probe.token_status is not None:  # a token renewal during the call was refused
            return self._oauth_refused(probe.token_status)
        if probe.status is not None and (probe.status in (401, 403) or exc.error.message in _STAND_INS):
            return self._status_error(probe.status, what)
        if exc.code == types.CONNECTION_CLOSED and _EVENT_TOO_LARGE in exc.error.message:
            return ResultTooLarge(f"streamable-http server {name!r}: {exc.error.message}",
                                  {"server": name, "what": "event", "limit": self._limit - _ENVELOPE})
        if probe.error is not None or exc.code == types.CONNECTION_CLOSED:
            reason = type(probe.error).__name__ if probe.error is not None else exc.error.message
            return ServerUnavailable(f"streamable-http server {name!r}: connection lost during {what}: {reason}",
                                      {"server": name})
        status = 400 if exc.code in (types.INVALID_PARAMS, types.METHOD_NOT_FOUND, types.INVALID_REQUEST) else 502
        if probe.status is not None:  # a JSON-RPC error in the body of an error status (2026-07-28 servers)
            status = probe.status
        return ToolError(f"streamable-http server {name!r} answered error {exc.code}: {exc.error.message}",
                         {"server": name, "code": exc.code}, status_code=status)

    def _check_version(self, gen: Generation[HttpLink], version: str) -> None:
        """A pinned revision: refuse a session that negotiated another anyway (the handshake may settle on an
        older 2025-era revision than the pin)."""
        pin = self.server.protocol_version
        if pin is not None and version != pin:
            gen.retire("protocol version")
            raise ProtocolError(f"streamable-http server {self.server.name!r} speaks MCP {version}, the registry "
                                f"pins {pin}", {"server": self.server.name, "protocol_version": version})

    async def call_tool(self, tool: str, arguments: dict[str, Any], *, timeout: float, token: str | None,
                        sink: ChunkSink | None) -> ToolOutcome:
        """Call ``tool`` on the warm session (starting it if needed) within ``timeout`` seconds in all."""
        if tracing.active:
            with tracing.mcp_span(_KIND, self.server.name, tool):
                return await self._call_tool(tool, arguments, timeout=timeout, token=token, sink=sink)
        return await self._call_tool(tool, arguments, timeout=timeout, token=token, sink=sink)

    async def _call_tool(self, tool: str, arguments: dict[str, Any], *, timeout: float, token: str | None,
                         sink: ChunkSink | None) -> ToolOutcome:
        if (missing := self._missing()) is not None:
            raise missing
        if token:
            self.auth.token = token  # the newest token of this identity
        forwarder = ProgressForwarder(sink) if sink is not None else None
        name = self.server.name
        self.users += 1
        try:
            async with asyncio.timeout(timeout), self._sessions.slots:
                for attempt in (1, 2):
                    gen, client = await self._sessions.session()
                    self._check_version(gen, client.protocol_version)
                    probe = _Probe(token=token)
                    reset = _probe.set(probe)
                    try:
                        async with gen.use():
                            result = await client.call_tool(
                                tool, arguments, progress_callback=forwarder.on_progress if forwarder else None)
                        break
                    except MCPError as exc:
                        if attempt == 1 and _session_expired(exc, probe, client.protocol_version):  # not dispatched
                            log.info("streamable-http server %s: session expired, starting a new one", name,
                                     extra={"streamable-http_server": name})
                            gen.retire("session expired")
                            continue
                        if probe.error is not None:  # an error status leaves the session usable
                            gen.retire("connection error")
                        raise self._error(exc, probe, repr(tool), gen.connection.probe) from None
                    finally:
                        _probe.reset(reset)
                if forwarder is not None:
                    await forwarder.drain()
        except TimeoutError:
            raise InvocationTimeout(f"streamable-http server {name!r}: no answer to {tool!r} within {timeout:g}s",
                                    {"server": name, "tool": tool}) from None
        except ValidationError as exc:
            raise ProtocolError(f"streamable-http server {name!r} sent an invalid result: "
                                f"{exc.error_count()} validation error(s)", {"server": name}) from None
        finally:
            self.users -= 1
            if forwarder is not None:
                forwarder.close()
        self._sessions.succeeded()
        return outcome_of(result, forwarder)

    async def list_tools(self, *, timeout: float, token: str | None = None) -> list[GatewayToolInfo]:
        """Every tool of the server, following ``nextCursor`` pages; the first page comes from the session's
        cache while the server's ``ttlMs`` hint says it is fresh (2026-07-28 servers; otherwise asked).
        ``token``: the forwarded caller's, sent with these requests."""
        if (missing := self._missing()) is not None:
            raise missing
        name = self.server.name
        if token:
            self.auth.token = token  # the newest token of this identity (a session it starts sends it)
        self.users += 1
        try:
            async with asyncio.timeout(timeout):
                for attempt in (1, 2):
                    gen, client = await self._sessions.session()
                    probe = _Probe(token=token)
                    reset = _probe.set(probe)
                    try:
                        return await list_every_tool(client, "streamable-http", name)
                    except MCPError as exc:
                        if attempt == 1 and _session_expired(exc, probe, client.protocol_version):
                            gen.retire("session expired")
                            continue
                        raise self._error(exc, probe, "tools/list", gen.connection.probe) from None
                    finally:
                        _probe.reset(reset)
                raise AssertionError("unreachable: the second attempt returns or raises")
        except TimeoutError:
            raise DiscoveryTimeout(f"streamable-http server {name!r}: tools/list not answered within {timeout:g}s",
                                   {"server": name}) from None
        finally:
            self.users -= 1

    async def close(self) -> None:
        """Stop the session (calls still in flight fail)."""
        await self._sessions.close()


def http_server(server: ServerBase) -> StreamableHttpServer:
    """The call's server, which must be a streamable-http one."""
    if not isinstance(server, StreamableHttpServer):
        raise InvalidInvocation(f"server {server.name!r} is not a streamable-http server")
    return server


class StreamableHttpTransport:
    """The ``streamable-http`` transport: one :class:`ServerSessions` per (server, identity).

    Args:
        servers: The registry's streamable-http servers.
        max_result_bytes: Cap on one answer.
        list_timeout: Seconds allowed for ``tools/list`` (all pages, including a cold start).
        environ: Where header and bearer-token variables are read from.
    """

    name = _KIND

    def __init__(self, servers: list[StreamableHttpServer], *, max_result_bytes: int, list_timeout: float = 30.0,
                 environ: Mapping[str, str], verify: Callable[[str], Mapping[str, Any]] | None = None) -> None:
        self._verify = verify
        self._servers = {s.name: s for s in servers}
        self._environ = dict(environ)
        self._max_result_bytes = max_result_bytes
        self._list_timeout = list_timeout
        self._sessions: dict[tuple[str, str], ServerSessions] = {}
        self._pool: _Pools | None = None

    def _shared_pool(self) -> _Pools:
        if self._pool is None:
            self._pool = _Pools()
        return self._pool

    def sessions(self, server: StreamableHttpServer, token: str | None) -> ServerSessions:
        """The sessions of ``server`` for the identity ``token`` carries (created on first use)."""
        key = (server.name, identity_of(server, token, self._verify))
        found = self._sessions.get(key)
        if found is None or found.server != server:
            self._prune()
            found = self._sessions[key] = ServerSessions(
                server, self._shared_pool(), environ=self._environ, max_result_bytes=self._max_result_bytes,
                token=token if server.auth == "forward" else self._environ.get(server.token_env or ""))
        return found

    def _prune(self) -> None:
        """Forget the identities whose session stopped and that nobody uses (each forwarded user's token gets
        an entry: without this, one per user ever seen would stay for the worker's life)."""
        for key in [key for key, sessions in self._sessions.items() if key[1] != "service" and sessions.unused]:
            del self._sessions[key]  # the service identity stays: its OAuth token outlives its sessions

    async def open(self) -> None:
        """Nothing to open: sessions start on first use."""

    async def close(self) -> None:
        """Close every session, then the shared connection pool."""
        sessions, self._sessions = list(self._sessions.values()), {}
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.aclose()

    async def invoke(self, call: Call) -> ToolOutcome:
        """``tools/call`` on the warm session of the call's (server, identity)."""
        server = http_server(call.server)
        token = call.token if server.auth == "forward" else None
        return await self.sessions(server, token).call_tool(
            call.invocation.tool, dict(call.invocation.arguments), timeout=call.timeout, token=token, sink=call.sink)

    async def list_tools(self, server: ServerBase | None, *, token: str | None = None) -> list[GatewayToolInfo]:
        """``tools/list`` of one server (or all): on the service identity's session, or for an ``auth: forward``
        server on the caller's (``token``; without one, anonymously), so a user sees what that user may call."""
        targets = [http_server(server)] if server is not None else list(self._servers.values())
        tools: list[GatewayToolInfo] = []
        for target in targets:
            forwarded = token if target.auth == "forward" else None
            tools.extend(await self.sessions(target, forwarded).list_tools(timeout=self._list_timeout,
                                                                           token=forwarded))
        return tools


def build(context: BuildContext) -> StreamableHttpTransport:
    """The ``streamable-http`` transport of one worker process (catalog factory)."""
    from workers.authz import TokenVerifier

    verifier = TokenVerifier(context.settings)
    return StreamableHttpTransport([s for s in context.servers(_KIND) if isinstance(s, StreamableHttpServer)],
                                   max_result_bytes=context.settings.max_result_bytes,
                                   list_timeout=context.settings.invoke_timeout, environ=context.environ,
                                   verify=verifier.claims if verifier.configured else None)
