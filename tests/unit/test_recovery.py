"""Heartbeats, ownership and sweeps (workers/recovery.py, workers/broker.py) against a real redis-server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue  # type: ignore[attr-defined]

from workers.broker import Transport
from workers.keys import consumers_key, fleet_key, heartbeats_key, owned_key, recovering_key
from workers.recovery import (
    RETIRE,
    VisibilityTimeoutMismatch,
    check_fleet_visibility_timeout,
    claim_dead,
    claim_stranded,
    consumer_id,
    restore_claimed,
)

# The heartbeat thread must not beat again while a test plays with this process's heartbeat.
SLOW = {"sark_heartbeat_interval": 600, "sark_heartbeat_timeout": 1800}


@pytest.fixture()
def client(redis_url: str) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(redis_url, decode_responses=True)
    yield conn
    conn.close()


def _members(client: redis.Redis, key: str) -> set[str]:
    return {str(m) for m in client.smembers(key)}


def test_a_dead_consumers_messages_are_claimed_once_and_live_ones_are_left(client: redis.Redis) -> None:
    client.sadd(consumers_key(), "dead", "live", "silent", "sweeper")
    client.zadd(heartbeats_key(), {"dead": 1, "live": 10**15, "sweeper": 1})
    client.sadd(owned_key("dead"), "t1", "t2")
    client.sadd(recovering_key("dead"), "t3")  # it died mid-sweep: what it had claimed is claimed again
    client.sadd(owned_key("silent"), "t4")  # took a message, never beat (died before its first heartbeat)
    client.sadd(owned_key("live"), "t5")
    client.sadd(owned_key("sweeper"), "t6")

    dead = claim_dead(client, "sweeper")

    assert sorted(dead) == ["dead"]
    assert _members(client, recovering_key("sweeper")) == {"t1", "t2", "t3"}
    assert not client.exists(owned_key("dead"), recovering_key("dead"))
    # "silent" never beat: it gets a heartbeat timeout's grace (it may have been just starting) ...
    assert _members(client, owned_key("silent")) == {"t4"} and client.zscore(heartbeats_key(), "silent")
    client.zadd(heartbeats_key(), {"silent": 1})  # ... and is claimed once that has passed in silence
    assert claim_dead(client, "sweeper") == ["silent"]
    assert _members(client, recovering_key("sweeper")) == {"t1", "t2", "t3", "t4"}
    assert _members(client, owned_key("live")) == {"t5"}
    assert _members(client, owned_key("sweeper")) == {"t6"}  # its own stay its own, even if its beat is late
    assert _members(client, consumers_key()) == {"live", "sweeper"}
    assert claim_dead(client, "sweeper") == []  # once


def test_a_consumer_retiring_with_nothing_held_leaves_at_once(client: redis.Redis) -> None:
    client.sadd(consumers_key(), "a", "b")
    client.zadd(heartbeats_key(), {"a": 10**15, "b": 10**15})
    client.sadd(owned_key("b"), "t1")
    for who in ("a", "b"):
        client.eval(RETIRE, 4, consumers_key(), heartbeats_key(), owned_key(who), recovering_key(who), who)
    assert _members(client, consumers_key()) == {"b"}
    assert client.zscore(heartbeats_key(), "b") == 0  # still holding one: expired now, for the next sweep
    assert claim_dead(client, "c") == ["b"]


def test_the_fleet_has_one_visibility_timeout(client: redis.Redis) -> None:
    check_fleet_visibility_timeout(client, 3600)
    check_fleet_visibility_timeout(client, 3600)
    with pytest.raises(VisibilityTimeoutMismatch, match="3600s for the fleet") as refused:
        check_fleet_visibility_timeout(client, 60)
    assert "sark fleet" in str(refused.value)
    assert client.get(fleet_key("visibility-timeout")) == "3600"


@pytest.fixture()
def channel(redis_url: str) -> Iterator[Any]:
    conn = Connection(redis_url, transport=Transport, transport_options=SLOW)
    channel = conn.default_channel
    exchange = Exchange("rq", type="direct")
    Queue("rq", exchange, "rq", channel=channel).declare()
    producer = conn.Producer(channel)
    for n in range(3):
        producer.publish({"n": n}, exchange=exchange, routing_key="rq", serializer="json")
    yield channel
    conn.release()


def test_a_taken_message_is_owned_until_acknowledged(channel: Any, client: redis.Redis) -> None:
    message = channel.basic_get("rq")
    me = consumer_id()
    assert _members(client, owned_key(me)) == {message.delivery_tag}
    assert me in _members(client, consumers_key())
    assert client.zscore(heartbeats_key(), me)  # beating before it took the message
    message.ack()
    assert _members(client, owned_key(me)) == set()
    assert client.hlen("unacked") == 0


def test_a_dead_consumers_message_goes_back_to_its_queue_marked_redelivered(channel: Any, client: redis.Redis) -> None:
    taken = [channel.basic_get("rq") for _ in range(2)]
    me = consumer_id()
    client.zadd(heartbeats_key(), {me: 0})  # this process "died"
    assert claim_dead(client, "sweeper") == [me]
    restored, left = restore_claimed(channel, client, "sweeper", limit=1)  # killed after the first one?
    assert (restored, left) == (1, 1)
    restored, left = restore_claimed(channel, client, "sweeper", limit=10)
    assert (restored, left) == (1, 0)
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0
    again = [channel.basic_get("rq") for _ in range(3)]
    assert [m.delivery_info.get("redelivered") for m in again[:2]] == [True, True]  # front of the queue
    assert sorted(m.delivery_tag for m in again[:2]) == sorted(m.delivery_tag for m in taken)
    assert again[2].payload == {"n": 2} and not again[2].delivery_info.get("redelivered")
    for message in again:
        message.ack()


def test_a_message_acknowledged_after_its_claim_is_not_pushed_again(channel: Any, client: redis.Redis) -> None:
    message = channel.basic_get("rq")
    client.zadd(heartbeats_key(), {consumer_id(): 0})
    claim_dead(client, "sweeper")
    message.ack()  # the "dead" consumer was only slow
    assert restore_claimed(channel, client, "sweeper", limit=10) == (0, 0)
    assert client.llen("rq") == 2


def test_messages_no_live_channel_holds_are_claimed_by_their_own_consumer(channel: Any, client: redis.Redis) -> None:
    held = channel.basic_get("rq")
    stranded = channel.basic_get("rq")
    me = consumer_id()
    assert claim_stranded(client, me, {held.delivery_tag}) == 1
    assert _members(client, recovering_key(me)) == {stranded.delivery_tag}
    assert restore_claimed(channel, client, me, limit=10) == (1, 0)
    assert _members(client, owned_key(me)) == {held.delivery_tag}
    held.ack()


def test_fleet_status_shows_each_consumer_and_the_shared_setting(client: redis.Redis) -> None:
    from workers.recovery import fleet_status, set_fleet_visibility_timeout

    set_fleet_visibility_timeout(client, 1200)
    client.sadd(consumers_key(), "a", "b")
    client.zadd(heartbeats_key(), {"a": 10**15, "b": 1})
    client.sadd(owned_key("a"), "t1", "t2")
    status = fleet_status(client)
    assert status["visibility_timeout"] == 1200
    rows = {r["consumer"]: r for r in status["consumers"]}
    assert rows["a"]["alive"] and rows["a"]["messages"] == 2
    assert not rows["b"]["alive"] and rows["b"]["messages"] == 0


def test_the_consumer_takes_an_invocations_lease_with_its_message(redis_url: str, client: redis.Redis) -> None:
    from workers.contract import TASK_INVOKE
    from workers.keys import attempt_key, lease_key
    from workers.leases import TAKEN_HEADER

    conn = Connection(redis_url, transport=Transport, transport_options={**SLOW, "sark_take_leases": True})
    try:
        channel = conn.default_channel
        exchange = Exchange("lq", type="direct")
        Queue("lq", exchange, "lq", channel=channel).declare()
        producer = conn.Producer(channel)
        forged = {TAKEN_HEADER: {"token": "forged", "attempt": 1, "at": 0}}
        for headers in ({"task": TASK_INVOKE, "id": "r1"}, {"task": TASK_INVOKE, "id": "r1", **forged},
                        {"task": TASK_INVOKE, "id": "r2", "eta": "2099-01-01T00:00:00", **forged},
                        {"task": "other", "id": "r3"}):
            producer.publish({}, exchange=exchange, routing_key="lq", serializer="json", headers=headers)
        first, copy, waiting, other = (channel.basic_get("lq") for _ in range(4))
        taken = first.headers[TAKEN_HEADER]
        assert taken["attempt"] == 1 and client.get(lease_key("r1")) == taken["token"]
        assert client.get(attempt_key("r1")) == "1"
        assert TAKEN_HEADER not in copy.headers  # the lease is held: the copy takes nothing, forged header gone
        assert client.get(attempt_key("r1")) == "1"  # and counts no start
        assert TAKEN_HEADER not in waiting.headers and not client.exists(lease_key("r2"))  # runs later (ETA)
        assert TAKEN_HEADER not in other.headers and not client.exists(lease_key("r3"))
        for message in (first, copy, waiting, other):
            message.ack()
    finally:
        conn.release()


def test_a_message_whose_recording_reply_was_lost_goes_back_once(channel: Any, client: redis.Redis) -> None:
    """The connection dropped after Redis ran the pipeline recording a taken message: kept as an orphan
    and recorded as taken, it is put back once (not again by its consumer's stranded sweep)."""
    from workers import broker

    message = channel.basic_get("rq")  # recorded as taken and owned
    channel.qos._delivered.pop(message.delivery_tag)  # ... but the channel never got the reply
    key = broker._broker_key(channel)
    assert key is not None
    delivery = message.delivery_info
    broker._orphans.setdefault(key, broker.deque()).append(
        (message._raw, delivery["exchange"], delivery["routing_key"], message.delivery_tag))
    me = consumer_id()
    assert message.delivery_tag in channel._held_tags()  # no sweep claims an orphan
    assert channel._requeue_orphans() == 1
    assert claim_stranded(client, me, channel._held_tags()) == 0
    assert client.hlen("unacked") == 0 and _members(client, owned_key(me)) == set()
    assert client.llen("rq") == 3  # back once, beside the two never taken
