"""Invocation leases on a real redis-server: one holder at a time, attempts, renewal, release, and a real
worker that makes a second delivery wait instead of calling the tool twice."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from celery import Celery

from config.settings import Settings
from devkit.stack import DevStack, Proc, free_port, wait_for
from tests.conftest import GatewayControl
from tests.helpers import token_headers
from workers.contract import TASK_INVOKE
from workers.errors import AlreadyRunning, StoreUnavailable
from workers.keys import attempt_key, lease_key
from workers.leases import LeaseKeeper, max_hold, max_waits
from workers.redis_client import reconnecting_client

TTL = 1.0
INTERVAL = 0.2


@asynccontextmanager
async def _keepers(url: str, count: int = 2, **options: Any) -> AsyncIterator[list[LeaseKeeper]]:
    """``count`` keepers, each with its own client, as in ``count`` worker processes."""
    clients = [aioredis.Redis.from_url(url) for _ in range(count)]
    keepers = [LeaseKeeper(client, **{"ttl": TTL, "interval": INTERVAL, "hold": 60.0, "holder": f"w{i}",
                                      **options}) for i, client in enumerate(clients)]
    try:
        yield keepers
    finally:
        for keeper in keepers:
            await keeper.close()
        for client in clients:
            await client.aclose()


def _run(url: str, scenario: Callable[[list[LeaseKeeper]], Awaitable[None]], **options: Any) -> None:
    async def main() -> None:
        async with _keepers(url, **options) as keepers:
            await scenario(keepers)

    asyncio.run(main())


def _rid() -> str:
    return str(uuid.uuid4())


def test_first_start_is_attempt_1_and_a_second_holder_waits(redis_url: str) -> None:
    rid = _rid()

    async def scenario(keepers: list[LeaseKeeper]) -> None:
        first, second = keepers
        a = first.new_token()
        assert await first.acquire(rid, a) == 1
        with pytest.raises(AlreadyRunning) as info:
            await second.acquire(rid, second.new_token())
        assert 0 < info.value.retry_after <= TTL
        assert info.value.code == "already_running"
        assert str(info.value) == f"invocation {rid} is being carried out by another worker; this delivery waits for it"
        # The refused start was not counted; the holder's own re-sent BEGIN (lost reply) counts nothing either.
        assert await first.acquire(rid, a) == 1
        assert first.held == {rid: a} and second.held == {}

    _run(redis_url, scenario)
    assert redis.Redis.from_url(redis_url).get(attempt_key(rid)) == b"1"


def test_release_by_another_token_does_nothing_then_release_and_start_again_is_attempt_2(redis_url: str) -> None:
    rid = _rid()
    sync = redis.Redis.from_url(redis_url)

    async def scenario(keepers: list[LeaseKeeper]) -> None:
        first, second = keepers
        a = first.new_token()
        assert await first.acquire(rid, a) == 1
        await first.release(rid, "w0:not-this-one")
        await second.release(rid, a)  # the right token, but this process does not hold it
        assert sync.get(lease_key(rid)) == a.encode()
        with pytest.raises(AlreadyRunning):
            await second.acquire(rid, second.new_token())
        await first.release(rid, a)
        assert sync.exists(lease_key(rid)) == 0 and first.held == {}
        b = second.new_token()
        assert await second.acquire(rid, b) == 2
        # A lease that another holder took over (it lapsed meanwhile) is not deleted by the old holder.
        sync.set(lease_key(rid), "w9:someone-else", px=5_000)
        await second.release(rid, b)
        assert sync.get(lease_key(rid)) == b"w9:someone-else"

    _run(redis_url, scenario)


def test_attempts_count_every_start(redis_url: str) -> None:
    rid = _rid()

    async def scenario(keepers: list[LeaseKeeper]) -> None:
        first, second = keepers
        attempts = []
        for keeper in (first, second, first, second):
            token = keeper.new_token()
            attempts.append(await keeper.acquire(rid, token))
            await keeper.release(rid, token)
        assert attempts == [1, 2, 3, 4]

    _run(redis_url, scenario)
    assert 86_000 < redis.Redis.from_url(redis_url).ttl(attempt_key(rid)) <= 86_400


def test_renewal_keeps_a_lease_past_its_ttl_and_stops_with_the_keeper(redis_url: str) -> None:
    rid = _rid()
    sync = redis.Redis.from_url(redis_url)

    async def scenario(keepers: list[LeaseKeeper]) -> None:
        first, second = keepers
        first.start()
        a = first.new_token()
        await first.acquire(rid, a)
        await asyncio.sleep(4 * TTL)
        assert sync.get(lease_key(rid)) == a.encode()
        assert 0 < sync.pttl(lease_key(rid)) <= TTL * 1000
        with pytest.raises(AlreadyRunning):
            await second.acquire(rid, second.new_token())
        await first.close()  # the holder is gone (its process died): the lease lapses within its TTL
        await asyncio.sleep(TTL + 0.1)
        assert await second.acquire(rid, second.new_token()) == 2

    _run(redis_url, scenario)


def test_a_lapsed_lease_is_taken_back_by_the_renewal(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    rid = _rid()
    sync = redis.Redis.from_url(redis_url)

    async def scenario(keepers: list[LeaseKeeper]) -> None:
        first, _ = keepers
        a = first.new_token()
        await first.acquire(rid, a)
        sync.delete(lease_key(rid))  # as after a Redis restart without the key
        await first.renew()
        assert sync.get(lease_key(rid)) == a.encode() and sync.pttl(lease_key(rid)) > 0

    with caplog.at_level(logging.WARNING, logger="sark.leases"):
        _run(redis_url, scenario)
    assert f"the lease of invocation {rid} had lapsed" in caplog.text


def test_a_lease_another_worker_took_is_left_to_it_and_reported_once(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    rid = _rid()
    sync = redis.Redis.from_url(redis_url)

    async def scenario(keepers: list[LeaseKeeper]) -> None:
        first, _ = keepers
        await first.acquire(rid, first.new_token())
        sync.set(lease_key(rid), "w9:other", px=5_000)  # it lapsed while this one ran, and was taken
        await first.renew()
        await first.renew()
        assert sync.get(lease_key(rid)) == b"w9:other"

    with caplog.at_level(logging.WARNING, logger="sark.leases"):
        _run(redis_url, scenario)
    assert caplog.text.count(f"the lease of invocation {rid} is held by another worker") == 1


def test_one_round_trip_renews_every_lease_and_none_when_none_is_held(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    rids = [_rid() for _ in range(5)]

    def calls() -> dict[str, int]:  # commands a script runs count too: GET and PEXPIRE below
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in sync.info("commandstats").items()
                if k.split("|")[0] not in ("cmdstat_config", "cmdstat_info")}

    async def scenario(keepers: list[LeaseKeeper]) -> None:
        first, _ = keepers
        sync.config_resetstat()
        await first.renew()
        assert calls() == {}
        tokens = {rid: first.new_token() for rid in rids}
        for rid, token in tokens.items():
            await first.acquire(rid, token)
        await first.renew()  # Redis may not know the script yet (NOSCRIPT, SCRIPT LOAD, EVALSHA again)
        sync.config_resetstat()
        await first.renew()
        assert calls() == {"evalsha": 1, "get": 5, "pexpire": 5}
        assert all(sync.get(lease_key(rid)) == token.encode() for rid, token in tokens.items())

    _run(redis_url, scenario)


def test_a_release_given_up_from_a_task_thread_rides_along_the_next_begin(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    done, nxt = _rid(), _rid()

    def calls() -> dict[str, int]:
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in sync.info("commandstats").items()
                if k.split("|")[0] not in ("cmdstat_config", "cmdstat_info")}

    async def scenario(keepers: list[LeaseKeeper]) -> None:
        first, _ = keepers
        token = first.new_token()
        await first.acquire(done, token)
        await first.release(_rid(), "w0:never-held")  # nothing to send: no round trip below counts it
        await asyncio.to_thread(first.release_soon, done, token)  # as after_return does, from a task thread
        sync.config_resetstat()
        assert await first.acquire(nxt, first.new_token()) == 1
        assert list(first.held) == [nxt]
        assert calls()["evalsha"] == 1  # one round trip: the release and the next BEGIN
        assert sync.exists(lease_key(done)) == 0 and sync.exists(lease_key(nxt)) == 1

    _run(redis_url, scenario)


def test_a_release_given_up_goes_by_itself_when_no_begin_comes(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    rid = _rid()

    async def scenario(keepers: list[LeaseKeeper]) -> None:
        first, _ = keepers
        first.start()  # renewals every 30 s: not what deletes the lease below
        token = first.new_token()
        await first.acquire(rid, token)
        started = time.monotonic()
        await asyncio.to_thread(first.release_soon, rid, token)
        while sync.exists(lease_key(rid)) and time.monotonic() - started < 5:
            await asyncio.sleep(0.01)
        assert sync.exists(lease_key(rid)) == 0
        assert time.monotonic() - started < 3.0

    _run(redis_url, scenario, interval=30.0, ttl=60.0)


def test_a_lease_held_past_the_longest_invocation_is_no_longer_renewed(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    rid = _rid()

    async def scenario(keepers: list[LeaseKeeper]) -> None:
        first, second = keepers
        await first.acquire(rid, first.new_token())
        await asyncio.sleep(0.3)
        await first.renew()
        assert first.held == {}
        await asyncio.sleep(TTL)
        assert await second.acquire(rid, second.new_token()) == 2

    with caplog.at_level(logging.WARNING, logger="sark.leases"):
        _run(redis_url, scenario, hold=0.2)
    assert f"invocation {rid} has held its lease longer than any invocation may run" in caplog.text


def test_a_release_during_a_renewal_is_not_undone_by_it(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)

    async def scenario(keepers: list[LeaseKeeper]) -> None:
        first, _ = keepers
        for _ in range(20):
            rid, token = _rid(), first.new_token()
            await first.acquire(rid, token)
            await asyncio.gather(first.renew(), first.release(rid, token))
            assert sync.exists(lease_key(rid)) == 0

    _run(redis_url, scenario)


def test_an_unreachable_redis_is_store_unavailable_before_the_target() -> None:
    async def scenario() -> None:
        client = reconnecting_client(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2)
        keeper = LeaseKeeper(client, ttl=TTL, interval=INTERVAL, hold=60.0)
        try:
            with pytest.raises(StoreUnavailable) as info:
                await keeper.acquire(_rid(), keeper.new_token())
            assert info.value.detail == {"what": "lease", "reached_target": False}
            assert keeper.held == {}
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_wait_bounds_outlast_the_longest_invocation() -> None:
    s = Settings()
    longest = s.invoke_attempts * (s.max_invoke_timeout + s.invoke_wait_max)
    assert max_hold(s) > longest + 5.0  # beyond the task's own wait for its invocation
    # Each wait lasts at least heartbeat_timeout - heartbeat_interval while the holder lives.
    assert max_waits(s) * (s.heartbeat_timeout - s.heartbeat_interval) >= max_hold(s) + s.heartbeat_timeout


# --- a real worker ---------------------------------------------------------------------------------------


def _send_sleep(app: Celery, token: str, task_id: str, seconds: float) -> Any:
    invocation = {"server": "echo", "tool": "sleep", "arguments": {"seconds": seconds}}
    return app.send_task(TASK_INVOKE, task_id=task_id, kwargs={"invocation": invocation}, queue="sark.http",
                         headers=token_headers(token, task_id))


def test_a_second_delivery_waits_for_the_running_one_and_returns_its_result(
    stack: DevStack, worker: Proc, celery_client: Celery, gateway_control: GatewayControl, user_token: str
) -> None:
    """The same message twice, the second while the first runs: the tool is called once."""
    task_id = _rid()
    first = _send_sleep(celery_client, user_token, task_id, 2.0)
    assert stack.redis is not None
    sync = redis.Redis.from_url(stack.redis.url)
    wait_for(lambda: bool(sync.exists(lease_key(task_id))), 10, "the first delivery to take the lease")
    second = _send_sleep(celery_client, user_token, task_id, 2.0)  # e.g. redelivered after a visibility timeout
    result = first.get(timeout=30)
    line = f"redelivered invocation {task_id} (attempt 2) had already finished"
    wait_for(lambda: line in worker.log(), 30, "the second delivery to find the stored result")
    assert second.get(timeout=5) == result and result["attempt"] == 1
    assert gateway_control.stats()["invocations"] == 1
    assert "runs elsewhere: this delivery waits" in worker.log()
    wait_for(lambda: sync.exists(lease_key(task_id)) == 0, 10, "the lease to be released")


def test_a_delivery_waits_for_a_foreign_lease_to_lapse(
    stack: DevStack, worker: Proc, celery_client: Celery, gateway_control: GatewayControl, user_token: str
) -> None:
    """A lease whose holder died (nobody renews it) holds the invocation back only until it lapses."""
    task_id = _rid()
    assert stack.redis is not None
    sync = redis.Redis.from_url(stack.redis.url)
    sync.set(lease_key(task_id), "dead-worker:1:00000000", px=2_000)
    started = time.monotonic()
    result = _send_sleep(celery_client, user_token, task_id, 0).get(timeout=30)
    assert time.monotonic() - started >= 1.5
    assert result["attempt"] == 1  # the refused start was not counted
    assert gateway_control.stats()["invocations"] == 1


def test_a_lease_taken_with_its_message_is_taken_back_counting_no_second_start(redis_url: str) -> None:
    """The consumer took the lease (and counted attempt 1); the message then waited for a thread."""
    sync = redis.Redis.from_url(redis_url)

    async def scenario(keepers: list[LeaseKeeper]) -> None:
        worker, other = keepers
        held, lapsed, restarted = _rid(), _rid(), _rid()
        for rid in (held, lapsed, restarted):
            assert await worker.acquire(rid, f"taken-{rid}") == 1  # what the consumer's BEGIN did
        sync.delete(lease_key(lapsed), lease_key(restarted))  # lapsed while waiting
        assert await other.acquire(restarted, other.new_token()) == 2  # and another worker started it since
        await other.release(restarted, other.held[restarted])
        assert await worker.acquire(held, f"taken-{held}", taken_attempt=1) == 1
        assert await worker.acquire(lapsed, f"taken-{lapsed}", taken_attempt=1) == 1
        assert await worker.acquire(restarted, f"taken-{restarted}", taken_attempt=1) == 3
        busy = _rid()
        await other.acquire(busy, other.new_token())
        with pytest.raises(AlreadyRunning):
            await worker.acquire(busy, "taken-stale", taken_attempt=1)

    _run(redis_url, scenario)


def test_a_hand_over_takes_the_start_back_so_the_forwarded_copy_is_the_same_attempt(redis_url: str) -> None:
    rid, again = _rid(), _rid()
    sync = redis.Redis.from_url(redis_url)

    async def scenario(keepers: list[LeaseKeeper]) -> None:
        first, second = keepers
        a = first.new_token()
        assert await first.acquire(rid, a) == 1
        assert not await second.hand_over(rid, "w1:not-the-holder", 1)  # not held by that token: nothing changes
        assert sync.get(attempt_key(rid)) == b"1"
        assert await first.hand_over(rid, a, 1)
        assert first.held == {} and sync.exists(lease_key(rid)) == 0
        assert await second.acquire(rid, second.new_token()) == 1  # the forwarded copy: still attempt 1
        # A redelivered invocation (attempt 2) forwarded: its copy is attempt 2 again, not 3.
        b = first.new_token()
        assert await first.acquire(again, b) == 1
        await first.release(again, b)
        c = first.new_token()
        assert await first.acquire(again, c) == 2
        assert await first.hand_over(again, c, 2)
        assert await second.acquire(again, second.new_token()) == 2

    _run(redis_url, scenario)
