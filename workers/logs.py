"""Structured logging: one JSON object per line, with task id and request id, secrets redacted.

Installed on the worker through Celery's ``setup_logging`` signal (so Celery leaves logging to us).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from workers.scrub import scrub

__all__ = ["JsonFormatter", "RedactingFilter", "configure_logging", "redact"]

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def redact(text: str) -> str:
    """``text`` with every secret the process holds (:mod:`workers.scrub`), JWTs, bearer tokens and
    ``key=value`` secrets replaced by ``[REDACTED]``."""
    return scrub(text)


class RedactingFilter(logging.Filter):
    """Redacts secrets in the formatted message of every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "_redacted", False):
            # Formatted and redacted once; formatters then read the clean text as it is.
            record.msg, record.args = redact(record.getMessage()), None
            record._redacted = True
        return True


def _task_fields() -> dict[str, Any]:
    try:
        from celery import current_task
    except ImportError:  # pragma: no cover
        return {}
    task = current_task
    if task is None or not getattr(task, "request", None) or task.request.id is None:
        return {}
    return {"task_id": task.request.id, "task_name": task.name, "request_id": task.request.id}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message, task/request ids, extras."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage() if getattr(record, "_redacted", False) else redact(record.getMessage()),
            "process": record.process,
            "thread": record.threadName,
        }
        data.update(_task_fields())
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in data:
                data[key] = value
        if record.exc_info:
            data["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(data, default=str)


def configure_logging(level: str = "INFO", json_lines: bool = True) -> None:
    """Send every log record to stderr, as JSON lines (or plain text), with secrets redacted."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(
        JsonFormatter() if json_lines else logging.Formatter("[%(asctime)s: %(levelname)s/%(processName)s] %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)
