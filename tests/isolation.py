"""What the stdio isolation tests share: an interpreter another user (``nobody``) can run the fixture with."""

from __future__ import annotations

import functools
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "mcp_fixture_server.py"
NOBODY = 65534


@functools.lru_cache(maxsize=1)
def nobody_python() -> tuple[str, dict[str, str]]:
    """``(interpreter, env)`` with which uid ``nobody`` runs the fixture server.

    This venv's interpreter may live where ``nobody`` cannot go (e.g. ``/root/.pyenv``); a system Python
    of the same version, given the venv's ``site-packages`` on ``PYTHONPATH``, runs the same code.
    """
    if os.geteuid() != 0:
        pytest.skip("switching to another user needs root")
    env = {"PYTHONPATH": os.pathsep.join(site.getsitepackages())}
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for candidate in (sys.executable, shutil.which(f"python{version}") or "", f"/usr/bin/python{version}"):
        if candidate and Path(candidate).exists():
            try:
                probe = subprocess.run([candidate, "-c", "import mcp.server.mcpserver"], env=env, user=NOBODY,
                                       group=NOBODY, extra_groups=[], cwd="/", capture_output=True, timeout=30)
            except PermissionError:
                continue
            if probe.returncode == 0:
                return candidate, env
    pytest.skip(f"no Python {version} that uid {NOBODY} can run with this venv's packages")
