"""Exec wrapper for stdio MCP servers: die with the worker, even when the worker is SIGKILLed.

Run as ``python -I -S stdio_launch.py <worker pid> <command> [args…]``. On Linux it asks the
kernel for ``SIGKILL`` when its parent dies (``prctl(PR_SET_PDEATHSIG)``, kept across ``execve``),
exits if the worker already died before that took effect, then ``execvp``s the server, which
therefore keeps this process's pid, process group, pipes and (explicit) environment.

Standard library only and no ``site`` import, so it adds a few milliseconds to a cold start.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    """Arm the parent-death signal and become the server."""
    if len(argv) < 3:
        sys.stderr.write("usage: stdio_launch.py <worker pid> <command> [args...]\n")
        raise SystemExit(2)
    worker_pid, command = int(argv[1]), argv[2]
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            sys.stderr.write(f"stdio_launch: prctl failed (errno {ctypes.get_errno()})\n")
            raise SystemExit(126)
    if os.getppid() != worker_pid:  # the worker died before the signal was armed
        raise SystemExit(125)
    try:
        os.execvp(command, [command, *argv[3:]])
    except OSError as exc:
        sys.stderr.write(f"stdio_launch: cannot execute {command}: {exc.strerror}\n")
        raise SystemExit(127) from None


if __name__ == "__main__":
    main(sys.argv)
