"""A failed handshake is visible: the client gets the TLS alert OpenSSL produced (not a bare
EOF), and the proxy logs it at info with the client, the reason and the SNI, rate-limited."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from proxy.tls import certs
from tests.conftest import ProxyFactory
from tests.support.proxy import (
    ProxyProcess,
    RawClient,
    client_context,
    request_bytes,
    tls_socket,
    wait_for,
)
from tests.support.upstream import UpstreamApp


def no_shared_cipher(port: int, server_name: str = "localhost") -> ssl.SSLError:
    """A TLS 1.2 client offering only RSA key exchange with CBC, which the proxy never does."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("AES128-SHA")
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        pytest.raises(ssl.SSLError) as caught,
    ):
        ctx.wrap_socket(raw, server_hostname=server_name)
    return caught.value


def failures(proxy: ProxyProcess) -> list[dict[str, object]]:
    return [
        json.loads(line)
        for line in list(proxy.stderr_lines)
        if '"msg": "tls handshake failed"' in line
    ]


def test_no_shared_cipher_gets_the_alert_and_a_log_line(
    start_proxy: ProxyFactory, upstream: UpstreamApp
) -> None:
    proxy = start_proxy(upstream.base)
    error = no_shared_cipher(proxy.port, "shop.example")
    # The alert by name, not SSLEOFError / "unexpected eof" (what a bare close gives).
    assert error.reason == "SSLV3_ALERT_HANDSHAKE_FAILURE", error
    line = wait_for(lambda: next(iter(failures(proxy)), None), 10, "the log line")
    assert line["level"] == "info"
    assert (line["client"], line["reason"], line["detail"], line["sni"]) == (
        "127.0.0.1",
        "protocol",
        "no_shared_cipher",
        "shop.example",
    )


def test_openssl_s_client_prints_the_alert(
    start_proxy: ProxyFactory, upstream: UpstreamApp
) -> None:
    proxy = start_proxy(upstream.base)
    out = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{proxy.port}",
            "-tls1_2",
            "-cipher",
            "AES128-SHA",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "alert handshake failure" in out.stdout + out.stderr


@pytest.fixture
def mtls_proxy(start_proxy: ProxyFactory, upstream: UpstreamApp, tmp_path: Path) -> ProxyProcess:
    """A proxy that wants a client certificate from a CA no test client has one of."""
    clients = certs.create_ca("clients")
    (tmp_path / "clients.crt").write_bytes(clients.cert_pem)
    return start_proxy(upstream.base, "--client-ca", str(tmp_path / "clients.crt"), "--allow-all")


def test_a_missing_client_certificate_gets_certificate_required(
    mtls_proxy: ProxyProcess, ca: Path
) -> None:
    proxy = mtls_proxy
    ctx = client_context(ca)
    with (
        socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        pytest.raises(ssl.SSLError) as caught,
    ):
        # TLS 1.3: the client's handshake ends before the server checks its certificate; the
        # alert arrives on the first read.
        tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        tls.recv(100)
    assert caught.value.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED", caught.value
    line = wait_for(lambda: next(iter(failures(proxy)), None), 10, "the log line")
    # The log's reason is the metric's label; the finer cause is its detail.
    assert (line["reason"], line["detail"]) == ("client_certificate", "no_client_certificate")
    assert (
        proxy.metric("tls_sidecar_tls_handshake_errors_total", 'reason="client_certificate"') == 1
    )


def open_sockets(proxy: ProxyProcess) -> int:
    assert proxy.proc is not None
    found = 0
    for fd in Path(f"/proc/{proxy.proc.pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            found += os.readlink(fd).startswith("socket:")
    return found


def test_curl_without_a_client_certificate_reads_certificate_required_every_time(
    mtls_proxy: ProxyProcess, upstream: UpstreamApp, ca: Path
) -> None:
    """TLS 1.3: curl has finished its handshake and sends its request before the proxy has
    checked the (missing) certificate. Closing at once, with that request unread, made the
    kernel reset the connection and curl lose the alert ("getpeername() failed")."""
    proxy = mtls_proxy
    at_rest, requests_before = open_sockets(proxy), upstream.count()
    url = f"https://localhost:{proxy.port}/echo"
    for _ in range(10):
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "--tlsv1.3",
                "--cacert",
                str(ca),
                url,
                "--resolve",
                f"localhost:{proxy.port}:127.0.0.1",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert (out.returncode, "alert certificate required" in out.stderr) == (56, True), out
    assert upstream.count() == requests_before
    wait_for(lambda: open_sockets(proxy) <= at_rest, 10, "the refused connections closed")


def test_a_refused_client_that_stays_silent_is_closed_after_the_lingering_time(
    mtls_proxy: ProxyProcess, ca: Path
) -> None:
    proxy = mtls_proxy
    at_rest = open_sockets(proxy)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
        tls = client_context(ca).wrap_socket(raw, server_hostname="localhost")
        # the handshake is over for the client; the proxy refuses, and this client neither
        # reads nor closes: the proxy's side still ends, within its lingering time
        wait_for(lambda: open_sockets(proxy) <= at_rest, 10, "the proxy to close its side")
        with pytest.raises(ssl.SSLError) as caught:
            tls.recv(100)
        assert caught.value.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED", caught.value


def test_a_scanner_cannot_flood_the_log(start_proxy: ProxyFactory, upstream: UpstreamApp) -> None:
    proxy = start_proxy(upstream.base)
    for _ in range(30):
        no_shared_cipher(proxy.port)
    wait_for(
        lambda: proxy.metric("tls_sidecar_tls_handshake_errors_total", 'reason="protocol"') == 30,
        10,
        "30 failures counted",
    )
    assert len(failures(proxy)) == 1  # one line per reason every 10 s; the rest are counted


def test_plain_http_to_the_tls_port_gets_a_400_that_says_use_https(
    start_proxy: ProxyFactory, upstream: UpstreamApp, ca: Path
) -> None:
    proxy = start_proxy(upstream.base)
    before = upstream.count()
    out = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", f"http://127.0.0.1:{proxy.port}/echo/plain"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    body, _, code = out.stdout.rpartition("\n")
    assert (code, out.returncode) == ("400", 0), out
    assert "plain HTTP request was sent" in body and "https://" in body
    assert proxy.metric("tls_sidecar_tls_handshake_errors_total", 'reason="plain_http"') == 1
    line = wait_for(lambda: next(iter(failures(proxy)), None), 10, "the log line")
    assert (line["reason"], line["detail"]) == ("plain_http", "plain_http_on_tls_port")
    assert upstream.count() == before  # never reached the app
    # TLS clients on the same port are not disturbed, and nothing else was counted.
    with tls_socket(proxy.port, ca) as sock:
        sock.sendall(request_bytes("GET", "/echo/after"))
        response = RawClient(sock).read_response()
        assert response is not None and response.status == 200
    assert proxy.metric("tls_sidecar_tls_handshake_errors_total") == 1
