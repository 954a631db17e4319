"""One persistent asyncio event loop per worker process, run in a daemon thread.

Celery task code is synchronous; it hands coroutines to this loop with :meth:`EventLoopThread.run`
and waits for them with a deadline. The loop owns every connection (httpx pool, stdio sessions,
Redis clients), so they survive between tasks and are shared by concurrent tasks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["EventLoopThread", "LoopClosed"]

T = TypeVar("T")


class LoopClosed(RuntimeError):
    """The loop was stopped; no more coroutines can run on it."""


class EventLoopThread:
    """An asyncio loop running forever in its own thread until :meth:`stop`."""

    def __init__(self, name: str = "sark-loop") -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop."""
        return self._loop

    @property
    def running(self) -> bool:
        """True until :meth:`stop` finished."""
        return self._thread.is_alive() and not self._loop.is_closed()

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._ready.set)
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop and return a thread-safe future."""
        if not self.running:
            coro.close()
            raise LoopClosed("the worker's event loop is stopped")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result.

        On ``timeout`` (or if the waiting thread is interrupted) the coroutine is cancelled, so
        no work is left running behind the caller's back.

        Raises:
            TimeoutError: no result within ``timeout`` seconds.
        """
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no result within {timeout}s") from None
        except BaseException:
            future.cancel()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop after cancelling what still runs on it, and join the thread."""
        if not self.running:
            return

        async def _cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            asyncio.run_coroutine_threadsafe(_cancel_all(), self._loop).result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
