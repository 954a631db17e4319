"""Which breakers this process may treat as closed without asking Redis, kept true by pub/sub.

The breaker scripts publish a breaker's key on :func:`workers.keys.breaker_channel` whenever they
change its state, failure count or generation. This process subscribes to that channel, and it
remembers "closed, no failures, generation *g*" for a target only from a Redis answer that no change
message for that target overtook. While the subscription is live, such an entry is as fresh as the
messages are (sub-millisecond on a LAN), so a healthy call needs no round trip before it starts.

Safety rules:

* No subscription, no entries: while the subscription is being (re)made, or Redis is unreachable,
  nothing is remembered and every call asks Redis (or the local fallback) as before.
* A change message drops the target's entry; an answer that was in flight when a message (or a
  reconnect) arrived is not remembered (per-target change counters, plus an epoch per subscription).
* Entries expire after ``max_age`` seconds even while the subscription looks live, which bounds
  how long a silently broken connection could hide a change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from workers.keys import breaker_channel

__all__ = ["BreakerWatch", "Ticket"]

log = logging.getLogger("sark.breaker")


@dataclass(frozen=True, slots=True)
class Ticket:
    """Taken before asking Redis; an answer is remembered only if nothing changed since."""

    key: str
    epoch: int
    changes: int


class BreakerWatch:
    """Pub/sub-invalidated memory of closed, failure-free breakers (one per process).

    Args:
        client: A Redis client used only for the subscription (no socket timeout: it blocks).
        max_age: Seconds an entry is trusted at most, whatever the subscription says.
        poll: Seconds between health checks of the subscription while idle.
    """

    def __init__(self, client: aioredis.Redis, *, max_age: float = 5.0, poll: float = 1.0) -> None:
        self.client = client
        self.max_age = max_age
        self._poll = poll
        self._closed: dict[str, tuple[int, float]] = {}  # key -> (gen, remembered at)
        self._changes: dict[str, int] = {}
        self._epoch = 0
        self._live = False
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    @property
    def live(self) -> bool:
        """True while the subscription is confirmed and entries may be used."""
        return self._live

    # --- the cache ------------------------------------------------------------------------------------
    def closed_gen(self, key: str) -> int | None:
        """The generation of ``key``'s breaker if it is known closed with no failures, else None."""
        if not self._live:
            return None
        entry = self._closed.get(key)
        if entry is None:
            return None
        gen, at = entry
        if time.monotonic() - at > self.max_age:
            del self._closed[key]
            return None
        return gen

    def ticket(self, key: str) -> Ticket:
        """Call before asking Redis about ``key``; pass it to :meth:`remember` with the answer."""
        return Ticket(key, self._epoch, self._changes.get(key, 0))

    def remember(self, ticket: Ticket, *, closed: bool, failures: int, gen: int) -> None:
        """Record a Redis answer: remembered only when closed, failure-free and not overtaken."""
        if not closed or failures:
            self._closed.pop(ticket.key, None)
            return
        if self._live and ticket.epoch == self._epoch and ticket.changes == self._changes.get(ticket.key, 0):
            self._closed[ticket.key] = (gen, time.monotonic())

    def changed(self, key: str) -> None:
        """A change message for ``key`` arrived: forget it, and do not trust answers in flight."""
        self._changes[key] = self._changes.get(key, 0) + 1
        self._closed.pop(key, None)

    def _go_dark(self) -> None:
        self._live = False
        self._epoch += 1
        self._closed.clear()
        self._changes.clear()
        self._subscribed.clear()

    # --- the subscription -----------------------------------------------------------------------------
    async def start(self, wait: float = 2.0) -> None:
        """Start listening; waits up to ``wait`` seconds for the first subscription (never raises)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._listen(), name="sark-breaker-watch")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), wait)

    async def close(self) -> None:
        """Stop listening and close the client."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._go_dark()
        await self.client.aclose()

    async def _listen(self) -> None:
        channel = breaker_channel()
        failing = False
        while True:
            try:
                async with self.client.pubsub() as pubsub:
                    await pubsub.subscribe(channel)
                    while True:
                        message = await pubsub.get_message(timeout=self._poll)
                        if message is None:
                            continue
                        if message["type"] == "subscribe":
                            self._live = True
                            self._subscribed.set()
                            if failing:
                                log.info("breaker change feed is back", extra={"event": "breaker.watch_healed"})
                                failing = False
                        elif message["type"] == "message":
                            data = message["data"]
                            self.changed(data.decode() if isinstance(data, bytes) else str(data))
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if not failing:
                    log.warning("breaker change feed lost (%s: %s); every call asks Redis until it is back",
                                type(exc).__name__, exc, extra={"event": "breaker.watch_lost"})
                    failing = True
            except Exception:  # a bug here must not stop the feed for good
                log.exception("breaker change feed failed")
                failing = True
            finally:
                self._go_dark()
            await asyncio.sleep(self._poll)
