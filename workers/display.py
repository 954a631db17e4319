"""What task events, Flower and worker INFO logs show of a task: names, sizes and error codes, not values.

An invocation's arguments and result are the user's data, and an error's message may name the user
(``user 'alice' is not in a team …``). Celery puts all three into every task event (Flower keeps them) and
into INFO log lines. By default they are shown as::

    kwargs     echo.add(a, b)                                   server.tool(argument names)
    result     InvocationResult(is_error=False, 123 bytes)      size of the tool's result
    exception  AuthorizationDenied(authorization_denied)        type and code, no message, no traceback

With ``show_task_details`` (``SARK_SHOW_TASK_DETAILS=true``) the values are shown, through
:func:`workers.scrub.scrub`. The other sark tasks take names and switches: their arguments stay readable.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from celery.exceptions import Retry
from celery.utils.saferepr import saferepr
from celery.utils.serialization import UnpickleableExceptionWrapper, get_pickled_exception

from workers.contract import TASK_INVOKE
from workers.errors import SarkError
from workers.scrub import scrub

__all__ = ["Shown", "call_reprs", "error_repr", "invocation_repr", "result_repr"]

#: Longest repr of values shown with ``show_task_details`` (Celery's own default for argsrepr).
MAX_REPR = 1024
#: Nesting shown with details (saferepr's default 3 stops above an MCP result's text: result.content[0].text).
_LEVELS = 8
#: Argument names shown before ``…``, and the longest name shown whole: names are the caller's text too.
MAX_NAMES = 20
MAX_NAME = 64
#: Modules whose exceptions describe the worker (time limits, a lost child), never the user's data.
_WORKER_ERROR_MODULES = ("celery.exceptions", "billiard.exceptions")


def _name(value: Any) -> str:
    text = scrub(value) if isinstance(value, str) and value else "?"
    return text if len(text) <= MAX_NAME else text[:MAX_NAME] + "…"


def invocation_repr(invocation: Any) -> str:
    """``server.tool(a, b)``: an invocation's target and argument names, never their values."""
    if not isinstance(invocation, Mapping):
        return "<invalid invocation>"
    arguments = invocation.get("arguments")
    if isinstance(arguments, Mapping):
        names = [_name(key) for key in list(arguments)[: MAX_NAMES + 1]]
        shown = ", ".join(names[:MAX_NAMES]) + (", …" if len(names) > MAX_NAMES else "")
    else:
        shown = "?" if arguments is not None else ""
    return f"{_name(invocation.get('server'))}.{_name(invocation.get('tool'))}({shown})"


def call_reprs(task: str, args: Any, kwargs: Any, *, details: bool) -> tuple[str, str]:
    """``(argsrepr, kwargsrepr)`` of a call of ``task`` as events, logs and ``inspect`` show it."""
    if task == TASK_INVOKE and not details:
        invocation = kwargs.get("invocation") if isinstance(kwargs, Mapping) else None
        if invocation is None and isinstance(args, list | tuple) and args:
            invocation = args[0]
        return "()", invocation_repr(invocation)
    return _shown(args), _shown(kwargs)


def _shown(value: Any) -> str:
    return scrub(saferepr(value, MAX_REPR, maxlevels=_LEVELS))


def _size(value: Any) -> int:
    return len(json.dumps(value, default=str, ensure_ascii=False).encode())


def result_repr(task: str, value: Any, *, details: bool) -> str:
    """A task's return value as shown: its kind and size (``details``: the value, scrubbed)."""
    if details:
        return _shown(value)
    if task == TASK_INVOKE and isinstance(value, Mapping):
        return f"InvocationResult(is_error={bool(value.get('is_error'))}, {_size(value.get('result'))} bytes)"
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, list | tuple | Mapping):
        return f"{type(value).__name__}({len(value)} items, {_size(value)} bytes)"
    return f"{type(value).__name__}({_size(value)} bytes)"


def error_repr(exc: BaseException, *, details: bool) -> str:
    """An exception as shown: ``Type(code)`` of a SarkError, the type name of any other
    (``details``: its repr, scrubbed). Celery's own worker errors (time limits, a lost child) keep their
    text: it describes the worker, not the user."""
    exc = get_pickled_exception(exc)
    if isinstance(exc, Retry):
        # Retry's text is the repr of the error being retried.
        inner = exc.exc if isinstance(exc.exc, BaseException) else None
        return f"Retry({error_repr(inner, details=details) if inner is not None else ''})"
    if details or type(exc).__module__ in _WORKER_ERROR_MODULES:
        return _shown(exc)
    if isinstance(exc, UnpickleableExceptionWrapper):
        return str(exc.exc_cls_name)
    if isinstance(exc, SarkError):
        return f"{type(exc).__name__}({exc.code})"
    return type(exc).__name__


class Shown:
    """A task's return value whose ``repr`` is what is shown of it.

    Celery's worker writes ``repr(return value)`` into the INFO line ``Task … succeeded`` and sends that
    same text to the parent process for the ``task-succeeded`` event (``celery/app/trace.py``: ``Rstr``).
    Handing Celery this wrapper makes that text the summary, with any pool; kombu's JSON encoder stores
    the plain value (``__json__``), so the result backend and callers see no difference.
    """

    __slots__ = ("text", "value")

    def __init__(self, value: Any, text: str) -> None:
        self.value = value
        self.text = text

    def __json__(self) -> Any:
        """The value itself, for kombu's JSON encoder."""
        return self.value

    def __repr__(self) -> str:
        return self.text
