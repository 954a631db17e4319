"""The one scrubber: secrets never leave a worker in error text, whatever library wrote that text."""

from __future__ import annotations

import asyncio
from http.server import BaseHTTPRequestHandler

import pytest
from celery import Celery
from celery.backends.base import Backend

from config.settings import Settings
from tests.helpers import http_server
from workers.errors import InvalidToken, SarkError, ToolError
from workers.gateway.client import GatewayClient
from workers.scrub import REDACTED, call_secrets, register_secret, scrub, scrub_error

API_KEY = "gw-api-key-canary-5f1e2d"
TOKEN = "user-token-canary-9a8b7c"


def test_registered_and_call_secrets_are_replaced_in_every_spelling() -> None:
    register_secret(API_KEY)
    text = f"X-API-Key: {API_KEY}; repr {API_KEY.encode()!r}; json \"{API_KEY}\""
    assert API_KEY not in scrub(text) and scrub(text).count(REDACTED) == 3
    odd = TOKEN + "\n\u00e9"
    with call_secrets(odd):
        for spelling in (odd, repr(odd), repr(odd.encode("utf-8")), odd.encode("unicode_escape").decode()):
            assert TOKEN not in scrub(f"Illegal header value {spelling}")
    assert TOKEN in scrub(TOKEN)  # outside its call the token is no registered secret (nor JWT-shaped)
    assert "eyJ" not in scrub("token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlMTIz leaked")


def test_scrubbed_error_keeps_class_and_detail_shape_and_drops_its_chain() -> None:
    try:
        try:
            raise ValueError(f"header value b'Bearer {TOKEN}\\n'")
        except ValueError as inner:
            raise ToolError(f"Gateway said: Bearer {TOKEN}", {"echo": [TOKEN]}, status_code=502) from inner
    except ToolError as exc:
        clean = scrub_error(exc, [TOKEN])
    assert type(clean) is ToolError and clean.status_code == 502
    assert TOKEN not in clean.message and TOKEN not in str(clean.detail)
    assert clean.__cause__ is None and clean.__context__ is None
    stored = Backend(app=Celery(set_as_current=False), serializer="json").prepare_exception(clean, "json")
    assert TOKEN not in str(stored)


class _Ok(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("bad", [TOKEN + "\r\nX-Injected: 1", TOKEN + "\u00e9\u2603", TOKEN + "\x00"])
def test_http_stack_error_quoting_a_bad_header_is_scrubbed(bad: str) -> None:
    """httpcore/h11 (or the latin-1 encoder) quote the whole Authorization header of a malformed token."""

    async def call(url: str) -> BaseException:
        client = GatewayClient(Settings(gateway_url=url, gateway_api_key=API_KEY))
        try:
            await client.invoke_tool("echo", "echo", {}, bad, "req-1", timeout=5)
        except Exception as exc:
            return exc
        finally:
            await client.close()
        raise AssertionError("a malformed header was sent")

    with http_server(_Ok) as url:
        raw = asyncio.run(call(url))
    leaked = f"{raw} {raw.args!r}"
    assert TOKEN in leaked  # what reached the result backend before: the library quotes the header
    error = raw if isinstance(raw, SarkError) else SarkError(f"{type(raw).__name__}: {raw}", {"args": repr(raw.args)})
    with call_secrets(bad):
        clean = scrub_error(error)
    assert TOKEN not in clean.message and TOKEN not in repr(clean.detail)


@pytest.mark.parametrize("message", ["the token holds characters a bearer token may not hold"])
def test_invalid_token_message_is_fixed_text(message: str) -> None:
    assert InvalidToken(message).to_dict()["message"] == message


def test_plain_text_log_tracebacks_are_scrubbed() -> None:
    import logging

    from workers.logs import PlainFormatter, RedactingFilter

    formatter = PlainFormatter("%(message)s")
    with call_secrets("SuperSecretTok123"):
        try:
            raise ValueError("Authorization: SuperSecretTok123")
        except ValueError:
            record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed with %s", ("SuperSecretTok123",),
                                       exc_info=__import__("sys").exc_info())
        RedactingFilter().filter(record)
        line = formatter.format(record)
    assert "ValueError" in line and "SuperSecretTok123" not in line


def test_url_passwords_of_the_settings_and_unsigned_jwts_are_scrubbed() -> None:
    from workers.scrub import register_settings_secrets

    settings = Settings(_env_file=None, broker_url="redis://:BrokerPw-4711@redis:6379/0",  # type: ignore[call-arg]
                        redis_url="redis://redis:6379/1?password=StreamsPw-0815")
    register_settings_secrets(settings)
    text = scrub("lost redis://:BrokerPw-4711@redis:6379/0 and password StreamsPw-0815 too")
    assert "BrokerPw-4711" not in text and "StreamsPw-0815" not in text
    assert "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0." not in scrub("alg none: eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0.")


def test_an_event_id_that_is_not_ascii_is_never_resumed_from() -> None:
    from workers.transports.sse import _StreamState

    state = _StreamState()
    state.remember("7")
    state.remember("\u00e9t\u00e9")
    assert state.last_event_id == "7" and state.is_duplicate("\u00e9t\u00e9")
