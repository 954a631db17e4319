"""The MCP SDK alone, no sark, for the floors: a warm ``mcp.Client`` session of ``mcp-server-time`` (stdio,
:class:`DirectSession`) or of a Streamable HTTP server (:class:`DirectHttpSession`)."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from workers.loop import EventLoopThread

ARGUMENTS = {"timezone": "Europe/Paris"}


def server_binary() -> str:
    """``mcp-server-time`` beside this interpreter (the project's venv), else on PATH."""
    beside = Path(sys.executable).with_name("mcp-server-time")
    found = str(beside) if beside.exists() else shutil.which("mcp-server-time")
    if not found:
        raise FileNotFoundError("mcp-server-time is not installed (pip install -e '.[dev]')")
    return found


class DirectSession:
    """The SDK alone: one warm ``mcp.Client`` session of ``mcp-server-time`` on a loop of its own."""

    def __init__(self) -> None:
        from mcp.client.stdio import StdioServerParameters

        self.params = StdioServerParameters(command=server_binary(), args=["--local-timezone", "UTC"])
        # The SDK's stderr sink must be a real file (a Celery worker's sys.stderr is a logging proxy).
        self._errlog = open(os.devnull, "w")  # noqa: SIM115 - closed in close()
        self._start("bench-direct")

    def _start(self, name: str) -> None:
        self._loop = EventLoopThread(name)
        self._ready = threading.Event()
        self._client: Any = None
        self._stop: asyncio.Event | None = None
        self._owner = self._loop.submit(self._own())  # anyio: one task enters and leaves the session
        if not self._ready.wait(60):
            raise TimeoutError(f"{name}: the direct mcp session did not start")

    async def _own(self) -> None:
        from mcp import Client

        self._stop = asyncio.Event()
        async with Client(self._transport()) as client:
            self._client = client
            self._ready.set()
            await self._stop.wait()

    def _transport(self) -> Any:
        from mcp.client.stdio import stdio_client

        return stdio_client(self.params, errlog=self._errlog)

    async def _call(self, client: Any) -> float:
        started = time.perf_counter()
        await self._tool(client)
        return (time.perf_counter() - started) * 1000

    @staticmethod
    async def _tool(client: Any) -> dict[str, Any]:
        result = await client.call_tool("get_current_time", ARGUMENTS)
        if result.is_error:
            raise RuntimeError(f"direct call failed: {result}")
        data: dict[str, Any] = result.model_dump(mode="json", by_alias=True, exclude_none=True)
        return data

    def call(self) -> dict[str, Any]:
        """One warm ``call_tool`` on the kept session; its result as JSON."""
        return self._loop.run(self._tool(self._client), timeout=30)

    def warm_ms(self) -> float:
        """One warm ``call_tool`` on the kept session, in ms, timed on the session's loop (no thread hop)."""
        return self._loop.run(self._call(self._client), timeout=30)

    def cold_ms(self) -> float:
        """A new session (process start + handshake) and its first call, in ms (closing not counted)."""
        from mcp import Client

        async def cold() -> float:
            started = time.perf_counter()
            async with Client(self._transport()) as client:
                await self._call(client)
                return (time.perf_counter() - started) * 1000

        return self._loop.run(cold(), timeout=60)

    def close(self) -> None:
        """Close the session and stop the loop."""
        if self._stop is not None:
            self._loop.loop.call_soon_threadsafe(self._stop.set)
        self._owner.result(30)
        self._loop.stop()
        self._closed()

    def _closed(self) -> None:
        self._errlog.close()


#: The Streamable HTTP benchmark's call: ``add`` of the devkit server (:mod:`devkit.mcp_http_server`).
ADD_ARGUMENTS = {"a": 1, "b": 2}


class DirectHttpSession(DirectSession):
    """The SDK alone: one warm ``mcp.Client`` session of a Streamable HTTP server (``url``) on a loop of its own,
    built as the transport builds it (``streamable_http_client`` over an ``httpx2.AsyncClient``; mode ``auto``).

    :meth:`new_session_ms` is what a caller opening a session per call pays: a new ``streamable_http_client``
    and ``Client`` (discovery or ``initialize`` handshake), one call, the close (its ``DELETE`` on a
    2025-11-25 session); HTTP connections are kept alive in between, as any gateway's connection pool would.
    """

    def __init__(self, url: str) -> None:
        import httpx2

        self.url = url
        self._http: Any = None
        self._timeout = httpx2.Timeout(10.0, read=None)
        self._start("bench-direct-http")

    def _closed(self) -> None:
        pass

    async def _own(self) -> None:
        import httpx2

        self._http = httpx2.AsyncClient(timeout=self._timeout)
        try:
            await super()._own()
        finally:
            await self._http.aclose()

    def _transport(self) -> Any:
        from mcp.client.streamable_http import streamable_http_client

        return streamable_http_client(self.url, http_client=self._http)

    @property
    def protocol_version(self) -> str:
        """The revision the warm session speaks."""
        return str(self._client.protocol_version)

    @staticmethod
    async def _tool(client: Any) -> dict[str, Any]:
        result = await client.call_tool("add", ADD_ARGUMENTS)
        if result.is_error:
            raise RuntimeError(f"direct call failed: {result}")
        data: dict[str, Any] = result.model_dump(mode="json", by_alias=True, exclude_none=True)
        return data

    def new_session_ms(self) -> float:
        """A new session (handshake), one call and its close, in ms: a session opened per call."""
        from mcp import Client

        async def once() -> float:
            started = time.perf_counter()
            async with Client(self._transport()) as client:
                await self._tool(client)
            return (time.perf_counter() - started) * 1000

        return self._loop.run(once(), timeout=60)
