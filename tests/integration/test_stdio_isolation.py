"""stdio servers cannot reach the worker's secrets, run within limits, and may run as another user.

One worker of its own (queue ``sark.stdio-iso``, registry written here) is started with canary secrets
in its environment: ``SARK_OPERATOR_KEY``, ``SARK_TOKEN_KEY`` (a real Fernet key of the stack) and
``SARK_ISO_VAULT_PASSWORD`` (secret by its name only). The fixture server's ``find_secret`` tool looks
for them in its own environment and in the worker's ``/proc/<pid>/environ``, ``cmdline`` and ``mem``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from devkit.stack import DevStack, Proc
from tests.helpers import invoke, settings_with
from tests.isolation import FIXTURE, NOBODY, nobody_python
from workers.errors import ServerCrashed

QUEUE = "sark.stdio-iso"
GREETING = "hello from the worker's environment"


@pytest.fixture(scope="module")
def canaries(stack: DevStack) -> dict[str, str]:
    """Secret variables of the isolation worker, and their values."""
    return {"SARK_OPERATOR_KEY": f"canary-operator-{uuid.uuid4().hex}",
            "SARK_ISO_VAULT_PASSWORD": f"canary-vault-{uuid.uuid4().hex}",
            "SARK_TOKEN_KEY": stack.token_key}


@pytest.fixture(scope="module")
def iso(stack: DevStack, canaries: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[Celery, Proc]]:
    """A client app and a worker whose registry holds the iso-* servers."""
    python, nobody_env = nobody_python()
    registry = tmp_path_factory.mktemp("iso") / "servers.yaml"
    common = f"    transport: stdio\n    args: [\"{FIXTURE}\"]\n    breaker: {{enabled: false}}\n"
    registry.write_text(
        "servers:\n"
        f"  iso-root:\n{common}    command: \"{{python}}\"\n"
        "    env: {GREETING: '${ISO_GREETING}'}\n    inherit_env: [PATH, SARK_REGISTRY_PATH]\n"
        f"  iso-nobody:\n{common}    command: \"{python}\"\n    user: nobody\n"
        f"    env: {{PYTHONPATH: \"{nobody_env['PYTHONPATH']}\", GREETING: '${{ISO_GREETING}}'}}\n"
        f"  iso-limited:\n{common}    command: \"{{python}}\"\n"
        "    limits: {cpu_seconds: 3, open_files: 64, address_space_mb: 512}\n"
    )
    env = {"SARK_REGISTRY_PATH": str(registry), "SARK_QUEUE_STDIO": QUEUE, "ISO_GREETING": GREETING, **canaries}
    worker = stack.worker("stdio-iso", env=env, queues=QUEUE, concurrency=2)
    from workers.app import create_app

    app = create_app(settings_with({"SARK_REGISTRY_PATH": str(registry), "SARK_QUEUE_STDIO": QUEUE}))
    try:
        yield app, worker
    finally:
        app.close()
        worker.stop()
        stack.procs.remove(worker)


def _value(result: dict[str, Any]) -> Any:
    assert result["is_error"] is False, result
    content = result["result"]["structuredContent"]
    return content["result"] if set(content) == {"result"} else content  # a dict comes unwrapped


def test_worker_environment_and_proc_environ_hold_no_secret(iso: tuple[Celery, Proc],
                                                            canaries: dict[str, str]) -> None:
    # What the test (root) reads of the worker: its environ block no longer has the values, its memory does.
    _, worker = iso
    assert not any(v.encode() in Path(f"/proc/{worker.pid}/environ").read_bytes() for v in canaries.values())
    status = Path(f"/proc/{worker.pid}/status").read_text()
    assert Path(f"/proc/{worker.pid}/environ").stat().st_uid == 0 and "Uid:\t0" in status
    assert "secret variable(s) removed" in worker.log()


def test_default_child_finds_no_secret_in_its_environment_nor_in_the_workers_environ(
        iso: tuple[Celery, Proc], canaries: dict[str, str]) -> None:
    app, _ = iso
    found = _value(invoke(app, "iso-root", "find_secret", {"canaries": list(canaries.values())}))
    assert found["os.environ"] == "not found"
    assert found["/proc/ppid/environ"] == "not found"  # overwritten in the worker's initial block
    assert found["/proc/ppid/cmdline"] == "not found"
    # The honest limit: a child running as root can read the worker's memory, where the settings live.
    assert found["/proc/ppid/mem"].startswith("found")


def test_child_running_as_nobody_cannot_read_the_worker_at_all(iso: tuple[Celery, Proc],
                                                               canaries: dict[str, str]) -> None:
    app, _ = iso
    found = _value(invoke(app, "iso-nobody", "find_secret", {"canaries": list(canaries.values())}))
    assert found["os.environ"] == "not found"
    assert found["/proc/ppid/environ"] == "unreadable: Permission denied"
    assert found["/proc/ppid/mem"] == "unreadable: Permission denied"
    seen = invoke(app, "iso-nobody", "identity")["result"]["structuredContent"]
    assert (seen["uid"], seen["euid"], seen["gid"], seen["groups"]) == (NOBODY, NOBODY, NOBODY, [NOBODY])


def test_placeholders_are_expanded_from_the_workers_environment(iso: tuple[Celery, Proc]) -> None:
    app, _ = iso
    assert _value(invoke(app, "iso-root", "env_value", {"name": "GREETING"})) == GREETING
    assert _value(invoke(app, "iso-nobody", "env_value", {"name": "GREETING"})) == GREETING
    assert _value(invoke(app, "iso-root", "env_value", {"name": "SARK_REGISTRY_PATH"})).endswith("servers.yaml")


def test_limits_fail_calls_or_kill_the_server_with_typed_errors_and_the_worker_goes_on(
        iso: tuple[Celery, Proc]) -> None:
    app, worker = iso
    files = invoke(app, "iso-limited", "open_files", {"count": 500})
    assert files["is_error"] is True and "Too many open files" in files["result"]["content"][0]["text"]
    memory = invoke(app, "iso-limited", "allocate", {"mb": 2048})
    assert memory["is_error"] is True and "MemoryError" in memory["result"]["content"][0]["text"]
    with pytest.raises(ServerCrashed, match=r"killed by SIGXCPU \(CPU time limit"):
        invoke(app, "iso-limited", "burn", {"seconds": 30}, timeout=60, wait=90)
    assert worker.alive()
    assert _value(invoke(app, "iso-limited", "echo", {"text": "back"})) == "back"  # a new process
    assert _value(invoke(app, "iso-root", "echo", {"text": "others unharmed"})) == "others unharmed"
