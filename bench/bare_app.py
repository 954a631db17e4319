"""The floor: a bare Celery app with the same broker/backend settings and no sark machinery.

``bare.noop`` does nothing; ``bare.post`` does one httpx POST (pooled client) to the URL it is given.
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
