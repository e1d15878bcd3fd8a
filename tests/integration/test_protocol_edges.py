"""Protocol edge cases an outside probe found, as raw bytes over TLS, with both codecs.

Each test sends what the probe sent and asserts what the app saw and what the client saw."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest

from tests.conftest import ProxyFactory
from tests.support.proxy import DevCerts, ProxyProcess, RawClient, https, serve_args, tls_socket
from tests.support.upstream import UpstreamApp


@pytest.fixture(scope="module")
def app(upstream: UpstreamApp) -> UpstreamApp:
    return upstream


@pytest.fixture(scope="module")
def edge(start_proxy: ProxyFactory, app: UpstreamApp) -> ProxyProcess:
    return start_proxy(app.base, "--header-timeout", "5s")


def read_all(sock: ssl.SSLSocket, timeout: float = 10) -> bytes:
    """Everything the proxy sends until it closes (a test that hangs here found a bug)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, ssl.SSLError):
        pass
    return data


@pytest.mark.parametrize(
    "size",
    [
        b"ffffffffffffffffff5",  # 19 hex digits: 2^76 and more
        b"10000000000000000",  # 17 digits: 2^64, one past the largest size
        b"00000010000000000000000",  # the same with leading zeros
    ],
)
def test_chunk_size_beyond_64_bits_is_400_and_never_completes(
    edge: ProxyProcess, app: UpstreamApp, ca: Path, size: bytes
) -> None:
    before = app.count()
    with tls_socket(edge.port, ca) as sock:
        sock.sendall(
            b"POST /echo/overflow HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + size
            + b"\r\nhello\r\n0\r\n\r\n"
        )
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]
    assert b"connection: close" in answer.lower()
    assert app.count() == before, "the app never saw a complete request"


def test_bytes_after_connection_close_are_ignored(
    edge: ProxyProcess, app: UpstreamApp, ca: Path
) -> None:
    before, after = app.count("/echo/before-close"), app.count("/echo/after-close")
    with tls_socket(edge.port, ca) as sock:
        sock.sendall(
            b"GET /echo/before-close HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            b"GET /echo/after-close HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        answer = read_all(sock)  # returns only because the proxy closes
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:80]
    assert answer.count(b"HTTP/1.1 ") == 1, "one answer, then close"
    assert b"connection: close" in answer.lower()
    assert app.count("/echo/before-close") == before + 1
    assert app.count("/echo/after-close") == after, "what followed close was never forwarded"


@pytest.mark.parametrize(
    ("path", "upgrade_headers"),
    [
        (  # h2c: never passed over TLS ("h2c smuggling")
            "/echo/h2c",
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
            b"Connection: Upgrade, HTTP2-Settings\r\n",
        ),
        ("/echo/foo-up", b"Upgrade: foo/1\r\nConnection: upgrade\r\n"),  # not on the list
    ],
)
def test_an_upgrade_off_the_allow_list_is_stripped_and_served_as_http11(
    edge: ProxyProcess, app: UpstreamApp, ca: Path, path: str, upgrade_headers: bytes
) -> None:
    with tls_socket(edge.port, ca) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode() + upgrade_headers + b"\r\n")
        response = RawClient(sock).read_response()
    assert response is not None and response.status == 200, "answered as plain HTTP/1.1"
    seen = next(r for r in reversed(app.requests) if r.path == path)
    names = {n for n, _ in seen.headers}
    assert not names & {"upgrade", "http2-settings", "connection"}, seen.headers


def test_an_allowed_upgrade_reaches_the_app(
    start_proxy: ProxyFactory, app: UpstreamApp, ca: Path
) -> None:
    proxy = start_proxy(app.base, "--upgrade", "websocket", "--upgrade", "foo")
    with tls_socket(proxy.port, ca) as sock:
        sock.sendall(
            b"GET /echo/foo-allowed HTTP/1.1\r\nHost: x\r\nUpgrade: foo\r\nConnection: upgrade\r\n\r\n"
        )
        response = RawClient(sock).read_response()
    assert response is not None and response.status == 200  # the echo app declines it
    seen = next(r for r in reversed(app.requests) if r.path == "/echo/foo-allowed")
    assert seen.header("upgrade") == "foo"
    assert seen.header("connection") == "upgrade"
    assert https(proxy, ca, path="/echo/after-upgrade")[0] == 200


def test_h2c_cannot_be_allowed(dev_certs: DevCerts) -> None:
    proc = ProxyProcess(serve_args("http://127.0.0.1:9", dev_certs, "--upgrade", "h2c"))
    proc.start(expect_ready=False)
    assert proc.wait(20) == 2
    errors = [line for line in proc.stderr_lines if line.strip()]
    assert len(errors) == 1 and "--upgrade h2c" in errors[0], errors


def test_admin_closes_after_answering_connection_close(edge: ProxyProcess) -> None:
    with socket.create_connection(("127.0.0.1", edge.admin_port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        sock.settimeout(5)
        data = b""
        while chunk := sock.recv(4096):  # EOF, not the 30 s admin idle timeout
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"ok\n")
    assert b"connection: close" in data.lower()


def test_expect_100_continue_is_answered_by_the_proxy(
    edge: ProxyProcess, app: UpstreamApp, ca: Path
) -> None:
    body = b"x" * 300_000
    with tls_socket(edge.port, ca) as sock:
        sock.sendall(
            b"POST /echo/expect HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        # A client that waits for 100 before its body, as curl does for large uploads: the app
        # (like most) never sends 100, so this read returns only because the proxy answers.
        sock.settimeout(10)
        interim = sock.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n"), interim
        sock.sendall(body)
        response = RawClient(sock).read_response(b"POST")
    assert response is not None and response.status == 200
    seen = next(r for r in reversed(app.requests) if r.path == "/echo/expect")
    assert seen.body_length == len(body)
    assert seen.header("expect") is None, "the app is not asked to continue"


def test_expect_100_continue_over_the_body_limit_is_413_without_100(
    start_proxy: ProxyFactory, app: UpstreamApp, ca: Path
) -> None:
    proxy = start_proxy(app.base, "--max-body-bytes", "1000")
    with tls_socket(proxy.port, ca) as sock:
        sock.sendall(
            b"POST /echo/expect-big HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: 5000\r\n\r\n"
        )
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:60]
    assert b"100 Continue" not in answer


@pytest.mark.parametrize("connection", ["keep-alive", None], ids=["keep-alive", "plain"])
def test_an_http10_request_is_answered_with_connection_close_and_closed(
    connection: str | None, edge: ProxyProcess, ca: Path
) -> None:
    """HTTP/1.0, even with `Connection: keep-alive`: the answer says `Connection: close` and
    the connection closes after it, with both codecs (the client can tell where it ends)."""
    extra = f"Connection: {connection}\r\n" if connection else ""
    with tls_socket(edge.port, ca) as sock:
        sock.sendall(f"GET /echo/http10 HTTP/1.0\r\nHost: localhost\r\n{extra}\r\n".encode())
        client = RawClient(sock)
        response = client.read_response()
        assert response is not None and response.status == 200, response
        assert b'"/echo/http10"' in response.body
        assert response.header("connection") == "close"
        assert client.closed_by_peer(timeout=5)
