"""What `serve` must not load: the lazy imports docs/DESIGN.md promises keep its memory small.

import-linter cannot hold these (it counts an import inside a function as any other), so the
proxy runs as a user starts it and `-X importtime` says what it imported by the time it listens."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from proxy import http2
from proxy.tls import certs
from tests.support import tools
from tests.support.codecs import http2_env
from tests.support.h2app import H2App
from tests.support.proxy import DevCerts, ProxyProcess, serve_args
from tests.support.spiffe_agent import FakeAgent, Identity, new_svid
from tests.support.upstream import UpstreamApp

# Never loaded by `serve` without mutual TLS, with the httptools codec and HTTP/2 off (with it
# on, the ALPN successor is built at start-up, and h2 with it)
NOT_LOADED = ("cryptography", "h2", "proxy.commands", "ruamel", "wsproto", "proxy.http1.h11_codec")
# Loaded only with --spiffe-endpoint: the Workload API's client (grpc and protobuf, 10 MiB)
WORKLOAD_API = ("grpc", "google.protobuf", "proxy.tls.spiffe", "proxy.tls.workload_api")

# `import time:       123 |        456 | package.module`, indented by nesting depth
IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$")


def imported_by_serve(dev: DevCerts | None, upstream: UpstreamApp, *extra: str) -> set[str]:
    """The modules a `serve` process imported up to its `listening` line and its SIGTERM."""
    proxy = ProxyProcess(
        serve_args(upstream.base, dev, "--http", "httptools", "--no-http2", *extra),
        interpreter=("-X", "importtime"),
    ).start()
    try:
        proxy.signal(signal.SIGTERM)
        assert proxy.wait() == 0, proxy.stderr_text()
    finally:
        proxy.stop()
    modules = {m.group(1) for line in proxy.stderr_lines if (m := IMPORT_LINE.match(line))}
    assert "proxy.server" in modules, "no -X importtime lines read"
    return modules


def loaded(modules: set[str], package: str) -> list[str]:
    return sorted(m for m in modules if m == package or m.startswith(package + "."))


def test_serve_without_mutual_tls_loads_no_crypto_no_h2_no_commands(
    dev_certs: DevCerts, upstream: UpstreamApp
) -> None:
    modules = imported_by_serve(dev_certs, upstream)
    assert "httptools" in modules
    for package in (*NOT_LOADED, *WORKLOAD_API):
        assert loaded(modules, package) == [], f"serve imported {package}"


def test_serve_with_a_client_ca_loads_cryptography(
    dev_certs: DevCerts, upstream: UpstreamApp
) -> None:
    modules = imported_by_serve(
        dev_certs, upstream, "--client-ca", str(dev_certs.ca), "--allow-all"
    )
    assert loaded(modules, "cryptography") != []
    assert loaded(modules, "proxy.commands") == []
    for package in WORKLOAD_API:
        assert loaded(modules, package) == [], f"serve imported {package}"


def test_serve_with_the_workload_api_loads_grpc(tmp_path: Path, upstream: UpstreamApp) -> None:
    ca = certs.create_ca("example.org SPIFFE CA")
    agent = FakeAgent(tmp_path / "agent.sock", Identity(new_svid(ca), [ca])).start()
    try:
        modules = imported_by_serve(None, upstream, "--spiffe-endpoint", agent.endpoint)
    finally:
        agent.stop()
    for package in WORKLOAD_API:
        assert loaded(modules, package) != [], f"serve did not import {package}"
    assert loaded(modules, "proxy.commands") == []


@pytest.mark.parametrize(("codec", "never"), [("nghttp2", "h2"), ("h2", "proxy.http2._nghttp2")])
def test_an_h2c_apps_health_check_loads_only_the_codec_serving(
    dev_certs: DevCerts, codec: str, never: str
) -> None:
    """`--upstream-health-path` to an h2c app asks it through the `--http2-codec` client codec,
    the one the h2c pool uses: readiness answers, and the other codec was never imported."""
    if not http2.available(codec):
        tools.missing(http2.HOW_TO_BUILD)
    app = H2App().start()
    proxy = ProxyProcess(
        serve_args(app.url, dev_certs, "--upstream-health-path", "/health"),
        env=http2_env(codec),
        interpreter=("-X", "importtime"),
    ).start()
    try:
        assert proxy.admin_get("/readyz") == (200, "ready\n")
        assert app.seen and dict(app.seen[-1]["headers"])[":path"] == "/health"
        proxy.signal(signal.SIGTERM)
        assert proxy.wait() == 0, proxy.stderr_text()
    finally:
        proxy.stop()
        app.stop()
    modules = {m.group(1) for line in proxy.stderr_lines if (m := IMPORT_LINE.match(line))}
    assert "proxy.readiness" in modules, "no -X importtime lines read"
    assert loaded(modules, never) == [], f"readiness on {codec} imported {never}"
