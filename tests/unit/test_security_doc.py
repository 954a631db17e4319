"""SECURITY.md names a test for each claim: every test (and test file) it names exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")}


def test_every_test_named_in_security_md_exists() -> None:
    text = (ROOT / "SECURITY.md").read_text(encoding="utf-8")
    named = 0
    current: Path | None = None
    # `tests/x.py::name`, `tests/x.py` or `::name` (a test of the file named last before it).
    for ref in re.findall(r"`((?:tests/[\w/]+\.py)?(?:::\w+)?)`", text):
        if not ref:
            continue
        file_part, _, name = ref.partition("::")
        if file_part:
            current = ROOT / file_part
            assert current.is_file(), f"SECURITY.md names a missing file: {file_part}"
        if name:
            assert current is not None, f"{ref}: no file before it"
            assert name in _tests_in(current), f"SECURITY.md names a missing test: {current.name}::{name}"
            named += 1
    assert named >= 30
