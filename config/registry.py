"""The operator's registry of target servers (YAML), and its typed model.

A task names a server; only this registry says how to reach it. stdio servers' commands come
from here and nowhere else, so a task can never carry a command to execute.

Command strings may use two placeholders, expanded when the file is loaded:
``{python}`` (the running interpreter) and ``{bin}`` (the folder holding it, i.e. the venv's bin).
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "AccessPolicy",
    "BreakerOverrides",
    "GatewayServer",
    "Registry",
    "RegistryError",
    "ServerBase",
    "StdioLimits",
    "StdioServer",
    "UnsetVariable",
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


class ServerBase(BaseModel):
    """What every registry entry has, whatever its transport (a transport's server model extends it and
    narrows ``transport`` to a ``Literal`` of its name; see :mod:`config.transports`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    transport: str
    name: str = Field(pattern=NAME_PATTERN)
    timeout: float | None = Field(default=None, gt=0, description="per-call timeout override")
    breaker: BreakerOverrides = BreakerOverrides()
    policy: AccessPolicy | None = Field(default=None, description="who may call it; None: anyone who can enqueue")
    description: str = ""

    def breaker_target(self) -> str:
        """The circuit breaker guarding calls to this server: ``<transport>:<name>`` unless a transport
        says that several entries fail as one (see :mod:`workers.breaker.board`)."""
        return f"{self.transport}:{self.name}"


class GatewayServer(ServerBase):
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

    def breaker_target(self) -> str:
        """``gateway:<server_id>``: the ``http`` and ``sse`` entries of one Gateway server share a breaker."""
        return f"gateway:{self.gateway_id}"


class StdioLimits(BaseModel):
    """Resource limits set on a stdio server process before it runs (``setrlimit``, soft = hard, so the
    server cannot raise them). None keeps the worker's own limit.

    ``cpu_seconds`` counts over the process's whole life, every call included (pair it with ``max_calls``);
    at the limit the kernel sends SIGXCPU, then SIGKILL a second later. ``processes`` (RLIMIT_NPROC)
    counts every process of the server's *user* and the kernel does not enforce it for root: use it with
    ``user:``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    address_space_mb: int | None = Field(default=None, ge=64, description="RLIMIT_AS, in MiB")
    open_files: int | None = Field(default=None, ge=16, description="RLIMIT_NOFILE")
    cpu_seconds: int | None = Field(default=None, ge=1, description="RLIMIT_CPU, over the process's life")
    processes: int | None = Field(default=None, ge=1, description="RLIMIT_NPROC, per user; not for root")


class UnsetVariable(LookupError):
    """A ``${NAME}`` of a stdio server's ``env`` is not set in the worker's environment."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class StdioServer(ServerBase):
    """A local MCP server started by the worker as a subprocess speaking MCP over stdio.

    The child's environment is exactly ``inherit_env`` (names copied from the worker's environment) plus
    ``env``. A value of ``env`` may hold ``${NAME}`` placeholders, anywhere in it (``"Bearer ${API_TOKEN}"``),
    replaced when the server starts from the worker's environment as it was when the worker started,
    in one pass (a replacement is never expanded again). Any other ``${`` is refused, so a literal
    ``${`` cannot be written. The worker's own secrets (``SARK_TOKEN_KEY``… see
    :mod:`config.worker_secrets`) are never available to ``${NAME}`` nor to ``inherit_env``.

    ``user``/``group`` (names or numeric ids) run the server under another identity, with the user's
    groups; the worker must be root. ``limits`` caps the server's resources (:class:`StdioLimits`).
    """

    transport: Literal["stdio"]
    command: str = Field(min_length=1)
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict, description="variables given to the child; ${NAME} expanded")
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
    limits: StdioLimits = Field(default_factory=StdioLimits, description="resource limits of the process")
    user: str | None = Field(default=None, min_length=1, description="run as this user (name or uid)")
    group: str | None = Field(default=None, min_length=1, description="with this group (default: the user's)")

    @field_validator("command", "args", mode="before")
    @classmethod
    def _expand(cls, value: object) -> object:
        if isinstance(value, str):
            return _expand_placeholders(value)
        if isinstance(value, list):
            return [_expand_placeholders(v) if isinstance(v, str) else v for v in value]
        return value

    @field_validator("env")
    @classmethod
    def _placeholders_well_formed(cls, env: dict[str, str]) -> dict[str, str]:
        for name, value in env.items():
            if "${" in _VARIABLE.sub("", value):
                raise ValueError(f"env.{name}: '${{' must start a ${{NAME}} placeholder (letters, digits, _)")
        return env

    @model_validator(mode="after")
    def _group_needs_user(self) -> StdioServer:
        if self.group is not None and self.user is None:
            raise ValueError("group is only used together with user")
        return self

    def identity(self) -> tuple[int, int, list[int]] | None:
        """``(uid, gid, groups)`` the server runs as; None: the worker's own.

        Raises:
            LookupError: the user or the group does not exist (a bare number needs no entry).
        """
        if self.user is None:
            return None
        entry = _passwd(self.user)
        if entry is None and not self.user.isdigit():
            raise LookupError(f"user {self.user!r} does not exist")
        uid = entry.pw_uid if entry else int(self.user)
        if self.group is not None:
            found = _group(self.group)
            if found is None and not self.group.isdigit():
                raise LookupError(f"group {self.group!r} does not exist")
            gid = found.gr_gid if found else int(self.group)
        elif entry is not None:
            gid = entry.pw_gid
        else:
            raise LookupError(f"user {self.user!r} has no passwd entry: name a group too")
        groups = os.getgrouplist(entry.pw_name, gid) if entry else [gid]
        return uid, gid, sorted(set(groups))

    def variables(self) -> list[str]:
        """Names the ``env`` values refer to as ``${NAME}``, in order, each once."""
        return list(dict.fromkeys(m.group(1) for value in self.env.values() for m in _VARIABLE.finditer(value)))

    def child_env(self, environ: Mapping[str, str]) -> dict[str, str]:
        """The child's whole environment, taking ``inherit_env`` and ``${NAME}`` from ``environ``.

        Raises:
            UnsetVariable: a ``${NAME}`` is not in ``environ`` (its name only: values are never shown).
        """
        env = {name: environ[name] for name in self.inherit_env if name in environ}

        def value_of(match: re.Match[str]) -> str:
            try:
                return environ[match.group(1)]
            except KeyError:
                raise UnsetVariable(match.group(1)) from None

        env.update({name: _VARIABLE.sub(value_of, value) for name, value in self.env.items()})
        return env


def _passwd(user: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        pass
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else None
    except KeyError:
        return None


def _group(group: str) -> grp.struct_group | None:
    try:
        return grp.getgrnam(group)
    except KeyError:
        pass
    try:
        return grp.getgrgid(int(group)) if group.isdigit() else None
    except KeyError:
        return None


def _expand_placeholders(text: str) -> str:
    return text.replace("{python}", sys.executable).replace("{bin}", str(Path(sys.executable).parent))


class Registry(BaseModel):
    """All target servers by name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # SerializeAsAny: a dump keeps each entry's own fields (command, url…), not only ServerBase's.
    servers: dict[str, SerializeAsAny[ServerBase]] = Field(default_factory=dict)

    @field_validator("servers", mode="before")
    @classmethod
    def _entries_by_transport(cls, servers: object) -> object:
        """Entries given as mappings are validated by the server model of their ``transport``; entries given
        as models must be instances of that model (a bare ``ServerBase``, or a transport the catalog lacks,
        is refused here rather than at the first call)."""
        if not isinstance(servers, dict):
            return servers
        if not all(isinstance(v, ServerBase) for v in servers.values()):
            return _servers_adapter().validate_python(servers)
        from config.transports import UnknownTransport, get_spec

        for name, server in servers.items():
            try:
                model = get_spec(server.transport).server_model
            except UnknownTransport as exc:
                raise ValueError(f"server {name!r}: {exc}") from None
            if not isinstance(server, model):
                raise ValueError(f"server {name!r}: a {server.transport} server must be a {model.__name__}, "
                                 f"not a {type(server).__name__}")
        return servers

    def get(self, name: str) -> ServerBase | None:
        """The server called ``name``, or None."""
        return self.servers.get(name)

    def of_transport(self, *names: str) -> list[ServerBase]:
        """Every server registered with one of the transports ``names``, in file order."""
        return [s for s in self.servers.values() if s.transport in names]


def _servers_adapter() -> TypeAdapter[dict[str, ServerBase]]:
    """Validates a mapping of entries, each by the server model its ``transport`` names (the catalog's).

    Built once per catalog and published as one (models, adapter) pair: concurrent first calls (a client's
    threads enqueueing at once) each see a whole pair, never half of one.

    Raises:
        RegistryError: the catalog cannot be loaded (a plug-in that does not import or is not valid).
    """
    from config.transports import catalog

    try:
        specs = catalog()
    except (ImportError, ValueError, TypeError, AttributeError) as exc:
        raise RegistryError(f"transport catalog: {exc}") from exc
    models = tuple(dict.fromkeys(spec.server_model for spec in specs.values()))
    built = _adapter
    if built is None or built[0] != models:
        entry: Any = models[0]
        if len(models) > 1:
            entry = Annotated[Union[models], Field(discriminator="transport")]  # noqa: UP007
        built = (models, TypeAdapter(dict[str, entry]))
        _publish_adapter(built)
    return built[1]


def _publish_adapter(built: tuple[tuple[type[ServerBase], ...], TypeAdapter[dict[str, ServerBase]]]) -> None:
    global _adapter
    _adapter = built  # one assignment: readers see the old pair or the new one


_adapter: tuple[tuple[type[ServerBase], ...], TypeAdapter[dict[str, ServerBase]]] | None = None


def load_registry(path: Path) -> Registry:
    """Read and validate a registry file.

    The file maps names to server entries under ``servers:``; each entry's ``name`` is its key.

    Raises:
        RegistryError: the file is missing, not YAML, or does not validate.
    """
    try:
        with path.open(encoding="utf-8") as stream:  # from the file: YAML errors name it, not "<unicode string>"
            raw = yaml.safe_load(stream) or {}
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
