"""The invocation hot path: one JSON ``POST`` straight on httpx's connection pool (httpcore).

``httpx.AsyncClient`` wraps every request in its models, merges URLs, headers and cookies, and walks
its auth and redirect generators; for one small ``POST /invoke`` per invocation that layer cost
about as much CPU as the HTTP exchange itself (0.40-0.51 ms vs 0.27 ms per call, measured on this
machine). :class:`JsonPost` sends the same request (same headers, body encoding, timeouts and
connection pool as the client it comes from) on httpcore directly, which httpx itself uses under that
layer. Everything else (discovery, health, SSE) keeps using the ``httpx.AsyncClient``.

The answer is read with a size cap (declared ``Content-Length`` first, then as it arrives; over it:
:class:`ResultTooLarge`), gzip is accepted and decoded under the same cap, and httpcore's errors become
:mod:`workers.errors`: timeouts → :class:`InvocationTimeout`; connection and protocol failures →
:class:`GatewayUnavailable`. An error answer (status >= 400) is only read up to
:data:`ERROR_BODY_BYTES`: its message is all that is used. The bounded readers (:func:`decoded`,
:func:`read_limited`, :func:`read_head`) also serve the discovery calls and the SSE transport, which
read through httpx.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

import httpcore
import httpx

from workers.errors import GatewayUnavailable, InvocationTimeout, ProtocolError, ResultTooLarge

__all__ = ["ERROR_BODY_BYTES", "JsonPost", "decoded", "read_head", "read_limited"]

#: Bytes of an error answer that are read: enough for its message (cut to 200 characters anyway),
#: never the megabytes a broken or hostile server may send with a 5xx.
ERROR_BODY_BYTES = 4_096

#: Most bytes one inflate step may produce, whatever the compression ratio (gzip reaches ~1000:1,
#: so one 64 KiB network read could otherwise expand to ~64 MB before any cap is checked).
_INFLATE_STEP = 65_536


def _too_large(limit: int, size: int | None = None) -> ResultTooLarge:
    detail: dict[str, Any] = {"limit": limit, "what": "result"}
    if size is not None:
        detail["size"] = size
        return ResultTooLarge(f"result is {size} bytes, limit is {limit}", detail)
    return ResultTooLarge(f"result exceeds {limit} bytes", detail)


def decoded(raw: AsyncIterable[bytes], encoding: str | bytes) -> AsyncIterable[bytes]:
    """The pieces of a body with its content coding (identity or gzip) removed.

    gzip is inflated at most :data:`_INFLATE_STEP` bytes at a time, so a gzip bomb costs no more
    memory than what the caller's cap lets it keep.

    Raises:
        ProtocolError: another coding (at once), or corrupt or truncated gzip (while reading).
    """
    name = (encoding.decode("latin-1") if isinstance(encoding, bytes) else encoding).strip().lower()
    if name in ("", "identity"):
        return raw
    if name != "gzip":
        raise ProtocolError(f"Gateway answered with content-encoding {name[:40]!r}, which was not asked for")
    return _inflate(raw)


async def _inflate(raw: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    async for piece in raw:
        while piece and not inflate.eof:
            try:
                out = inflate.decompress(piece, _INFLATE_STEP)
            except zlib.error as exc:
                raise ProtocolError(f"Gateway sent corrupt gzip: {exc}") from None
            piece = inflate.unconsumed_tail
            if out:
                yield out
    if not inflate.eof:
        raise ProtocolError("Gateway sent truncated gzip")


async def read_limited(pieces: AsyncIterable[bytes], limit: int | None, too_large: Callable[[], Exception]) -> bytes:
    """All of ``pieces``, raising ``too_large()`` as soon as they pass ``limit`` bytes (None: no limit)."""
    parts: list[bytes] = []
    size = 0
    async for piece in pieces:
        size += len(piece)
        if limit is not None and size > limit:
            raise too_large()
        parts.append(piece)
    return b"".join(parts)


async def read_head(pieces: AsyncIterable[bytes], limit: int) -> bytes:
    """The first ``limit`` bytes of ``pieces``; the rest is never read (close the response after)."""
    parts: list[bytes] = []
    size = 0
    async for piece in pieces:
        parts.append(piece[: limit - size])
        size += len(parts[-1])
        if size >= limit:
            break
    return b"".join(parts)


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
            ResultTooLarge: the body (declared, received or decoded) exceeds ``max_bytes``.
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
        stream: Any = response.stream
        pieces = decoded(stream, fields.get(b"content-encoding", b"identity"))
        if response.status >= 400:
            return await read_head(pieces, ERROR_BODY_BYTES)
        declared = fields.get(b"content-length", b"")
        if max_bytes is not None and declared.isdigit() and int(declared) > max_bytes:
            raise _too_large(max_bytes, int(declared))
        return await read_limited(pieces, max_bytes, lambda: _too_large(max_bytes or 0))
