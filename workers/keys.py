"""Every Redis key this project writes, with its lifetime. Nothing else names a key.

Celery's own keys live beside these: queues are Redis lists named after the queues
(``sark.http``, ``sark.sse``, ``sark.stdio``), ``unacked``/``unacked_index`` hold delivered but
unacknowledged messages, and results are ``celery-task-meta-<task id>`` (``result_expires``).
"""

from __future__ import annotations

__all__ = [
    "ATTEMPT_TTL",
    "CANCEL_TTL",
    "PREFIX",
    "attempt_key",
    "breaker_channel",
    "breaker_index_key",
    "breaker_key",
    "cancel_key",
    "stream_key",
]

PREFIX = "sark"

#: Seconds a cancellation request is remembered.
CANCEL_TTL = 3_600
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
    failure count or generation (no storage; see :mod:`workers.breaker_watch`)."""
    return f"{PREFIX}:breaker-changes"


def cancel_key(request_id: str) -> str:
    """Flag set when a caller cancels an invocation (TTL: ``CANCEL_TTL``)."""
    return f"{PREFIX}:cancel:{request_id}"


def attempt_key(request_id: str) -> str:
    """Counter of deliveries of one invocation, to recognise redeliveries (TTL: ``ATTEMPT_TTL``)."""
    return f"{PREFIX}:attempt:{request_id}"
