"""Which environment variables hold the worker's own secrets (never handed to a stdio server).

A variable is a worker secret when it is a ``SARK_*`` variable and either backs a ``SecretStr`` setting,
is one of the reference Gateway's secrets, has a name that looks secret, or holds a URL with a password
(``redis://:pw@host``: whoever reads it can read every queued invocation and its sealed token).
"""

from __future__ import annotations

import re
from typing import get_args
from urllib.parse import urlsplit

from pydantic import SecretStr

from config.settings import Settings

__all__ = ["WORKER_SECRETS", "is_worker_secret", "url_password"]


def _secret_settings() -> set[str]:
    names = set()
    for name, field in Settings.model_fields.items():
        if field.annotation is SecretStr or SecretStr in get_args(field.annotation):
            names.add(f"SARK_{name.upper()}")
    return names


#: ``SARK_*`` names of every ``SecretStr`` setting, plus the reference Gateway's secrets.
WORKER_SECRETS = frozenset(_secret_settings() | {"SARK_GATEWAY_API_KEY", "SARK_GATEWAY_JWT_SECRET"})

# Over-matching is harmless: the worker holds its settings before the variables are scrubbed.
_SECRET_LOOKING = re.compile(r"(?i)(secret|passw(or)?d|credential|api_?key|private_?key|_key$|_token$|_dsn$)")


def is_worker_secret(name: str, value: str | None = None) -> bool:
    """True when the variable ``name`` (holding ``value``, if known) is one of the worker's secrets."""
    if not name.startswith("SARK_"):
        return False
    if name in WORKER_SECRETS or _SECRET_LOOKING.search(name):
        return True
    return value is not None and _has_password(value)


def _has_password(value: str) -> bool:
    if "://" not in value:
        return False
    return url_password(value) is not None or "password=" in value.lower()


def url_password(value: str) -> str | None:
    """The password of a URL (``redis://:pw@host`` or ``…?password=pw``), if it has one."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return value  # an unparsable URL-like value: treat it whole as the secret rather than guess
    if parts.password:
        return parts.password
    for pair in parts.query.split("&"):
        name, _, secret = pair.partition("=")
        if name.lower() == "password" and secret:
            return secret
    return None
