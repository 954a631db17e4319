"""Shared measuring helpers: percentiles, closed-loop latency, bounded-concurrency throughput."""

from __future__ import annotations

import json
import statistics
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery
from celery.result import AsyncResult

RESULTS = Path(__file__).with_name("results")


class EchoCall:
    """The one call the HTTP benchmarks compare: ``echo.echo(x=1)`` on the stack's reference Gateway, as a
    sark invocation (``invocation``, sent with ``token``) and as the bare task's raw POST (``post_args``)."""

    def __init__(self, gateway_url: str) -> None:
        from devkit.gateway import make_token
        from devkit.stack import DEFAULT_API_KEY, DEFAULT_JWT_SECRET

        self.invocation: dict[str, Any] = {"server": "echo", "tool": "echo", "arguments": {"x": 1}}
        self.token = make_token(DEFAULT_JWT_SECRET)
        payload = {"server_id": "echo", "tool_name": "echo", "parameters": {"x": 1}, "request_id": "bench"}
        headers = {"Authorization": f"Bearer {self.token}", "X-API-Key": DEFAULT_API_KEY}
        #: ``bench.bare_app.post``'s arguments: the same call as a plain HTTP POST.
        self.post_args = (f"{gateway_url}/invoke", payload, headers)


def send_invocation(app: Celery, invocation: dict[str, Any], token: str, **options: Any) -> AsyncResult:
    """``sark.invoke`` as an app sends it by default: the token sealed for this task (SARK_TOKEN_KEY)."""
    import os
    import uuid

    from workers.contract import TASK_INVOKE, TOKEN_HEADER
    from workers.tokens import seal_token

    task_id = str(uuid.uuid4())
    header = seal_token(token, os.environ["SARK_TOKEN_KEY"], task_id)
    return app.send_task(TASK_INVOKE, task_id=task_id, kwargs={"invocation": invocation},
                         headers={TOKEN_HEADER: header}, **options)


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    """p50/p95/p99 and mean of ``samples_ms``."""
    ordered = sorted(samples_ms)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99), "mean": round(statistics.fmean(ordered), 3),
            "n": len(ordered)}


def timed(fn: Callable[[], Any]) -> float:
    """Wall time of ``fn()`` in ms."""
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def round_trip(send: Callable[[], AsyncResult], timeout: float = 30) -> Callable[[], float]:
    """A measurement: send one task and wait for its result; returns ms."""
    return lambda: timed(lambda: send().get(timeout=timeout))


def interleaved(
    calls: dict[str, Callable[[], float]], n: int, warmup: int = 20, gap_ms: float = 0.0
) -> dict[str, dict[str, float]]:
    """Several kinds of call (each returns its own duration in ms), one at a time, in rotating order.

    Each round makes one call of every kind, the first kind changing from round to round, so that
    the machine's drift (this one is noisy) hits every figure alike; ``gap_ms`` of quiet precede each
    call. Returns percentiles per kind.
    """
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + n):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            if gap_ms:
                time.sleep(gap_ms / 1000)
            took = calls[name]()
            if i >= warmup:
                samples[name].append(took)
    return {name: percentiles(values) for name, values in samples.items()}


def alternating_throughput(
    sends: dict[str, Callable[[], AsyncResult]], n: int, rounds: int = 3, in_flight: int = 32
) -> dict[str, float]:
    """Calls per second of each kind, measured in alternating rounds of ``n``; the median round per kind."""
    rates: dict[str, list[float]] = {name: [] for name in sends}
    for i in range(rounds):
        for name in sends if i % 2 == 0 else reversed(list(sends)):
            rates[name].append(throughput(sends[name], n, in_flight=in_flight))
    return {name: statistics.median(values) for name, values in rates.items()}


def throughput(send: Callable[[], AsyncResult], n: int, in_flight: int = 32, timeout: float = 60) -> float:
    """Completed calls per second with ``in_flight`` outstanding at any time."""
    pending: deque[AsyncResult] = deque()
    started = time.perf_counter()
    sent = 0
    done = 0
    while done < n:
        while sent < n and len(pending) < in_flight:
            pending.append(send())
            sent += 1
        pending.popleft().get(timeout=timeout)
        done += 1
    return round(n / (time.perf_counter() - started), 1)


def ratio(value: float, floor: float) -> float:
    """``value / floor`` rounded for tables."""
    return round(value / floor, 2) if floor else float("inf")


def save(name: str, data: dict[str, Any]) -> Path:
    """Write ``data`` as ``bench/results/<name>.json``."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def table(rows: list[tuple[str, dict[str, float] | float, dict[str, float] | float]]) -> str:
    """A text table of (what, measured, floor) rows."""
    lines = [f"{'what':44} {'measured':>30} {'floor (same run)':>30} {'ratio p95':>9}"]
    for what, measured, floor in rows:
        if isinstance(measured, dict) and isinstance(floor, dict):
            m = f"p50 {measured['p50']:.2f} p95 {measured['p95']:.2f} p99 {measured['p99']:.2f}"
            f = f"p50 {floor['p50']:.2f} p95 {floor['p95']:.2f} p99 {floor['p99']:.2f}"
            lines.append(f"{what:44} {m:>30} {f:>30} {ratio(measured['p95'], floor['p95']):>9}")
        else:
            lines.append(f"{what:44} {measured!s:>30} {floor!s:>30} {ratio(float(measured), float(floor)):>9}")  # type: ignore[arg-type]
    return "\n".join(lines)
