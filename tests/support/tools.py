"""Programs the tests drive (curl, kubectl, promtool, ...): found, or the test says which is
missing. On a developer's machine a missing program skips the test with the install command;
under CI (the `CI` variable set, as `.ci/run` runs) it fails it, because `.ci/run` must have
installed everything: a skip there would hide a test that never ran.

Use `@pytest.mark.needs("curl", install="apt-get install curl")` on a test (checked before its
fixtures, see tests/conftest.py), or `require("kubectl", ...)` inside a fixture.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


def require(name: str, install: str, *, path: str | None = None) -> str:
    """The program's path: found on PATH (or at `path`); else skip, or fail under CI."""
    found = shutil.which(name) or (path if path is not None and Path(path).exists() else None)
    if found is not None:
        return found
    missing(f"{name} is not installed ({install})")


def missing(reason: str) -> NoReturn:
    """A tool the test needs is missing or unusable: skip, or fail under CI."""
    if in_ci():
        pytest.fail(f"{reason}; CI must provide it (.ci/run)", pytrace=False)
    pytest.skip(reason)


KUBECTL_INSTALL = "kubectl 1.21 or newer: its kustomize must know `labels`"


def kustomize(folder: Path) -> str:
    """`kubectl kustomize FOLDER`'s output. A kubectl whose kustomize predates the fields the
    manifests use (Debian 12's kubernetes-client is 1.20, kustomize v2.0.3: no `labels`)
    counts as missing, with the version it has."""
    kubectl = require("kubectl", KUBECTL_INSTALL)
    result = subprocess.run(
        [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0 and "unknown field" in result.stderr:
        version = subprocess.run(
            [kubectl, "version", "--client"], capture_output=True, text=True, timeout=30
        )
        first = (version.stdout or version.stderr).strip().splitlines()[:1]
        missing(
            f"{kubectl} ({' '.join(first)}) is too old for these manifests "
            f"({result.stderr.strip()}); install {KUBECTL_INSTALL}"
        )
    assert result.returncode == 0, f"{folder}: {result.stderr}"
    return result.stdout
