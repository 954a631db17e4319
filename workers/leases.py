"""Invocation leases: at most one worker carries out an invocation at any time.

A message can be delivered twice while its first delivery still runs (the visibility timeout passed, a
sweeper requeued a worker it thought dead, a client sent the same task id again). Before anything else,
a worker takes the invocation's lease, ``keys.lease_key(request_id)``, holding a token unique to this
execution; it renews every lease it holds every ``heartbeat_interval`` (one round trip for all of them),
each for ``heartbeat_timeout``, and deletes it once Celery has stored the outcome. A copy that finds the
lease held does nothing and waits (:class:`~workers.errors.AlreadyRunning`); if the holder dies, its
lease lapses within ``heartbeat_timeout`` and the next copy takes it.

Taking the lease also counts the start in ``keys.attempt_key(request_id)``: ``attempt`` is 1 for the
first start and counts every start after it (redeliveries and Celery retries alike), whatever the
message's ``redelivered`` flag says. Where the broker's consumer takes the lease with the message
(:func:`taken_with_messages`), a message taken but never started (the worker lost its broker connection
or died first) counts too, and its copy waits up to ``heartbeat_timeout`` for that lease to lapse.
Three Lua scripts, idempotent for their holder (a command re-sent after a lost reply does the same thing
again):

    BEGIN  take one lease unless another holder has it, and count the start
    RESUME take back a lease taken with the message, counting no second start
    SYNC   renew leases of this process (taking back one that lapsed: Redis restarted), release others

The releases ride along: a finished invocation's lease is deleted by the process's next BEGIN, or by a
SYNC at most ``_FLUSH_DELAY`` seconds later when no BEGIN came. Measured with ``bench.bench_http`` (2 cores):
a command costs the worker about 0.12 ms of CPU in redis-py's asyncio client, and a RELEASE of its own per
invocation (plus the loop's wake-up for it) took the throughput from 0.93 of the bare-Celery floor (no
lease) to 0.80; riding along, 0.86.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import socket
import time
import uuid
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from config.settings import Settings
from workers.errors import AlreadyRunning, StoreUnavailable
from workers.keys import ATTEMPT_TTL, attempt_key, lease_key

__all__ = ["BEGIN", "TAKEN_HEADER", "LeaseKeeper", "max_hold", "max_waits", "taken_lease", "taken_with_messages"]

log = logging.getLogger("sark.leases")

# KEYS[1]: the lease, KEYS[2]: its attempt counter, KEYS[2 + i]: a lease to release.
# ARGV[1]: holder, ARGV[2]: ttl ms, ARGV[3]: attempt ttl s, ARGV[3 + i]: the holder releasing KEYS[2 + i].
# → {attempt, 0}, or {0, ms left to the lease's holder}.
_BEGIN = """
for i = 3, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i + 1] then
    redis.call('DEL', KEYS[i])
  end
end
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  local left = redis.call('PTTL', KEYS[1])
  if left < 0 then left = tonumber(ARGV[2]) end
  return {0, math.max(1, left)}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if holder then
  return {tonumber(redis.call('GET', KEYS[2]) or '1'), 0}
end
local attempt = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return {attempt, 0}
"""

# Take back a lease taken with the message (workers.broker) whose header is too old to adopt blindly.
# KEYS[1]: the lease, KEYS[2]: its attempt counter. ARGV[1]: holder, ARGV[2]: ttl ms, ARGV[3]: attempt ttl s,
# ARGV[4]: the attempt counted when it was taken. Held by its holder still, or lapsed with no start counted
# since: that attempt; lapsed and started elsewhere since: a new start; held by another: {0, ms left}.
_RESUME = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  local left = redis.call('PTTL', KEYS[1])
  if left < 0 then left = tonumber(ARGV[2]) end
  return {0, math.max(1, left)}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if holder or tonumber(redis.call('GET', KEYS[2]) or '0') == tonumber(ARGV[4]) then
  return {tonumber(ARGV[4]), 0}
end
local attempt = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return {attempt, 0}
"""

# KEYS[i]: a lease, ARGV[2 + i]: its holder here. The first ARGV[2] leases are renewed for ARGV[1] ms, the
# others released. → {positions held by another holder, positions that had lapsed and were taken back}.
_SYNC = """
local renewing = tonumber(ARGV[2])
local others, retaken = {}, {}
for i, key in ipairs(KEYS) do
  local token = ARGV[i + 2]
  local holder = redis.call('GET', key)
  if i > renewing then
    if holder == token then
      redis.call('DEL', key)
    end
  elseif holder == token then
    redis.call('PEXPIRE', key, ARGV[1])
  elseif not holder then
    redis.call('SET', key, token, 'PX', ARGV[1])
    retaken[#retaken + 1] = i
  else
    others[#others + 1] = i
  end
end
return {others, retaken}
"""

# KEYS[1]: the lease, KEYS[2]: its attempt counter. ARGV[1]: holder, ARGV[2]: the attempt its start counted.
# Held by that holder: release it and take the start back (the counter as it was before it), so that the
# copy forwarded elsewhere counts the same attempt. → 1 when it was held, else 0 (nothing changed).
_HAND_OVER = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
if tonumber(redis.call('GET', KEYS[2]) or '0') == tonumber(ARGV[2]) then
  if tonumber(ARGV[2]) <= 1 then
    redis.call('DEL', KEYS[2])
  else
    redis.call('DECR', KEYS[2])
  end
end
return 1
"""

#: The BEGIN script (its KEYS/ARGV above), for a consumer that takes the lease with the message.
BEGIN = _BEGIN
#: Message header in which a Redis broker's consumer hands the task the lease it took with the message
#: (``{"token", "attempt", "at"}``; set or removed by :class:`workers.broker.QoS` on every message it takes).
TAKEN_HEADER = "sark_lease"


def taken_with_messages(settings: Settings) -> bool:
    """True when the broker's consumer takes each invocation's lease with its message: a Redis broker that
    is also the runtime's Redis. Then BEGIN rides in the round trip that records the message as taken,
    and the task only adopts the lease. Measured with ``bench.bench_http`` (two alternating runs each, ratios
    to the bare-Celery floor of the same run): without leases p50 1.15-1.16, throughput 0.96-0.99; a BEGIN
    of its own before each call 1.22-1.26 and 0.83-0.89; the lease taken with the message 1.15-1.18 and
    0.92-0.96.
    """
    from workers.broker import broker_transport  # (no import cycle at module load)

    return broker_transport(settings.broker_url) is not None and settings.broker_url == settings.redis_url


def taken_lease(value: object, *, ttl: float, interval: float) -> tuple[str, int, bool] | None:
    """``(token, attempt, fresh)`` of a lease taken with the message (:data:`TAKEN_HEADER`); None if there is
    none. ``fresh``: taken less than ``ttl - interval`` seconds ago, so it is still held and can be adopted
    without a round trip (it is renewed within ``interval`` of its adoption); an older one (the message
    waited for a thread) is taken back with :meth:`LeaseKeeper.acquire`'s ``taken_attempt``."""
    if not isinstance(value, dict):
        return None
    token, attempt, at = value.get("token"), value.get("attempt"), value.get("at")
    if not (isinstance(token, str) and isinstance(attempt, int) and attempt > 0 and isinstance(at, (int, float))):
        return None
    return token, attempt, 0.0 <= time.time() - float(at) < ttl - interval


#: Seconds a lease is still renewed past the longest invocation: the task's own margin on waiting for it,
#: then storing its outcome (the result backend retries through a Redis restart).
_HOLD_MARGIN = 60.0
#: Seconds a release waits for a BEGIN to ride along before it goes by itself.
_FLUSH_DELAY = 0.1


def max_hold(settings: Settings) -> float:
    """Longest one execution keeps renewing its lease: the longest invocation, then storing its outcome.

    A lease still held past this is a leak (its release was lost): it is left to lapse.
    """
    return settings.invoke_attempts * (settings.max_invoke_timeout + settings.invoke_wait_max) + _HOLD_MARGIN


def max_waits(settings: Settings) -> int:
    """Re-queues a delivery spends waiting on another holder's lease before it fails with AlreadyRunning.

    While its holder lives, a lease always has more than ``heartbeat_timeout - heartbeat_interval`` left
    (it is renewed every interval), so each wait for it lasts at least that; a holder stops renewing after
    :func:`max_hold`, and its lease lapses ``heartbeat_timeout`` later. Twice that count, for late renewals.
    """
    shortest = settings.heartbeat_timeout - settings.heartbeat_interval  # > 0: the settings check timeout >= 3 x
    return 2 * math.ceil((max_hold(settings) + settings.heartbeat_timeout) / shortest)


@dataclass(slots=True)
class _Held:
    token: str
    #: ``time.monotonic()`` after which the lease is no longer renewed (see :func:`max_hold`).
    until: float


class LeaseKeeper:
    """The leases of the invocations this process carries out (one per process, owned by the runtime).

    Its coroutines run on the runtime's event loop, the only one touching its state; :meth:`new_token`
    and :meth:`release_soon` may be called from any thread.

    Args:
        client: the runtime's async Redis client.
        ttl: seconds a lease lives unless renewed (``heartbeat_timeout``).
        interval: seconds between renewals (``heartbeat_interval``).
        hold: seconds one execution's lease is renewed at most (:func:`max_hold`).
        holder: this process's part of every token (default ``<hostname>:<pid>``).
    """

    def __init__(self, client: aioredis.Redis, *, ttl: float, interval: float, hold: float,
                 holder: str | None = None) -> None:
        self._ttl_ms = max(1, int(ttl * 1000))
        self._interval = interval
        self._hold = hold
        self._holder = holder or f"{socket.gethostname()}:{os.getpid()}"
        self._begin = client.register_script(_BEGIN)
        self._sync = client.register_script(_SYNC)
        self._resume = client.register_script(_RESUME)
        self._hand_over = client.register_script(_HAND_OVER)
        self._held: dict[str, _Held] = {}
        #: (request id, token) given up by task threads, not yet sent (a deque: appended from any thread).
        self._pending: collections.deque[tuple[str, str]] = collections.deque()
        #: True while a flush of ``_pending`` is scheduled (set from task threads; a lost race only
        #: leaves a release to the next BEGIN or renewal).
        self._flush_due = False
        #: Leases another holder was found holding at a renewal (each reported once).
        self._contested: set[str] = set()
        self._renewing: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def new_token(self) -> str:
        """A holder token for one execution of an invocation (thread-safe, no I/O)."""
        return f"{self._holder}:{uuid.uuid4().hex[:8]}"

    @property
    def held(self) -> dict[str, str]:
        """The leases this process holds (given up ones until they are sent): request id → token."""
        return {request_id: held.token for request_id, held in self._held.items()}

    async def acquire(self, request_id: str, token: str, taken_attempt: int | None = None) -> int:
        """Take the lease of ``request_id`` for ``token``; returns the invocation's ``attempt`` (1, 2, …).

        Leases given up with :meth:`release_soon` are deleted in the same round trip.

        Raises:
            AlreadyRunning: another execution holds it (no attempt was counted).
            StoreUnavailable: Redis cannot be reached (``reached_target`` false).
        """
        # Not while a renewal is in flight: it could take back a lease deleted here (see _flush).
        releases = self._take_pending() if self._renewing is None and taken_attempt is None else []
        keys = [lease_key(request_id), attempt_key(request_id), *(lease_key(rid) for rid, _ in releases)]
        args: list[str | int] = [token, self._ttl_ms, ATTEMPT_TTL, *(tok for _, tok in releases)]
        try:
            if taken_attempt is None:
                attempt, left_ms = await self._begin(keys=keys, args=args)
            else:  # the consumer took it with the message: take it back, counting no second start
                attempt, left_ms = await self._resume(keys=keys, args=[*args, taken_attempt])
        except (RedisError, OSError) as exc:  # OSError: a reset connection, re-raised after the client's retries
            raise StoreUnavailable(f"cannot take the lease of invocation {request_id}: {type(exc).__name__}: {exc}",
                                   {"what": "lease", "reached_target": False}) from None
        if not int(attempt):
            retry_after = int(left_ms) / 1000.0
            raise AlreadyRunning(f"invocation {request_id} is being carried out by another worker; this delivery "
                                 "waits for it", {"request_id": request_id, "retry_after": retry_after})
        self._held[request_id] = _Held(token, time.monotonic() + self._hold)
        self._contested.discard(request_id)
        return int(attempt)

    def adopt(self, request_id: str, token: str) -> None:
        """Hold (renew, then release) the lease ``token`` took with the message, without a round trip."""
        self._held[request_id] = _Held(token, time.monotonic() + self._hold)
        self._contested.discard(request_id)

    def release_soon(self, request_id: str, token: str) -> None:
        """Give the lease of ``request_id`` up if ``token`` holds it here, from any thread, without waiting:
        it goes with this process's next BEGIN, or by itself within ``_FLUSH_DELAY`` seconds."""
        self._pending.append((request_id, token))
        loop = self._loop
        if loop is None or self._flush_due:
            return
        self._flush_due = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: the lease lapses
            loop.call_soon_threadsafe(loop.call_later, _FLUSH_DELAY, self._flush_later)

    async def hand_over(self, request_id: str, token: str, attempt: int) -> bool:
        """Give the lease of ``request_id`` up and take back the start it counted (``attempt``): the
        invocation goes to another worker unstarted (:class:`~workers.errors.NotServedHere`), whose start
        is then the same attempt. False when ``token`` no longer held it (nothing changed).

        Raises:
            RedisError, OSError: Redis could not be reached (the lease lapses; the copy counts one more).
        """
        held = self._held.get(request_id)
        if held is not None and held.token == token:
            del self._held[request_id]
            self._contested.discard(request_id)
        if self._renewing is not None:  # a renewal in flight would take the lease back after its deletion
            with contextlib.suppress(Exception):
                await asyncio.shield(self._renewing)
        done = await self._hand_over(keys=[lease_key(request_id), attempt_key(request_id)], args=[token, attempt])
        return bool(int(done))

    async def release(self, request_id: str, token: str) -> None:
        """Give the lease of ``request_id`` up now if ``token`` holds it here (with any other given up).

        Never raises: a release that fails lapses within the lease's TTL.
        """
        self._pending.append((request_id, token))
        await self._flush()

    def _take_pending(self) -> list[tuple[str, str]]:
        """The given-up leases this process still holds, no longer held (never taken: dropped)."""
        releases = []
        while self._pending:
            request_id, token = self._pending.popleft()
            held = self._held.get(request_id)
            if held is not None and held.token == token:
                del self._held[request_id]
                self._contested.discard(request_id)
                releases.append((request_id, token))
        return releases

    def _flush_later(self) -> None:
        self._flush_due = False
        if self._pending:
            asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        releases = self._take_pending()
        if not releases:
            return
        if self._renewing is not None:  # a renewal in flight would take the lease back after its deletion
            with contextlib.suppress(Exception):
                await asyncio.shield(self._renewing)
        try:
            await self._send([], releases)
        except (RedisError, OSError) as exc:
            log.warning("could not release the leases of %d invocations (%s: %s); they lapse by themselves",
                        len(releases), type(exc).__name__, exc)

    async def _send(self, renewals: list[tuple[str, str]],
                    releases: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
        """One SYNC: renew ``renewals``, release ``releases``; positions contested and retaken (0-based)."""
        pairs = renewals + releases
        keys = [lease_key(request_id) for request_id, _ in pairs]
        args: list[str | int] = [self._ttl_ms, len(renewals), *(token for _, token in pairs)]
        others, retaken = await self._sync(keys=keys, args=args)
        return [int(p) - 1 for p in others], [int(p) - 1 for p in retaken]

    async def renew(self) -> None:
        """Extend every lease this process holds and release those given up, in one round trip (none when
        there is neither).

        Raises:
            RedisError, OSError: Redis could not be reached (the next renewal tries again).
        """
        releases = self._take_pending()
        now = time.monotonic()
        for request_id, held in list(self._held.items()):
            if held.until < now:
                log.warning("invocation %s has held its lease longer than any invocation may run: it is no "
                            "longer renewed", request_id)
                del self._held[request_id]
        renewals = [(request_id, held.token) for request_id, held in self._held.items()]
        if not renewals and not releases:
            return
        future = asyncio.get_running_loop().create_future()
        self._renewing = future
        try:
            others, retaken = await self._send(renewals, releases)
        finally:
            self._renewing = None
            future.set_result(None)
        for position in others:
            request_id = renewals[position][0]
            if request_id not in self._contested:
                self._contested.add(request_id)
                log.warning("the lease of invocation %s is held by another worker: its lease lapsed while this "
                            "one ran it, and another worker may be running the same invocation", request_id)
        for position in retaken:
            log.warning("the lease of invocation %s had lapsed (Redis restarted?); taken back", renewals[position][0])

    def start(self) -> None:
        """Start renewing in the background (call on the runtime's loop)."""
        self._loop = asyncio.get_running_loop()
        if self._task is None:
            self._task = self._loop.create_task(self._renew_forever(), name="sark-lease-renewal")

    async def close(self) -> None:
        """Send the releases still due, stop renewing; leases still held lapse within their TTL."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._flush()
        self._loop = None

    async def _renew_forever(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.renew()
            except (RedisError, OSError) as exc:
                if not failing:  # once per outage, not every interval
                    log.warning("could not renew %d invocation leases (%s: %s); retrying every %gs",
                                len(self._held), type(exc).__name__, exc, self._interval)
                failing = True
            except Exception:
                log.exception("lease renewal failed")
            else:
                failing = False
