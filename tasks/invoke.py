"""Task definitions. Names are public (see :mod:`workers.contract`); other apps ``send_task`` them."""

from __future__ import annotations

import functools
import logging
import os
import socket
from collections.abc import Coroutine
from typing import Any, TypeVar

from celery import Task, states
from celery.exceptions import Ignore, Reject

from config.registry import ServerBase
from config.transports import listing_transport
from workers import tracing
from workers.app import app
from workers.authz import authorize
from workers.breaker.board import breaker_command
from workers.contract import (
    ENQUEUED_HEADER,
    OPERATOR_HEADER,
    TASK_BREAKERS,
    TASK_GET_SERVER,
    TASK_HEALTH,
    TASK_INVOKE,
    TASK_LIST_SERVERS,
    TASK_LIST_TOOLS,
    TOKEN_HEADER,
)
from workers.display import invocation_repr
from workers.errors import (
    AlreadyRunning,
    Cancelled,
    CircuitOpen,
    DiscoveryTimeout,
    InternalError,
    InvalidInvocation,
    InvocationTimeout,
    NotServedHere,
    SarkError,
    StoreUnavailable,
    UnknownServer,
)
from workers.invoker import execute, open_call_token
from workers.leases import TAKEN_HEADER, max_waits, taken_lease
from workers.metrics import METRICS
from workers.models import GatewayToolInfo
from workers.runtime import Runtime, current_runtime, get_runtime
from workers.scrub import call_secrets, scrub_error
from workers.tokens import check_operator_signature
from workers.transports.base import Transport

__all__ = ["breakers", "get_server", "health", "invoke", "list_servers", "list_tools"]

T = TypeVar("T")
log = logging.getLogger("sark.tasks")

#: Seconds added to a call's own deadline before the task stops waiting for the loop.
_WAIT_MARGIN = 5.0
#: Re-queues of an invocation whose worker could not reach its own Redis before calling the tool, and the
#: pause before each (a Redis restart takes a few seconds; a longer outage fails typed).
_STORE_RETRIES = 10
_STORE_RETRY_DELAY = 2.0
#: Seconds past the moment another worker's lease would lapse before this delivery tries again.
_LEASE_RETRY_MARGIN = 0.25
#: Seconds a task thread waits for its lease's release before re-queueing its invocation (off the hot path:
#: the re-queued copy should find the lease free, not wait for it to lapse).
_RELEASE_WAIT = 1.0
#: Message header: how many of the invocation's re-queues waited on another worker's lease.
#: ``request.retries`` counts every re-queue; lease waits (up to :func:`workers.leases.max_waits`) are
#: taken out of it, so that they never use up the budgets of ``StoreUnavailable`` and ``CircuitOpen``.
_LEASE_WAITS_HEADER = "sark_lease_waits"
#: Attribute of the task's request holding this execution's lease token (for :func:`_release_after_outcome`).
_LEASE_ATTR = "sark_lease"
#: Message header of an invocation (or listing) forwarded to its transport's queue by a worker that does not
#: serve the transport (:class:`~workers.errors.NotServedHere`): it is forwarded once, never in a loop.
_FORWARDED_HEADER = "sark_forwarded"


def _run(runtime: Runtime, coro: Coroutine[Any, Any, T], timeout: float,
         late: type[SarkError] = DiscoveryTimeout) -> T:
    """Run a discovery/operator coroutine; its errors leave scrubbed, never chained, never untyped.

    Raises:
        SarkError: the coroutine's, or ``late`` when it has not finished within ``timeout``.
    """
    try:
        return runtime.loop.run(coro, timeout=timeout)
    except TimeoutError:
        raise late(f"no result within {timeout:g}s") from None
    except SarkError as exc:
        raise scrub_error(exc) from None
    except Exception as exc:
        log.exception("internal error")
        raise InternalError(f"internal error in the worker ({type(exc).__name__}); see the worker log") from None


def _header(task: Task, name: str) -> object:
    """A message header (Celery puts custom headers on the request too, depending on the protocol)."""
    headers = task.request.headers or {}
    value = headers.get(name)
    return value if value is not None else getattr(task.request, name, None)


def _arrived_on(task: Task) -> object:
    """The queue the task's message came from (its routing key: Celery's queues route by their name)."""
    return (task.request.delivery_info or {}).get("routing_key")


def _forwardable(task: Task) -> bool:
    """Not forwarded before (:data:`_FORWARDED_HEADER`): a :class:`NotServedHere` will be forwarded."""
    return _header(task, _FORWARDED_HEADER) is None


def _forward(task: Task, exc: NotServedHere, **options: Any) -> None:
    """Re-publish the task, same id and headers, to the queue of the transport this worker does not serve,
    and end this delivery without a state (``Ignore``). A task forwarded before fails with ``exc``.

    Raises:
        NotServedHere: the task was forwarded once already.
        Ignore: it was forwarded.
        Reject: the broker is unreachable: the message goes back to its queue instead.
    """
    queue = str(exc.detail["queue"])
    if not _forwardable(task) or queue == _arrived_on(task):  # once; never back to the queue it came from
        raise exc
    headers = {**(task.request.headers or {}), _FORWARDED_HEADER: queue}
    again = task.signature_from_request(task.request, None, None, queue=queue, headers=headers, **options)
    try:
        again.apply_async(add_to_parent=False)
    except Exception as publish_error:
        raise Reject(f"cannot forward: {type(publish_error).__name__}", requeue=True) from None
    log.info("task %s: transport %s is not served here; forwarded to %s", task.request.id,
             exc.detail.get("transport"), queue)
    raise Ignore()


def _shown(invocation: Any) -> dict[str, str]:
    """What a re-published invocation's headers and task-sent events show (Celery would put the values)."""
    return {"argsrepr": "()", "kwargsrepr": invocation_repr(invocation) if isinstance(invocation, dict) else "()"}


def _stored_result(backend: Any, request_id: str) -> dict[str, Any] | None:
    """The result an earlier delivery of this invocation stored, if it succeeded (one backend read)."""
    try:
        meta = backend.get_task_meta(request_id, cache=False)
    except Exception:  # the backend is unreachable: carry the invocation out as usual
        return None
    result = meta.get("result")
    return result if meta.get("status") == states.SUCCESS and isinstance(result, dict) else None


def _lease_waits(task: Task) -> int:
    """Re-queues of this invocation spent waiting on another worker's lease (see :data:`_LEASE_WAITS_HEADER`)."""
    value = _header(task, _LEASE_WAITS_HEADER)
    return max(0, min(value, task.request.retries)) if isinstance(value, int) else 0


def _release_after_outcome(task: Task, status: str, retval: Any, task_id: str, args: Any, kwargs: Any,
                           einfo: Any) -> None:
    """``after_return``: Celery has stored the outcome (SUCCESS or FAILURE; it never calls this for a retry or
    a rejection). Only now may the lease go: a copy of the invocation starting earlier would find neither a
    lease nor a stored result, and call the tool again. Fire and forget: nothing waits for Redis here."""
    token = getattr(task.request, _LEASE_ATTR, None)
    runtime = current_runtime()
    if isinstance(token, str) and runtime is not None:
        runtime.release_lease(str(task_id), token)


@app.task(name=TASK_INVOKE, bind=True, throws=(SarkError,), after_return=_release_after_outcome)
def invoke(self: Task, invocation: Any) -> dict[str, Any]:
    """Carry out one MCP tool invocation; returns InvocationResult JSON or raises a SarkError."""
    METRICS.queue_waited(_header(self, ENQUEUED_HEADER), _arrived_on(self))
    runtime = get_runtime()
    runtime.serve_queue(_arrived_on(self))
    s = runtime.settings
    request_id = str(self.request.id)
    # The loop enforces the call's own timeouts; this is the outer bound on waiting for it.
    wait = s.invoke_attempts * (s.max_invoke_timeout + s.invoke_wait_max) + _WAIT_MARGIN
    taken = taken_lease(_header(self, TAKEN_HEADER), ttl=s.heartbeat_timeout,
                        interval=s.heartbeat_interval) if runtime.leases_taken_with_messages else None
    lease = taken[0] if taken else runtime.leases.new_token()
    setattr(self.request, _LEASE_ATTR, lease)
    lease_waits = _lease_waits(self)
    retried = self.request.retries - lease_waits  # re-queues for StoreUnavailable / CircuitOpen
    # `previous` reads the backend in a thread of the loop: with this thread's backend (its client is thread-safe).
    coro = execute(runtime, invocation, token_header=_header(self, TOKEN_HEADER), request_id=request_id,
                   lease=lease, taken_attempt=taken[1] if taken else None, taken_fresh=bool(taken and taken[2]),
                   previous=functools.partial(_stored_result, self.backend, request_id),
                   forwardable=_forwardable(self),
                   # The task's span (Celery's instrumentation) is current in this thread, not on the loop's.
                   trace_context=tracing.capture() if tracing.active else None)
    try:
        result = runtime.run_invocation(request_id, coro, wait)
    except TimeoutError:
        raise InvocationTimeout(f"no result within {wait:g}s") from None
    except AlreadyRunning as exc:
        # Another worker is carrying this invocation out: come back about when its lease would lapse if it
        # died; the next start finds the lease free and, if that worker finished, its stored result. Past
        # the longest invocation, the holder is not coming back: fail typed.
        if lease_waits >= max_waits(s):
            raise
        # Re-published by hand, not with self.retry(): a retry stores RETRY for the task id, over the state
        # of the execution that is running (and could race its SUCCESS). Ignore stores nothing.
        headers = {**(self.request.headers or {}), _LEASE_WAITS_HEADER: lease_waits + 1}
        again = self.signature_from_request(self.request, None, None, countdown=exc.retry_after + _LEASE_RETRY_MARGIN,
                                            retries=self.request.retries + 1, headers=headers, **_shown(invocation))
        try:
            again.apply_async(add_to_parent=False)  # not a child of itself (same id)
        except Exception as publish_error:  # the broker is unreachable: this message goes back instead
            raise Reject(f"cannot re-publish: {type(publish_error).__name__}", requeue=True) from None
        log.info("invocation %s runs elsewhere: this delivery waits %.1fs for its lease", request_id,
                 exc.retry_after + _LEASE_RETRY_MARGIN)
        raise Ignore() from None
    except NotServedHere as exc:
        attempt = getattr(exc, "attempt", 0)
        if _forwardable(self) and attempt:
            runtime.hand_over_lease(request_id, lease, attempt, wait=_RELEASE_WAIT)
        else:
            runtime.release_lease(request_id, lease, wait=_RELEASE_WAIT)
        _forward(self, exc, **_shown(invocation))
    except Cancelled:
        if runtime.draining:  # interrupted by the worker's shutdown, not by the caller: run it elsewhere
            runtime.release_lease(request_id, lease, wait=_RELEASE_WAIT)
            raise Reject("worker shutting down", requeue=True) from None
        raise
    except StoreUnavailable as exc:
        # The worker's Redis was unreachable before the tool was called: put the invocation back (with a
        # pause) instead of failing it; once the tool may have run, fail with the typed error.
        if exc.detail.get("reached_target") is False and retried < _STORE_RETRIES:
            runtime.release_lease(request_id, lease, wait=_RELEASE_WAIT)
            raise self.retry(exc=exc, countdown=_STORE_RETRY_DELAY, max_retries=lease_waits + _STORE_RETRIES,
                             **_shown(invocation)) from None
        raise
    except CircuitOpen as exc:
        # Re-queue after the breaker's remaining open time, if configured (default: fail fast).
        if retried >= s.breaker_retry_max:
            raise
        runtime.release_lease(request_id, lease, wait=_RELEASE_WAIT)
        raise self.retry(exc=exc, countdown=max(exc.retry_after, 0.05), max_retries=lease_waits + s.breaker_retry_max,
                         **_shown(invocation)) from None
    return result.model_dump(mode="json")


@app.task(name=TASK_LIST_SERVERS, bind=True, throws=(SarkError,))
def list_servers(self: Task, user_id: str | None = None) -> list[dict[str, Any]]:
    """Servers the Gateway knows (``GET /servers``)."""
    runtime = get_runtime()
    servers = _run(runtime, runtime.gateway.list_servers(user_id), _discovery_wait(runtime))
    return [s.model_dump(mode="json") for s in servers]


@app.task(name=TASK_GET_SERVER, bind=True, throws=(SarkError,))
def get_server(self: Task, server_id: str) -> dict[str, Any] | None:
    """One Gateway server (``GET /servers/{id}``), or None when it does not exist."""
    if not isinstance(server_id, str) or not server_id:
        raise InvalidInvocation("server_id must be a non-empty string")
    runtime = get_runtime()
    info = _run(runtime, runtime.gateway.get_server_info(server_id), _discovery_wait(runtime))
    return info.model_dump(mode="json") if info else None


@app.task(name=TASK_LIST_TOOLS, bind=True, throws=(SarkError,))
def list_tools(self: Task, server: str | None = None) -> list[dict[str, Any]]:
    """Tools of a registry server (through its transport), or every Gateway tool when None."""
    runtime = get_runtime()
    runtime.serve_queue(_arrived_on(self))
    if server is None:
        tools = _run(runtime, _transport(self, runtime, "http").list_tools(None), _discovery_wait(runtime))
    else:
        entry = runtime.registry.get(server)
        if entry is None:
            raise UnknownServer(f"unknown server {server!r}", {"server": server})
        header = _header(self, TOKEN_HEADER)
        token = None
        if header is not None or entry.policy is not None:
            token = open_call_token(runtime.settings, header, str(self.request.id))
        if entry.policy is not None:  # listing starts the server: the same callers as for a call
            authorize(entry.name, entry.policy, token, runtime.verifier, runtime.settings)
        transport = _transport(self, runtime, listing_transport(entry))
        tools = _run(runtime, _listing(transport, entry, token), _discovery_wait(runtime))
        METRICS.admit_tools(entry.name, (t.tool_name for t in tools))  # listed: label values (workers/metrics.py)
    return [t.model_dump(mode="json") for t in tools]


@app.task(name=TASK_HEALTH, bind=True)
def health(self: Task) -> dict[str, Any]:
    """This worker's view: is the Gateway healthy, which transports it carries."""
    runtime = get_runtime()
    healthy = _run(runtime, runtime.gateway.health_check(), runtime.settings.health_timeout + _WAIT_MARGIN)
    return {
        "gateway": healthy,
        "hostname": self.request.hostname or socket.gethostname(),
        "pid": os.getpid(),
        "transports": sorted(runtime.transports),
    }


@app.task(name=TASK_BREAKERS, bind=True, throws=(SarkError,))
def breakers(self: Task, action: str = "list", target: str | None = None) -> list[dict[str, Any]]:
    """List breakers, or reset one (``target="*"``: all) fleet-wide; returns their states.

    Listing is open; anything else is an operator action: it needs the ``sark_operator`` header signed
    with ``SARK_OPERATOR_KEY`` for this task, action and target, so an app that can merely enqueue
    cannot close (or, later, open) a breaker for everyone.
    """
    runtime = get_runtime()
    if action != "list":
        key = runtime.settings.operator_key
        check_operator_signature(_header(self, OPERATOR_HEADER), key=key.get_secret_value() if key else None,
                                 task_id=str(self.request.id), action=str(action), target=target)
    return _run(runtime, breaker_command(runtime.breakers, action, target), _WAIT_MARGIN + 5.0, StoreUnavailable)


async def _listing(transport: Transport, server: ServerBase, token: str | None) -> list[GatewayToolInfo]:
    """The transport's listing of ``server`` as the caller ``token``; the token is scrubbed from its errors."""
    with call_secrets(token):
        return await transport.list_tools(server, token=token)


def _transport(task: Task, runtime: Runtime, name: str) -> Transport:
    """The transport ``name`` of this worker; when it does not serve it, the task is forwarded to its queue."""
    try:
        return runtime.transport(name)
    except NotServedHere as exc:
        _forward(task, exc)
        raise  # not reached: _forward raises


def _discovery_wait(runtime: Runtime) -> float:
    s = runtime.settings
    return s.discovery_attempts * (s.gateway_timeout + s.discovery_wait_max) + _WAIT_MARGIN
