"""The reference Gateway's secrets and test-only switches, on real ``python -m devkit.gateway`` processes.

Off by default: ``/_control/*`` (404), header recording (the API key and bearer tokens never kept),
running without an API key. No built-in JWT secret: without one it refuses to start.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from devkit.gateway import GatewayConfig, make_token
from devkit.gateway.app import DEFAULT_GATEWAY_CONFIG
from devkit.stack import DEFAULT_API_KEY, DEFAULT_JWT_SECRET, Proc, free_port, start_gateway, wait_for

ROOT = Path(__file__).resolve().parents[2]
TEST_ONLY_FLAGS = {"--enable-control", "--record-headers", "--insecure-no-api-key"}


def _env(**extra: str) -> dict[str, str]:
    """This process's environment without any ``SARK_*``, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SARK_")}
    env.update(extra)
    return env


SECRETS = {"SARK_GATEWAY_API_KEY": DEFAULT_API_KEY, "SARK_GATEWAY_JWT_SECRET": DEFAULT_JWT_SECRET}


def _refusal(env: dict[str, str], *flags: str) -> subprocess.CompletedProcess[str]:
    """Run the Gateway expecting it to exit at once (a Gateway that serves instead times out)."""
    argv = [sys.executable, "-m", "devkit.gateway", "--port", str(free_port()), *flags]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=20, cwd=ROOT)


@pytest.fixture()
def gateway(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Starts Gateways with ``start_gateway``'s switches; stops them after the test."""
    procs: list[Proc] = []

    def start(*, control: bool = True, record_headers: bool = False) -> Proc:
        procs.append(start_gateway(tmp_path, _env(**SECRETS), control=control, record_headers=record_headers))
        return procs[-1]

    yield start
    for proc in procs:
        proc.stop()


def _invoke(url: str, token: str) -> httpx.Response:
    payload = {"server_id": "echo", "tool_name": "echo", "parameters": {"x": 1}, "request_id": str(uuid.uuid4())}
    headers = {"X-API-Key": DEFAULT_API_KEY, "Authorization": f"Bearer {token}"}
    return httpx.post(f"{url}/invoke", json=payload, headers=headers, timeout=5)


def test_refuses_to_start_without_a_jwt_secret() -> None:
    done = _refusal(_env(SARK_GATEWAY_API_KEY=DEFAULT_API_KEY))
    assert done.returncode == 2
    assert "no JWT secret" in done.stderr and "SARK_GATEWAY_JWT_SECRET" in done.stderr


def test_refuses_a_short_jwt_secret_without_echoing_it() -> None:
    done = _refusal(_env(SARK_GATEWAY_API_KEY=DEFAULT_API_KEY, SARK_GATEWAY_JWT_SECRET="hunter2-is-short"))
    assert done.returncode == 2
    assert "jwt_secret" in done.stderr and "hunter2" not in done.stderr


def test_refuses_to_start_without_an_api_key() -> None:
    done = _refusal(_env(SARK_GATEWAY_JWT_SECRET=DEFAULT_JWT_SECRET))
    assert done.returncode == 2
    assert "no API key" in done.stderr and "--insecure-no-api-key" in done.stderr


def test_header_recording_needs_the_control_api() -> None:
    done = _refusal(_env(**SECRETS), "--record-headers")
    assert done.returncode == 2
    assert "record_headers needs control_api" in done.stderr


@contextlib.contextmanager
def _serving(tmp_path: Path, env: dict[str, str], *flags: str) -> Iterator[Proc]:
    """``python -m devkit.gateway`` with ``flags``, once it answers ``/health``; stopped afterwards."""
    port = free_port()
    argv = [sys.executable, "-m", "devkit.gateway", "--port", str(port), *flags]
    log = (tmp_path / "gw.log").open("wb")
    popen = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    log.close()
    proc = Proc("gw", popen, tmp_path / "gw.log", url=f"http://127.0.0.1:{port}")
    try:
        wait_for(lambda: httpx.get(f"{proc.url}/health", timeout=0.5).status_code == 200, 20, "gateway")
        yield proc
    finally:
        proc.stop()


def test_runs_without_an_api_key_only_when_told_to(tmp_path: Path) -> None:
    env = _env(SARK_GATEWAY_JWT_SECRET=DEFAULT_JWT_SECRET)
    with _serving(tmp_path, env, "--insecure-no-api-key") as proc:
        assert httpx.get(f"{proc.url}/servers", timeout=5).status_code == 200  # no key asked for
        assert "WARNING insecure_no_api_key is on" in proc.log()


def test_jwt_secret_file_flag(tmp_path: Path) -> None:
    secret_file = tmp_path / "jwt.secret"
    secret_file.write_text("s" * 48 + "\n")
    with _serving(tmp_path, _env(SARK_GATEWAY_API_KEY=DEFAULT_API_KEY), "--jwt-secret-file", str(secret_file)) as proc:
        assert _invoke(proc.url, make_token("s" * 48)).status_code == 200
        assert _invoke(proc.url, make_token(DEFAULT_JWT_SECRET)).status_code == 401


def test_control_api_is_off_by_default(gateway: Callable[..., Proc]) -> None:
    proc = gateway(control=False)
    key = {"X-API-Key": DEFAULT_API_KEY}
    assert httpx.get(f"{proc.url}/health", timeout=5).status_code == 200
    assert httpx.get(f"{proc.url}/_control/stats", headers=key, timeout=5).status_code == 404
    assert httpx.post(f"{proc.url}/_control/mode", headers=key, json={"mode": "fail"}, timeout=5).status_code == 404
    assert httpx.post(f"{proc.url}/_control/reset", headers=key, timeout=5).status_code == 404
    assert _invoke(proc.url, make_token(DEFAULT_JWT_SECRET)).status_code == 200  # "fail" was not applied


def test_headers_are_not_recorded_unless_asked(gateway: Callable[..., Proc]) -> None:
    proc = gateway(control=True)
    token = make_token(DEFAULT_JWT_SECRET, sub="carol")
    assert _invoke(proc.url, token).status_code == 200
    stats = httpx.get(f"{proc.url}/_control/stats", headers={"X-API-Key": DEFAULT_API_KEY}, timeout=5)
    assert stats.json()["invocations"] == 1
    assert stats.json()["headers"] == []
    assert token not in stats.text and DEFAULT_API_KEY not in stats.text


def test_headers_are_recorded_when_asked(gateway: Callable[..., Proc]) -> None:
    proc = gateway(control=True, record_headers=True)
    token = make_token(DEFAULT_JWT_SECRET, sub="carol")
    assert _invoke(proc.url, token).status_code == 200
    stats = httpx.get(f"{proc.url}/_control/stats", headers={"X-API-Key": DEFAULT_API_KEY}, timeout=5).json()
    assert stats["headers"][-1]["authorization"] == f"Bearer {token}"


def test_no_secret_or_switch_in_the_shipped_config() -> None:
    raw = yaml.safe_load(DEFAULT_GATEWAY_CONFIG.read_text(encoding="utf-8"))
    assert not {"api_key", "jwt_secret", "control_api", "record_headers", "insecure_no_api_key"} & set(raw)
    assert GatewayConfig.model_fields["jwt_secret"].is_required()  # no built-in default secret
    for name in ("control_api", "record_headers", "insecure_no_api_key"):
        assert GatewayConfig.model_fields[name].default is False


def test_compose_gateway_gets_secrets_from_env_and_no_test_switch() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["gateway"]
    assert ".env" in str(service.get("env_file", compose["x-sark"]["env_file"]))
    assert not TEST_ONLY_FLAGS & set(service["command"])
    example = (ROOT / ".env.example").read_text()
    assert "SARK_GATEWAY_JWT_SECRET=" in example and "SARK_GATEWAY_API_KEY=" in example
