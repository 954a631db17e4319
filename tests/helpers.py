"""Small helpers shared by the integration tests."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from celery import Celery
from celery.result import AsyncResult

from config.settings import Settings
from workers.contract import TASK_INVOKE, TOKEN_HEADER


def settings_with(env: Mapping[str, str]) -> Settings:
    """Settings as a worker started with ``env`` reads them: this process's ``SARK_*`` with ``env`` on top."""
    merged = {**{k: v for k, v in os.environ.items() if k.startswith("SARK_")}, **env}
    return Settings(**{k.removeprefix("SARK_").lower(): v for k, v in merged.items() if k.startswith("SARK_")})


def send_invoke(
    app: Celery,
    server: str,
    tool: str,
    arguments: dict[str, Any] | None = None,
    *,
    token: str | None = None,
    **fields: Any,
) -> AsyncResult:
    """Enqueue ``sark.invoke`` by name, exactly as an app without this project would."""
    invocation: dict[str, Any] = {"server": server, "tool": tool, "arguments": arguments or {}, **fields}
    headers = {TOKEN_HEADER: token} if token else None
    return app.send_task(TASK_INVOKE, kwargs={"invocation": invocation}, headers=headers)


def invoke(app: Celery, server: str, tool: str, arguments: dict[str, Any] | None = None, *,
           token: str | None = None, wait: float = 30, **fields: Any) -> dict[str, Any]:
    """Enqueue and wait for the result (re-raising the task's typed error)."""
    result: dict[str, Any] = send_invoke(app, server, tool, arguments, token=token, **fields).get(timeout=wait)
    return result
