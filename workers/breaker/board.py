"""Circuit breakers shared by the whole fleet: one per target, state in Redis, changed atomically.

**Targets.** A target is what fails as a unit:

* ``gateway:<server_id>`` -- a server behind the Gateway. The ``http`` and ``sse`` registry entries
  naming the same Gateway server share it (``echo`` and ``echo-stream`` are one target).
* ``stdio:<name>`` -- one stdio MCP server of the registry.
* ``<transport>:<name>`` -- a server of any other transport, unless its server model's
  ``breaker_target()`` says otherwise (:mod:`config.transports`).

There is deliberately no single breaker for "the Gateway as a whole": one broken server behind
the Gateway (answering 5xx) would then block every healthy server. A Gateway outage opens the
breaker of each server in use after that server's own ``fail_max`` failures.

**Settings.** ``fail_max`` (5), ``reset_timeout`` (60 s) and ``enabled`` come from the registry
entry's ``breaker:`` block; entries sharing a target should agree (the first in file order wins,
with a warning). ``SARK_BREAKER_ENABLED=false`` turns every breaker off.

**Model.** pybreaker's: *closed* counts consecutive failures (a success resets the count) and opens
at ``fail_max``; *open* fails calls fast with :class:`~workers.errors.CircuitOpen` (no network call)
until ``reset_timeout`` has passed; then *half-open* lets exactly ONE trial call through, fleet-wide,
whose success closes the breaker and whose failure opens it again. Only errors whose
``counts_as_failure`` is true count (transport failures, timeouts, 5xx; the table is
:data:`workers.errors.FAILURES`); authentication and authorization refusals, invalid invocations, 4xx,
oversized results and a tool's own ``isError`` count as successes (the target answered).
Errors the caller brought on itself (``caller_caused``: a timeout shorter than the operator's for
that server ran out) count as nothing at all, so no caller can open a breaker for everyone.

**Cost.** A closed breaker with no failures costs no round trip at all while this process's change
feed is live (:mod:`workers.breaker.watch`: every change is published by the script that makes it,
so the process forgets a remembered "closed" as soon as any worker records a failure). Otherwise
one ``EVALSHA`` before the call; one after it, skipped when a closed breaker with no failures sees a
success. No lock is held around the call itself.

**Fallback.** When Redis cannot be reached the board logs it once and uses a per-process breaker
(:class:`~workers.breaker.store.LocalStore`) for every target; it tries Redis again every
``breaker_store_recheck`` seconds and logs when it is back. Local state is then dropped: Redis is
the truth.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from config.registry import BreakerOverrides, Registry, ServerBase
from config.settings import Settings
from workers.breaker.store import BreakerStore, Decision, LocalStore, Outcome, RedisStore, State, Transition
from workers.breaker.watch import BreakerWatch
from workers.errors import CircuitOpen, InvalidInvocation, SarkError
from workers.keys import breaker_key
from workers.redis_client import CONNECTION_ERRORS, reconnecting_client

__all__ = [
    "BreakerBoard",
    "BreakerListener",
    "BreakerStatus",
    "CircuitBreaker",
    "LogListener",
    "breaker_command",
    "target_of",
]

log = logging.getLogger("sark.breaker")

T = TypeVar("T")


def target_of(server: ServerBase) -> str:
    """The breaker target of a registry server: its model's ``breaker_target()`` (see the module docstring)."""
    return server.breaker_target()


class BreakerListener(Protocol):
    """pybreaker's listener interface; ``cb`` is the :class:`CircuitBreaker`, states are names."""

    def before_call(self, cb: CircuitBreaker, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Called before an allowed call."""

    def failure(self, cb: CircuitBreaker, exc: BaseException) -> None:
        """Called when a call failed with an error that counts."""

    def success(self, cb: CircuitBreaker) -> None:
        """Called when a call succeeded (or failed with an error that does not count)."""

    def state_change(self, cb: CircuitBreaker, old_state: State | None, new_state: State) -> None:
        """Called in the one process whose call changed the fleet-wide state."""


class LogListener:
    """Logs every state change as a structured event (``extra={"event": "breaker.state_change", …}``)."""

    def before_call(self, cb: CircuitBreaker, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Nothing to log."""

    def failure(self, cb: CircuitBreaker, exc: BaseException) -> None:
        """Nothing to log (the task logs its error)."""

    def success(self, cb: CircuitBreaker) -> None:
        """Nothing to log."""

    def state_change(self, cb: CircuitBreaker, old_state: State | None, new_state: State) -> None:
        """One log line per transition, warning when the breaker opens."""
        level = logging.WARNING if new_state == "open" else logging.INFO
        extra = {
            "event": "breaker.state_change",
            "target": cb.name,
            "old_state": old_state,
            "new_state": new_state,
            "fail_max": cb.fail_max,
            "reset_timeout": cb.reset_timeout,
        }
        log.log(level, "breaker %s: %s -> %s", cb.name, old_state, new_state, extra=extra)


@dataclass(frozen=True, slots=True)
class BreakerStatus:
    """One target's breaker, as ``sark breakers list`` shows it."""

    target: str
    state: State
    failures: int
    fail_max: int
    reset_timeout: float
    retry_after: float
    opens: int
    last_error: str | None
    trial_in_flight: bool
    enabled: bool
    store: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {name: getattr(self, name) for name in self.__slots__}


class CircuitBreaker:
    """The breaker of one target; every process has one per target, sharing the board's store."""

    def __init__(self, name: str, config: BreakerOverrides, board: BreakerBoard) -> None:
        self.name = name
        self.key = breaker_key(name)
        self.fail_max = config.fail_max
        self.reset_timeout = config.reset_timeout
        self.enabled = config.enabled
        self._board = board

    @property
    def listeners(self) -> list[BreakerListener]:
        """Listeners of every breaker of the board."""
        return self._board.listeners

    async def call(self, func: Callable[[], Awaitable[T]], *, lease: float) -> T:
        """Run ``func()`` if the breaker allows it, and record its outcome.

        Args:
            func: Makes the call (not yet started: nothing runs when the breaker is open).
            lease: Seconds the half-open trial stays claimed if this process never reports back.

        Raises:
            CircuitOpen: the breaker is open (or its trial call is in flight); ``func`` was not called.
        """
        if not self.enabled:
            return await func()
        decision = await self._board.acquire(self, lease)
        if decision.changed_from is not None:
            self._notify_state(decision.changed_from, decision.state)
        if not decision.allowed:
            raise CircuitOpen(
                f"circuit breaker for {self.name} is {decision.state}; retry in {decision.retry_after:.2f}s",
                {"target": self.name, "state": decision.state, "retry_after": decision.retry_after},
            )
        self._fire("before_call", func)
        try:
            result = await func()
        except SarkError as exc:
            if exc.caller_caused:
                # The caller brought it on itself (its own too-short timeout): no verdict on the target.
                await self._finish(decision, "release", None)
                raise
            counts = bool(exc.counts_as_failure)
            await self._finish(decision, "failure" if counts else "success", exc)
            raise
        except BaseException:
            # Cancelled, or a bug of ours: neither the target's fault nor proof of its health.
            await self._finish(decision, "release", None)
            raise
        await self._finish(decision, "success", None)
        return result

    async def _finish(self, decision: Decision, outcome: Outcome, exc: SarkError | None) -> None:
        if outcome == "failure" and exc is not None:
            self._fire("failure", exc)
        elif outcome == "success":
            self._fire("success")
        trial = decision.state == "half-open"
        if not trial and (outcome == "release" or (outcome == "success" and decision.failures == 0)):
            return  # nothing to change: saves the round trip after a healthy call
        error = exc.code if exc is not None else ""
        transition = await self._board.record(self, decision, outcome, error)
        if transition is not None and transition.changed_from is not None:
            self._notify_state(transition.changed_from, transition.state)

    def _notify_state(self, old: State, new: State) -> None:
        self._fire("state_change", old, new)

    def _fire(self, event: str, *args: Any) -> None:
        # A listener's bug must never change the outcome of a call.
        for listener in self.listeners:
            try:
                getattr(listener, event)(self, *args)
            except Exception:
                log.exception("breaker listener %s.%s failed", type(listener).__name__, event)


class BreakerBoard:
    """Every breaker of one process, and the store they share (Redis, or local while it is down)."""

    def __init__(
        self,
        registry: Registry,
        client: aioredis.Redis,
        *,
        enabled: bool = True,
        recheck: float = 2.0,
        listeners: Iterable[BreakerListener] = (),
        watch: BreakerWatch | None = None,
    ) -> None:
        self.client = client
        #: Remembers closed breakers between calls once :meth:`start` ran (None: always ask Redis).
        self.watch = watch
        self.enabled = enabled
        self.listeners: list[BreakerListener] = [LogListener(), *listeners]
        self._redis = RedisStore(client)
        self._local = LocalStore()
        self._recheck = recheck
        self._degraded_until: float | None = None
        self._configs = _target_configs(registry)
        self._breakers: dict[str, CircuitBreaker] = {}

    @classmethod
    def from_settings(cls, settings: Settings, registry: Registry) -> BreakerBoard:
        """A board with its own Redis client: short timeouts, one reconnect, then the fallback."""
        timeout = settings.breaker_store_timeout
        # One reconnect and re-send after a dropped connection (a Redis restart), then the local fallback.
        # Not after a timeout: the recording script may have run, and a failure must not count twice.
        client = reconnecting_client(settings.redis_url, retries=1, backoff_cap=0.05, retry_on=CONNECTION_ERRORS,
                                     socket_timeout=timeout, socket_connect_timeout=timeout)
        # The change feed blocks on its socket: no socket timeout there; its health checks notice a dead link.
        # It must NOT reconnect silently: changes published while it was away would be missed while this
        # process still trusted its memory; BreakerWatch notices the loss, forgets, and resubscribes itself.
        feed = aioredis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=timeout, socket_keepalive=True, health_check_interval=5
        )
        return cls(registry, client, enabled=settings.breaker_enabled, recheck=settings.breaker_store_recheck,
                   watch=BreakerWatch(feed))

    async def start(self) -> None:
        """Start following the fleet's breaker changes (without it, every call asks Redis)."""
        if self.watch is not None and self.enabled:
            await self.watch.start()

    async def close(self) -> None:
        """Stop the change feed and close the board's Redis clients."""
        if self.watch is not None:
            await self.watch.close()
        await self.client.aclose()

    # --- breakers -----------------------------------------------------------------------------------
    def breaker(self, target: str) -> CircuitBreaker:
        """The breaker of ``target`` (default settings when the registry does not name it)."""
        found = self._breakers.get(target)
        if found is None:
            config = self._configs.get(target, BreakerOverrides())
            if not self.enabled:
                config = config.model_copy(update={"enabled": False})
            found = self._breakers[target] = CircuitBreaker(target, config, self)
        return found

    async def call(self, server: ServerBase, func: Callable[[], Awaitable[T]], *, lease: float) -> T:
        """``func()`` guarded by the breaker of ``server``'s target (see :meth:`CircuitBreaker.call`)."""
        return await self.breaker(target_of(server)).call(func, lease=lease)

    # --- store, with the fallback -------------------------------------------------------------------
    @property
    def degraded(self) -> bool:
        """True while breakers are per-process because Redis is unreachable."""
        return self._degraded_until is not None

    def _store(self) -> BreakerStore:
        if self._degraded_until is not None and time.monotonic() < self._degraded_until:
            return self._local
        return self._redis

    def _lost(self, exc: BaseException) -> None:
        if self._degraded_until is None:
            log.warning(
                "breaker store unreachable (%s: %s); using per-process breakers until it returns",
                type(exc).__name__, exc, extra={"event": "breaker.store_fallback"},
            )
        self._degraded_until = time.monotonic() + self._recheck

    def _healed(self) -> None:
        if self._degraded_until is not None:
            self._degraded_until = None
            self._local = LocalStore()
            log.warning("breaker store reachable again; breakers are shared", extra={"event": "breaker.store_healed"})

    async def acquire(self, cb: CircuitBreaker, lease: float) -> Decision:
        """"May I call?" from memory (a closed breaker), on Redis, or locally when Redis is unreachable."""
        shared = self._store() is self._redis
        watch = self.watch if shared else None
        ticket = None
        if watch is not None:
            gen = watch.closed_gen(cb.key)
            if gen is not None:
                return Decision(state="closed", allowed=True, retry_after=0.0, failures=0, gen=gen, token="")
            ticket = watch.ticket(cb.key)
        token = uuid.uuid4().hex
        if shared:
            try:
                decision = await self._redis.acquire(cb.name, reset_timeout=cb.reset_timeout, token=token, lease=lease)
            except (RedisError, OSError) as exc:
                self._lost(exc)
            else:
                self._healed()
                if watch is not None and ticket is not None:
                    watch.remember(ticket, closed=decision.state == "closed", failures=decision.failures,
                                   gen=decision.gen)
                return decision
        return await self._local.acquire(cb.name, reset_timeout=cb.reset_timeout, token=token, lease=lease)

    async def record(self, cb: CircuitBreaker, decision: Decision, outcome: Outcome, error: str) -> Transition | None:
        """Record an outcome where the decision was made (falling back to local if Redis went away)."""
        kwargs: dict[str, Any] = {"fail_max": cb.fail_max, "reset_timeout": cb.reset_timeout, "error": error}
        if not decision.local:
            try:
                return await self._redis.record(cb.name, decision, outcome, **kwargs)
            except (RedisError, OSError) as exc:
                self._lost(exc)
        return await self._local.record(cb.name, decision, outcome, **kwargs)

    # --- operators ----------------------------------------------------------------------------------
    async def targets(self) -> list[str]:
        """Targets of the registry plus every target with stored state."""
        known = set(self._configs)
        try:
            known |= await self._store().known_targets()
        except (RedisError, OSError) as exc:
            self._lost(exc)
            known |= await self._local.known_targets()
        return sorted(known)

    async def status(self, targets: Iterable[str] | None = None) -> list[BreakerStatus]:
        """State of each target (default: :meth:`targets`)."""
        names = list(targets) if targets is not None else await self.targets()
        return [await self._status(name) for name in names]

    async def _status(self, target: str) -> BreakerStatus:
        cb = self.breaker(target)
        store = self._store()
        try:
            snap = await store.read(target, reset_timeout=cb.reset_timeout)
        except (RedisError, OSError) as exc:
            self._lost(exc)
            store = self._local
            snap = await store.read(target, reset_timeout=cb.reset_timeout)
        return BreakerStatus(
            target=target, state=snap.state, failures=snap.failures, fail_max=cb.fail_max,
            reset_timeout=cb.reset_timeout, retry_after=snap.retry_after, opens=snap.opens,
            last_error=snap.last_error, trial_in_flight=snap.trial_in_flight, enabled=cb.enabled,
            store="local" if store is self._local else "redis",
        )

    async def reset(self, target: str) -> State:
        """Close ``target``'s breaker (fleet-wide, or in this process when Redis is down)."""
        cb = self.breaker(target)
        try:
            old = await self._redis.reset(target)
            self._healed()
        except (RedisError, OSError) as exc:
            self._lost(exc)
            old = await self._local.reset(target)
        log.warning(
            "breaker %s reset by an operator (was %s)", target, old,
            extra={"event": "breaker.reset", "target": target, "old_state": old},
        )
        if old != "closed":
            cb._notify_state(old, "closed")
        return old


async def breaker_command(board: BreakerBoard, action: str, target: str | None = None) -> list[dict[str, Any]]:
    """What the ``sark.breakers`` task and the CLI do: ``list`` (one or every target) or ``reset``.

    ``reset`` needs a target; ``"*"`` resets every known breaker.

    Raises:
        InvalidInvocation: unknown action, or ``reset`` without a target.
    """
    if action == "list":
        statuses = await board.status([target] if target else None)
    elif action == "reset":
        if not target:
            raise InvalidInvocation("reset needs a target, or '*' for every breaker")
        targets = await board.targets() if target == "*" else [target]
        for name in targets:
            await board.reset(name)
        statuses = await board.status(targets)
    else:
        raise InvalidInvocation(f"unknown breaker action {action!r} (list, reset)", {"action": action})
    return [status.to_dict() for status in statuses]


def _target_configs(registry: Registry) -> dict[str, BreakerOverrides]:
    configs: dict[str, BreakerOverrides] = {}
    for server in registry.servers.values():
        target = target_of(server)
        if target in configs and configs[target] != server.breaker:
            log.warning("registry entries of %s disagree on breaker settings; the first one wins", target)
            continue
        configs.setdefault(target, server.breaker)
    return configs
