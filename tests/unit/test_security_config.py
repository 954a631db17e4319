"""check-config's security findings: clear tokens, missing operator key, policies nobody can verify."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from config.check import check_security
from config.registry import load_registry
from config.settings import Settings

KEY = "3q2Uj6X1o2y8cB0t9kM2xv5nqkQwGJq1y1gkCw2Yq8U="  # a Fernet key (32 url-safe base64 bytes)


def _registry(tmp_path: Path, policy: bool) -> object:
    path = tmp_path / "servers.yaml"
    extra = "    policy: {teams: [admins]}\n" if policy else ""
    path.write_text(f"servers:\n  time:\n    transport: stdio\n    command: /bin/true\n{extra}", encoding="utf-8")
    return load_registry(path)


def _where(problems: list[object]) -> dict[str, str]:
    return {p.where: p.level for p in problems}  # type: ignore[attr-defined]


def test_tokens_in_clear_are_warned_about(tmp_path: Path) -> None:
    bare = Settings(_env_file=None, token_key=None, operator_key=None)  # type: ignore[call-arg]
    found = _where(check_security(_registry(tmp_path, False), bare))  # type: ignore[arg-type]
    assert found["settings.token_key"] == "warning"
    assert found["settings.operator_key"] == "warning"
    clear = Settings(_env_file=None, token_key=KEY, allow_clear_tokens=True)  # type: ignore[call-arg]
    assert "settings.allow_clear_tokens" in _where(check_security(_registry(tmp_path, False), clear))  # type: ignore[arg-type]
    safe = Settings(_env_file=None, token_key=KEY, operator_key="o" * 32)  # type: ignore[call-arg]
    assert not {k for k in _where(check_security(_registry(tmp_path, False), safe))  # type: ignore[arg-type]
                if "token" in k or "operator" in k}


def test_policy_without_a_verification_key_is_an_error(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, token_key=KEY, auth_hs256_secret=None, auth_public_key=None,  # type: ignore[call-arg]
                        auth_jwks_path=None)
    found = _where(check_security(_registry(tmp_path, True), settings))  # type: ignore[arg-type]
    assert found["servers.time.policy"] == "error"
    verified = Settings(_env_file=None, token_key=KEY, auth_hs256_secret="s" * 32)  # type: ignore[call-arg]
    assert "servers.time.policy" not in _where(check_security(_registry(tmp_path, True), verified))  # type: ignore[arg-type]


def test_a_token_key_that_is_no_fernet_key_is_refused() -> None:
    with pytest.raises(ValidationError, match="not a Fernet key"):
        Settings(_env_file=None, token_key="change-me")  # type: ignore[call-arg]
