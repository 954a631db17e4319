"""Async client of the Gateway REST API (``shared/gateway-api.md``), on one pooled httpx client.

Retry policy (the plan's contract): discovery calls up to ``discovery_attempts`` (3) attempts with
exponential wait 2-10 s on transport errors and 5xx; invocations retried once and only on timeout.
httpx errors are translated into :mod:`workers.errors` where they enter.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from http.cookiejar import Cookie, CookieJar
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from config.settings import Settings
from workers import __version__, tracing
from workers.errors import (
    DiscoveryTimeout,
    GatewayUnavailable,
    InvalidInvocation,
    InvocationTimeout,
    ProtocolError,
    ResultTooLarge,
    SarkError,
    ToolError,
    status_error,
)
from workers.gateway.backend import asyncio_pool, transport_on
from workers.gateway.post import ERROR_BODY_BYTES, JsonPost, decoded, read_head, read_limited
from workers.models import GatewayServerInfo, GatewayToolInfo, describe_validation_error

__all__ = ["GatewayClient", "NoCookies", "server_path"]

log = logging.getLogger("sark.gateway_client")

M = TypeVar("M", bound=BaseModel)
_SNIPPET = 200
#: Longest ``server_id`` put into a URL (the registry's pattern allows 256 characters).
_MAX_SERVER_ID = 256


def _snippet(body: bytes) -> str:
    text = body[:_SNIPPET].decode("utf-8", "replace").strip()
    return text + ("…" if len(body) > _SNIPPET else "")


def _error_field(body: bytes, field: str) -> str:
    """``body[field]`` when the body is a JSON object holding it, else a short text snippet."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return _snippet(body) or "no body"
    if isinstance(data, dict):
        value = data.get(field) or data.get("detail") or data.get("error") or data.get("reason")
        if value is not None:
            return value if isinstance(value, str) else json.dumps(value)[:_SNIPPET]
    return _snippet(body)


def server_path(server_id: object) -> str:
    """``/servers/{server_id}`` with the id quoted as exactly one path segment.

    Unquoted, ``../_control/stats`` would reach another endpoint of the Gateway; ``.`` and ``..``
    are dot segments even when quoted, so they are refused.

    Raises:
        InvalidInvocation: not a string, empty, ``.`` or ``..``, or over 256 characters (the value
            is not repeated in the message).
    """
    if not isinstance(server_id, str) or server_id in ("", ".", "..") or len(server_id) > _MAX_SERVER_ID:
        raise InvalidInvocation(
            f"server_id must be a non-empty string of at most {_MAX_SERVER_ID} characters, not '.' or '..'",
            {"what": "server_id"},
        )
    return "/servers/" + quote(server_id, safe="")


class NoCookies(CookieJar):
    """A cookie jar that never keeps a cookie.

    One pooled client carries every user's calls: a cookie the Gateway sets while answering one
    user must never ride along with the next user's request. (It also skips the jar's work on
    every response.)
    """

    def extract_cookies(self, response: Any, request: Any) -> None:
        """Ignore ``Set-Cookie``."""

    def set_cookie(self, cookie: Cookie) -> None:
        """Keep nothing."""


def _is_retryable_discovery(exc: BaseException) -> bool:
    if isinstance(exc, ToolError):
        return exc.status_code >= 500
    return isinstance(exc, GatewayUnavailable | DiscoveryTimeout)


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, InvocationTimeout)


class GatewayClient:
    """The Gateway REST API over one pooled ``httpx.AsyncClient``.

    Args:
        settings: URL, key, prefix, pool limits, timeouts and retry policy.

    One connection pool (:func:`~workers.gateway.backend.asyncio_pool`) serves both the
    ``httpx.AsyncClient`` (discovery, health, SSE) and the invocation hot path
    (:class:`~workers.gateway.post.JsonPost`), so the pool limits bound all of them together.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        headers = {"Content-Type": "application/json", "User-Agent": f"sark-workers/{__version__}"}
        if settings.gateway_api_key is not None:
            headers["X-API-Key"] = settings.gateway_api_key.get_secret_value()
        base_url = settings.gateway_url.rstrip("/") + "/" + settings.gateway_path_prefix.strip("/")
        limits = httpx.Limits(
            max_connections=settings.http_max_connections,
            max_keepalive_connections=settings.http_max_keepalive,
            keepalive_expiry=settings.http_keepalive_expiry,
        )
        pool = asyncio_pool(limits=limits)
        self.http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(settings.gateway_timeout),
            limits=limits,
            transport=transport_on(pool),
            cookies=NoCookies(),
        )
        self._post = JsonPost(pool, base_url.rstrip("/"), headers={k: v for k, v in headers.items()
                                                                    if k != "Content-Type"})

    # --- plumbing -------------------------------------------------------------------------------
    async def _request(
        self, method: str, path: str, *, timeout: float | None = None, **kwargs: Any
    ) -> tuple[httpx.Response, bytes]:
        """Send one discovery/health request; return the response and its body (read with caps).

        Invocations do not come here: they go through :class:`~workers.gateway.post.JsonPost`.

        Raises:
            DiscoveryTimeout: no answer within ``timeout`` (default: ``gateway_timeout``).
            GatewayUnavailable: the Gateway cannot be reached.
            ResultTooLarge: a success body over ``max_result_bytes`` (an error body is cut instead).
        """
        request = self.http.build_request(
            method, path, timeout=httpx.Timeout(timeout) if timeout else httpx.USE_CLIENT_DEFAULT,
            headers={"Accept-Encoding": "gzip"},  # the only coding decoded() inflates under a cap
            **kwargs,
        )
        what = f"{method} {path[:80]}"  # a server id can be long: never repeated at length
        try:
            response = await self.http.send(request, stream=True)
            try:
                return response, await self._read(response, what)
            finally:
                await response.aclose()
        except httpx.TimeoutException as exc:
            raise DiscoveryTimeout(
                f"Gateway did not answer {what} within {timeout or self._settings.gateway_timeout}s"
            ) from exc
        except httpx.TransportError as exc:
            raise GatewayUnavailable(f"cannot reach the Gateway ({type(exc).__name__}: {exc})") from exc

    async def _read(self, response: httpx.Response, what: str) -> bytes:
        pieces = decoded(response.aiter_raw(), response.headers.get("content-encoding", "identity"))
        if response.status_code >= 400:
            return await read_head(pieces, ERROR_BODY_BYTES)
        limit = self._settings.max_result_bytes

        def too_large() -> ResultTooLarge:
            return ResultTooLarge(f"Gateway answer to {what} exceeds {limit} bytes", {"limit": limit,
                                                                                    "what": "discovery"})

        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large()
        return await read_limited(pieces, limit, too_large)

    @staticmethod
    def _json(body: bytes, what: str) -> Any:
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ProtocolError(f"Gateway answered {what} with non-JSON body: {_snippet(body)!r}") from None

    @staticmethod
    def _raise_for_status(status: int, body: bytes, what: str) -> None:
        """The error of a status >= 400 (:func:`~workers.errors.status_error`), with the body's message."""
        if status >= 400:
            prefix = {401: "Authentication failed", 403: "Authorization denied"}.get(status, f"{what} failed")
            raise status_error(status, f"{prefix}: {_error_field(body, 'reason' if status == 403 else 'error')}")

    async def _discover(self, call: Callable[[], Any]) -> Any:
        s = self._settings
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(s.discovery_attempts),
            wait=wait_exponential(multiplier=1, min=s.discovery_wait_min, max=s.discovery_wait_max),
            retry=retry_if_exception(_is_retryable_discovery),
            reraise=True,
        ):
            with attempt:
                return await call()
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _models(model: type[M], items: object, what: str) -> list[M]:
        if not isinstance(items, list):
            raise ProtocolError(f"Gateway {what}: expected a list")
        try:
            return [model.model_validate(item) for item in items]
        except ValidationError as exc:
            raise ProtocolError(f"Gateway {what}: {describe_validation_error(exc)}") from None

    # --- the API ----------------------------------------------------------------------------------
    async def list_servers(self, user_id: str | None = None) -> list[GatewayServerInfo]:
        """``GET /servers``: every server the Gateway knows (optionally visible to ``user_id``)."""

        async def call() -> list[GatewayServerInfo]:
            params = {"user_id": user_id} if user_id else {}
            response, body = await self._request("GET", "/servers", params=params)
            self._raise_for_status(response.status_code, body, "list_servers")
            data = self._json(body, "list_servers")
            return self._models(GatewayServerInfo, (data or {}).get("servers", []), "list_servers")

        result: list[GatewayServerInfo] = await self._discover(call)
        return result

    async def get_server_info(self, server_id: str) -> GatewayServerInfo | None:
        """``GET /servers/{id}``; None when the Gateway says 404.

        Raises:
            InvalidInvocation: ``server_id`` cannot be one path segment (see :func:`server_path`).
        """
        path = server_path(server_id)

        async def call() -> GatewayServerInfo | None:
            response, body = await self._request("GET", path)
            if response.status_code == 404:
                return None
            self._raise_for_status(response.status_code, body, "get_server_info")
            return self._models(GatewayServerInfo, [self._json(body, "get_server_info")], "get_server_info")[0]

        result: GatewayServerInfo | None = await self._discover(call)
        return result

    async def list_tools(
        self, server_id: str | None = None, server_name: str | None = None
    ) -> list[GatewayToolInfo]:
        """``GET /tools``, optionally filtered by server id or name."""

        async def call() -> list[GatewayToolInfo]:
            params = {k: v for k, v in (("server_id", server_id), ("server_name", server_name)) if v}
            response, body = await self._request("GET", "/tools", params=params)
            self._raise_for_status(response.status_code, body, "list_tools")
            data = self._json(body, "list_tools")
            return self._models(GatewayToolInfo, (data or {}).get("tools", []), "list_tools")

        result: list[GatewayToolInfo] = await self._discover(call)
        return result

    async def invoke_tool(
        self,
        server_id: str,
        tool_name: str,
        parameters: dict[str, Any],
        user_token: str | None,
        request_id: str,
        *,
        timeout: float,
        max_bytes: int | None = None,
    ) -> dict[str, Any]:
        """``POST /invoke``; retried once, and only when the attempt timed out.

        Raises:
            AuthenticationFailed: 401; AuthorizationDenied: 403 (neither retried).
            ToolError: any other status >= 400, carrying it.
            InvocationTimeout: no answer within ``timeout`` on the last attempt.
            ResultTooLarge: a success answer over ``max_bytes``.
            ProtocolError: a success answer that is not a JSON object.
        """
        payload = {"server_id": server_id, "tool_name": tool_name, "parameters": parameters, "request_id": request_id}
        headers = {"X-Request-ID": request_id}
        if user_token:
            headers["Authorization"] = f"Bearer {user_token}"
        s = self._settings

        async def call() -> dict[str, Any]:
            if tracing.active:  # one span per attempt, and its traceparent to the Gateway
                with tracing.gateway_span("/invoke", server_id) as traced:
                    assert traced is not None
                    status, body = await self._post.post("/invoke", payload, traced.headers(headers), timeout=timeout,
                                                         max_bytes=max_bytes)
                    traced.set("http.response.status_code", status)
                    return answer(status, body)
            status, body = await self._post.post("/invoke", payload, headers, timeout=timeout, max_bytes=max_bytes)
            return answer(status, body)

        def answer(status: int, body: bytes) -> dict[str, Any]:
            self._raise_for_status(status, body, "Tool execution")
            data = self._json(body, "invoke")
            if not isinstance(data, dict):
                raise ProtocolError(f"Gateway answered invoke with {type(data).__name__}, expected an object")
            return data

        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(s.invoke_attempts),
                wait=wait_exponential(multiplier=1, min=s.invoke_wait_min, max=s.invoke_wait_max),
                retry=retry_if_exception(_is_timeout),
                reraise=True,
            ):
                with attempt:
                    return await call()
        except InvocationTimeout:
            raise InvocationTimeout(
                f"Tool invocation timed out after {timeout:g} seconds "
                f"({s.invoke_attempts} attempt{'s' if s.invoke_attempts > 1 else ''})"
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def health_check(self) -> bool:
        """``GET /health``: True on 200, False on anything else (never raises)."""
        try:
            response, _ = await self._request("GET", "/health", timeout=self._settings.health_timeout)
        except SarkError as exc:
            log.warning("gateway health check failed: %s", exc)
            return False
        return response.status_code == 200

    async def close(self) -> None:
        """Close the pooled connections."""
        await self.http.aclose()
