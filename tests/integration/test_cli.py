"""The ``sark`` CLI, driven as a user would: real subprocesses against the session's real stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from workers.devstack import DevStack

pytestmark = pytest.mark.usefixtures("worker")
COMMANDS = ["worker", "invoke", "stream", "cancel", "servers", "tools", "breakers", "check-config", "demo", "gateway"]


def sark(
    stack: DevStack, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    full_env = {**stack.base_env(), **(env or {})}
    return subprocess.run([sys.executable, "-m", "workers.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


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
