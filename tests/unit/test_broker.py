"""The broker transport on a real redis-server: closing a connection whose transport was already
detached (what Celery's consumer does after losing the broker) is a connection error, not a crash."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from kombu import Connection
from kombu.common import ignore_errors

from devkit.stack import start_redis
from tests.helpers import settings_with
from workers.broker import TRANSPORT, broker_transport


def _collected_connection_with_an_unacked_message(url: str, transport: str | None) -> Connection:
    """A connection holding one delivered, unacknowledged message, detached as ``collect()`` leaves it."""
    conn = Connection(url, transport=transport)
    queue = conn.SimpleQueue("broker-race")
    queue.put({"n": 1})
    message = queue.get(timeout=2)
    assert not message.acknowledged
    assert not conn.default_channel.closed  # collect() did not get to close it
    conn._do_close_transport()  # what Connection.collect() ends with: transport.client = None
    return conn


def test_closing_a_detached_connection_is_a_connection_error(redis_url: str) -> None:
    conn = _collected_connection_with_an_unacked_message(redis_url, TRANSPORT)
    ignore_errors(conn, conn.close)  # Celery's consumer does exactly this; it must not raise
    # The message was not put back by the close: it waits in the unacked index for the sweep.
    client = redis.Redis.from_url(redis_url)
    assert client.zcard("unacked_index") == 1
    client.close()


def test_kombus_own_transport_crashes_there(redis_url: str) -> None:
    """The race this transport closes (if kombu fixes it, this test says so and the module can go)."""
    conn = _collected_connection_with_an_unacked_message(redis_url, None)
    with pytest.raises(AttributeError):
        ignore_errors(conn, conn.close)


def test_only_redis_urls_get_this_transport(redis_url: str) -> None:
    assert broker_transport("redis://h:6379/0") == broker_transport("rediss://h:6380/0") == TRANSPORT
    assert broker_transport("amqp://guest@h//") is None
    assert broker_transport("sentinel://h:26379") is None
    from workers.app import create_app  # not at import: workers.app reads the settings once, at import

    app = create_app(settings_with({"SARK_BROKER_URL": redis_url}))
    with app.connection_for_write() as conn:
        assert type(conn.transport).__module__ == "workers.broker"
        conn.ensure_connection(max_retries=1)


def test_one_sync_client_per_pool_and_messages_still_flow(redis_url: str) -> None:
    with Connection(redis_url, transport=TRANSPORT) as conn:
        channel = conn.default_channel
        first = channel._create_client()
        assert channel._create_client() is first  # no new redis.Redis per publish/ack
        queue = conn.SimpleQueue("broker-cache")
        for n in range(3):
            queue.put({"n": n})
        got = [queue.get(timeout=2) for _ in range(3)]
        for message in got:
            message.ack()
        assert [m.payload["n"] for m in got] == [0, 1, 2]
        channel._disconnect_pools()  # e.g. after a fork: a new pool, so a new client
        assert channel._create_client() is not first
        assert channel._create_client().connection_pool is channel.pool
        queue.close()


def test_message_taken_as_the_connection_drops_goes_back_to_its_queue(tmp_path: Path) -> None:
    """BRPOP took it, Redis went away before its unacked record was written: it is requeued, not lost."""
    proc = start_redis(tmp_path / "a", appendonly=True)
    port = int(proc.url.rsplit(":", 1)[1].split("/")[0])
    conn = Connection(proc.url, transport=TRANSPORT)
    again = None
    try:
        queue = conn.SimpleQueue("orphan-test")
        queue.put({"n": 42})
        channel = conn.default_channel
        raw = channel._get("orphan-test")  # off the queue, as BRPOP takes it
        message = channel.Message(raw, channel=channel)
        proc.stop()  # the broker goes away before the unacked record is written
        with pytest.raises(conn.connection_errors):
            channel.qos.append(message, message.delivery_tag)
        again = start_redis(tmp_path / "a", port=port, appendonly=True, data_dir=tmp_path / "a" / f"redis-{port}")
        channel._disconnect_pools()  # reconnect
        assert channel._requeue_orphans() == 1
        assert channel._requeue_orphans() == 0  # once
        back = queue.get(timeout=2)
        assert back.payload == {"n": 42} and back.delivery_info["redelivered"]
        back.ack()
    finally:
        conn.release()
        proc.stop()
        if again is not None:
            again.stop()
