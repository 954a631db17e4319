"""The stdio launcher, run for real: limits and identity applied, and the parent-death signal still armed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from config.registry import StdioServer
from tests.isolation import NOBODY, nobody_python
from workers.transports.stdio_process import launch_argv

# What the launched program reports: its ids, two limits and its parent-death signal (prctl PR_GET_PDEATHSIG).
_REPORT = (
    "import ctypes, json, os, resource\n"
    "sig = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)\n"
    "print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), 'groups': os.getgroups(), 'pdeathsig': sig.value,\n"
    "                  'nofile': resource.getrlimit(resource.RLIMIT_NOFILE),\n"
    "                  'cpu': resource.getrlimit(resource.RLIMIT_CPU)}))\n"
)


def _launch(server: StdioServer) -> subprocess.CompletedProcess[str]:
    argv = launch_argv(server, server.identity())
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, env=dict(server.env), cwd="/")


def test_identity_change_keeps_the_parent_death_signal() -> None:
    # Changing uid clears PR_SET_PDEATHSIG: the launcher must arm it after the switch, or a server
    # running as another user would outlive a SIGKILLed worker.
    python, env = nobody_python()
    server = StdioServer(name="t", transport="stdio", command=python, args=["-c", _REPORT], env=env, user="nobody",
                         limits={"open_files": 32, "cpu_seconds": 20})
    done = _launch(server)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert (seen["uid"], seen["gid"], seen["groups"]) == (NOBODY, NOBODY, [NOBODY])
    assert seen["pdeathsig"] == 9
    assert seen["nofile"] == [32, 32] and seen["cpu"] == [20, 21]


def test_failures_before_exec_are_reported_on_stderr() -> None:
    launcher = launch_argv(StdioServer(name="t", transport="stdio", command="/bin/true"))[:4]
    bad_limit = subprocess.run([*launcher, str(os.getpid()), "--rlimit=NOPE:1:1", "--", "/bin/true"],
                               capture_output=True, text=True, timeout=30)
    assert bad_limit.returncode == 126 and "cannot set resource limit" in bad_limit.stderr
    missing = subprocess.run([*launcher, str(os.getpid()), "--", "/nonexistent/server"],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 127 and "cannot execute /nonexistent/server" in missing.stderr
    assert sys.executable == launcher[0]
