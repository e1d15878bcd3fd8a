"""The README documents every flag of `serve` with its environment variable and default."""

from __future__ import annotations

from pathlib import Path

import click

from proxy.cli import serve

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_serve_flag_is_in_the_readme() -> None:
    text = README.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `--")]
    for param in serve.params:
        if not isinstance(param, click.Option) or param.name == "help" or param.hidden:
            continue
        flag = param.opts[0]
        row = next((r for r in rows if r.startswith(f"| `{flag}`")), None)
        assert row is not None, f"{flag} is missing from the README's flag table"
        assert f"`{param.envvar}`" in row, f"{flag}: environment variable not documented"
        if isinstance(param.default, str):
            assert f"`{param.default}`" in row, f"{flag}: default {param.default} not documented"


def test_quick_start_has_exactly_two_commands() -> None:
    text = README.read_text()
    section = text.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in section.strip().splitlines()]
    assert commands == ["make run", "make test"]


def test_the_readme_metrics_table_is_the_generated_one() -> None:
    from proxy.metrics.table import reference  # noqa: PLC0415

    readme = README.read_text()
    section = readme.split("<!-- metrics:begin -->\n", 1)[1].split("<!-- metrics:end -->", 1)[0]
    assert section == reference(), "regenerate it: python -m proxy.metrics"
