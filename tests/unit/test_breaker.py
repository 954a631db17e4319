"""Breaker state machine on a real private redis-server: transitions, lease, fallback, 8-process races."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from config.registry import BreakerOverrides, GatewayServer, Registry, StdioServer
from devkit.stack import start_redis
from workers.breaker.board import BreakerBoard, breaker_command, target_of
from workers.breaker.store import Decision, LocalStore, RedisStore
from workers.breaker.watch import BreakerWatch
from workers.errors import AuthorizationDenied, CircuitOpen, GatewayUnavailable, InvalidInvocation, ToolError
from workers.keys import breaker_key

FLAKY = GatewayServer(name="flaky", transport="http", breaker=BreakerOverrides(fail_max=3, reset_timeout=0.3))
REGISTRY = Registry(servers={"flaky": FLAKY})
TARGET = "gateway:flaky"


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        return await coro_fn()

    return asyncio.run(main())


def board_for(url: str, *, watch: bool = False, **kwargs: Any) -> BreakerBoard:
    """A board as a worker has it; ``watch``: with the change feed (call ``await board.start()``)."""
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    client = aioredis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 1))
    feed = BreakerWatch(aioredis.Redis.from_url(url, socket_connect_timeout=0.5), poll=0.1) if watch else None
    return BreakerBoard(REGISTRY, client, watch=feed, **kwargs)


async def ok() -> str:
    return "ok"


async def fail_503() -> str:
    raise ToolError("boom", status_code=503)


def test_target_naming() -> None:
    stream = GatewayServer(name="echo-stream", transport="sse", server_id="echo")
    stdio = StdioServer(name="time", transport="stdio", command="x")
    assert target_of(stream) == "gateway:echo" == target_of(GatewayServer(name="echo", transport="http"))
    assert target_of(stdio) == "stdio:time"


@pytest.mark.parametrize("watch", [False, True], ids=["ask-redis", "change-feed"])
def test_full_cycle_and_error_classes(redis_url: str, watch: bool) -> None:
    async def scenario() -> None:
        board = board_for(redis_url, watch=watch)
        await board.start()
        cb = board.breaker(TARGET)
        changes: list[tuple[str | None, str]] = []

        class Recorder:
            def before_call(self, *a: Any, **k: Any) -> None: ...
            def failure(self, *a: Any) -> None: ...
            def success(self, *a: Any) -> None: ...
            def state_change(self, cb: Any, old: str | None, new: str) -> None:
                changes.append((old, new))

        board.listeners.append(Recorder())
        # Errors that do not count: the target answered.
        for exc in (AuthorizationDenied("no"), ToolError("bad", status_code=404), InvalidInvocation("x")):
            async def raise_it(exc: Exception = exc) -> str:
                raise exc
            for _ in range(5):
                with pytest.raises(type(exc)):
                    await cb.call(raise_it, lease=5)
        assert (await board.status([TARGET]))[0].state == "closed"
        # A success resets the consecutive count.
        for fn in (fail_503, fail_503, ok):
            with pytest.raises(ToolError) if fn is fail_503 else _nothing():
                await cb.call(fn, lease=5)
        assert (await board.status([TARGET]))[0].failures == 0
        for _ in range(3):
            with pytest.raises(ToolError):
                await cb.call(fail_503, lease=5)
        called = []

        async def spy() -> str:
            called.append(1)
            return "ok"

        with pytest.raises(CircuitOpen) as info:
            await cb.call(spy, lease=5)
        assert not called and 0 < info.value.retry_after <= 0.3
        status = (await board.status([TARGET]))[0]
        assert (status.state, status.failures, status.opens, status.last_error) == ("open", 3, 1, "tool_error")
        await asyncio.sleep(0.35)
        # Half-open: the trial fails → open again; later a trial succeeds → closed.
        async def unreachable() -> str:
            raise GatewayUnavailable("refused")

        with pytest.raises(GatewayUnavailable):
            await cb.call(unreachable, lease=5)
        with pytest.raises(CircuitOpen):
            await cb.call(spy, lease=5)
        await asyncio.sleep(0.35)
        assert await cb.call(spy, lease=5) == "ok"
        assert (await board.status([TARGET]))[0].state == "closed"
        assert changes == [
            ("closed", "open"), ("open", "half-open"), ("half-open", "open"), ("open", "half-open"),
            ("half-open", "closed"),
        ]
        await board.close()

    run(scenario)


class _nothing:
    def __enter__(self) -> None: ...
    def __exit__(self, *a: object) -> None: ...


def test_trial_lease_expires_and_cancel_releases(redis_url: str) -> None:
    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url)
        store = RedisStore(client)
        await client.hset(breaker_key(TARGET), mapping={"state": "open", "opened_at": 0})
        first = await store.acquire(TARGET, reset_timeout=1, token="a", lease=0.2)
        assert (first.allowed, first.state, first.changed_from) == (True, "half-open", "open")
        busy = await store.acquire(TARGET, reset_timeout=1, token="b", lease=0.2)
        assert not busy.allowed and busy.retry_after > 0
        await asyncio.sleep(0.25)  # "a" crashed: its lease ran out
        second = await store.acquire(TARGET, reset_timeout=1, token="c", lease=5)
        assert second.allowed
        # A late answer from the crashed caller changes nothing.
        late = await store.record(TARGET, first, "success", fail_max=3, reset_timeout=1, error="")
        assert late.state == "half-open" and late.changed_from is None
        # A cancelled trial releases its claim at once.
        await store.record(TARGET, second, "release", fail_max=3, reset_timeout=1, error="")
        assert (await store.acquire(TARGET, reset_timeout=1, token="d", lease=5)).allowed
        await client.aclose()

    run(scenario)


def test_operator_list_and_reset(redis_url: str) -> None:
    async def scenario() -> None:
        board = board_for(redis_url)
        for _ in range(3):
            with pytest.raises(ToolError):
                await board.breaker(TARGET).call(fail_503, lease=5)
        rows = await breaker_command(board, "list")
        assert [(r["target"], r["state"]) for r in rows] == [(TARGET, "open")]
        rows = await breaker_command(board, "reset", "*")
        assert rows[0]["state"] == "closed" and rows[0]["failures"] == 0
        with pytest.raises(InvalidInvocation):
            await breaker_command(board, "reset")
        await board.close()

    run(scenario)


def test_cli_list_and_reset(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    from config.settings import get_settings
    from workers.breaker import cli as breaker_cli

    registry = tmp_path / "servers.yaml"
    registry.write_text("servers:\n  flaky:\n    transport: http\n    breaker: {fail_max: 3, reset_timeout: 30}\n")
    monkeypatch.setenv("SARK_REDIS_URL", redis_url)
    monkeypatch.setenv("SARK_REGISTRY_PATH", str(registry))
    get_settings.cache_clear()
    try:
        client = redis.Redis.from_url(redis_url)
        client.hset(breaker_key(TARGET), mapping={"state": "open", "opened_at": int(time.time() * 1000)})
        assert breaker_cli.main(["list"]) == 0
        out = capsys.readouterr().out
        assert "gateway:flaky" in out and " open " in out
        assert breaker_cli.main(["--json", "reset", TARGET]) == 0
        assert '"state": "closed"' in capsys.readouterr().out
        assert client.hget(breaker_key(TARGET), "state") == b"closed"
        client.close()
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize("watch", [False, True], ids=["ask-redis", "change-feed"])
def test_fallback_to_local_and_healing(tmp_path: Path, caplog: pytest.LogCaptureFixture, watch: bool) -> None:
    proc = start_redis(tmp_path / "r1")
    port = int(proc.url.rsplit(":", 1)[1].split("/")[0])

    async def scenario() -> None:
        board = board_for(proc.url, recheck=0.2, watch=watch)
        await board.start()
        cb = board.breaker(TARGET)
        assert await cb.call(ok, lease=5) == "ok"
        assert await cb.call(ok, lease=5) == "ok"  # with the feed: remembered closed
        proc.stop()
        with caplog.at_level(logging.WARNING, logger="sark.breaker"):
            started = time.perf_counter()
            for _ in range(3):
                with pytest.raises(ToolError):
                    await cb.call(fail_503, lease=5)
            with pytest.raises(CircuitOpen):  # the per-process breaker still protects the target
                await cb.call(ok, lease=5)
            assert time.perf_counter() - started < 2.0
            assert board.degraded
            assert (await board.status([TARGET]))[0].store == "local"
            fallback_lines = [r for r in caplog.records if getattr(r, "event", "") == "breaker.store_fallback"]
            assert len(fallback_lines) == 1
            again = start_redis(tmp_path / "r2", port=port)
            try:
                await asyncio.sleep(0.25)
                assert await cb.call(ok, lease=5) == "ok"  # back on Redis, where the breaker is closed
                assert not board.degraded
                assert any(getattr(r, "event", "") == "breaker.store_healed" for r in caplog.records)
                assert (await board.status([TARGET]))[0].store == "redis"
            finally:
                await board.close()
                again.stop()

    run(scenario)


def test_local_store_matches_the_lua_state_machine() -> None:
    async def scenario() -> None:
        store = LocalStore()
        kw: dict[str, Any] = {"fail_max": 2, "reset_timeout": 0.05, "error": "e"}
        d = await store.acquire("t", reset_timeout=0.05, token="a", lease=1)
        await store.record("t", d, "failure", **kw)
        t = await store.record("t", d, "failure", **kw)
        assert (t.state, t.changed_from) == ("open", "closed")
        assert not (await store.acquire("t", reset_timeout=0.05, token="b", lease=1)).allowed
        await asyncio.sleep(0.06)
        trial = await store.acquire("t", reset_timeout=0.05, token="c", lease=1)
        assert trial.allowed and trial.changed_from == "open"
        assert not (await store.acquire("t", reset_timeout=0.05, token="d", lease=1)).allowed
        t = await store.record("t", trial, "success", **kw)
        assert (t.state, t.changed_from) == ("closed", "half-open")

    run(scenario)


# --- concurrency: ≥ 8 processes hammering the same hash -------------------------------------------
PROCS = 8


def _count_failures(url: str, n: int, barrier: Any, out: Any) -> None:
    async def main() -> int:
        client = aioredis.Redis.from_url(url)
        store = RedisStore(client)
        barrier.wait()
        opened = 0
        for i in range(n):
            d = await store.acquire("race:count", reset_timeout=60, token=f"{i}", lease=5)
            t = await store.record("race:count", d, "failure", fail_max=10**9, reset_timeout=60, error="e")
            opened += t.changed_from is not None
        # Then race to open a breaker with fail_max 50: exactly one process sees the transition.
        for i in range(20):
            d = await store.acquire("race:open", reset_timeout=60, token=f"o{i}", lease=5)
            if not d.allowed:
                continue
            t = await store.record("race:open", d, "failure", fail_max=50, reset_timeout=60, error="e")
            opened += t.changed_from == "closed"
        await client.aclose()
        return opened

    out.put(asyncio.run(main()))


def _race_trial(url: str, rounds: int, barrier: Any, out: Any) -> None:
    async def main() -> list[int]:
        client = aioredis.Redis.from_url(url)
        store = RedisStore(client)
        wins = []
        for r in range(rounds):
            barrier.wait()  # every process: the breaker was just re-opened with opened_at = 0
            d: Decision = await store.acquire(f"race:trial:{r}", reset_timeout=0.001, token=f"{r}", lease=30)
            wins.append(int(d.allowed))
        await client.aclose()
        return wins

    out.put(asyncio.run(main()))


def _spawn(target: Callable[..., None], *args: Any) -> list[Any]:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(PROCS), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, out)) for _ in range(PROCS)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    return results


def test_failures_counted_exactly_from_8_processes(redis_url: str) -> None:
    n = 300
    opened = _spawn(_count_failures, redis_url, n)
    client = redis.Redis.from_url(redis_url)
    assert int(client.hget(breaker_key("race:count"), "failures") or 0) == PROCS * n
    assert sum(opened) == 1  # one process, and only one, opened race:open
    assert client.hget(breaker_key("race:open"), "state") == b"open"
    assert int(client.hget(breaker_key("race:open"), "failures") or 0) == 50
    client.close()


def test_exactly_one_trial_from_8_processes(redis_url: str) -> None:
    rounds = 40
    client = redis.Redis.from_url(redis_url)
    for r in range(rounds):
        client.hset(breaker_key(f"race:trial:{r}"), mapping={"state": "open", "opened_at": 0})
    client.close()
    wins = _spawn(_race_trial, redis_url, rounds)
    per_round = [sum(w[r] for w in wins) for r in range(rounds)]
    assert per_round == [1] * rounds
