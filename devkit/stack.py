"""Start real local parts on loopback: redis-server, the reference Gateway, celery workers.

Used by the demo, the test suite and the benchmarks, so all three run the same real processes.
Every process gets its own session (process group) and a log file; :meth:`Proc.stop` escalates
SIGTERM → SIGKILL and reaps it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from cryptography.fernet import Fernet

__all__ = [
    "DevStack",
    "Proc",
    "free_port",
    "start_gateway",
    "start_redis",
    "start_worker",
    "wait_for",
]

DEFAULT_API_KEY = "dev-gateway-key"
DEFAULT_JWT_SECRET = "dev-jwt-secret-for-local-runs-only-0123456789"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ProcessExited(RuntimeError):
    """A process being waited for exited instead of becoming ready."""


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``check`` until it is true.

    Raises:
        TimeoutError: ``check`` stayed false for ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except ProcessExited:
            raise
        except Exception:  # a failing probe means "not yet"
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout}s")


@dataclass
class Proc:
    """A child process started in its own session, logging to ``log_path``."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        """The child's pid (also its process group id)."""
        return self.popen.pid

    def alive(self) -> bool:
        """True while the process runs."""
        return self.popen.poll() is None

    def log(self) -> str:
        """Everything the process has written so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the process only (not its group)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, sig)

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> int | None:
        """Ask the process to stop, kill its whole group if it does not, and reap it."""
        if self.alive():
            self.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        return self.popen.returncode


def _spawn(name: str, argv: list[str], log_dir: Path, env: Mapping[str, str] | None = None,
           cwd: Path | None = None) -> Proc:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file = log_path.open("ab")
    try:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    finally:
        log_file.close()
    return Proc(name=name, popen=popen, log_path=log_path)


def redis_server_binary() -> str:
    """Path of ``redis-server``.

    Raises:
        FileNotFoundError: it is not installed (``apt-get install redis-server``).
    """
    found = shutil.which("redis-server")
    if not found:
        raise FileNotFoundError("redis-server is not on PATH (apt-get install redis-server)")
    return found


def start_redis(
    log_dir: Path, *, port: int | None = None, appendonly: bool = False, data_dir: Path | None = None
) -> Proc:
    """A private redis-server on 127.0.0.1 (no RDB snapshots; AOF when ``appendonly``)."""
    port = port or free_port()
    data_dir = data_dir or log_dir / f"redis-{port}"
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec",
        "--dir", str(data_dir), "--daemonize", "no", "--protected-mode", "yes",
    ]
    proc = _spawn(f"redis-{port}", argv, log_dir)
    proc.url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(proc.url, socket_connect_timeout=0.5)
    try:
        wait_for(lambda: bool(client.ping()), 15, f"redis-server on {port}")
    finally:
        client.close()
    return proc


#: The environment variable the example streamable-http server's registry entry reads its url from.
EXAMPLE_MCP_URL = "EXAMPLE_MCP_URL"


def start_mcp_http(log_dir: Path, env: Mapping[str, str], *args: str, port: int | None = None) -> Proc:
    """The devkit's Streamable HTTP MCP server (``python -m devkit.mcp_http_server``) on 127.0.0.1;
    ``proc.url`` is its MCP endpoint."""
    port = port or free_port()
    proc = _spawn(f"mcp-http-{port}", [sys.executable, "-m", "devkit.mcp_http_server", "--port", str(port), *args],
                  log_dir, env)
    proc.url = f"http://127.0.0.1:{port}/mcp"

    def listening() -> bool:
        if not proc.alive():
            raise ProcessExited(f"mcp http server exited:\n{proc.log()}")
        return "READY" in proc.log()

    wait_for(listening, 30, "the example MCP server")
    return proc


def start_gateway(
    log_dir: Path,
    env: Mapping[str, str],
    *,
    port: int | None = None,
    prefix: str = "",
    control: bool = True,
    record_headers: bool = False,
) -> Proc:
    """The reference Gateway (``python -m devkit.gateway``) on 127.0.0.1.

    ``control`` serves ``/_control/*`` (tests, demo and benches drive failures and read counters);
    ``record_headers`` also keeps request headers, tokens included: tests that check them ask for it.
    Both are test-only switches, off in the Gateway itself: only these flags turn them on.
    """
    port = port or free_port()
    argv = [sys.executable, "-m", "devkit.gateway", "--port", str(port)]
    if prefix:
        argv += ["--prefix", prefix]
    if control:
        argv.append("--enable-control")
    if record_headers:
        argv.append("--record-headers")
    proc = _spawn(f"gateway-{port}", argv, log_dir, env)
    proc.url = f"http://127.0.0.1:{port}"
    health = f"{proc.url}/{prefix.strip('/')}/health".replace("//health", "/health")

    def healthy() -> bool:
        if not proc.alive():
            raise ProcessExited(f"gateway exited:\n{proc.log()}")
        return httpx.get(health, timeout=0.5).status_code == 200

    wait_for(healthy, 20, "reference gateway")
    return proc


#: Flower's task list: what ran (``kwargs`` shows ``server.tool(argument names)``, never values), as compose has it.
FLOWER_TASKS_COLUMNS = "name,uuid,state,kwargs,received,started,runtime,worker"


def start_flower(log_dir: Path, env: Mapping[str, str], user: str, password: str,
                 port: int | None = None) -> Proc:
    """Flower for the stack's broker on 127.0.0.1 behind basic auth (credentials passed in the environment,
    not argv: ``ps`` shows argv to every local user); returns once it answers."""
    port = port or free_port()
    argv = [sys.executable, "-m", "celery", "-A", "workers.app", "flower", f"--port={port}", "--address=127.0.0.1",
            "--persistent=False"]
    proc = _spawn(f"flower-{port}", argv, log_dir, {**env, "FLOWER_BASIC_AUTH": f"{user}:{password}",
                                                    "FLOWER_TASKS_COLUMNS": FLOWER_TASKS_COLUMNS})
    proc.url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        return proc.alive() and httpx.get(f"{proc.url}/healthcheck", timeout=1).status_code == 200

    wait_for(healthy, 60, "flower")
    return proc


def start_worker(
    log_dir: Path,
    env: Mapping[str, str],
    *,
    name: str = "w1",
    queues: str = "sark.http,sark.sse,sark.stdio",
    pool: str = "threads",
    concurrency: int = 8,
    extra_args: list[str] | None = None,
    ready_timeout: float = 60.0,
    app: str = "workers.app",
    cwd: Path | None = None,
) -> Proc:
    """A real ``celery worker`` process (of ``app``); returns once it logged ``ready``. ``cwd``: where it runs
    (``python -m`` imports the code found there first: another checkout, for an A/B benchmark)."""
    argv = [
        sys.executable, "-m", "celery", "-A", app, "worker",
        "-Q", queues, "-P", pool, "-c", str(concurrency), "-n", f"{name}@%h",
        "-l", "INFO", "--without-gossip", "--without-mingle", "-E", *(extra_args or []),
    ]
    proc = _spawn(f"worker-{name}", argv, log_dir, env, cwd)

    def ready() -> bool:
        if not proc.alive():
            raise ProcessExited(f"worker {name} exited:\n{proc.log()[-4000:]}")
        return " ready." in proc.log()

    wait_for(ready, ready_timeout, f"worker {name}", interval=0.1)
    return proc


class DevStack:
    """Redis + reference Gateway (+ workers on demand) for one session, torn down on exit."""

    def __init__(self, workdir: Path | None = None, *, extra_env: Mapping[str, str] | None = None) -> None:
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="sark-")
        self.workdir = workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.log_dir = self.workdir / "logs"
        self.extra_env = dict(extra_env or {})
        self.procs: list[Proc] = []
        self.redis: Proc | None = None
        self.gateway: Proc | None = None
        self.mcp_http: Proc | None = None
        # Keys of this stack only, generated fresh: tokens are sealed in broker messages (the default),
        # the operator key signs breaker resets, user JWTs are verified with the Gateway's secret.
        self.token_key = Fernet.generate_key().decode()
        self.operator_key = secrets.token_urlsafe(32)

    def base_env(self) -> dict[str, str]:
        """Environment for children: this process's, plus the stack's ``SARK_*`` settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SARK_")}
        env.update(
            SARK_GATEWAY_API_KEY=DEFAULT_API_KEY,
            SARK_GATEWAY_JWT_SECRET=DEFAULT_JWT_SECRET,
            SARK_AUTH_HS256_SECRET=DEFAULT_JWT_SECRET,
            SARK_TOKEN_KEY=self.token_key,
            SARK_OPERATOR_KEY=self.operator_key,
            SARK_DISCOVERY_WAIT_MIN="0.05",
            SARK_DISCOVERY_WAIT_MAX="0.2",
            SARK_INVOKE_WAIT_MIN="0.05",
            SARK_INVOKE_WAIT_MAX="0.2",
            PYTHONUNBUFFERED="1",
        )
        if self.redis is not None:
            env.update(SARK_BROKER_URL=self.redis.url, SARK_REDIS_URL=self.redis.url)
        if self.gateway is not None:
            env["SARK_GATEWAY_URL"] = self.gateway.url
        if self.mcp_http is not None:
            env[EXAMPLE_MCP_URL] = self.mcp_http.url
        env.update(self.extra_env)
        return env

    def start(self, *, gateway: bool = True, appendonly: bool = False, record_headers: bool = False,
              mcp_http: bool = False) -> DevStack:
        """Start Redis and (optionally) the Gateway, with its control API (and header recording if asked), and
        the example Streamable HTTP MCP server (its url in ``EXAMPLE_MCP_URL`` for workers and clients)."""
        self.redis = start_redis(self.log_dir, appendonly=appendonly)
        self.procs.append(self.redis)
        if gateway:
            self.gateway = start_gateway(self.log_dir, self.base_env(), record_headers=record_headers)
            self.procs.append(self.gateway)
        if mcp_http:
            self.mcp_http = start_mcp_http(self.log_dir, self.base_env())
            self.procs.append(self.mcp_http)
        return self

    def worker(self, name: str = "w1", *, env: Mapping[str, str] | None = None, **kwargs: Any) -> Proc:
        """Start one more worker with the stack's environment (plus ``env``)."""
        proc = start_worker(self.log_dir, {**self.base_env(), **(env or {})}, name=name, **kwargs)
        self.procs.append(proc)
        return proc

    def apply_env(self) -> None:
        """Put the stack's ``SARK_*`` settings (and the example MCP server's url) into this process's
        environment (for clients)."""
        for key, value in self.base_env().items():
            if key.startswith("SARK_") or key == EXAMPLE_MCP_URL:
                os.environ[key] = value

    def stop(self) -> None:
        """Stop every process (workers first, Redis last)."""
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> DevStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @contextlib.contextmanager
    def running_worker(self, name: str = "w1", **kwargs: Any) -> Iterator[Proc]:
        """A worker for the duration of a ``with`` block."""
        proc = self.worker(name, **kwargs)
        try:
            yield proc
        finally:
            proc.stop()
            if proc in self.procs:
                self.procs.remove(proc)
