"""The ``streamable-http`` transport's registry schema and catalog entry (light: clients import it to route).

A registry entry ``transport: streamable-http`` names an MCP server reached over Streamable HTTP with the
official ``mcp`` SDK's client (the transport is :mod:`workers.transports.streamable_http`)::

    servers:
      docs:
        transport: streamable-http
        url: https://mcp.example.com/mcp          # may read the environment: ${DOCS_URL:-https://…}
        headers: {X-Api-Key: DOCS_API_KEY}     # header name -> NAME of a worker environment variable
        auth: bearer-env                         # none | bearer-env | forward | oauth-client-credentials
        token_env: DOCS_TOKEN                    # bearer-env: the variable holding the token
        # oauth-client-credentials instead: the fleet's own OAuth client (machine to machine)
        # oauth: {client_id: sark, method: client_secret_basic, client_secret_env: DOCS_SECRET,
        #         issuer: https://auth.example.com}
        protocol_version: "2025-11-25"           # optional pin; default: negotiate

``auth: forward`` sends the caller's own token to the server. The MCP security guidance forbids blind
token passthrough (the server may be anyone's; a token minted for SARK would be replayable there), so it
is an explicit choice per server, for servers that accept the same identity provider's tokens.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from config.registry import ServerBase
from config.transports import TransportSpec

if TYPE_CHECKING:
    from config.check import Problem
    from config.settings import Settings

__all__ = ["TRANSPORT", "OAuthClientCredentials", "StreamableHttpServer", "check"]

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_URL_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
# Headers the transport (or the SDK) owns: a registry entry may not set them.
_RESERVED = {"authorization", "content-type", "accept", "mcp-session-id", "mcp-protocol-version",
             "last-event-id", "host", "content-length"}


class OAuthClientCredentials(BaseModel):
    """OAuth 2.1 client credentials of the worker fleet for one server (``auth: oauth-client-credentials``).

    The authorization server is discovered from the MCP server (its 401 names the protected resource
    metadata, which names the authorization server, whose metadata names the token endpoint); the token is
    kept per worker process and renewed when it expires. Secrets are named by environment variable only.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    client_id: str = Field(min_length=1, description="the client id the authorization server issued")
    method: Literal["client_secret_basic", "client_secret_post", "private_key_jwt"] = Field(
        default="client_secret_basic", description="how the client authenticates at the token endpoint")
    client_secret_env: str | None = Field(
        default=None, description="client_secret_basic/post: the variable holding the client secret")
    private_key_env: str | None = Field(
        default=None, description="private_key_jwt: the variable holding the PEM private key that signs assertions")
    signing_algorithm: Literal["RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256"] = Field(
        default="RS256", description="private_key_jwt: the assertion's algorithm")
    scope: str | None = Field(default=None, description="space-separated scopes to ask for")
    issuer: str | None = Field(
        default=None, description="the authorization server's issuer: the credentials are sent nowhere else")

    @model_validator(mode="after")
    def _secret_for_method(self) -> OAuthClientCredentials:
        needed, other = ("private_key_env", "client_secret_env") if self.method == "private_key_jwt" else (
            "client_secret_env", "private_key_env")
        value = getattr(self, needed)
        if not value or not _ENV_NAME.match(value):
            raise ValueError(f"oauth method {self.method} needs {needed}: the NAME of an environment variable")
        if getattr(self, other) is not None:
            raise ValueError(f"oauth method {self.method} does not use {other}")
        if self.issuer is not None and urlsplit(self.issuer).scheme not in ("http", "https"):
            raise ValueError("oauth.issuer must be the authorization server's http(s) issuer URL")
        return self

    def variables(self) -> list[str]:
        """The environment variables it reads."""
        return [v for v in (self.client_secret_env, self.private_key_env) if v]


class StreamableHttpServer(ServerBase):
    """An MCP server reached over Streamable HTTP (both the 2025-11-25 handshake and 2026-07-28 stateless)."""

    transport: Literal["streamable-http"]
    url: str = Field(min_length=1, description="the MCP endpoint (http or https)")
    headers: dict[str, str] = Field(
        default_factory=dict, description="header name -> NAME of the worker environment variable sent as its value")
    auth: Literal["none", "bearer-env", "forward", "oauth-client-credentials"] = Field(
        default="none", description="none | bearer-env (token_env) | forward (the caller's token; opt-in) | "
        "oauth-client-credentials (oauth)")
    token_env: str | None = Field(default=None, description="bearer-env: the variable holding the bearer token")
    oauth: OAuthClientCredentials | None = Field(
        default=None, description="oauth-client-credentials: the fleet's client credentials")
    # Only revisions the SDK client can speak on request: its handshake always offers 2025-11-25, so an
    # older pin could never be honoured (every call would fail the check).
    protocol_version: Literal["2025-11-25", "2026-07-28"] | None = Field(
        default=None, description="the revision the session speaks (2025-11-25 or 2026-07-28); default: negotiate")
    startup_timeout: float = Field(default=10.0, gt=0, description="seconds for connect + handshake")
    max_concurrency: int = Field(default=64, ge=1, description="calls in flight on one session")
    idle_timeout: float | None = Field(default=300.0, gt=0, description="close a session idle this long")

    @field_validator("url", mode="before")
    @classmethod
    def _url_variables(cls, url: object) -> object:
        """``${NAME}`` and ``${NAME:-default}`` in the url are read from the environment when the registry is
        loaded (one registry for a laptop and a compose network; a client needs the default or the variable)."""
        if not isinstance(url, str):
            return url

        def value_of(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            value = os.environ.get(name)
            if value:
                return value
            if default is None:
                raise ValueError(f"url: ${{{name}}} is not set (give a default: ${{{name}:-http://…}})")
            return default

        return _URL_VARIABLE.sub(value_of, url)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be an http:// or https:// URL with a host")
        if parts.username or parts.password:
            raise ValueError("url must not hold credentials (use headers or auth)")
        return url

    @field_validator("headers")
    @classmethod
    def _header_variables(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, variable in headers.items():
            if not _HEADER_NAME.match(name) or name.lower() in _RESERVED:
                raise ValueError(f"headers.{name}: not a header an entry may set")
            if not _ENV_NAME.match(variable):
                raise ValueError(f"headers.{name}: the value names an environment variable (letters, digits, _), "
                                 "never a literal value")
        return headers

    @model_validator(mode="after")
    def _auth_fields(self) -> StreamableHttpServer:
        if self.auth == "bearer-env":
            if not self.token_env or not _ENV_NAME.match(self.token_env):
                raise ValueError("auth bearer-env needs token_env: the NAME of an environment variable")
        elif self.token_env is not None:
            raise ValueError("token_env is only used with auth: bearer-env")
        if self.auth == "oauth-client-credentials" and self.oauth is None:
            raise ValueError("auth oauth-client-credentials needs an oauth: block (client_id, method, secret variable)")
        if self.auth != "oauth-client-credentials" and self.oauth is not None:
            raise ValueError("oauth is only used with auth: oauth-client-credentials")
        return self

    def variables(self) -> list[str]:
        """Every environment variable the entry names (headers, bearer token, OAuth secret)."""
        names = list(self.headers.values())
        if self.token_env:
            names.append(self.token_env)
        if self.oauth is not None:
            names.extend(self.oauth.variables())
        return names


def check(server: ServerBase, settings: Settings) -> list[Problem]:
    """check-config: the named variables are set and are not the worker's secrets; warn on forwarded tokens
    and on bearer tokens sent in clear over the network."""
    from config.check import Problem
    from config.worker_secrets import is_worker_secret

    if not isinstance(server, StreamableHttpServer):
        return []
    where = f"servers.{server.name}"
    problems: list[Problem] = []
    named = [(f"{where}.headers.{h}", v) for h, v in server.headers.items()]
    if server.token_env:
        named.append((f"{where}.token_env", server.token_env))
    if server.oauth is not None:
        named.extend((f"{where}.oauth", name) for name in server.oauth.variables())
        if server.oauth.issuer is None:
            problems.append(Problem("warning", f"{where}.oauth.issuer", "without issuer, the credentials go to "
                                    "whichever authorization server the MCP server names; set it"))
    for place, name in named:
        if is_worker_secret(name, os.environ.get(name)):
            problems.append(Problem("error", place, f"{name} is a secret of the worker itself; it is never sent"))
        elif not os.environ.get(name):
            problems.append(Problem("error", place, f"{name} is not set in the worker's environment"))
    host = urlsplit(server.url).hostname or ""
    if server.auth != "none" and server.url.startswith("http://") and host not in ("127.0.0.1", "::1", "localhost"):
        problems.append(Problem("warning", f"{where}.url", "a bearer token would cross the network in clear (http://)"))
    if server.auth == "forward":
        problems.append(Problem("warning", f"{where}.auth", "the caller's own token is sent to this server "
                                "(forward): only for servers of the same identity provider"))
    return problems


TRANSPORT = TransportSpec(
    name="streamable-http", server_model=StreamableHttpServer, factory="workers.transports.streamable_http:build",
    check="config.streamable_http_spec:check",
    description="MCP servers over Streamable HTTP (official SDK client), warm sessions per identity",
)
