"""Per-process runtime: the event loop and everything it owns (transports, Gateway pool, Redis).

Created lazily on first use in a process (and eagerly by the worker's signals), closed at worker
shutdown. A forked child never reuses its parent's runtime: the pid is checked on access. Creating it
also hardens the process (:mod:`workers.environment`): the environment stdio servers may draw from is
snapshotted without the worker's secrets, then the secrets leave the environment.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import os
import threading
from collections.abc import Collection, Coroutine, Mapping
from typing import Any, TypeVar

import redis.asyncio as aioredis

from config.registry import Registry, load_registry
from config.settings import Settings, get_settings
from config.transports import catalog, get_spec
from workers.authz import TokenVerifier
from workers.breaker.board import BreakerBoard
from workers.environment import harden_worker_process, launch_environment
from workers.errors import Cancelled, InternalError, NotServedHere
from workers.leases import LeaseKeeper, max_hold, taken_with_messages
from workers.loop import EventLoopThread, LoopClosed
from workers.redis_client import reconnecting_client
from workers.scrub import register_settings_secrets
from workers.transports.base import BuildContext, Transport

__all__ = ["Runtime", "close_runtime", "current_runtime", "get_runtime", "transports_for_queues"]

log = logging.getLogger("sark.runtime")

T = TypeVar("T")


def transports_for_queues(settings: Settings, queues: Collection[str] | None) -> list[str]:
    """The transports a worker consuming ``queues`` builds: those whose queue it consumes. Every transport
    when ``queues`` is None (not a worker: tests, eager calls) or holds a queue of no transport (a custom
    queue may be sent anything)."""
    every = list(catalog())
    if queues is None:
        return every
    own = {settings.queue_for(name) for name in every}
    if any(queue not in own for queue in queues):
        return every  # a queue of no transport (custom routes) may be sent any invocation
    return [name for name in every if settings.queue_for(name) in queues]


class Runtime:
    """Everything one worker process keeps between tasks.

    Args:
        transports: names of the transports to build (default: every transport of the catalog).
    """

    def __init__(self, settings: Settings, registry: Registry, environ: Mapping[str, str] | None = None,
                 transports: Collection[str] | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.wanted = [get_spec(name).name for name in (catalog() if transports is None else transports)]
        # From now on every error and log line of this process is scrubbed of the settings' secrets.
        register_settings_secrets(settings)
        #: What stdio servers' ``inherit_env`` and ``${NAME}`` draw from (no worker secret in it).
        self.environ = launch_environment(environ)
        self.loop = EventLoopThread()
        self.transports: dict[str, Transport] = {}
        #: Queues whose transports are built (:meth:`serve_queue`); swapped whole, read without the lock.
        self._served_queues = frozenset(settings.queue_for(name) for name in self.wanted)
        self._serve_lock = threading.Lock()
        self._closing = False
        self._inflight: dict[str, concurrent.futures.Future[Any]] = {}
        #: True once the worker is shutting down and has interrupted what was running.
        self.draining = False
        self.loop.run(self._open(), timeout=60)

    @functools.cached_property
    def leases_taken_with_messages(self) -> bool:
        """The broker's consumer takes invocation leases with their messages (a ``sark_lease`` header is
        trusted only then: that consumer sets or removes it on every message it takes)."""
        return taken_with_messages(self.settings)

    @functools.cached_property
    def verifier(self) -> TokenVerifier:
        """Verifies user tokens for registry ``policy:`` blocks (keys read on first use)."""
        return TokenVerifier(self.settings)

    async def _open(self) -> None:
        # Every async resource is created on the loop that will use it.
        self.redis: aioredis.Redis = reconnecting_client(
            self.settings.redis_url, health_check_interval=10, socket_keepalive=True
        )
        #: The leases of the invocations this process carries out, renewed in the background.
        self.leases = LeaseKeeper(self.redis, ttl=self.settings.heartbeat_timeout,
                                  interval=self.settings.heartbeat_interval, hold=max_hold(self.settings))
        self.leases.start()
        context = BuildContext(self.settings, self.registry, self.environ)
        #: The Gateway client (discovery and health tasks use it too; it connects on first use).
        self.gateway = context.gateway
        self.breakers = BreakerBoard.from_settings(self.settings, self.registry)
        await self.breakers.start()
        self._context = context
        # Only the transports this worker serves: a stdio server never starts on a worker of the http queue.
        await self._build(self.wanted)

    async def _build(self, names: Collection[str]) -> None:
        if self._closing:
            raise LoopClosed("the worker is shutting down: no transport is built now")
        for name in names:
            if name not in self.transports:
                transport = get_spec(name).build(self._context)
                await transport.open()
                self.transports = {**self.transports, name: transport}

    def serve_queue(self, queue: object) -> None:
        """Build the transports of ``queue`` (the queue a task arrived on) if they are not built: this worker
        was told to consume it after it started (``celery control add_consumer``). Free when they are.

        Raises:
            InternalError: the transports could not be built (the worker is stopping, or one failed to open).
        """
        if queue in self._served_queues or not isinstance(queue, str):
            return
        with self._serve_lock:
            if queue in self._served_queues:
                return
            names = [name for name in catalog() if self.settings.queue_for(name) == queue]
            if names:
                log.info("queue %s was added: building transport(s) %s", queue, ", ".join(names))
                try:
                    self.loop.run(self._build(names), timeout=60)
                except Exception as exc:
                    log.exception("building transport(s) %s for queue %s failed", ", ".join(names), queue)
                    raise InternalError(f"the worker could not start transport(s) {', '.join(names)} "
                                        f"({type(exc).__name__}); see the worker log") from None
            self._served_queues = self._served_queues | {queue}

    def run_invocation(self, request_id: str, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run an invocation's coroutine on the loop, cancellable by :meth:`cancel` meanwhile.

        Raises:
            Cancelled: :meth:`cancel` was called for ``request_id``.
            TimeoutError: no result within ``timeout``.
        """
        future = self.loop.submit(coro)
        # A second delivery of a running invocation (it only waits for the lease) never hides the first.
        self._inflight.setdefault(request_id, future)
        try:
            return future.result(timeout)
        except concurrent.futures.CancelledError:
            raise Cancelled(f"invocation {request_id} was cancelled", {"request_id": request_id}) from None
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no result within {timeout}s") from None
        finally:
            if self._inflight.get(request_id) is future:
                del self._inflight[request_id]

    def release_lease(self, request_id: str, token: str, *, wait: float = 0.0) -> None:
        """Give up this execution's lease of ``request_id``, from a task thread; never raises.

        ``wait`` 0: without waiting (:meth:`LeaseKeeper.release_soon`: it goes with the next lease command
        of this process, within 0.1 s); otherwise now, waiting up to ``wait`` seconds for Redis.
        """
        if wait <= 0:
            self.leases.release_soon(request_id, token)
            return
        try:
            future = self.loop.submit(self.leases.release(request_id, token))
        except LoopClosed:
            return  # the process is stopping: the lease lapses
        with contextlib.suppress(Exception):
            future.result(wait)

    def hand_over_lease(self, request_id: str, token: str, attempt: int, *, wait: float) -> None:
        """From a task thread: release the lease of an invocation forwarded unstarted, taking back its start
        (:meth:`LeaseKeeper.hand_over`); waits up to ``wait`` s, never raises (a lease left lapses)."""
        try:
            self.loop.run(self.leases.hand_over(request_id, token, attempt), timeout=wait)
        except Exception as exc:
            log.warning("could not hand over the lease of %s (%s): it lapses by itself", request_id,
                        type(exc).__name__)

    def drain(self) -> int:
        """Stop everything in flight (cold/soft shutdown): interrupted invocations go back to the queue."""
        self.draining = True
        futures = list(self._inflight.values())
        return sum(1 for future in futures if future.cancel())

    def cancel(self, request_id: str) -> bool:
        """Interrupt the running invocation ``request_id``; False when it does not run here."""
        future = self._inflight.get(request_id)
        return bool(future and future.cancel())

    def transport(self, name: str) -> Transport:
        """The transport called ``name``.

        Raises:
            NotServedHere: this worker does not serve that transport (the task was sent to another
                transport's queue); the task forwards it to ``detail["queue"]``.
        """
        try:
            return self.transports[name]
        except KeyError:
            queue = self.settings.queue_for(name)
            raise NotServedHere(f"transport {name!r} is not served by this worker (it serves "
                                f"{', '.join(self.transports)}): send the task to its queue, {queue}",
                                {"transport": name, "queue": queue}) from None

    async def _close(self) -> None:
        self._closing = True  # a queue added now builds nothing that this close would miss
        await self.leases.close()
        for transport in self.transports.values():
            try:
                await transport.close()
            except Exception:
                log.exception("closing transport %s failed", transport.name)
        await self.gateway.close()
        await self.breakers.close()
        await self.redis.aclose()

    def close(self) -> None:
        """Close transports and connections, then stop the loop."""
        try:
            self.loop.run(self._close(), timeout=30)
        except Exception:
            log.exception("runtime close failed")
        finally:
            self.loop.stop()


_lock = threading.Lock()
_runtime: Runtime | None = None
_runtime_pid: int | None = None


#: The queues this worker process consumes (set by the worker at setup; None outside workers).
worker_queues: frozenset[str] | None = None


def get_runtime(settings: Settings | None = None, registry: Registry | None = None) -> Runtime:
    """This process's runtime, created on first call with the transports of :data:`worker_queues`."""
    global _runtime, _runtime_pid
    pid = os.getpid()
    if _runtime is not None and _runtime_pid == pid:
        return _runtime
    with _lock:
        if _runtime is None or _runtime_pid != pid:
            settings = settings or get_settings()
            registry = registry or load_registry(settings.registry_path)
            # Snapshot first (stdio servers' ${NAME} see the environment as it was at start), then scrub:
            # the settings object holds the secrets from here on (workers.app loaded get_settings() at import).
            environ = launch_environment()
            harden_worker_process()
            _runtime = Runtime(settings, registry, environ, transports_for_queues(settings, worker_queues))
            _runtime_pid = pid
            log.info("runtime started", extra={"pid": pid, "servers": sorted(registry.servers),
                                               "transports": sorted(_runtime.transports)})
        return _runtime


def current_runtime() -> Runtime | None:
    """This process's runtime if it was started, without starting one."""
    return _runtime if _runtime_pid == os.getpid() else None


def close_runtime(**_: Any) -> None:
    """Close this process's runtime, if it has one (a Celery signal handler)."""
    global _runtime, _runtime_pid
    with _lock:
        runtime, _runtime = _runtime, None
        owner, _runtime_pid = _runtime_pid, None
    if runtime is not None and owner == os.getpid():
        runtime.close()
        log.info("runtime closed", extra={"pid": owner})
