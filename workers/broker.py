"""kombu's Redis transport with two gaps closed: a worker survives its broker restarting, and no message is lost.

When the broker connection drops, Celery's consumer first ``collect()``s the connection (which
detaches its transport: ``transport.client = None``) and then ``close()``s it. If the default
channel was not fully closed by the first step, the second one closes it now: the channel drops its
connection pool, then tries to put back its unacknowledged messages, which needs a new pool, whose
parameters are read from ``transport.client`` -- ``None``. The ``AttributeError`` is not one of the
connection errors Celery ignores while closing, so the worker stopped with "Unrecoverable error"
(seen about once in ten Redis restarts under load, ``tests/integration/test_faults.py``).

Here a channel whose transport was detached raises the Redis ``ConnectionError`` instead, which Celery
ignores while closing, and goes on reconnecting. The messages it could not put back stay recorded as
this process's, held by no live channel: its own sweep puts them back within seconds (:meth:`Channel.sweep`).

A second gap of the same transport is closed too: a message is taken off its queue (``BRPOP``) and
*then* recorded as unacknowledged; when the connection drops between the two, kombu loses it (it is in
neither place; seen in one run in six to eight of the Redis-restart fault test). Here such a message is kept in
this process and pushed back onto its queue, marked redelivered, before the next ``BRPOP`` on the new
connection (:class:`QoS`, :meth:`Channel._requeue_orphans`).

A third: the event loop's connections no longer retry a failed read by reconnecting in place (redis-py's
default), which could leave the worker's main thread blocked for good on a fresh pub/sub socket after
a Redis restart (:meth:`Channel._connparams`).

A fourth: fast recovery of a dead worker's messages (:mod:`workers.recovery`): each message taken is
recorded as this process's own in the same pipeline as its unacked record (:meth:`QoS.append`) and
forgotten with it; the process beats while it consumes; its event loop sweeps for dead consumers.

Used for ``redis://`` and ``rediss://`` brokers (see :func:`broker_transport`); any other broker URL
keeps kombu's own transport.

Upstream issue (kombu)
----------------------
Text to file at celery/kombu; each override here goes once a kombu release fixes its part (the
``kombu<5.8`` bound in pyproject.toml is there because these overrides touch kombu's internals)::

    Redis transport: messages lost or delayed an hour when a worker is SIGKILLed or Redis restarts

    kombu 5.7.0, redis-py 6+/8, Celery 5.5, one Redis broker, acks_late=True, prefetch 1.

    Reproduction
    1. Start two workers on one queue; send 100 tasks that each sleep 1 s; SIGKILL one worker
       while it holds messages (taken, not acknowledged). Its messages stay in `unacked` until a
       live worker's `QoS.restore_visible` finds them older than `visibility_timeout` (default
       3600 s): they run an hour late. Lowering the timeout redelivers long tasks that are still
       running.
    2. Restart Redis (`redis-cli shutdown` + start, or `docker restart`) while a worker consumes
       150 quick tasks; repeat about ten times, then count results:
       a. About one restart in ten the worker exits with "Unrecoverable error: AttributeError
          'NoneType' object has no attribute ...": Celery `collect()`s the connection
          (`transport.client = None`), then `close()` closes the default channel, whose
          `restore_unacked` needs a new pool, whose parameters `Channel._connparams` reads from
          `transport.client`. AttributeError is not among the connection errors Celery ignores
          while closing.
       b. In one run in six to eight, one task never completes: `_brpop_read` popped it, the
          connection dropped before `QoS.append`'s pipeline (ZADD unacked_index + HSET unacked)
          ran, and the message is in neither the queue nor `unacked`.
       c. Sometimes the worker hangs for good after Redis is back: redis-py 6+ retries a failed
          read 3 times, reconnecting (and re-subscribing) inside the read; the retried read on the
          event loop's pub/sub connection blocks the main thread on a socket nothing writes to
          (stack: PubSub._execute -> call_with_retry).

    Proposed fix
    a. `Channel._connparams`: raise redis.ConnectionError("connection already closed") when
       `self.connection` or `self.connection.client` is None, so close() ends as a connection error.
    b. `QoS.append`: when the recording pipeline fails with a connection error, keep the popped
       payload in memory and push it back (marked redelivered) on the next connection, before the
       next BRPOP; if the pipeline ran and only its reply was lost, restore from the `unacked`
       record instead (one WATCHed transaction, so it is pushed once).
    c. Connections used by the event loop (`_connparams(asynchronous=True)`): `retry=Retry(NoBackoff(), 0)`,
       so a failed read raises and the consumer reconnects as for any lost connection.
    d. Dead-consumer recovery independent of `visibility_timeout`: each consumer writes a heartbeat
       and records the tags it takes (same pipeline as `unacked`); any live consumer atomically (Lua)
       claims the tags of a consumer whose heartbeat lapsed and restores them within seconds.
       (This project's version: workers/recovery.py; measured: 100 in-flight tasks of a SIGKILLed
       worker all done within 15 s.)
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import deque
from time import time
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from workers.contract import TASK_INVOKE
from workers.keys import ATTEMPT_TTL, attempt_key, consumers_key, lease_key, owned_key
from workers.leases import BEGIN, TAKEN_HEADER
from workers.recovery import Heartbeat, claim_dead, claim_stranded, consumer_id, heartbeat, restore_claimed

__all__ = ["Channel", "QoS", "Transport", "broker_transport"]

TRANSPORT = "workers.broker:Transport"

log = logging.getLogger("sark.broker")

#: Messages taken off a queue whose unacked record could not be written, per broker (as_uri()).
_orphans: dict[str, deque[tuple[Any, str, str, str]]] = {}
_orphans_lock = threading.Lock()


def _broker_key(channel: Any) -> str | None:
    client = getattr(channel.connection, "client", None)
    return str(client.as_uri()) if client is not None else None


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS: a taken message is recorded as this process's own (and forgotten with its
    unacked record); one whose unacked record failed to be written is kept for requeueing."""

    def append(self, message: Any, delivery_tag: Any) -> None:
        try:
            self.channel.heartbeat()  # beating before the first message is recorded as ours
            delivery = message.delivery_info
            me = consumer_id()
            # kombu's two writes, plus ownership, in one round trip.
            headers = message.headers if isinstance(message.headers, dict) else {}
            headers.pop(TAKEN_HEADER, None)  # only this consumer says a lease was taken with the message
            lease = self._lease_to_take(headers)
            record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])  # type: ignore[no-untyped-call]
            with self.pipe_or_acquire() as pipe:
                pipe.zadd(self.unacked_index_key, {delivery_tag: time()})
                pipe.hset(self.unacked_key, delivery_tag, record)
                pipe.sadd(owned_key(me), delivery_tag)
                pipe.sadd(consumers_key(), me)
                if lease is not None:  # the invocation's lease, in the same round trip (workers/leases.py)
                    request_id, token, ttl_ms = lease
                    pipe.eval(BEGIN, 2, lease_key(request_id), attempt_key(request_id), token, ttl_ms, ATTEMPT_TTL)
                replies = pipe.execute()
            if lease is not None:
                attempt = int(replies[-1][0])
                if attempt > 0:  # (0: another execution holds it; the task finds out by itself)
                    headers[TAKEN_HEADER] = {"token": lease[1], "attempt": attempt, "at": time()}
            virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]
        except self.channel.connection.connection_errors:
            delivery = message.delivery_info
            key = _broker_key(self.channel)
            if key is not None:
                with _orphans_lock:
                    _orphans.setdefault(key, deque()).append(
                        (message._raw, delivery["exchange"], delivery["routing_key"], str(delivery_tag)))
                log.warning("broker connection lost while taking message %s: it goes back to its queue on "
                            "reconnection", delivery_tag, extra={"event": "broker.orphan"})
            raise


    def _lease_to_take(self, headers: dict[str, Any]) -> tuple[str, str, int] | None:
        """(request id, holder token, ttl ms) when this message's invocation lease is taken with it: a
        ``sark.invoke`` to run now (not a retry waiting for its ETA), leases enabled for this broker."""
        options = self.channel.connection.client.transport_options
        if not options.get("sark_take_leases") or headers.get("task") != TASK_INVOKE or headers.get("eta"):
            return None
        request_id = headers.get("id")
        if not isinstance(request_id, str) or not request_id:
            return None
        ttl_ms = int(float(options.get("sark_heartbeat_timeout", 8.0)) * 1000)
        return request_id, f"{consumer_id()}:{uuid.uuid4().hex[:8]}", ttl_ms

    def _remove_from_indices(self, delivery_tag: Any, pipe: Any = None) -> Any:
        # Every way a message leaves the unacked hash (ack, reject, restore) ends its ownership too.
        pipe = super()._remove_from_indices(delivery_tag, pipe)  # type: ignore[no-untyped-call]
        return pipe.srem(owned_key(consumer_id()), delivery_tag)


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
        """Push messages lost between ``BRPOP`` and their unacked record back onto their queues, once.

        The connection may also have dropped after Redis ran the recording pipeline, its reply lost: then
        the message is recorded as taken and is put back from that record, which goes with it (one
        transaction per message, watching the unacked hash), never pushed a second time by a sweep.
        """
        key = _broker_key(self)
        if key is None or not _orphans.get(key):
            return 0
        with _orphans_lock:
            pending = _orphans.pop(key, deque())
        qos = self.qos
        count = len(pending)
        try:
            with self.conn_or_acquire() as client:
                while pending:
                    raw, exchange, routing_key, tag = pending[0]

                    def requeue(pipe: Any, raw: Any = raw, exchange: str = exchange, routing_key: str = routing_key,
                                tag: str = tag) -> None:
                        record = pipe.hget(qos.unacked_key, tag)
                        pipe.multi()
                        if record:  # (and its ownership: QoS._remove_from_indices)
                            qos._remove_from_indices(tag, pipe)
                        self._do_restore_message(raw, exchange, routing_key, pipe)  # type: ignore[no-untyped-call]

                    client.transaction(requeue, qos.unacked_key)
                    pending.popleft()
        except self.connection_errors:
            with _orphans_lock:  # still unreachable: keep the rest for the next try
                _orphans.setdefault(key, deque()).extendleft(reversed(pending))
            raise
        log.warning("requeued %d message(s) taken off the broker as its connection was lost", count,
                    extra={"event": "broker.orphans_requeued"})
        return count

    def heartbeat(self) -> Heartbeat:
        """This process's heartbeat on this broker (started, with a first beat, on first call)."""
        found = self._sark_heartbeat
        if found is None:
            key = _broker_key(self) or "?"
            found = self._sark_heartbeat = heartbeat(key, self._heartbeat_client,
                                                     self.connection.client.transport_options)
        return found

    _sark_heartbeat: Heartbeat | None = None

    def _heartbeat_client(self) -> redis.Redis:
        # Its own connections (the thread must not share the event loop's), short timeouts: a heartbeat
        # blocked on a dead socket would make a live worker look dead.
        params = dict(self._connparams())
        interval = float(self.connection.client.transport_options.get("sark_heartbeat_interval", 2.0))
        params["socket_timeout"] = min(float(params.get("socket_timeout") or 5.0), 5.0, interval)
        params["socket_connect_timeout"] = min(float(params.get("socket_connect_timeout") or 2.0), 2.0, interval)
        params.pop("max_connections", None)
        return redis.Redis(connection_pool=redis.ConnectionPool(**params))

    def sweep(self, loop: Any = None) -> None:
        """Recover messages nobody holds: this process's own whose channel is gone (a lost connection
        that could not put them back), then those of dead consumers. Claims them, restores a batch;
        more batches follow on the event loop until none is left."""
        if self.closed:  # a continuation scheduled before a reconnection: the new channel sweeps
            return
        beat = self.heartbeat()
        if not beat.may_sweep():
            return
        me = consumer_id()
        with self.conn_or_acquire() as client:
            stranded = claim_stranded(client, me, self._held_tags())
            dead = claim_dead(client, me, beat.config.timeout)
            if dead:
                log.warning("consumer(s) %s stopped beating: their messages go back to their queues",
                            ", ".join(dead), extra={"event": "recovery.dead", "dead": dead})
            if stranded:
                log.warning("%d message(s) taken over a lost broker connection go back to their queues",
                            stranded, extra={"event": "recovery.stranded", "stranded": stranded})
            restored, left = restore_claimed(self, client, me, beat.config.batch)
        if restored:
            log.warning("put back %d message(s) nobody holds, marked redelivered (%d to go)", restored, left,
                        extra={"event": "recovery.restored", "restored": restored, "left": left})
        if left and loop is not None:
            loop.call_later(0.05, self._sweep_safely, loop)

    def _held_tags(self) -> set[str]:
        """Delivery tags this process's live channels hold (taken, not acknowledged)."""
        held: set[str] = set()
        key = _broker_key(self)
        with _orphans_lock:  # taken as the connection dropped: _requeue_orphans puts them back
            held.update(orphan[3] for orphan in _orphans.get(key or "", ()))
        for channel in list(self.connection.cycle._channels):
            held.update(str(tag) for tag in list(channel.qos._delivered))
        return held

    def _sweep_safely(self, loop: Any = None) -> None:
        try:
            self.sweep(loop)
        except self.connection_errors:
            log.debug("sweep skipped: broker unreachable", exc_info=True)
        except Exception:
            log.exception("sweep failed")

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
    """kombu's Redis transport with :class:`Channel`, sweeping for dead consumers from the event loop."""

    Channel = Channel

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)  # type: ignore[no-untyped-call]
        cycle: Any = self.cycle
        old = _sweep_timers.pop(id(loop), None)
        if old is not None:  # a reconnection registers a new transport: one sweep timer per event loop
            old.cancel()
        interval = float(connection.client.transport_options.get("sark_heartbeat_interval", 2.0))

        def sweep() -> None:
            for channel in list(cycle._channels):
                if channel.active_queues:  # any consuming channel: the sets are per process, not per channel
                    channel._sweep_safely(loop)
                    return

        _sweep_timers[id(loop)] = loop.call_repeatedly(interval, sweep)


#: The sweep timer of each event loop (id), cancelled when a reconnection registers anew.
_sweep_timers: dict[int, Any] = {}


def broker_transport(broker_url: str) -> str | None:
    """The transport for ``broker_url``: this module's for Redis URLs, else None (kombu's choice)."""
    scheme = broker_url.split("://", 1)[0].lower() if "://" in broker_url else ""
    return TRANSPORT if scheme in ("redis", "rediss") else None
