"""HTTP invocation round trip and throughput vs the bare-Celery floor, measured in one run.

Round trips of the three kinds (bare no-op, bare task + httpx POST, ``sark.invoke``) are interleaved
call by call; throughput rounds of the bare POST and ``sark.invoke`` alternate (median round kept).

Run: ``.venv/bin/python -m bench.bench_http [--n 300]``. Starts its own Redis, Gateway and workers.
"""

from __future__ import annotations

import argparse
import sys

from bench.common import (
    EchoCall,
    alternating_throughput,
    interleaved,
    ratio,
    round_trip,
    save,
    send_invocation,
    table,
    throughput,
)
from devkit.stack import DevStack


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table; write bench/results/http.json."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=300, help="sequential calls per latency figure")
    parser.add_argument("--tn", type=int, default=1000, help="calls per throughput figure")
    parser.add_argument("--concurrency", type=int, default=8, help="threads per worker (both apps)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating throughput rounds (median kept)")
    args = parser.parse_args(argv)

    from config.settings import Settings
    from workers.app import create_app

    with DevStack() as stack:
        stack.start()
        stack.apply_env()
        stack.worker("sark", queues="sark.http", concurrency=args.concurrency)
        stack.worker("bare", app="bench.bare_app", queues="bare", concurrency=args.concurrency)
        import bench.bare_app as bare

        sark = create_app(Settings())
        assert stack.gateway is not None
        echo = EchoCall(stack.gateway.url)
        token, invocation = echo.token, echo.invocation

        def send_noop():  # type: ignore[no-untyped-def]
            return bare.noop.apply_async()

        def send_post():  # type: ignore[no-untyped-def]
            return bare.post.apply_async(echo.post_args)

        def send_invoke():  # type: ignore[no-untyped-def]
            return send_invocation(sark, invocation, token)

        for send in (send_noop, send_post, send_invoke):
            throughput(send, 200)  # warm every pool and connection first
        lat = interleaved({"noop": round_trip(send_noop), "post": round_trip(send_post),
                           "invoke": round_trip(send_invoke)}, args.n)
        noop, post, invoke = lat["noop"], lat["post"], lat["invoke"]
        rates = alternating_throughput({"post": send_post, "invoke": send_invoke}, args.tn, rounds=args.rounds)
        tp_post, tp_invoke = rates["post"], rates["invoke"]
        tp_noop = throughput(send_noop, args.tn)

    print(table([
        ("bare Celery no-op round trip (ms)", noop, noop),
        ("sark.invoke over HTTP vs bare task+httpx POST", invoke, post),
        ("bare task + httpx POST vs bare no-op", post, noop),
    ]))
    print(f"{'throughput sark.invoke HTTP vs bare POST (/s)':44} {tp_invoke:>30} {tp_post:>30} "
          f"{ratio(tp_invoke, tp_post):>9}")
    print(f"{'throughput bare no-op (/s)':44} {tp_noop:>30}")
    path = save("http", {"noop_ms": noop, "bare_post_ms": post, "invoke_ms": invoke, "throughput_invoke": tp_invoke,
                         "throughput_bare_post": tp_post, "throughput_noop": tp_noop,
                         "p95_ratio": ratio(invoke["p95"], post["p95"]), "throughput_ratio": ratio(tp_invoke, tp_post)})
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
