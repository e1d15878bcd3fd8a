"""Fixtures: generated certificates, the upstream test app, and proxy processes."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy import http2
from proxy.http1 import CODECS
from proxy.tls import certs
from tests.support import tools
from tests.support.proxy import DevCerts, ProxyProcess, serve_args
from tests.support.upstream import UpstreamApp


@pytest.fixture(scope="session")
def dev_certs(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    """A CA and a server certificate for localhost, generated for this test run."""
    out = tmp_path_factory.mktemp("certs")
    ca = certs.create_ca("tests CA")
    server = certs.issue(ca, ["localhost", "127.0.0.1", "::1"])
    (out / "ca.crt").write_bytes(ca.cert_pem)
    (out / "tls.crt").write_bytes(server.cert_pem + ca.cert_pem)
    certs.write_private(out / "tls.key", server.key_pem)
    return DevCerts(out / "ca.crt", out / "tls.crt", out / "tls.key", out)


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound, never listening, and held for the
    test, so no other process can take it meanwhile (bind-close-reuse races)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamApp]:
    app = UpstreamApp().start()
    yield app
    app.stop()


ProxyFactory = Callable[..., ProxyProcess]


@pytest.fixture(scope="session", params=CODECS)
def http_codec(request: pytest.FixtureRequest) -> str:
    """Every test that starts a proxy runs once per HTTP/1.1 codec (`--http`)."""
    return str(request.param)


@pytest.fixture(scope="session", params=http2.CODECS)
def http2_codec(request: pytest.FixtureRequest) -> str:
    """HTTP/2 tests run once per HTTP/2 server codec (`--http2-codec`): a module asks for it
    by overriding `codec_env` (`tests/support/codecs.py`)."""
    return str(request.param)


@pytest.fixture(scope="session")
def codec_env(http_codec: str) -> dict[str, str]:
    """The codecs a started proxy runs (the environment of `start_proxy`'s processes)."""
    return {"TLS_SIDECAR_HTTP": http_codec}


@pytest.fixture(scope="module")
def start_proxy(dev_certs: DevCerts, codec_env: dict[str, str]) -> Iterator[ProxyFactory]:
    """Start proxies on ephemeral ports with the test certificate; all stopped at module end."""
    started: list[ProxyProcess] = []

    def start(
        upstream: str, *extra: str, with_cert: bool = True, env: dict[str, str] | None = None
    ) -> ProxyProcess:
        args = serve_args(upstream, dev_certs if with_cert else None, *extra)
        proc = ProxyProcess(args, env={**codec_env, **(env or {})}).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="module")
def proxy(start_proxy: ProxyFactory, upstream: UpstreamApp) -> ProxyProcess:
    """The default proxy in front of the module's upstream app."""
    return start_proxy(upstream.base, "--upstream-timeout", "2s")


@pytest.fixture
def ca(dev_certs: DevCerts) -> Path:
    return dev_certs.ca


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "needs(program, install=..., path=None): the test drives this program "
        "(skipped without it, failed under CI: tests/support/tools.py)",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs"):
        tools.require(*mark.args, **mark.kwargs)
