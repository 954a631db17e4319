"""``sark up``: a local fleet that stays up, for trying sark-workers and for another app to enqueue into.

Starts ``redis-server``, the reference Gateway, the example MCP server over Streamable HTTP, one worker per
transport (each on its own queue, as in production) and Flower behind generated credentials, all on free
loopback ports; runs the demo invocations against them; writes an environment file that points a shell or
another app at the fleet (``SARK_*`` settings and a dev user token); prints where everything is, then stays
up until Ctrl-C (or SIGTERM) stops every process. ``--once`` stops after the demo (what ``sark demo`` and
CI run); its exit status says whether every demo step gave the expected outcome.
"""

from __future__ import annotations

import argparse
import secrets
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType

from devkit.stack import DEFAULT_JWT_SECRET, EXAMPLE_MCP_URL, DevStack, free_port, start_flower

__all__ = ["add_arguments", "main", "run"]

#: Default folder of the fleet's logs, Redis data and environment file (git-ignored).
DEFAULT_WORKDIR = Path(".sark") / "up"


def _env_file(stack: DevStack, path: Path, token: str) -> None:
    """What a shell or another app needs to enqueue into this fleet (mode 600: it holds keys and a token)."""
    env = stack.base_env()
    names = sorted(k for k in env if k.startswith("SARK_") or k == EXAMPLE_MCP_URL)
    lines = [f"{name}={env[name]}" for name in names] + [f"SARK_USER_TOKEN={token}"]
    header = f"# sark up: `set -a; . {path}; set +a`, then `sark invoke …`"
    path.write_text("\n".join([header, *lines]) + "\n")
    path.chmod(0o600)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``sark up``'s options."""
    parser.add_argument("--once", action="store_true", help="stop after the demo invocations (CI, `sark demo`)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help=f"logs, Redis data and the environment file (default: {DEFAULT_WORKDIR})")
    parser.add_argument("--flower-port", type=int, default=0, help="Flower's port (default: a free one)")
    parser.add_argument("--concurrency", type=int, default=8, help="tasks in flight per worker")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m devkit.up``: as ``sark up``."""
    parser = argparse.ArgumentParser(prog="sark up", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Start the fleet, run the demo, stay up (or stop with ``--once``); 0 when every demo step was right."""
    from config.settings import Settings
    from config.transports import catalog
    from devkit.demo import run_examples
    from devkit.gateway import make_token
    from workers.client import SarkClient

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    args.workdir.mkdir(parents=True, exist_ok=True)
    with DevStack(args.workdir.resolve()) as stack:
        started = time.perf_counter()
        print("starting redis-server, the reference Gateway and the example MCP server …", flush=True)
        stack.start(mcp_http=True)
        stack.apply_env()
        settings = Settings()
        transports = list(catalog())
        print(f"starting one worker per transport ({', '.join(transports)}) and Flower …", flush=True)
        user, password = "sark", secrets.token_urlsafe(12)
        # Each worker serves its Prometheus metrics on a port of its own (workers/metrics.py).
        metrics = {name: f"http://127.0.0.1:{free_port()}/metrics" for name in transports}
        with ThreadPoolExecutor(len(transports) + 1) as pool:
            workers = [pool.submit(stack.worker, name, queues=settings.queue_for(name), concurrency=args.concurrency,
                                   env={"SARK_METRICS_PORT": metrics[name].split(":")[2].split("/")[0]})
                       for name in transports]
            flower_started = pool.submit(start_flower, stack.log_dir, stack.base_env(), user, password,
                                         args.flower_port or None)
            for future in workers:
                future.result()
            flower = flower_started.result()
        stack.procs.append(flower)
        print(f"fleet ready in {time.perf_counter() - started:.1f}s (logs: {stack.log_dir})", flush=True)

        token = make_token(DEFAULT_JWT_SECRET, sub="alice", teams=["users"], ttl=12 * 3600)
        env_file = args.workdir.resolve() / "up.env"
        _env_file(stack, env_file, token)
        client = SarkClient(settings)
        try:
            failures = run_examples(client, token)
        finally:
            client.close()
        print("\ndemo finished:", "OK" if failures == 0 else f"{failures} unexpected outcome(s)", flush=True)
        if args.once:
            return 0 if failures == 0 else 1

        assert stack.redis is not None and stack.gateway is not None and stack.mcp_http is not None
        print(f"""
sark-workers is up (Ctrl-C stops everything):
  broker and results  {stack.redis.url}
  reference Gateway   {stack.gateway.url}   (dev JWT secret: devkit.stack.DEFAULT_JWT_SECRET)
  example MCP server  {stack.mcp_http.url}   (streamable-http, registry entry example-http)
  workers             {', '.join(f'{n} -> {settings.queue_for(n)}' for n in transports)}
  Flower              {flower.url}   user {user}, password {password}   (Flower's own metrics: /metrics)
  metrics             {'  '.join(f'{n} {url}' for n, url in metrics.items())}
  logs                {stack.log_dir}
Enqueue from another shell or app:
  set -a; . {env_file}; set +a
  sark invoke echo add --args '{{"a": 1, "b": 2}}'
""", flush=True)
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stop.wait(1.0):
                dead = [p.name for p in stack.procs if not p.alive()]
                if dead:
                    print(f"stopping: {', '.join(dead)} exited (see {stack.log_dir})", file=sys.stderr)
                    return 1
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            print("stopping the fleet …", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
