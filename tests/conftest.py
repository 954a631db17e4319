"""Session-wide real parts: one redis-server, one reference Gateway, one celery worker.

Started once per test session (never per test) on free loopback ports; tests that need their
own processes (restarts, kills, several workers) start them from ``stack``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from celery import Celery

from config.settings import get_settings
from devkit.stack import DEFAULT_API_KEY, DEFAULT_JWT_SECRET, DevStack, Proc


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    """Redis + reference Gateway, and the ``SARK_*`` environment pointing at them."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("SARK_")}
    workdir: Path = tmp_path_factory.mktemp("stack")
    registry = Path(__file__).with_name("servers.yaml")
    with DevStack(workdir, extra_env={"SARK_REGISTRY_PATH": str(registry)}) as st:
        st.start(record_headers=True)  # some tests check the headers the Gateway received
        st.apply_env()
        # Settings read before the stack existed (a unit test importing workers.app) point at 6379.
        get_settings.cache_clear()
        yield st
    for key in [k for k in os.environ if k.startswith("SARK_")]:
        del os.environ[key]
    os.environ.update(saved)
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def worker(stack: DevStack) -> Proc:
    """The session's shared worker (threads pool, every queue)."""
    return stack.worker("shared", concurrency=8)


@pytest.fixture(scope="session")
def celery_client(stack: DevStack) -> Iterator[Celery]:
    """A Celery app in the test process, as another application would have it."""
    from config.settings import Settings
    from workers.app import create_app

    app = create_app(Settings())
    yield app
    app.close()


@pytest.fixture(scope="session")
def user_token() -> str:
    """A valid user JWT (team ``users``)."""
    from devkit.gateway import make_token

    return make_token(DEFAULT_JWT_SECRET, sub="alice", teams=["users"])


@pytest.fixture(scope="session")
def admin_token() -> str:
    """A valid user JWT in the ``admins`` team."""
    from devkit.gateway import make_token

    return make_token(DEFAULT_JWT_SECRET, sub="root", teams=["admins"])


class GatewayControl:
    """Drives the reference Gateway's ``/_control`` endpoints."""

    def __init__(self, url: str) -> None:
        self._http = httpx.Client(base_url=url, headers={"X-API-Key": DEFAULT_API_KEY}, timeout=5)

    def mode(self, mode: str, **kwargs: Any) -> None:
        self._http.post("/_control/mode", json={"mode": mode, **kwargs}).raise_for_status()

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = self._http.get("/_control/stats").raise_for_status().json()
        return data

    def reset(self) -> None:
        self._http.post("/_control/reset").raise_for_status()


@pytest.fixture()
def gateway_control(stack: DevStack) -> Iterator[GatewayControl]:
    """Control of the session Gateway, reset before and after the test."""
    assert stack.gateway is not None
    control = GatewayControl(stack.gateway.url)
    control.reset()
    yield control
    control.reset()
