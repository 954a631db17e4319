"""The invocation hot path: one JSON ``POST`` straight on httpx's connection pool (httpcore).

``httpx.AsyncClient`` wraps every request in its models, merges URLs, headers and cookies, and walks
its auth and redirect generators; for one small ``POST /invoke`` per invocation that layer cost
about as much CPU as the HTTP exchange itself (0.40-0.51 ms vs 0.27 ms per call, measured on this
machine). :class:`JsonPost` sends the same request (same headers, body encoding, timeouts and
connection pool as the client it comes from) on httpcore directly, which httpx itself uses under that
layer. Everything else (discovery, health, SSE) keeps using the ``httpx.AsyncClient``.

The answer is read with a size cap (declared ``Content-Length`` first, then as it arrives), gzip is
accepted and decoded under the same cap, and httpcore's errors become :mod:`workers.errors`:
timeouts → :class:`InvocationTimeout`; connection and protocol failures → :class:`GatewayUnavailable`.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import httpcore
import httpx

from workers.errors import GatewayUnavailable, InvocationTimeout, PayloadTooLarge, ProtocolError

__all__ = ["JsonPost"]


def _too_large(limit: int, size: int | None = None) -> PayloadTooLarge:
    detail: dict[str, Any] = {"limit": limit, "what": "result"}
    if size is not None:
        detail["size"] = size
        return PayloadTooLarge(f"result is {size} bytes, limit is {limit}", detail)
    return PayloadTooLarge(f"result exceeds {limit} bytes", detail)


class JsonPost:
    """``POST`` a JSON body to paths under ``base_url`` on ``pool``, with ``headers`` on every request.

    Args:
        pool: The connection pool (shared with the httpx client the settings came from).
        base_url: Scheme, host, port and path prefix (``http://gw:8080/api``).
        headers: Headers sent with every request (API key, User-Agent…).
    """

    def __init__(self, pool: httpcore.AsyncConnectionPool, base_url: str, headers: dict[str, str]) -> None:
        url = httpx.URL(base_url)
        self._pool = pool
        self._scheme, self._host, self._port = url.raw_scheme, url.raw_host, url.port
        self._prefix = url.raw_path.rstrip(b"/")
        self._headers = [
            (b"Host", url.netloc),
            (b"Accept", b"*/*"),
            (b"Accept-Encoding", b"gzip"),
            (b"Connection", b"keep-alive"),
            *((name.encode("ascii"), value.encode("latin-1")) for name, value in headers.items()),
            (b"Content-Type", b"application/json"),
        ]

    async def post(
        self, path: str, payload: Any, headers: dict[str, str], *, timeout: float, max_bytes: int | None
    ) -> tuple[int, bytes]:
        """Send ``payload`` as JSON; return the status and the (decoded) body.

        Raises:
            InvocationTimeout: connecting, sending or reading took longer than ``timeout`` (each).
            GatewayUnavailable: the connection failed or the answer broke HTTP.
            PayloadTooLarge: the body (declared, received or decoded) exceeds ``max_bytes``.
            ProtocolError: an encoding this client did not ask for, or corrupt gzip.
        """
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        request = httpcore.Request(
            b"POST",
            httpcore.URL(scheme=self._scheme, host=self._host, port=self._port, target=self._prefix + path.encode()),
            headers=[
                *self._headers,
                (b"Content-Length", str(len(body)).encode()),
                *((name.encode("ascii"), value.encode("latin-1")) for name, value in headers.items()),
            ],
            content=body,
            extensions={"timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}},
        )
        try:
            response = await self._pool.handle_async_request(request)
            try:
                return response.status, await self._read(response, max_bytes)
            finally:
                await response.aclose()
        except httpcore.TimeoutException as exc:
            raise InvocationTimeout(f"Gateway did not answer POST {path} within {timeout:g}s") from exc
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as exc:
            raise GatewayUnavailable(f"cannot reach the Gateway ({type(exc).__name__}: {exc})") from exc

    @staticmethod
    async def _read(response: httpcore.Response, max_bytes: int | None) -> bytes:
        fields = {name.lower(): value for name, value in response.headers}
        declared = fields.get(b"content-length", b"")
        if max_bytes is not None and declared.isdigit() and int(declared) > max_bytes:
            raise _too_large(max_bytes, int(declared))
        encoding = fields.get(b"content-encoding", b"identity").strip().lower()
        if encoding not in (b"identity", b"gzip"):
            raise ProtocolError(f"Gateway answered with content-encoding {encoding.decode(errors='replace')!r}, "
                                "which was not asked for")
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == b"gzip" else None
        parts: list[bytes] = []
        size = 0
        stream: Any = response.stream
        async for piece in stream:
            if inflate is not None:
                try:  # inflate at most what is still allowed, so a gzip bomb never expands in memory
                    piece = inflate.decompress(piece, (max_bytes - size + 1) if max_bytes is not None else 0)
                except zlib.error as exc:
                    raise ProtocolError(f"Gateway sent corrupt gzip: {exc}") from None
            size += len(piece)
            if max_bytes is not None and size > max_bytes:
                raise _too_large(max_bytes)
            parts.append(piece)
        if inflate is not None:
            if not inflate.eof:
                raise ProtocolError("Gateway sent truncated gzip")
            tail = inflate.flush()
            size += len(tail)
            if max_bytes is not None and size > max_bytes:
                raise _too_large(max_bytes)
            parts.append(tail)
        return b"".join(parts)
