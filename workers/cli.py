"""``sark``: the operators' command line (worker, invoke, stream, servers, tools, breakers, config, demo)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]

QUEUE_BY_TRANSPORT = {"http": "queue_http", "sse": "queue_sse", "stdio": "queue_stdio"}


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
    settings = get_settings()
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    unknown = sorted(set(transports) - set(QUEUE_BY_TRANSPORT))
    if unknown:
        print(f"unknown transport(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    queues = ",".join(getattr(settings, QUEUE_BY_TRANSPORT[t]) for t in transports)
    argv = [
        sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", queues,
        "-P", args.pool, "-c", str(args.concurrency), "-n", f"{args.name}@%h", "-l", args.loglevel, "-E",
    ]
    os.execv(sys.executable, argv)


def cmd_invoke(args: argparse.Namespace) -> int:
    """Enqueue one invocation; print its result (and its chunks with --stream)."""
    from workers.errors import SarkError

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
        return 2
    print(f"enqueued {handle.id}", file=sys.stderr)
    try:
        if args.stream:
            _follow(handle.stream())
        result = handle.result(timeout=args.wait)
    except SarkError as exc:
        _print_json({"error": exc.to_dict(), "request_id": handle.id})
        return 1
    finally:
        client.close()
    _print_json(result.model_dump(mode="json"))
    return 0


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


def cmd_stream(args: argparse.Namespace) -> int:
    """Follow an invocation's stream until its terminal entry."""
    from config.settings import get_settings
    from workers import stream_client
    from workers.errors import SarkError

    try:
        _follow(stream_client.stream(args.task_id, redis_url=get_settings().redis_url, after=args.after))
    except SarkError as exc:  # the stream ended with an error or cancelled entry, or went idle
        _print_json({"error": exc.to_dict(), "request_id": args.task_id})
        return 1
    return 0


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


def cmd_tools(args: argparse.Namespace) -> int:
    """List tools of one registry server, or every Gateway tool."""
    _print_json([t.model_dump(mode="json") for t in _client().list_tools(args.server)])
    return 0


def cmd_breakers(args: argparse.Namespace) -> int:
    """Show or reset circuit breakers (delegates to ``workers.breaker_cli``)."""
    from workers import breaker_cli

    code: int = breaker_cli.main(args.rest)
    return code


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
    """Run the demo (starts its own Redis, Gateway and worker)."""
    from workers.demo import main as demo_main

    return demo_main()


def cmd_gateway(args: argparse.Namespace) -> int:
    """Serve the reference Gateway."""
    from workers.gateway.__main__ import main as gateway_main

    gateway_main(["--host", args.host, "--port", str(args.port)])
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


def build_parser() -> argparse.ArgumentParser:
    """The ``sark`` argument parser."""
    parser = argparse.ArgumentParser(prog="sark", description="sark-workers: MCP tool invocations on Celery.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("worker", help="run a worker for some transports", description=cmd_worker.__doc__)
    p.add_argument("--transports", default="http,sse,stdio", help="comma list of http,sse,stdio (default: all)")
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
    p.add_argument("--transport", choices=["http", "sse", "stdio"])
    p.add_argument("--stream", action="store_true", help="follow the invocation's chunks live")
    p.add_argument("--timeout", type=float, help="invocation timeout in seconds")
    p.add_argument("--wait", type=float, default=120, help="seconds to wait for the result")
    p.set_defaults(fn=cmd_invoke)

    p = sub.add_parser("stream", help="follow an invocation's stream", description=cmd_stream.__doc__)
    p.add_argument("task_id")
    p.add_argument("--after", help="Redis stream entry id to resume after")
    p.set_defaults(fn=cmd_stream)

    p = sub.add_parser("cancel", help="cancel an invocation", description=cmd_cancel.__doc__)
    p.add_argument("task_id")
    p.set_defaults(fn=cmd_cancel)

    p = sub.add_parser("servers", help="list servers", description=cmd_servers.__doc__)
    p.add_argument("--user-id")
    p.add_argument("--registry", action="store_true", help="show the local registry instead of the Gateway's")
    p.set_defaults(fn=cmd_servers)

    p = sub.add_parser("tools", help="list tools", description=cmd_tools.__doc__)
    p.add_argument("server", nargs="?")
    p.set_defaults(fn=cmd_tools)

    p = sub.add_parser("breakers", help="show or reset circuit breakers", description=cmd_breakers.__doc__)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="list | reset [TARGET|--all]")
    p.set_defaults(fn=cmd_breakers)

    p = sub.add_parser("check-config", help="validate settings and registry", description=cmd_check_config.__doc__)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_check_config)

    p = sub.add_parser("keygen", help="generate the token-sealing and operator keys", description=cmd_keygen.__doc__)
    p.add_argument("--env-file", help="append the keys missing from this file (e.g. .env) instead of printing")
    p.set_defaults(fn=cmd_keygen)

    p = sub.add_parser("demo", help="run the end-to-end demo", description=cmd_demo.__doc__)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("gateway", help="serve the reference Gateway", description=cmd_gateway.__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(fn=cmd_gateway)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sark`` command."""
    args = build_parser().parse_args(argv)
    code: int = args.fn(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
