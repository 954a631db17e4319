"""Token canary: users' tokens (good, refused and malformed) are found nowhere they should not be.

A fleet of its own (Redis with AOF on, a worker in the default mode, a worker that accepts clear tokens,
Flower) carries out invocations with canary tokens over every transport and every error path, then
every place a token could leak to is scanned: every Redis key (queues, unacked messages, results,
streams), the AOF files on disk, Flower's API and HTML pages, and the logs of the workers and Flower.
"""

from __future__ import annotations

import base64
import json
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from celery import Celery

from devkit.gateway import make_token
from devkit.stack import DEFAULT_JWT_SECRET, DevStack, Proc, _spawn, free_port, start_redis, wait_for
from tests.helpers import redis_values, settings_with, token_headers
from workers.contract import TASK_INVOKE, TOKEN_HEADER
from workers.errors import SarkError

MARK = "CANARYtok7f3a"  # in every non-JWT canary token sent sealed
CLEAR_MARK = "CLEARtok9b2c"  # in every non-JWT canary token an app sends in clear
SUBJECT = "canary-sub-7f3a"  # the subject of the JWT canaries
FLOWER_AUTH = ("ops", "canary-flower-password")
QUEUES = {"SARK_QUEUE_HTTP": "canary.http", "SARK_QUEUE_SSE": "canary.sse", "SARK_QUEUE_STDIO": "canary.stdio"}


def _segment(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt_without_exp() -> str:
    return jwt.encode({"sub": SUBJECT, "teams": ["users"]}, DEFAULT_JWT_SECRET, algorithm="HS256")


def _jwt_huge_exp(mark: str) -> str:
    header = _segment(b'{"alg":"HS256"}')
    payload = ('{"sub": "' + SUBJECT + mark + '", "exp": 1' + "0" * 400 + "}").encode()
    return f"{header}.{_segment(payload)}.{mark}sig"


def _malformed(mark: str) -> dict[str, str]:
    return {
        "trailing newline": mark + "\n",
        "CR LF header injection": mark + "\r\nX-Injected: 1",
        "NUL": mark + "\x00",
        "non-ASCII": mark + "\u00e9\u2603",
        "1 MB": mark + "A" * 1_048_576,
        "three dots and garbage": mark + "...garbage",
        "exp = 10**400": _jwt_huge_exp(mark),
    }


@dataclass
class Canary:
    """The canary fleet and every token it was given."""

    stack: DevStack
    redis: Proc
    aof_dir: Path
    flower_url: str
    flower: Proc
    workers: list[Proc]
    app: Celery
    sealed: list[str] = field(default_factory=list)
    clear: list[str] = field(default_factory=list)
    task_ids: list[str] = field(default_factory=list)

    def send(self, server: str, tool: str, arguments: dict[str, Any], token: str | None, *, sealed: bool = True,
             queue: str | None = None, stream: bool = False) -> Any:
        task_id = str(uuid.uuid4())
        invocation: dict[str, Any] = {"server": server, "tool": tool, "arguments": arguments}
        if stream:
            invocation["stream"] = True
        if token is None:
            headers = None
        elif sealed:
            headers = token_headers(token, task_id, key=self.stack.token_key)
        else:
            headers = {TOKEN_HEADER: token}
        if token:
            (self.sealed if sealed else self.clear).append(token)
        self.task_ids.append(task_id)
        options = {"queue": queue} if queue else {}
        return self.app.send_task(TASK_INVOKE, task_id=task_id, kwargs={"invocation": invocation}, headers=headers,
                                  **options)

    def needles(self, *, clear: bool = True) -> list[str]:
        """What must be found: each token whole, each JWT's payload and signature, the markers.

        ``clear=False``: only the tokens sent sealed (an app that hands the broker a clear token puts it
        in the broker's AOF itself, before any worker can refuse it).
        """
        found = {MARK, CLEAR_MARK} if clear else {MARK}
        for token in self.sealed + (self.clear if clear else []):
            parts = token.split(".")
            found.update(p for p in ([token] + (parts[1:] if len(parts) == 3 else [])) if len(p) >= 12)
        return sorted(found, key=len)


def _flower(stack: DevStack, env: dict[str, str]) -> tuple[Proc, str]:
    port = free_port()
    argv = [sys.executable, "-m", "celery", "-A", "workers.app", "flower", f"--port={port}", "--address=127.0.0.1",
            f"--basic-auth={FLOWER_AUTH[0]}:{FLOWER_AUTH[1]}", "--persistent=False"]
    proc = _spawn(f"flower-canary-{port}", argv, stack.log_dir, env)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(f"{url}/healthcheck", timeout=1).status_code == 200, 30, "flower")
    return proc, url


@pytest.fixture(scope="module")
def canary(stack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Canary]:
    workdir = tmp_path_factory.mktemp("canary")
    aof_dir = workdir / "redis-data"
    rds = start_redis(stack.log_dir, appendonly=True, data_dir=aof_dir)
    env = {"SARK_BROKER_URL": rds.url, "SARK_REDIS_URL": rds.url, **QUEUES}
    queues = ",".join(QUEUES.values())
    procs: list[Proc] = [rds]
    try:
        workers = [stack.worker("canary", env=env, queues=queues, concurrency=4),
                   stack.worker("canary-clear", env={**env, "SARK_ALLOW_CLEAR_TOKENS": "true"},
                                queues="canary.clear", concurrency=2)]
        procs += workers
        flower, url = _flower(stack, {**stack.base_env(), **env})
        procs.append(flower)
        from workers.app import create_app

        app = create_app(settings_with(env))
        fleet = Canary(stack, rds, aof_dir, url, flower, workers, app)

        def flower_sees_tasks() -> bool:  # Flower subscribes to events a moment after it answers HTTP
            probe = fleet.send("time", "get_current_time", {"timezone": "UTC"}, None)
            probe.get(timeout=60)
            tasks = httpx.get(f"{url}/api/tasks", auth=FLOWER_AUTH, timeout=5).json()
            time.sleep(0.5)
            tasks = httpx.get(f"{url}/api/tasks", auth=FLOWER_AUTH, timeout=5).json()
            return tasks.get(probe.id, {}).get("state") == "SUCCESS"

        wait_for(flower_sees_tasks, 60, "flower receiving task events", interval=0.2)
        yield fleet
        app.close()
    finally:
        for proc in reversed(procs):
            proc.stop()
            if proc in stack.procs:
                stack.procs.remove(proc)


def _flower_pages(fleet: Canary) -> dict[str, str]:
    def get(path: str) -> str:
        return httpx.get(f"{fleet.flower_url}{path}", auth=FLOWER_AUTH, timeout=10).text

    pages = {"/api/tasks": get("/api/tasks"), "/tasks": get("/tasks"), "/api/workers": get("/api/workers")}
    for task_id in fleet.task_ids:
        pages[f"/api/task/info/{task_id}"] = get(f"/api/task/info/{task_id}")
        pages[f"/task/{task_id}"] = get(f"/task/{task_id}")
    return pages


def test_token_canary_found_nowhere(canary: Canary, user_token: str) -> None:
    good = make_token(DEFAULT_JWT_SECRET, sub=SUBJECT, teams=["users"])
    good_in_clear = make_token(DEFAULT_JWT_SECRET, sub=SUBJECT + "-clear", teams=["users"])
    expired = make_token(DEFAULT_JWT_SECRET, sub=SUBJECT, ttl=-60)
    pending = [
        canary.send("echo", "add", {"a": 1, "b": 2}, good),  # http, succeeds
        canary.send("restricted", "echo", {"why": "denied"}, good),  # http, 403 naming the subject
        canary.send("echo", "add", {"a": 1, "b": 2}, expired),  # refused at dequeue
        canary.send("echo", "add", {"a": 1, "b": 2}, MARK + "-opaque"),  # opaque: the Gateway says 401
        canary.send("echo", "add", {"a": 1, "b": 2}, _jwt_without_exp()),  # no exp: the Gateway accepts it
        canary.send("echo-stream", "stream_data", {"count": 3}, good, stream=True),  # sse stream
        canary.send("time", "get_current_time", {"timezone": "UTC"}, good),  # stdio (no policy)
        canary.send("time-admins", "get_current_time", {"timezone": "UTC"}, good),  # stdio policy: denied
        canary.send("echo", "add", {"a": 1, "b": 2}, good_in_clear, sealed=False),  # clear: refused by default
    ]
    malformed = _malformed(MARK)
    for name, token in malformed.items():
        pending.append(canary.send("echo", "add", {"case": name}, token))  # sealed by a careless app
    for name, token in _malformed(CLEAR_MARK).items():  # clear, to a worker that accepts clear tokens
        pending.append(canary.send("echo", "add", {"case": name}, token, sealed=False, queue="canary.clear"))
    outcomes: dict[str, int] = {}
    for result in pending:
        try:
            result.get(timeout=60)
            outcome = "ok"
        except SarkError as exc:
            outcome = type(exc).__name__
            assert MARK not in exc.message and CLEAR_MARK not in exc.message
            assert SUBJECT not in json.dumps(exc.detail)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    # Refused at dequeue: 6 malformed x 2 (three dots and garbage is well-formed: the Gateway says 401), the
    # clear token sent to a default worker.
    assert outcomes.get("InvalidToken", 0) == 2 * (len(malformed) - 1) + 1
    assert all(worker.alive() for worker in canary.workers)
    time.sleep(2.5)  # AOF fsync is once a second; Flower events arrive asynchronously

    needles, sealed_needles = canary.needles(), canary.needles(clear=False)
    places: dict[str, dict[str, str | bytes]] = {
        "redis keys (queues, unacked, results, streams)": redis_values(canary.redis.url),
        "AOF files on disk": {str(p): p.read_bytes() for p in canary.aof_dir.rglob("*") if p.is_file()},
        "Flower API and pages": dict(_flower_pages(canary)),
        "worker and Flower logs": {w.name: w.log() for w in [*canary.workers, canary.flower]},
    }
    hits: dict[str, list[str]] = {}
    for place, items in places.items():
        for where, text in items.items():
            blob = text if isinstance(text, bytes) else text.encode("utf-8", "replace")
            for needle in sealed_needles if place.startswith("AOF") else needles:
                if needle.encode() in blob:
                    hits.setdefault(place, []).append(f"{where}: {needle[:24]}…")
    flower_text = "".join(str(v) for v in places["Flower API and pages"].values())
    if SUBJECT in flower_text:
        hits.setdefault("Flower API and pages", []).append("the user's subject")
    print(f"\nTOKEN CANARY: {len(pending)} invocations, {len(canary.sealed)} sealed + {len(canary.clear)} clear "
          f"tokens, outcomes {outcomes}")
    for place, items in places.items():
        print(f"  {place}: {len(items)} scanned, {len(hits.get(place, []))} hits")
    assert len(places["AOF files on disk"]) >= 1 and sum(len(v) for v in places["AOF files on disk"].values()) > 0
    assert hits == {}
