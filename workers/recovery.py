"""Fast recovery of a dead worker's messages on a Redis broker: heartbeats, ownership, sweeps.

kombu's Redis transport gives a message taken by a worker back to its queue only after the visibility
timeout (one hour by default): a SIGKILLed worker's invocations waited that long. Here, as in
dramatiq's Redis broker, every consuming worker process (a *consumer*)

* proves it is alive: a thread writes ``now + heartbeat_timeout`` (Redis time) into
  :func:`~workers.keys.heartbeats_key` every ``heartbeat_interval``;
* records each message it takes as its own (:func:`~workers.keys.owned_key`, written in the same
  pipeline as kombu's unacked record, removed with it on ack/reject/restore: :mod:`workers.broker`);
* sweeps: every ``heartbeat_interval`` its event loop runs :data:`CLAIM` (Lua, atomic): the owned
  messages of every consumer whose heartbeat lapsed move into this sweeper's
  :func:`~workers.keys.recovering_key`, and the dead consumer is forgotten. Then each claimed message goes
  back to the front of its queue, marked redelivered, in one transaction that also removes its unacked
  record and its claim (kombu's own restore, so routing and priorities are kombu's).

Nothing is lost or doubled if a sweeper dies mid-sweep: a claimed message is either recorded (the
unacked hash, plus one recovering set) or back in its queue, and a dead sweeper's recovering set is
claimed like its owned set. A tag may linger in a set after its message left by another way (a
visibility-timeout restore elsewhere, an ack): restoring it finds no unacked record and pushes nothing.
A message restored by kombu's visibility-timeout sweep at the same time is pushed once: both restores
watch the unacked hash.

A sweeper claims nothing until its own heartbeats have succeeded for ``heartbeat_timeout`` in a row:
after a Redis outage every worker's heartbeat looks stale, and live workers get that long to beat again.

What the guarantee does not cover (see README "Delivery guarantees"): a live worker cut off from Redis
for longer than ``heartbeat_timeout`` is presumed dead; its messages run elsewhere, while the invocation
leases (:mod:`workers.leases`) keep a copy from starting as long as the first attempt's lease is renewed.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import redis
from kombu.utils.json import loads

from workers.keys import consumers_key, fleet_key, heartbeats_key, owned_key, recovering_key

__all__ = [
    "Heartbeat",
    "HeartbeatConfig",
    "VisibilityTimeoutMismatch",
    "check_fleet_visibility_timeout",
    "claim_dead",
    "claim_stranded",
    "consumer_id",
    "fleet_status",
    "heartbeat",
    "restore_claimed",
    "set_fleet_visibility_timeout",
]

log = logging.getLogger("sark.recovery")

#: Heartbeat: KEYS heartbeats, consumers; ARGV consumer id, timeout (ms). Returns Redis time (ms).
BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('SADD', KEYS[2], ARGV[1])
return now
"""

#: Claim the messages of dead consumers. KEYS consumers, heartbeats, recovering set of the sweeper;
#: ARGV sweeper id, owned-set prefix, recovering-set prefix, grace (ms). Returns the dead consumers' ids.
#: A consumer with no heartbeat at all (it took a message just before its first beat, or just after a
#: sweeper forgot it) is given ``grace`` to beat, not claimed at once.
#: (The owned/recovering sets of the dead are named in the script: fine on one Redis, not on a Cluster,
#: like kombu's own keys.)
CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = {}
for _, c in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if c ~= ARGV[1] then
    local deadline = redis.call('ZSCORE', KEYS[2], c)
    if not deadline then
      redis.call('ZADD', KEYS[2], 'NX', now + tonumber(ARGV[4]), c)
    elseif tonumber(deadline) < now then
      for _, src in ipairs({ARGV[2] .. c, ARGV[3] .. c}) do
        if redis.call('EXISTS', src) == 1 then
          redis.call('SUNIONSTORE', KEYS[3], KEYS[3], src)
          redis.call('DEL', src)
        end
      end
      redis.call('SREM', KEYS[1], c)
      redis.call('ZREM', KEYS[2], c)
      table.insert(dead, c)
    end
  end
end
return dead
"""

#: Leave the fleet on a clean exit. KEYS consumers, heartbeats, owned, recovering; ARGV consumer id.
#: With nothing held: forgotten at once; otherwise its heartbeat is expired now, for the next sweep.
RETIRE = """
if redis.call('SCARD', KEYS[3]) == 0 and redis.call('SCARD', KEYS[4]) == 0 then
  redis.call('SREM', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0
end
redis.call('ZADD', KEYS[2], 0, ARGV[1])
return 1
"""

#: The fleet's visibility timeout: KEYS its key; ARGV this worker's. Returns the fleet's (set if none).
FLEET_VISIBILITY = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"""

_OWNED_PREFIX = owned_key("")
_RECOVERING_PREFIX = recovering_key("")

_identity: tuple[int, str] | None = None
_identity_lock = threading.Lock()


def consumer_id() -> str:
    """This process's consumer id (``host:pid:nonce``; a forked child gets its own)."""
    global _identity
    pid = os.getpid()
    identity = _identity
    if identity is None or identity[0] != pid:
        with _identity_lock:
            if _identity is None or _identity[0] != pid:
                _identity = (pid, f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:8]}")
            identity = _identity
    return identity[1]


class VisibilityTimeoutMismatch(RuntimeError):
    """This worker's visibility timeout is not the fleet's."""


def check_fleet_visibility_timeout(client: redis.Redis, visibility_timeout: int) -> None:
    """Record ``visibility_timeout`` as the fleet's if it has none yet; refuse a different one.

    With several values on one Redis the smallest governs every queue (kombu's sweep uses its own): a
    worker with a short one hands long invocations of the others to a second worker while they run.

    Raises:
        VisibilityTimeoutMismatch: the fleet's value differs (says how to change it).
    """
    stored = client.eval(FLEET_VISIBILITY, 1, fleet_key("visibility-timeout"), str(visibility_timeout))
    fleet = int(stored)
    if fleet != visibility_timeout:
        raise VisibilityTimeoutMismatch(
            f"SARK_VISIBILITY_TIMEOUT is {visibility_timeout}s here but {fleet}s for the fleet on this Redis "
            "(one value for every worker: with several, the smallest redelivers the others' running "
            f"invocations). Use {fleet}, or change the fleet's with `sark fleet --set-visibility-timeout N` "
            "once every worker runs with N."
        )


def set_fleet_visibility_timeout(client: redis.Redis, visibility_timeout: int) -> None:
    """Change the fleet's visibility timeout (an operator's act, once every worker runs with the new one)."""
    client.set(fleet_key("visibility-timeout"), str(visibility_timeout))


def fleet_status(client: redis.Redis) -> dict[str, Any]:
    """The fleet as Redis sees it: each consumer's heartbeat and messages, and the shared settings."""
    seconds, micros = client.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    scored: list[Any] = list(client.zrange(heartbeats_key(), 0, -1, withscores=True))
    deadlines = {_text(c): float(score) for c, score in scored}
    consumers = sorted({_text(c) for c in client.smembers(consumers_key())} | set(deadlines))
    rows = []
    for consumer in consumers:
        deadline = deadlines.get(consumer)
        rows.append({
            "consumer": consumer,
            "alive": deadline is not None and deadline >= now_ms,
            "presumed_dead_in_s": None if deadline is None else round((deadline - now_ms) / 1000.0, 1),
            "messages": int(client.scard(owned_key(consumer))),
            "recovering": int(client.scard(recovering_key(consumer))),
        })
    stored = client.get(fleet_key("visibility-timeout"))
    return {"visibility_timeout": int(stored) if stored is not None else None, "consumers": rows}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class HeartbeatConfig:
    """Heartbeat timing, read from the broker's transport options (``sark_heartbeat_*``)."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.interval = float(options.get("sark_heartbeat_interval", 2.0))
        self.timeout = float(options.get("sark_heartbeat_timeout", 8.0))
        self.batch = int(options.get("sark_recovery_batch", 50))


class Heartbeat:
    """One consumer process's heartbeat thread (and whether it has beaten long enough to sweep)."""

    def __init__(self, client: redis.Redis, config: HeartbeatConfig) -> None:
        self.client = client
        self.config = config
        self.consumer = consumer_id()
        self._pid = os.getpid()
        self._stop = threading.Event()
        #: monotonic time since which every heartbeat succeeded (None: the last one failed).
        self._healthy_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="sark-heartbeat", daemon=True)

    def start(self) -> None:
        """Beat once now (so the first message taken is covered), then every ``interval``."""
        self.beat()
        self._thread.start()
        atexit.register(self.retire)

    def beat(self) -> bool:
        """One heartbeat; False (logged) when Redis cannot be reached."""
        try:
            self.client.eval(BEAT, 2, heartbeats_key(), consumers_key(), self.consumer,
                             str(int(self.config.timeout * 1000)))
        except redis.RedisError as exc:
            if self._healthy_since is not None:
                log.warning("heartbeat failed (%s): this worker's messages may be recovered by others if it "
                            "lasts over %gs", type(exc).__name__, self.config.timeout,
                            extra={"event": "recovery.heartbeat_failed"})
            self._healthy_since = None
            return False
        if self._healthy_since is None:
            self._healthy_since = time.monotonic()
        return True

    def may_sweep(self) -> bool:
        """True once heartbeats have succeeded for ``timeout`` in a row (others had time to beat too)."""
        since = self._healthy_since
        return since is not None and time.monotonic() - since >= self.config.timeout

    def _run(self) -> None:
        while not self._stop.wait(self.config.interval):
            try:
                self.beat()
            except Exception:  # never let the thread die: a silent worker would be presumed dead
                log.exception("heartbeat error")

    def retire(self) -> None:
        """Leave the fleet on a clean exit (not in a forked child)."""
        if os.getpid() != self._pid or self._stop.is_set():
            return
        self._stop.set()
        with contextlib.suppress(redis.RedisError):  # unreachable: its heartbeat lapses instead
            self.client.eval(RETIRE, 4, consumers_key(), heartbeats_key(), owned_key(self.consumer),
                             recovering_key(self.consumer), self.consumer)


_heartbeats: dict[str, Heartbeat] = {}
_heartbeats_lock = threading.Lock()


def heartbeat(broker: str, make_client: Any, options: dict[str, Any]) -> Heartbeat:
    """This process's heartbeat for the broker ``broker`` (started on first call)."""
    key = f"{os.getpid()}:{broker}"
    found = _heartbeats.get(key)
    if found is not None:
        return found
    with _heartbeats_lock:
        found = _heartbeats.get(key)
        if found is None:
            found = _heartbeats[key] = Heartbeat(make_client(), HeartbeatConfig(options))
            found.start()
            log.info("heartbeats every %gs (presumed dead after %gs)", found.config.interval, found.config.timeout,
                     extra={"event": "recovery.started", "consumer": found.consumer})
        return found


def claim_dead(client: redis.Redis, sweeper: str, grace: float = 8.0) -> list[str]:
    """Move the messages of every dead consumer into ``sweeper``'s recovering set; their ids.

    ``grace``: seconds a consumer found with no heartbeat at all gets to beat before it is presumed dead.
    """
    dead = client.eval(CLAIM, 3, consumers_key(), heartbeats_key(), recovering_key(sweeper), sweeper,
                       _OWNED_PREFIX, _RECOVERING_PREFIX, str(int(grace * 1000)))
    return [_text(d) for d in dead or []]


def claim_stranded(client: redis.Redis, consumer: str, held: set[str]) -> int:
    """Claim ``consumer``'s own messages that none of its live channels holds; how many.

    After a lost broker connection, kombu puts the closed channel's messages back if Redis answers at
    that moment; if not they stay recorded as this consumer's, held by nobody, and its heartbeat keeps
    them from any sweeper. (A task still running from the old channel cannot acknowledge it; its
    redelivered copy waits on the invocation's lease, then returns the stored result.) Called from the
    thread that takes messages, so a message just taken is already in ``held``.
    """
    owned = owned_key(consumer)
    recovering = recovering_key(consumer)
    claimed = 0
    for raw in client.smembers(owned) or []:
        tag = _text(raw)
        if tag not in held:
            claimed += int(client.smove(owned, recovering, tag))
    return claimed


def restore_claimed(channel: Any, client: redis.Redis, sweeper: str, limit: int) -> tuple[int, int]:
    """Put up to ``limit`` claimed messages back on their queues; (restored, still claimed).

    One transaction per message (kombu's restore, which marks it redelivered and routes it as kombu
    does), also removing its unacked record and its claim: a sweeper killed between two messages leaves
    the rest claimed, for the next sweeper.
    """
    key = recovering_key(sweeper)
    restored = 0
    qos = channel.qos
    for raw_tag in client.srandmember(key, limit) or []:
        tag = _text(raw_tag)

        pushed = [False]

        def restore(pipe: Any, tag: str = tag, pushed: list[bool] = pushed) -> None:
            payload = pipe.hget(qos.unacked_key, tag)  # (called again if the unacked hash changed meanwhile)
            pipe.multi()
            qos._remove_from_indices(tag, pipe)
            pipe.srem(key, tag)
            if payload:
                message, exchange, routing_key = loads(payload)  # type: ignore[no-untyped-call]
                channel._do_restore_message(message, exchange, routing_key, pipe, False)
            pushed[0] = bool(payload)

        client.transaction(restore, qos.unacked_key)
        restored += pushed[0]
    return restored, int(client.scard(key))
