"""Operators' view of the circuit breakers: ``python -m workers.breaker.cli list | reset TARGET | reset --all``.

Talks to Redis directly (``SARK_REDIS_URL``, registry from ``SARK_REGISTRY_PATH``): no worker is
needed. The main ``sark`` CLI mounts it with :func:`add_arguments` and :func:`run`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from config.registry import load_registry
from config.settings import get_settings
from workers.breaker.board import BreakerBoard, breaker_command
from workers.errors import SarkError

__all__ = ["add_arguments", "main", "run"]

_COLUMNS = ("target", "state", "failures", "fail_max", "reset_timeout", "retry_after", "opens", "last_error", "store")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``list`` / ``reset`` sub-commands to ``parser``."""
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub = parser.add_subparsers(dest="action", metavar="{list,reset}")  # no action: list
    listing = sub.add_parser("list", help="every breaker's state (registry targets and any with state)")
    listing.add_argument("target", nargs="?", help="only this target (e.g. gateway:echo)")
    reset = sub.add_parser("reset", help="close a breaker fleet-wide")
    which = reset.add_mutually_exclusive_group(required=True)
    which.add_argument("target", nargs="?", help="the target to reset (e.g. gateway:echo)")
    which.add_argument("--all", action="store_true", help="reset every known breaker")


def run(args: argparse.Namespace) -> int:
    """Carry out parsed arguments; returns the exit status."""
    if args.action is None:
        args.action, args.target = "list", None
    target = "*" if getattr(args, "all", False) else args.target
    try:
        rows = asyncio.run(_command(args.action, target))
    except SarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if any(row["store"] == "local" for row in rows):
        print("error: cannot reach the breaker store (SARK_REDIS_URL); nothing was read or reset", file=sys.stderr)
        return 1
    print(json.dumps(rows, indent=2) if args.json else _table(rows))
    return 0


async def _command(action: str, target: str | None) -> list[dict[str, Any]]:
    settings = get_settings()
    board = BreakerBoard.from_settings(settings, load_registry(settings.registry_path))
    try:
        return await breaker_command(board, action, target)
    finally:
        await board.close()


def _table(rows: list[dict[str, Any]]) -> str:
    cells = [[_cell(row.get(c)) for c in _COLUMNS] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(_COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(_COLUMNS, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m workers.breaker.cli [--json] list|reset …``."""
    parser = argparse.ArgumentParser(prog="sark breakers", description="See and reset circuit breakers.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
