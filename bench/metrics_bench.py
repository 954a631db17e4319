"""HTTP round trip with metrics on vs off, in one run (issue 16: on must stay within 5 % of off).

Two sark workers of the same code, each on its own queue: one with ``SARK_METRICS_PORT`` (recording, serving
``/metrics``, scraped every ``--scrape-every`` seconds while the bench runs, breaker states included), one
without (its hooks return at once: the path of the code before metrics). Round trips of the two are interleaved
call by call (rotating order), so the machine's drift hits both alike; then alternating throughput rounds.

Run: ``.venv/bin/python -m bench.metrics_bench [--n 400]``. Starts its own Redis, Gateway and workers;
writes bench/results/metrics.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

import httpx

from bench.common import alternating_throughput, interleaved, ratio, round_trip, save, send_invocation, throughput
from devkit.stack import DEFAULT_JWT_SECRET, DevStack, free_port

_ON_QUEUE = "sark.http.metrics-on"


def _scraper(url: str, every: float, stop: threading.Event) -> threading.Thread:
    """Scrape ``url`` every ``every`` seconds until ``stop`` (what Prometheus does; counted in the figures)."""

    def run() -> None:
        with httpx.Client(timeout=5) as client:
            while not stop.wait(every):
                client.get(url).raise_for_status()

    thread = threading.Thread(target=run, daemon=True, name="scraper")
    thread.start()
    return thread


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    """Measure and print the figures; write bench/results/metrics.json."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=400, help="sequential calls per latency figure")
    parser.add_argument("--tn", type=int, default=800, help="calls per throughput round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating throughput rounds (median kept)")
    parser.add_argument("--concurrency", type=int, default=8, help="threads per worker")
    parser.add_argument("--scrape-every", type=float, default=5.0, help="seconds between scrapes of /metrics")
    parser.add_argument("--control", action="store_true", help="A/A run: the 'on' worker without metrics too "
                        "(the noise between two identical workers)")
    args = parser.parse_args(argv)

    from config.settings import Settings
    from devkit.gateway import make_token
    from workers.app import create_app

    port = free_port()
    with DevStack() as stack:
        stack.start()
        stack.apply_env()
        worker_off = stack.worker("off", queues="sark.http", concurrency=args.concurrency)
        worker_on = stack.worker("on", queues=_ON_QUEUE, concurrency=args.concurrency,
                     env={"SARK_QUEUE_HTTP": _ON_QUEUE, "SARK_METRICS_PORT": "0" if args.control else str(port)})
        sark = create_app(Settings())
        token = make_token(DEFAULT_JWT_SECRET)
        invocation = {"server": "echo", "tool": "echo", "arguments": {"x": 1}}
        url = f"http://127.0.0.1:{port}/metrics"

        def send_off():  # type: ignore[no-untyped-def]
            return send_invocation(sark, invocation, token, queue="sark.http")

        def send_on():  # type: ignore[no-untyped-def]
            return send_invocation(sark, invocation, token, queue=_ON_QUEUE)

        for send in (send_off, send_on):
            throughput(send, 200)  # warm every pool and connection first
        cpu = {"off": -_cpu_seconds(worker_off.pid), "on": -_cpu_seconds(worker_on.pid)}
        stop = threading.Event()
        if not args.control:
            _scraper(url, args.scrape_every, stop)
        try:
            lat = interleaved({"off": round_trip(send_off), "on": round_trip(send_on)}, args.n)
            rates = alternating_throughput({"off": send_off, "on": send_on}, args.tn, rounds=args.rounds)
        finally:
            stop.set()
        cpu["off"] += _cpu_seconds(worker_off.pid)
        cpu["on"] += _cpu_seconds(worker_on.pid)
        scrape = "" if args.control else httpx.get(url, timeout=5).text
        sark.close()

    off, on = lat["off"], lat["on"]
    calls = args.n + 20 + args.tn * args.rounds  # interleaved() warms up with 20 calls of each kind
    cpu_ms = {name: round(1000 * seconds / calls, 3) for name, seconds in cpu.items()}
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in scrape.splitlines()
                  if line.startswith("sark_invocations_total{"))
    figures = {
        "off_ms": off, "on_ms": on,
        "p50_ratio": ratio(on["p50"], off["p50"]), "p95_ratio": ratio(on["p95"], off["p95"]),
        "mean_ratio": ratio(on["mean"], off["mean"]),
        "throughput_off": rates["off"], "throughput_on": rates["on"],
        "throughput_ratio": ratio(rates["on"], rates["off"]),
        "worker_cpu_ms_per_call_off": cpu_ms["off"], "worker_cpu_ms_per_call_on": cpu_ms["on"],
        "worker_cpu_ratio": ratio(cpu_ms["on"], cpu_ms["off"]),
        "invocations_counted_by_the_on_worker": counted, "scrape_every_s": args.scrape_every,
        "control": args.control,
    }
    print(f"{'HTTP round trip (ms), n=' + str(args.n):34} {'p50':>8} {'p95':>8} {'p99':>8} {'mean':>8}")
    for name, row in (("metrics off", off), ("metrics on (served, scraped)", on)):
        print(f"{name:34} {row['p50']:>8.2f} {row['p95']:>8.2f} {row['p99']:>8.2f} {row['mean']:>8.2f}")
    print(f"{'ratio on/off':34} {figures['p50_ratio']:>8} {figures['p95_ratio']:>8} {'':>8} {figures['mean_ratio']:>8}")
    print(f"throughput (/s): off {rates['off']}, on {rates['on']}, ratio {figures['throughput_ratio']}")
    print(f"worker CPU per call (ms): off {cpu_ms['off']}, on {cpu_ms['on']}, ratio {figures['worker_cpu_ratio']}")
    print(f"the on worker counted {counted:.0f} invocations")
    print(f"written {save('metrics_control' if args.control else 'metrics', figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
