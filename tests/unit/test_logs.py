"""Worker log lines (workers.logs): Celery's task lines show Type(code); extras are scrubbed."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from workers.errors import AuthorizationDenied
from workers.logs import JsonFormatter, RedactingFilter, TaskLogFilter

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXZhbHVl"


@pytest.fixture()
def lines() -> Iterator[io.StringIO]:
    """Records of the ``celery.app.trace`` logger, formatted as the worker formats them."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(TaskLogFilter())
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("celery.app.trace")
    saved = logger.handlers[:], logger.level, logger.propagate
    logger.handlers[:], logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    yield out
    logger.handlers[:], logger.level, logger.propagate = saved


def _log_as_celery(fmt: str, context: dict[str, object], level: int = logging.INFO) -> None:
    # celery/app/trace.py: the context is both the format's mapping and `extra={'data': ...}`.
    logging.getLogger("celery.app.trace").log(level, fmt, context, extra={"data": context})


def test_expected_error_line_shows_type_and_code(lines: io.StringIO) -> None:
    try:
        raise AuthorizationDenied("user 'alice' is not in a team authorized for 'restricted'")
    except AuthorizationDenied as exc:
        _log_as_celery("Task %(name)s[%(id)s] %(description)s: %(exc)s",
                       {"name": "sark.invoke", "id": "t1", "description": "raised expected",
                        "exc": repr(exc), "traceback": "Traceback ... alice", "kwargs": "echo.add(a, b)"})
    record = json.loads(lines.getvalue())
    assert record["message"] == "Task sark.invoke[t1] raised expected: AuthorizationDenied(authorization_denied)"
    assert "alice" not in lines.getvalue()


def test_extras_are_scrubbed(lines: io.StringIO) -> None:
    _log_as_celery("Task %(name)s[%(id)s] received",
                   {"name": "sark.list_tools", "id": "t2", "kwargs": f"{{'header': 'Bearer {JWT}'}}"})
    assert JWT not in lines.getvalue()
    assert json.loads(lines.getvalue())["data"]["kwargs"] == "{'header': 'Bearer [REDACTED]'}"


def test_details_keep_error_text(lines: io.StringIO) -> None:
    handler = logging.getLogger("celery.app.trace").handlers[0]
    handler.filters[0] = TaskLogFilter(show_details=True)
    try:
        raise AuthorizationDenied("user 'alice' is not in a team")
    except AuthorizationDenied as exc:
        _log_as_celery("Task %(name)s[%(id)s] %(description)s: %(exc)s",
                       {"name": "sark.invoke", "id": "t3", "description": "raised expected", "exc": repr(exc)})
    assert "alice" in json.loads(lines.getvalue())["message"]
