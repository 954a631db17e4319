"""The generic warm-session pool over a transport that is not stdio: the SDK's in-memory streams to an
in-process low-level ``Server`` (no process, no network)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp.server.lowlevel import Server
from mcp.shared.memory import create_client_server_memory_streams

from workers.errors import SarkError, ServerCrashed
from workers.transports.session_pool import Connection, Link, PoolSettings, SessionPool

_TOOL = types.Tool(name="echo", input_schema={"type": "object", "properties": {"text": {"type": "string"}}})


def _server(served: list[int]) -> Server[Any]:
    """A server with one tool, ``echo``, which also says which connection (1, 2, …) answered."""

    async def list_tools(ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[_TOOL])

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        text = f"{(params.arguments or {}).get('text')} (connection {served[-1]})"
        return types.CallToolResult(content=[types.TextContent(type="text", text=text)])

    return Server("memory", on_list_tools=list_tools, on_call_tool=call_tool)


@contextlib.asynccontextmanager
async def _memory_transport(server: Server[Any]) -> AsyncIterator[Any]:
    """An ``mcp`` client transport: the (read, write) pair of the client side of in-memory streams."""
    async with create_client_server_memory_streams() as (client_streams, (read, write)), \
            anyio.create_task_group() as group:
        group.start_soon(server.run, read, write, server.create_initialization_options())
        yield client_streams
        group.cancel_scope.cancel()


def _pool(settings: PoolSettings) -> tuple[SessionPool[Link], list[int]]:
    """A pool whose factory opens a new in-memory connection; the list records each one opened."""
    opened: list[int] = []
    server = _server(opened)

    def connect() -> Link:
        opened.append(len(opened) + 1)
        return Link(_memory_transport(server))

    def startup_error(connection: Link, exc: BaseException) -> SarkError:
        return ServerCrashed(f"memory server did not start: {type(exc).__name__}: {exc}")

    return SessionPool(connect, name="memory", settings=settings, startup_error=startup_error, kind="memory"), opened


async def _echo(pool: SessionPool[Link], text: str) -> tuple[int, str]:
    """Call ``echo`` through the pool; the generation that served it and the answer's text."""
    async with pool.slots:
        gen, client = await pool.session()
        async with gen.use():
            result = await client.call_tool("echo", {"text": text})
    pool.succeeded()
    content = result.content[0]
    assert isinstance(content, types.TextContent)
    return gen.number, content.text


def test_a_link_is_a_connection() -> None:
    connection: Connection = Link(_memory_transport(_server([])))
    assert connection.pid is None and connection.failure is None and not connection.dead.is_set()


def test_calls_share_one_warm_session() -> None:
    async def scenario() -> tuple[list[tuple[int, str]], list[int], int | None]:
        pool, opened = _pool(PoolSettings(startup_timeout=10))
        try:
            answers = [await _echo(pool, f"hi {n}") for n in range(3)]
            answers += await asyncio.gather(*(_echo(pool, f"at once {n}") for n in range(3)))
            return answers, opened, pool.pid
        finally:
            await pool.close()

    answers, opened, pid = asyncio.run(scenario())
    assert opened == [1]  # one connection for all six calls, sequential and concurrent
    assert {number for number, _ in answers} == {1}
    assert [text for _, text in answers[:3]] == [f"hi {n} (connection 1)" for n in range(3)]
    assert pid is None  # no process behind an in-memory connection


def test_max_calls_recycles_the_session() -> None:
    async def scenario() -> tuple[list[int], list[int], bool]:
        pool, opened = _pool(PoolSettings(startup_timeout=10, max_calls=2))
        try:
            numbers = [(await _echo(pool, "x"))[0] for _ in range(5)]
            current, _ = await pool.session()  # the third generation, with one call left
            return numbers, opened, current.connection.dead.is_set()
        finally:
            await pool.close()

    numbers, opened, dead = asyncio.run(scenario())
    assert numbers == [1, 1, 2, 2, 3]
    assert opened == [1, 2, 3]
    assert not dead


def test_closed_pool_refuses_calls_and_leaves_its_connections() -> None:
    async def scenario() -> Link:
        pool, _ = _pool(PoolSettings(startup_timeout=10))
        gen, _ = await pool.session()
        await pool.close()
        with pytest.raises(ServerCrashed, match="shutting down"):
            await pool.session()
        return gen.connection

    assert asyncio.run(scenario()).dead.is_set()


def test_closing_ends_a_restart_backoff_at_once() -> None:
    # After failed starts the next one waits (up to 30 s); a worker shutting down must not wait it out.
    async def scenario() -> tuple[float, BaseException | None]:
        pool, _ = _pool(PoolSettings(startup_timeout=10))
        for _ in range(8):
            pool._failed()  # eight failed starts in a row: the next one waits 30 s
        waiting = asyncio.ensure_future(pool.session())
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await asyncio.wait_for(pool.close(), 5)
        closed_in = time.monotonic() - started
        try:
            await asyncio.wait_for(waiting, 5)
        except BaseException as exc:
            return closed_in, exc
        return closed_in, None

    closed_in, error = asyncio.run(scenario())
    assert closed_in < 1.0
    assert isinstance(error, ServerCrashed) and "before it was ready" in str(error)


def test_a_pool_is_idle_until_a_session_starts_and_after_it_stopped() -> None:
    async def scenario() -> list[bool]:
        pool, _ = _pool(PoolSettings(startup_timeout=10, idle_timeout=0.2))
        seen = [pool.idle]
        await _echo(pool, "x")
        seen.append(pool.idle)
        await asyncio.sleep(0.6)  # past idle_timeout: the session stops
        seen.append(pool.idle)
        await pool.close()
        return seen

    assert asyncio.run(scenario()) == [True, False, True]


def test_a_start_that_fails_after_the_handshake_leaves_its_session() -> None:
    # The handshake succeeds, the first tools/list never answers: the start fails at startup_timeout and the
    # session entered is left at once (its connection ends), not abandoned to the garbage collector.
    async def slow_list(ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        await asyncio.sleep(30)
        return types.ListToolsResult(tools=[_TOOL])

    server: Server[Any] = Server("slow", on_list_tools=slow_list)
    links: list[Link] = []

    def connect() -> Link:
        links.append(Link(_memory_transport(server)))
        return links[-1]

    async def scenario() -> bool:
        pool = SessionPool(connect, name="slow", settings=PoolSettings(startup_timeout=0.5), kind="memory",
                           startup_error=lambda c, e: ServerCrashed(f"did not start: {type(e).__name__}"))
        with pytest.raises(ServerCrashed, match="did not start"):
            await pool.session()
        await asyncio.sleep(0.2)
        left = links[0].dead.is_set()
        await pool.close()
        return left

    assert asyncio.run(scenario())
