"""kombu's Redis transport with one race closed: a worker must survive its broker restarting.

When the broker connection drops, Celery's consumer first ``collect()``s the connection (which
detaches its transport: ``transport.client = None``) and then ``close()``s it. If the default
channel was not fully closed by the first step, the second one closes it now: the channel drops its
connection pool, then tries to put back its unacknowledged messages, which needs a new pool, whose
parameters are read from ``transport.client`` -- ``None``. The ``AttributeError`` is not one of the
connection errors Celery ignores while closing, so the worker stopped with "Unrecoverable error"
(seen about once in ten Redis restarts under load, ``tests/integration/test_faults.py``).

Here a channel whose transport was detached raises the Redis ``ConnectionError`` instead, which Celery
ignores while closing, and goes on reconnecting. The messages it could not put back stay in Redis's
unacked index and are restored by the visibility-timeout sweep, as after any lost connection.

Used for ``redis://`` and ``rediss://`` brokers (see :func:`broker_transport`); any other broker URL
keeps kombu's own transport.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = ["Channel", "Transport", "broker_transport"]

TRANSPORT = "workers.broker:Transport"


class Channel(kombu_redis.Channel):
    """kombu's Redis channel; connection parameters of a detached transport are a connection error.

    It also keeps one synchronous client per connection pool instead of building a new ``redis.Redis``
    for every publish, acknowledgement and requeue (about 50 µs each with redis-py 8, several per task,
    mostly on the worker's main thread). A client on a shared pool holds no connection of its own, so
    one serves every caller, in every thread, exactly like a fresh one.
    """

    _sark_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        pool = self.pool
        client = self._sark_client
        if client is None or client.connection_pool is not pool:
            client = self._sark_client = super()._create_client()  # type: ignore[no-untyped-call]
        return client

    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection is None or self.connection.client is None:
            raise RedisConnectionError("the broker connection is already closed")
        return super()._connparams(asynchronous=asynchronous)  # type: ignore[no-untyped-call]


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel


def broker_transport(broker_url: str) -> str | None:
    """The transport for ``broker_url``: this module's for Redis URLs, else None (kombu's choice)."""
    scheme = broker_url.split("://", 1)[0].lower() if "://" in broker_url else ""
    return TRANSPORT if scheme in ("redis", "rediss") else None
