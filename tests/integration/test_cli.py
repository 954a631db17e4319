"""The ``sark`` CLI, driven as a user would: real subprocesses against the session's real stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from devkit.gateway import make_token
from devkit.stack import DEFAULT_JWT_SECRET, DevStack
from tests.helpers import token_headers
from workers.tokens import generate_key

pytestmark = pytest.mark.usefixtures("worker")
COMMANDS = ["worker", "invoke", "stream", "cancel", "servers", "tools", "breakers", "check-config", "demo", "gateway",
            "up", "token"]


def sark(
    stack: DevStack, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    full_env = {**stack.base_env(), **(env or {})}
    return subprocess.run([sys.executable, "-m", "workers.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def timed_sark(stack: DevStack, *args: str, env: dict[str, str] | None = None
               ) -> tuple[subprocess.CompletedProcess[str], float]:
    """``sark`` and its wall time in seconds (interpreter start included: about 1 s)."""
    start = time.monotonic()
    done = sark(stack, *args, env=env)
    took = time.monotonic() - start
    print(f"sark {' '.join(args)}: exit {done.returncode} in {took:.2f}s")  # shown with -rP or on failure
    return done, took


def task_id_of(done: subprocess.CompletedProcess[str]) -> str:
    return done.stderr.split("enqueued ")[1].split()[0]


def chunks_and_outcome(stdout: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The chunk lines ``sark`` printed, and the (indented) JSON after them."""
    lines = stdout.splitlines()
    cut = lines.index("{")
    return [json.loads(line) for line in lines[:cut]], json.loads("\n".join(lines[cut:]))


def test_help_for_every_command(stack: DevStack) -> None:
    top = sark(stack, "--help")
    assert top.returncode == 0
    for command in COMMANDS:
        assert command in top.stdout
        sub = sark(stack, command, "--help")
        assert sub.returncode == 0, command
        assert "usage: sark " + command in sub.stdout


def test_invoke_prints_the_result(stack: DevStack, user_token: str) -> None:
    done = sark(stack, "invoke", "echo", "add", "--args", '{"a": 20, "b": 22}', env={"SARK_USER_TOKEN": user_token})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["result"]["structuredContent"] == {"sum": 42.0}
    assert "enqueued" in done.stderr


def test_invoke_typed_error_exit_code(stack: DevStack, user_token: str) -> None:
    done = sark(stack, "invoke", "restricted", "echo", env={"SARK_USER_TOKEN": user_token})
    assert done.returncode == 1
    assert json.loads(done.stdout)["error"]["type"] == "AuthorizationDenied"
    bad = sark(stack, "invoke", "echo", "echo", "--args", "{not json")
    assert bad.returncode == 2 and "not JSON" in bad.stderr


def test_servers_and_tools(stack: DevStack) -> None:
    servers = sark(stack, "servers")
    assert servers.returncode == 0, servers.stderr
    assert {"echo", "restricted"} <= {s["server_id"] for s in json.loads(servers.stdout)}
    registry = sark(stack, "servers", "--registry")
    assert "echo-stream" in json.loads(registry.stdout)
    tools = sark(stack, "tools", "echo")
    assert "add" in {t["tool_name"] for t in json.loads(tools.stdout)}


def test_check_config(stack: DevStack, tmp_path: Path) -> None:
    ok = sark(stack, "check-config")
    assert ok.returncode == 0 and "configuration OK" in ok.stdout
    bad_registry = tmp_path / "bad.yaml"
    bad_registry.write_text("servers:\n  x:\n    transport: carrier-pigeon\n")
    bad = sark(stack, "check-config", env={"SARK_REGISTRY_PATH": str(bad_registry)})
    assert bad.returncode == 2 and "invalid" in bad.stderr
    bad_timeouts = sark(stack, "check-config", env={"SARK_VISIBILITY_TIMEOUT": "10"})
    assert bad_timeouts.returncode == 2 and "visibility_timeout" in bad_timeouts.stderr


def test_worker_refuses_bad_config_and_unknown_transport(stack: DevStack) -> None:
    refused = sark(stack, "worker", "--transports", "http", env={"SARK_VISIBILITY_TIMEOUT": "10"})
    assert refused.returncode == 2
    unknown = sark(stack, "worker", "--transports", "pigeon")
    assert unknown.returncode == 2 and "pigeon" in unknown.stderr


def test_console_script_installed() -> None:
    script = Path(sys.executable).with_name("sark")
    assert script.exists()
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30,
                          env={**os.environ})
    assert done.returncode == 0


def test_plain_celery_worker_refuses_invalid_config(stack: DevStack, tmp_path: Path) -> None:
    bad_registry = tmp_path / "shell.yaml"
    bad_registry.write_text("servers:\n  s:\n    transport: stdio\n    command: /bin/sh\n    args: ['-c', 'id']\n")
    env = {**stack.base_env(), "SARK_REGISTRY_PATH": str(bad_registry), "SARK_QUEUE_HTTP": "sark.http.refused"}
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", "sark.http.refused",
                           "-P", "threads", "--without-mingle", "--without-gossip"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode != 0
    assert "shell" in done.stdout + done.stderr


def test_invoke_stream_and_follow(stack: DevStack, user_token: str) -> None:
    done = sark(stack, "invoke", "echo-stream", "stream_data", "--args", '{"count": 3}', "--stream",
                env={"SARK_USER_TOKEN": user_token})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    chunks = [json.loads(line) for line in lines[:3]]
    assert [c["seq"] for c in chunks] == [0, 1, 2]
    result = json.loads("\n".join(lines[3:]))
    assert result["chunks"] == 3
    task_id = done.stderr.split("enqueued ")[1].split()[0]
    again = sark(stack, "stream", task_id)  # anyone can follow it afterwards, from the start
    assert again.returncode == 0
    assert [json.loads(line)["seq"] for line in again.stdout.splitlines()] == [0, 1, 2]
    resumed = sark(stack, "stream", task_id, "--from-seq", "1")  # the seq printed, not a Redis id
    assert [json.loads(line)["seq"] for line in resumed.stdout.splitlines()] == [1, 2]
    after = sark(stack, "stream", task_id, "--after", "0-1")  # entry 0-1 is chunk 0
    assert [json.loads(line)["seq"] for line in after.stdout.splitlines()] == [1, 2]


def test_stream_of_an_unknown_id_ends_after_the_grace(stack: DevStack) -> None:
    done, took = timed_sark(stack, "stream", str(uuid.uuid4()), "--wait", "5")
    assert done.returncode == 3, done.stderr
    assert "no such invocation, or it was not streamed" in done.stderr
    assert took < 4.0, took  # the 2 s grace and the interpreter's start, not --wait


def test_stream_of_a_non_streamed_task_prints_its_outcome(stack: DevStack, user_token: str) -> None:
    ok = sark(stack, "invoke", "echo", "add", "--args", '{"a": 1, "b": 2}', env={"SARK_USER_TOKEN": user_token})
    assert ok.returncode == 0, ok.stderr
    done, took = timed_sark(stack, "stream", task_id_of(ok), "--wait", "30")
    assert done.returncode == 3, done.stderr
    assert "was not streamed" in done.stderr
    assert json.loads(done.stdout)["result"]["structuredContent"] == {"sum": 3.0}
    assert took < 3.0, took  # at once: the task's result is already in

    denied = sark(stack, "invoke", "restricted", "echo", env={"SARK_USER_TOKEN": user_token})
    assert denied.returncode == 1
    done, took = timed_sark(stack, "stream", task_id_of(denied), "--wait", "30")
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout)["error"]["type"] == "AuthorizationDenied"
    assert took < 3.0, took


def test_stream_of_a_streamed_task_cancelled_before_it_ran(stack: DevStack, celery_client: Celery,
                                                            user_token: str) -> None:
    task_id = str(uuid.uuid4())
    celery_client.control.revoke(task_id)  # the worker drops it on arrival: it never opens its stream
    celery_client.send_task(
        "sark.invoke", task_id=task_id, headers=token_headers(user_token, task_id),
        kwargs={"invocation": {"server": "echo-stream", "tool": "stream_data", "stream": True}},
    )
    done, took = timed_sark(stack, "stream", task_id, "--wait", "30")
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout)["error"]["type"] == "Cancelled"
    assert took < 4.0, took


@pytest.mark.parametrize("case", ["expired", "sealed-with-another-key"])
def test_invoke_stream_with_a_refused_token_ends_at_once(stack: DevStack, case: str) -> None:
    if case == "expired":
        env = {"SARK_USER_TOKEN": make_token(DEFAULT_JWT_SECRET, teams=["users"], ttl=-60)}
        expected = "TokenExpired"
    else:  # the worker cannot open what this CLI sealed
        env = {"SARK_USER_TOKEN": make_token(DEFAULT_JWT_SECRET, teams=["users"]), "SARK_TOKEN_KEY": generate_key()}
        expected = "InvalidToken"
    done, took = timed_sark(stack, "invoke", "echo-stream", "stream_data", "--stream", "--wait", "30", env=env)
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout)["error"]["type"] == expected
    assert took < 4.0, took


def test_wait_bounds_a_slow_stream(stack: DevStack, user_token: str) -> None:
    slow = '{"count": 200, "interval": 0.2}'  # 40 s of chunks
    done, took = timed_sark(stack, "invoke", "echo-stream", "stream_data", "--args", slow, "--stream",
                            "--wait", "2", env={"SARK_USER_TOKEN": user_token})
    task_id = task_id_of(done)
    try:
        assert done.returncode == 1, done.stderr
        _, outcome = chunks_and_outcome(done.stdout)  # chunks until --wait ran out, if any came in time
        assert outcome["error"]["type"] == "InvocationTimeout"
        assert "gave up after --wait 2s" in done.stderr
        assert took < 2 + 2.0, took  # --wait, plus the interpreter's start and a margin

        # `sark stream` follows a live stream (task still running) until its own --wait.
        again, took = timed_sark(stack, "stream", task_id, "--wait", "1.5", "--grace", "0.5")
        assert again.returncode == 1, again.stderr
        chunks, outcome = chunks_and_outcome(again.stdout)
        assert chunks[0]["seq"] == 0 and outcome["error"]["type"] == "InvocationTimeout"
        assert "gave up after --wait 1.5s" in again.stderr
        assert took < 1.5 + 2.0, took
    finally:
        assert sark(stack, "cancel", task_id).returncode == 0


def test_newcomer_paths(stack: DevStack, tmp_path: Path) -> None:
    # `sark breakers` alone lists them (no bare argparse error).
    listed = sark(stack, "breakers")
    assert listed.returncode == 0 and "target" in listed.stdout, listed.stderr
    # A YAML error names the registry file (not "<unicode string>"), and the path is not repeated as a prefix.
    broken = tmp_path / "broken.yaml"
    broken.write_text("servers:\n  x: [1\n")
    bad = sark(stack, "check-config", env={"SARK_REGISTRY_PATH": str(broken)})
    assert bad.returncode == 2 and "<unicode string>" not in bad.stderr
    assert f'in "{broken}", line 2' in bad.stderr and not bad.stderr.startswith(f"error: {broken}:")
    # `sark gateway` takes the reference Gateway's own options.
    from workers.cli import build_parser

    args = build_parser().parse_args(["gateway", "--prefix", "/api", "--config", str(broken), "--port", "9"])
    assert (args.prefix, args.config, args.port) == ("/api", broken, 9)
