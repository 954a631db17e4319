"""streamable-http transport through the queue: warm calls beside their floors, per protocol revision, in one run.

``python -m bench.streamable_http_bench [--n 300] [--warmup 20] [--gap 5] [--concurrency 4]``: starts Redis,
two devkit Streamable HTTP MCP servers (:mod:`devkit.mcp_http_server`, built with the SDK: one speaking
2026-07-28 first, one ``--legacy``, 2025-11-25 with ``initialize`` and ``Mcp-Session-Id``), a sark worker
(``sark.streamable-http`` queue) and a bare-Celery worker (:mod:`bench.bare_app`) with :mod:`devkit.stack`,
then measures, per revision (registry entries ``modern`` and ``legacy``):

* warm: ``--n`` sequential ``sark.invoke`` of ``add`` on the worker's kept session;
* the floor: ``--n`` bare ``no-op`` round trips, and ``--n`` direct warm ``call_tool`` of the same tool on an
  ``mcp.Client`` session this process holds (:class:`bench.direct_mcp.DirectHttpSession`: the SDK alone, no
  Celery, no sark); the warm figure is compared with their sum (what a bare Celery task holding a warm
  session could at best achieve);
* for reference, what pooling saves: ``--n`` direct calls each on a new session (discovery or ``initialize``,
  the call, the close), and their sum with the no-op: a Celery task opening a session per call at best.

Every kind of call is interleaved with every other (rotating order), so that the machine's drift hits the
figure and its floor alike, and each starts after ``--gap`` ms of quiet, so that none pays for the trailing
work (events, acks) of the call before it. Writes ``bench/results/streamable_http.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import interleaved, round_trip, save, table
from bench.direct_mcp import ADD_ARGUMENTS, DirectHttpSession
from bench.stdio_bench import combined
from devkit.stack import DevStack, start_mcp_http

QUEUE = "sark.streamable-http"
#: Registry entry -> the devkit server's options (``modern``: the SDK's default, 2026-07-28 first).
REVISIONS = {"modern": (), "legacy": ("--legacy",)}


def _registry(path: Path, urls: dict[str, str]) -> Path:
    path.write_text("servers:\n" + "".join(
        f"  {name}:\n    transport: streamable-http\n    url: \"{url}\"\n" for name, url in urls.items()))
    return path


def _check(result: Any, what: str) -> None:
    """The call answered 3 (a wrong or failed answer must not be timed as a fast one)."""
    text = str(result)
    if "3" not in text or "isError': True" in text:
        raise RuntimeError(f"{what}: unexpected answer {text[:300]}")


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table; write bench/results/streamable_http.json."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=300, help="sequential calls per latency figure")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured rounds first")
    parser.add_argument("--gap", type=float, default=5.0, help="ms of quiet before each measured call")
    parser.add_argument("--concurrency", type=int, default=4, help="threads per worker (both apps)")
    args = parser.parse_args(argv)

    from config.settings import Settings
    from workers.app import create_app
    from workers.contract import TASK_INVOKE

    with tempfile.TemporaryDirectory(prefix="sark-bench-") as tmp:
        registry = Path(tmp) / "servers.yaml"
        with DevStack(extra_env={"SARK_REGISTRY_PATH": str(registry)}) as stack:
            stack.start(gateway=False)
            urls = {}
            for name, options in REVISIONS.items():
                proc = start_mcp_http(stack.log_dir, stack.base_env(), *options)
                stack.procs.append(proc)
                urls[name] = proc.url
            _registry(registry, urls)  # before the worker and the client's router read it
            stack.apply_env()
            stack.worker("sark", queues=QUEUE, concurrency=args.concurrency)
            stack.worker("bare", app="bench.bare_app", queues="bare", concurrency=args.concurrency)
            import bench.bare_app as bare

            sark = create_app(Settings())

            def send_add(server: str):  # type: ignore[no-untyped-def]
                invocation = {"server": server, "tool": "add", "arguments": ADD_ARGUMENTS}
                return sark.send_task(TASK_INVOKE, kwargs={"invocation": invocation})

            def send_noop():  # type: ignore[no-untyped-def]
                return bare.noop.apply_async()

            direct = {name: DirectHttpSession(url) for name, url in urls.items()}
            try:
                revisions = {name: session.protocol_version for name, session in direct.items()}
                for name, session in direct.items():
                    _check(send_add(name).get(timeout=60), f"sark {name}")
                    _check(session.call(), f"direct {name}")
                calls = {"noop": round_trip(send_noop)}
                for name, session in direct.items():
                    calls[f"direct_{name}"] = session.warm_ms
                    calls[f"sark_{name}"] = round_trip(lambda name=name: send_add(name))  # type: ignore[misc]
                    calls[f"new_session_{name}"] = session.new_session_ms
                lat = interleaved(calls, args.n, warmup=args.warmup, gap_ms=args.gap)
            finally:
                for session in direct.values():
                    session.close()

    noop = lat["noop"]
    rows: list[tuple[str, dict[str, float] | float, dict[str, float] | float]] = [
        ("bare Celery no-op round trip", noop, noop)]
    figures: dict[str, Any] = {}
    for name in REVISIONS:
        warm, direct_warm, new = lat[f"sark_{name}"], lat[f"direct_{name}"], lat[f"new_session_{name}"]
        floor, new_floor = combined(noop, direct_warm), combined(noop, new)
        rev = revisions[name]
        rows += [
            (f"{rev} direct warm call_tool, SDK", direct_warm, direct_warm),
            (f"{rev} sark warm vs no-op + direct warm", warm, floor),
            (f"{rev} new session per call vs warm", new, direct_warm),
            (f"{rev} sark warm vs no-op + new session", warm, new_floor),
        ]
        figures[name] = {"protocol_version": rev, "warm_ms": warm, "direct_warm_ms": direct_warm,
                         "floor_ms": floor, "p95_ratio": round(warm["p95"] / floor["p95"], 2),
                         "new_session_ms": new, "noop_plus_new_session_ms": new_floor,
                         "new_session_p50_ratio": round(new["p50"] / direct_warm["p50"], 2),
                         "warm_vs_new_session_p50_ratio": round(warm["p50"] / new_floor["p50"], 2)}
    print("all figures in ms")
    print(table(rows))
    path = save("streamable_http", {"revisions": figures, "noop_ms": noop, "gap_ms": args.gap, "n": args.n,
                                    "python": sys.version.split()[0]})
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
