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

__all__ = ["RETRIED_ERRORS", "reconnecting_client"]

#: Errors after which a command is sent again on a fresh connection.
RETRIED_ERRORS: list[type[Exception]] = [RedisConnectionError, RedisTimeoutError, ConnectionResetError]


def reconnecting_client(url: str, *, retries: int = 3, backoff_cap: float = 0.5, **options: Any) -> aioredis.Redis:
    """An asyncio Redis client that re-sends a command up to ``retries`` times after a connection error.

    Waits 0.05, 0.1, 0.2… s (capped at ``backoff_cap``) between tries: a restarting Redis is usually
    back within that; a command is never sent twice to a Redis that received it (the error is on the
    connection, before a reply).
    """
    retry = Retry(ExponentialBackoff(cap=backoff_cap, base=0.05), retries)
    return aioredis.Redis.from_url(url, retry=retry, retry_on_error=list(RETRIED_ERRORS), **options)
