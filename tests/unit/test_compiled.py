"""The compiled core's bookkeeping: which compiled modules an edit has left behind."""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy import compiled


@pytest.fixture
def package(tmp_path: Path) -> Iterator[Path]:
    """A package with one module compiled (an extension file beside its source; never loaded)."""
    folder = tmp_path / "edited_pkg"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "hot.py").write_text("x = 1\n")
    (folder / f"hot{sysconfig.get_config_var('EXT_SUFFIX')}").write_bytes(b"")
    sys.path.insert(0, str(tmp_path))
    try:
        yield folder
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("edited_pkg", None)


def test_a_source_edited_after_its_compile_is_stale(package: Path) -> None:
    extension = next(p for p in package.glob("hot.*") if p.suffix != ".py")
    later = extension.stat().st_mtime + 10
    os.utime(package / "hot.py", (later, later))
    assert compiled.stale(["edited_pkg.hot"]) == ["edited_pkg.hot"]


def test_a_source_older_than_its_compile_is_not(package: Path) -> None:
    extension = next(p for p in package.glob("hot.*") if p.suffix != ".py")
    earlier = extension.stat().st_mtime - 10
    os.utime(package / "hot.py", (earlier, earlier))
    assert compiled.stale(["edited_pkg.hot"]) == []
