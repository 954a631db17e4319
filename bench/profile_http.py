"""CPU per call of the sark and bare-floor workers under the HTTP throughput load, then a py-spy profile.

Run: ``.venv/bin/python -m bench.profile_http [--n 2000] [--target sark|bare]``. Starts its own Redis,
Gateway and worker, attaches ``py-spy record`` (all threads, native frames off) to the worker while
the bounded load runs, and prints the functions with the most samples (self and cumulative).
The raw collapsed stacks are written to ``bench/results/profile-<target>.txt``.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from celery.result import AsyncResult

from bench.common import RESULTS, EchoCall, send_invocation, throughput
from devkit.stack import DevStack


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarize(collapsed: Path, top: int) -> str:
    """Top functions by self samples and by inclusive samples, from py-spy's collapsed output."""
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            incl_counts[frame] += count
    lines = [f"total samples: {total}", "", "self:"]
    lines += [f"{100 * c / total:6.1f}%  {f}" for f, c in self_counts.most_common(top)]
    lines += ["", "inclusive:"]
    lines += [f"{100 * c / total:6.1f}%  {f}" for f, c in incl_counts.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Profile one worker under load and print the hottest functions."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000, help="calls in the profiled load")
    parser.add_argument("--target", choices=["sark", "bare", "none"], default="sark",
                        help="which worker to profile after the CPU rounds (none: skip)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating bare/sark CPU rounds")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--top", type=int, default=45)
    parser.add_argument("--gil", action="store_true", help="only samples holding the GIL (≈ Python CPU)")
    parser.add_argument("--idle", action="store_true", help="keep idle frames (threads waiting)")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))

    from config.settings import Settings
    from workers.app import create_app

    # SARK_* settings given to this command reach the sark worker (for A/B runs of one setting).
    with DevStack(extra_env={k: v for k, v in os.environ.items() if k.startswith("SARK_")}) as stack:
        stack.start()
        stack.apply_env()
        workers = {
            "sark": stack.worker("sark", queues="sark.http", concurrency=args.concurrency),
            "bare": stack.worker("bare", app="bench.bare_app", queues="bare", concurrency=args.concurrency),
        }
        import bench.bare_app as bare

        sark = create_app(Settings())
        assert stack.gateway is not None and stack.redis is not None
        echo = EchoCall(stack.gateway.url)
        token, invocation = echo.token, echo.invocation
        senders: dict[str, Callable[[], AsyncResult]] = {
            "bare": lambda: bare.post.apply_async(echo.post_args),
            "sark": lambda: send_invocation(sark, invocation, token),
        }
        for send in senders.values():
            throughput(send, 100)  # warm up pools and sessions
        # Alternate the two so drift on this noisy machine hits both alike.
        for round_no in range(args.rounds):
            for name in ("bare", "sark"):
                pids = {"worker": workers[name].popen.pid, "gateway": stack.gateway.popen.pid,
                        "redis": stack.redis.popen.pid, "client": os.getpid()}
                before = {k: cpu_seconds(p) for k, p in pids.items()}
                rate = throughput(senders[name], args.n)
                used = {k: (cpu_seconds(p) - before[k]) * 1000 / args.n for k, p in pids.items()}
                print(f"round {round_no + 1} {name}: {rate:7.1f}/s; CPU ms per call: "
                      + ", ".join(f"{k} {v:.2f}" for k, v in used.items()))
        if args.target == "none":
            return 0
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"profile-{args.target}.txt"
        argv_spy = [py_spy, "record", "--pid", str(workers[args.target].popen.pid), "--format", "raw",
                    "--rate", "500", "--output", str(out), "--nonblocking"]
        if args.gil:
            argv_spy.append("--gil")
        if args.idle:
            argv_spy.append("--idle")
        spy = subprocess.Popen(argv_spy, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)
        rate = throughput(senders[args.target], args.n)
        spy.send_signal(signal.SIGINT)
        _, err = spy.communicate(timeout=60)
        print(f"{args.target}: {rate}/s over {args.n} calls while profiled")
        if not out.exists():
            print(err.decode(errors="replace"))
            return 1
    print(summarize(out, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
