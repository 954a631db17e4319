"""stdio servers' environment, limits and identity, on real fixture server processes (no worker, no broker).

Each test drives :class:`StdioTransport` in this process, as a worker's runtime does, and asks the
fixture server (``tests/fixtures/mcp_fixture_server.py``) what it sees.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping
from typing import Any

import pytest

from config.registry import StdioServer
from tests.isolation import FIXTURE, NOBODY, nobody_python
from workers.errors import ServerCrashed
from workers.transports.base import ToolOutcome
from workers.transports.stdio import StdioTransport


def _server(**fields: Any) -> StdioServer:
    entry: dict[str, Any] = {"name": "iso", "transport": "stdio", "command": sys.executable,
                             "args": [str(FIXTURE)], "startup_timeout": 20, **fields}
    return StdioServer.model_validate(entry)


def _calls(server: StdioServer, calls: list[tuple[str, dict[str, Any]]],
           environ: Mapping[str, str] | None = None) -> list[ToolOutcome | Exception]:
    """Run ``calls`` one after the other on one transport; each outcome, or the error it raised."""

    async def run() -> list[ToolOutcome | Exception]:
        transport = StdioTransport([server], max_result_bytes=1_000_000, environ=environ)
        outcomes: list[ToolOutcome | Exception] = []
        try:
            for tool, arguments in calls:
                try:
                    outcomes.append(await transport.pool(server).call_tool(tool, arguments, timeout=20, sink=None))
                except ServerCrashed as exc:
                    outcomes.append(exc)
                    await asyncio.sleep(0.3)  # the restart backoff after a failure (0.25 s)
        finally:
            await transport.close()
        return outcomes

    return asyncio.run(run())


def _value(outcome: ToolOutcome | Exception) -> Any:
    assert isinstance(outcome, ToolOutcome), outcome
    assert not outcome.is_error, outcome.result
    return outcome.result["structuredContent"]["result"]


def _text(outcome: ToolOutcome | Exception) -> str:
    assert isinstance(outcome, ToolOutcome), outcome
    return str(outcome.result["content"][0]["text"])


# --- ${NAME} in env ----------------------------------------------------------------------------------
def test_placeholders_expand_anywhere_in_a_value_in_one_pass() -> None:
    server = _server(env={"GREETING": "${ISO_A} and ${ISO_B}!", "RAW": "$ISO_A"})
    environ = {"ISO_A": "alpha", "ISO_B": "${ISO_A}"}
    greeting, raw = _calls(server, [("env_value", {"name": "GREETING"}), ("env_value", {"name": "RAW"})], environ)
    assert _value(greeting) == "alpha and ${ISO_A}!"  # a replacement is not expanded again
    assert _value(raw) == "$ISO_A"  # only ${NAME} is a placeholder


def test_unset_variable_is_server_crashed_naming_only_the_variable() -> None:
    server = _server(env={"DSN": "postgres://app:${ISO_UNSET}@db/app"})
    [outcome] = _calls(server, [("echo", {"text": "x"})], {"ISO_OTHER": "other-value-s3cret"})
    assert isinstance(outcome, ServerCrashed)
    assert "${ISO_UNSET}" in outcome.message and outcome.detail["variable"] == "ISO_UNSET"
    assert "s3cret" not in str(outcome.to_dict()) and "postgres" not in outcome.message


def test_worker_secrets_are_never_available_to_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    canary = "canary-7f3a9c1e-secret-value"
    for name in ("SARK_TOKEN_KEY", "SARK_CUSTOM_PASSWORD"):
        monkeypatch.setenv(name, canary)
    monkeypatch.setenv("SARK_BROKER_URL", f"redis://:{canary}@127.0.0.1:6399/0")
    monkeypatch.setenv("ISO_PLAIN", "plain")
    inherit = ["SARK_TOKEN_KEY", "SARK_CUSTOM_PASSWORD", "SARK_BROKER_URL", "ISO_PLAIN"]
    # environ=None: the transport takes the launch environment of this process, as a runtime does.
    outcomes = _calls(_server(inherit_env=inherit), [("env_value", {"name": n}) for n in inherit])
    assert [_value(o) for o in outcomes] == [None, None, None, "plain"]
    [refused] = _calls(_server(env={"K": "${SARK_TOKEN_KEY}"}), [("echo", {"text": "x"})])
    assert isinstance(refused, ServerCrashed) and canary not in str(refused.to_dict())


# --- resource limits ---------------------------------------------------------------------------------
def test_limits_are_set_in_the_child_before_it_runs() -> None:
    server = _server(limits={"address_space_mb": 1024, "open_files": 64, "cpu_seconds": 30})
    [outcome] = _calls(server, [("identity", {})])
    assert isinstance(outcome, ToolOutcome)
    limits = outcome.result["structuredContent"]["limits"]
    assert limits["AS"] == [1024 << 20, 1024 << 20]
    assert limits["NOFILE"] == [64, 64]
    assert limits["CPU"] == [30, 31]


def test_open_files_and_memory_over_the_limit_fail_the_call_not_the_server() -> None:
    server = _server(limits={"address_space_mb": 512, "open_files": 64})
    pid1, files, memory, small, pid2 = _calls(server, [
        ("pid", {}), ("open_files", {"count": 500}), ("allocate", {"mb": 2048}), ("allocate", {"mb": 16}),
        ("pid", {}),
    ])
    assert isinstance(files, ToolOutcome) and files.is_error and "then: Too many open files" in _text(files)
    assert int(_text(files).split("opened ")[1].split()[0]) < 64  # stdin/out/err and the SDK's own count too
    assert isinstance(memory, ToolOutcome) and memory.is_error and "MemoryError allocating 2048" in _text(memory)
    assert _value(small) == 16
    assert _value(pid1) == _value(pid2)  # the same process served every call


def test_cpu_limit_kills_the_server_with_a_typed_error_then_it_restarts() -> None:
    server = _server(limits={"cpu_seconds": 3})  # a cold start of the fixture spends about 1 s of CPU
    pid1, burnt, pid2 = _calls(server, [("pid", {}), ("burn", {"seconds": 15}), ("pid", {})])
    assert isinstance(burnt, ServerCrashed)
    assert "killed by SIGXCPU (CPU time limit" in burnt.message
    assert _value(pid2) != _value(pid1)


# --- another identity --------------------------------------------------------------------------------
def test_server_runs_as_nobody_with_only_nobodys_groups() -> None:
    python, env = nobody_python()
    server = _server(command=python, env=env, user="nobody", limits={"processes": 64})
    [outcome] = _calls(server, [("identity", {})])
    assert isinstance(outcome, ToolOutcome), outcome
    seen = outcome.result["structuredContent"]
    assert (seen["uid"], seen["euid"], seen["gid"], seen["groups"]) == (NOBODY, NOBODY, NOBODY, [NOBODY])
    assert seen["limits"]["NPROC"] == [64, 64]


def test_unknown_user_is_server_crashed() -> None:
    [outcome] = _calls(_server(user="no-such-user-sark"), [("echo", {"text": "x"})])
    assert isinstance(outcome, ServerCrashed) and "user 'no-such-user-sark' does not exist" in outcome.message
