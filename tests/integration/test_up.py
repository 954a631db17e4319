"""`sark up`: a local fleet that runs the demo, stays up for another app to enqueue into, and stops cleanly."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def _read_until(popen: subprocess.Popen[str], marker: str, timeout: float) -> str:
    """Everything the process printed up to the line holding ``marker``."""
    assert popen.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = popen.stdout.readline()
        if not line:
            raise AssertionError(f"sark up exited ({popen.poll()}):\n{''.join(seen)}")
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"no {marker!r} within {timeout}s:\n{''.join(seen)}")


def _listening(url: str) -> bool:
    host, port = url.split("//")[1].split("/")[0].split(":")
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, int(port))) == 0


def test_sark_up_stays_up_for_another_app_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SARK_")}
    popen = subprocess.Popen([sys.executable, "-m", "workers.cli", "up", "--workdir", str(tmp_path)], cwd=REPO,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = _read_until(popen, "sark invoke echo add", 240)  # the last line of the summary it prints
        assert "demo finished: OK" in out, out
        assert "chunk seq=2" in out  # streamed chunks were printed
        flower = re.search(r"Flower\s+(http://\S+)\s+user (\S+), password (\S+)", out)
        broker = re.search(r"broker and results\s+(redis://\S+)", out)
        assert flower and broker, out
        url, user, password = flower.groups()
        metrics = re.findall(r"(http://127\.0\.0\.1:\d+/metrics)", out)
        assert len(metrics) == 4, out  # one per worker
        scraped = "".join(httpx.get(m, timeout=10).text for m in metrics)
        assert any(line.startswith("sark_invocations_total{") and 'server="echo"' in line and 'outcome="ok"' in line
                   for line in scraped.splitlines()), scraped[:3000]  # the demo's calls, counted
        assert httpx.get(f"{url}/api/workers", timeout=10).status_code == 401
        workers = httpx.get(f"{url}/api/workers?refresh=1", auth=(user, password), timeout=30).json()
        assert len(workers) == 4, workers  # one per transport

        # Another app (here: a shell) enqueues into the fleet with the environment file it wrote.
        env_file = tmp_path / "up.env"
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        app_env = {**env, **dict(line.split("=", 1) for line in env_file.read_text().splitlines()
                                 if line and not line.startswith("#"))}
        done = subprocess.run([sys.executable, "-m", "workers.cli", "invoke", "echo", "add", "--args",
                               '{"a": 1, "b": 2}'], cwd=REPO, env=app_env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and '"sum": 3' in done.stdout, done.stderr
        minted = subprocess.run([sys.executable, "-m", "workers.cli", "token", "--sub", "bob"], cwd=REPO,
                                env=app_env, capture_output=True, text=True, timeout=30)
        assert minted.returncode == 0 and minted.stdout.count(".") == 2, minted.stderr
        bob = {**app_env, "SARK_USER_TOKEN": minted.stdout.strip()}
        again = subprocess.run([sys.executable, "-m", "workers.cli", "invoke", "echo", "add", "--args",
                                '{"a": 2, "b": 2}'], cwd=REPO, env=bob, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and '"sum": 4' in again.stdout, again.stderr

        popen.send_signal(signal.SIGINT)
        assert popen.wait(90) == 0
        assert not _listening(broker.group(1)) and not _listening(url)  # everything it started is gone
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait(30)
