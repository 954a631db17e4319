"""Flower out of the box: it sees the invocations a real worker ran, with readable names and no tokens."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from celery import Celery

from tests.helpers import send_invoke
from workers.devstack import DevStack, Proc, _spawn, free_port, wait_for

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
AUTH = ("ops", "flower-test-password")


def _wait_until_flower_listens(url: str, app: Celery, token: str) -> None:
    """Flower subscribes to events a moment after it answers HTTP: probe until it records a whole task."""

    def probe_seen() -> bool:
        probe = send_invoke(app, "echo", "echo", {"probe": True}, token=token)
        probe.get(timeout=30)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            task = httpx.get(f"{url}/api/tasks", auth=AUTH, timeout=5).json().get(probe.id)
            if task and task.get("name") == "sark.invoke" and task.get("state") == "SUCCESS":
                return True
            time.sleep(0.1)
        return False

    wait_for(probe_seen, 40, "flower receiving task events", interval=0.1)


@pytest.fixture(scope="module")
def flower(stack: DevStack, worker: Proc, celery_client: Celery, user_token: str) -> Iterator[str]:
    port = free_port()
    argv = [sys.executable, "-m", "celery", "-A", "workers.app", "flower", f"--port={port}",
            "--address=127.0.0.1", f"--basic-auth={AUTH[0]}:{AUTH[1]}", "--persistent=False"]
    proc = _spawn(f"flower-{port}", argv, stack.log_dir, stack.base_env())
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/healthcheck", timeout=1).status_code == 200, 30, "flower")
        _wait_until_flower_listens(url, celery_client, user_token)
        yield url
    finally:
        proc.stop()


def test_flower_shows_invocations_without_tokens(flower: str, celery_client: Celery) -> None:
    secret = "eyJhbGciOiJIUzI1NiJ9.flower-canary-token.c2lnbmF0dXJl"
    from workers.devstack import DEFAULT_JWT_SECRET
    from workers.gateway import make_token

    token = make_token(DEFAULT_JWT_SECRET, sub="flower-canary")
    pendings = [send_invoke(celery_client, "echo", "add", {"a": i, "b": 1}, token=token) for i in range(3)]
    failing = send_invoke(celery_client, "restricted", "echo", {"why": "denied"}, token=secret)
    for pending in pendings:
        pending.get(timeout=30)
    with pytest.raises(Exception):  # noqa: B017 - any error: we only need it recorded in Flower
        failing.get(timeout=30)
    ids = {p.id for p in [*pendings, failing]}

    def all_seen() -> bool:
        tasks = httpx.get(f"{flower}/api/tasks", auth=AUTH, timeout=5).json()
        return ids <= set(tasks) and all(tasks[i]["state"] in ("SUCCESS", "FAILURE") for i in ids)

    wait_for(all_seen, 30, "tasks in Flower")
    response = httpx.get(f"{flower}/api/tasks", auth=AUTH, timeout=5)
    tasks = response.json()
    for pending in pendings:
        task = tasks[pending.id]
        assert task["name"] == "sark.invoke"
        assert task["state"] == "SUCCESS"
        assert "'server': 'echo'" in task["kwargs"]
    assert tasks[failing.id]["state"] == "FAILURE"
    assert "invalid token" in tasks[failing.id]["exception"]  # the Gateway refused the canary
    for one_id in ids:
        detail = httpx.get(f"{flower}/api/task/info/{one_id}", auth=AUTH, timeout=5).text
        assert token not in detail and secret not in detail
    assert token not in response.text and secret not in response.text
    assert httpx.get(f"{flower}/api/tasks", timeout=5).status_code == 401  # auth is on


def test_flower_tasks_page_screenshot(flower: str, celery_client: Celery, user_token: str) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium missing: scripts/bootstrap.sh installs it")
        pytest.skip("chromium not installed (scripts/bootstrap.sh installs it)")
    send_invoke(celery_client, "echo", "echo", {"page": "tasks"}, token=user_token).get(timeout=30)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "flower-tasks.png"
    shot.unlink(missing_ok=True)
    host = flower.removeprefix("http://")
    argv = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={ARTIFACTS / 'chromium-profile'}", "--window-size=1400,900",
            "--virtual-time-budget=8000", f"--screenshot={shot}", f"http://{AUTH[0]}:{AUTH[1]}@{host}/tasks"]
    subprocess.run(argv, check=True, timeout=90, capture_output=True)
    assert shot.exists() and shot.stat().st_size > 10_000
