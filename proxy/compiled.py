"""The compiled core: which modules mypyc compiles, and whether this process runs them.

`MODULES` is the one list: setup.py compiles it (when a C compiler is there, unless
`TLS_SIDECAR_NO_COMPILE=1`), `in_use()` checks it, and `TLS_SIDECAR_COMPILED=0` runs the same
modules from their `.py` sources instead (proxy/__init__.py installs the finder). They are the
modules every request runs through; cold code (start-up, commands, admin) stays interpreted.
This module is read by setup.py before the package is installed: it imports only the standard
library.

Left out on purpose: proxy.pool (its PoolBase is weakly referenced, which a native class cannot
be, and an interpreted subclass of a compiled Python class fails mypyc's type check of `self`),
and what another module subclasses interpreted unless marked `allow_interpreted_subclasses`."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec
    from types import ModuleType

    # mypyc reads the decorator at compile time (and drops it); at run time, interpreted,
    # it does nothing, so the package needs no mypy_extensions installed.
    from mypy_extensions import mypyc_attr as mypyc_attr  # noqa: PLC0414 (re-exported)
else:

    def mypyc_attr(*names: str, **values: Any) -> Any:
        return lambda cls: cls


MODULES: tuple[str, ...] = (
    "proxy.metrics.counts",
    "proxy.core.timer",
    "proxy.core.headers",
    "proxy.core.request",
    "proxy.core.session",
    "proxy.core.links",
    "proxy.core.client_side",
    "proxy.core.ending",
    "proxy.core.exchange",
    "proxy.http1._wire",
    "proxy.http1.codec",
    "proxy.http1.httptools_server",
    "proxy.http1.httptools_client",
    "proxy.http1.connection",
    "proxy.http1.upstream",
    "proxy.downstream",
    "proxy.http2.codec",
    "proxy.http2.defences",
    "proxy.http2.request",
    "proxy.http2.nghttp2_codec",
    "proxy.http2.flow",
    "proxy.http2.stream",
    "proxy.http2.server",
)

HOW_TO_BUILD = (
    "the compiled core is not built; install a C compiler and Python's headers "
    "(Debian: apt-get install gcc python3-dev) and reinstall tls-sidecar "
    "without TLS_SIDECAR_NO_COMPILE"
)


def in_use() -> bool:
    """Whether this process runs the compiled modules (every one of them: they build together)."""
    for name in MODULES:
        module = sys.modules.get(name)
        spec = module.__spec__ if module is not None else importlib.util.find_spec(name)
        if spec is None or not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            return False
    return True


def _extension(name: str) -> str | None:
    """The compiled module's file, if the install has it."""
    package, _, _ = name.rpartition(".")
    spec = importlib.machinery.PathFinder.find_spec(name, importlib.import_module(package).__path__)
    if spec is None or not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
        return None
    return spec.origin


def built() -> bool:
    """Whether the install has the compiled modules (whether or not this process runs them)."""
    return all(_extension(name) is not None for name in MODULES)


def stale(modules: Sequence[str] = MODULES) -> list[str]:
    """The compiled modules whose source was edited after they were compiled: in an editable
    install the compiled one still runs, not the edit."""
    edited = []
    for name in modules:
        extension = _extension(name)
        if extension is None:
            continue
        source = Path(extension).parent / (name.rpartition(".")[2] + ".py")
        if source.exists() and source.stat().st_mtime > Path(extension).stat().st_mtime:
            edited.append(name)
    return edited


def switched_off() -> bool:
    """Whether TLS_SIDECAR_COMPILED=0 asked for the sources (proxy/__init__.py)."""
    return any(isinstance(finder, SourceFinder) for finder in sys.meta_path)


class SourceFinder(MetaPathFinder):
    """Finds the compiled modules' `.py` sources, ahead of the extension modules beside them
    (which the import system would otherwise prefer): `TLS_SIDECAR_COMPILED=0`."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        if fullname not in MODULES or not path:
            return None
        for folder in path:
            finder = importlib.machinery.FileFinder(
                folder,
                (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
            )
            spec = finder.find_spec(fullname)
            if spec is not None:
                return spec
        return None


def run_interpreted() -> None:
    """Run the compiled modules from their sources in this process (before they are imported)."""
    if not switched_off():
        sys.meta_path.insert(0, SourceFinder())
