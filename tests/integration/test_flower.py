"""Flower out of the box: it sees the invocations a real worker ran as ``server.tool(argument names)``, with
results and errors summarised, and never a token, an argument value or an error's text (nor does the
worker's INFO log); ``SARK_SHOW_TASK_DETAILS=true`` shows the values, scrubbed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from celery import Celery

from devkit.stack import FLOWER_TASKS_COLUMNS, DevStack, Proc, _spawn, free_port, wait_for
from tests.helpers import send_invoke, token_headers
from workers.contract import TASK_INVOKE
from workers.errors import AuthorizationDenied

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
AUTH = ("ops", "flower-test-password")
#: An argument value each test looks for where it must not be.
VALUE = "value-canary-9f3b"


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


SUMMARY = re.compile(r"^InvocationResult\(is_error=(True|False), \d+ bytes\)$")
ERROR = re.compile(r"^\w+\(\w+\)$")  # Type(code), e.g. AuthorizationDenied(authorization_denied)


def _api_tasks(flower: str) -> dict[str, Any]:
    tasks: dict[str, Any] = httpx.get(f"{flower}/api/tasks", auth=AUTH, timeout=5).json()
    return tasks


def _wait_done(flower: str, ids: set[str]) -> None:
    def all_seen() -> bool:
        tasks = _api_tasks(flower)
        return ids <= set(tasks) and all(tasks[i]["state"] in ("SUCCESS", "FAILURE") for i in ids)

    wait_for(all_seen, 30, "tasks in Flower")


def _everything_flower_shows(flower: str, task_id: str) -> str:
    """The task as Flower's list API, its task API and its HTML task page show it."""
    pages = ["/api/tasks", f"/api/task/info/{task_id}", f"/task/{task_id}"]
    return "\n".join(httpx.get(f"{flower}{page}", auth=AUTH, timeout=5).raise_for_status().text for page in pages)


def test_flower_shows_invocations_without_tokens(flower: str, celery_client: Celery) -> None:
    secret = "eyJhbGciOiJIUzI1NiJ9.flower-canary-token.c2lnbmF0dXJl"
    from devkit.gateway import make_token
    from devkit.stack import DEFAULT_JWT_SECRET

    token = make_token(DEFAULT_JWT_SECRET, sub="flower-canary")
    pendings = [send_invoke(celery_client, "echo", "add", {"a": i, "b": 1}, token=token) for i in range(3)]
    failing = send_invoke(celery_client, "restricted", "echo", {"why": "denied"}, token=secret)
    for pending in pendings:
        pending.get(timeout=30)
    with pytest.raises(Exception):  # noqa: B017 - any error: we only need it recorded in Flower
        failing.get(timeout=30)
    ids = {p.id for p in [*pendings, failing]}
    _wait_done(flower, ids)
    response = httpx.get(f"{flower}/api/tasks", auth=AUTH, timeout=5)
    tasks = response.json()
    for pending in pendings:
        task = tasks[pending.id]
        assert task["name"] == "sark.invoke"
        assert task["state"] == "SUCCESS"
        assert (task["args"], task["kwargs"]) == ("()", "echo.add(a, b)")
        assert SUMMARY.match(task["result"]), task["result"]
    assert tasks[failing.id]["state"] == "FAILURE"
    assert tasks[failing.id]["kwargs"] == "restricted.echo(why)"
    assert ERROR.match(tasks[failing.id]["exception"]), tasks[failing.id]["exception"]
    assert not tasks[failing.id]["traceback"]
    for one_id in ids:
        detail = httpx.get(f"{flower}/api/task/info/{one_id}", auth=AUTH, timeout=5).text
        assert token not in detail and secret not in detail
    assert token not in response.text and secret not in response.text
    assert httpx.get(f"{flower}/api/tasks", timeout=5).status_code == 401  # auth is on


def test_flower_shows_names_not_values_nor_error_text(flower: str, celery_client: Celery, user_token: str) -> None:
    """Argument values, result values, the user's subject in an error: none reaches Flower's API or pages."""
    shown = send_invoke(celery_client, "echo", "echo", {"text": VALUE, "count": 7}, token=user_token)
    assert VALUE in str(shown.get(timeout=30))  # the caller still gets the whole result
    denied = send_invoke(celery_client, "restricted", "echo", {"why": VALUE}, token=user_token)
    with pytest.raises(AuthorizationDenied, match="alice"):  # the caller still gets the whole error
        denied.get(timeout=30)
    _wait_done(flower, {shown.id, denied.id})
    tasks = _api_tasks(flower)
    assert tasks[shown.id]["kwargs"] == "echo.echo(text, count)"
    assert SUMMARY.match(tasks[shown.id]["result"]), tasks[shown.id]["result"]
    assert tasks[denied.id]["kwargs"] == "restricted.echo(why)"
    assert tasks[denied.id]["exception"] == "AuthorizationDenied(authorization_denied)"
    for task_id, names in ((shown.id, "echo.echo(text, count)"), (denied.id, "restricted.echo(why)")):
        text = _everything_flower_shows(flower, task_id)
        assert names in text
        for leak in (VALUE, "alice", "not in a team", user_token, "Traceback"):
            assert leak not in text, f"{leak!r} shown by Flower for {task_id}"


def test_worker_info_log_holds_no_values(flower: str, worker: Proc, celery_client: Celery, user_token: str) -> None:
    """The worker's INFO lines name the invocation and summarise its end; no argument or result value."""
    value = "log-canary-5cd1e0"
    done = send_invoke(celery_client, "echo", "echo", {"text": value}, token=user_token)
    done.get(timeout=30)
    denied = send_invoke(celery_client, "restricted", "echo", {"why": value}, token=user_token)
    with pytest.raises(AuthorizationDenied):
        denied.get(timeout=30)
    _wait_done(flower, {done.id, denied.id})  # the worker has logged both ends by now

    log = worker.log()
    lines = [line for line in log.splitlines() if done.id in line or denied.id in line]
    assert any("succeeded" in line and "InvocationResult(is_error=False" in line for line in lines), lines
    assert any("AuthorizationDenied(authorization_denied)" in line for line in lines), lines
    assert any("echo.echo(text)" in line for line in lines), lines  # the `received` line's data
    for leak in (value, "alice", "not in a team", user_token):
        assert leak not in log, f"{leak!r} in the worker log"


def test_inspect_shows_names_not_values(worker: Proc, celery_client: Celery, user_token: str) -> None:
    """``inspect active``/``query_task`` (Flower's worker page) answer with names, though asked unsafe."""
    running = send_invoke(celery_client, "echo", "sleep", {"seconds": 2.5}, token=user_token)
    inspect = celery_client.control.inspect(timeout=2)
    found: list[dict[str, Any]] = []

    def active() -> bool:
        replies = inspect.active(safe=False) or {}
        found[:] = [t for tasks in replies.values() for t in tasks if t["id"] == running.id]
        return bool(found)

    wait_for(active, 20, "the invocation running", interval=0.1)
    queried = inspect.query_task(running.id) or {}
    infos = [info for reply in queried.values() for _state, info in reply.values()]
    running.get(timeout=30)
    assert infos
    for info in [*found, *infos]:
        assert (info["args"], info["kwargs"]) == ("()", "echo.sleep(seconds)"), info


def _send_to(app: Celery, queue: str, server: str, arguments: dict[str, Any], token: str) -> Any:
    task_id = str(uuid.uuid4())
    invocation = {"server": server, "tool": "echo", "arguments": arguments}
    return app.send_task(TASK_INVOKE, task_id=task_id, kwargs={"invocation": invocation},
                         headers=token_headers(token, task_id), queue=queue)


def test_prefork_worker_shows_the_same(stack: DevStack, flower: str, celery_client: Celery, user_token: str) -> None:
    """Celery's default pool: results are summarised in the child, errors reach the parent pickled."""
    queue = "sark.prefork"
    proc = stack.worker("prefork", queues=queue, pool="prefork", concurrency=1)
    shown = _send_to(celery_client, queue, "echo", {"text": VALUE}, user_token)
    assert VALUE in str(shown.get(timeout=30))
    denied = _send_to(celery_client, queue, "restricted", {"why": VALUE}, user_token)
    with pytest.raises(AuthorizationDenied):
        denied.get(timeout=30)
    _wait_done(flower, {shown.id, denied.id})
    tasks = _api_tasks(flower)
    assert tasks[shown.id]["kwargs"] == "echo.echo(text)"
    assert SUMMARY.match(tasks[shown.id]["result"]), tasks[shown.id]["result"]
    assert tasks[denied.id]["exception"] == "AuthorizationDenied(authorization_denied)"
    for task_id in (shown.id, denied.id):
        text = _everything_flower_shows(flower, task_id)
        assert VALUE not in text and "alice" not in text
    assert VALUE not in proc.log() and "alice" not in proc.log()


def test_show_task_details_shows_scrubbed_values(stack: DevStack, flower: str, celery_client: Celery,
                                                 user_token: str) -> None:
    """``SARK_SHOW_TASK_DETAILS=true``: Flower shows values and error text, still without secrets."""
    queue = "sark.details"
    stack.worker("details", queues=queue, concurrency=2, env={"SARK_SHOW_TASK_DETAILS": "true"})
    jwt_shaped = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJkZXRhaWxzIn0.details-canary-signature"
    shown = _send_to(celery_client, queue, "echo", {"text": VALUE, "note": jwt_shaped}, user_token)
    shown.get(timeout=30)
    denied = _send_to(celery_client, queue, "restricted", {"why": VALUE}, user_token)
    with pytest.raises(AuthorizationDenied):
        denied.get(timeout=30)
    _wait_done(flower, {shown.id, denied.id})
    tasks = _api_tasks(flower)
    assert VALUE in tasks[shown.id]["kwargs"] and VALUE in tasks[shown.id]["result"]
    assert "not in a team" in tasks[denied.id]["exception"]
    for task_id in (shown.id, denied.id):
        text = _everything_flower_shows(flower, task_id)
        assert jwt_shaped not in text and user_token not in text
    assert "[REDACTED]" in tasks[shown.id]["kwargs"]


def test_flower_tasks_page_screenshot(stack: DevStack, flower: str, celery_client: Celery, user_token: str) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium missing: scripts/bootstrap.sh installs it")
        pytest.skip("chromium not installed (scripts/bootstrap.sh installs it)")
    # Headless Chromium sends no user:password@ credentials with the page's own requests (Flower fills its task
    # table by XHR), so the picture is taken of a second Flower of the same broker, on loopback, without auth,
    # with the task columns compose and `sark up` configure.
    port = free_port()
    argv = [sys.executable, "-m", "celery", "-A", "workers.app", "flower", f"--port={port}", "--address=127.0.0.1",
            "--persistent=False"]
    proc = _spawn(f"flower-open-{port}", argv, stack.log_dir,
                  {**stack.base_env(), "FLOWER_TASKS_COLUMNS": FLOWER_TASKS_COLUMNS,
                   "FLOWER_UNAUTHENTICATED_API": "true"})
    page = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{page}/healthcheck", timeout=1).status_code == 200, 30, "flower")

        def listed() -> bool:  # Flower sees the tasks sent once it listens to events
            send_invoke(celery_client, "echo", "echo", {"page": "value-never-shown-41"},
                        token=user_token).get(timeout=30)
            time.sleep(1.0)
            return "echo.echo(page)" in httpx.get(f"{page}/api/tasks", timeout=5).text

        wait_for(listed, 40, "flower listing the task", interval=0.1)
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "flower-tasks.png"
        shot.unlink(missing_ok=True)
        browse = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  f"--user-data-dir={ARTIFACTS / 'chromium-profile'}", "--window-size=1400,900",
                  "--virtual-time-budget=8000"]
        subprocess.run([*browse, f"--screenshot={shot}", f"{page}/tasks"], check=True, timeout=90, capture_output=True)
        assert shot.exists() and shot.stat().st_size > 10_000
        # The page as the browser rendered it: the task list names what ran (server.tool(argument names)).
        dom = subprocess.run([*browse, "--dump-dom", f"{page}/tasks"], check=True, timeout=90, capture_output=True,
                             text=True).stdout
        tables = dom[dom.find("<table"):dom.rfind("</table>") + 8]  # scrolling splits header and rows apart
        assert ">kwargs<" in tables.lower() and ">echo.echo(page)<" in tables, tables
        assert "value-never-shown-41" not in dom and user_token not in dom
    finally:
        proc.stop()
