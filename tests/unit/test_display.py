"""What events, Flower and INFO logs show of a task (workers.display): names, sizes, Type(code)."""

from __future__ import annotations

import json

from celery.exceptions import Retry, TimeLimitExceeded
from kombu.utils.json import dumps, loads

from workers.contract import TASK_INVOKE, TASK_LIST_TOOLS
from workers.display import Shown, call_reprs, error_repr, invocation_repr, result_repr
from workers.errors import AuthorizationDenied, CircuitOpen, ToolError

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXZhbHVl"


def test_invocation_shows_target_and_argument_names_only() -> None:
    invocation = {"server": "echo", "tool": "add", "arguments": {"a": 41, "b": "secret-value"}}
    assert invocation_repr(invocation) == "echo.add(a, b)"
    assert call_reprs(TASK_INVOKE, [], {"invocation": invocation}, details=False) == ("()", "echo.add(a, b)")
    assert invocation_repr({"server": "echo", "tool": "t"}) == "echo.t()"
    assert invocation_repr("not a dict") == "<invalid invocation>"
    assert invocation_repr({"server": 3, "tool": None, "arguments": [1]}) == "?.?(?)"


def test_names_are_scrubbed_and_bounded() -> None:
    many = {f"n{i}": i for i in range(30)}
    shown = invocation_repr({"server": "s", "tool": "t", "arguments": {JWT: 1, "x" * 500: 2, **many}})
    assert JWT not in shown and "[REDACTED]" in shown
    assert "x" * 65 not in shown and shown.endswith(", …)")


def test_details_show_values_scrubbed() -> None:
    invocation = {"server": "echo", "tool": "echo", "arguments": {"text": "hello", "note": JWT}}
    _, kwargs = call_reprs(TASK_INVOKE, [], {"invocation": invocation}, details=True)
    assert "'hello'" in kwargs and JWT not in kwargs
    # Other tasks take names and switches: readable without details too.
    assert call_reprs(TASK_LIST_TOOLS, [], {"server": "echo"}, details=False)[1] == "{'server': 'echo'}"


def test_results_are_summarised() -> None:
    value = {"result": {"content": [{"type": "text", "text": "private"}]}, "is_error": False}
    assert result_repr(TASK_INVOKE, value, details=False) == (
        f"InvocationResult(is_error=False, {len(json.dumps(value['result']))} bytes)")
    assert result_repr(TASK_LIST_TOOLS, [{"name": "a"}, {"name": "b"}], details=False) == "list(2 items, 30 bytes)"
    assert result_repr(TASK_LIST_TOOLS, None, details=False) == "None"
    assert "private" in result_repr(TASK_INVOKE, value, details=True)


def test_errors_show_type_and_code() -> None:
    denied = AuthorizationDenied("user 'alice' is not in a team authorized for 'restricted'")
    assert error_repr(denied, details=False) == "AuthorizationDenied(authorization_denied)"
    assert error_repr(ToolError("tool said: private", status_code=502), details=False) == "ToolError(tool_error)"
    assert error_repr(ValueError("private"), details=False) == "ValueError"
    assert error_repr(Retry(exc=CircuitOpen("open: private")), details=False) == "Retry(CircuitOpen(circuit_open))"
    assert error_repr(TimeLimitExceeded(30.0), details=False) == "TimeLimitExceeded(30.0)"  # the worker's own
    assert "alice" in error_repr(denied, details=True)
    assert JWT not in error_repr(AuthorizationDenied(f"token {JWT} refused"), details=True)


def test_shown_value_is_stored_whole_and_reprs_as_its_summary() -> None:
    value = {"result": {"text": "private"}, "is_error": False}
    shown = Shown(value, "InvocationResult(is_error=False, 19 bytes)")
    assert repr(shown) == "InvocationResult(is_error=False, 19 bytes)"
    assert loads(dumps({"result": shown})) == {"result": value}  # what the result backend stores
