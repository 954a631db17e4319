"""devkit.conformance_client: the registry entry it writes for each conformance scenario is a valid one."""

from __future__ import annotations

from typing import Any

import pytest

from config.streamable_http_spec import StreamableHttpServer
from devkit.conformance_client import KEY_ENV, SCENARIOS, SECRET_ENV, main, registry_entry

CONTEXTS: dict[str, dict[str, Any]] = {
    "auth/client-credentials-basic": {"client_id": "c", "client_secret": "s3cret"},
    "auth/client-credentials-jwt": {"client_id": "c", "private_key_pem": "PEM", "signing_algorithm": "ES256"},
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_entry_is_valid(scenario: str) -> None:
    entry, env = registry_entry("http://localhost:1234/mcp", scenario, CONTEXTS.get(scenario, {}))
    server = StreamableHttpServer.model_validate({"name": "target", **entry})
    assert server.url == "http://localhost:1234/mcp"
    assert set(server.variables()) == set(env)  # every secret reaches the worker by a variable it names
    if server.oauth is not None:
        assert server.oauth.issuer is None  # the suite's authorization server is random: discovered
        assert server.oauth.method == ("private_key_jwt" if scenario.endswith("jwt") else "client_secret_basic")
        assert env == ({KEY_ENV: "PEM"} if scenario.endswith("jwt") else {SECRET_ENV: "s3cret"})
        assert "s3cret" not in str(entry) and "PEM" not in str(entry)


def test_unknown_scenario_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_CONFORMANCE_SCENARIO", "elicitation-sep1034-client-defaults")
    assert main(["http://localhost:1/mcp"]) == 1
