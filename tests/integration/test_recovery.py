"""A lost worker costs seconds, not the visibility timeout, and nothing runs twice at once.

Real workers on private queues, the default ``SARK_VISIBILITY_TIMEOUT`` (3600 s) and heartbeat
settings, the session Gateway's ``sleep`` tool (1 s), whose ``/_control/stats`` spans tell a repeated
call from two running at the same time. Each test prints a row of the fault table (closing note of
issue 13): sent / completed / re-executed / concurrent duplicates / lost / seconds to recover.
"""

from __future__ import annotations

import contextlib
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult

from devkit.stack import DevStack, Proc, wait_for
from tests.conftest import GatewayControl
from tests.helpers import popped_and_never_recorded, send_invoke, settings_with, xfail_if_only_lost_in_transit
from workers.client import wait_result
from workers.errors import SarkError

#: Invocations in flight when the worker dies, and how long each one runs.
INVOCATIONS = 100
SECONDS = 1.0
#: How long after the kill results are awaited (bounded: the old code never recovers within it).
PATIENCE = 60.0
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"


@dataclass
class FaultRow:
    """One row of the fault table."""

    what: str
    sent: int = 0
    completed: int = 0
    typed_errors: int = 0
    lost: int = 0
    re_executed: int = 0
    concurrent: int = 0
    recovered_in: float = 0.0
    errors: list[str] = field(default_factory=list)

    def collect(self, pendings: list[AsyncResult], since: float, patience: float = PATIENCE) -> FaultRow:
        """Watch every result until ``since + patience``: the last arrival is the recovery time."""
        deadline = since + patience
        last = since
        waiting = list(pendings)
        while waiting and time.monotonic() < deadline:
            for pending in [p for p in waiting if p.ready()]:
                waiting.remove(pending)
                last = time.monotonic()
                try:
                    wait_result(pending, 5)
                    self.completed += 1
                except SarkError as exc:
                    self.typed_errors += 1
                    self.errors.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.05)
        self.lost = len(waiting)
        self.recovered_in = last - since
        return self

    def count_calls(self, spans: dict[str, list[list[float | None]]], ids: set[str]) -> FaultRow:
        """Re-executions and concurrent duplicates, from the Gateway's call spans of these invocations."""
        for rid in ids:
            calls = sorted((s[0] or 0.0, s[1] if s[1] is not None else float("inf")) for s in spans.get(rid, []))
            self.re_executed += int(len(calls) > 1)
            self.concurrent += int(any(calls[i + 1][0] < calls[i][1] for i in range(len(calls) - 1)))
        return self

    def print(self) -> None:
        print(f"\nFAULT | {self.what} | sent {self.sent} | completed {self.completed} | typed errors "
              f"{self.typed_errors} | re-executed {self.re_executed} | concurrent duplicates {self.concurrent} "
              f"| lost {self.lost} | recovered in {self.recovered_in:.1f} s")


def _app(env: dict[str, str]) -> Celery:
    from workers.app import create_app

    return create_app(settings_with(env))


def _send_sleeps(app: Celery, queue: str, token: str, count: int) -> list[AsyncResult]:
    return [send_invoke(app, "echo", "sleep", {"seconds": SECONDS}, token=token, queue=queue) for _ in range(count)]


@pytest.fixture()
def queue(request: pytest.FixtureRequest) -> str:
    return f"recovery.{request.node.name[:40]}.{uuid.uuid4().hex[:6]}"


def _kill(proc: Proc) -> float:
    proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    proc.popen.wait(10)
    return killed


def _kill_one_of_two(stack: DevStack, gateway_control: GatewayControl, token: str, env: dict[str, str],
                     what: str, redis: Proc | None = None) -> FaultRow:
    """Two workers on ``env['SARK_QUEUE_HTTP']``, 100 invocations in flight, one worker SIGKILLed: the row.

    ``redis``: the broker is this private Redis (AOF on), so a lost message can be proven in transit.
    """
    queue = env["SARK_QUEUE_HTTP"]
    app = _app(env)
    half = INVOCATIONS // 2
    workers = [stack.worker(f"{what[:5].lower()}-{i}", env=env, queues=queue, concurrency=half) for i in range(2)]
    pendings = _send_sleeps(app, queue, token, INVOCATIONS)
    row = FaultRow(f"{what}: SIGKILL 1 of 2 workers", sent=len(pendings))
    try:
        wait_for(lambda: gateway_control.stats()["in_flight"] >= INVOCATIONS * 0.9, 30, "invocations in flight")
        killed = _kill(workers[0])
        row.collect(pendings, killed)
        lost = [p.id for p in pendings if not p.ready()]
        verdicts = popped_and_never_recorded(redis.url, _data_dir(stack, redis), lost) if redis and lost else {}
    finally:
        workers[1].stop()
        app.close()
    row.count_calls(gateway_control.stats()["spans"], {p.id for p in pendings}).print()
    assert row.typed_errors == 0, row.errors[:5]
    assert row.concurrent == 0
    if row.lost and verdicts:
        xfail_if_only_lost_in_transit(verdicts)  # a reply of BRPOP in flight to the killed worker
    assert row.lost == 0
    assert row.completed == row.sent
    assert row.recovered_in <= 15.0
    return row


def _data_dir(stack: DevStack, redis: Proc) -> Path:
    return stack.log_dir / f"redis-{int(redis.url.rsplit(':', 1)[1].split('/')[0])}"


def test_sigkill_one_of_two_workers_with_100_in_flight(
    stack: DevStack, private_redis: Proc, user_token: str, gateway_control: GatewayControl, queue: str
) -> None:
    env = {"SARK_QUEUE_HTTP": queue, "SARK_BROKER_URL": private_redis.url, "SARK_REDIS_URL": private_redis.url}
    row = _kill_one_of_two(stack, gateway_control, user_token, env, "Redis", redis=private_redis)
    assert row.re_executed >= 1  # the killed worker's invocations ran again, after it died


def test_a_sweeper_killed_mid_sweep_loses_and_doubles_nothing(
    stack: DevStack, private_redis: Proc, user_token: str, gateway_control: GatewayControl, queue: str
) -> None:
    # A Redis of its own: every worker on a Redis sweeps for the whole fleet there (the session's too).
    # One message put back per event-loop turn: a sweep of ~40 messages lasts seconds, time to kill it.
    env = {"SARK_QUEUE_HTTP": queue, "SARK_RECOVERY_BATCH": "1", "SARK_BROKER_URL": private_redis.url,
           "SARK_REDIS_URL": private_redis.url}
    app = _app(env)
    victim = stack.worker("victim", env=env, queues=queue, concurrency=40)
    sweepers = [stack.worker(f"sweeper-{i}", env=env, queues=queue, concurrency=30) for i in range(2)]
    by_pid = {proc.popen.pid: proc for proc in sweepers}
    conn = redis.Redis.from_url(private_redis.url, decode_responses=True)
    pendings = _send_sleeps(app, queue, user_token, INVOCATIONS)
    row = FaultRow("Redis: SIGKILL the sweeper mid-sweep", sent=len(pendings))
    survivor: Proc | None = None
    try:
        wait_for(lambda: gateway_control.stats()["in_flight"] >= INVOCATIONS * 0.9, 30, "invocations in flight")
        killed = _kill(victim)

        sweeper, key = _sweeper_at_work(conn, by_pid, timeout=30)
        _kill(sweeper)
        left = int(conn.scard(key))
        assert left > 0, "the sweeper had put everything back before it was killed: not mid-sweep"
        survivor = next(p for p in sweepers if p is not sweeper)
        row.collect(pendings, killed, patience=PATIENCE + 30)
        print(f"\nsweeper {sweeper.popen.pid} killed with {left} message(s) still to put back")
        verdicts = popped_and_never_recorded(private_redis.url, _data_dir(stack, private_redis),
                                             [p.id for p in pendings if not p.ready()])
    finally:
        (survivor or sweepers[1]).stop()
        app.close()
    row.count_calls(gateway_control.stats()["spans"], {p.id for p in pendings}).print()
    assert row.typed_errors == 0, row.errors[:5]
    assert row.concurrent == 0
    assert row.completed + row.lost == row.sent
    if row.lost:
        # The kill lands just after the claim, as the first messages put back are on their way to the
        # sweeper's own BRPOP: the in-transit residual is likeliest here (about 1 run in 3).
        xfail_if_only_lost_in_transit(verdicts)
    assert row.lost == 0


def _sweeper_at_work(conn: redis.Redis, by_pid: dict[int, Proc], timeout: float) -> tuple[Proc, str]:
    """The worker whose recovering set holds messages (claimed, not all put back yet), and that set."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for key in conn.scan_iter("sark:recovering:*"):
            pid = int(str(key).split(":")[-2])  # sark:recovering:<host>:<pid>:<nonce>
            left = int(conn.scard(key))
            if pid in by_pid and left > 5:
                return by_pid[pid], str(key)
        time.sleep(0.01)
    raise AssertionError("no sweeper claimed the dead worker's messages")


def _rabbitmq_reachable() -> bool:
    from kombu import Connection

    with contextlib.suppress(Exception), Connection(RABBITMQ_URL, connect_timeout=2) as conn:
        conn.ensure_connection(max_retries=1)
        return True
    return False


@pytest.fixture()
def rabbitmq_queue(queue: str) -> Iterator[str]:
    if not _rabbitmq_reachable():
        pytest.skip("no RabbitMQ on 127.0.0.1:5672")
    yield queue
    from kombu import Connection, Queue

    with contextlib.suppress(Exception), Connection(RABBITMQ_URL, connect_timeout=2) as conn:
        Queue(queue, channel=conn.default_channel).delete()


def test_sigkill_one_of_two_workers_on_rabbitmq(
    stack: DevStack, user_token: str, gateway_control: GatewayControl, rabbitmq_queue: str
) -> None:
    """RabbitMQ gives a dead consumer's messages back at once; the invocation leases keep the copies
    from running while the dead worker's attempt could still be running."""
    _kill_one_of_two(stack, gateway_control, user_token,
                     {"SARK_QUEUE_HTTP": rabbitmq_queue, "SARK_BROKER_URL": RABBITMQ_URL}, "RabbitMQ")


@pytest.fixture()
def private_redis(stack: DevStack) -> Iterator[Proc]:
    from devkit.stack import start_redis

    proc = start_redis(stack.log_dir, appendonly=True)
    yield proc
    proc.stop()


@pytest.mark.parametrize("how", ["graceful", "kill -9"])
def test_redis_restart_under_mixed_load(
    stack: DevStack, private_redis: Proc, user_token: str, gateway_control: GatewayControl, queue: str, how: str
) -> None:
    """Plain, streamed SSE and stdio-progress invocations running while Redis (AOF on) restarts: all done."""
    from devkit.stack import start_redis

    url = private_redis.url
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    queues = {"http": f"{queue}.http", "sse": f"{queue}.sse", "stdio": f"{queue}.stdio"}
    env = {"SARK_BROKER_URL": url, "SARK_REDIS_URL": url, "SARK_QUEUE_HTTP": queues["http"],
           "SARK_QUEUE_SSE": queues["sse"], "SARK_QUEUE_STDIO": queues["stdio"]}
    app = _app(env)
    worker = stack.worker(f"mixed-{how[:4]}", env=env, queues=",".join(queues.values()), concurrency=30)
    plain = [send_invoke(app, "echo", "sleep", {"seconds": 0.5}, token=user_token, queue=queues["http"])
             for _ in range(40)]
    sse = [send_invoke(app, "echo-stream", "stream_data", {"count": 20, "interval": 0.05}, token=user_token,
                       queue=queues["sse"], stream=True) for _ in range(10)]
    stdio = [send_invoke(app, "fixture", "progress", {"steps": 5, "delay": 0.2}, queue=queues["stdio"], stream=True)
             for _ in range(10)]
    pendings = plain + sse + stdio
    row = FaultRow(f"Redis restart ({how}, AOF) under mixed load", sent=len(pendings))
    restarted: Proc | None = None
    try:
        wait_for(lambda: gateway_control.stats()["in_flight"] >= 5, 30, "invocations running")
        private_redis.stop(sig=signal.SIGTERM if how == "graceful" else signal.SIGKILL)
        down = time.monotonic()
        restarted = start_redis(stack.log_dir, port=port, appendonly=True, data_dir=stack.log_dir / f"redis-{port}")
        row.collect(pendings, down)
        unfinished = [p.id for p in pendings if not p.ready()]
        verdicts = popped_and_never_recorded(url, stack.log_dir / f"redis-{port}", unfinished)
        assert worker.alive()
    finally:
        worker.stop()
        if restarted is not None:
            restarted.stop()
        app.close()
    row.count_calls(gateway_control.stats()["spans"], {p.id for p in plain}).print()
    if row.lost and not row.typed_errors:
        xfail_if_only_lost_in_transit(verdicts)
    assert row.lost == 0 and row.typed_errors == 0, row.errors[:5]
    assert row.completed == row.sent
    assert row.concurrent == 0
    assert [wait_result(p, 1)["chunks"] for p in sse + stdio] == [20] * len(sse) + [5] * len(stdio)


def test_a_worker_with_another_visibility_timeout_than_the_fleet_refuses_to_start(
    stack: DevStack, worker: Proc, queue: str
) -> None:
    """The session worker set the fleet's (3600 s) on the session Redis; a worker with 3000 s is refused."""
    from devkit.stack import ProcessExited

    with pytest.raises(ProcessExited) as refused:
        stack.worker("odd-one", env={"SARK_VISIBILITY_TIMEOUT": "3000"}, queues=queue)
    assert "refusing to start" in str(refused.value) and "3600s for the fleet" in str(refused.value)
    assert "sark fleet --set-visibility-timeout" in str(refused.value)


def test_the_aof_proof_tells_a_message_lost_in_transit_from_one_recorded(stack: DevStack, private_redis: Proc) -> None:
    """The proof behind ``xfail_if_only_lost_in_transit``, on a real Redis: popped and recorded nowhere is
    "in transit"; recorded as unacknowledged, or still queued, is not."""
    conn = redis.Redis.from_url(private_redis.url)
    ids = {name: str(uuid.uuid4()) for name in ("in_transit", "unacked", "queued")}
    for rid in ids.values():
        conn.lpush("proof.queue", f'{{"headers": {{"id": "{rid}"}}}}')
    conn.rpop("proof.queue")  # in_transit: popped, its reply "lost"
    taken = conn.rpop("proof.queue")  # unacked: popped and recorded, as QoS.append does
    conn.hset("unacked", "tag", b"[" + bytes(taken or b"") + b', "", "proof.queue"]')
    conn.close()
    def verdicts() -> dict[str, str]:
        return popped_and_never_recorded(private_redis.url, _data_dir(stack, private_redis), list(ids.values()))

    wait_for(lambda: verdicts()[ids["unacked"]].startswith("last: HSET"), 5, "the AOF (appendfsync everysec)")
    assert verdicts()[ids["in_transit"]] == "in transit"
    assert verdicts()[ids["queued"]].startswith("last: LPUSH")
