"""The user's token on its way through the broker: checked, sealed, bound to its task, opened once.

A token travels in the ``sark_token`` message header, never in task arguments. By default it travels
**sealed**: ``fernet:<ciphertext>``, where the ciphertext (Fernet: AES-128-CBC + HMAC-SHA256, with the
time of sealing) holds ``{"v": 1, "tid": <task id>, "tok": <token>}``, and ``"h"``: the SHA-256 of the
invocation's canonical JSON (:func:`invocation_digest`) when the sealer binds it to its invocation too
(``SarkClient`` does; optional for other apps). So reading the broker, its
unacked hash or its AOF file reveals no token; a sealed header copied onto another task is refused
(the task id differs); and a sealed header older than ``SARK_TOKEN_TTL`` is refused. Workers refuse
clear tokens unless ``SARK_ALLOW_CLEAR_TOKENS=true`` (development only).

Sealing without this project (any app with ``cryptography``)::

    payload = json.dumps({"v": 1, "tid": task_id, "tok": token})
    header = "fernet:" + Fernet(key).encrypt(payload.encode()).decode()
    app.send_task("sark.invoke", task_id=task_id, kwargs=..., headers={"sark_token": header})

Every token is checked where it enters: the client refuses it before enqueueing, the worker after
opening it (:func:`validate_token`): an RFC 6750 ``b64token`` (letters, digits, ``-._~+/``, trailing
``=``) of at most ``SARK_MAX_TOKEN_BYTES``. A control character or a non-ASCII character would
otherwise reach the HTTP stack, whose error text quotes the whole ``Authorization`` header. No error
raised here ever includes the token.

A JWT whose ``exp`` passed while the invocation waited is refused with :class:`TokenExpired` before any
network call (the signature is checked by the target, or by :mod:`workers.authz` for servers with a
policy).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import time
from functools import lru_cache

from cryptography.fernet import Fernet
from cryptography.fernet import InvalidToken as _BadFernet

from workers.errors import AuthorizationDenied, InvalidToken, TokenExpired

__all__ = [
    "ENCRYPTED_PREFIX",
    "OPERATOR_SIGNATURE_TTL",
    "check_not_expired",
    "check_operator_signature",
    "generate_key",
    "invocation_digest",
    "open_token",
    "operator_signature",
    "seal_token",
    "validate_token",
]

ENCRYPTED_PREFIX = "fernet:"
_VERSION = 1
#: RFC 6750 section 2.1 ``b64token``.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
#: Seconds a sealed token may claim to come from the future (clock skew between hosts).
_FUTURE_SKEW = 60.0


def generate_key() -> str:
    """A new random sealing key (``SARK_TOKEN_KEY``)."""
    return Fernet.generate_key().decode()


@lru_cache(maxsize=4)
def _fernet(key: str) -> Fernet:
    return Fernet(key.encode())


def validate_token(token: object, *, max_bytes: int) -> str:
    """``token`` if it is a well-formed bearer token.

    Raises:
        InvalidToken: not a string, empty, longer than ``max_bytes``, or holding characters outside
            RFC 6750's ``b64token`` (control characters, spaces, non-ASCII…). The value is never echoed.
    """
    if not isinstance(token, str):
        raise InvalidToken(f"the token must be a string, got {type(token).__name__}")
    if not token:
        raise InvalidToken("the token is empty")
    if len(token) > max_bytes:
        raise InvalidToken(f"the token is {len(token)} characters long, limit is {max_bytes}",
                           {"limit": max_bytes, "size": len(token)})
    if _B64TOKEN.fullmatch(token) is None:
        raise InvalidToken("the token holds characters a bearer token may not hold "
                           "(RFC 6750: letters, digits, -._~+/ and trailing '=')")
    return token


def invocation_digest(invocation: object) -> str:
    """SHA-256 of an invocation's canonical JSON (what a sealed token may be bound to, besides its task)."""
    canonical = json.dumps(invocation, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def seal_token(token: str, key: str, task_id: str, *, invocation: object = None, now: float | None = None) -> str:
    """``token`` sealed with ``key`` for the task ``task_id`` (the header value to send).

    With ``invocation`` the seal also holds its digest (``"h"``): the worker then refuses the token for any
    other invocation, even one re-sent under the same task id by someone who copied the header.
    """
    fields: dict[str, str | int] = {"v": _VERSION, "tid": task_id, "tok": token}
    if invocation is not None:
        fields["h"] = invocation_digest(invocation)
    payload = json.dumps(fields, separators=(",", ":")).encode()
    fernet = _fernet(key)
    sealed = fernet.encrypt(payload) if now is None else fernet.encrypt_at_time(payload, int(now))
    return ENCRYPTED_PREFIX + sealed.decode()


def open_token(
    value: object, *, key: str | None, task_id: str, ttl: float, allow_clear: bool, max_bytes: int,
    invocation: object = None,
) -> str | None:
    """The clear, validated token from a ``sark_token`` header value (None when there is none).

    Raises:
        InvalidToken: clear where clear tokens are refused; sealed but this worker has no key or the
            wrong one; sealed for another task; sealed more than ``ttl`` seconds ago; or malformed.
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidToken(f"the token header must be a string, got {type(value).__name__}")
    if not value.startswith(ENCRYPTED_PREFIX):
        if not allow_clear:
            raise InvalidToken("clear tokens are refused: seal the token with SARK_TOKEN_KEY "
                               "(SarkClient does; SARK_ALLOW_CLEAR_TOKENS=true accepts clear ones)")
        return validate_token(value, max_bytes=max_bytes)
    if not key:
        raise InvalidToken("the token is sealed but this worker has no SARK_TOKEN_KEY")
    if len(value) > 2 * max_bytes + 512:
        raise InvalidToken(f"the sealed token is {len(value)} characters long, too long for a "
                           f"{max_bytes}-character token", {"limit": max_bytes})
    fernet = _fernet(key)
    try:
        raw = value[len(ENCRYPTED_PREFIX):].encode("ascii")
        # One decode on the way that succeeds: Fernet checks the age (and a time in the future) itself.
        payload = fernet.decrypt(raw, ttl=int(ttl))
        data = json.loads(payload)
    except (_BadFernet, ValueError, UnicodeError):
        raise _unopened(fernet, value, ttl) from None
    if not (isinstance(data, dict) and data.get("v") == _VERSION and isinstance(data.get("tok"), str)
            and isinstance(data.get("tid"), str)):
        raise InvalidToken("the sealed token is not in the expected form (v, tid, tok)")
    if data["tid"] != task_id:
        raise InvalidToken("the sealed token belongs to another task: a sealed token is valid for the task "
                           "it was sealed for only")
    digest = data.get("h")
    if digest is not None and (invocation is None or not hmac.compare_digest(str(digest),
                                                                              invocation_digest(invocation))):
        raise InvalidToken("the sealed token was sealed for another invocation (its server, tool or arguments "
                           "differ)")
    return validate_token(data["tok"], max_bytes=max_bytes)


def _unopened(fernet: Fernet, value: str, ttl: float) -> InvalidToken:
    """Why a sealed token did not open: too old, from the future, or not sealed with this key."""
    try:
        sealed_at = fernet.extract_timestamp(value[len(ENCRYPTED_PREFIX):].encode("ascii"))
    except (_BadFernet, ValueError, UnicodeError):
        return InvalidToken("the sealed token could not be opened with this worker's SARK_TOKEN_KEY")
    age = time.time() - sealed_at
    if age > ttl:
        return InvalidToken(f"the sealed token is {age:.0f}s old, limit is {ttl:g}s (SARK_TOKEN_TTL)",
                            {"age": round(age, 3), "limit": ttl})
    if age < -_FUTURE_SKEW:
        return InvalidToken("the sealed token was sealed in the future (check the clocks)")
    return InvalidToken("the sealed token could not be opened (its payload is not JSON)")


def _expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, or None for anything else (opaque tokens, JWTs without ``exp``).

    The signature is not checked here. Only the payload segment is decoded (base64url + JSON), which
    is all the expiry check needs and a fraction of a full PyJWT decode.

    Raises:
        InvalidToken: the JWT's ``exp`` is not a finite time (``1e400``, ``10**400``, NaN).
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    segment = parts[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        return None
    try:
        value = float(exp)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise InvalidToken("the token's exp claim is not a valid time")
    return value


def check_not_expired(token: str | None, *, leeway: float = 0.0) -> None:
    """Refuse a JWT whose ``exp`` is in the past. Opaque (non-JWT) tokens are left to the target.

    Raises:
        TokenExpired: the JWT expired (``detail["expired_for"]`` says how long ago, in seconds).
        InvalidToken: its ``exp`` is not a valid time.
    """
    if not token:
        return
    exp = _expiry(token)
    if exp is not None and exp + leeway < time.time():
        raise TokenExpired("the user's token expired before the invocation could run",
                           {"expired_for": round(time.time() - exp, 3)})


#: Seconds an operator signature stays valid (clock skew between hosts included).
OPERATOR_SIGNATURE_TTL = 300.0


def _operator_mac(key: str, task_id: str, action: str, target: str | None, issued: int) -> str:
    message = json.dumps([task_id, action, target, issued], separators=(",", ":")).encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


def operator_signature(key: str, task_id: str, action: str, target: str | None, *, now: float | None = None) -> str:
    """The ``sark_operator`` header value authorizing ``action`` on ``target`` for the task ``task_id`` only,
    for :data:`OPERATOR_SIGNATURE_TTL` seconds: ``"<unix time>:<hex HMAC-SHA256 of the JSON array
    [task_id, action, target, time]>"``."""
    issued = int(time.time() if now is None else now)
    return f"{issued}:{_operator_mac(key, task_id, action, target, issued)}"


def check_operator_signature(signature: object, *, key: str | None, task_id: str, action: str,
                             target: str | None) -> None:
    """Refuse an operator-only request that is not signed with this fleet's operator key.

    Raises:
        AuthorizationDenied: no key on this worker, no signature, or a signature made for another
            task, action or target (a captured header cannot be replayed).
    """
    if not key:
        raise AuthorizationDenied("operator actions are disabled: this worker has no SARK_OPERATOR_KEY",
                                  {"status_code": 403})
    refused = AuthorizationDenied(f"breaker {action} needs the operator's signature (header sark_operator)",
                                  {"status_code": 403})
    issued_text, _, mac = signature.partition(":") if isinstance(signature, str) else ("", "", "")
    if not issued_text.isdigit() or len(issued_text) > 12:
        raise refused
    issued = int(issued_text)
    if not hmac.compare_digest(mac.encode(), _operator_mac(key, task_id, action, target, issued).encode()):
        raise refused
    if abs(time.time() - issued) > OPERATOR_SIGNATURE_TTL:
        raise AuthorizationDenied(f"the operator's signature is older than {OPERATOR_SIGNATURE_TTL:g}s",
                                  {"status_code": 403})
