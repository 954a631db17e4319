"""A transport is one module plus one entry (issue 14): a toy transport defined only in tests/toy_transport.py,
named by ``SARK_TRANSPORT_PLUGINS``, is routed to its own queue, built by a real worker (which builds
nothing else), guarded by its own fleet-wide breaker, checked by check-config and listed by the CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from config.transports import PLUGINS_VARIABLE
from devkit.stack import DevStack, Proc
from tests.helpers import clients_configured, invoke, settings_with
from workers.errors import CircuitOpen, NotServedHere, TransportError
from workers.streams import reader as stream_client

REPO = Path(__file__).resolve().parents[2]
REGISTRY = """
servers:
  greeter:
    transport: toy
    greeting: hi
    breaker: {fail_max: 2, reset_timeout: 60}
  time:
    transport: stdio
    command: "{bin}/mcp-server-time"
"""


@pytest.fixture()
def toy_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    registry = tmp_path / "servers.yaml"
    registry.write_text(REGISTRY)
    with clients_configured({PLUGINS_VARIABLE: "tests.toy_transport", "SARK_REGISTRY_PATH": str(registry)}) as env:
        yield env


@pytest.fixture()
def toy_worker(stack: DevStack, toy_env: dict[str, str]) -> Iterator[Proc]:
    with stack.running_worker("toy", env=toy_env, queues="sark.toy", concurrency=2) as proc:
        yield proc


@pytest.fixture()
def toy_app(toy_env: dict[str, str]) -> Iterator[Celery]:
    from workers.app import create_app

    app = create_app(settings_with(toy_env))
    yield app
    app.close()


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "workers.cli", *args], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env={**os.environ, **env})


def test_the_toy_transport_is_routed_built_and_answers(toy_worker: Proc, toy_app: Celery) -> None:
    route = toy_app.amqp.router.route({}, "sark.invoke", (), {"invocation": {"server": "greeter", "tool": "greet"}})
    assert route["queue"].name == "sark.toy"
    result = invoke(toy_app, "greeter", "greet", {"name": "ada"})
    assert result["transport"] == "toy"
    assert result["result"]["content"][0]["text"] == f"hi, ada (pid {toy_worker.popen.pid})"
    health = toy_app.send_task("sark.health", queue="sark.toy").get(timeout=30)
    assert health["transports"] == ["toy"]  # the worker of the toy queue built nothing else
    tools = toy_app.send_task("sark.list_tools", kwargs={"server": "greeter"}, queue="sark.toy").get(timeout=30)
    assert [t["tool_name"] for t in tools] == ["greet", "fail"]


def _children(proc: Proc) -> str:
    return subprocess.run(["ps", "-o", "args=", "--ppid", str(proc.popen.pid)], capture_output=True, text=True).stdout


def test_a_stdio_task_sent_to_the_toy_worker_is_forwarded_to_its_queue_without_starting_a_server_there(
    toy_worker: Proc, worker: Proc, toy_app: Celery
) -> None:
    # Sent to the toy queue by hand: the toy worker builds no stdio transport; it forwards the task (same id)
    # to the stdio queue, where the session's worker (stdio queue, the session registry's `time`) answers.
    sent = toy_app.send_task("sark.invoke", kwargs={"invocation": {
        "server": "time", "tool": "get_current_time", "arguments": {"timezone": "UTC"}}}, queue="sark.toy")
    result = sent.get(timeout=60)
    assert result["transport"] == "stdio" and result["request_id"] == sent.id
    assert result["attempt"] == 1  # the toy worker's start was taken back: not a redelivery
    assert "forwarded to sark.stdio" in toy_worker.log()
    assert "mcp-server-time" not in _children(toy_worker)


def test_a_forwarded_task_that_misses_again_fails_typed(toy_worker: Proc, toy_app: Celery) -> None:
    sent = toy_app.send_task("sark.invoke", kwargs={"invocation": {
        "server": "time", "tool": "get_current_time", "stream": True}},
        queue="sark.toy", headers={"sark_forwarded": "sark.stdio"})
    with pytest.raises(NotServedHere, match="not served by this worker") as caught:
        sent.get(timeout=60)
    assert caught.value.detail["queue"] == "sark.stdio"
    with pytest.raises(NotServedHere):  # its stream ends with the same error, not left open
        list(stream_client.stream(sent.id, idle_timeout=20))
    assert "mcp-server-time" not in _children(toy_worker)


def test_a_queue_added_to_a_running_worker_gets_its_transport(stack: DevStack, toy_env: dict[str, str]) -> None:
    # `celery control add_consumer`: the worker was started for the toy queue only; once told to consume the
    # (here private) stdio queue too, a stdio invocation arriving there is carried out by it.
    from workers.app import create_app

    env = {**toy_env, "SARK_QUEUE_STDIO": "sark.stdio.added"}
    app = create_app(settings_with(env))
    try:
        with stack.running_worker("toy-added", env=env, queues="sark.toy", concurrency=1) as proc:
            replies = app.control.add_consumer("sark.stdio.added", destination=[f"toy-added@{socket.gethostname()}"],
                                               reply=True,
                                               timeout=10)
            assert replies and "ok" in next(iter(replies[0].values())), replies
            result = invoke(app, "time", "get_current_time", {"timezone": "UTC"})
            assert result["transport"] == "stdio"
            assert "queue sark.stdio.added was added: building transport(s) stdio" in proc.log()
    finally:
        app.close()


def test_the_toy_transport_has_its_own_fleet_wide_breaker(toy_worker: Proc, toy_app: Celery,
                                                          toy_env: dict[str, str]) -> None:
    reset = _cli(toy_env, "breakers", "reset", "toy:greeter")
    assert reset.returncode == 0, reset.stderr
    for _ in range(2):
        with pytest.raises(TransportError, match="unreachable"):
            invoke(toy_app, "greeter", "fail")
    with pytest.raises(CircuitOpen):
        invoke(toy_app, "greeter", "greet")
    listed = _cli(toy_env, "breakers", "list")
    assert "toy:greeter" in listed.stdout and "open" in listed.stdout, listed.stdout
    assert _cli(toy_env, "breakers", "reset", "toy:greeter").returncode == 0
    assert invoke(toy_app, "greeter", "greet")["result"]["content"][0]["text"].startswith("hi, world")


def test_the_cli_lists_and_checks_the_toy_transport(toy_env: dict[str, str], tmp_path: Path) -> None:
    listed = _cli(toy_env, "transports", "--json")
    assert listed.returncode == 0, listed.stderr
    toy = next(row for row in json.loads(listed.stdout) if row["name"] == "toy")
    assert toy["queue"] == "sark.toy" and toy["servers"] == ["greeter"]
    assert _cli(toy_env, "check-config").returncode == 0
    silent = tmp_path / "silent.yaml"
    silent.write_text("servers:\n  greeter: {transport: toy, greeting: ' '}\n")
    refused = _cli({**toy_env, "SARK_REGISTRY_PATH": str(silent)}, "check-config")
    assert refused.returncode != 0 and "must greet with something" in refused.stdout + refused.stderr


def test_without_the_plugin_entry_the_toy_transport_does_not_exist(tmp_path: Path) -> None:
    registry = tmp_path / "servers.yaml"
    registry.write_text(REGISTRY)
    checked = _cli({"SARK_REGISTRY_PATH": str(registry), PLUGINS_VARIABLE: ""}, "check-config")
    assert checked.returncode != 0 and "'toy'" in checked.stdout + checked.stderr


def test_nothing_outside_its_module_names_the_toy_transport() -> None:
    named = subprocess.run(["git", "grep", "-l", "-i", "-w", "toy", "--", "workers", "tasks", "config", "devkit"],
                           capture_output=True, text=True, cwd=REPO)
    assert named.stdout == "", named.stdout
