"""Settings: one pydantic-settings object read from ``SARK_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DEFAULT_REGISTRY_PATH", "Settings", "get_settings"]

DEFAULT_REGISTRY_PATH = Path(__file__).with_name("servers.yaml")

class Settings(BaseSettings):
    """Everything a worker, a client or the reference Gateway needs to know.

    Every field is read from ``SARK_<FIELD>`` (e.g. ``SARK_BROKER_URL``). Durations are seconds.
    """

    # ``.env`` in the working directory (written by ``scripts/bootstrap.sh`` with generated keys) is read
    # after the environment, which wins.
    model_config = SettingsConfigDict(env_prefix="SARK_", extra="ignore", frozen=True, env_file=".env",
                                      env_file_encoding="utf-8")

    # --- broker, backend, Redis -------------------------------------------------------------
    broker_url: str = Field(default="redis://127.0.0.1:6379/0",
                            description="broker (`amqp://…` for RabbitMQ works too)")
    result_backend: str | None = Field(default=None, description="result backend (unset: `SARK_REDIS_URL`)")
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="the workers' own Redis: streams, "
                           "breakers, leases, heartbeats")
    result_expires: int = Field(default=86_400, gt=0, description="seconds results stay in the backend")
    visibility_timeout: int = Field(default=3_600, gt=0, description="Redis broker redelivery delay (the last "
                                    "resort; must exceed the longest invocation, checked; one value for the "
                                    "whole fleet, stored in Redis at first start: `sark fleet`)")
    heartbeat_interval: float = Field(default=2.0, gt=0, description="seconds between a worker's heartbeats "
                                      "(and between renewals of its running invocations' leases)")
    heartbeat_timeout: float = Field(default=8.0, gt=0, description="a worker silent this long is dead: its "
                                     "messages go back to their queues, its invocations' leases lapse "
                                     "(at least 3 x heartbeat_interval)")
    recovery_batch: int = Field(default=50, gt=0, description="messages of dead workers a sweeper puts back "
                                "per event-loop turn")

    track_started: bool = Field(default=False, description="store STARTED in the result backend")
    send_sent_event: bool = Field(default=False, description="clients emit task-sent events (Flower)")

    # --- Gateway ------------------------------------------------------------------------------
    gateway_url: str = Field(default="http://127.0.0.1:8080", description="Gateway base URL")
    gateway_api_key: SecretStr | None = Field(default=None, description="sent to the Gateway as `X-API-Key`")
    gateway_path_prefix: str = Field(default="", description="path before the Gateway API's routes, e.g. `/api/v1`")
    gateway_timeout: float = Field(default=5.0, gt=0, description="seconds for discovery calls (servers, tools)")
    health_timeout: float = Field(default=2.0, gt=0, description="seconds for the Gateway probe of `sark.health`")
    http_max_connections: int = Field(default=100, gt=0, description="Gateway connections per worker process")
    http_max_keepalive: int = Field(default=20, ge=0, description="idle Gateway connections kept open")
    http_keepalive_expiry: float = Field(default=30.0, gt=0, description="seconds an idle Gateway connection "
                                         "is kept")
    discovery_attempts: int = Field(default=3, ge=1, description="tries of a discovery call (transport errors, "
                                    "5xx)")
    discovery_wait_min: float = Field(default=2.0, ge=0, description="shortest wait between discovery tries")
    discovery_wait_max: float = Field(default=10.0, ge=0, description="longest wait between discovery tries")
    invoke_attempts: int = Field(default=2, ge=1, description="tries of an invocation (retried only on timeout)")
    invoke_wait_min: float = Field(default=1.0, ge=0, description="shortest wait between invocation tries")
    invoke_wait_max: float = Field(default=5.0, ge=0, description="longest wait between invocation tries")

    # --- security and shutdown -----------------------------------------------------------------
    token_key: SecretStr | None = Field(default=None, description="Fernet key sealing user tokens in broker "
                                    "messages (`sark keygen`; `scripts/bootstrap.sh` writes one into `.env`)")
    allow_clear_tokens: bool = Field(default=False, description="accept tokens that are not sealed (development "
                                    "only; check-config warns)")
    token_ttl: int = Field(default=7_200, gt=0, description="seconds a sealed token stays valid after sealing "
                           "(above visibility_timeout)")
    max_token_bytes: int = Field(default=8_192, gt=0, description="longest accepted user token")
    token_leeway: float = Field(default=0.0, ge=0, description="seconds of clock skew allowed on JWT exp")
    operator_key: SecretStr | None = Field(default=None, description="signs operator-only tasks (`sark.breakers` "
                                       "reset; `sark keygen`)")
    # Verification of user tokens for registry ``policy:`` blocks (who may call a server).
    auth_hs256_secret: SecretStr | None = Field(default=None, description="HS256 secret of user JWTs")
    auth_public_key: str | None = Field(default=None, description="PEM public key (or a path to one) of user JWTs")
    auth_jwks_path: Path | None = Field(default=None, description="JWKS file with the public keys of user JWTs")
    auth_audience: str | None = Field(default=None, description="required `aud` of user JWTs")
    auth_issuer: str | None = Field(default=None, description="required `iss` of user JWTs")
    auth_teams_claim: str = Field(default="teams", description="claim listing the user's teams")
    auth_roles_claim: str = Field(default="roles", description="claim listing the user's roles")
    # What Flower and INFO logs show of an invocation (default: server.tool and argument names only).
    show_task_details: bool = Field(default=False, description="Flower and INFO logs show argument values and "
                                   "error text (scrubbed)")
    shutdown_grace: float = Field(default=30.0, ge=0, description="SIGTERM: seconds running invocations get "
                                  "before the rest are interrupted and requeued")

    # --- invocations --------------------------------------------------------------------------
    invoke_timeout: float = Field(default=30.0, gt=0, description="seconds an invocation may take unless it asks "
                                  "otherwise")
    min_invoke_timeout: float = Field(default=1.0, gt=0, description="smallest timeout a task may ask for")
    max_invoke_timeout: float = Field(default=600.0, gt=0, description="largest timeout a task may ask for")
    max_argument_bytes: int = Field(default=1_048_576, gt=0, description="largest arguments of an invocation "
                                    "(JSON bytes)")
    max_result_bytes: int = Field(default=10_485_760, gt=0, description="largest result of an invocation")

    # --- streams ------------------------------------------------------------------------------
    stream_maxlen: int = Field(default=100_000, gt=0, description="entries kept per stream")
    stream_ttl: int = Field(default=3_600, gt=0, description="seconds a stream is kept after its end")
    max_stream_chunks: int = Field(default=100_000, gt=0, description="chunks one invocation may publish")
    max_stream_bytes: int = Field(default=67_108_864, gt=0, description="bytes of chunk data per stream")
    sse_reconnects: int = Field(default=3, ge=0, description="SSE resumes (`Last-Event-ID`) after a drop "
                                "without progress")
    sse_retry_max: float = Field(default=5.0, ge=0, description="cap on the SSE server's `retry` delay")

    # --- queues -------------------------------------------------------------------------------
    queue_http: str = Field(default="sark.http", description="queue of `http` invocations")
    queue_sse: str = Field(default="sark.sse", description="queue of `sse` invocations")
    queue_stdio: str = Field(default="sark.stdio", description="queue of `stdio` invocations")

    # --- circuit breakers (per-target fail_max/reset_timeout: the registry's ``breaker:``) ------
    breaker_enabled: bool = Field(default=True, description="false turns every breaker off")
    breaker_retry_max: int = Field(default=0, ge=0, description="re-queues of a `CircuitOpen` task; 0 = fail "
                                   "fast")
    breaker_store_timeout: float = Field(default=0.5, gt=0, description="seconds a breaker waits for Redis before "
                                         "falling back to a breaker local to the process")
    breaker_store_recheck: float = Field(default=2.0, gt=0, description="seconds between tries to return to Redis")

    # --- server registry ----------------------------------------------------------------------
    registry_path: Path = Field(default=DEFAULT_REGISTRY_PATH, description="the server registry (YAML): every "
                                "server a task may target")

    # --- logging ------------------------------------------------------------------------------
    log_level: str = Field(default="INFO", description="log level (`DEBUG`, `INFO`, `WARNING`…)")
    log_json: bool = Field(default=True, description="JSON log lines with task/request ids, secrets redacted; "
                           "false = plain text")

    # --- metrics (workers/metrics.py) -----------------------------------------------------------
    metrics_port: int = Field(default=0, ge=0, le=65_535, description="port of the worker's Prometheus "
                              "`/metrics` (threads/solo pool); 0 = not served")
    metrics_address: str = Field(default="127.0.0.1", description="address `/metrics` listens on (`0.0.0.0`: "
                                 "every interface, e.g. in a container)")

    @field_validator("token_key", "operator_key", "gateway_api_key", "auth_hs256_secret", "auth_public_key",
                     "auth_jwks_path", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `SARK_TOKEN_KEY=` (an .env line left blank, as in .env.example) means "not set", not "the key ''".
        return None if value == "" else value

    @model_validator(mode="after")
    def _check_timeouts(self) -> Settings:
        longest = self.invoke_attempts * (self.max_invoke_timeout + self.invoke_wait_max)
        if longest >= self.visibility_timeout:
            raise ValueError(
                f"the longest invocation ({self.invoke_attempts} x (max_invoke_timeout "
                f"{self.max_invoke_timeout:g}s + invoke_wait_max {self.invoke_wait_max:g}s) = {longest:g}s) "
                f"must be below visibility_timeout ({self.visibility_timeout}s), "
                "or running invocations would be redelivered"
            )
        if self.heartbeat_timeout < 3 * self.heartbeat_interval:
            raise ValueError("heartbeat_timeout must be at least 3 x heartbeat_interval (one late heartbeat must "
                             "not declare a live worker dead)")
        if self.invoke_timeout > self.max_invoke_timeout:
            raise ValueError("invoke_timeout must not exceed max_invoke_timeout")
        if not self.min_invoke_timeout <= self.invoke_timeout:
            raise ValueError("min_invoke_timeout must not exceed invoke_timeout")
        if self.token_key is not None:
            from cryptography.fernet import Fernet

            try:
                Fernet(self.token_key.get_secret_value().encode())
            except (ValueError, TypeError):
                raise ValueError("token_key is not a Fernet key (32 url-safe base64-encoded bytes; generate one "
                                 "with `sark keygen`)") from None
        return self

    @property
    def backend_url(self) -> str:
        """Result backend URL (``result_backend`` or ``redis_url``)."""
        return self.result_backend or self.redis_url

    def queue_for(self, transport: str) -> str:
        """Queue that carries invocations of ``transport``: its ``queue_<name>`` setting (``SARK_QUEUE_HTTP``…)
        for the built-in ones, else the transport's default (:mod:`config.transports`).

        Raises:
            UnknownTransport: no transport of that name.
        """
        from config.transports import get_spec

        own = getattr(self, f"queue_{transport}", None)
        return own if isinstance(own, str) else get_spec(transport).default_queue


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings of this process, read once from the environment."""
    return Settings()
