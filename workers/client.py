"""Client for other applications: enqueue invocations and read their results, streams and errors.

Apps that do not install this project can do the same with plain Celery (see README):
``app.send_task("sark.invoke", kwargs={"invocation": {...}}, headers={"sark_token": token},
queue="sark.http")``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import redis
from celery import Celery, states
from celery.exceptions import TaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult

from config.settings import Settings, get_settings
from workers import tracing
from workers.contract import (
    TASK_GET_SERVER,
    TASK_HEALTH,
    TASK_INVOKE,
    TASK_LIST_SERVERS,
    TASK_LIST_TOOLS,
    TOKEN_HEADER,
)
from workers.display import invocation_repr
from workers.errors import Cancelled, InternalError, InvalidToken, InvocationTimeout, ProtocolError, SarkError
from workers.models import Chunk, GatewayServerInfo, GatewayToolInfo, InvocationResult, TransportName
from workers.tokens import seal_token, validate_token

__all__ = ["AsyncSarkClient", "InvocationHandle", "SarkClient", "wait_result"]

#: Control command the workers register to cancel an invocation that is already running.
CANCEL_COMMAND = "sark_cancel"


def wait_result(pending: AsyncResult, timeout: float | None) -> Any:
    """``pending``'s value, riding out a backend (Redis) restart until ``timeout``.

    Results normally arrive through Celery's pub/sub consumer; every second without one, the backend is
    also read directly, because that consumer does not always recover from a Redis restart.

    Raises:
        SarkError: the task's own typed error, or :class:`InvocationTimeout` when no result came in time.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise InvocationTimeout(f"no result for {pending.id} within {timeout}s")
        try:
            return pending.get(timeout=1.0 if remaining is None else min(remaining, 1.0), propagate=True)
        except CeleryTimeout:
            pass
        except SarkError:
            raise
        except TaskRevokedError:
            raise Cancelled(f"invocation {pending.id} was cancelled before it ran",
                            {"request_id": pending.id}) from None
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            time.sleep(0.1)  # the backend is restarting
        except Exception as exc:  # a worker-side failure that is not ours (e.g. a worker lost): keep it typed
            raise InternalError(f"{type(exc).__name__}: {exc}") from exc
        ready, value = _read_backend(pending)
        if ready:
            return value


def _read_backend(pending: AsyncResult) -> tuple[bool, Any]:
    """(True, value) when the backend holds a final state for ``pending`` (raising its error)."""
    backend = pending.backend
    try:
        meta = backend.get_task_meta(pending.id, cache=False)
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False, None
    status = meta.get("status")
    if status not in states.READY_STATES:
        return False, None
    if status == states.SUCCESS:
        return True, meta.get("result")
    error = backend.exception_to_python(meta.get("result"))
    if isinstance(error, SarkError):
        raise error
    raise InternalError(f"{type(error).__name__}: {error}")


class InvocationHandle:
    """One enqueued invocation: wait for its result, follow its stream, or cancel it."""

    def __init__(self, client: SarkClient, pending: AsyncResult) -> None:
        self._client = client
        self._pending = pending

    @property
    def id(self) -> str:
        """The task id, also the ``request_id`` the target sees and the stream's key."""
        return str(self._pending.id)

    @property
    def state(self) -> str:
        """Celery state: PENDING, STARTED, SUCCESS, FAILURE, REVOKED…"""
        return str(self._pending.state)

    def result(self, timeout: float | None = None) -> InvocationResult:
        """Wait for the result.

        Raises:
            SarkError: the invocation failed (its exact subclass), or no result within ``timeout``.
        """
        return InvocationResult.model_validate(wait_result(self._pending, timeout))

    def stream(self, *, after: str | None = None, block_ms: int = 5_000) -> Iterator[Chunk]:
        """Chunks from the start (or after the Redis entry id ``after``), until the stream ends.

        Raises:
            SarkError: the invocation's typed error, also when it failed before publishing anything
                (the task's state is checked while no chunk arrives, so a failed task never leaves the
                reader waiting); :class:`ProtocolError` when it finished without a stream.
        """
        from workers.streams import reader as stream_client

        try:
            yield from stream_client.stream(self.id, redis_url=self._client.settings.redis_url, after=after,
                                            block_ms=block_ms, finished=self._pending.ready)
        except ProtocolError as exc:
            if exc.detail.get("finished"):
                self.result(timeout=30)  # raises the task's own typed error, if it failed
            raise

    def cancel(self) -> None:
        """Cancel: a queued invocation is never started, a running one is interrupted."""
        self._pending.revoke()
        self._client.app.control.broadcast(CANCEL_COMMAND, arguments={"request_id": self.id})


class SarkClient:
    """Synchronous client.

    Args:
        settings: broker/backend URLs, queue names (default: ``SARK_*`` environment).
        app: an existing Celery app to send with (default: one configured from ``settings``).

    With tracing on (the standard ``OTEL_*`` variables, :mod:`workers.tracing`), every task it sends carries
    the caller's current trace to the worker (Celery's instrumentation; a ``TracerProvider`` named
    ``sark-client`` is set up unless the application has its own).
    """

    def __init__(self, settings: Settings | None = None, app: Celery | None = None) -> None:
        tracing.setup("sark-client")
        self.settings = settings or get_settings()
        if app is None:
            from workers.app import create_app

            app = create_app(self.settings)
        self.app = app

    def invoke(
        self,
        server: str,
        tool: str,
        arguments: dict[str, Any] | None = None,
        *,
        token: str | None = None,
        transport: TransportName | None = None,
        stream: bool = False,
        timeout: float | None = None,
    ) -> InvocationHandle:
        """Enqueue one invocation (validated by the worker before any network call).

        ``token`` is checked here (:func:`~workers.tokens.validate_token`) and sealed for this task with
        ``SARK_TOKEN_KEY``; without a key it is sent in clear only when ``SARK_ALLOW_CLEAR_TOKENS`` is set.

        Raises:
            InvalidToken: a malformed token, or no key to seal it with.
        """
        invocation: dict[str, Any] = {"server": server, "tool": tool, "arguments": arguments or {}}
        if transport is not None:
            invocation["transport"] = transport
        if stream:
            invocation["stream"] = True
        if timeout is not None:
            invocation["timeout"] = timeout
        task_id = str(uuid.uuid4())
        headers = self._token_headers(token, task_id, invocation)
        # argsrepr/kwargsrepr: what the message headers and task-sent events show (names, never values).
        pending = self.app.send_task(TASK_INVOKE, task_id=task_id, kwargs={"invocation": invocation}, headers=headers,
                                     argsrepr="()", kwargsrepr=invocation_repr(invocation))
        return InvocationHandle(self, pending)

    def _token_headers(self, token: str | None, task_id: str,
                       invocation: dict[str, Any] | None = None) -> dict[str, str] | None:
        """The ``sark_token`` header for ``task_id`` (None without a token)."""
        return {TOKEN_HEADER: self._seal(token, task_id, invocation)} if token is not None else None

    def _seal(self, token: str, task_id: str, invocation: dict[str, Any] | None = None) -> str:
        s = self.settings
        validate_token(token, max_bytes=s.max_token_bytes)
        if s.token_key is not None:
            return seal_token(token, s.token_key.get_secret_value(), task_id, invocation=invocation)
        if s.allow_clear_tokens:
            return token
        raise InvalidToken("no SARK_TOKEN_KEY to seal the token with (workers refuse clear tokens unless "
                           "SARK_ALLOW_CLEAR_TOKENS=true)")

    def list_servers(self, user_id: str | None = None, timeout: float = 30) -> list[GatewayServerInfo]:
        """Servers the Gateway knows."""
        data = wait_result(self.app.send_task(TASK_LIST_SERVERS, kwargs={"user_id": user_id}), timeout)
        return [GatewayServerInfo.model_validate(item) for item in data]

    def get_server(self, server_id: str, timeout: float = 30) -> GatewayServerInfo | None:
        """One Gateway server, or None."""
        data = wait_result(self.app.send_task(TASK_GET_SERVER, kwargs={"server_id": server_id}), timeout)
        return GatewayServerInfo.model_validate(data) if data else None

    def list_tools(self, server: str | None = None, timeout: float = 30, *,
                   token: str | None = None) -> list[GatewayToolInfo]:
        """Tools of one registry server, or every Gateway tool (``token``: for a server with a policy)."""
        task_id = str(uuid.uuid4())
        headers = self._token_headers(token, task_id)
        data = wait_result(self.app.send_task(TASK_LIST_TOOLS, task_id=task_id, kwargs={"server": server},
                                              headers=headers), timeout)
        return [GatewayToolInfo.model_validate(item) for item in data]

    def health(self, timeout: float = 30) -> dict[str, Any]:
        """A worker's view of the Gateway and its transports."""
        data: dict[str, Any] = wait_result(self.app.send_task(TASK_HEALTH), timeout)
        return data

    def close(self) -> None:
        """Release the broker and backend connections."""
        self.app.close()


class AsyncSarkClient:
    """asyncio twin of :class:`SarkClient`: the same methods with the same arguments, awaited.

    Each call runs the synchronous client's in a worker thread (``asyncio.to_thread``), so both share one
    implementation; streams are read with the async Redis client. What :class:`InvocationHandle` does
    (``result``, ``stream``, ``cancel``, ``state``) is a method here that takes the handle.

    Args:
        settings: broker/backend URLs, queue names (default: ``SARK_*`` environment).
        app: an existing Celery app to send with (default: one configured from ``settings``).
    """

    def __init__(self, settings: Settings | None = None, app: Celery | None = None) -> None:
        self.sync = SarkClient(settings, app)

    @property
    def settings(self) -> Settings:
        """The settings the client was made with."""
        return self.sync.settings

    @property
    def app(self) -> Celery:
        """The Celery app the client sends with."""
        return self.sync.app

    async def invoke(
        self,
        server: str,
        tool: str,
        arguments: dict[str, Any] | None = None,
        *,
        token: str | None = None,
        transport: TransportName | None = None,
        stream: bool = False,
        timeout: float | None = None,
    ) -> InvocationHandle:
        """Enqueue one invocation (see :meth:`SarkClient.invoke`).

        Raises:
            InvalidToken: a malformed token, or no key to seal it with.
        """
        return await asyncio.to_thread(self.sync.invoke, server, tool, arguments, token=token, transport=transport,
                                       stream=stream, timeout=timeout)

    async def result(self, handle: InvocationHandle, timeout: float | None = None) -> InvocationResult:
        """Wait for ``handle``'s result without blocking the event loop (see :meth:`InvocationHandle.result`)."""
        return await asyncio.to_thread(handle.result, timeout)

    async def stream(self, handle: InvocationHandle, *, after: str | None = None,
                     block_ms: int = 5_000) -> AsyncIterator[Chunk]:
        """Chunks of ``handle``'s stream, read with the async Redis client (see :meth:`InvocationHandle.stream`)."""
        from workers.streams import reader as stream_client

        async def finished() -> bool:
            return await asyncio.to_thread(handle._pending.ready)

        try:
            async for chunk in stream_client.astream(handle.id, redis_url=self.settings.redis_url, after=after,
                                                     block_ms=block_ms, finished=finished):
                yield chunk
        except ProtocolError as exc:
            if exc.detail.get("finished"):
                await self.result(handle, timeout=30)  # the task's own typed error, if it failed
            raise

    async def cancel(self, handle: InvocationHandle) -> None:
        """Cancel ``handle``: queued, it never starts; running, it is interrupted (:meth:`InvocationHandle.cancel`)."""
        await asyncio.to_thread(handle.cancel)

    async def state(self, handle: InvocationHandle) -> str:
        """``handle``'s Celery state (see :attr:`InvocationHandle.state`)."""
        return await asyncio.to_thread(lambda: handle.state)

    async def list_servers(self, user_id: str | None = None, timeout: float = 30) -> list[GatewayServerInfo]:
        """Servers the Gateway knows."""
        return await asyncio.to_thread(self.sync.list_servers, user_id, timeout)

    async def get_server(self, server_id: str, timeout: float = 30) -> GatewayServerInfo | None:
        """One Gateway server, or None."""
        return await asyncio.to_thread(self.sync.get_server, server_id, timeout)

    async def list_tools(self, server: str | None = None, timeout: float = 30, *,
                         token: str | None = None) -> list[GatewayToolInfo]:
        """Tools of one registry server, or every Gateway tool (``token``: for a server with a policy)."""
        return await asyncio.to_thread(self.sync.list_tools, server, timeout, token=token)

    async def health(self, timeout: float = 30) -> dict[str, Any]:
        """A worker's view of the Gateway and its transports."""
        return await asyncio.to_thread(self.sync.health, timeout)

    async def close(self) -> None:
        """Release the broker and backend connections."""
        await asyncio.to_thread(self.sync.close)
