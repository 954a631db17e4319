"""Structured logging: one JSON object per line, with task id and request id, secrets redacted.

Installed on the worker through Celery's ``setup_logging`` signal (so Celery leaves logging to us).
INFO lines about a task show its arguments, result and error as :mod:`workers.display` does (names,
sizes, ``Type(code)``); extras (Celery's ``data``: the task's context) are scrubbed like the message.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

from workers.display import error_repr
from workers.scrub import scrub, scrub_value

__all__ = ["JsonFormatter", "PlainFormatter", "RedactingFilter", "TaskLogFilter", "configure_logging", "redact"]

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


class TaskLogFilter(logging.Filter):
    """Celery's INFO lines about a task's end (``raised expected``, ``retry``) show the error as
    ``Type(code)`` without traceback, unless ``show_details``.

    Arguments and results need no rewriting here: :mod:`workers.taskbase` already put their reprs into
    the task's request and return value, which these lines quote.
    """

    def __init__(self, show_details: bool = False) -> None:
        super().__init__()
        self.show_details = show_details

    def filter(self, record: logging.LogRecord) -> bool:
        context = record.args
        if (self.show_details or record.levelno > logging.INFO or record.name != "celery.app.trace"
                or not isinstance(context, dict) or "exc" not in context):
            return True
        # Celery logs these from inside its `except` block (trace.py: on_error -> _log_error/handle_retry),
        # so the exception itself is at hand; its text in the context is only a repr.
        live = sys.exc_info()[1]
        shown = dict(context)
        shown["exc"] = error_repr(live, details=False) if live is not None else _type_name(str(context["exc"]))
        shown.pop("traceback", None)
        record.args = shown
        if isinstance(getattr(record, "data", None), dict):
            record.data = shown  # the same dict as `args` in Celery's `extra`, dumped by JsonFormatter
        return True


def _type_name(text: str) -> str:
    match = re.match(r"[A-Za-z_][\w.]*", text)
    return match.group(0) if match else "?"


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
                data[key] = _scrubbed(value)
        if record.exc_info:
            data["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(data, default=str)


def _scrubbed(value: Any) -> Any:
    """``value`` as JSON would carry it (str() of anything else), every string scrubbed."""
    return scrub_value(json.loads(json.dumps(value, default=str)))


class PlainFormatter(logging.Formatter):
    """Plain-text lines whose tracebacks and stacks are scrubbed too (the filter only cleans the message)."""

    def formatException(self, ei: Any) -> str:
        return redact(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return redact(super().formatStack(stack_info))


def configure_logging(level: str = "INFO", json_lines: bool = True, *, show_details: bool = False) -> None:
    """Send every log record to stderr, as JSON lines (or plain text), with secrets redacted.

    ``show_details``: task lines show error text (``show_task_details``); otherwise ``Type(code)``.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TaskLogFilter(show_details))  # first: the redacting filter formats the message
    handler.addFilter(RedactingFilter())
    handler.setFormatter(
        JsonFormatter() if json_lines else PlainFormatter("[%(asctime)s: %(levelname)s/%(processName)s] %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)
