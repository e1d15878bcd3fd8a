"""--upstream-proxy-protocol: every app connection begins with a PROXY header that says which
client it carries (and, in v2, its TLS: ALPN, SNI, version, certificate CN and SPIFFE ID), and
an app connection never carries two clients. The app side decodes the header field by field
(tests/support/proxy_app.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.tls import certs
from tests.conftest import ProxyFactory
from tests.e2e.test_cli import run_check
from tests.support.h2app import H2App
from tests.support.proxy import (
    DevCerts,
    ProxyProcess,
    RawClient,
    client_context,
    request_bytes,
    serve_args,
    wait_for,
)
from tests.support.proxy_app import ProxyProtocolApp
from tests.support.upstream import UpstreamApp

SPIFFE_ID = "spiffe://td.test/ns/prod/sa/api"


@pytest.fixture(scope="module")
def front(upstream: UpstreamApp) -> Iterator[ProxyProtocolApp]:
    app = ProxyProtocolApp(upstream.port).start()
    yield app
    app.stop()


@pytest.fixture(scope="module")
def client_pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A client CA and a client certificate with a CN and a SPIFFE ID: (ca, cert, key)."""
    out = tmp_path_factory.mktemp("client-pki")
    ca = certs.create_ca("client CA")
    leaf = certs.issue(ca, [SPIFFE_ID], common_name="api-client", client=True)
    (out / "ca.crt").write_bytes(ca.cert_pem)
    (out / "client.crt").write_bytes(leaf.cert_pem)
    certs.write_private(out / "client.key", leaf.key_pem)
    return out / "ca.crt", out / "client.crt", out / "client.key"


@pytest.fixture(scope="module")
def v2_proxy(
    start_proxy: ProxyFactory, front: ProxyProtocolApp, client_pki: tuple[Path, Path, Path]
) -> ProxyProcess:
    return start_proxy(
        f"http://127.0.0.1:{front.port}",
        "--upstream-proxy-protocol",
        "v2",
        "--client-ca",
        str(client_pki[0]),
        "--allow-all",
    )


def connect(
    proxy: ProxyProcess, ca: Path, client: tuple[Path, Path, Path] | None = None
) -> tuple[RawClient, int]:
    """A TLS connection to the proxy (with a client certificate if given) and its local port."""
    ctx = client_context(ca)
    if client is not None:
        ctx.load_cert_chain(client[1], client[2])
    ctx.set_alpn_protocols(["http/1.1"])
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock = ctx.wrap_socket(raw, server_hostname="localhost")
    return RawClient(sock), sock.getsockname()[1]


def app_connection(upstream: UpstreamApp, client: RawClient, path: str) -> int:
    """GET `path`; which of the app's connections it arrived on."""
    client.send(request_bytes("GET", path))
    response = client.read_response()
    assert response is not None
    assert response.status == 200, response.body
    return next(r.connection_id for r in list(upstream.requests) if r.path == path)


def test_v2_header_says_the_client_and_its_tls_once_per_app_connection(
    v2_proxy: ProxyProcess,
    front: ProxyProtocolApp,
    upstream: UpstreamApp,
    ca: Path,
    client_pki: tuple[Path, Path, Path],
) -> None:
    before = len(front.proxied())
    client, port = connect(v2_proxy, ca, client_pki)
    with client.sock:
        first = app_connection(upstream, client, "/echo/pp-out-1")
        second = app_connection(upstream, client, "/echo/pp-out-2")
    assert first == second, "one app connection, kept for the client"
    headers = wait_for(lambda: front.proxied()[before:], what="the header")
    assert len(headers) == 1, "sent once per app connection, not per request"
    header = headers[0]
    assert (header.version, header.command, header.family) == (2, "PROXY", "TCP4")
    assert header.source == ("127.0.0.1", port)
    assert header.destination == ("127.0.0.1", v2_proxy.port)
    assert header.tlvs[0x01] == b"http/1.1"  # PP2_TYPE_ALPN
    assert header.tlvs[0x02] == b"localhost"  # PP2_TYPE_AUTHORITY: the SNI
    assert header.ssl_client == 0x07  # SSL, a certificate on the connection and the session
    assert header.ssl_verify == 0
    assert header.ssl_sub[0x21] == b"TLSv1.3"  # PP2_SUBTYPE_SSL_VERSION
    assert header.ssl_sub[0x22] == b"api-client"  # PP2_SUBTYPE_SSL_CN
    assert header.tlvs[0xE5] == SPIFFE_ID.encode()


def test_app_connections_are_never_shared_between_clients(
    v2_proxy: ProxyProcess,
    front: ProxyProtocolApp,
    upstream: UpstreamApp,
    ca: Path,
    client_pki: tuple[Path, Path, Path],
) -> None:
    first, first_port = connect(v2_proxy, ca, client_pki)
    with first.sock:
        a = app_connection(upstream, first, "/echo/pp-a")  # now idle, kept for this client
        second, second_port = connect(v2_proxy, ca, client_pki)
        with second.sock:
            b = app_connection(upstream, second, "/echo/pp-b")
        assert a != b, "the idle app connection of another client is not taken"
        assert app_connection(upstream, first, "/echo/pp-a2") == a
    sources = [h.source for h in front.proxied()]
    assert ("127.0.0.1", first_port) in sources
    assert ("127.0.0.1", second_port) in sources


def test_the_pool_gauge_sums_every_client_connections_pool(
    start_proxy: ProxyFactory, front: ProxyProtocolApp, upstream: UpstreamApp, ca: Path
) -> None:
    proxy = start_proxy(f"http://127.0.0.1:{front.port}", "--upstream-proxy-protocol", "v2")
    try:
        idle = 'state="idle"'
        first, _ = connect(proxy, ca)
        second, _ = connect(proxy, ca)
        with first.sock, second.sock:
            app_connection(upstream, first, "/echo/pp-gauge-1")
            app_connection(upstream, second, "/echo/pp-gauge-2")
            # one idle app connection in each client's own pool, exported as one sum
            wait_for(lambda: proxy.metric("tls_sidecar_upstream_connections_active", idle) == 2)
            assert proxy.metric("tls_sidecar_upstream_connections_active", 'state="busy"') == 0
        # the clients gone, their pools are closed with their app connections
        wait_for(lambda: proxy.metric("tls_sidecar_upstream_connections_active") == 0)
    finally:
        proxy.stop()


def test_without_a_client_certificate_the_ssl_tlv_says_so(
    start_proxy: ProxyFactory, front: ProxyProtocolApp, upstream: UpstreamApp, ca: Path
) -> None:
    proxy = start_proxy(f"http://127.0.0.1:{front.port}", "--upstream-proxy-protocol", "v2")
    before = len(front.proxied())
    client, port = connect(proxy, ca)
    with client.sock:
        app_connection(upstream, client, "/echo/pp-anon")
    header = wait_for(lambda: front.proxied()[before:], what="the header")[0]
    assert header.source == ("127.0.0.1", port)
    assert header.ssl_client == 0x01
    assert 0x22 not in header.ssl_sub
    assert 0xE5 not in header.tlvs


def test_readiness_speaks_local_to_an_app_that_expects_headers(
    start_proxy: ProxyFactory, front: ProxyProtocolApp
) -> None:
    proxy = start_proxy(
        f"http://127.0.0.1:{front.port}",
        "--upstream-proxy-protocol",
        "v2",
        "--upstream-health-path",
        "/status/200",
    )
    refused = front.refused
    assert proxy.admin_get("/readyz")[0] == 200
    assert front.refused == refused
    assert any(h.command == "LOCAL" for h in front.headers)


def test_v1_header_before_an_h2c_app(start_proxy: ProxyFactory, ca: Path) -> None:
    app = H2App().start()
    front = ProxyProtocolApp(app.port).start()
    try:
        proxy = start_proxy(f"h2c://127.0.0.1:{front.port}", "--upstream-proxy-protocol", "v1")
        client, port = connect(proxy, ca)
        with client.sock:
            client.send(request_bytes("GET", "/pp-h2c"))
            response = client.read_response()
        assert response is not None
        assert response.status == 200
        header = wait_for(front.proxied, what="the header")[0]
        assert (header.version, header.family) == (1, "TCP4")
        assert header.source == ("127.0.0.1", port)
        assert header.destination == ("127.0.0.1", proxy.port)
    finally:
        front.stop()
        app.stop()


def test_check_speaks_local_to_an_app_that_expects_headers(
    front: ProxyProtocolApp, dev_certs: DevCerts
) -> None:
    refused = front.refused
    local = sum(h.command == "LOCAL" for h in front.headers)
    code, lines = run_check(
        *serve_args(f"http://127.0.0.1:{front.port}", dev_certs)[1:],
        "--upstream-proxy-protocol", "v2", "--upstream-health-path", "/status/200",
    )  # fmt: skip
    assert code == 0, lines
    assert any(line.startswith("ok    upstream") for line in lines), lines
    assert front.refused == refused
    assert sum(h.command == "LOCAL" for h in front.headers) == local + 1
