"""One breaker for the fleet: 3 real worker processes (+1 with a retry policy) against a private Gateway.

Each worker consumes its own queue, so the test decides which process carries out which task. The
breaker state lives in Redis db 1 (the session's workers use db 0 and their own ``gateway:echo``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from devkit.stack import DevStack, Proc, start_gateway, wait_for
from tests.conftest import GatewayControl
from tests.helpers import operator_headers, token_headers
from workers.contract import TASK_BREAKERS, TASK_INVOKE
from workers.errors import AuthorizationDenied, CircuitOpen, SarkError
from workers.keys import breaker_key

TARGET = "gateway:echo"
FAIL_MAX = 4
RESET = 1.5
QUEUES = ("bk.a", "bk.b", "bk.c")


@dataclass
class Fleet:
    control: GatewayControl
    redis: redis.Redis
    app: Celery
    token: str
    workers: list[Proc]

    def send(self, queue: str, tool: str = "echo", arguments: dict[str, Any] | None = None, *,
             server: str = "flaky", timeout: float | None = None, token: str | None = None) -> Any:
        invocation: dict[str, Any] = {"server": server, "tool": tool, "arguments": arguments or {"x": 1}}
        if timeout is not None:
            invocation["timeout"] = timeout
        task_id = str(uuid.uuid4())
        return self.app.send_task(TASK_INVOKE, task_id=task_id, kwargs={"invocation": invocation}, queue=queue,
                                  headers=token_headers(token or self.token, task_id))

    def outcomes(self, queues: list[str], **kwargs: Any) -> list[str]:
        """Send one task per queue entry at once; each outcome's class name (or "ok")."""
        results = [self.send(q, **kwargs) for q in queues]

        def outcome(result: Any) -> str:
            try:
                result.get(timeout=30)
                return "ok"
            except SarkError as exc:
                return type(exc).__name__

        with ThreadPoolExecutor(len(results)) as pool:
            return list(pool.map(outcome, results))

    def invocations(self) -> int:
        return int(self.control.stats()["invocations"])

    def state(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.redis.hgetall(breaker_key(TARGET)).items()}

    def wait_half_open_due(self) -> None:
        def due() -> bool:
            seconds, micros = self.redis.time()
            now_ms = seconds * 1000 + micros // 1000
            return now_ms >= int(self.state()["opened_at"]) + RESET * 1000

        wait_for(due, RESET + 5, "reset_timeout to pass")

    def transitions(self, text: str) -> int:
        return sum(w.log().count(text) for w in self.workers)


@pytest.fixture(scope="module")
def fleet(stack: DevStack, tmp_path_factory: pytest.TempPathFactory, user_token: str) -> Iterator[Fleet]:
    from config.settings import Settings
    from workers.app import create_app

    assert stack.redis is not None
    tmp: Path = tmp_path_factory.mktemp("breaker-fleet")
    registry = tmp / "servers.yaml"
    registry.write_text(
        "servers:\n  flaky:\n    transport: http\n    server_id: echo\n"
        f"    breaker: {{fail_max: {FAIL_MAX}, reset_timeout: {RESET}}}\n"
        # The same Gateway server (same breaker target) with an operator timeout of 1 s.
        "  flaky-fast:\n    transport: http\n    server_id: echo\n    timeout: 1\n"
        f"    breaker: {{fail_max: {FAIL_MAX}, reset_timeout: {RESET}}}\n",
        encoding="utf-8",
    )
    gateway = start_gateway(stack.log_dir, stack.base_env())
    breaker_db = stack.redis.url.rsplit("/", 1)[0] + "/1"
    env = {
        "SARK_REGISTRY_PATH": str(registry), "SARK_GATEWAY_URL": gateway.url, "SARK_REDIS_URL": breaker_db,
        "SARK_INVOKE_ATTEMPTS": "1",
    }
    workers: list[Proc] = []
    client = redis.Redis.from_url(breaker_db)
    app = create_app(Settings())
    try:
        client.flushdb()
        for queue in QUEUES:
            workers.append(stack.worker(f"breaker-{queue[-1]}", env=env, queues=queue, concurrency=4))
        workers.append(stack.worker("breaker-r", env={**env, "SARK_BREAKER_RETRY_MAX": "3"}, queues="bk.r",
                                    concurrency=2))
        yield Fleet(GatewayControl(gateway.url), client, app, user_token, workers)
    finally:
        for proc in [*workers, gateway]:
            proc.stop()
            if proc in stack.procs:
                stack.procs.remove(proc)
        client.flushdb()
        client.close()
        app.close()


def test_breaker_shared_by_the_fleet(fleet: Fleet) -> None:
    fleet.control.mode("fail", status=503)
    pids = {w.pid for w in fleet.workers[:3]}
    assert len(pids) == 3

    # fail_max failures summed over three processes open the breaker; not one fewer.
    assert fleet.outcomes(["bk.a", "bk.b", "bk.c"]) == ["ToolError"] * 3
    assert fleet.state()["state"] == "closed" and fleet.state()["failures"] == "3"
    assert fleet.outcomes(["bk.a"]) == ["ToolError"]
    assert fleet.state()["state"] == "open" and fleet.state()["failures"] == str(FAIL_MAX)
    assert fleet.invocations() == FAIL_MAX
    assert fleet.transitions("closed -> open") == 1  # logged once, by the process that opened it

    # Every process now fails fast, without a network call.
    started = time.perf_counter()
    assert fleet.outcomes([q for q in QUEUES for _ in range(2)]) == ["CircuitOpen"] * 6
    assert time.perf_counter() - started < 1.0
    assert fleet.invocations() == FAIL_MAX
    try:
        fleet.send("bk.b").get(timeout=10)
    except CircuitOpen as exc:
        assert 0 < exc.retry_after <= RESET and exc.detail["target"] == TARGET
    rows = fleet.app.send_task(TASK_BREAKERS, queue="bk.c").get(timeout=10)
    assert [(r["target"], r["state"], r["failures"], r["store"]) for r in rows] == [(TARGET, "open", 4, "redis")]

    # After reset_timeout: exactly ONE trial call fleet-wide; it fails, so the breaker opens again.
    fleet.wait_half_open_due()
    outcomes = fleet.outcomes([q for q in QUEUES for _ in range(3)])
    assert sorted(outcomes) == ["CircuitOpen"] * 8 + ["ToolError"]
    assert fleet.invocations() == FAIL_MAX + 1
    assert fleet.state()["state"] == "open" and fleet.state()["opens"] == "2"

    # Next trial (slow, so the others arrive while it runs) succeeds and closes it everywhere.
    fleet.control.mode("ok")
    fleet.wait_half_open_due()
    outcomes = fleet.outcomes([q for q in QUEUES for _ in range(3)], tool="sleep", arguments={"seconds": 0.7})
    assert sorted(outcomes) == ["CircuitOpen"] * 8 + ["ok"]
    assert fleet.invocations() == FAIL_MAX + 2
    assert fleet.state()["state"] == "closed"
    assert fleet.outcomes([q for q in QUEUES for _ in range(2)]) == ["ok"] * 6
    assert fleet.invocations() == FAIL_MAX + 8
    assert fleet.transitions("half-open -> closed") == 1


def test_retry_policy_requeues_after_the_open_time(fleet: Fleet) -> None:
    fleet.control.reset()
    reset_id = str(uuid.uuid4())
    fleet.app.send_task(TASK_BREAKERS, task_id=reset_id, kwargs={"action": "reset", "target": "*"}, queue="bk.a",
                        headers=operator_headers(reset_id, "reset", "*")).get(timeout=10)
    fleet.control.mode("fail", status=502)
    assert fleet.outcomes(["bk.a", "bk.b", "bk.c", "bk.a"]) == ["ToolError"] * FAIL_MAX
    assert fleet.state()["state"] == "open"
    fleet.control.mode("ok")
    # The retrying worker gets CircuitOpen, re-queues itself after retry_after, and becomes the trial.
    started = time.perf_counter()
    result = fleet.send("bk.r").get(timeout=20)
    elapsed = time.perf_counter() - started
    assert result["server"] == "flaky" and not result["is_error"]
    assert RESET * 0.5 < elapsed < RESET + 5
    assert fleet.state()["state"] == "closed"
    assert fleet.invocations() == FAIL_MAX + 1


def test_a_caller_cannot_open_a_breaker_for_everyone(fleet: Fleet) -> None:
    """Failures the caller caused never count: its own too-short timeout, bad input, 4xx, a refused token."""
    fleet.control.reset()
    fleet.redis.delete(breaker_key(TARGET))
    many = [q for q in QUEUES for _ in range(2)]  # 6 > FAIL_MAX, spread over the three processes
    # timeout: 1e-9 is refused before any call (below SARK_MIN_INVOKE_TIMEOUT).
    assert fleet.outcomes(many, timeout=1e-9) == ["InvalidInvocation"] * 6
    assert fleet.invocations() == 0
    # The caller's own 1 s timeout (the operator allows 30 s) runs out against a hanging target: no verdict.
    fleet.control.mode("hang")
    assert fleet.outcomes(many, timeout=1.0) == ["InvocationTimeout"] * 6
    assert fleet.state().get("failures", "0") == "0" and fleet.state().get("state", "closed") == "closed"
    # 4xx answers and a token the target refuses (401) are the caller's problem too.
    fleet.control.mode("fail", status=400, body={"error": "bad arguments"})
    assert fleet.outcomes(many) == ["ToolError"] * 6
    fleet.control.mode("ok")
    assert fleet.outcomes(many, token="not-a-jwt") == ["AuthenticationFailed"] * 6
    assert fleet.state().get("state", "closed") == "closed" and fleet.state().get("failures", "0") == "0"
    # Control: when the operator's own timeout runs out, the target is at fault and the breaker opens.
    fleet.control.mode("hang")
    assert fleet.outcomes(["bk.a", "bk.b", "bk.c", "bk.a"], server="flaky-fast") == ["InvocationTimeout"] * FAIL_MAX
    assert fleet.state()["state"] == "open"
    assert fleet.outcomes(["bk.b"]) == ["CircuitOpen"]
    fleet.control.mode("ok")
    fleet.redis.delete(breaker_key(TARGET))


def test_breaker_reset_task_needs_the_operator_signature(fleet: Fleet) -> None:
    fleet.redis.hset(breaker_key(TARGET), mapping={"state": "open", "failures": FAIL_MAX, "opened_at": 1})

    def reset(headers: dict[str, str] | None, target: str = TARGET, task_id: str | None = None) -> Any:
        task_id = task_id or str(uuid.uuid4())
        return fleet.app.send_task(TASK_BREAKERS, task_id=task_id, kwargs={"action": "reset", "target": target},
                                   queue="bk.a", headers=headers).get(timeout=10)

    with pytest.raises(AuthorizationDenied, match="operator"):
        reset(None)  # any app that can enqueue
    with pytest.raises(AuthorizationDenied):
        reset(operator_headers(str(uuid.uuid4()), "reset", TARGET))  # a captured signature of another task
    with pytest.raises(AuthorizationDenied):
        reset(operator_headers(str(uuid.uuid4()), "reset", "*"), task_id=None)
    with pytest.raises(AuthorizationDenied):
        reset(operator_headers(str(uuid.uuid4()), "reset", TARGET, key="wrong-key-0123456789"))
    assert fleet.state()["state"] == "open"
    task_id = str(uuid.uuid4())
    rows = reset(operator_headers(task_id, "reset", TARGET), task_id=task_id)
    assert [row["state"] for row in rows] == ["closed"]
    assert fleet.state().get("state", "closed") == "closed"
