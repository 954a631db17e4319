"""Configuration checker (``sark check-config``): the plan's "policy validation", applied to workers.

Finds what would make a worker unsafe or broken before it starts: settings that do not validate, registry
entries with unknown keys, stdio commands that are relative, missing or shells, secrets written inline
in the registry, and timeouts that cannot work (above the maximum or the broker's visibility timeout).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from config.registry import Registry, RegistryError, ServerBase, StdioServer, load_registry
from config.settings import Settings
from config.transports import PLUGINS_VARIABLE, catalog, get_spec, load_object
from config.worker_secrets import is_worker_secret

__all__ = ["Problem", "check_config", "check_registry", "check_security", "check_stdio"]

SHELLS = {"sh", "bash", "dash", "zsh", "ksh", "csh", "tcsh", "fish", "busybox", "env", "cmd", "powershell", "pwsh"}
_SECRET_NAME = re.compile(r"(?i)(token|secret|password|passwd|api[_-]?key|private[_-]?key|credential)")
_PLACEHOLDER = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")


@dataclass(frozen=True)
class Problem:
    """One finding; ``error`` stops a worker from starting, ``warning`` does not."""

    level: Literal["error", "warning"]
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.where}: {self.message}"


def check_stdio(server: ServerBase, settings: Settings) -> list[Problem]:
    """Problems of one stdio server entry (the ``check`` of the ``stdio`` transport)."""
    if not isinstance(server, StdioServer):
        return []
    where = f"servers.{server.name}"
    problems: list[Problem] = []
    command = Path(server.command)
    if not command.is_absolute():
        problems.append(Problem("error", where, f"command {server.command!r} must be an absolute path "
                                                "(or start with {bin} / {python})"))
    elif not (command.is_file() and os.access(command, os.X_OK)):
        problems.append(Problem("error", where, f"command {server.command!r} is not an executable file"))
    if command.name in SHELLS or any(arg in ("-c", "/c") for arg in server.args[:1]):
        problems.append(Problem("error", where, f"command {command.name!r} is a shell; name the server binary"))
    for name, value in server.env.items():
        if _SECRET_NAME.search(name) and not _PLACEHOLDER.match(value):
            problems.append(Problem("error", f"{where}.env.{name}",
                                    "secret written inline; list it in inherit_env instead"))
    if server.cwd is not None and not server.cwd.is_absolute():
        problems.append(Problem("error", f"{where}.cwd", "cwd must be an absolute path"))
    if server.startup_timeout >= settings.visibility_timeout:
        problems.append(Problem("error", f"{where}.startup_timeout", "must be below visibility_timeout"))
    problems.extend(_check_stdio_environment(server, where))
    problems.extend(_check_stdio_identity(server, where))
    return problems


def _check_stdio_environment(server: StdioServer, where: str) -> list[Problem]:
    """``${NAME}`` must be set, and neither it nor ``inherit_env`` may name a worker secret (names only)."""
    problems: list[Problem] = []
    for name in server.variables():
        if is_worker_secret(name, os.environ.get(name)):
            problems.append(Problem("error", f"{where}.env", f"${{{name}}} is a secret of the worker itself; "
                                                             "it is never given to a stdio server"))
        elif name not in os.environ:
            problems.append(Problem("error", f"{where}.env", f"${{{name}}} is not set in the worker's environment"))
    for name in server.inherit_env:
        if is_worker_secret(name, os.environ.get(name)):
            problems.append(Problem("error", f"{where}.inherit_env", f"{name} is a secret of the worker itself; "
                                                                     "it is never given to a stdio server"))
    return problems


def _check_stdio_identity(server: StdioServer, where: str) -> list[Problem]:
    """``user``/``group`` must exist and the worker must be able to switch to them."""
    try:
        identity = server.identity()
    except LookupError as exc:
        return [Problem("error", f"{where}.user", str(exc))]
    if identity is None:
        if server.limits.processes is not None and os.geteuid() == 0:
            return [Problem("warning", f"{where}.limits.processes", "not enforced for a server running as root: "
                                                                    "set user too")]
        return []
    uid, gid, groups = identity
    if os.geteuid() != 0 and (uid, gid) != (os.geteuid(), os.getegid()):
        return [Problem("error", f"{where}.user", f"the worker runs as uid {os.geteuid()}, not root: it cannot "
                                                  f"switch to uid {uid} gid {gid}")]
    command = Path(server.command)
    if command.is_absolute() and command.exists() and not _may_execute(command, uid, {gid, *groups}):
        return [Problem("warning", f"{where}.user", f"uid {uid} may not execute {server.command} (or a folder above "
                                                    "it, or its symlink target, is closed to it)")]
    return []


def _may_execute(path: Path, uid: int, gids: set[int]) -> bool:
    """Mode bits only (ACLs are not read): x on ``path``, its target and every folder above either."""
    if uid == 0:
        return True
    real = path.resolve()
    steps = [*reversed(path.parents), *reversed(real.parents), real]
    for step in steps:
        info = step.stat()
        if info.st_uid == uid:
            bit = stat.S_IXUSR
        elif info.st_gid in gids:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return False
    return True


def check_registry(registry: Registry, settings: Settings) -> list[Problem]:
    """Problems of an already-parsed registry against ``settings``."""
    problems: list[Problem] = []
    if not registry.servers:
        problems.append(Problem("warning", "servers", "the registry names no server: every invocation will fail"))
    for server in registry.servers.values():
        if server.timeout is not None and server.timeout > settings.max_invoke_timeout:
            problems.append(Problem("error", f"servers.{server.name}.timeout",
                                    f"{server.timeout:g}s exceeds max_invoke_timeout {settings.max_invoke_timeout:g}s"))
        check = get_spec(server.transport).check
        if check is not None:
            problems.extend(load_object(check)(server, settings))
    return problems


def check_config(registry_path: Path | None = None) -> list[Problem]:
    """Validate the settings (environment) and the registry file; return every problem found."""
    try:
        settings = Settings()
    except ValidationError as exc:
        return [Problem("error", "settings", "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors(include_input=False)
        ))]
    try:
        catalog()
    except (ImportError, ValueError) as exc:
        return [Problem("error", PLUGINS_VARIABLE, str(exc))]
    path = registry_path or settings.registry_path
    try:
        registry = load_registry(path)
    except RegistryError as exc:  # its message names the file already
        return [Problem("error", "registry", str(exc))]
    problems = check_registry(registry, settings)
    problems.extend(check_security(registry, settings))
    return problems


def check_security(registry: Registry, settings: Settings) -> list[Problem]:
    """Settings that would let tokens travel in clear, or leave a policy or an operator task unenforceable."""
    problems: list[Problem] = []
    if settings.gateway_api_key is None:
        problems.append(Problem("warning", "settings.gateway_api_key", "no X-API-Key will be sent to the Gateway"))
    if settings.token_key is None:
        problems.append(Problem("warning", "settings.token_key",
                                "no SARK_TOKEN_KEY: user tokens cannot be sealed and would travel in clear through "
                                "the broker (and its AOF file); generate one with `sark keygen`"))
    if settings.allow_clear_tokens:
        problems.append(Problem("warning", "settings.allow_clear_tokens",
                                "clear (unsealed) user tokens are accepted: anyone reading the broker reads them"))
    elif settings.token_key is None:
        problems.append(Problem("warning", "settings.allow_clear_tokens",
                                "without SARK_TOKEN_KEY every invocation that carries a token will be refused"))
    if settings.token_ttl <= settings.visibility_timeout:
        problems.append(Problem("warning", "settings.token_ttl",
                                f"{settings.token_ttl}s is not above visibility_timeout "
                                f"({settings.visibility_timeout}s): an invocation redelivered after a lost worker "
                                "would find its sealed token expired"))
    if settings.operator_key is None:
        problems.append(Problem("warning", "settings.operator_key",
                                "no SARK_OPERATOR_KEY: the sark.breakers task refuses every reset (the CLI, which "
                                "talks to Redis directly, still works)"))
    verifies = settings.auth_hs256_secret or settings.auth_public_key or settings.auth_jwks_path
    if verifies and any(server.policy is not None for server in registry.servers.values()) and not (
            settings.auth_audience or settings.auth_issuer):
        problems.append(Problem("warning", "settings.auth_audience",
                                "policies accept any token the key verifies, whatever service it was issued for: "
                                "set SARK_AUTH_AUDIENCE and/or SARK_AUTH_ISSUER"))
    for server in registry.servers.values():
        if server.policy is not None and not verifies:
            problems.append(Problem("error", f"servers.{server.name}.policy",
                                    "a policy needs a key to verify user tokens: set SARK_AUTH_HS256_SECRET, "
                                    "SARK_AUTH_PUBLIC_KEY or SARK_AUTH_JWKS_PATH"))
    for name in ("gateway_api_key", "operator_key", "auth_hs256_secret"):
        value = getattr(settings, name)
        if value is not None and len(value.get_secret_value()) < 16:
            problems.append(Problem("warning", f"settings.{name}", "shorter than 16 characters: easy to guess, "
                                    "and too short to be scrubbed reliably from error messages"))
    return problems
