"""kombu's Redis transport with two gaps closed: a worker survives its broker restarting, and no message is lost.

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

A second gap of the same transport is closed too: a message is taken off its queue (``BRPOP``) and
*then* recorded as unacknowledged; when the connection drops between the two, kombu loses it (it is in
neither place; seen in one run in six to eight of the Redis-restart fault test). Here such a message is kept in
this process and pushed back onto its queue, marked redelivered, before the next ``BRPOP`` on the new
connection (:class:`QoS`, :meth:`Channel._requeue_orphans`).

A third: the event loop's connections no longer retry a failed read by reconnecting in place (redis-py's
default), which could leave the worker's main thread blocked for good on a fresh pub/sub socket after
a Redis restart (:meth:`Channel._connparams`).

Used for ``redis://`` and ``rediss://`` brokers (see :func:`broker_transport`); any other broker URL
keeps kombu's own transport.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

from kombu.transport import redis as kombu_redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

__all__ = ["Channel", "QoS", "Transport", "broker_transport"]

TRANSPORT = "workers.broker:Transport"

log = logging.getLogger("sark.broker")

#: Messages taken off a queue whose unacked record could not be written, per broker (as_uri()).
_orphans: dict[str, deque[tuple[Any, str, str]]] = {}
_orphans_lock = threading.Lock()


def _broker_key(channel: Any) -> str | None:
    client = getattr(channel.connection, "client", None)
    return str(client.as_uri()) if client is not None else None


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS; a message whose unacked record failed to be written is kept for requeueing."""

    def append(self, message: Any, delivery_tag: Any) -> None:
        try:
            super().append(message, delivery_tag)  # type: ignore[no-untyped-call]
        except self.channel.connection.connection_errors:
            delivery = message.delivery_info
            key = _broker_key(self.channel)
            if key is not None:
                with _orphans_lock:
                    _orphans.setdefault(key, deque()).append(
                        (message._raw, delivery["exchange"], delivery["routing_key"]))
                log.warning("broker connection lost while taking message %s: it goes back to its queue on "
                            "reconnection", delivery_tag, extra={"event": "broker.orphan"})
            raise


class Channel(kombu_redis.Channel):
    """kombu's Redis channel: requeues orphaned messages before each ``BRPOP``, and reading the connection
    parameters of a detached transport is a connection error.

    It also keeps one synchronous client per connection pool instead of building a new ``redis.Redis``
    for every publish, acknowledgement and requeue (about 50 µs each with redis-py 8, several per task,
    mostly on the worker's main thread). A client on a shared pool holds no connection of its own, so
    one serves every caller, in every thread, exactly like a fresh one.
    """

    QoS = QoS
    _sark_client: Any = None

    def _brpop_start(self, timeout: Any = None) -> Any:
        self._requeue_orphans()
        return super()._brpop_start(timeout)  # type: ignore[no-untyped-call]

    def _requeue_orphans(self) -> int:
        """Push messages lost between ``BRPOP`` and their unacked record back onto their queues."""
        key = _broker_key(self)
        if key is None or not _orphans.get(key):
            return 0
        with _orphans_lock:
            pending = _orphans.pop(key, deque())
        try:
            with self.conn_or_acquire() as client, client.pipeline() as pipe:
                for raw, exchange, routing_key in pending:
                    self._do_restore_message(raw, exchange, routing_key, pipe)  # type: ignore[no-untyped-call]
                pipe.execute()
        except self.connection_errors:
            with _orphans_lock:  # still unreachable: keep them for the next try
                _orphans.setdefault(key, deque()).extendleft(reversed(pending))
            raise
        log.warning("requeued %d message(s) taken off the broker as its connection was lost", len(pending),
                    extra={"event": "broker.orphans_requeued"})
        return len(pending)

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
        params = super()._connparams(asynchronous=asynchronous)  # type: ignore[no-untyped-call]
        if asynchronous:
            # The event loop's connections (BRPOP, the pub/sub of broadcasts) must never reconnect inside
            # a read: redis-py 6+ retries a failed read 3 times by default, reconnecting (and
            # re-subscribing) in between; once Redis is back, the retried read blocks the worker's main
            # thread on a fresh socket nothing will ever write to (seen: a worker hung for good after a
            # Redis restart, stack in PubSub._execute -> call_with_retry). Without retries the read
            # raises, and kombu/Celery reconnect the consumer as they do for any lost connection.
            params["retry"] = Retry(NoBackoff(), 0)
        return params


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel


def broker_transport(broker_url: str) -> str | None:
    """The transport for ``broker_url``: this module's for Redis URLs, else None (kombu's choice)."""
    scheme = broker_url.split("://", 1)[0].lower() if "://" in broker_url else ""
    return TRANSPORT if scheme in ("redis", "rediss") else None
