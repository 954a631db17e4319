"""``sark``: the operators' command line (worker, invoke, stream, servers, tools, transports, breakers, config,
demo)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.errors import SarkError

__all__ = ["main"]

#: Default of --wait (seconds) for ``sark invoke`` and ``sark stream``.
DEFAULT_WAIT = 120.0
#: Default of ``sark stream --grace`` (seconds).
DEFAULT_GRACE = 2.0
#: Exit code of ``sark stream`` when there is no stream to follow.
NO_STREAM = 3
#: Longest single XREAD BLOCK of the CLI's stream reader (milliseconds).
BLOCK_MS = 5_000
#: Seconds between two reads of a quiet stream's task state in the result backend (one GET each).
CHECK_EVERY = 0.5


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def _client() -> Any:
    from workers.client import SarkClient

    return SarkClient()


def cmd_worker(args: argparse.Namespace) -> int:
    """Check the configuration, then exec a celery worker for the chosen transports."""
    from config.settings import get_settings

    if cmd_check_config(argparse.Namespace(quiet=True)) != 0:
        return 2
    from config.transports import catalog

    settings = get_settings()
    known = list(catalog())
    transports = [t.strip() for t in (args.transports or ",".join(known)).split(",") if t.strip()]
    unknown = sorted(set(transports) - set(known))
    if unknown:
        print(f"unknown transport(s): {', '.join(unknown)} (known: {', '.join(known)})", file=sys.stderr)
        return 2
    queues = ",".join(dict.fromkeys(settings.queue_for(t) for t in transports))
    argv = [
        sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", queues,
        "-P", args.pool, "-c", str(args.concurrency), "-n", f"{args.name}@%h", "-l", args.loglevel, "-E",
    ]
    os.execv(sys.executable, argv)


def cmd_invoke(args: argparse.Namespace) -> int:
    """Enqueue one invocation; print its result (and its chunks with --stream), all within --wait seconds."""
    from workers.errors import SarkError

    deadline = time.monotonic() + args.wait
    try:
        arguments = json.loads(args.args)
    except ValueError as exc:
        print(f"--args is not JSON: {exc}", file=sys.stderr)
        return 2
    token = args.token or (os.environ.get(args.token_env) if args.token_env else None)
    client = _client()
    try:
        handle = client.invoke(args.server, args.tool, arguments, token=token, transport=args.transport,
                               stream=args.stream, timeout=args.timeout)
    except SarkError as exc:  # refused before enqueueing (e.g. a malformed token): nothing was sent
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        client.close()
        return 2
    print(f"enqueued {handle.id}", file=sys.stderr)
    try:
        if args.stream and not _stream_task(client, handle.id, deadline=deadline):
            print(f"invocation {handle.id} is over but its stream has no terminal entry; its outcome:",
                  file=sys.stderr)
        result = handle.result(timeout=_left(deadline))
    except SarkError as exc:
        return _failed(exc, handle.id, args.wait, deadline)
    finally:
        client.close()
    _print_json(result.model_dump(mode="json"))
    return 0


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _failed(exc: SarkError, task_id: str, wait: float, deadline: float) -> int:
    """Print a typed error (and, when --wait ran out, what to do next); the exit code."""
    _print_json({"error": exc.to_dict(), "request_id": task_id})
    if time.monotonic() >= deadline:
        print(f"gave up after --wait {wait:g}s; invocation {task_id} may still be running "
              f"(sark stream {task_id} follows it, sark cancel {task_id} stops it)", file=sys.stderr)
    return 1


def _follow(chunks: Any) -> int:
    """Print chunks as they arrive, with a live counter on stderr when it is a terminal."""
    live = sys.stderr.isatty()
    count = 0
    for chunk in chunks:
        count += 1
        print(json.dumps({"seq": chunk.seq, "type": chunk.event_type, "data": chunk.data}, default=str))
        if live:
            print(f"\r… {count} chunks", end="", file=sys.stderr, flush=True)
    if live:
        print(file=sys.stderr)
    return count


class _NoStream(Exception):
    """An id known to neither the streams nor the result backend (``sark stream``)."""


class _TaskWatch:
    """Tells a stream reader whether the task is over, from its state in the result backend.

    With ``unknown_at`` (a ``time.monotonic()`` value), an id that still has no stream and no result then
    raises :class:`_NoStream` (an unknown id is PENDING forever, like a queued task: the grace lets a task
    just enqueued start).
    """

    def __init__(self, pending: Any, conn: Any, unknown_at: float | None) -> None:
        self._pending = pending
        self._conn = conn
        self._unknown_at = unknown_at
        self.over = False

    def __call__(self) -> bool:
        from celery import states

        if self._state() in states.READY_STATES:
            self.over = True
            return True
        if self._unknown_at is not None and time.monotonic() >= self._unknown_at and not self._has_stream():
            raise _NoStream(f"no such invocation, or it was not streamed: {self._pending.id} has no stream "
                            "and no result")
        return False

    def _state(self) -> str | None:
        import redis

        try:
            return str(self._pending.backend.get_task_meta(self._pending.id, cache=False).get("status"))
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return None  # the backend is restarting: --wait still bounds the read

    def _has_stream(self) -> bool:
        from workers.keys import stream_key

        return bool(self._conn.exists(stream_key(self._pending.id)))


def _stream_task(client: Any, task_id: str, *, deadline: float, after: str | None = None,
                 from_seq: int | None = None, unknown_at: float | None = None) -> bool:
    """Print ``task_id``'s chunks until its terminal entry (True), or until its task is over without one (False).

    Raises:
        SarkError: the stream ended with an error or cancelled entry, or the deadline passed.
        _NoStream: with ``unknown_at``, nothing is known of ``task_id`` by then.
    """
    import redis
    from celery.result import AsyncResult

    from workers.errors import ProtocolError
    from workers.streams import reader as stream_client

    conn = redis.Redis.from_url(client.settings.redis_url, socket_timeout=BLOCK_MS / 1000 + 10)
    watch = _TaskWatch(AsyncResult(task_id, app=client.app), conn, unknown_at)
    try:
        _follow(stream_client.stream(task_id, client=conn, after=after, from_seq=from_seq, block_ms=BLOCK_MS,
                                     idle_timeout=None,
                                     timeout=_left(deadline), finished=watch, check_every=CHECK_EVERY))
    except ProtocolError as exc:
        if not (watch.over and exc.detail.get("finished")):
            raise
        return False
    finally:
        conn.close()
    return True


def cmd_stream(args: argparse.Namespace) -> int:
    """Follow an invocation's stream until its terminal entry, within --wait seconds.

    Exit codes: 0 done, 1 the invocation failed or --wait ran out, 3 no stream (an unknown id, or a task
    that was not streamed: its result is printed).
    """
    from celery.result import AsyncResult

    from workers.client import wait_result
    from workers.errors import SarkError

    start = time.monotonic()
    deadline = start + args.wait
    client = _client()
    try:
        if _stream_task(client, args.task_id, deadline=deadline, after=args.after, from_seq=args.from_seq,
                        unknown_at=start + args.grace):
            return 0
        print(f"invocation {args.task_id} was not streamed (or its stream expired); its outcome:", file=sys.stderr)
        _print_json(wait_result(AsyncResult(args.task_id, app=client.app), _left(deadline)))
        return NO_STREAM
    except _NoStream as exc:
        print(f"error: {exc} after --grace {args.grace:g}s (if it is still queued, try again later or raise "
              "--grace)", file=sys.stderr)
        return NO_STREAM
    except SarkError as exc:  # the stream ended with an error or cancelled entry, or --wait ran out
        return _failed(exc, args.task_id, args.wait, deadline)
    finally:
        client.close()


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel a queued or running invocation."""
    from celery.result import AsyncResult

    from workers.client import InvocationHandle

    client = _client()
    InvocationHandle(client, AsyncResult(args.task_id, app=client.app)).cancel()
    print(f"cancel requested for {args.task_id}")
    return 0


def cmd_servers(args: argparse.Namespace) -> int:
    """List the Gateway's servers (and the local registry with --registry)."""
    if args.registry:
        from config.registry import load_registry
        from config.settings import get_settings

        registry = load_registry(get_settings().registry_path)
        _print_json({name: s.model_dump(mode="json", exclude={"env"}) for name, s in registry.servers.items()})
        return 0
    _print_json([s.model_dump(mode="json") for s in _client().list_servers(args.user_id)])
    return 0


def cmd_transports(args: argparse.Namespace) -> int:
    """List the transports of the catalog (built-in and plug-ins), their queues and registry servers."""
    from config.registry import RegistryError, load_registry
    from config.settings import get_settings
    from config.transports import catalog

    settings = get_settings()
    try:
        servers = list(load_registry(settings.registry_path).servers.values())
    except RegistryError:
        servers = []
    rows: list[dict[str, Any]] = [{
        "name": spec.name, "queue": settings.queue_for(spec.name), "family": spec.family,
        "stream_via": spec.stream_via, "list_via": spec.list_via, "description": spec.description,
        "module": spec.factory.partition(":")[0], "servers": [s.name for s in servers if s.transport == spec.name],
    } for spec in catalog().values()]
    if args.json:
        _print_json(rows)
        return 0
    for row in rows:
        print(f"{row['name']:<16} queue {row['queue']:<20} servers {', '.join(row['servers']) or '-'}")
        print(f"{'':<16} {row['description'] or row['module']}")
    return 0


def cmd_tools(args: argparse.Namespace) -> int:
    """List tools of one registry server, or every Gateway tool."""
    _print_json([t.model_dump(mode="json") for t in _client().list_tools(args.server)])
    return 0


def cmd_breakers(args: argparse.Namespace) -> int:
    """Show or reset circuit breakers (delegates to ``workers.breaker.cli``)."""
    from workers.breaker import cli as breaker_cli

    code: int = breaker_cli.main(args.rest)
    return code


def cmd_fleet(args: argparse.Namespace) -> int:
    """Show the workers taking messages from the Redis broker (heartbeats, messages held), or set the
    fleet's visibility timeout (every worker must run with it; a worker configured otherwise refuses to start)."""
    import redis

    from config.settings import get_settings
    from workers.recovery import fleet_status, set_fleet_visibility_timeout

    settings = get_settings()
    client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=2, socket_timeout=5)
    try:
        if args.set_visibility_timeout is not None:
            set_fleet_visibility_timeout(client, args.set_visibility_timeout)
            print(f"fleet visibility timeout set to {args.set_visibility_timeout}s")
            return 0
        status = fleet_status(client)
    except redis.RedisError as exc:
        print(f"cannot reach the broker's Redis: {type(exc).__name__}", file=sys.stderr)
        return 3
    finally:
        client.close()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"visibility timeout: {status['visibility_timeout'] or 'not set yet'}"
          f"{'s' if status['visibility_timeout'] else ''}")
    for row in status["consumers"]:
        state = "alive" if row["alive"] else "DEAD (its messages go back at the next sweep)"
        print(f"{row['consumer']:<48} {state:<10} holds {row['messages']:>4}  recovering {row['recovering']:>4}")
    if not status["consumers"]:
        print("no worker has taken a message yet")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate settings and the server registry; exit 2 when an error is found."""
    from config.check import check_config

    problems = check_config()
    for problem in problems:
        print(problem, file=sys.stderr)
    errors = [p for p in problems if p.level == "error"]
    if errors:
        print(f"invalid configuration: {len(errors)} error(s)", file=sys.stderr)
        return 2
    if not getattr(args, "quiet", False):
        from config.settings import get_settings

        print(f"configuration OK ({len(problems)} warning(s)), registry {get_settings().registry_path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo on a fleet started for it, then stop (``sark up --once``)."""
    from devkit.demo import main as demo_main

    return demo_main()


def cmd_up(args: argparse.Namespace) -> int:
    """Start a local fleet (Redis, the reference Gateway, the example MCP server, one worker per transport,
    Flower), run the demo invocations against it, and stay up until Ctrl-C (``--once``: stop after the demo)."""
    from devkit.up import run

    return run(args)


def cmd_token(args: argparse.Namespace) -> int:
    """Print a user JWT the reference Gateway accepts (HS256 with ``SARK_GATEWAY_JWT_SECRET``), for
    ``SARK_USER_TOKEN``: ``export SARK_USER_TOKEN=$(sark token)``. Development only."""
    from pathlib import Path

    from devkit.gateway import make_token

    secret = os.environ.get("SARK_GATEWAY_JWT_SECRET", "")
    if args.secret_file:
        secret = Path(args.secret_file).read_text(encoding="utf-8").strip()
    if len(secret) < 32:
        print("error: set SARK_GATEWAY_JWT_SECRET (32+ characters, the reference Gateway's) or pass "
              "--secret-file; `sark up` writes both into its environment file", file=sys.stderr)
        return 2
    teams = [team for team in args.teams.split(",") if team]
    print(make_token(secret, sub=args.sub, teams=teams, ttl=args.ttl))
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    """Serve the reference Gateway (the same options as ``python -m devkit.gateway``)."""
    from devkit.gateway.__main__ import serve

    serve(args.parser, args)
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    """Print new keys (SARK_TOKEN_KEY seals user tokens, SARK_OPERATOR_KEY signs operator tasks), or add the
    missing ones to an env file (never replacing a key already there)."""
    import secrets

    from workers.tokens import generate_key

    fresh = {"SARK_TOKEN_KEY": generate_key(), "SARK_OPERATOR_KEY": secrets.token_urlsafe(32)}
    if not args.env_file:
        for name, value in fresh.items():
            print(f"{name}={value}")
        return 0
    from pathlib import Path

    path = Path(args.env_file)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    present = {line.split("=", 1)[0].strip() for line in text.splitlines() if "=" in line}
    missing = {name: value for name, value in fresh.items() if name not in present}
    if missing:
        lines = "".join(f"{name}={value}\n" for name, value in missing.items())
        with path.open("a", encoding="utf-8") as out:
            out.write(("" if not text or text.endswith("\n") else "\n") + lines)
        path.chmod(0o600)
    print(f"{path}: added {', '.join(missing) or 'nothing'} (keys already there are kept)", file=sys.stderr)
    return 0


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``sark`` argument parser."""
    parser = argparse.ArgumentParser(prog="sark", description="sark-workers: MCP tool invocations on Celery.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("worker", help="run a worker for some transports", description=cmd_worker.__doc__)
    p.add_argument("--transports", help="comma list of transports to serve (default: all; see `sark transports`)")
    p.add_argument("--pool", default="threads", help="celery pool (threads keeps one loop per process)")
    p.add_argument("-c", "--concurrency", type=int, default=16, help="tasks in flight per worker process")
    p.add_argument("--name", default="sark", help="node name (name@host)")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(fn=cmd_worker)

    p = sub.add_parser("invoke", help="enqueue an invocation and print its result", description=cmd_invoke.__doc__)
    p.add_argument("server", help="a server name from the registry")
    p.add_argument("tool")
    p.add_argument("--args", default="{}", help="tool arguments as a JSON object")
    p.add_argument("--token", help="user bearer token (prefer --token-env: argv is visible to other users)")
    p.add_argument("--token-env", default="SARK_USER_TOKEN", help="environment variable holding the token")
    p.add_argument("--transport", help="http, sse, stdio or a plug-in's (default: the server's)")
    p.add_argument("--stream", action="store_true", help="follow the invocation's chunks live")
    p.add_argument("--timeout", type=float, help="invocation timeout in seconds")
    p.add_argument("--wait", type=_positive, default=DEFAULT_WAIT,
                   help=f"seconds the whole command may take, stream included (default: {DEFAULT_WAIT:g})")
    p.set_defaults(fn=cmd_invoke)

    p = sub.add_parser("stream", help="follow an invocation's stream", description=cmd_stream.__doc__)
    p.add_argument("task_id")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--from-seq", type=int, metavar="SEQ",
                        help="resume at the chunk whose seq (as printed) is SEQ: the last seen + 1")
    resume.add_argument("--after", help="Redis stream entry id to resume after (chunk seq N is entry 0-<N+1>)")
    p.add_argument("--wait", type=_positive, default=DEFAULT_WAIT,
                   help=f"seconds to follow the stream at most (default: {DEFAULT_WAIT:g})")
    p.add_argument("--grace", type=_positive, default=DEFAULT_GRACE,
                   help="seconds from the start an id with neither a stream nor a result may take to show "
                        f"up (default: {DEFAULT_GRACE:g})")
    p.set_defaults(fn=cmd_stream)

    p = sub.add_parser("cancel", help="cancel an invocation", description=cmd_cancel.__doc__)
    p.add_argument("task_id")
    p.set_defaults(fn=cmd_cancel)

    p = sub.add_parser("servers", help="list servers", description=cmd_servers.__doc__)
    p.add_argument("--user-id")
    p.add_argument("--registry", action="store_true", help="show the local registry instead of the Gateway's")
    p.set_defaults(fn=cmd_servers)

    p = sub.add_parser("transports", help="list the transports, their queues and servers",
                       description=cmd_transports.__doc__)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_transports)

    p = sub.add_parser("tools", help="list tools", description=cmd_tools.__doc__)
    p.add_argument("server", nargs="?")
    p.set_defaults(fn=cmd_tools)

    p = sub.add_parser("breakers", help="show or reset circuit breakers", description=cmd_breakers.__doc__)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="list | reset [TARGET|--all]")
    p.set_defaults(fn=cmd_breakers)

    p = sub.add_parser("fleet", help="workers' heartbeats and held messages; the fleet's visibility timeout",
                       description=cmd_fleet.__doc__)
    p.add_argument("--json", action="store_true")
    p.add_argument("--set-visibility-timeout", type=int, metavar="SECONDS")
    p.set_defaults(fn=cmd_fleet)

    p = sub.add_parser("check-config", help="validate settings and registry", description=cmd_check_config.__doc__)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_check_config)

    p = sub.add_parser("keygen", help="generate the token-sealing and operator keys", description=cmd_keygen.__doc__)
    p.add_argument("--env-file", help="append the keys missing from this file (e.g. .env) instead of printing")
    p.set_defaults(fn=cmd_keygen)

    p = sub.add_parser("demo", help="run the end-to-end demo and stop", description=cmd_demo.__doc__)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("up", help="a local fleet that stays up (demo included)", description=cmd_up.__doc__)
    from devkit.up import add_arguments as up_arguments

    up_arguments(p)
    p.set_defaults(fn=cmd_up)

    p = sub.add_parser("token", help="mint a dev user token for the reference Gateway", description=cmd_token.__doc__)
    p.add_argument("--sub", default="alice", help="the user (JWT subject)")
    p.add_argument("--teams", default="users", help="comma list of teams (the Gateway's and policies' teams claim)")
    p.add_argument("--ttl", type=float, default=3600, help="seconds until it expires")
    p.add_argument("--secret-file", help="file holding the Gateway's JWT secret (default: SARK_GATEWAY_JWT_SECRET)")
    p.set_defaults(fn=cmd_token)

    p = sub.add_parser("gateway", help="serve the reference Gateway", description=cmd_gateway.__doc__)
    from devkit.gateway.__main__ import add_arguments as gateway_arguments

    gateway_arguments(p)
    p.set_defaults(fn=cmd_gateway, parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sark`` command."""
    args = build_parser().parse_args(argv)
    code: int = args.fn(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
