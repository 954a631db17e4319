"""The one error hierarchy of sark-workers.

Callers catch :class:`SarkError`; every failure a task can end with is one of these::

    SarkError
    ├── InvalidInvocation          bad input, refused before any network call
    │   ├── UnknownServer          the server is not in the operator's registry
    │   ├── PayloadTooLarge        arguments, result or stream over a configured limit
    │   ├── TokenExpired           the user's JWT expired while the task waited in the queue
    │   └── InvalidToken           the token is malformed, unsealed where sealing is required, or unbound
    ├── AuthorizationDenied        the Gateway said 403 (never retried)
    ├── ToolError(status_code)     the tool or Gateway failed; carries an HTTP-like status
    │   └── InvocationTimeout      no answer in time (status 504)
    ├── TransportError             the target could not be talked to
    │   ├── GatewayUnavailable     connection refused/reset, DNS, TLS
    │   ├── ProtocolError          malformed SSE event, JSON-RPC line or JSON body
    │   ├── ServerCrashed          a stdio server exited or could not start
    │   └── StoreUnavailable       the worker's Redis (leases, streams, breakers) could not be reached
    ├── CircuitOpen(retry_after)   the target's breaker is open; no call was made
    ├── AlreadyRunning             another worker is carrying out the same invocation (``retry_after``)
    ├── Cancelled                  the invocation was cancelled by its caller
    └── InternalError              a fault of the worker itself (details only in the worker log)

Every error is rebuilt by Celery's JSON result backend from ``(message, detail)``: the
constructor takes exactly the arguments kept in ``args``. Messages never contain tokens: every error
leaving a worker passes through :func:`workers.scrub.scrub_error`, which removes each secret the worker
holds, and third-party exceptions never leave a worker as themselves (they become :class:`InternalError`).
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AlreadyRunning",
    "AuthorizationDenied",
    "Cancelled",
    "CircuitOpen",
    "GatewayUnavailable",
    "InternalError",
    "InvalidInvocation",
    "InvalidToken",
    "InvocationTimeout",
    "PayloadTooLarge",
    "ProtocolError",
    "SarkError",
    "ServerCrashed",
    "StoreUnavailable",
    "TokenExpired",
    "ToolError",
    "TransportError",
    "UnknownServer",
    "error_from_dict",
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


class InvalidInvocation(SarkError):
    """The invocation was refused before any network call (bad shape, limits, config)."""

    code = "invalid_invocation"


class UnknownServer(InvalidInvocation):
    """The named server is not in the operator's registry."""

    code = "unknown_server"


class PayloadTooLarge(InvalidInvocation):
    """Arguments, result or stream exceeded a configured limit."""

    code = "payload_too_large"


class TokenExpired(InvalidInvocation):
    """The user's token expired before the invocation was carried out."""

    code = "token_expired"


class InvalidToken(InvalidInvocation):
    """The user's token was refused before use: bad characters or length, not sealed, sealed for another
    task, or sealed too long ago. The message never holds the token."""

    code = "invalid_token"


class AuthorizationDenied(SarkError):
    """The Gateway refused the invocation (HTTP 403). Never retried."""

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
        """HTTP-like status of the failure (504 for timeouts)."""
        return int(self.detail["status_code"])

    @property
    def counts_as_failure(self) -> bool:  # type: ignore[override]
        """Server-side failures (5xx) count against the target's breaker; 4xx do not."""
        return self.status_code >= 500


class InvocationTimeout(ToolError):
    """The target did not answer within the invocation's timeout (status 504)."""

    code = "timeout"

    def __init__(self, message: str, detail: dict[str, Any] | None = None, *, status_code: int = 504):
        super().__init__(message, detail, status_code=status_code)


class TransportError(SarkError):
    """The target could not be talked to."""

    code = "transport_error"
    counts_as_failure = True


class GatewayUnavailable(TransportError):
    """Connecting to the Gateway failed (refused, reset, DNS, TLS)."""

    code = "gateway_unavailable"


class ProtocolError(TransportError):
    """The peer sent something that breaks the protocol (bad JSON, SSE or JSON-RPC)."""

    code = "protocol_error"


class ServerCrashed(TransportError):
    """A stdio MCP server exited, or could not be started."""

    code = "server_crashed"


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


_BY_NAME: dict[str, type[SarkError]] = {
    cls.__name__: cls
    for cls in (
        SarkError,
        InvalidInvocation,
        UnknownServer,
        PayloadTooLarge,
        TokenExpired,
        InvalidToken,
        AuthorizationDenied,
        ToolError,
        InvocationTimeout,
        TransportError,
        GatewayUnavailable,
        ProtocolError,
        ServerCrashed,
        StoreUnavailable,
        CircuitOpen,
        AlreadyRunning,
        Cancelled,
        InternalError,
    )
}


def error_from_dict(data: dict[str, Any]) -> SarkError:
    """Rebuild an error from :meth:`SarkError.to_dict` output (unknown types become ``SarkError``)."""
    fields = dict(data)
    cls = _BY_NAME.get(str(fields.pop("type", "")), SarkError)
    fields.pop("code", None)
    message = str(fields.pop("message", ""))
    return cls(message, fields)
