"""The Celery application: Redis broker and backend by default, JSON only, routing by transport."""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.signals import (
    before_task_publish,
    celeryd_after_setup,
    setup_logging,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)
from celery.worker.control import control_command
from kombu import Queue  # type: ignore[attr-defined]

from config.registry import Registry, RegistryError, load_registry
from config.settings import Settings, get_settings
from config.transports import UnknownTransport, catalog, default_transport, listing_transport
from workers import tracing
from workers.broker import broker_transport
from workers.contract import ENQUEUED_HEADER, TASK_INVOKE, TASK_LIST_TOOLS
from workers.leases import taken_with_messages
from workers.logs import configure_logging

if TYPE_CHECKING:
    from workers.runtime import Runtime
from workers.taskbase import task_class

__all__ = ["app", "create_app", "every_queue"]

log = logging.getLogger("sark.app")
# One line per HTTP request at INFO is noise on a busy worker.
logging.getLogger("httpx").setLevel(logging.WARNING)


def _transport_options(settings: Settings) -> dict[str, Any]:
    return {
        "visibility_timeout": settings.visibility_timeout,
        "socket_keepalive": True,
        "health_check_interval": 10,
        "retry_on_timeout": True,
    }


class InvocationRouter:
    """Sends ``sark.invoke`` (and ``sark.list_tools``) to the queue of the target's transport."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    @lru_cache(maxsize=1)  # noqa: B019 - one router per app, lives as long as the app
    def _registry(self) -> Registry | None:
        try:
            return load_registry(self._settings.registry_path)
        except RegistryError as exc:
            log.warning("routing without a registry: %s", exc)
            return None

    def __call__(self, name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_: Any) -> Any:
        if name == TASK_INVOKE:
            invocation = (kwargs or {}).get("invocation")
            if not isinstance(invocation, dict):
                return {"queue": self._settings.queue_http}  # refused there, with a typed error
            transport = invocation.get("transport")
            if transport is None:
                registry = self._registry()
                server = registry.get(str(invocation.get("server"))) if registry else None
                if server is None:
                    return {"queue": self._settings.queue_http}  # UnknownServer, there
                transport = default_transport(server, bool(invocation.get("stream")))
            return {"queue": self._queue_of(transport)}
        if name == TASK_LIST_TOOLS:
            registry = self._registry()
            server = registry.get(str((kwargs or {}).get("server"))) if registry else None
            if server is not None:
                return {"queue": self._queue_of(listing_transport(server))}
        return {"queue": self._settings.queue_http}

    def _queue_of(self, transport: object) -> str:
        try:
            return self._settings.queue_for(str(transport))
        except UnknownTransport:
            return self._settings.queue_http  # refused there (InvalidInvocation), not lost in a queue of its own


def every_queue(settings: Settings) -> list[str]:
    """The queue of every transport of the catalog, each once, the default (``queue_http``) first.

    A plug-in that cannot be loaded leaves the built-in queues (logged): the app still imports, and the
    worker's start-up check (``sark check-config``) says what is wrong instead of a traceback.
    """
    builtin = [settings.queue_http, settings.queue_sse, settings.queue_stdio]
    try:
        names = list(catalog())
    except (ImportError, ValueError, TypeError, AttributeError) as exc:
        log.error("transport catalog: %s; declaring the built-in queues only (run `sark check-config`)", exc)
        return builtin
    return list(dict.fromkeys([*builtin, *(settings.queue_for(name) for name in names)]))


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app configured from ``settings`` (default: the environment)."""
    settings = settings or get_settings()
    # Every task gets the sark base class: what events, logs and Flower show of it (workers/taskbase.py).
    celery = Celery("sark", broker=settings.broker_url, backend=settings.backend_url, include=["tasks.invoke"],
                    task_cls=task_class(settings.show_task_details))
    celery.conf.update(
        # Redis brokers: kombu's transport with the broker-restart race closed (workers/broker.py).
        broker_transport=broker_transport(settings.broker_url),
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # STARTED is visible in Flower through task events; storing it in the backend costs a write per task.
        task_track_started=settings.track_started,
        worker_send_task_events=True,
        task_send_sent_event=settings.send_sent_event,
        result_expires=settings.result_expires,
        result_extended=False,
        # A Redis restart must not turn a finished invocation into a failure: retry storing results.
        result_backend_always_retry=True,
        result_backend_max_retries=60,
        result_backend_max_sleep_between_retries_ms=1_000,
        broker_transport_options={
            **_transport_options(settings),
            # Sweep for deliveries of lost workers often enough that a redelivery follows the
            # visibility timeout closely (kombu's default sweep is every 10 s x 10 calls).
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 6)),
            "unacked_restore_throttle": 1,
            # Fast recovery of dead workers' messages (workers/recovery.py).
            "sark_heartbeat_interval": settings.heartbeat_interval,
            "sark_heartbeat_timeout": settings.heartbeat_timeout,
            "sark_recovery_batch": settings.recovery_batch,
            # Invocation leases taken with their messages (workers/leases.py).
            "sark_take_leases": taken_with_messages(settings),
        },
        result_backend_transport_options=_transport_options(settings),
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # Every transport's queue, plug-ins' included: a worker started without -Q consumes them all.
        task_queues=[Queue(queue) for queue in every_queue(settings)],
        task_default_queue=settings.queue_http,
        task_routes=(InvocationRouter(settings),),
        worker_hijack_root_logger=False,
        timezone="UTC",
        enable_utc=True,
    )
    return celery


app = create_app()


@setup_logging.connect
def _setup_logging(loglevel: Any = None, **_: Any) -> None:
    settings = get_settings()
    level = loglevel if isinstance(loglevel, str) else logging.getLevelName(loglevel or settings.log_level)
    configure_logging(str(level), settings.log_json, show_details=settings.show_task_details)


@worker_init.connect
def _refuse_invalid_config(**_: Any) -> None:
    from config.check import check_config

    errors = [p for p in check_config() if p.level == "error"]
    if errors:
        for problem in errors:
            log.error("invalid configuration: %s", problem)
        raise SystemExit(f"refusing to start: {len(errors)} configuration error(s); run `sark check-config`")


@worker_init.connect
def _join_fleet(**_: Any) -> None:
    """Refuse to start with a visibility timeout other than the fleet's (Redis brokers)."""
    settings = get_settings()
    if broker_transport(settings.broker_url) is None:
        return
    import redis

    from workers.recovery import VisibilityTimeoutMismatch, check_fleet_visibility_timeout

    client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=2, socket_timeout=5)
    try:
        waited = 0.0
        while True:  # like Celery's own start-up, wait for the broker to answer
            try:
                check_fleet_visibility_timeout(client, settings.visibility_timeout)
                return
            except VisibilityTimeoutMismatch as exc:
                log.error("invalid configuration: %s", exc)
                raise SystemExit(f"refusing to start: {exc}") from None
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if waited % 10 == 0:
                    log.warning("cannot reach the broker to check the fleet's visibility timeout (%s); retrying",
                                type(exc).__name__)
                time.sleep(1.0)
                waited += 1
            except Exception as exc:  # e.g. EVAL refused by an ACL: never start unchecked
                raise SystemExit(f"refusing to start: cannot check the fleet's visibility timeout "
                                 f"({type(exc).__name__}: {exc})") from None
    finally:
        client.close()


@worker_shutting_down.connect
def _drain_after_grace(how: str = "", **_: Any) -> None:
    # Warm shutdown (SIGTERM) waits for running tasks; Celery's own soft shutdown cannot stop threads.
    # So: running invocations get `shutdown_grace` seconds, then they are interrupted and their
    # messages requeued (Reject), for another worker to carry out with the same request_id.
    runtime = _current_runtime()
    if runtime is None:
        return
    grace = 0.0 if how == "Cold" else runtime.settings.shutdown_grace

    def drain() -> None:
        interrupted = runtime.drain()
        if interrupted:
            log.warning("shutdown: %d invocation(s) still running after %.1fs go back to the queue",
                        interrupted, grace)

    timer = threading.Timer(grace, drain)
    timer.daemon = True
    timer.start()


@celeryd_after_setup.connect
def _remember_queues(instance: Any = None, **_: Any) -> None:
    # The runtime builds only the transports of the queues this worker consumes (-Q); forked children
    # inherit the value.
    from workers import runtime

    queues = getattr(getattr(getattr(instance, "app", None), "amqp", None), "queues", None)
    consumed = getattr(queues, "consume_from", None)
    if consumed:
        runtime.worker_queues = frozenset(consumed)


@worker_ready.connect
def _serve_metrics(sender: Any = None, **_: Any) -> None:
    # Connected before _start_main_runtime: recording is on before the runtime starts its first session.
    # Served by the process that runs the tasks: the worker itself with the threads (default) or solo pool.
    # Prefork children would each need the port (prometheus_client's multiprocess mode): not supported.
    settings = get_settings()
    if not settings.metrics_port:
        return
    if type(getattr(sender, "pool", None)).__module__.endswith("prefork"):
        log.warning("metrics are not served with the prefork pool (use the threads pool, the default): "
                    "SARK_METRICS_PORT is ignored")
        return
    from workers import metrics

    if metrics.serve(settings.metrics_port, settings.metrics_address):
        metrics.METRICS.watch_breakers(_breaker_states)


def _breaker_states() -> list[tuple[str, str]]:
    """(target, state) of every breaker this worker knows, read at a scrape (on the runtime's loop)."""
    runtime = _current_runtime()
    if runtime is None:
        return []
    statuses = runtime.loop.run(runtime.breakers.status(), timeout=2.0)
    return [(status.target, status.state) for status in statuses]


@worker_init.connect
def _start_tracing(**_: Any) -> None:
    # The main process (threads/solo pools run tasks there; prefork children inherit the provider, whose
    # batch processor restarts its thread after a fork) and every child (worker_process_init, below).
    tracing.setup("sark-worker")


@worker_process_init.connect
def _start_child_runtime(**_: Any) -> None:
    tracing.setup("sark-worker")  # idempotent: set up before the fork already
    from workers.runtime import get_runtime

    get_runtime()


@worker_ready.connect
def _start_main_runtime(sender: Any = None, **_: Any) -> None:
    # Threads/solo pools run tasks in the main process: start the runtime before the first task.
    pool_module = type(getattr(sender, "pool", None)).__module__
    if not pool_module.endswith("prefork"):
        from workers.runtime import get_runtime

        get_runtime()


@before_task_publish.connect(sender=TASK_INVOKE)
def _stamp_enqueued_at(headers: dict[str, Any] | None = None, **_: Any) -> None:
    # Every sark.invoke published by an app of this module (SarkClient, the CLI, send_task, a worker's re-queue)
    # says when it became due: the worker's queue-wait metric. Re-published messages get a fresh stamp.
    if headers is not None:
        headers[ENQUEUED_HEADER] = _due_at(headers.get("eta"))


def _due_at(eta: object) -> float:
    """Now, or the message's ETA (a re-queue with a countdown) when later, in epoch seconds."""
    now = time.time()
    if isinstance(eta, str):
        try:
            return max(now, datetime.fromisoformat(eta).timestamp())
        except ValueError:
            pass
    return now


@control_command(args=[("request_id", str)], signature="<request_id>")
def sark_cancel(state: Any, request_id: str) -> dict[str, Any]:
    """Remote control: interrupt a running invocation in this worker (threads/solo pools)."""
    runtime = _current_runtime()
    return {"ok": bool(runtime and runtime.cancel(request_id)), "request_id": request_id}


def _current_runtime() -> Runtime | None:
    # Imported here, not at the top: an app that only sends tasks (SarkClient, the CLI) must not load the
    # runtime, the transports and the MCP SDK (~1.4 s of imports on a slow machine, measured with -X importtime).
    from workers.runtime import current_runtime

    return current_runtime()


def _close_runtime(**_: Any) -> None:
    from workers.runtime import close_runtime

    close_runtime()


def _flush_traces(**_: Any) -> None:
    tracing.shutdown()


worker_process_shutdown.connect(_close_runtime)
worker_shutdown.connect(_close_runtime)
# After the runtime closed: the spans of the invocations it interrupted are ended by then.
worker_process_shutdown.connect(_flush_traces)
worker_shutdown.connect(_flush_traces)
