"""The installed HTTP/1.1 and HTTP/2 libraries are not older than the floors SECURITY.md lists (known CVEs)."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest

SECURITY = Path(__file__).resolve().parents[2] / "SECURITY.md"
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def release(text: str) -> tuple[int, ...]:
    """'0.16.0' -> (0, 16, 0); a pre-release or local suffix is ignored."""
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+", maxsplit=1)[0])[:3])


def floors() -> dict[str, str]:
    """The rows of SECURITY.md's "Dependency floors" table."""
    section = SECURITY.read_text().split("### Dependency floors", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `([\w-]+)` \| ([\d.]+) \|", section, re.MULTILINE))


def test_security_lists_the_parsers() -> None:
    assert set(floors()) == {"h11", "h2", "httptools"}


@pytest.mark.parametrize("package", ["h11", "h2", "httptools"])
def test_installed_version_is_not_below_its_floor(package: str) -> None:
    floor = floors()[package]
    installed = version(package)
    assert release(installed) >= release(floor), (
        f"{package} {installed} is below {floor}, which SECURITY.md requires; upgrade it"
    )


@pytest.mark.parametrize("package", ["h11", "h2", "httptools"])
def test_pyproject_requires_the_floor(package: str) -> None:
    assert f'"{package}>={floors()[package]}"' in PYPROJECT.read_text()
