"""The dequeue-time token checks: JWT expiry read from the payload alone, sealing round trip."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from cryptography.fernet import Fernet

from workers.errors import AuthorizationDenied, InvalidToken, TokenExpired
from workers.tokens import (
    check_not_expired,
    check_operator_signature,
    open_token,
    operator_signature,
    seal_token,
    validate_token,
)

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


KEY = Fernet.generate_key().decode()
OPEN = {"key": KEY, "ttl": 60.0, "allow_clear": False, "max_bytes": 8192}


def test_sealed_token_round_trip_bound_to_its_task() -> None:
    sealed = seal_token("secret-token", KEY, "task-1")
    assert sealed.startswith("fernet:") and "secret-token" not in sealed
    assert open_token(sealed, task_id="task-1", **OPEN) == "secret-token"
    assert open_token(None, task_id="task-1", **OPEN) is None
    with pytest.raises(InvalidToken, match="another task"):  # replayed onto another task
        open_token(sealed, task_id="task-2", **OPEN)
    with pytest.raises(InvalidToken, match="no SARK_TOKEN_KEY"):
        open_token(sealed, task_id="task-1", **{**OPEN, "key": None})
    with pytest.raises(InvalidToken, match="could not be opened"):
        open_token(sealed, task_id="task-1", **{**OPEN, "key": Fernet.generate_key().decode()})
    with pytest.raises(InvalidToken, match="could not be opened"):
        open_token("fernet:gAAAAABnot-really", task_id="task-1", **OPEN)


def test_sealed_token_expires_after_its_ttl() -> None:
    old = seal_token("secret-token", KEY, "task-1", now=time.time() - 120)
    with pytest.raises(InvalidToken, match="old, limit is 60s") as info:
        open_token(old, task_id="task-1", **OPEN)
    assert "secret-token" not in str(info.value.args)
    future = seal_token("secret-token", KEY, "task-1", now=time.time() + 3600)
    with pytest.raises(InvalidToken, match="future"):
        open_token(future, task_id="task-1", **OPEN)


def test_clear_tokens_are_refused_unless_allowed() -> None:
    with pytest.raises(InvalidToken, match="clear tokens are refused"):
        open_token("plain-token", task_id="t", **OPEN)
    assert open_token("plain-token", task_id="t", **{**OPEN, "allow_clear": True}) == "plain-token"


CANARY = "CanaryTok3n"
MALFORMED = {
    "trailing newline": CANARY + "\n",
    "carriage return + header": CANARY + "\r\nX-Evil: 1",
    "NUL": CANARY + "\x00",
    "tab": CANARY + "\tx",
    "space": CANARY + " x",
    "non-ASCII": CANARY + "\u00e9",
    "emoji": CANARY + "\U0001f600",
    "1 MB": CANARY + "a" * 1_000_000,
    "quote": CANARY + '"',
    "not a string": 12345,
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_tokens_are_refused_without_echo(name: str) -> None:
    token = MALFORMED[name]
    calls = [lambda: validate_token(token, max_bytes=8192),
             lambda: open_token(token, task_id="t", **{**OPEN, "allow_clear": True})]
    if isinstance(token, str):  # sealed by a careless app: refused once opened
        calls.append(lambda: open_token(seal_token(token, KEY, "t"), task_id="t", **OPEN))
    for call in calls:
        with pytest.raises(InvalidToken) as info:
            call()
        assert CANARY not in repr(info.value.args) and CANARY not in str(info.value)


@pytest.mark.parametrize("token", [
    "...garbage", "a.b.c.garbage", "header.payload.signature", "opaque-api_token~1+/==",
    f"h.{_segment(json.dumps({'sub': 'no-exp'}).encode())}.s",
])
def test_well_formed_odd_tokens_pass_validation(token: str) -> None:
    assert validate_token(token, max_bytes=8192) == token
    check_not_expired(token)


@pytest.mark.parametrize("exp", ["10**400", "1e400", "-1e400", "NaN"])
def test_exp_that_is_no_time_is_refused(exp: str) -> None:
    payload = '{"exp": ' + exp.replace("10**400", "1" + "0" * 400) + "}"
    token = f"h.{_segment(payload.encode())}.s"
    with pytest.raises(InvalidToken, match="exp claim"):
        check_not_expired(token)


def test_operator_signature_binds_task_action_and_target() -> None:
    signature = operator_signature("op-key-0123456789", "task-1", "reset", "*")
    check_operator_signature(signature, key="op-key-0123456789", task_id="task-1", action="reset", target="*")
    for task_id, action, target in (("task-2", "reset", "*"), ("task-1", "reset", "gateway:echo"),
                                    ("task-1", "open", "*")):
        with pytest.raises(AuthorizationDenied):
            check_operator_signature(signature, key="op-key-0123456789", task_id=task_id, action=action,
                                     target=target)
    with pytest.raises(AuthorizationDenied, match="no SARK_OPERATOR_KEY"):
        check_operator_signature(signature, key=None, task_id="task-1", action="reset", target="*")
    with pytest.raises(AuthorizationDenied):
        check_operator_signature(None, key="op-key-0123456789", task_id="task-1", action="reset", target="*")


def test_client_refuses_a_malformed_token_before_enqueueing() -> None:
    from config.settings import Settings
    from workers.client import SarkClient

    # Port 1: nothing listens there, so any attempt to enqueue would fail differently (and slowly).
    dead = "redis://127.0.0.1:1/0"
    client = SarkClient(Settings(_env_file=None, broker_url=dead, redis_url=dead, token_key=KEY))  # type: ignore[call-arg]
    for token in (CANARY + "\n", CANARY + "\u00e9", CANARY + "x" * 10_000):
        with pytest.raises(InvalidToken) as info:
            client.invoke("echo", "echo", {}, token=token)
        assert CANARY not in str(info.value)
    unsealed = SarkClient(Settings(_env_file=None, broker_url=dead, redis_url=dead, token_key=None))  # type: ignore[call-arg]
    with pytest.raises(InvalidToken, match="no SARK_TOKEN_KEY"):
        unsealed.invoke("echo", "echo", {}, token="well-formed-token")


def test_the_readme_recipe_for_plain_celery_apps_opens() -> None:
    """README, "Without installing this project": sealing with nothing but ``cryptography`` and ``json``."""
    task_id, user_jwt = "3f1c0f1e-task", "header.payload.signature"
    sealed = Fernet(KEY).encrypt(json.dumps({"v": 1, "tid": task_id, "tok": user_jwt}).encode()).decode()
    assert open_token("fernet:" + sealed, task_id=task_id, **OPEN) == user_jwt


def test_sealed_token_bound_to_its_invocation() -> None:
    invocation = {"server": "echo", "tool": "add", "arguments": {"a": 1, "b": 2.5}}
    sealed = seal_token("secret-token", KEY, "task-1", invocation=invocation)
    same = json.loads(json.dumps(invocation))  # as the worker receives it
    assert open_token(sealed, task_id="task-1", invocation=same, **OPEN) == "secret-token"
    for other in ({**invocation, "tool": "delete"}, {**invocation, "arguments": {"a": 1, "b": 3}}, None):
        with pytest.raises(InvalidToken, match="another invocation"):
            open_token(sealed, task_id="task-1", invocation=other, **OPEN)


def test_operator_signature_expires() -> None:
    old = operator_signature("op-key-0123456789", "task-1", "reset", "*", now=time.time() - 600)
    with pytest.raises(AuthorizationDenied, match="older than"):
        check_operator_signature(old, key="op-key-0123456789", task_id="task-1", action="reset", target="*")
    for garbage in ("", "abc", "123", "1:", ":" + "0" * 64, 12345):
        with pytest.raises(AuthorizationDenied):
            check_operator_signature(garbage, key="op-key-0123456789", task_id="task-1", action="reset", target="*")
