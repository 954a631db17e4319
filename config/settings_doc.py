"""The README's settings table, generated from :class:`~config.settings.Settings`.

Each field becomes one row: its variable (``SARK_<FIELD>``), its default and its ``Field(description=…)``.
Secrets never show a value. Regenerate the README's table (between its ``settings-table`` markers) with::

    python -m config.settings_doc --write
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, get_args

from pydantic import SecretStr
from pydantic.fields import FieldInfo

from config.settings import Settings

__all__ = ["END_MARKER", "START_MARKER", "render_table", "replace_table"]

START_MARKER = "<!-- settings-table:start -->"
END_MARKER = "<!-- settings-table:end -->"

#: The project's root: paths below it are shown relative to it (the registry's default path).
_ROOT = Path(__file__).resolve().parents[1]
_MIB = 1 << 20


def render_table(settings: type[Settings] = Settings) -> str:
    """The markdown table of every field of ``settings``, in declaration order.

    Raises:
        ValueError: a field has no description.
    """
    env_prefix = settings.model_config.get("env_prefix", "")
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in settings.model_fields.items():
        if not field.description:
            raise ValueError(f"Settings.{name} has no description: add Field(description=...) in config/settings.py")
        lines.append(f"| `{env_prefix}{name.upper()}` | {_default(name, field)} | {_cell(field.description)} |")
    return "\n".join(lines) + "\n"


def replace_table(text: str, table: str) -> str:
    """``text`` with what stands between the markers replaced by ``table``.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < start:
        raise ValueError(f"no {START_MARKER} ... {END_MARKER} block")
    head = text[: start + len(START_MARKER)]
    return f"{head}\n{table}{text[end:]}"


def _is_secret(field: FieldInfo) -> bool:
    annotation = field.annotation
    return annotation is SecretStr or SecretStr in get_args(annotation)


def _default(name: str, field: FieldInfo) -> str:
    value: Any = field.default
    if _is_secret(field):
        return "— (secret)" if value is None else "(secret)"
    if value is None:
        return "—"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, Path):
        shown = value.relative_to(_ROOT) if value.is_relative_to(_ROOT) else value
        return f"`{shown}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, int) and name.endswith("_bytes") and value >= _MIB and value % _MIB == 0:
        return f"`{value}` ({value // _MIB} MiB)"
    if value == "":
        return '`""`'
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def main(argv: list[str] | None = None) -> int:
    """Print the table, or write it into (``--write``) or compare it with (``--check``) the README."""
    parser = argparse.ArgumentParser(prog="python -m config.settings_doc", description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=_ROOT / "README.md", help="the file holding the markers")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="replace the table between the markers")
    mode.add_argument("--check", action="store_true", help="exit 1 when the table differs")
    args = parser.parse_args(argv)
    table = render_table()
    if not (args.write or args.check):
        sys.stdout.write(table)
        return 0
    text = args.readme.read_text(encoding="utf-8")
    updated = replace_table(text, table)
    if args.check:
        if updated != text:
            print(f"{args.readme}: the settings table is out of date; run `python -m config.settings_doc --write`",
                  file=sys.stderr)
            return 1
        return 0
    if updated != text:
        args.readme.write_text(updated, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
