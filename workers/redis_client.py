"""The worker's own Redis clients (streams, attempt counter, breaker store, change feed): they reconnect.

``redis.asyncio`` clients made with ``from_url`` do not retry a command whose pooled connection died
(their ``retry_on_error`` is empty): after a Redis restart the first command on each stale connection
failed with "Connection closed by server" -- the first streamed invocation on every worker failed
(seen 4 times out of 4). These clients retry a command on a connection or timeout error, reconnecting
each time with a short backoff, so the first call after a restart succeeds; a Redis that is truly gone
still fails within about a second, as :class:`~workers.errors.StoreUnavailable` where it matters.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["CONNECTION_ERRORS", "RETRIED_ERRORS", "reconnecting_client"]

#: Errors after which a command is sent again on a fresh connection. A timeout is among them only where
#: sending a command twice is harmless (stream XADDs carry their own ids; EXPIRE is idempotent).
RETRIED_ERRORS: list[type[Exception]] = [RedisConnectionError, RedisTimeoutError, ConnectionResetError]
#: Connection errors only: for commands that must not run twice (a breaker's failure count).
CONNECTION_ERRORS: list[type[Exception]] = [RedisConnectionError, ConnectionResetError]


def reconnecting_client(url: str, *, retries: int = 3, backoff_cap: float = 0.5,
                        retry_on: list[type[Exception]] | None = None, **options: Any) -> aioredis.Redis:
    """An asyncio Redis client that re-sends a command up to ``retries`` times after a connection error.

    Waits 0.05, 0.1, 0.2… s (capped at ``backoff_cap``) between tries: a restarting Redis is usually
    back within that. A connection that was already closed fails before the command is sent; a reply
    lost to a timeout may hide a command that ran, so ``retry_on`` (default :data:`RETRIED_ERRORS`)
    should be :data:`CONNECTION_ERRORS` for commands that must not run twice.
    """
    retry = Retry(ExponentialBackoff(cap=backoff_cap, base=0.05), retries)
    errors = list(RETRIED_ERRORS if retry_on is None else retry_on)
    return aioredis.Redis.from_url(url, retry=retry, retry_on_error=errors, **options)
