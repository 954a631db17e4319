"""The ``streamable-http`` registry schema, its catalog entry, and whose session a call uses."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from config.streamable_http_spec import StreamableHttpServer
from config.transports import get_spec


def _server(**fields: object) -> StreamableHttpServer:
    return StreamableHttpServer.model_validate({"transport": "streamable-http", "name": "docs",
                                                "url": "http://127.0.0.1:9/mcp", **fields})


def _jwt(claims: dict[str, object]) -> str:
    def part(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none'})}.{part(claims)}.sig"


def test_the_catalog_names_the_transport_and_its_queue() -> None:
    spec = get_spec("streamable-http")
    assert spec.server_model is StreamableHttpServer and spec.default_queue == "sark.streamable-http"
    assert _server().breaker_target() == "streamable-http:docs"


@pytest.mark.parametrize("fields", [
    {"protocol_version": "2025-06-18"},  # the SDK's handshake offers 2025-11-25: never honoured
    {"url": "ftp://example.com/mcp"},
    {"url": "http://user:pw@example.com/mcp"},
    {"headers": {"X-Api-Key": "literal secret value"}},
    {"headers": {"Authorization": "TOKEN"}},
    {"auth": "bearer-env"},
    {"auth": "none", "token_env": "TOKEN"},
    {"auth": "basic"},
    {"auth": "oauth-client-credentials"},
    {"auth": "none", "oauth": {"client_id": "sark", "client_secret_env": "S"}},
    {"auth": "oauth-client-credentials", "oauth": {"client_id": "sark"}},
    {"auth": "oauth-client-credentials", "oauth": {"client_id": "sark", "client_secret_env": "literal secret"}},
    {"auth": "oauth-client-credentials", "oauth": {"client_id": "sark", "method": "private_key_jwt",
                                                   "client_secret_env": "S"}},
    {"auth": "oauth-client-credentials", "oauth": {"client_id": "sark", "client_secret_env": "S",
                                                   "issuer": "ftp://auth"}},
])
def test_invalid_entries_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        _server(**fields)


def test_a_valid_entry() -> None:
    server = _server(headers={"X-Api-Key": "DOCS_KEY"}, auth="bearer-env", token_env="DOCS_TOKEN",
                     protocol_version="2025-11-25", timeout=5)
    assert server.headers == {"X-Api-Key": "DOCS_KEY"} and server.token_env == "DOCS_TOKEN"


def test_the_url_may_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DOCS_URL", raising=False)
    assert _server(url="${DOCS_URL:-http://127.0.0.1:8931/mcp}").url == "http://127.0.0.1:8931/mcp"
    with pytest.raises(ValidationError, match=r"\$\{DOCS_URL\} is not set"):
        _server(url="${DOCS_URL}")
    monkeypatch.setenv("DOCS_URL", "http://docs:8000/mcp")
    assert _server(url="${DOCS_URL:-http://127.0.0.1:8931/mcp}").url == "http://docs:8000/mcp"
    monkeypatch.setenv("DOCS_URL", "file:///etc/passwd")
    with pytest.raises(ValidationError, match="http:// or https://"):
        _server(url="${DOCS_URL}")


def test_identities_keep_users_apart() -> None:
    from workers.errors import AuthorizationDenied
    from workers.transports.streamable_http import identity_of

    def verify(token: str) -> dict[str, object]:  # stands in for the worker's TokenVerifier.claims
        if token.count(".") != 2:
            raise AuthorizationDenied("the user's token is not a JWT")
        payload = token.split(".")[1]
        claims: dict[str, object] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        if claims.get("forged"):
            raise AuthorizationDenied("no configured key verifies the user's token")
        return claims

    forward = _server(auth="forward")
    alice, alice_again = _jwt({"sub": "alice", "exp": 1}), _jwt({"sub": "alice", "exp": 2})
    bob, other_issuer = _jwt({"sub": "bob"}), _jwt({"sub": "alice", "iss": "elsewhere"})
    forged = _jwt({"sub": "alice", "exp": 1, "forged": True})
    assert identity_of(forward, alice, verify) == identity_of(forward, alice_again, verify)  # verified: one user
    assert len({identity_of(forward, t, verify) for t in (alice, bob, other_issuer, "opaque-1", "opaque-2")}) == 5
    # A token the worker cannot verify never joins the session of the user it names.
    assert identity_of(forward, forged, verify) != identity_of(forward, alice, verify)
    # Without a verifier, no unverified claim is trusted: each token is its own identity.
    assert identity_of(forward, alice) != identity_of(forward, alice_again)
    assert identity_of(forward, None) == "anonymous"
    assert identity_of(_server(), alice) == identity_of(_server(), bob) == "service"
    assert "opaque-1" not in identity_of(forward, "opaque-1")


def test_the_spec_module_stays_light() -> None:
    code = ("import sys, config.streamable_http_spec; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mcp', 'mcp_types', 'httpx2', 'workers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_check_config_names_unset_and_secret_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    from config.settings import Settings
    from config.streamable_http_spec import check

    settings = Settings()
    monkeypatch.setenv("DOCS_KEY", "k")
    monkeypatch.delenv("DOCS_TOKEN", raising=False)
    monkeypatch.setenv("SARK_TOKEN_KEY", "worker-secret")
    server = _server(url="http://docs.example.com/mcp", headers={"X-Api-Key": "DOCS_KEY", "X-Key": "SARK_TOKEN_KEY"},
                     auth="bearer-env", token_env="DOCS_TOKEN")
    found = {(p.level, p.where) for p in check(server, settings)}
    assert found == {("error", "servers.docs.headers.X-Key"), ("error", "servers.docs.token_env"),
                     ("warning", "servers.docs.url")}
    assert [p.level for p in check(_server(auth="forward"), settings)] == ["warning"]
    assert check(_server(), settings) == []


def test_a_call_sends_its_own_token_never_the_sessions_newest() -> None:
    import httpx2

    from workers.transports.streamable_http import _Bearer, _Probe, _probe

    auth = _Bearer("newest-of-the-identity")

    def sent() -> str | None:
        request = httpx2.Request("POST", "http://127.0.0.1:9/mcp")
        return next(auth.auth_flow(request)).headers.get("Authorization")

    assert sent() == "Bearer newest-of-the-identity"  # the session's own requests (handshake, GET stream)
    reset = _probe.set(_Probe(token="this-call"))
    try:
        assert sent() == "Bearer this-call"
    finally:
        _probe.reset(reset)
    assert _Bearer(None).auth_flow(httpx2.Request("GET", "http://127.0.0.1:9/")).__next__().headers.get(
        "Authorization") is None


def test_a_pin_is_the_sdk_clients_mode() -> None:
    from workers.transports.streamable_http import client_mode

    assert client_mode(None) == "auto"
    assert client_mode("2025-11-25") == "legacy"
    assert client_mode("2026-07-28") == "2026-07-28"


def test_identities_nobody_uses_are_forgotten_when_a_new_one_comes() -> None:
    from workers.transports.streamable_http import StreamableHttpTransport

    server = _server(auth="forward")
    transport = StreamableHttpTransport([server], max_result_bytes=1000, environ={})
    alice = transport.sessions(server, _jwt({"sub": "alice"}))
    alice.users = 1  # a call of alice's is running
    bob = transport.sessions(server, _jwt({"sub": "bob"}))
    assert transport.sessions(server, _jwt({"sub": "alice"})) is alice
    assert set(transport._sessions.values()) == {alice, bob}  # bob never started: nobody uses it, but he is new
    alice.users = 0
    carol = transport.sessions(server, _jwt({"sub": "carol"}))
    assert set(transport._sessions.values()) == {carol}  # neither alice's nor bob's session runs: both forgotten


def test_oauth_client_credentials_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    from config.settings import Settings
    from config.streamable_http_spec import check
    from workers.transports.streamable_http import oauth_provider

    basic = _server(auth="oauth-client-credentials",
                    oauth={"client_id": "sark", "client_secret_env": "DOCS_SECRET", "issuer": "https://auth.example"})
    jwt = _server(auth="oauth-client-credentials", oauth={"client_id": "sark", "method": "private_key_jwt",
                                                           "private_key_env": "DOCS_KEY", "signing_algorithm": "ES256"})
    assert basic.variables() == ["DOCS_SECRET"] and jwt.variables() == ["DOCS_KEY"]
    monkeypatch.delenv("DOCS_SECRET", raising=False)
    monkeypatch.delenv("DOCS_KEY", raising=False)
    assert {(p.level, p.where) for p in check(jwt, Settings())} == {
        ("error", "servers.docs.oauth"), ("warning", "servers.docs.oauth.issuer")}
    monkeypatch.setenv("DOCS_SECRET", "s3cret")
    assert check(basic, Settings()) == []
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warning reaches the worker's log
        provider = oauth_provider(jwt, {"DOCS_KEY": "-----BEGIN PRIVATE KEY-----"})
    assert type(provider).__name__ == "PrivateKeyJWTOAuthProvider"
    assert type(oauth_provider(basic, {"DOCS_SECRET": "s3cret"})).__name__ == "ClientCredentialsOAuthProvider"
