"""The user's token on its way through the broker: optional encryption, expiry check at dequeue.

A token travels in the ``sark_token`` message header, never in task arguments. With an operator key
(``SARK_TOKEN_KEY``, a Fernet key) the client encrypts it (``fernet:<ciphertext>``) so that reading the
broker does not reveal it; workers holding the same key decrypt it. A JWT whose ``exp`` passed while the
invocation waited in the queue is refused with :class:`TokenExpired` before any network call.
"""

from __future__ import annotations

import time

import jwt
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


def check_not_expired(token: str | None, *, leeway: float = 0.0) -> None:
    """Refuse a JWT whose ``exp`` is in the past. Opaque (non-JWT) tokens are left to the target.

    Raises:
        TokenExpired: the JWT expired (``detail["expired_for"]`` says how long ago, in seconds).
    """
    if not token or token.count(".") != 2:
        return
    try:
        claims = jwt.decode(token, options={"verify_signature": False, "verify_exp": False})
    except jwt.InvalidTokenError:
        return  # not a JWT after all: the Gateway decides
    exp = claims.get("exp")
    if isinstance(exp, int | float) and exp + leeway < time.time():
        raise TokenExpired("the user's token expired before the invocation could run",
                           {"expired_for": round(time.time() - exp, 3)})
