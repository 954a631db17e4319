"""The worker process's environment: what stdio servers may be given, and its secrets taken out of reach.

A worker holds its secrets (``SARK_TOKEN_KEY``, ``SARK_GATEWAY_API_KEY``… see :mod:`config.worker_secrets`)
in its settings object once they are loaded; from then on they need not stay in the environment, where a
child process could find them. :func:`harden_worker_process` (called once per worker process by
:func:`workers.runtime.get_runtime`) therefore:

* removes them from ``os.environ`` (children started with the default environment cannot inherit them);
* overwrites them in the environment block the kernel gave the process, which is what
  ``/proc/<worker pid>/environ`` shows (``unsetenv`` only drops libc's pointer to it);
* marks the process non-dumpable (``prctl(PR_SET_DUMPABLE, 0)``): a process of the same uid can no longer
  read ``/proc/<worker pid>/environ`` or ``mem``, nor ptrace it.

Limits: a child running as *root* (or with ``CAP_SYS_PTRACE``) can still read the worker's memory, where
the settings hold the secrets; only running servers as another user (registry ``user:``) protects then.
With Celery's prefork pool the parent process keeps its environment; the threads pool (the default
here) runs tasks in the process that is hardened.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Collection, Mapping
from pathlib import Path

from config.worker_secrets import is_worker_secret

__all__ = ["harden_worker_process", "launch_environment", "scrub_secrets"]

log = logging.getLogger("sark.environment")

_PR_SET_DUMPABLE = 4


def launch_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` (default ``os.environ``) without the worker's secrets: what stdio servers'
    ``inherit_env`` and ``${NAME}`` may draw from."""
    source = os.environ if environ is None else environ
    return {name: value for name, value in source.items() if not is_worker_secret(name, value)}


def scrub_secrets() -> list[str]:
    """Remove the worker's secrets from ``os.environ`` and from the process's initial environment block.

    Returns:
        The names removed.
    """
    names = sorted(name for name, value in os.environ.items() if is_worker_secret(name, value))
    for name in names:
        del os.environ[name]  # also unsetenv(): libc's environ no longer points at the initial strings
    if names and sys.platform.startswith("linux"):
        try:
            _wipe_initial_block(set(names))
        except (OSError, ValueError, IndexError):
            log.warning("could not overwrite the initial environment block", exc_info=True)
    return names


def _wipe_initial_block(names: Collection[str]) -> None:
    """Zero the ``NAME=value`` strings of ``names`` in ``[env_start, env_end)`` (fields 50-51 of /proc/self/stat)."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    start, end = int(fields[47]), int(fields[48])
    if not 0 < start < end:
        return
    block = ctypes.string_at(start, end - start)
    offset = 0
    for entry in block.split(b"\0"):
        if entry.partition(b"=")[0].decode("utf-8", "replace") in names:
            ctypes.memset(start + offset, 0, len(entry))
        offset += len(entry) + 1


def forbid_dumping() -> bool:
    """Make this process non-dumpable (Linux); False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0)


def harden_worker_process() -> list[str]:
    """Scrub the secrets from the environment and forbid dumping; call after the settings are loaded.

    Returns:
        The names of the variables removed.
    """
    names = scrub_secrets()
    dumpable = not forbid_dumping()
    log.info("worker environment hardened: %d secret variable(s) removed%s", len(names),
             "; the process stays dumpable" if dumpable else "", extra={"variables": names})
    return names
