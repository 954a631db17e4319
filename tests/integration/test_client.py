"""The client API other apps use (sync and async), against the real worker and Gateway."""

from __future__ import annotations

import asyncio
import inspect
import time

import pytest

from config.settings import Settings
from devkit.stack import DevStack, Proc
from workers import AsyncSarkClient, AuthorizationDenied, Cancelled, InvocationResult, SarkClient
from workers.client import InvocationHandle

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture(scope="module")
def client(stack: DevStack) -> SarkClient:
    return SarkClient(Settings())


def test_invoke_returns_typed_result(client: SarkClient, user_token: str) -> None:
    handle = client.invoke("echo", "add", {"a": 1, "b": 2}, token=user_token)
    result = handle.result(timeout=30)
    assert isinstance(result, InvocationResult)
    assert result.request_id == handle.id and result.result["structuredContent"] == {"sum": 3.0}
    assert handle.state == "SUCCESS"


def test_typed_error_and_discovery(client: SarkClient, user_token: str) -> None:
    with pytest.raises(AuthorizationDenied):
        client.invoke("restricted", "echo", token=user_token).result(timeout=30)
    assert {s.server_id for s in client.list_servers()} >= {"echo", "restricted"}
    assert client.get_server("nope") is None
    assert "add" in {t.tool_name for t in client.list_tools("echo")}
    assert client.health()["gateway"] is True


def test_stream_through_the_handle(client: SarkClient, user_token: str) -> None:
    handle = client.invoke("echo-stream", "stream_data", {"count": 4}, token=user_token, stream=True)
    chunks = list(handle.stream())
    assert [c.seq for c in chunks] == [0, 1, 2, 3]
    assert handle.result(timeout=30).chunks == 4


def _wait_until_running(client: SarkClient, handle: InvocationHandle) -> None:
    """Until ``handle`` is on a worker (STARTED is not stored: ask the workers), 10 s at most."""
    deadline = time.monotonic() + 10
    while handle.state == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.05)
        if handle.state == "PENDING":
            active = client.app.control.inspect(timeout=0.5).active() or {}
            if any(t["id"] == handle.id for tasks in active.values() for t in tasks):
                break


def test_cancel_running_invocation(client: SarkClient, user_token: str) -> None:
    handle = client.invoke("echo", "sleep", {"seconds": 20}, token=user_token, timeout=25)
    _wait_until_running(client, handle)
    started = time.monotonic()
    handle.cancel()
    with pytest.raises(Cancelled):
        handle.result(timeout=15)
    assert time.monotonic() - started < 10  # interrupted, not waited out


def test_async_client(stack: DevStack, user_token: str, worker: Proc) -> None:
    async def scenario() -> tuple[InvocationResult, list[int]]:
        client = AsyncSarkClient(Settings())
        try:
            handle = await client.invoke("echo", "echo", {"async": True}, token=user_token)
            result = await client.result(handle, timeout=30)
            streamed = await client.invoke("echo-stream", "stream_data", {"count": 3}, token=user_token, stream=True)
            seqs = [chunk.seq async for chunk in client.stream(streamed)]
            return result, seqs
        finally:
            await client.close()

    result, seqs = asyncio.run(scenario())
    assert result.result["structuredContent"] == {"async": True}
    assert seqs == [0, 1, 2]


def test_async_client_has_every_method_of_the_sync_client_and_handle() -> None:
    def public(cls: type) -> set[str]:
        return {name for name in vars(cls) if not name.startswith("_")}

    # The handle's own operations are client methods taking the handle; its id needs no waiting.
    assert public(SarkClient) | (public(InvocationHandle) - {"id"}) <= public(AsyncSarkClient)
    for name in public(SarkClient) - {"settings", "app"}:
        sync = inspect.signature(getattr(SarkClient, name))
        asynchronous = inspect.signature(getattr(AsyncSarkClient, name))
        assert sync.parameters.keys() == asynchronous.parameters.keys(), name
        assert [p.default for p in sync.parameters.values()] == [p.default for p in asynchronous.parameters.values()]
        assert inspect.iscoroutinefunction(getattr(AsyncSarkClient, name)), name


def test_async_client_discovery_health_and_cancel(stack: DevStack, user_token: str, worker: Proc) -> None:
    async def scenario() -> None:
        client = AsyncSarkClient(Settings())
        try:
            servers = await client.list_servers(timeout=30)
            assert {s.server_id for s in servers} >= {"echo", "restricted"}
            echo = await client.get_server("echo", timeout=30)
            assert echo is not None and echo.server_id == "echo"
            assert await client.get_server("nope") is None
            assert "add" in {t.tool_name for t in await client.list_tools("echo", token=user_token)}
            assert (await client.health(timeout=30))["gateway"] is True

            handle = await client.invoke("echo", "sleep", {"seconds": 20}, token=user_token, timeout=25)
            await asyncio.to_thread(_wait_until_running, client.sync, handle)
            assert await client.state(handle) not in {"SUCCESS", "FAILURE", "REVOKED"}
            started = time.monotonic()
            await client.cancel(handle)
            with pytest.raises(Cancelled):
                await client.result(handle, timeout=15)
            assert time.monotonic() - started < 10  # interrupted, not waited out
            assert await client.state(handle) in {"FAILURE", "REVOKED"}
        finally:
            await client.close()

    asyncio.run(scenario())


def test_stream_of_a_task_that_failed_before_streaming_raises_at_once(client: SarkClient) -> None:
    from workers.contract import TASK_INVOKE
    from workers.errors import SarkError

    # Not even the task's signature: Celery fails it before the worker could open a stream.
    handle = InvocationHandle(client, client.app.send_task(TASK_INVOKE, kwargs={"nope": 1}))
    started = time.monotonic()
    with pytest.raises(SarkError, match="TypeError"):
        list(handle.stream())
    assert time.monotonic() - started < 10  # was: the reader's 600 s idle limit

    async def follow() -> None:
        async_client = AsyncSarkClient(client.settings, client.app)
        async for _ in async_client.stream(InvocationHandle(client, client.app.send_task(TASK_INVOKE, args=[1, 2]))):
            pass

    started = time.monotonic()
    with pytest.raises(SarkError, match="TypeError"):
        asyncio.run(follow())
    assert time.monotonic() - started < 10
