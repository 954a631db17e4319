"""The client the official MCP conformance suite drives (client mode): every request goes through the queue.

``npx conformance client --command "python -m devkit.conformance_client" --scenario <name>`` appends its test
server's url; this writes a one-entry registry (``target``, ``transport: streamable-http``), starts Redis and a
real worker on ``sark.streamable-http``, then runs ``sark.list_tools`` and the scenario's ``sark.invoke`` with
:class:`~workers.client.SarkClient`. Exit 0 on success, 1 with the typed error. Run by ``scripts/conformance.sh``.

The suite kills the client with SIGTERM when its ``--timeout`` runs out (120 s in the script): the shell it runs
the command with, so scripts/conformance.sh ``exec``'s it, and the client also asks for SIGTERM when its parent
exits (Linux). SIGTERM and SIGINT
raise :class:`SystemExit`, so the ``with`` block around the :class:`~devkit.stack.DevStack` stops Redis and the
worker (their own sessions: nothing else would) and the temporary directory goes; a signal during a process
start is acted on once that start returns (the started process is then in the stack and stopped too), one
during the cleanup does not cut it short. Every wait is bounded by what is left of
:data:`DEADLINE` (counted from the start of :func:`main`), so the client gives up, cleans up and exits on its
own well before the suite's timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from devkit.stack import DevStack, Proc

__all__ = ["DEADLINE", "SCENARIOS", "main", "registry_entry"]

#: Seconds the client allows itself, stack start included (the suite's --timeout is 120 s; stopping the worker
#: and Redis takes a few seconds more).
DEADLINE = 90.0
#: Seconds the worker gets to stop (warm shutdown) before its process group is killed.
WORKER_STOP_TIMEOUT = 5.0
QUEUE = "sark.streamable-http"
SECRET_ENV = "CONFORMANCE_CLIENT_SECRET"
KEY_ENV = "CONFORMANCE_PRIVATE_KEY"

#: Scenario -> the tool it calls (``initialize``: none; the listing's session sends ``initialize``).
SCENARIOS: dict[str, tuple[str, dict[str, Any]] | None] = {
    "initialize": None,
    "tools_call": ("add_numbers", {"a": 5, "b": 3}),
    "sse-retry": ("test_reconnection", {}),
    "auth/client-credentials-basic": ("test-tool", {}),
    "auth/client-credentials-jwt": ("test-tool", {}),
}


def _say(message: str) -> None:
    print(f"conformance-client: {message}", file=sys.stderr, flush=True)


def registry_entry(url: str, scenario: str, context: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The registry entry ``target`` for ``scenario`` and the worker environment its secret is read from.

    Raises:
        KeyError: the context lacks a field the scenario needs.
    """
    entry: dict[str, Any] = {"transport": "streamable-http", "url": url}
    env: dict[str, str] = {}
    if scenario == "auth/client-credentials-basic":
        entry["auth"] = "oauth-client-credentials"
        entry["oauth"] = {"client_id": context["client_id"], "method": "client_secret_basic",
                          "client_secret_env": SECRET_ENV}
        env[SECRET_ENV] = context["client_secret"]
    elif scenario == "auth/client-credentials-jwt":
        entry["auth"] = "oauth-client-credentials"
        entry["oauth"] = {"client_id": context["client_id"], "method": "private_key_jwt",
                          "private_key_env": KEY_ENV, "signing_algorithm": context.get("signing_algorithm", "ES256")}
        env[KEY_ENV] = context["private_key_pem"]
    return entry, env


class _Signals:
    """SIGTERM/SIGINT -> :class:`SystemExit` (128 + signal), deferred inside :meth:`deferred`; once only."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._deferring = 0
        self._raised = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # already leaving: let the cleanup finish
            return
        self.received = signum
        if not self._deferring:
            self._exit()

    def _exit(self) -> None:
        if self.received is None or self._raised:
            return
        self._raised = True
        _say(f"{signal.Signals(self.received).name}: stopping the worker and Redis")
        raise SystemExit(128 + self.received)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A signal inside is acted on when the block ends (a process being started is then in the stack)."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if not self._deferring:
            self._exit()


_signals = _Signals()


def _die_with_parent() -> None:
    """Ask Linux for SIGTERM when the parent exits (``PR_SET_PDEATHSIG``): the suite runs the command through
    ``sh -c`` and kills that shell, which forks the command unless it is ``exec``'d (scripts/conformance.sh
    does); elsewhere, a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG


@contextlib.contextmanager
def _stack(workdir: Path, extra_env: dict[str, str]) -> Iterator[DevStack]:
    """A :class:`DevStack` stopped on the way out, a signal during the stop not cutting it short."""
    stack = DevStack(workdir, extra_env=extra_env)
    try:
        yield stack
    finally:
        with _signals.deferred():
            stack.stop()


class _Budget:
    """What is left of :data:`DEADLINE`."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def left(self, what: str, at_least: float = 1.0) -> float:
        """Seconds left for ``what``.

        Raises:
            TimeoutError: fewer than ``at_least`` are left.
        """
        left = round(self.deadline - time.monotonic(), 1)
        if left < at_least:
            raise TimeoutError(f"no time left for {what} (the client's deadline is {self.seconds:.0f}s)")
        return left


def _tail(proc: Proc | None, lines: int = 30) -> None:
    if proc is not None:
        _say(f"last lines of the worker's log:\n{''.join(proc.log().splitlines(True)[-lines:])}")


def run(url: str, scenario: str, context: dict[str, Any], workdir: Path, budget: _Budget | None = None) -> int:
    """List and call through a real worker within ``budget`` (default :data:`DEADLINE`); 0 when the
    scenario's requests succeeded."""
    from config.settings import Settings
    from workers.client import SarkClient
    from workers.errors import SarkError

    budget = budget or _Budget(DEADLINE)
    call = SCENARIOS[scenario]
    entry, worker_env = registry_entry(url, scenario, context)
    registry = workdir / "servers.yaml"
    registry.write_text(json.dumps({"servers": {"target": entry}}), encoding="utf-8")  # JSON is YAML
    worker: Proc | None = None
    with _stack(workdir, {"SARK_REGISTRY_PATH": str(registry)}) as stack:
        try:
            with _signals.deferred():
                stack.start(gateway=False)
            stack.apply_env()
            with _signals.deferred():
                worker = stack.worker("conformance", queues=QUEUE, concurrency=2, env=worker_env,
                                      ready_timeout=budget.left("the worker to start"))
            _say(f"redis and a worker on {QUEUE} ready; registry entry target -> {url}")
            client = SarkClient(Settings())
            try:
                tools = client.list_tools("target", timeout=budget.left("sark.list_tools"))
                _say(f"sark.list_tools('target') -> {[t.tool_name for t in tools]}")
                if call is not None:
                    tool, arguments = call
                    left = budget.left("sark.invoke")
                    # The worker's own timeout ends the task a little before the wait for its result does.
                    handle = client.invoke("target", tool, arguments, timeout=max(left - 2.0, 1.0))
                    result = handle.result(timeout=left)
                    _say(f"sark.invoke('target', {tool!r}, {arguments}) -> is_error={result.is_error} "
                         f"result={json.dumps(result.result)[:300]}")
                    if result.is_error:
                        _tail(worker)
                        return 1
            finally:
                client.close()
        except SarkError as exc:
            _say(f"typed error: {json.dumps(exc.to_dict())}")
            _tail(worker)
            return 1
        except Exception as exc:  # the stack did not start, the deadline passed, or an untyped failure: say which
            _say(f"failed: {type(exc).__name__}: {exc}")
            _tail(worker)
            return 1
        finally:
            if worker is not None:  # before DevStack's own stop (15 s grace): a hung task must not hold it
                with _signals.deferred():
                    worker.stop(timeout=WORKER_STOP_TIMEOUT)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m devkit.conformance_client [...] <server-url>`` (the suite appends the url)."""
    budget = _Budget(DEADLINE)
    args = sys.argv[1:] if argv is None else argv
    if not args:
        _say("usage: python -m devkit.conformance_client <server-url>")
        return 2
    url, scenario = args[-1], os.environ.get("MCP_CONFORMANCE_SCENARIO", "")
    context: dict[str, Any] = json.loads(os.environ.get("MCP_CONFORMANCE_CONTEXT") or "{}")
    if scenario not in SCENARIOS:
        _say(f"scenario {scenario!r} is not one a worker fleet runs (known: {', '.join(SCENARIOS)})")
        return 1
    _say(f"scenario {scenario} against {url} (context: {sorted(context)})")
    tmp = tempfile.mkdtemp(prefix="sark-conformance-")
    try:
        return run(url, scenario, context, Path(tmp), budget)
    except KeyError as exc:
        _say(f"the scenario's context lacks {exc}")
        return 1
    finally:
        with _signals.deferred():
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    _signals.install()  # here, not in main(): a test calling main() keeps its own handlers
    _die_with_parent()
    try:
        code = main()
    except SystemExit as stopped:  # a signal, after the cleanup
        code = stopped.code if isinstance(stopped.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    # Redis, the worker and the temporary directory are gone: skip the interpreter's teardown, where a pending
    # result's __del__ (a timed-out wait) would retry unsubscribing from the stopped Redis for ~20 s.
    os._exit(code)
