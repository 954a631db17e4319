"""Per-process runtime: the event loop and everything it owns (transports, Gateway pool, Redis).

Created lazily on first use in a process (and eagerly by the worker's signals), closed at worker
shutdown. A forked child never reuses its parent's runtime: the pid is checked on access.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import redis.asyncio as aioredis

from config.registry import Registry, load_registry
from config.settings import Settings, get_settings
from workers.errors import InvalidInvocation
from workers.gateway_client import GatewayClient
from workers.loop import EventLoopThread
from workers.models import TransportName
from workers.transports.base import Transport
from workers.transports.http import HttpTransport

__all__ = ["Runtime", "close_runtime", "get_runtime"]

log = logging.getLogger("sark.runtime")


class Runtime:
    """Everything one worker process keeps between tasks."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.loop = EventLoopThread()
        self.transports: dict[TransportName, Transport] = {}
        self.loop.run(self._open(), timeout=60)

    async def _open(self) -> None:
        # Every async resource is created on the loop that will use it.
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            self.settings.redis_url, health_check_interval=10, socket_keepalive=True
        )
        self.gateway = GatewayClient(self.settings)
        self.transports = self._build_transports()
        for transport in self.transports.values():
            await transport.open()

    def _build_transports(self) -> dict[TransportName, Transport]:
        transports: dict[TransportName, Transport] = {
            "http": HttpTransport(self.gateway, max_result_bytes=self.settings.max_result_bytes),
        }
        return transports

    def transport(self, name: TransportName) -> Transport:
        """The transport called ``name``.

        Raises:
            InvalidInvocation: this worker has no such transport.
        """
        try:
            return self.transports[name]
        except KeyError:
            raise InvalidInvocation(f"transport {name!r} is not available on this worker") from None

    async def _close(self) -> None:
        for transport in self.transports.values():
            try:
                await transport.close()
            except Exception:
                log.exception("closing transport %s failed", transport.name)
        await self.gateway.close()
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


def get_runtime(settings: Settings | None = None, registry: Registry | None = None) -> Runtime:
    """This process's runtime, created on first call."""
    global _runtime, _runtime_pid
    pid = os.getpid()
    if _runtime is not None and _runtime_pid == pid:
        return _runtime
    with _lock:
        if _runtime is None or _runtime_pid != pid:
            settings = settings or get_settings()
            registry = registry or load_registry(settings.registry_path)
            _runtime = Runtime(settings, registry)
            _runtime_pid = pid
            log.info("runtime started", extra={"pid": pid, "servers": sorted(registry.servers)})
        return _runtime


def close_runtime(**_: Any) -> None:
    """Close this process's runtime, if it has one (a Celery signal handler)."""
    global _runtime, _runtime_pid
    with _lock:
        runtime, _runtime = _runtime, None
        owner, _runtime_pid = _runtime_pid, None
    if runtime is not None and owner == os.getpid():
        runtime.close()
        log.info("runtime closed", extra={"pid": owner})
