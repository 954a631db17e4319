"""Every benchmark in one command: ``.venv/bin/python -m bench.run_all`` (``bash scripts/bench.sh``).

Each part starts its own Redis, Gateway, workers and servers on loopback, runs a bounded load and prints
its figures beside the floor measured in the same run; the summary is written to bench/results/all.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from bench.common import RESULTS

PARTS = ["bench_http", "stdio_bench", "streamable_http_bench", "stream_bench", "breaker_bench", "bench_scaling",
         "metrics_bench"]


def _load(name: str) -> Any:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


Row = dict[str, Any]


def _row(what: str, measured: str, floor: str, value: float, target: str, met: bool | None) -> Row:
    return {"what": what, "measured": measured, "floor": floor, "value": value, "target": target, "met": met}


def targets(results: dict[str, Any]) -> list[Row]:
    """Every figure of the issue's target list, beside its floor from the same run, with the verdict."""
    rows: list[Row] = []
    http, stdio, stream = results.get("http"), results.get("stdio"), results.get("stream_bench")
    breaker, scaling = results.get("breaker"), results.get("scaling")
    if http:
        inv, post = http["invoke_ms"], http["bare_post_ms"]
        r = round(inv["p95"] / post["p95"], 2)
        rows.append(_row("HTTP round trip p95 (ms)", f"{inv['p95']:.2f} (p50 {inv['p50']:.2f}, p99 {inv['p99']:.2f})",
                         f"{post['p95']:.2f} bare task + httpx POST", r, "<= 1.25x", r <= 1.25))
        r = round(http["throughput_invoke"] / http["throughput_bare_post"], 2)
        rows.append(_row("HTTP throughput (/s)", f"{http['throughput_invoke']:.1f}",
                         f"{http['throughput_bare_post']:.1f} bare task + httpx POST", r, ">= 0.8x", r >= 0.8))
    if stdio:
        warm, floor = stdio["warm_ms"], stdio["floor_ms"]
        r = round(warm["p95"] / floor["p95"], 2)
        rows.append(_row("stdio warm call p95 (ms)", f"{warm['p95']:.2f} (p50 {warm['p50']:.2f})",
                         f"{floor['p95']:.2f} no-op + direct warm SDK call", r, "<= 1.25x", r <= 1.25))
        same = stdio.get("bare_task_warm_session_ms")
        if same:
            rows.append(_row("stdio warm call p95, same architecture", f"{warm['p95']:.2f}",
                             f"{same['p95']:.2f} bare task on a warm SDK session", round(warm["p95"] / same["p95"], 2),
                             "reference", None))
        cold, direct = stdio["cold_ms"], stdio["direct_cold_ms"]
        rows.append(_row("stdio cold start + first call p50 (ms)", f"{cold['p50']:.0f}",
                         f"{direct['p50']:.0f} SDK start + first call", round(cold["p50"] / direct["p50"], 2),
                         "once/process", None))
    for name, figures in ((results.get("streamable_http") or {}).get("revisions") or {}).items():
        warm, floor = figures["warm_ms"], figures["floor_ms"]
        rev = figures.get("protocol_version") or name
        r = round(warm["p95"] / floor["p95"], 2)
        rows.append(_row(f"streamable-http warm p95 ({rev})", f"{warm['p95']:.2f} (p50 {warm['p50']:.2f})",
                         f"{floor['p95']:.2f} no-op + direct warm SDK call", r, "<= 1.25x", r <= 1.25))
        new, direct = figures["new_session_ms"], figures["direct_warm_ms"]
        rows.append(_row(f"new session per call p50 ({rev})", f"{new['p50']:.2f}",
                         f"{direct['p50']:.2f} direct warm SDK call", round(new["p50"] / direct["p50"], 2),
                         "reference", None))
    if stream:
        over = stream["p95_over_raw_ms"]
        rows.append(_row("chunk latency p95 (ms)", f"{stream['sark_paced']['latency_ms']['p95']:.3f}",
                         f"{stream['raw_xadd_xread_paced']['p95']:.3f} raw XADD -> XREAD", over, "<= +2 ms",
                         over <= 2.0))
        rows.append(_row("chunks/s, burst", f"{stream['sark_burst']['chunks_per_s_end_to_end']:.0f}",
                         f"{stream['raw_xadd_rate_unpipelined_per_s']:.0f} raw XADD one at a time",
                         round(stream["sark_burst"]["chunks_per_s_end_to_end"]
                               / stream["raw_xadd_rate_unpipelined_per_s"], 2), "", None))
    if breaker:
        cases = breaker["cases"]
        on, off = cases["invoke, breaker on (closed, feed live: 0 EVALSHA)"], cases["invoke, breaker off"]
        added = round(on["p95"] - off["p95"], 3)
        rows.append(_row("breaker on vs off, p95 (ms)", f"{on['p95']:.3f}", f"{off['p95']:.3f} breaker off",
                         added, "<= +0.3 ms", added <= 0.3))
    metrics = results.get("metrics")
    if metrics:
        on, off = metrics["on_ms"], metrics["off_ms"]
        r = metrics["p95_ratio"]
        rows.append(_row("HTTP round trip p95, metrics on (ms)", f"{on['p95']:.2f} (p50 {on['p50']:.2f})",
                         f"{off['p95']:.2f} metrics off (p50 {off['p50']:.2f})", r, "<= 1.05x", r <= 1.05))
    if scaling:
        r = scaling["scaling_ratio"]
        rows.append(_row("50 ms tool, 2 workers vs 1 (/s)", f"{scaling['two_workers_per_s']:.1f}",
                         f"{scaling['one_worker_per_s']:.1f} one worker", r, ">= 1.7x", r >= 1.7))
        peak = scaling["in_flight_peak"]
        rows.append(_row("in flight in one worker process", f"{peak}",
                         f"RSS {scaling['idle_rss_mb']} -> {scaling['busy_rss_mb']} MiB", peak, ">= 500", peak >= 500))
    return rows


def format_targets(rows: list[Row]) -> str:
    """The target table as text."""
    lines = [f"{'figure':40} {'measured':>26} {'floor (same run)':>40} {'ratio/diff':>10} {'target':>12}  met"]
    for row in rows:
        met = {True: "yes", False: "NO", None: "-"}[row["met"]]
        lines.append(f"{row['what']:40} {row['measured']:>26} {row['floor']:>40} {row['value']:>10} "
                     f"{row['target']:>12}  {met}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run every part in turn, then print and save the summary."""
    started = time.perf_counter()
    failed = []
    for part in PARTS:
        print(f"\n##### {part}", flush=True)
        # One process per part: each starts its own stack and reads its own SARK_* settings.
        done = subprocess.run([sys.executable, "-m", f"bench.{part}", *(argv or [])], check=False)
        if done.returncode != 0:  # one broken part must not hide the others' figures
            failed.append(f"{part}: exit {done.returncode}")
            print(f"!! {part} failed (exit {done.returncode})", flush=True)
    names = ("http", "stdio", "streamable_http", "stream_bench", "breaker", "scaling", "metrics")
    summary: dict[str, Any] = {name: _load(name) for name in names}
    summary["targets"] = targets(summary)
    print("\n" + format_targets(summary["targets"]))
    summary["failed"] = failed
    summary["seconds"] = round(time.perf_counter() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "all.json").write_text(json.dumps(summary, indent=2))
    print(f"\nall figures written to {RESULTS / 'all.json'} in {summary['seconds']} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
