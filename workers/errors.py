"""The one error hierarchy of sark-workers, and the one table of failures.

Callers catch :class:`SarkError`; every failure a task can end with is one of these::

    SarkError
    ├── InvalidInvocation          bad input, refused before any network call
    │   ├── UnknownServer          the server is not in the operator's registry
    │   ├── PayloadTooLarge        the invocation's arguments over ``max_argument_bytes``
    │   ├── NotServedHere          it reached a worker not serving its transport (forwarded once)
    │   ├── TokenExpired           the user's JWT expired while the task waited in the queue
    │   └── InvalidToken           the token is malformed, unsealed where sealing is required, or unbound
    ├── AuthenticationFailed       the Gateway said 401: it refused the user's token or the worker's key
    ├── AuthorizationDenied        the Gateway said 403, or a registry policy refused the caller
    ├── ToolError(status_code)     the tool or Gateway answered an error; carries an HTTP-like status
    ├── ResultTooLarge             an answer (result, event, stream, discovery) over its configured cap
    ├── TransportError             the target could not be talked to, or did not answer in time
    │   ├── GatewayUnavailable     connection refused/reset, DNS, TLS
    │   │   └── ServerUnavailable  the same for an MCP server over Streamable HTTP
    │   ├── ProtocolError          malformed SSE event, JSON-RPC line or JSON body
    │   ├── ServerCrashed          a stdio server exited or could not start
    │   ├── InvocationTimeout      no answer to an invocation within its timeout
    │   ├── DiscoveryTimeout       no answer to a discovery call (servers, tools, health) in time
    │   └── StoreUnavailable       the worker's Redis (leases, streams, breakers) could not be reached
    ├── CircuitOpen(retry_after)   the target's breaker is open; no call was made
    ├── AlreadyRunning             another worker is carrying out the same invocation (``retry_after``)
    ├── Cancelled                  the invocation was cancelled by its caller
    └── InternalError              a fault of the worker itself (details only in the worker log)

Which condition raises which class, whether the breaker counts it and whether it is retried is
:data:`FAILURES` (README "Failures" is generated from it; a test compares them). The breaker reads
only ``counts_as_failure`` (and ``caller_caused``): no transport decides a verdict itself.

Every error is rebuilt by Celery's JSON result backend from ``(message, detail)``: the
constructor takes exactly the arguments kept in ``args``. Messages never contain tokens: every error
leaving a worker passes through :func:`workers.scrub.scrub_error`, which removes each secret the worker
holds, and third-party exceptions never leave a worker as themselves (they become :class:`InternalError`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "FAILURES",
    "AlreadyRunning",
    "AuthenticationFailed",
    "AuthorizationDenied",
    "Cancelled",
    "CircuitOpen",
    "DiscoveryTimeout",
    "Failure",
    "GatewayUnavailable",
    "InternalError",
    "InvalidInvocation",
    "InvalidToken",
    "InvocationTimeout",
    "NotServedHere",
    "PayloadTooLarge",
    "ProtocolError",
    "ResultTooLarge",
    "SarkError",
    "ServerCrashed",
    "ServerUnavailable",
    "StoreUnavailable",
    "TokenExpired",
    "ToolError",
    "TransportError",
    "UnknownServer",
    "error_from_dict",
    "failures_markdown",
    "status_error",
]


class SarkError(Exception):
    """Base class of every error raised by sark-workers.

    Args:
        message: Human-readable text (never holds secrets).
        detail: JSON-safe extra fields (``status_code``, ``retry_after``…).
    """

    code: ClassVar[str] = "sark_error"
    #: Whether the breaker counts this error as a failure of the target.
    counts_as_failure: ClassVar[bool] = False
    #: Set by the worker on an error the caller brought on itself (e.g. its own too-short timeout):
    #: such an error never counts against the target's breaker, whatever its class. Not serialised.
    caller_caused: bool = False

    def __init__(self, message: str, detail: dict[str, Any] | None = None) -> None:
        self.message = message
        self.detail: dict[str, Any] = dict(detail or {})
        super().__init__(message, self.detail)

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"

    def to_dict(self) -> dict[str, Any]:
        """JSON form used in stream terminal entries and the CLI."""
        return {"type": type(self).__name__, "code": self.code, "message": self.message, **self.detail}

    @classmethod
    def verdict(cls) -> str:
        """Whether the breaker counts this class as a failure of the target, in words (:data:`FAILURES`)."""
        return "yes" if cls.counts_as_failure else "no"


class InvalidInvocation(SarkError):
    """The invocation was refused before any network call (bad shape, limits, config)."""

    code = "invalid_invocation"


class UnknownServer(InvalidInvocation):
    """The named server is not in the operator's registry."""

    code = "unknown_server"


class PayloadTooLarge(InvalidInvocation):
    """The invocation's arguments exceeded ``max_argument_bytes``: refused before any call.

    An answer over its cap is :class:`ResultTooLarge`.
    """

    code = "payload_too_large"


class NotServedHere(InvalidInvocation):
    """The invocation reached a worker that does not serve its transport (it was sent to another queue by
    hand, or the enqueuing app's registry or queue settings differ from the worker's). The worker forwards it
    once to ``detail["queue"]``, its transport's queue; this is raised only when it arrives at a wrong worker
    again."""

    code = "not_served_here"


class TokenExpired(InvalidInvocation):
    """The user's token expired before the invocation was carried out."""

    code = "token_expired"


class InvalidToken(InvalidInvocation):
    """The user's token was refused before use: bad characters or length, not sealed, sealed for another
    task, or sealed too long ago. The message never holds the token."""

    code = "invalid_token"


class AuthenticationFailed(SarkError):
    """The Gateway did not accept the credentials (HTTP 401): the user's token or the worker's API key.

    The target answered: no breaker failure. Never retried (the same credentials would fail again).
    """

    code = "authentication_failed"


class AuthorizationDenied(SarkError):
    """The Gateway refused the invocation (HTTP 403), or a registry ``policy:`` refused the caller. Never retried."""

    code = "authorization_denied"


class ToolError(SarkError):
    """The tool or the Gateway failed; ``status_code`` follows HTTP semantics."""

    code = "tool_error"

    def __init__(self, message: str, detail: dict[str, Any] | None = None, *, status_code: int | None = None):
        merged = dict(detail or {})
        if status_code is not None:
            merged["status_code"] = status_code
        merged.setdefault("status_code", 500)
        super().__init__(message, merged)

    @property
    def status_code(self) -> int:
        """HTTP-like status of the failure."""
        return int(self.detail["status_code"])

    @property
    def counts_as_failure(self) -> bool:  # type: ignore[override]
        """Server-side failures (5xx) count against the target's breaker; 4xx do not."""
        return self.status_code >= 500

    @classmethod
    def verdict(cls) -> str:
        """See :attr:`counts_as_failure`."""
        return "yes if status >= 500, else no"


class ResultTooLarge(SarkError):
    """An answer exceeded its configured cap (``detail["what"]`` says which, ``limit`` the cap).

    A result or a discovery answer over ``max_result_bytes``, an SSE event or chunk over it, a stdio
    message over the server's ``max_output_bytes``, a stream over ``max_stream_chunks`` or
    ``max_stream_bytes``; the same class over every transport. Not a breaker failure: the target
    answered, and the size follows from the caller's arguments (counting it would let one caller open
    the breaker for everyone). Never retried: the same call would give the same answer.
    """

    code = "result_too_large"


class TransportError(SarkError):
    """The target could not be talked to, or did not answer in time."""

    code = "transport_error"
    counts_as_failure = True


class GatewayUnavailable(TransportError):
    """Connecting to the Gateway failed (refused, reset, DNS, TLS)."""

    code = "gateway_unavailable"


class ServerUnavailable(GatewayUnavailable):
    """An MCP server reached over the network (``streamable-http``) cannot be reached: refused, reset, DNS,
    TLS, lost mid-call, no session in time, or a variable its entry names is unset in the worker. A
    :class:`GatewayUnavailable`, so code catching that catches this too."""

    code = "server_unavailable"


class ProtocolError(TransportError):
    """The peer sent something that breaks the protocol (bad JSON, SSE or JSON-RPC)."""

    code = "protocol_error"


class ServerCrashed(TransportError):
    """A stdio MCP server exited, or could not be started (including no handshake within ``startup_timeout``)."""

    code = "server_crashed"


class InvocationTimeout(TransportError):
    """No answer to an invocation within its timeout (or, on a client, no result within its wait).

    A breaker failure, unless the worker marks it ``caller_caused`` (the caller's own timeout, shorter
    than the operator's for that server, ran out). A Gateway that *answers* 504 is a :class:`ToolError`.
    It still carries ``status_code`` 504, as the Gateway contract's "timeout → 504" says, for callers
    that read the status of any error.
    """

    code = "timeout"

    def __init__(self, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message, {"status_code": 504, **(detail or {})})

    @property
    def status_code(self) -> int:
        """504, as the Gateway contract names a timeout."""
        return int(self.detail["status_code"])

    @classmethod
    def verdict(cls) -> str:
        """See the class docstring."""
        return "yes, unless the caller's own shorter timeout ran out"


class DiscoveryTimeout(TransportError):
    """No answer to a discovery call (servers, tools, health; a stdio ``tools/list``) in time."""

    code = "discovery_timeout"


class StoreUnavailable(TransportError):
    """The worker's own Redis (leases, streams) could not be reached, after reconnecting.

    Not the target's fault: it never counts against the target's breaker. ``detail["reached_target"]``
    says whether the tool had been called; when it had not, the worker puts the invocation back in its
    queue instead of failing it.
    """

    code = "store_unavailable"
    counts_as_failure = False


class CircuitOpen(SarkError):
    """The target's breaker is open: the call was not attempted.

    ``detail["retry_after"]`` gives the seconds until the breaker lets a trial call through.
    """

    code = "circuit_open"

    @property
    def retry_after(self) -> float:
        """Seconds until a trial call is allowed."""
        return float(self.detail.get("retry_after", 0.0))


class AlreadyRunning(SarkError):
    """Another worker holds the invocation's lease (it is carrying it out): this delivery did nothing.

    A redelivered copy of a running invocation meets it; the worker puts that copy back in its queue
    for ``detail["retry_after"]`` seconds (about when the lease would lapse if its holder died), and only
    fails with it after waiting longer than any invocation may run.
    """

    code = "already_running"

    @property
    def retry_after(self) -> float:
        """Seconds until the lease lapses unless its holder renews it."""
        return float(self.detail.get("retry_after", 0.0))


class Cancelled(SarkError):
    """The invocation was cancelled by its caller."""

    code = "cancelled"


class InternalError(SarkError):
    """A fault of the worker itself, not of the target or the input; details are in the worker log only."""

    code = "internal_error"


def status_error(status: int, message: str, detail: dict[str, Any] | None = None) -> SarkError:
    """The error of a Gateway answer with HTTP status ``status`` >= 400 (over HTTP and SSE alike)."""
    if status == 401:
        return AuthenticationFailed(message, {**(detail or {}), "status_code": 401})
    if status == 403:
        return AuthorizationDenied(message, {**(detail or {}), "status_code": 403})
    return ToolError(message, detail, status_code=status)


@dataclass(frozen=True)
class Failure:
    """One row of the table of failures: a condition, its one error class, and whether it is retried.

    The code and the breaker verdict are read from the class (``code``, :meth:`SarkError.verdict`).
    """

    condition: str
    error: type[SarkError]
    retried: str

    @property
    def verdict(self) -> str:
        """Whether the breaker counts it against the target."""
        return self.error.verdict()


#: Every failure condition, the one class it raises (whatever the transport), and what happens next.
#: The breaker sees only errors raised by a call it guards (invocations; discovery calls pass no breaker).
FAILURES: tuple[Failure, ...] = (
    Failure("The invocation is malformed, asks for a timeout out of bounds, or names a transport that "
            "cannot reach its server; refused before any call", InvalidInvocation, "no"),
    Failure("The server is not in the operator's registry", UnknownServer, "no"),
    Failure("The invocation reached a worker that does not serve its transport (sent to another queue)",
            NotServedHere, "forwarded once to its transport's queue; raised only if it misses again"),
    Failure("The invocation's arguments are over `max_argument_bytes`; refused before any call",
            PayloadTooLarge, "no"),
    Failure("The user's token expired while the task waited in the queue", TokenExpired, "no"),
    Failure("The token is malformed, clear where sealing is required, or sealed for another task",
            InvalidToken, "no"),
    Failure("The Gateway or an MCP server answered 401 (it refused the user's token or the worker's key), or "
            "an authorization server refused the fleet's OAuth client credentials", AuthenticationFailed, "no"),
    Failure("The Gateway answered 403, a registry `policy:` does not admit the caller, or an operator "
            "action is not signed", AuthorizationDenied, "no"),
    Failure("The Gateway answered another status >= 400 (an SSE `error` event alike), or a stdio server a "
            "JSON-RPC error (status 400 for bad params or an unknown method, else 502)", ToolError,
            "5xx of a discovery call: up to `discovery_attempts`; invocations: no"),
    Failure("An answer is over its cap: a result or discovery answer over `max_result_bytes` (also one SSE "
            "event), a stdio message over `max_output_bytes`, a stream over `max_stream_chunks` or "
            "`max_stream_bytes`", ResultTooLarge, "no"),
    Failure("The Gateway cannot be reached (refused, reset, DNS, TLS, broken HTTP)", GatewayUnavailable,
            "discovery: up to `discovery_attempts`; invocations: no"),
    Failure("An MCP server over Streamable HTTP cannot be reached (refused, reset, lost mid-call, no session "
            "in time, a variable its entry names unset in the worker)", ServerUnavailable, "no"),
    Failure("The peer broke the protocol: an answer that is not the expected JSON, a malformed SSE event, "
            "an SSE stream that ended without `done` and could not be resumed, a stdio line that is not "
            "JSON-RPC", ProtocolError, "no"),
    Failure("A stdio server exited, could not be started, or did not finish the MCP handshake within "
            "`startup_timeout`", ServerCrashed, "no (the next call starts a new process, after a backoff)"),
    Failure("No answer to an invocation within its timeout (also: the task's own bound, a client's or "
            "stream reader's wait)", InvocationTimeout, "HTTP: `invoke_attempts` (2) tries in all; SSE, stdio: no"),
    Failure("No answer to a discovery call (servers, tools, health, a stdio `tools/list`) in time",
            DiscoveryTimeout, "Gateway: up to `discovery_attempts`; stdio: no"),
    Failure("The worker's own Redis (leases, streams) cannot be reached", StoreUnavailable,
            "re-queued (10 times, 2 s apart) when the tool was not called yet (`reached_target: false`)"),
    Failure("The target's breaker is open, or its trial call is in flight; no call was made", CircuitOpen,
            "re-queued after `retry_after`, up to `breaker_retry_max` times (default 0)"),
    Failure("Another worker holds the invocation's lease (it is carrying it out)", AlreadyRunning,
            "re-published after `retry_after`; raised only past the longest invocation"),
    Failure("The caller cancelled the invocation", Cancelled, "no (re-queued when the worker was shutting down)"),
    Failure("A fault of the worker itself (a bug, an exception not translated); details in the worker log "
            "only", InternalError, "no"),
)

#: Classes never raised themselves: only their subclasses are (so they are not in :data:`FAILURES`).
_BASES: tuple[type[SarkError], ...] = (SarkError, TransportError)

_BY_NAME: dict[str, type[SarkError]] = {cls.__name__: cls for cls in (*_BASES, *(row.error for row in FAILURES))}


def failures_markdown() -> str:
    """:data:`FAILURES` as the Markdown table of README "Failures"."""
    lines = ["| Condition | Error | `code` | Counts against the breaker | Retried |", "|---|---|---|---|---|"]
    for row in FAILURES:
        parent = row.error.__mro__[1]
        error = f"`{row.error.__name__}`" + (f" (under `{parent.__name__}`)" if parent not in _BASES else "")
        lines.append(f"| {row.condition} | {error} | `{row.error.code}` | {row.verdict} | {row.retried} |")
    return "\n".join(lines) + "\n"


def error_from_dict(data: dict[str, Any]) -> SarkError:
    """Rebuild an error from :meth:`SarkError.to_dict` output (unknown types become ``SarkError``)."""
    fields = dict(data)
    cls = _BY_NAME.get(str(fields.pop("type", "")), SarkError)
    fields.pop("code", None)
    message = str(fields.pop("message", ""))
    return cls(message, fields)
