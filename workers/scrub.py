"""The one scrubber: every secret a worker holds is removed from any text that may leave the worker.

Text leaves a worker in error messages (result backend, Flower's task events, stream error entries),
log lines, and CLI output. Third-party exceptions (httpx, httpcore, h11, the ``mcp`` SDK) may quote a
request header or a value whole; their text reaches a :class:`~workers.errors.SarkError` only through
:func:`scrub` (or :func:`scrub_error` on the way out of a task), which replaces:

* every secret registered for the process (:func:`register_secret`: the Gateway API key, the token
  sealing key, the operator key, the token-verification secret), and
* every secret of the current call (:func:`call_secrets`: the user's token, while it is carried out),

in their literal, ``repr``-escaped and JSON-escaped spellings, then anything shaped like a JWT, a
``Bearer`` credential or a ``key=value`` secret. Secrets shorter than :data:`MIN_SECRET_LENGTH` are
not registered (replacing them would mangle ordinary text; the settings refuse none of them, so
check-config warns about short keys instead).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

from workers.errors import SarkError

__all__ = [
    "MIN_SECRET_LENGTH",
    "REDACTED",
    "call_secrets",
    "register_secret",
    "register_settings_secrets",
    "scrub",
    "scrub_error",
    "scrub_value",
]

REDACTED = "[REDACTED]"
MIN_SECRET_LENGTH = 6

#: Each pattern with the (lower-case) words a text must hold for it to match at all: checking them first
#: skips the regular expressions for almost every log line (17 -> ~3 us per line, measured).
_PATTERNS: list[tuple[tuple[str, ...], re.Pattern[str]]] = [
    (("eyj",), re.compile(r"eyJ[\w-]{5,}\.[\w-]{5,}(?:\.[\w-]*)?")),  # JWTs, also unsigned or cut short
    (("bearer",), re.compile(r"(?i)(bearer\s+)[^\s'\",}]+")),
    (("api", "token", "secret", "password"),
     re.compile(r"(?i)((?:api[_-]?key|token|secret|password)['\"]?\s*[:=]\s*['\"]?)[^\s'\",}]+")),
]

_process_secrets: set[str] = set()
#: ``_process_secrets`` longest first (a secret may contain another), rebuilt when one is registered.
_process_sorted: tuple[str, ...] = ()
#: The current call's secrets as given; their spellings are worked out only when a text is scrubbed in
#: the call (rarely: on its error path), not for every call (measured: ~45 us per invocation otherwise).
_call: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("sark_call_secrets", default=())


#: Characters some quoting scheme (repr, bytes repr, JSON, unicode_escape) may rewrite.
_ESCAPED = re.compile(r"[^\x21-\x7e]|[\"'\\]")


def _spellings(secret: str) -> set[str]:
    """The ways ``secret`` can appear in an exception's text.

    As is, ``repr``/bytes-``repr``/JSON/``unicode_escape`` escaped, and, whatever the quoting scheme,
    each run of it between characters such a scheme may rewrite (so ``"abc…\n"`` quoted any way still
    loses its ``abc…`` part).
    """
    forms = {secret, repr(secret)[1:-1], secret.encode("unicode_escape").decode("ascii"), json.dumps(secret)[1:-1]}
    try:
        forms.add(repr(secret.encode("latin-1"))[2:-1])
    except UnicodeEncodeError:
        forms.add(repr(secret.encode("utf-8"))[2:-1])
    forms.update(_ESCAPED.split(secret))
    return {form for form in forms if len(form) >= MIN_SECRET_LENGTH}


def register_secret(value: str | None) -> None:
    """Scrub ``value`` from every text of this process from now on (None and short values are ignored)."""
    global _process_sorted
    if value and len(value) >= MIN_SECRET_LENGTH:
        _process_secrets.update(_spellings(value))
        _process_sorted = tuple(sorted(_process_secrets, key=len, reverse=True))


@contextlib.contextmanager
def call_secrets(*values: str | None) -> Iterator[None]:
    """Scrub ``values`` (e.g. the user's token) from texts made in this context (task/thread)."""
    given = tuple(value for value in values if value)
    if not given:
        yield
        return
    reset = _call.set(_call.get() + given)
    try:
        yield
    finally:
        _call.reset(reset)


def scrub(text: str, extra: Iterable[str | None] = ()) -> str:
    """``text`` without any registered, current-call or ``extra`` secret, nor anything shaped like one."""
    more = [value for value in (*_call.get(), *extra) if value]
    if more:
        secrets: Iterable[str] = sorted(_process_secrets.union(*(_spellings(value) for value in more)),
                                        key=len, reverse=True)  # longest first: a secret may contain another
    else:
        secrets = _process_sorted
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    lowered = text.lower()
    for words, pattern in _PATTERNS:
        if any(word in lowered for word in words):
            text = pattern.sub(_redacted, text)
    return text


def _redacted(match: re.Match[str]) -> str:
    return (match.group(1) if match.groups() else "") + REDACTED


def scrub_value(value: Any, extra: Iterable[str | None] = ()) -> Any:
    """``value`` (JSON-like) with every string in it scrubbed."""
    extra = tuple(extra)
    if isinstance(value, str):
        return scrub(value, extra)
    if isinstance(value, dict):
        return {scrub(str(k), extra): scrub_value(v, extra) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub_value(v, extra) for v in value]
    return value


def scrub_error(exc: SarkError, extra: Iterable[str | None] = ()) -> SarkError:
    """A copy of ``exc`` (same class) whose message and detail hold no secret.

    The copy has no ``__cause__`` or ``__context__``: a chained third-party exception would put its own
    text into the traceback that Celery stores and Flower shows. Raise it ``from None``.
    """
    extra = tuple(extra)
    clean = type(exc).__new__(type(exc))
    SarkError.__init__(clean, scrub(exc.message, extra), scrub_value(exc.detail, extra))
    clean.caller_caused = exc.caller_caused
    return clean


def register_settings_secrets(settings: Any) -> None:
    """Register every secret field of a :class:`~config.settings.Settings`, and the passwords of its URLs."""
    from pydantic import SecretStr

    from config.worker_secrets import url_password

    for name in type(settings).model_fields:
        value = getattr(settings, name, None)
        if isinstance(value, SecretStr):
            register_secret(value.get_secret_value())
        elif isinstance(value, str) and "://" in value:  # broker/backend/Redis URLs: their passwords
            register_secret(url_password(value))
