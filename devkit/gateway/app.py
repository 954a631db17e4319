"""The reference Gateway: the REST contract of ``shared/gateway-api.md`` as a Starlette app.

It stands in front of configured MCP servers (built-in tools, and stdio MCP servers once the
stdio transport provides them), checks the API key and the user's bearer JWT, and applies a simple
allow/deny policy so that 401 and 403 paths are real.

Test-only switches, all off by default (a Gateway started without them has no way to reveal what
it received): ``control_api`` serves ``/_control/*``, which lets tests make ``/invoke`` fail, hang or
answer garbage on demand and read counters; ``record_headers`` also keeps the last request headers
(API key and bearer token included) for ``/_control/stats``. It refuses to start without a JWT
secret, and without an API key unless ``insecure_no_api_key`` says so.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hmac
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import jwt
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from devkit.gateway.sse import sse_response
from devkit.gateway.tools import BUILTIN_TOOLS, STREAM_TOOLS, ToolFailure, text_result

__all__ = ["GatewayConfig", "GatewayConfigError", "create_gateway", "load_gateway_config", "make_token"]

DEFAULT_GATEWAY_CONFIG = Path(__file__).resolve().parents[2] / "config" / "gateway.yaml"


class GatewayServerEntry(BaseModel):
    """One server behind the reference Gateway."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["builtin"] = "builtin"
    sensitivity_level: Literal["low", "medium", "high", "critical"] = "medium"
    authorized_teams: list[str] = Field(default_factory=list)
    description: str = ""


class DenyRule(BaseModel):
    """Deny ``tool`` on ``server`` (shell-style globs)."""

    model_config = ConfigDict(extra="forbid")

    server: str = "*"
    tool: str = "*"
    reason: str = "denied by policy"


#: HS256 keys shorter than the hash output are refused (RFC 7518 section 3.2: at least 256 bits).
MIN_JWT_SECRET_CHARS = 32

NO_JWT_SECRET = (
    "no JWT secret: set SARK_GATEWAY_JWT_SECRET, pass --jwt-secret-file, or put jwt_secret in the config file"
)
NO_API_KEY = (
    "no API key: set SARK_GATEWAY_API_KEY (or api_key in the config file); "
    "only a throwaway local Gateway may run without one (--insecure-no-api-key)"
)


class GatewayConfigError(ValueError):
    """The Gateway's configuration is missing a secret or does not validate."""


class GatewayConfig(BaseModel):
    """Reference Gateway configuration (``config/gateway.yaml`` plus environment and flags)."""

    model_config = ConfigDict(extra="forbid")

    api_key: str | None = Field(default=None, repr=False)
    jwt_secret: str = Field(min_length=MIN_JWT_SECRET_CHARS, repr=False)
    insecure_no_api_key: bool = Field(default=False, description="accept any caller when api_key is unset")
    control_api: bool = Field(default=False, description="test-only: serve /_control/*")
    record_headers: bool = Field(default=False, description="test-only: keep request headers for /_control/stats")
    servers: dict[str, GatewayServerEntry] = Field(default_factory=dict)
    deny: list[DenyRule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> GatewayConfig:
        if not self.api_key and not self.insecure_no_api_key:
            raise ValueError(NO_API_KEY)
        if self.record_headers and not self.control_api:
            raise ValueError("record_headers needs control_api (recorded headers are only read through it)")
        return self


def load_gateway_config(path: Path = DEFAULT_GATEWAY_CONFIG, **overrides: Any) -> GatewayConfig:
    """Read the Gateway's YAML config; keyword overrides that are not None win (e.g. ``api_key``).

    Raises:
        GatewayConfigError: no JWT secret, no API key (without ``insecure_no_api_key``), or invalid.
    """
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise GatewayConfigError(f"{path}: top level must be a mapping")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    if not raw.get("jwt_secret"):
        raise GatewayConfigError(NO_JWT_SECRET)
    try:
        return GatewayConfig.model_validate(raw)
    except ValidationError as exc:
        # input values are never echoed: some of them are secrets
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors(include_input=False, include_url=False)
        )
        raise GatewayConfigError(problems) from None


def make_token(secret: str, *, sub: str = "alice", teams: list[str] | None = None, ttl: float = 3600) -> str:
    """A user JWT the reference Gateway accepts (HS256)."""
    now = int(time.time())
    claims = {"sub": sub, "teams": teams or [], "iat": now, "exp": now + int(ttl)}
    return jwt.encode(claims, secret, algorithm="HS256")


@dataclass
class ControlState:
    """What tests set through ``/_control`` and read back."""

    mode: Literal["ok", "fail", "hang", "garbage"] = "ok"
    status: int = 503
    body: str | dict[str, Any] = field(default_factory=lambda: {"error": "injected failure"})
    remaining: int | None = None
    scope: Literal["invoke", "all"] = "invoke"
    invocations: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    discovery_calls: int = 0
    request_ids: Counter[str] = field(default_factory=Counter)
    #: request_id -> [start, end] (seconds, this process's monotonic clock) of each call of a tool, to
    #: tell a repeated call from two running at once (end is None while it runs).
    spans: dict[str, list[list[float | None]]] = field(default_factory=dict)
    headers_seen: list[dict[str, str]] = field(default_factory=list)

    def take(self) -> str:
        """The mode for the next ``/invoke`` (counting down ``remaining``)."""
        if self.mode == "ok":
            return "ok"
        if self.remaining is not None:
            if self.remaining <= 0:
                return "ok"
            self.remaining -= 1
        return self.mode


def _error(status: int, body: str | dict[str, Any]) -> Response:
    if isinstance(body, dict):
        return JSONResponse(body, status_code=status)
    return PlainTextResponse(body, status_code=status)


class ReferenceGateway:
    """Request handlers sharing one config and control state."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.control = ControlState()
        self.started = datetime.now(UTC)

    # --- checks ---------------------------------------------------------------------------------
    def _discovery_gate(self, request: Request) -> Response | None:
        """Key check, then injected failures when the control scope is ``all``."""
        if (denied := self._check_key(request)) is not None:
            return denied
        self.control.discovery_calls += 1
        if self.control.scope == "all" and self.control.take() == "fail":
            return _error(self.control.status, self.control.body)
        return None

    def _check_key(self, request: Request) -> Response | None:
        if self.config.api_key is None:
            return None  # only with insecure_no_api_key (the config refuses it otherwise)
        given = request.headers.get("x-api-key", "").encode()
        if not hmac.compare_digest(given, self.config.api_key.encode()):
            return JSONResponse({"error": "invalid or missing API key"}, status_code=401)
        return None

    def _claims(self, request: Request) -> dict[str, Any] | Response:
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            return JSONResponse({"error": "missing bearer token"}, status_code=401)
        try:
            claims: dict[str, Any] = jwt.decode(auth[7:], self.config.jwt_secret, algorithms=["HS256"])
        except jwt.ExpiredSignatureError:
            return JSONResponse({"error": "token expired"}, status_code=401)
        except jwt.InvalidTokenError:
            return JSONResponse({"error": "invalid token"}, status_code=401)
        return claims

    def _policy(self, server_id: str, tool: str, claims: dict[str, Any]) -> str | None:
        """Reason for denying, or None when allowed."""
        entry = self.config.servers[server_id]
        teams = set(claims.get("teams") or [])
        if entry.authorized_teams and not teams.intersection(entry.authorized_teams):
            return f"user {claims.get('sub')!r} is not in a team authorized for {server_id!r}"
        for rule in self.config.deny:
            if fnmatch.fnmatchcase(server_id, rule.server) and fnmatch.fnmatchcase(tool, rule.tool):
                return rule.reason
        return None

    # --- discovery --------------------------------------------------------------------------------
    def _server_info(self, server_id: str, request: Request) -> dict[str, Any]:
        entry = self.config.servers[server_id]
        return {
            "server_id": server_id,
            "server_name": server_id,
            "server_url": str(request.base_url) + f"servers/{server_id}",
            "sensitivity_level": entry.sensitivity_level,
            "authorized_teams": entry.authorized_teams,
            "access_restrictions": None,
            "health_status": "healthy",
            "tools_count": len(BUILTIN_TOOLS) + len(STREAM_TOOLS),
            "created_at": self.started.isoformat(),
            "updated_at": self.started.isoformat(),
        }

    def _tools(self, server_id: str) -> list[dict[str, Any]]:
        entry = self.config.servers[server_id]
        tools = [
            {
                "tool_name": name,
                "server_name": server_id,
                "description": tool.description,
                "sensitivity_level": entry.sensitivity_level,
                "parameters": tool.parameters,
                "sensitive_params": [],
                "required_capabilities": [],
            }
            for name, tool in BUILTIN_TOOLS.items()
        ]
        tools += [
            {"tool_name": name, "server_name": server_id, "description": "Streams chunks.",
             "sensitivity_level": entry.sensitivity_level}
            for name in STREAM_TOOLS
        ]
        return tools

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "healthy"})

    async def list_servers(self, request: Request) -> Response:
        if (denied := self._discovery_gate(request)) is not None:
            return denied
        return JSONResponse({"servers": [self._server_info(s, request) for s in self.config.servers]})

    async def get_server(self, request: Request) -> Response:
        if (denied := self._discovery_gate(request)) is not None:
            return denied
        server_id = request.path_params["server_id"]
        if server_id not in self.config.servers:
            return JSONResponse({"error": f"server {server_id!r} not found"}, status_code=404)
        return JSONResponse(self._server_info(server_id, request))

    async def list_tools(self, request: Request) -> Response:
        if (denied := self._discovery_gate(request)) is not None:
            return denied
        wanted = request.query_params.get("server_id") or request.query_params.get("server_name")
        servers = [s for s in self.config.servers if wanted in (None, s)]
        return JSONResponse({"tools": [t for s in servers for t in self._tools(s)]})

    # --- invocation -------------------------------------------------------------------------------
    async def invoke(self, request: Request) -> Response:
        if (denied := self._check_key(request)) is not None:
            return denied
        try:
            payload = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"error": "body is not JSON"}, status_code=400)
        if not isinstance(payload, dict):
            return JSONResponse({"error": "body must be an object"}, status_code=400)
        ctl = self.control
        ctl.invocations += 1
        ctl.request_ids[str(payload.get("request_id"))] += 1
        if self.config.record_headers:  # test-only: these hold the API key and the user's token
            ctl.headers_seen = [*ctl.headers_seen[-49:], {k.lower(): v for k, v in request.headers.items()}]
        mode = ctl.take()
        if mode == "fail":
            return _error(ctl.status, ctl.body)
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode == "garbage":
            return Response(b"<html>\x00not json", status_code=200, media_type="application/json")
        claims = self._claims(request)
        if isinstance(claims, Response):
            return claims
        server_id = str(payload.get("server_id", ""))
        tool = str(payload.get("tool_name", ""))
        parameters = payload.get("parameters") or {}
        if server_id not in self.config.servers:
            return JSONResponse({"error": f"unknown server {server_id!r}"}, status_code=404)
        if (reason := self._policy(server_id, tool, claims)) is not None:
            return JSONResponse({"reason": reason}, status_code=403)
        if not isinstance(parameters, dict):
            return JSONResponse({"error": "parameters must be an object"}, status_code=400)
        if payload.get("stream"):
            request_id = str(payload.get("request_id") or "")
            return sse_response(tool, parameters, request_id, request.headers.get("last-event-id"))
        ctl.in_flight += 1
        ctl.max_in_flight = max(ctl.max_in_flight, ctl.in_flight)
        span: list[float | None] = [time.monotonic(), None]
        ctl.spans.setdefault(str(payload.get("request_id")), []).append(span)
        try:
            return await self._call(tool, parameters)
        finally:
            span[1] = time.monotonic()
            ctl.in_flight -= 1

    async def _call(self, tool: str, parameters: dict[str, Any]) -> Response:
        started = time.perf_counter()
        try:
            if tool in BUILTIN_TOOLS:
                result = await BUILTIN_TOOLS[tool].fn(parameters)
            elif tool in STREAM_TOOLS:
                result = text_result({"chunks": [c async for c in STREAM_TOOLS[tool](parameters)]})
            else:
                return JSONResponse({"error": f"unknown tool {tool!r}"}, status_code=404)
        except ToolFailure as failure:
            return _error(failure.status, failure.body)
        result["execution_time_ms"] = round((time.perf_counter() - started) * 1000, 3)
        return JSONResponse(result)

    # --- control (tests only: routed when config.control_api) --------------------------------------
    async def control_mode(self, request: Request) -> Response:
        if (denied := self._check_key(request)) is not None:
            return denied
        body = json.loads(await request.body() or b"{}")
        ctl = self.control
        ctl.mode = body.get("mode", "ok")
        ctl.status = int(body.get("status", 503))
        ctl.body = body.get("body", {"error": "injected failure"})
        ctl.remaining = body.get("remaining")
        ctl.scope = body.get("scope", "invoke")
        return JSONResponse({"mode": ctl.mode, "remaining": ctl.remaining})

    async def control_stats(self, request: Request) -> Response:
        if (denied := self._check_key(request)) is not None:
            return denied
        ctl = self.control
        return JSONResponse(
            {
                "invocations": ctl.invocations,
                "discovery_calls": ctl.discovery_calls,
                "in_flight": ctl.in_flight,
                "max_in_flight": ctl.max_in_flight,
                "request_ids": dict(ctl.request_ids),
                "spans": ctl.spans,
                "headers": ctl.headers_seen,
            }
        )

    async def control_reset(self, request: Request) -> Response:
        if (denied := self._check_key(request)) is not None:
            return denied
        self.control = ControlState()
        return JSONResponse({"reset": True})


def create_gateway(config: GatewayConfig) -> Starlette:
    """The reference Gateway as an ASGI app (``/_control/*`` only when ``config.control_api``)."""
    gateway = ReferenceGateway(config)
    routes = [
        Route("/health", gateway.health),
        Route("/servers", gateway.list_servers),
        Route("/servers/{server_id}", gateway.get_server),
        Route("/tools", gateway.list_tools),
        Route("/invoke", gateway.invoke, methods=["POST"]),
    ]
    if config.control_api:
        routes += [
            Route("/_control/mode", gateway.control_mode, methods=["POST"]),
            Route("/_control/stats", gateway.control_stats),
            Route("/_control/reset", gateway.control_reset, methods=["POST"]),
        ]
    app = Starlette(routes=routes)
    app.state.gateway = gateway
    return app
