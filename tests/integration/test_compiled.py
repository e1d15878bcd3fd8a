"""The compiled core: whether the proxy runs it, how a user sees it, and that
TLS_SIDECAR_COMPILED=0 runs the same install from its sources."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from proxy import compiled
from tests.support import tools
from tests.support.proxy import DevCerts, ProxyProcess, https, serve_args
from tests.support.upstream import UpstreamApp


def test_the_compiled_core_runs_when_built_and_under_ci_it_must_be(
    upstream: UpstreamApp, dev_certs: DevCerts
) -> None:
    """No silent fallback: a CI run on the sources alone would say nothing of the build users get."""
    built = compiled.built()
    if tools.in_ci():
        assert built, compiled.HOW_TO_BUILD
    expected = built and not compiled.switched_off()
    proxy = ProxyProcess(serve_args(upstream.base, dev_certs)).start()
    try:
        listening = proxy._listening()
        assert listening is not None
        assert listening["compiled"] is expected
        label = f'compiled="{str(expected).lower()}"'
        assert proxy.metric("tls_sidecar_build_info", label) == 1
        if not built:  # one line says how to get it
            assert "apt-get install gcc python3-dev" in proxy.stderr_text()
        assert https(proxy, dev_certs.ca, "GET", "/echo")[0] == 200
    finally:
        proxy.stop()


def test_compiled_0_runs_the_sources_and_says_so(
    upstream: UpstreamApp, dev_certs: DevCerts
) -> None:
    proxy = ProxyProcess(
        serve_args(upstream.base, dev_certs), env={"TLS_SIDECAR_COMPILED": "0"}
    ).start()
    try:
        listening = proxy._listening()
        assert listening is not None
        assert listening["compiled"] is False
        assert proxy.metric("tls_sidecar_build_info", 'compiled="false"') == 1
        # asked for: no line on how to build what was switched off
        assert "the core runs as plain Python" not in proxy.stderr_text()
        assert https(proxy, dev_certs.ca, "GET", "/echo")[0] == 200
    finally:
        proxy.stop()


def test_compiled_0_loads_every_compiled_module_from_its_source() -> None:
    script = (
        "import importlib, json, proxy.compiled as c\n"
        "print(json.dumps({m: importlib.import_module(m).__file__ for m in c.MODULES}))"
    )
    env = {**os.environ, "TLS_SIDECAR_COMPILED": "0"}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    files = json.loads(out.stdout)
    assert sorted(files) == sorted(compiled.MODULES)
    assert all(path.endswith(".py") for path in files.values()), files
