"""Where circuit-breaker state lives: Redis (shared, atomic Lua) or this process (fallback).

Both stores implement the same state machine, pybreaker's, with one change: the half-open trial
is a *lease* (a token plus an expiry) claimed atomically, so exactly one caller fleet-wide makes
the trial call and a caller that crashes mid-trial does not wedge the breaker.

One Redis hash per target (:func:`workers.keys.breaker_key`) holds::

    state         closed | open | half-open
    failures      consecutive counted failures while closed (reset by a success)
    gen           bumped each time the breaker closes; an outcome from an older period is ignored
    opened_at     ms (Redis clock) when the breaker last opened
    trial         token of the caller holding the half-open trial; trial_until: its lease end (ms)
    opens, last_error, last_failure_at, changed_at, fail_max, reset_ms   (for operators)

Every timestamp comes from Redis ``TIME`` inside the scripts, never from a worker's clock. Every
change of ``state``, ``failures`` or ``gen`` is published (the hash's key) on
:func:`workers.keys.breaker_channel` by the script that makes it, so that processes remembering a
closed breaker (:mod:`workers.breaker.watch`) forget it at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import redis.asyncio as aioredis

from workers.keys import breaker_channel, breaker_index_key, breaker_key

__all__ = [
    "BreakerStore",
    "Decision",
    "LocalStore",
    "Outcome",
    "RedisStore",
    "State",
    "Transition",
]

State = Literal["closed", "open", "half-open"]
Outcome = Literal["success", "failure", "release"]

# "May I call?" -- ARGV: reset_ms, token, lease_ms → {state, allowed, retry_after_ms, failures, gen, from}.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 'state', 'failures', 'gen', 'opened_at', 'trial', 'trial_until')
local state = h[1] or 'closed'
local failures = tonumber(h[2] or '0')
local gen = tonumber(h[3] or '0')
if state == 'closed' then
  return {state, 1, 0, failures, gen, ''}
end
local reset_ms = tonumber(ARGV[1])
local lease_ms = tonumber(ARGV[3])
if state == 'open' then
  local remaining = tonumber(h[4] or '0') + reset_ms - now
  if remaining > 0 then
    return {state, 0, remaining, failures, gen, ''}
  end
  redis.call('HSET', KEYS[1], 'state', 'half-open', 'trial', ARGV[2], 'trial_until', now + lease_ms,
             'changed_at', now)
  PUBLISH_CHANGE
  return {'half-open', 1, 0, failures, gen, 'open'}
end
local until_ms = tonumber(h[6] or '0')
if h[5] and until_ms > now then
  return {state, 0, math.max(1, math.min(until_ms - now, reset_ms)), failures, gen, ''}
end
redis.call('HSET', KEYS[1], 'trial', ARGV[2], 'trial_until', now + lease_ms)
return {state, 1, 0, failures, gen, ''}
"""

# "Record the outcome" -- ARGV: outcome, token, gen, fail_max, reset_ms, error, target
# → {state, failures, from}.
_RECORD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 'state', 'failures', 'gen', 'trial')
local state = h[1] or 'closed'
local failures = tonumber(h[2] or '0')
local gen = tonumber(h[3] or '0')
local mine = h[4] and h[4] == ARGV[2]
local outcome = ARGV[1]
if outcome == 'release' then
  if state == 'half-open' and mine then
    redis.call('HDEL', KEYS[1], 'trial', 'trial_until')
  end
  return {state, failures, ''}
end
if outcome == 'success' then
  if state == 'closed' then
    if failures > 0 and gen == tonumber(ARGV[3]) then
      redis.call('HSET', KEYS[1], 'failures', 0)
      failures = 0
      PUBLISH_CHANGE
    end
    return {state, failures, ''}
  end
  if state == 'half-open' and mine then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'gen', gen + 1, 'changed_at', now)
    redis.call('HDEL', KEYS[1], 'trial', 'trial_until', 'opened_at')
    PUBLISH_CHANGE
    return {'closed', 0, 'half-open'}
  end
  return {state, failures, ''}
end
redis.call('SADD', KEYS[2], ARGV[7])
redis.call('HSET', KEYS[1], 'last_error', ARGV[6], 'last_failure_at', now, 'fail_max', ARGV[4], 'reset_ms', ARGV[5])
if state == 'closed' then
  if gen ~= tonumber(ARGV[3]) then
    return {state, failures, ''}
  end
  if not h[1] then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'gen', gen)
  end
  failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
  PUBLISH_CHANGE
  if failures >= tonumber(ARGV[4]) then
    redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now, 'changed_at', now)
    redis.call('HINCRBY', KEYS[1], 'opens', 1)
    return {'open', failures, 'closed'}
  end
  return {state, failures, ''}
end
if state == 'half-open' and mine then
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now, 'changed_at', now)
  redis.call('HDEL', KEYS[1], 'trial', 'trial_until')
  redis.call('HINCRBY', KEYS[1], 'opens', 1)
  PUBLISH_CHANGE
  return {'open', failures, 'half-open'}
end
return {state, failures, ''}
"""

# Operator reset -- ARGV: target → {old_state}.
_RESET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 'state', 'gen')
local old = h[1] or 'closed'
redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'gen', tonumber(h[2] or '0') + 1, 'changed_at', now)
redis.call('HDEL', KEYS[1], 'trial', 'trial_until', 'opened_at')
redis.call('SADD', KEYS[2], ARGV[1])
PUBLISH_CHANGE
return {old}
"""

# Snapshot -- → {now_ms, flat HGETALL}.
_READ = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {now, redis.call('HGETALL', KEYS[1])}
"""



def _publishing(script: str) -> str:
    """``script`` with each ``PUBLISH_CHANGE`` marker made a PUBLISH of the breaker's key."""
    return script.replace("PUBLISH_CHANGE", f"redis.call('PUBLISH', '{breaker_channel()}', KEYS[1])")


@dataclass(frozen=True, slots=True)
class Decision:
    """Answer to "may I call?" for one target."""

    state: State
    allowed: bool
    retry_after: float
    failures: int
    gen: int
    token: str
    changed_from: State | None = None
    local: bool = False


@dataclass(frozen=True, slots=True)
class Transition:
    """State after recording an outcome; ``changed_from`` is set when this outcome changed it."""

    state: State
    failures: int
    changed_from: State | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One target's state as operators see it."""

    state: State
    failures: int
    retry_after: float
    opens: int
    last_error: str | None
    trial_in_flight: bool


class BreakerStore(Protocol):
    """Atomic breaker state for many targets."""

    async def acquire(self, target: str, *, reset_timeout: float, token: str, lease: float) -> Decision:
        """May a call to ``target`` go ahead? Claims the half-open trial when it may."""

    async def record(
        self, target: str, decision: Decision, outcome: Outcome, *, fail_max: int, reset_timeout: float, error: str
    ) -> Transition:
        """Record the outcome of a call that ``decision`` allowed."""

    async def reset(self, target: str) -> State:
        """Close ``target``'s breaker; returns the state it had."""

    async def read(self, target: str, *, reset_timeout: float) -> Snapshot:
        """``target``'s current state."""

    async def known_targets(self) -> set[str]:
        """Every target that has state in this store."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _state(value: Any) -> State:
    text = _text(value)
    if text not in ("closed", "open", "half-open"):
        raise ValueError(f"unknown breaker state {text!r}")
    return text  # type: ignore[return-value]


def _changed(value: Any) -> State | None:
    return _state(value) if _text(value) else None


class RedisStore:
    """Breaker state shared by the fleet: one hash per target, changed only by Lua scripts.

    Each of :meth:`acquire` and :meth:`record` is one ``EVALSHA`` (scripts are registered once
    per client; redis-py loads them again by itself after a Redis restart).
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._acquire = client.register_script(_publishing(_ACQUIRE))
        self._record = client.register_script(_publishing(_RECORD))
        self._reset = client.register_script(_publishing(_RESET))
        self._read = client.register_script(_READ)

    async def acquire(self, target: str, *, reset_timeout: float, token: str, lease: float) -> Decision:
        """One ``EVALSHA``: see :class:`BreakerStore`."""
        args: list[str | int] = [int(reset_timeout * 1000), token, max(1, int(lease * 1000))]
        state, allowed, retry_ms, failures, gen, changed = await self._acquire(keys=[breaker_key(target)], args=args)
        return Decision(
            state=_state(state),
            allowed=bool(int(allowed)),
            retry_after=int(retry_ms) / 1000.0,
            failures=int(failures),
            gen=int(gen),
            token=token,
            changed_from=_changed(changed),
        )

    async def record(
        self, target: str, decision: Decision, outcome: Outcome, *, fail_max: int, reset_timeout: float, error: str
    ) -> Transition:
        """One ``EVALSHA``: see :class:`BreakerStore`."""
        reset_ms = int(reset_timeout * 1000)
        args: list[str | int] = [outcome, decision.token, decision.gen, fail_max, reset_ms, error, target]
        keys = [breaker_key(target), breaker_index_key()]
        state, failures, changed = await self._record(keys=keys, args=args)
        return Transition(state=_state(state), failures=int(failures), changed_from=_changed(changed))

    async def reset(self, target: str) -> State:
        """See :class:`BreakerStore`."""
        (old,) = await self._reset(keys=[breaker_key(target), breaker_index_key()], args=[target])
        return _state(old)

    async def read(self, target: str, *, reset_timeout: float) -> Snapshot:
        """See :class:`BreakerStore`."""
        now_ms, flat = await self._read(keys=[breaker_key(target)])
        fields = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}
        state = _state(fields.get("state", "closed"))
        retry_ms = 0
        if state == "open":
            retry_ms = max(0, int(fields.get("opened_at", 0)) + int(reset_timeout * 1000) - int(now_ms))
        trial = state == "half-open" and "trial" in fields and int(fields.get("trial_until", 0)) > int(now_ms)
        return Snapshot(
            state=state,
            failures=int(fields.get("failures", 0)),
            retry_after=retry_ms / 1000.0,
            opens=int(fields.get("opens", 0)),
            last_error=fields.get("last_error"),
            trial_in_flight=trial,
        )

    async def known_targets(self) -> set[str]:
        """Members of :func:`breaker_index_key`."""
        return {_text(m) for m in await self.client.smembers(breaker_index_key())}


@dataclass
class _LocalState:
    state: State = "closed"
    failures: int = 0
    gen: int = 0
    opened_at: float = 0.0
    trial: str | None = None
    trial_until: float = 0.0
    opens: int = 0
    last_error: str | None = None


@dataclass
class LocalStore:
    """The same state machine in this process only: the fallback while Redis is unreachable.

    Every method runs on the runtime's one event loop and never awaits, so no lock is needed.
    """

    states: dict[str, _LocalState] = field(default_factory=dict)

    def _get(self, target: str) -> _LocalState:
        return self.states.setdefault(target, _LocalState())

    async def acquire(self, target: str, *, reset_timeout: float, token: str, lease: float) -> Decision:
        """See :class:`BreakerStore`."""
        s, now = self._get(target), time.monotonic()

        def decide(allowed: bool, retry_after: float = 0.0, changed: State | None = None) -> Decision:
            return Decision(s.state, allowed, retry_after, s.failures, s.gen, token, changed, local=True)

        if s.state == "closed":
            return decide(True)
        if s.state == "open":
            remaining = s.opened_at + reset_timeout - now
            if remaining > 0:
                return decide(False, remaining)
            s.state, s.trial, s.trial_until = "half-open", token, now + lease
            return decide(True, changed="open")
        if s.trial is not None and s.trial_until > now:
            return decide(False, max(0.001, min(s.trial_until - now, reset_timeout)))
        s.trial, s.trial_until = token, now + lease
        return decide(True)

    async def record(
        self, target: str, decision: Decision, outcome: Outcome, *, fail_max: int, reset_timeout: float, error: str
    ) -> Transition:
        """See :class:`BreakerStore`."""
        s = self._get(target)
        mine = s.trial is not None and s.trial == decision.token
        if outcome == "release":
            if s.state == "half-open" and mine:
                s.trial = None
            return Transition(s.state, s.failures)
        if outcome == "success":
            if s.state == "closed" and decision.gen == s.gen:
                s.failures = 0
            elif s.state == "half-open" and mine:
                s.state, s.failures, s.gen, s.trial = "closed", 0, s.gen + 1, None
                return Transition("closed", 0, "half-open")
            return Transition(s.state, s.failures)
        s.last_error = error
        if s.state == "closed" and decision.gen == s.gen:
            s.failures += 1
            if s.failures >= fail_max:
                s.state, s.opened_at, s.opens = "open", time.monotonic(), s.opens + 1
                return Transition("open", s.failures, "closed")
        elif s.state == "half-open" and mine:
            s.state, s.opened_at, s.trial, s.opens = "open", time.monotonic(), None, s.opens + 1
            return Transition("open", s.failures, "half-open")
        return Transition(s.state, s.failures)

    async def reset(self, target: str) -> State:
        """See :class:`BreakerStore`."""
        s = self._get(target)
        old = s.state
        s.state, s.failures, s.gen, s.trial = "closed", 0, s.gen + 1, None
        return old

    async def read(self, target: str, *, reset_timeout: float) -> Snapshot:
        """See :class:`BreakerStore`."""
        s, now = self._get(target), time.monotonic()
        retry = max(0.0, s.opened_at + reset_timeout - now) if s.state == "open" else 0.0
        trial = s.state == "half-open" and s.trial is not None and s.trial_until > now
        return Snapshot(s.state, s.failures, retry, s.opens, s.last_error, trial)

    async def known_targets(self) -> set[str]:
        """Targets this process has seen."""
        return set(self.states)
