"""The one table of failures (workers.errors.FAILURES): complete, true to the classes, and in the README."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from httpx_sse import ServerSentEvent

import workers
from workers import errors
from workers.gateway.client import GatewayClient
from workers.transports.sse import _error_event

README = Path(__file__).resolve().parents[2] / "README.md"


def _subclasses(cls: type[errors.SarkError]) -> set[type[errors.SarkError]]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= _subclasses(sub)
    return found


def test_every_error_class_has_exactly_one_row() -> None:
    listed = [row.error for row in errors.FAILURES]
    assert len(listed) == len(set(listed)), "a class appears twice"
    raised = {cls for cls in _subclasses(errors.SarkError) if cls.__module__ == errors.__name__}
    assert set(listed) == raised - {errors.TransportError}  # TransportError is only a base
    codes = [row.error.code for row in errors.FAILURES]
    assert len(codes) == len(set(codes)), "two classes share a code"


def test_every_error_class_is_public_and_rebuilt_by_name() -> None:
    for row in errors.FAILURES:
        assert row.error.__name__ in workers.__all__ and row.error.__name__ in errors.__all__
        error = row.error("m", {"k": 1})
        rebuilt = errors.error_from_dict(error.to_dict())
        assert type(rebuilt) is row.error and rebuilt.detail == error.detail and rebuilt.detail["k"] == 1


@pytest.mark.parametrize("row", errors.FAILURES, ids=lambda row: row.error.__name__)
def test_each_verdict_is_what_the_breaker_reads(row: errors.Failure) -> None:
    if row.error is errors.ToolError:
        assert not errors.ToolError("x", status_code=404).counts_as_failure
        assert errors.ToolError("x", status_code=502).counts_as_failure
        assert row.verdict.startswith("yes if status >= 500")
        return
    counts = row.error("x").counts_as_failure
    assert isinstance(counts, bool)
    assert row.verdict.split(",")[0] == ("yes" if counts else "no")


def test_the_decided_verdicts() -> None:
    """The decisions of issue 14: an oversized answer and a 401 say the target answered; timeouts count."""
    assert not errors.ResultTooLarge("x").counts_as_failure
    assert not errors.AuthenticationFailed("x").counts_as_failure
    assert not issubclass(errors.ResultTooLarge, errors.InvalidInvocation)  # it comes after a call
    assert issubclass(errors.PayloadTooLarge, errors.InvalidInvocation)  # refused before any call
    for timeout in (errors.InvocationTimeout, errors.DiscoveryTimeout):
        assert issubclass(timeout, errors.TransportError) and not issubclass(timeout, errors.ToolError)
        assert timeout("x").counts_as_failure
    assert not errors.StoreUnavailable("x").counts_as_failure


@pytest.mark.parametrize(
    ("status", "cls"),
    [(401, errors.AuthenticationFailed), (403, errors.AuthorizationDenied), (404, errors.ToolError),
     (500, errors.ToolError), (504, errors.ToolError)],
)
def test_a_gateway_status_is_one_class_over_http_and_sse(status: int, cls: type[errors.SarkError]) -> None:
    with pytest.raises(errors.SarkError) as over_http:
        GatewayClient._raise_for_status(status, b'{"error": "no", "reason": "no"}', "Tool execution")
    over_sse = _error_event(ServerSentEvent(event="error", data=f'{{"error": "no", "status_code": {status}}}'))
    assert type(over_http.value) is type(over_sse) is type(errors.status_error(status, "m")) is cls
    assert over_http.value.detail["status_code"] == over_sse.detail["status_code"] == status


def test_readme_failures_table_is_the_code_table() -> None:
    text = README.read_text()
    section = re.search(r"^#+ Failures\n(.*?)(?=^#)", text, re.S | re.M)
    assert section is not None, "README has no Failures section"
    lines = section.group(1).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    table = "\n".join(lines[start:end]) + "\n"
    assert table == errors.failures_markdown(), (
        "README's Failures table differs from workers.errors.FAILURES; paste the output of "
        "`python -c 'from workers.errors import failures_markdown; print(failures_markdown())'`")
