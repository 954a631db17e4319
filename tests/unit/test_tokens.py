"""The dequeue-time token checks: JWT expiry read from the payload alone, sealing round trip."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from cryptography.fernet import Fernet

from workers.errors import InvalidInvocation, TokenExpired
from workers.tokens import check_not_expired, open_token, seal_token

SECRET = "unit-test-secret-0123456789abcdef0123456789"


def _jwt(**claims: object) -> str:
    return jwt.encode(dict(claims), SECRET, algorithm="HS256")


def _segment(payload: bytes) -> str:
    return base64.urlsafe_b64encode(payload).rstrip(b"=").decode()


def test_expired_jwt_is_refused_with_how_long_ago() -> None:
    token = _jwt(sub="u1", exp=int(time.time()) - 30)
    with pytest.raises(TokenExpired) as info:
        check_not_expired(token)
    assert 29 <= info.value.detail["expired_for"] <= 40


def test_leeway_and_live_tokens_pass() -> None:
    check_not_expired(_jwt(sub="u1", exp=int(time.time()) + 60))
    check_not_expired(_jwt(sub="u1", exp=int(time.time()) - 5), leeway=30)
    check_not_expired(_jwt(sub="u1"))  # no exp: the target decides
    check_not_expired(_jwt(sub="u1", exp=time.time() + 0.5))  # float exp


@pytest.mark.parametrize(
    "token",
    [
        None,
        "",
        "opaque-api-token",
        "a.b",
        "a.b.c.d",
        "header.!!!not-base64!!!.sig",
        f"h.{_segment(b'not json')}.s",
        f"h.{_segment(b'[1, 2]')}.s",
        f"h.{_segment(json.dumps({'exp': 'yesterday'}).encode())}.s",
        f"h.{_segment(json.dumps({'exp': True}).encode())}.s",
        f"h.{_segment(bytes([0xff, 0xfe]))}.s",
    ],
)
def test_anything_that_is_not_a_readable_jwt_is_left_to_the_target(token: str | None) -> None:
    check_not_expired(token)


def test_unpadded_payload_of_every_length_is_read() -> None:
    now = int(time.time())
    for pad in range(4):  # payload lengths that need 0..3 '=' of padding
        claims = {"exp": now - 100, "p": "x" * pad}
        token = f"h.{_segment(json.dumps(claims).encode())}.s"
        with pytest.raises(TokenExpired):
            check_not_expired(token)


def test_sealed_token_round_trip_and_wrong_key() -> None:
    key = Fernet.generate_key().decode()
    sealed = seal_token("secret-token", key)
    assert sealed.startswith("fernet:") and "secret-token" not in sealed
    assert open_token(sealed, key) == "secret-token"
    assert open_token("plain", None) == "plain"
    with pytest.raises(InvalidInvocation):
        open_token(sealed, None)
    with pytest.raises(InvalidInvocation):
        open_token(sealed, Fernet.generate_key().decode())
