"""Every shell and Python example of the README, as written, against a live fleet (`sark up`).

An example is a fenced ```bash or ```python block. Each one runs, in a fresh process, from a folder where
`sark up` keeps its files (`.sark/up/`), with `sark` on PATH and no SARK_* variable of this process (the
shell examples load the fleet's environment file as the README says; the Python examples get it as an app
would); it must exit 0. A block the test cannot run says why in a marker comment right above it:
`<!-- readme-example: skip (reason) -->`; a marker without a reason fails.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
SKIP = re.compile(r"^<!-- readme-example: skip \((?P<reason>[^)]+)\) -->$")


@dataclass
class Example:
    """One fenced block of the README."""

    line: int
    language: str
    code: str
    skip: str | None

    @property
    def name(self) -> str:
        return f"{self.language}@{self.line}"


def examples() -> list[Example]:
    """The README's bash and python blocks, in order."""
    found: list[Example] = []
    lines = README.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(bash|python)\s*$", lines[i])
        if fence is None:
            i += 1
            continue
        start = i
        i += 1
        body: list[str] = []
        while i < len(lines) and lines[i] != "```":
            body.append(lines[i])
            i += 1
        marker = SKIP.match(lines[start - 1]) if start else None
        assert start == 0 or "readme-example" not in lines[start - 1] or marker, \
            f"README line {start}: a readme-example marker needs a reason: {lines[start - 1]!r}"
        found.append(Example(start + 1, fence.group(1), "\n".join(body) + "\n",
                             marker.group("reason") if marker else None))
        i += 1
    return found


EXAMPLES = examples()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """`sark up` in a folder of its own; the folder and an environment without SARK_* (PATH has `sark`)."""
    home = tmp_path_factory.mktemp("readme")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SARK_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    popen = subprocess.Popen([sys.executable, "-m", "workers.cli", "up"], cwd=home, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert popen.stdout is not None
    seen: list[str] = []
    try:
        for line in popen.stdout:
            seen.append(line)
            if "sark invoke echo add" in line:  # the last line of the summary `sark up` prints once up
                break
        else:
            raise AssertionError(f"sark up exited ({popen.wait()}):\n{''.join(seen)}")
        assert (home / ".sark" / "up" / "up.env").exists()
        yield home, env
    finally:
        popen.send_signal(signal.SIGINT)
        try:
            popen.wait(90)
        except subprocess.TimeoutExpired:
            popen.kill()


def _app_env(home: Path, env: dict[str, str]) -> dict[str, str]:
    """What an app of this fleet has: the `sark up` environment file's variables."""
    lines = (home / ".sark" / "up" / "up.env").read_text().splitlines()
    return {**env, **dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))}


def test_the_readme_has_examples_and_each_skip_says_why() -> None:
    assert len(EXAMPLES) >= 5
    ran = [e for e in EXAMPLES if e.skip is None]
    assert ran and all(len(e.skip) > 20 for e in EXAMPLES if e.skip is not None)
    print(f"README examples: {len(EXAMPLES)} ({len(ran)} run, {len(EXAMPLES) - len(ran)} skipped with a reason)")


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.skip is None], ids=lambda e: e.name)
def test_readme_example_runs_as_written(example: Example, fleet: tuple[Path, dict[str, str]]) -> None:
    home, env = fleet
    if example.language == "bash":
        argv, run_env = ["bash", "-euo", "pipefail", "-c", example.code], env
    else:
        argv, run_env = [sys.executable, "-c", example.code], _app_env(home, env)
    done = subprocess.run(argv, cwd=home, env=run_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"README line {example.line}:\n{example.code}\n{done.stdout}\n{done.stderr}"
    if "echo add" in example.code or '"tool": "add"' in example.code or '"add"' in example.code:
        assert '"sum": 3' in done.stdout or "'sum': 3" in done.stdout, done.stdout


#: Inline `sark …` commands of the README that run to completion against the fleet and change nothing
#: lasting in it (those naming a placeholder, serving until stopped or starting another fleet are left out:
#: `INLINE_LEFT_OUT` says which and why).
INLINE_RUNNABLE = {"transports", "keygen", "fleet", "invoke", "servers", "breakers", "check-config", "tools"}
INLINE_LEFT_OUT = {
    "worker": "serves until stopped (tests/integration/test_cli.py starts real workers)",
    "up": "serves until stopped (the fixture above is `sark up`)",
    "demo": "starts another fleet (tests/integration/test_up.py)",
    "gateway": "serves until stopped (tests/integration/test_cli.py)",
    "stream": "needs a task id",
    "cancel": "needs a task id",
}


def inline_commands() -> list[tuple[int, str]]:
    """(line, command) of every inline `sark …` span that is a whole command with no placeholder."""
    found = []
    for number, line in enumerate(README.read_text(encoding="utf-8").splitlines(), start=1):
        for command in re.findall(r"`(sark [^`]+)`", line):
            words = command.split()
            placeholder = re.search(r"<[^>]*>|\[[A-Z]+\]|\b[A-Z]{1,}\b|…", command)
            whole = words[1] != "invoke" or len(words) >= 4
            if words[1] in INLINE_RUNNABLE and not placeholder and whole:
                found.append((number, command))
            else:
                assert words[1] in INLINE_RUNNABLE | set(INLINE_LEFT_OUT), f"README line {number}: {command!r}"
    return found


INLINE = inline_commands()


@pytest.mark.parametrize(("line", "command"), INLINE, ids=[f"line{n}" for n, _ in INLINE])
def test_readme_inline_command_runs(line: int, command: str, fleet: tuple[Path, dict[str, str]]) -> None:
    home, env = fleet
    script = f"set -a; . .sark/up/up.env; set +a\n{command}\n"
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=home, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, f"README line {line}: {command}\n{done.stdout}\n{done.stderr}"


def test_inline_commands_counted() -> None:
    assert len(INLINE) >= 8
    print(f"README inline sark commands run: {len(INLINE)}: {sorted({c for _, c in INLINE})}")
