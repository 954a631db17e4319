"""Exec wrapper for stdio MCP servers: limits, identity, and death with the worker (even on SIGKILL).

Run as ``python -I -S stdio_launch.py <worker pid> [options] -- <command> [args…]``; options:

* ``--rlimit=NAME:SOFT:HARD`` (``NAME`` of :mod:`resource` without ``RLIMIT_``, e.g. ``AS:536870912:536870912``);
* ``--uid=N --gid=N --groups=G1,G2…``: drop to that identity (the worker must be root).

In this order it sets the limits (while still privileged, so a hard limit can be set at all), drops
groups, gid then uid (uid last: after it nothing can be changed back), asks the kernel for ``SIGKILL``
when its parent dies (``prctl(PR_SET_PDEATHSIG)``, kept across ``execve``; armed *after* the identity
change because changing credentials clears it), exits if the worker already died before that took
effect, then ``execvp``s the server, which therefore keeps this process's pid, process group, pipes,
limits and (explicit) environment.

Standard library only and no ``site`` import, so it adds a few milliseconds to a cold start.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys

_PR_SET_PDEATHSIG = 1
_USAGE = "usage: stdio_launch.py <worker pid> [--rlimit=NAME:SOFT:HARD]... [--uid=N --gid=N --groups=G,...] " \
         "-- <command> [args...]\n"


def _fail(message: str, status: int) -> None:
    sys.stderr.write(f"stdio_launch: {message}\n")
    raise SystemExit(status)


def _apply_option(option: str) -> tuple[str, int | list[int]] | None:
    """Apply ``--rlimit`` at once; return ``(name, value)`` of an identity option for later."""
    key, _, value = option.partition("=")
    if key == "--rlimit":
        name, soft, hard = value.split(":")
        resource.setrlimit(getattr(resource, f"RLIMIT_{name}"), (int(soft), int(hard)))
        return None
    if key in ("--uid", "--gid"):
        return key, int(value)
    if key == "--groups":
        return key, [int(g) for g in value.split(",") if g]
    raise ValueError(f"unknown option {option!r}")


def _switch_identity(identity: dict[str, int | list[int]]) -> None:
    uid, gid, groups = identity.get("--uid"), identity.get("--gid"), identity.get("--groups")
    if uid is None:
        return
    assert isinstance(uid, int) and isinstance(gid, int) and isinstance(groups, list)
    os.setgroups(groups)
    os.setgid(gid)  # setgid/setuid set the real, effective and saved ids (we are root): no way back
    os.setuid(uid)


def main(argv: list[str]) -> None:
    """Apply limits and identity, arm the parent-death signal and become the server."""
    if len(argv) < 4 or "--" not in argv[2:]:
        sys.stderr.write(_USAGE)
        raise SystemExit(2)
    split = argv.index("--", 2)
    worker_pid, options, command = int(argv[1]), argv[2:split], argv[split + 1:]
    if not command:
        sys.stderr.write(_USAGE)
        raise SystemExit(2)
    identity: dict[str, int | list[int]] = {}
    try:
        for option in options:
            found = _apply_option(option)
            if found is not None:
                identity[found[0]] = found[1]
    except (ValueError, AttributeError, OSError) as exc:
        _fail(f"cannot set resource limit: {exc}", 126)
    try:
        _switch_identity(identity)
    except OSError as exc:
        _fail(f"cannot switch to uid {identity.get('--uid')}: {exc.strerror or exc}", 126)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            _fail(f"prctl failed (errno {ctypes.get_errno()})", 126)
    if os.getppid() != worker_pid:  # the worker died before the signal was armed
        raise SystemExit(125)
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        _fail(f"cannot execute {command[0]}: {exc.strerror}", 127)


if __name__ == "__main__":
    main(sys.argv)
