"""The operator's registry of target servers (YAML), and its typed model.

A task names a server; only this registry says how to reach it. stdio servers' commands come
from here and nowhere else, so a task can never carry a command to execute.

Command strings may use two placeholders, expanded when the file is loaded:
``{python}`` (the running interpreter) and ``{bin}`` (the folder holding it, i.e. the venv's bin).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "AccessPolicy",
    "BreakerOverrides",
    "GatewayServer",
    "Registry",
    "RegistryError",
    "ServerConfig",
    "StdioServer",
    "load_registry",
]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"


class RegistryError(ValueError):
    """The registry file is missing or invalid."""


class BreakerOverrides(BaseModel):
    """Per-target circuit-breaker settings (defaults: 5 failures, 60 s)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fail_max: int = Field(default=5, ge=1)
    reset_timeout: float = Field(default=60.0, gt=0)
    enabled: bool = True


class AccessPolicy(BaseModel):
    """Who may call a server: the caller's token must be a JWT whose signature the worker verifies
    (``SARK_AUTH_*`` settings) and whose subject, one of whose teams or one of whose roles is listed.

    A server with a policy refuses every call without such a token (default deny); an empty policy
    (``policy: {}``) lets nobody in. A server without a policy is open to anyone who can enqueue.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    subjects: list[str] = Field(default_factory=list, description="allowed `sub` claims")
    teams: list[str] = Field(default_factory=list, description="allowed teams (the teams claim)")
    roles: list[str] = Field(default_factory=list, description="allowed roles (the roles claim)")


class _ServerBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    timeout: float | None = Field(default=None, gt=0, description="per-call timeout override")
    breaker: BreakerOverrides = BreakerOverrides()
    policy: AccessPolicy | None = Field(default=None, description="who may call it; None: anyone who can enqueue")
    description: str = ""


class GatewayServer(_ServerBase):
    """A server reached through the Gateway REST API (``http``) or its SSE stream (``sse``)."""

    transport: Literal["http", "sse"]
    # The id goes into Gateway URLs (GET /servers/{id}): no "/", no leading "." (so never "." or "..").
    server_id: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@\-]{0,255}$", description="the Gateway's id; defaults to name"
    )

    @property
    def gateway_id(self) -> str:
        """Identifier sent to the Gateway as ``server_id``."""
        return self.server_id or self.name


class StdioServer(_ServerBase):
    """A local MCP server started by the worker as a subprocess speaking MCP over stdio."""

    transport: Literal["stdio"]
    command: str = Field(min_length=1)
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict, description="variables given to the child")
    inherit_env: list[str] = Field(
        default_factory=list, description="names copied from the worker's environment (nothing else is)"
    )
    cwd: Path | None = None
    startup_timeout: float = Field(default=30.0, gt=0)
    max_calls: int | None = Field(default=None, ge=1, description="recycle the process after N calls")
    idle_timeout: float | None = Field(default=None, gt=0, description="stop the process when idle")
    eager: bool = Field(default=False, description="start when the worker starts, not on first use")
    max_concurrency: int = Field(default=64, ge=1, description="calls in flight on one session")
    max_output_bytes: int | None = Field(default=None, gt=0, description="longest answer; default max_result_bytes")
    stop_grace: float = Field(default=2.0, gt=0, description="stop: seconds after closing stdin, then after SIGTERM")

    @field_validator("command", "args", mode="before")
    @classmethod
    def _expand(cls, value: object) -> object:
        if isinstance(value, str):
            return _expand_placeholders(value)
        if isinstance(value, list):
            return [_expand_placeholders(v) if isinstance(v, str) else v for v in value]
        return value


ServerConfig = Annotated[GatewayServer | StdioServer, Field(discriminator="transport")]


def _expand_placeholders(text: str) -> str:
    return text.replace("{python}", sys.executable).replace("{bin}", str(Path(sys.executable).parent))


class Registry(BaseModel):
    """All target servers by name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    servers: dict[str, ServerConfig] = Field(default_factory=dict)

    def get(self, name: str) -> GatewayServer | StdioServer | None:
        """The server called ``name``, or None."""
        return self.servers.get(name)

    def stdio_servers(self) -> list[StdioServer]:
        """Every stdio server, in file order."""
        return [s for s in self.servers.values() if isinstance(s, StdioServer)]


def load_registry(path: Path) -> Registry:
    """Read and validate a registry file.

    The file maps names to server entries under ``servers:``; each entry's ``name`` is its key.

    Raises:
        RegistryError: the file is missing, not YAML, or does not validate.
    """
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise RegistryError(f"cannot read server registry {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise RegistryError(f"{path}: top level must be a mapping with 'servers:'")
    servers = raw.get("servers") or {}
    if not isinstance(servers, dict):
        raise RegistryError(f"{path}: 'servers' must be a mapping of name -> entry")
    entries = {}
    for name, entry in servers.items():
        if not isinstance(entry, dict):
            raise RegistryError(f"{path}: server {name!r} must be a mapping")
        entries[str(name)] = {**entry, "name": str(name)}
    try:
        return Registry.model_validate({**raw, "servers": entries})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors(include_input=False)
        )
        raise RegistryError(f"{path}: invalid server registry: {problems}") from None
