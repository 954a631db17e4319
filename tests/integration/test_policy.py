"""Per-user authorization of stdio servers: a registry ``policy:`` is enforced with verified tokens."""

from __future__ import annotations

import pytest
from celery import Celery

from devkit.gateway import make_token
from devkit.stack import DEFAULT_JWT_SECRET
from tests.helpers import invoke
from workers.errors import AuthorizationDenied, TokenExpired

pytestmark = pytest.mark.usefixtures("worker")

CALL = ("get_current_time", {"timezone": "UTC"})


def test_policy_lets_listed_callers_in(celery_client: Celery, admin_token: str) -> None:
    by_team = invoke(celery_client, "time-admins", *CALL, token=admin_token, wait=60)
    assert by_team["is_error"] is False and "UTC" in str(by_team["result"])
    carol = make_token(DEFAULT_JWT_SECRET, sub="carol", teams=[])
    assert invoke(celery_client, "time-admins", *CALL, token=carol, wait=60)["is_error"] is False


@pytest.mark.parametrize("who", ["no token", "unlisted user", "forged signature", "not a JWT", "no sub"])
def test_policy_refuses_everyone_else(celery_client: Celery, user_token: str, who: str) -> None:
    import jwt

    token = {
        "no token": None,
        "unlisted user": user_token,  # alice, team users
        "forged signature": make_token("someone-elses-secret-0123456789abcdef", sub="carol", teams=["admins"]),
        "not a JWT": "opaque-token-of-carol",
        "no sub": jwt.encode({"teams": ["admins"], "exp": 2_000_000_000}, DEFAULT_JWT_SECRET, algorithm="HS256"),
    }[who]
    with pytest.raises(AuthorizationDenied) as info:
        invoke(celery_client, "time-admins", *CALL, token=token, wait=60)
    assert info.value.detail["status_code"] == 403
    assert "time-admins" in info.value.message
    assert (token or "<none>") not in info.value.message and "alice" not in info.value.message


def test_expired_token_is_refused_before_the_policy(celery_client: Celery) -> None:
    expired = make_token(DEFAULT_JWT_SECRET, sub="root", teams=["admins"], ttl=-30)
    with pytest.raises(TokenExpired):
        invoke(celery_client, "time-admins", *CALL, token=expired, wait=60)


def test_server_without_policy_is_open_to_any_enqueuer(celery_client: Celery) -> None:
    # What SECURITY.md states: without a policy, anyone who can enqueue can call a stdio server.
    assert invoke(celery_client, "time", *CALL, wait=60)["is_error"] is False


def test_listing_tools_of_a_policy_server_needs_the_same_caller(celery_client: Celery, admin_token: str,
                                                                 user_token: str) -> None:
    import uuid

    from tests.helpers import token_headers
    from workers.contract import TASK_LIST_TOOLS

    def list_tools(token: str | None) -> list[dict[str, object]]:
        task_id = str(uuid.uuid4())
        pending = celery_client.send_task(TASK_LIST_TOOLS, task_id=task_id, kwargs={"server": "time-admins"},
                                          headers=token_headers(token, task_id))
        tools: list[dict[str, object]] = pending.get(timeout=60)
        return tools

    for token in (None, user_token):
        with pytest.raises(AuthorizationDenied):  # listing would start the server: refused like a call
            list_tools(token)
    assert {tool["tool_name"] for tool in list_tools(admin_token)} >= {"get_current_time", "convert_time"}
