"""README's settings table is the one generated from ``Settings``; secrets never show a value."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field, SecretStr

from config.settings import Settings
from config.settings_doc import END_MARKER, START_MARKER, main, render_table, replace_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_table_is_the_generated_one() -> None:
    text = README.read_text(encoding="utf-8")
    assert START_MARKER in text and END_MARKER in text, f"README.md lacks the {START_MARKER} ... {END_MARKER} block"
    in_readme = text[text.index(START_MARKER) + len(START_MARKER):text.index(END_MARKER)].strip()
    assert in_readme == render_table().strip(), (
        "README.md's settings table differs from config.settings.Settings: regenerate it with "
        "`python -m config.settings_doc --write` (descriptions come from Field(description=...))")


def test_every_setting_has_a_row() -> None:
    table = render_table()
    for name in Settings.model_fields:
        assert f"| `SARK_{name.upper()}` |" in table


def test_a_setting_without_description_is_refused() -> None:
    class Undocumented(Settings):
        extra_knob: int = 3

    with pytest.raises(ValueError, match="extra_knob"):
        render_table(Undocumented)


def test_secret_defaults_are_never_printed() -> None:
    class WithSecret(Settings):
        shared_secret: SecretStr = Field(default=SecretStr("hunter2-value"), description="a secret")

    table = render_table(WithSecret)
    assert "hunter2" not in table
    assert "| `SARK_SHARED_SECRET` | (secret) | a secret |" in table
    assert "| `SARK_TOKEN_KEY` | — (secret) |" in table


def test_defaults_are_shown_as_set_in_the_environment() -> None:
    table = render_table()
    assert "| `SARK_LOG_JSON` | `true` |" in table
    assert "| `SARK_REGISTRY_PATH` | `config/servers.yaml` |" in table  # not this machine's absolute path
    assert "| `SARK_MAX_RESULT_BYTES` | `10485760` (10 MiB) |" in table


def test_write_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START_MARKER}\n| stale |\n{END_MARKER}\nrest\n", encoding="utf-8")
    assert main(["--check", "--readme", str(readme)]) == 1
    assert "python -m config.settings_doc --write" in capsys.readouterr().err
    assert main(["--write", "--readme", str(readme)]) == 0
    assert readme.read_text(encoding="utf-8") == f"intro\n{START_MARKER}\n{render_table()}{END_MARKER}\nrest\n"
    assert main(["--check", "--readme", str(readme)]) == 0


def test_missing_markers() -> None:
    with pytest.raises(ValueError, match="settings-table"):
        replace_table("no markers here", render_table())
