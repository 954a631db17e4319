"""The base class of every sark task, and its worker-side request: what leaves the worker about a task.

Celery shows a task outside the worker in task events (Flower), log lines and remote-control answers
(``inspect active/reserved/query_task``, Flower's worker page). :class:`SarkRequest` puts
:mod:`workers.display`'s reprs everywhere Celery would put the values:

* ``argsrepr``/``kwargsrepr``: the ``task-received`` event, the ``received``/``succeeded``/``raised``
  log lines (the task's own request dict), ``inspect`` (always answered ``safe``);
* ``task-failed``/``task-retried`` events: the exception as ``Type(code)``, no traceback;
* ``task-succeeded``: :class:`SarkTask` returns its value wrapped in :class:`~workers.display.Shown`.

A client's own ``kwargsrepr`` is never trusted: plain Celery clients send the full repr.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from celery import Task
from celery.worker.request import Request

from workers.display import Shown, call_reprs, error_repr, result_repr
from workers.scrub import scrub, scrub_value

__all__ = ["SarkRequest", "SarkTask", "task_class"]

log = logging.getLogger("sark.tasks")

_FAILURE_EVENTS = ("task-failed", "task-retried")


class SarkRequest(Request):  # type: ignore[misc]  # Celery is untyped
    """A task message in the worker, shown by names, sizes and error codes (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sark_error: BaseException | None = None
        argsrepr, kwargsrepr = call_reprs(self._type, self._args, self._kwargs, details=self._details)
        self._argsrepr, self._kwargsrepr = argsrepr, kwargsrepr
        # The task's own request (trace.py's log lines and their `extra`) reads them from this dict.
        self._request_dict["argsrepr"], self._request_dict["kwargsrepr"] = argsrepr, kwargsrepr

    @property
    def _details(self) -> bool:
        return bool(getattr(self._task, "show_details", False))

    def info(self, safe: bool = False) -> dict[str, Any]:
        """What ``inspect`` answers: always the reprs (Celery sends raw arguments unless ``safe``)."""
        data: dict[str, Any] = super().info(safe=True)
        return data

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        """Keep the exception itself for the event: Celery sends only its repr."""
        self._sark_error = exc_info.exception
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def on_retry(self, exc_info: Any) -> Any:
        """Keep the retried exception itself for the event: Celery sends only its repr."""
        self._sark_error = getattr(exc_info.exception, "exc", None) or exc_info.exception
        return super().on_retry(exc_info)

    def send_event(self, type: str, **fields: Any) -> None:
        """Send a task event with its exception or result shown as :mod:`workers.display` says."""
        details = self._details
        if type in _FAILURE_EVENTS:
            exc = self._sark_error
            if exc is not None:
                fields["exception"] = error_repr(exc, details=details)
            elif not details:  # a failure Celery met itself (hard time limit): its repr names no value
                fields["exception"] = scrub(str(fields.get("exception", "")))
            fields["traceback"] = scrub(str(fields["traceback"])) if details and fields.get("traceback") else None
        elif type == "task-succeeded" and self._sark_error is not None and not details:
            # The child stored a result, then was lost: Celery re-reads the whole value from the backend.
            fields["result"] = "(stored before the worker was lost)"
        super().send_event(type, **fields)


class SarkTask(Task):  # type: ignore[misc]  # Celery is untyped
    """Base of every sark task: worker-side :class:`SarkRequest`, return values shown as summaries."""

    Request = SarkRequest
    #: ``show_task_details``: events and INFO logs show values (scrubbed). Set by :func:`task_class`.
    show_details: ClassVar[bool] = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        in_worker = not (request.called_directly or request.is_eager)
        if in_worker and log.isEnabledFor(logging.DEBUG):
            log.debug("%s[%s] called with %r %r", self.name, request.id,
                      scrub_value(list(args)), scrub_value(kwargs))
        value = super().__call__(*args, **kwargs)
        if not in_worker:
            return value  # direct and eager calls hand the value to Python code, not to Celery's trace
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s[%s] returned %r", self.name, request.id, scrub_value(value))
        return Shown(value, result_repr(self.name, value, details=self.show_details))


def task_class(show_details: bool) -> type[SarkTask]:
    """The task base class of an app (``Celery(task_cls=...)``) with the operator's display setting."""

    class AppTask(SarkTask):
        pass

    AppTask.show_details = show_details
    return AppTask
