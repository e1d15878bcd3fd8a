"""The optional C extensions; everything else is in pyproject.toml.

- cffi builds `proxy.http2._nghttp2` (the nghttp2 HTTP/2 codec) from
  `proxy/http2/_nghttp2_build.py`; the extension is marked optional there, so without a C
  compiler or libnghttp2's headers the install succeeds and HTTP/2 runs on the pure-Python `h2`.
- mypyc compiles the per-request modules in `proxy/compiled.py`'s list to C extensions (the
  compiled core). They are all or nothing: if any fails to build (no C compiler, no Python
  headers), none is installed and the same modules run as plain Python. `TLS_SIDECAR_NO_COMPILE=1`
  skips the compile at install.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
# the list lives in the package, so the running proxy and its tests read the same one
COMPILED: tuple[str, ...] = runpy.run_path(str(HERE / "proxy" / "compiled.py"))["MODULES"]


def _warn(message: str) -> None:
    print(f"warning: tls-sidecar: {message}", file=sys.stderr)


_CORE: list[Extension] | None = None


def _compiled_core() -> list[Extension]:
    """mypyc's extensions for COMPILED (made once per build), or none."""
    global _CORE  # noqa: PLW0603 (setuptools finalizes build_ext more than once per build)
    if _CORE is None:
        _CORE = _mypycify()
    return _CORE


def _mypycify() -> list[Extension]:
    """mypyc's extensions for COMPILED, or none (skipped, or mypyc not importable)."""
    if os.environ.get("TLS_SIDECAR_NO_COMPILE", "") not in ("", "0"):
        _warn("TLS_SIDECAR_NO_COMPILE is set: the core runs as plain Python")
        return []
    try:
        from mypyc.build import mypycify  # noqa: PLC0415 (a build requirement, not always there)
    except ImportError:
        _warn("mypyc is not installed: the core runs as plain Python")
        return []
    paths = [m.replace(".", "/") + ".py" for m in COMPILED]
    # The build environment has mypy, not the runtime dependencies: the modules are checked
    # without the project's strict config (`make typecheck` holds that), and what they import
    # from elsewhere is typed Any here (mypyc calls it through the generic Python API).
    options = ["--config-file=", "--ignore-missing-imports", "--follow-imports=silent"]
    try:
        extensions: list[Extension] = mypycify(
            [*options, *paths], opt_level="3", group_name="proxy_core"
        )
    except (Exception, SystemExit) as e:
        _warn(f"mypyc could not compile the core ({e}): it runs as plain Python")
        return []
    for extension in extensions:
        extension.mypyc = True  # type: ignore[attr-defined]
        extension.optional = True  # a compile error leaves it out (build_extensions)
    return extensions


class BuildExtensions(build_ext):
    """Builds every extension it can: an optional one that fails is left out, with a warning.

    The compiled core's modules share one library, so they go together: one that fails to
    build takes the others out too, and the package runs as plain Python."""

    def finalize_options(self) -> None:
        # mypyc runs here, not when setup.py is read: pip reads it for metadata too
        if not any(getattr(x, "mypyc", False) for x in self.distribution.ext_modules or []):
            self.distribution.ext_modules = [
                *(self.distribution.ext_modules or []),
                *_compiled_core(),
            ]
        super().finalize_options()

    def run(self) -> None:
        super().run()
        if self.inplace:
            self._remove_stale()

    def _remove_stale(self) -> None:
        """An in-place build's extension of a module no longer compiled would still load
        ahead of the module's source: it goes."""
        current = {x.name for x in self.extensions}
        for built in (HERE / "proxy").rglob("*.so"):
            module = ".".join(built.relative_to(HERE).with_suffix("").with_suffix("").parts)
            if module not in current:
                _warn(f"removing {built.relative_to(HERE)}: {module} is no longer compiled")
                built.unlink()

    def build_extensions(self) -> None:
        super().build_extensions()
        core = [x for x in self.extensions if getattr(x, "mypyc", False)]
        if not all(Path(self.get_ext_fullpath(x.name)).exists() for x in core):
            _warn("the compiled core did not build: it runs as plain Python")
            build_py = self.get_finalized_command("build_py")
            for extension in core:
                for built in self._get_inplace_equivalent(build_py, extension):
                    Path(built).unlink(missing_ok=True)


def _options() -> dict[str, Any]:
    return {
        "cffi_modules": ["proxy/http2/_nghttp2_build.py:ffi"],
        "cmdclass": {"build_ext": BuildExtensions},
    }


setup(**_options())
