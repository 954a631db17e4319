"""The breaker change feed on a real redis-server: closed breakers cost no round trip, and every
change another process makes is learnt before a remembered "closed" is used again."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import pytest
import redis
import redis.asyncio as aioredis

from tests.unit.test_breaker import TARGET, board_for, fail_503, ok, run
from workers.breaker.board import BreakerBoard
from workers.breaker.watch import BreakerWatch
from workers.errors import CircuitOpen, ToolError
from workers.keys import breaker_channel, breaker_key

KEY = breaker_key(TARGET)


def evalsha_calls(url: str) -> int:
    """Scripts run by Redis so far (every breaker round trip is one EVALSHA)."""
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def until(check: Callable[[], bool], timeout: float = 3.0) -> float:
    """Seconds it took ``check`` to become true (fails the test after ``timeout``)."""
    started = time.perf_counter()
    while not check():
        assert time.perf_counter() - started < timeout, "condition not reached in time"
        await asyncio.sleep(0.001)
    return time.perf_counter() - started


async def started_board(url: str) -> BreakerBoard:
    board = board_for(url, watch=True)
    await board.start()
    assert board.watch is not None and board.watch.live
    return board


def test_closed_breaker_costs_no_round_trip_and_other_workers_changes_arrive(redis_url: str) -> None:
    async def scenario() -> None:
        a, b = await started_board(redis_url), await started_board(redis_url)
        assert a.watch is not None
        cb_a, cb_b = a.breaker(TARGET), b.breaker(TARGET)
        assert await cb_a.call(ok, lease=5) == "ok"  # first call asks Redis, then remembers
        assert a.watch.closed_gen(KEY) == 0
        before = evalsha_calls(redis_url)
        for _ in range(200):
            assert await cb_a.call(ok, lease=5) == "ok"
        assert evalsha_calls(redis_url) == before  # 200 healthy calls, no round trip

        # Another worker records a failure: this one forgets, and its next success resets the count.
        with pytest.raises(ToolError):
            await cb_b.call(fail_503, lease=5)
        await until(lambda: a.watch is not None and a.watch.closed_gen(KEY) is None)
        assert await cb_a.call(ok, lease=5) == "ok"
        assert (await a.status([TARGET]))[0].failures == 0

        # Remembered closed again, then the other worker opens it: the next call here fails fast.
        assert await cb_a.call(ok, lease=5) == "ok"
        assert a.watch.closed_gen(KEY) is not None
        for _ in range(3):
            with pytest.raises(ToolError):
                await cb_b.call(fail_503, lease=5)
        await until(lambda: a.watch is not None and a.watch.closed_gen(KEY) is None)
        called: list[int] = []

        async def spy() -> str:
            called.append(1)
            return "ok"

        with pytest.raises(CircuitOpen):
            await cb_a.call(spy, lease=5)
        assert not called
        # An operator reset reaches every process too.
        await b.reset(TARGET)
        assert await cb_a.call(spy, lease=5) == "ok"
        await a.close()
        await b.close()

    run(scenario)


def test_each_change_is_published_by_the_script_that_makes_it(redis_url: str) -> None:
    async def scenario() -> None:
        listener = aioredis.Redis.from_url(redis_url)
        pubsub = listener.pubsub()
        await pubsub.subscribe(breaker_channel())
        await pubsub.get_message(timeout=1)  # the subscribe confirmation
        board = board_for(redis_url)
        cb = board.breaker(TARGET)
        for fn in (fail_503, ok):  # failure (count 1), success (count back to 0)
            with contextlib.suppress(ToolError):
                await cb.call(fn, lease=5)
        for _ in range(3):  # three failures, the third opens it
            with pytest.raises(ToolError):
                await cb.call(fail_503, lease=5)
        await board.reset(TARGET)
        seen = []
        while (message := await pubsub.get_message(timeout=0.5)) is not None:
            seen.append(message["data"])
        assert seen == [KEY.encode()] * 6
        await pubsub.aclose()
        await listener.aclose()
        await board.close()

    run(scenario)


def test_lost_feed_means_asking_redis_until_it_is_back(redis_url: str) -> None:
    async def scenario() -> None:
        board = await started_board(redis_url)
        watch = board.watch
        assert watch is not None
        cb = board.breaker(TARGET)
        await cb.call(ok, lease=5)
        assert watch.closed_gen(KEY) is not None
        admin = redis.Redis.from_url(redis_url)
        assert admin.client_kill_filter(_type="pubsub") >= 1
        await until(lambda: not watch.live)
        assert watch.closed_gen(KEY) is None
        before = evalsha_calls(redis_url)
        await cb.call(ok, lease=5)  # dark: asks Redis (and does not remember)
        assert evalsha_calls(redis_url) == before + 1
        await until(lambda: watch.live)
        await cb.call(ok, lease=5)
        assert watch.closed_gen(KEY) is not None
        admin.close()
        await board.close()

    run(scenario)


def test_answers_overtaken_by_a_change_or_reconnect_are_not_remembered(redis_url: str) -> None:
    async def scenario() -> None:
        watch = BreakerWatch(aioredis.Redis.from_url(redis_url), poll=0.1, max_age=0.2)
        await watch.start()
        assert watch.live
        ticket = watch.ticket(KEY)
        watch.changed(KEY)  # a change message arrived while the answer was in flight
        watch.remember(ticket, closed=True, failures=0, gen=3)
        assert watch.closed_gen(KEY) is None
        ticket = watch.ticket(KEY)
        redis.Redis.from_url(redis_url).client_kill_filter(_type="pubsub")
        await until(lambda: not watch.live)
        await until(lambda: watch.live)
        watch.remember(ticket, closed=True, failures=0, gen=3)  # taken in the previous subscription
        assert watch.closed_gen(KEY) is None
        watch.remember(watch.ticket(KEY), closed=True, failures=1, gen=3)  # failures: never remembered
        assert watch.closed_gen(KEY) is None
        watch.remember(watch.ticket(KEY), closed=True, failures=0, gen=3)
        assert watch.closed_gen(KEY) == 3
        await asyncio.sleep(0.25)  # older than max_age: asked again, whatever the feed says
        assert watch.closed_gen(KEY) is None
        await watch.close()

    run(scenario)
