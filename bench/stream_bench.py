"""Streamed chunk latency and rate, beside raw Redis XADD → XREAD measured in the same run.

Starts real parts with :mod:`devkit.stack` (redis-server, reference Gateway, one worker) and
measures:

* raw Redis: one XADD at a time (paced) read by ``XREAD BLOCK`` in another thread: latency; then
  unpipelined XADDs as fast as possible: entries/s;
* sark: ``stream_data`` through the Gateway (SSE) → worker → Redis Stream → ``stream_client``:
  latency from the Gateway's emit time (``t`` in each chunk) to the client's read, paced and in a
  burst; chunks/s of a 10 000-chunk invocation (first read → last read, and send → terminal).

Run: ``.venv/bin/python -m bench.stream_bench [--paced 2000] [--burst 10000]``.
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from bench.common import percentiles, save, table
from devkit.stack import DEFAULT_JWT_SECRET, DevStack

REGISTRY = Path(__file__).resolve().parents[1] / "tests" / "servers.yaml"


def raw_latency(url: str, n: int, interval: float) -> dict[str, float]:
    """One XADD every ``interval`` s; a reader blocked in XREAD records read time - add time."""
    key = f"bench:raw:{uuid.uuid4()}"
    samples: list[float] = []
    ready = threading.Event()

    def reader() -> None:
        conn = redis.Redis.from_url(url)
        last = "0-0"
        ready.set()
        while len(samples) < n:
            reply = conn.xread({key: last}, block=1000, count=100)
            now = time.time()
            for ident, fields in reply[0][1] if reply else []:
                samples.append((now - float(fields[b"t"])) * 1000)
                last = ident
        conn.close()

    thread = threading.Thread(target=reader)
    thread.start()
    ready.wait()
    producer = redis.Redis.from_url(url)
    for i in range(n):
        producer.xadd(key, {"i": i, "t": time.time()})
        time.sleep(interval)
    thread.join(60)
    producer.delete(key)
    producer.close()
    return percentiles(samples)


def raw_rate(url: str, n: int) -> float:
    """Unpipelined XADDs as fast as one client sends them, until a reader has read them all."""
    key = f"bench:rate:{uuid.uuid4()}"
    done = threading.Event()

    def reader() -> None:
        conn = redis.Redis.from_url(url)
        last, got = "0-0", 0
        while got < n:
            reply = conn.xread({key: last}, block=1000, count=1000)
            for ident, _ in reply[0][1] if reply else []:
                got += 1
                last = ident
        done.set()
        conn.close()

    thread = threading.Thread(target=reader)
    producer = redis.Redis.from_url(url)
    thread.start()
    started = time.perf_counter()
    for i in range(n):
        producer.xadd(key, {"i": i, "d": '{"index":1,"of":10000}'})
    done.wait(60)
    elapsed = time.perf_counter() - started
    producer.delete(key)
    producer.close()
    return round(n / elapsed, 1)


def sark_stream(client: Any, token: str, redis_url: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """One streamed invocation; per-chunk emit→read latency and the rates."""
    from workers.streams import reader as stream_client

    sent = time.perf_counter()
    handle = client.invoke("echo-stream", "stream_data", {**arguments, "stamp": True}, token=token, stream=True)
    samples: list[float] = []
    first = last = 0.0
    for chunk in stream_client.stream(handle.id, redis_url=redis_url, idle_timeout=60):
        now = time.time()
        samples.append((now - float(chunk.data["t"])) * 1000)  # type: ignore[index,call-overload,arg-type]
        last = time.perf_counter()
        first = first or last
    result = handle.result(timeout=60)
    n = len(samples)
    return {
        "latency_ms": percentiles(samples),
        "chunks": n,
        "result_chunks": result.chunks,
        "chunks_per_s_read": round((n - 1) / (last - first), 1) if n > 1 and last > first else None,
        "chunks_per_s_end_to_end": round(n / (last - sent), 1),
        "invocation_s": round(time.perf_counter() - sent, 3),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--paced", type=int, default=2_000, help="chunks of the paced runs")
    parser.add_argument("--interval", type=float, default=0.002, help="seconds between paced chunks")
    parser.add_argument("--burst", type=int, default=10_000, help="chunks of the burst run")
    args = parser.parse_args(argv)

    with DevStack(extra_env={"SARK_REGISTRY_PATH": str(REGISTRY), "SARK_LOG_LEVEL": "WARNING"}) as stack:
        stack.start()
        stack.apply_env()
        stack.worker("bench", concurrency=4)
        from devkit.gateway import make_token
        from workers.client import SarkClient

        assert stack.redis is not None
        url = stack.redis.url
        token = make_token(DEFAULT_JWT_SECRET, teams=["users"])
        client = SarkClient()
        try:
            sark_stream(client, token, url, {"count": 200})  # warm up pools and imports
            raw_latency(url, 200, args.interval)
            report = {
                "raw_xadd_xread_paced": raw_latency(url, args.paced, args.interval),
                "raw_xadd_rate_unpipelined_per_s": raw_rate(url, args.burst),
                "sark_paced": sark_stream(client, token, url, {"count": args.paced, "interval": args.interval}),
                "sark_burst": sark_stream(client, token, url, {"count": args.burst}),
                "params": {"paced": args.paced, "interval_s": args.interval, "burst": args.burst},
            }
        finally:
            client.close()
    raw, paced, burst = report["raw_xadd_xread_paced"], report["sark_paced"], report["sark_burst"]
    report["p95_over_raw_ms"] = round(paced["latency_ms"]["p95"] - raw["p95"], 3)
    path = save("stream_bench", report)
    print(table([("chunk latency, Gateway emit -> client read (ms)", paced["latency_ms"], raw)]))
    print(f"{'  p95 over raw XADD -> XREAD (target <= 2 ms)':44} {report['p95_over_raw_ms']:>+30.3f} ms")
    print(f"{'chunks/s, ' + str(args.burst) + '-chunk burst, end to end':44} {burst['chunks_per_s_end_to_end']:>30} "
          f"{report['raw_xadd_rate_unpipelined_per_s']:>30}   (floor: raw XADD, one at a time)")
    delivered = f"{burst['chunks']} / {burst['result_chunks']}"
    print(f"{'chunks delivered / reported by the result':44} {delivered:>30}")
    print(f"saved to {path}")
    return report


if __name__ == "__main__":
    main()
