"""The user's token on its way through the broker: optional encryption, expiry check at dequeue.

A token travels in the ``sark_token`` message header, never in task arguments. With an operator key
(``SARK_TOKEN_KEY``, a Fernet key) the client encrypts it (``fernet:<ciphertext>``) so that reading the
broker does not reveal it; workers holding the same key decrypt it. A JWT whose ``exp`` passed while the
invocation waited in the queue is refused with :class:`TokenExpired` before any network call.
"""

from __future__ import annotations

import base64
import binascii
import json
import time

from cryptography.fernet import Fernet, InvalidToken

from workers.errors import InvalidInvocation, TokenExpired

__all__ = ["ENCRYPTED_PREFIX", "check_not_expired", "open_token", "seal_token"]

ENCRYPTED_PREFIX = "fernet:"


def seal_token(token: str, key: str | None) -> str:
    """``token`` encrypted with ``key`` (unchanged when there is no key)."""
    if not key:
        return token
    return ENCRYPTED_PREFIX + Fernet(key.encode()).encrypt(token.encode()).decode()


def open_token(value: str | None, key: str | None) -> str | None:
    """The clear token from a header value (decrypting it when sealed).

    Raises:
        InvalidInvocation: sealed but this worker has no key, or the key does not open it.
    """
    if not value or not value.startswith(ENCRYPTED_PREFIX):
        return value
    if not key:
        raise InvalidInvocation("the token is encrypted but this worker has no SARK_TOKEN_KEY")
    try:
        return Fernet(key.encode()).decrypt(value[len(ENCRYPTED_PREFIX):].encode()).decode()
    except (InvalidToken, ValueError):
        raise InvalidInvocation("the token could not be decrypted with this worker's SARK_TOKEN_KEY") from None


def _expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, or None for anything else (opaque tokens, malformed JWTs).

    The signature is not checked: the target does that. Only the payload segment is decoded
    (base64url + JSON), which is all the expiry check needs and a fraction of a full PyJWT decode.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    segment = parts[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, binascii.Error):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def check_not_expired(token: str | None, *, leeway: float = 0.0) -> None:
    """Refuse a JWT whose ``exp`` is in the past. Opaque (non-JWT) tokens are left to the target.

    Raises:
        TokenExpired: the JWT expired (``detail["expired_for"]`` says how long ago, in seconds).
    """
    if not token:
        return
    exp = _expiry(token)
    if exp is not None and exp + leeway < time.time():
        raise TokenExpired("the user's token expired before the invocation could run",
                           {"expired_for": round(time.time() - exp, 3)})
