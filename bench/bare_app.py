"""The floor: a bare Celery app with the same broker/backend settings and no sark machinery.

``bare.noop`` does nothing; ``bare.post`` does one httpx POST (pooled client) to the URL it is given;
``bare.mcp_time`` calls ``get_current_time`` on a warm ``mcp-server-time`` session that the worker process
keeps on an asyncio loop of its own (:class:`bench.direct_mcp.DirectSession`): the stdio path with the
same architecture as sark's (one loop per process, a task thread handing the call to it) and none of
sark's machinery (validation, registry, breaker, own pipe layer).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import httpx
from celery import Celery

url = os.environ["SARK_BROKER_URL"]
app = Celery("bare", broker=url, backend=os.environ.get("SARK_RESULT_BACKEND") or os.environ["SARK_REDIS_URL"])
app.conf.update(
    task_serializer="json", result_serializer="json", accept_content=["json"], result_accept_content=["json"],
    task_acks_late=True, worker_prefetch_multiplier=1, task_default_queue="bare",
    worker_hijack_root_logger=False,
)
_local = threading.local()
_session_lock = threading.Lock()
_session: Any = None


def _client() -> httpx.Client:
    client = getattr(_local, "client", None)
    if client is None:
        client = _local.client = httpx.Client(timeout=30)
    return client


@app.task(name="bare.noop")
def noop() -> None:
    """Nothing at all."""


@app.task(name="bare.post")
def post(target: str, payload: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    """One POST, returning the JSON answer."""
    response = _client().post(target, json=payload, headers=headers)
    response.raise_for_status()
    data: dict[str, Any] = response.json()
    return data


@app.task(name="bare.mcp_time")
def mcp_time() -> dict[str, Any]:
    """``get_current_time`` on this process's warm SDK session (started on first use)."""
    global _session
    with _session_lock:
        if _session is None:
            from bench.direct_mcp import DirectSession

            _session = DirectSession()
    result: dict[str, Any] = _session.call()
    return result
