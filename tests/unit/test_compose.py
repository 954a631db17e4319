"""docker-compose.yml cannot run here (no Docker engine): check every service against the code instead."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from config.settings import Settings
from config.transports import catalog
from workers.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
ENV_EXAMPLE = dict(
    line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines() if line and not line.startswith("#")
)
#: Variables read by something other than Settings: the reference Gateway, Flower, Redis.
OTHER_VARS = {"SARK_GATEWAY_JWT_SECRET", "FLOWER_BASIC_AUTH", "REDIS_PASSWORD"}


def _services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = COMPOSE["services"]
    return services


def test_expected_services_with_healthchecks() -> None:
    assert set(_services()) == {"redis", "gateway", "mcp-http", "worker-http", "worker-sse", "worker-stdio",
                                "worker-streamable-http", "flower"}
    for name, service in _services().items():
        assert "healthcheck" in service, name
        assert service.get("restart") == "unless-stopped", name
        if name != "redis":
            assert service.get("init") is True, f"{name}: needs an init to reap orphaned stdio servers"


def test_redis_has_aof_and_auth() -> None:
    command = _services()["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert "--requirepass" in command


def test_every_sark_command_parses_with_the_real_cli() -> None:
    parser = build_parser()
    for name, service in _services().items():
        command = service["command"]
        if command[0] == "sark":
            args = parser.parse_args(command[1:])
            assert callable(args.fn), name


def test_one_worker_per_transport_queue() -> None:
    settings = Settings()
    parser = build_parser()
    seen = {}
    for name, service in _services().items():
        if name.startswith("worker-"):
            args = parser.parse_args(service["command"][1:])
            assert args.command == "worker"
            seen[args.transports] = name
            assert "container_name" not in service, "a fixed container name prevents --scale"
            assert not service.get("ports"), "published ports prevent --scale"
    assert set(seen) == set(catalog())  # every transport of the catalog has its worker
    assert {settings.queue_for(t) for t in seen} == {"sark.http", "sark.sse", "sark.stdio", "sark.streamable-http"}


def test_flower_has_basic_auth_and_the_app() -> None:
    flower = _services()["flower"]
    assert flower["command"][:4] == ["celery", "-A", "workers.app", "flower"]
    assert "FLOWER_BASIC_AUTH" in flower["environment"]
    from devkit.stack import FLOWER_TASKS_COLUMNS

    columns = flower["environment"]["FLOWER_TASKS_COLUMNS"]
    assert columns == FLOWER_TASKS_COLUMNS and "kwargs" in columns.split(",") and "args" not in columns.split(",")
    assert ENV_EXAMPLE["FLOWER_BASIC_AUTH"].count(":") == 1


def test_env_example_names_only_real_settings() -> None:
    fields = {f"SARK_{name.upper()}" for name in Settings.model_fields}
    for key in ENV_EXAMPLE:
        assert key in fields or key in OTHER_VARS, f"{key} is not a setting"
    Settings(**{k.removeprefix("SARK_").lower(): v for k, v in ENV_EXAMPLE.items() if k.startswith("SARK_")
                and k not in OTHER_VARS})


def test_variables_used_in_compose_are_defined() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_]+)\}", text))
    assert used <= set(ENV_EXAMPLE), used - set(ENV_EXAMPLE)


def test_dockerfile_installs_the_project_and_the_stdio_servers() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'pip install ".[servers]"' in dockerfile
    for folder in ("workers", "tasks", "config"):
        assert f"COPY {folder}" in dockerfile
    assert "USER sark" in dockerfile
    healthcheck = _services()["worker-http"]["healthcheck"]["test"]
    assert "inspect ping" in " ".join(shlex.quote(part) for part in healthcheck)


def test_the_example_mcp_server_is_the_registrys() -> None:
    # The registry's example-http entry reads its url from EXAMPLE_MCP_URL: compose points it at its service.
    from config.registry import load_registry
    from config.streamable_http_spec import StreamableHttpServer

    server = _services()["mcp-http"]
    port = server["command"][server["command"].index("--port") + 1]
    worker = _services()["worker-streamable-http"]
    assert worker["environment"]["EXAMPLE_MCP_URL"] == f"http://mcp-http:{port}/mcp"
    assert "mcp-http" in worker["depends_on"]
    entry = load_registry(ROOT / "config" / "servers.yaml").get("example-http")
    assert isinstance(entry, StreamableHttpServer)
    raw = (ROOT / "config" / "servers.yaml").read_text()
    assert "${EXAMPLE_MCP_URL:-" in raw


def test_workers_serve_metrics_on_the_compose_network() -> None:
    workers = {name: s for name, s in _services().items() if name.startswith("worker-")}
    assert workers
    for name, service in workers.items():
        env = service.get("environment") or {}
        settings = Settings(metrics_port=env["SARK_METRICS_PORT"], metrics_address=env["SARK_METRICS_ADDRESS"])
        assert settings.metrics_port > 0 and settings.metrics_address == "0.0.0.0", name
        assert not service.get("ports"), f"{name} publishes a port: metrics stay on the compose network"
