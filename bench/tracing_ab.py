"""Tracing's cost (issue 16): the HTTP round trip of ``sark.invoke`` with tracing off, on, and before it existed.

One Redis and Gateway; four workers, each on its own queue, measured one call at a time in rotating order
(``interleaved``), so that the noisy machine's drift hits them alike:

- ``bare POST``: a bare Celery task that POSTs to the Gateway (the HTTP bench's floor);
- ``before``: ``sark.invoke`` by the code of ``--base`` (a checkout from before tracing; skipped without);
- ``off``: this tree, no ``OTEL_*`` variable;
- ``on``: this tree, exporting every span (OTLP/HTTP) to a receiver in this process that answers 200;
- ``off-2``: a second worker like ``off`` (``--control``): the A/A difference is what the noise alone makes.

Run: ``.venv/bin/python -m bench.tracing_ab [--base DIR] [--n 300]`` (e.g. ``git archive <commit> | tar -x -C
DIR`` for the checkout). Writes bench/results/tracing_ab.json.
"""

from __future__ import annotations

import argparse
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench.common import EchoCall, interleaved, ratio, round_trip, save, send_invocation, table
from devkit.stack import DevStack


class _Sink(BaseHTTPRequestHandler):
    """An OTLP/HTTP endpoint that takes every export and keeps nothing."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table; write bench/results/tracing_ab.json."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", type=Path, help="a checkout of the code before tracing (the 'before' worker)")
    parser.add_argument("--n", type=int, default=300, help="sequential calls per figure")
    parser.add_argument("--concurrency", type=int, default=8, help="threads per worker")
    parser.add_argument("--control", action="store_true", help="add a second tracing-off worker (A/A)")
    args = parser.parse_args(argv)

    from config.settings import Settings
    from workers.app import create_app

    sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.server_address[1]}"}
    kinds = {"off": {}, "on": otel} | ({"before": {}} if args.base else {}) | ({"off-2": {}} if args.control else {})
    with DevStack() as stack:
        stack.start()
        stack.apply_env()
        apps = {}
        for kind, env in kinds.items():
            queue = f"sark.ab-{kind}"
            worker_env = {k: v for k, v in env.items()}
            worker_env["SARK_QUEUE_HTTP"] = queue
            cwd = args.base.resolve() if kind == "before" else None
            if cwd is not None:
                worker_env["PYTHONPATH"] = str(cwd)
            stack.worker(kind, env=worker_env, queues=queue, concurrency=args.concurrency, cwd=cwd)
            apps[kind] = create_app(Settings(queue_http=queue))
        stack.worker("bare", app="bench.bare_app", queues="bare", concurrency=args.concurrency)
        import bench.bare_app as bare

        assert stack.gateway is not None
        echo = EchoCall(stack.gateway.url)
        token, invocation = echo.token, echo.invocation

        calls = {"bare POST": round_trip(lambda: bare.post.apply_async(echo.post_args))}
        for kind, app in apps.items():
            calls[kind] = round_trip(lambda app=app: send_invocation(app, invocation, token))  # type: ignore[misc]
        lat = interleaved(calls, args.n, warmup=50)
    sink.shutdown()

    floor = lat["bare POST"]
    rows = [(f"sark.invoke, tracing {kind} vs bare POST", lat[kind], floor) for kind in kinds]
    if "before" in lat:
        rows.append(("tracing off vs before tracing", lat["off"], lat["before"]))
    rows.append(("tracing on vs off", lat["on"], lat["off"]))
    if "off-2" in lat:
        rows.append(("A/A: off-2 vs off (noise)", lat["off-2"], lat["off"]))
    print(table(rows))
    path = save("tracing_ab", {"latency_ms": lat, "ratio_p95": {what: ratio(m["p95"], f["p95"])
                                                                   for what, m, f in rows},
                               "n": args.n, "pid": os.getpid()})
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
