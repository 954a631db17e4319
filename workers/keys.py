"""Every Redis key this project writes, with its lifetime. Nothing else names a key.

Celery's own keys live beside these: queues are Redis lists named after the queues
(``sark.http``, ``sark.sse``, ``sark.stdio``), ``unacked``/``unacked_index`` hold delivered but
unacknowledged messages, and results are ``celery-task-meta-<task id>`` (``result_expires``).
"""

from __future__ import annotations

__all__ = [
    "ATTEMPT_TTL",
    "PREFIX",
    "attempt_key",
    "breaker_channel",
    "breaker_index_key",
    "breaker_key",
    "consumers_key",
    "fleet_key",
    "heartbeats_key",
    "lease_key",
    "owned_key",
    "recovering_key",
    "stream_key",
]

PREFIX = "sark"

#: Seconds a delivery counter is remembered (above any visibility timeout a deployment uses).
ATTEMPT_TTL = 86_400


def stream_key(request_id: str) -> str:
    """Redis Stream of one invocation's chunks and terminal entry (TTL: ``stream_ttl`` after it ends)."""
    return f"{PREFIX}:stream:{request_id}"


def breaker_key(target: str) -> str:
    """Hash holding one target's circuit-breaker state (no TTL: state must outlive idle periods)."""
    return f"{PREFIX}:breaker:{target}"


def breaker_index_key() -> str:
    """Set of every target that has breaker state (for listing and reset)."""
    return f"{PREFIX}:breakers"


def breaker_channel() -> str:
    """Pub/sub channel: the breaker scripts publish a breaker's key on every change of its state,
    failure count or generation (no storage; see :mod:`workers.breaker.watch`)."""
    return f"{PREFIX}:breaker-changes"


def attempt_key(request_id: str) -> str:
    """Counter of deliveries of one invocation, to recognise redeliveries (TTL: ``ATTEMPT_TTL``)."""
    return f"{PREFIX}:attempt:{request_id}"


def lease_key(request_id: str) -> str:
    """Who is carrying out one invocation right now (``<holder>``; TTL: the holder's heartbeat timeout,
    renewed while it runs, deleted once its outcome is stored). A redelivered copy waits while it exists."""
    return f"{PREFIX}:lease:{request_id}"


def consumers_key() -> str:
    """Set of broker consumers (worker processes) that have taken messages and may hold some (no TTL;
    a consumer leaves it when a sweeper recovers it)."""
    return f"{PREFIX}:consumers"


def heartbeats_key() -> str:
    """Sorted set: consumer id -> the Redis time (ms) after which it is presumed dead (no TTL)."""
    return f"{PREFIX}:heartbeats"


def owned_key(consumer: str) -> str:
    """Set of the delivery tags one consumer took and has not acknowledged (no TTL; claimed by a sweeper
    when the consumer's heartbeat lapses)."""
    return f"{PREFIX}:owned:{consumer}"


def recovering_key(consumer: str) -> str:
    """Set of delivery tags a sweeper claimed from dead consumers and is putting back on their queues
    (no TTL; claimed in turn if that sweeper dies mid-sweep)."""
    return f"{PREFIX}:recovering:{consumer}"


def fleet_key(name: str) -> str:
    """A setting every worker of the fleet must share (e.g. ``visibility-timeout``), set by the first worker."""
    return f"{PREFIX}:fleet:{name}"
