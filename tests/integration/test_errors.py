"""Every failure has an answer: 400, 408, 413, 431, 502, 504, closed connections; others unharmed."""

from __future__ import annotations

import contextlib
import http.client
import signal
import socket
import ssl
from pathlib import Path

import pytest

from tests.conftest import ProxyFactory
from tests.support.proxy import (
    ProxyProcess,
    RawClient,
    client_context,
    https,
    request_bytes,
    tls_socket,
    wait_for,
)
from tests.support.upstream import UpstreamApp


@pytest.fixture(scope="module")
def strict(start_proxy: ProxyFactory, upstream: UpstreamApp) -> ProxyProcess:
    """Short timeouts and small limits, so every failure is quick to provoke."""
    return start_proxy(
        upstream.base,
        "--upstream-timeout",
        "500ms",
        "--header-timeout",
        "500ms",
        "--idle-timeout",
        "1s",
        "--handshake-timeout",
        "500ms",
        "--max-body-bytes",
        "1KiB",
        "--max-header-bytes",
        "4KiB",
    )


def test_upstream_refused_is_502_without_waiting_for_a_timeout(
    start_proxy: ProxyFactory, ca: Path, refused_port: int
) -> None:
    proxy = start_proxy(f"http://127.0.0.1:{refused_port}", "--upstream-connect-timeout", "30s")
    # The client's own timeout is below the connect timeout: a 502 at all means the refusal
    # was answered, not waited out.
    status, headers, body = https(proxy, ca, path="/x", timeout=20)
    assert status == 502
    request_id = headers["x-request-id"]
    # The client learns that the app failed and the id to quote, not the app's address or error.
    assert body == f"502 Bad Gateway: request id {request_id}\n".encode()
    assert proxy.metric("tls_sidecar_upstream_connect_errors_total", 'reason="refused"') >= 1
    # The operator gets the detail: in the access log and in the log.
    record = wait_for(
        lambda: next((r for r in proxy.access_records() if r["request_id"] == request_id), None),
        what="the access log line",
    )
    assert record["local"] == "upstream_refused"
    assert record["bytes_out"] == len(body)  # what the client got, not 0
    assert f"127.0.0.1:{refused_port}" in record["detail"] and "refused" in record["detail"].lower()
    assert wait_for(
        lambda: any(
            "answered for the app" in line and request_id in line for line in proxy.stderr_lines
        ),
        what="the warning with the detail",
    )


def test_silent_upstream_is_504_after_the_upstream_timeout(strict: ProxyProcess, ca: Path) -> None:
    status, headers, body = https(strict, ca, path="/stall")
    assert status == 504
    assert body == f"504 Gateway Timeout: request id {headers['x-request-id']}\n".encode()
    assert strict.metric("tls_sidecar_timeouts_total", 'phase="upstream"') >= 1


def test_garbage_from_upstream_is_502(strict: ProxyProcess, ca: Path) -> None:
    status, headers, body = https(strict, ca, path="/garbage")
    assert status == 502
    assert body == f"502 Bad Gateway: request id {headers['x-request-id']}\n".encode()
    record = wait_for(
        lambda: next(
            (r for r in strict.access_records() if r["request_id"] == headers["x-request-id"]),
            None,
        ),
        what="the access log line",
    )
    assert record["local"] == "bad_response"
    assert "malformed response" in record["detail"]


def test_upstream_reset_before_answering_is_502(strict: ProxyProcess, ca: Path) -> None:
    status, _, _ = https(strict, ca, method="POST", path="/reset", body=b"x")
    assert status == 502


def test_upstream_reset_mid_response_closes_the_client_connection(
    strict: ProxyProcess, ca: Path
) -> None:
    conn = http.client.HTTPSConnection(
        "localhost", strict.port, context=client_context(ca), timeout=10
    )
    conn.request("GET", "/reset-mid")
    response = conn.getresponse()
    assert response.status == 200
    with pytest.raises(http.client.IncompleteRead):
        response.read()
    conn.close()
    status, _, _ = https(strict, ca, path="/echo/still-fine")
    assert status == 200


def test_malformed_request_is_400_and_closed(
    strict: ProxyProcess, upstream: UpstreamApp, ca: Path
) -> None:
    before = upstream.count()
    with tls_socket(strict.port, ca) as sock:
        client = RawClient(sock)
        client.send(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n")
        response = client.read_response()
        assert response is not None and response.status == 400
        assert response.header("connection") == "close"
        assert client.closed_by_peer()
    assert upstream.count() == before, "nothing reached the app"
    record = wait_for(
        lambda: next((r for r in strict.access_records()[::-1] if r["status"] == 400), None),
        what="the access log line",
    )
    assert record["bytes_out"] == len(response.body)  # what the client got, not 0


def test_content_length_with_transfer_encoding_is_refused(
    strict: ProxyProcess, upstream: UpstreamApp, ca: Path
) -> None:
    before = upstream.count()
    with tls_socket(strict.port, ca) as sock:
        client = RawClient(sock)
        client.send(
            b"POST /echo/smuggle HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /echo/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        response = client.read_response()
        assert response is not None and response.status == 400
        assert client.closed_by_peer()
    assert upstream.count() == before


def test_header_too_large_is_431(strict: ProxyProcess, ca: Path) -> None:
    with tls_socket(strict.port, ca) as sock:
        client = RawClient(sock)
        client.send(request_bytes("GET", "/", {"X-Big": "a" * 8000}))
        response = client.read_response()
        assert response is not None and response.status == 431


def test_body_over_the_limit_is_413(strict: ProxyProcess, upstream: UpstreamApp, ca: Path) -> None:
    before = upstream.count("/echo/too-big")
    status, _, _ = https(strict, ca, method="POST", path="/echo/too-big", body=b"x" * 2000)
    assert status == 413
    assert upstream.count("/echo/too-big") == before, (
        "a declared length over the limit never reaches the app"
    )
    with tls_socket(strict.port, ca) as sock:
        client = RawClient(sock)
        chunk = b"x" * 600
        client.send(
            request_bytes("POST", "/echo/too-big-chunked", {"Transfer-Encoding": "chunked"})
            + b"258\r\n"
            + chunk
            + b"\r\n"
            + b"258\r\n"
            + chunk
            + b"\r\n0\r\n\r\n"
        )
        response = client.read_response()
        assert response is not None and response.status == 413
    status, _, _ = https(strict, ca, method="POST", path="/echo/small", body=b"x" * 1000)
    assert status == 200


def test_slow_request_head_gets_408(strict: ProxyProcess, ca: Path) -> None:
    with tls_socket(strict.port, ca) as sock:
        client = RawClient(sock)
        client.send(b"GET /echo/slow HTTP/1.1\r\nHost: x\r\n")  # never finished
        response = client.read_response()
        assert response is not None and response.status == 408
        assert client.closed_by_peer()


def test_stalled_request_body_gets_408(strict: ProxyProcess, ca: Path) -> None:
    """A body that stops coming for --idle-timeout is answered 408 (then closed: the rest of
    its framing will not come), not cut with a bare close."""
    with tls_socket(strict.port, ca) as sock:
        client = RawClient(sock)
        client.send(b"POST /echo/stalled HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\npart")
        response = client.read_response(head_only=True)
        assert response is not None and response.status == 408
        assert client.closed_by_peer()
    record = wait_for(
        lambda: next((r for r in strict.access_records() if r["path"] == "/echo/stalled"), None),
        what="the access line",
    )
    assert (record["status"], record["local"]) == (408, "request_timeout")


def test_a_client_that_stops_reading_is_the_clients_timeout(strict: ProxyProcess, ca: Path) -> None:
    """A download the client stops reading is cut after --idle-timeout and counted as
    `timeouts_total{phase="send"}`, not as the app's (`upstream`), which answered at once."""

    def count(phase: str) -> float:
        value = strict.metric("tls_sidecar_timeouts_total", f'phase="{phase}"')
        return 0.0 if value != value else value  # noqa: PLR0124  NaN: never counted

    upstream, send = count("upstream"), count("send")
    with tls_socket(strict.port, ca) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /bytes/50000000 HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read
        wait_for(lambda: count("send") > send, timeout=15, what="the send timeout")
    assert count("upstream") == upstream


def test_silent_tcp_client_is_cut_at_the_handshake_timeout(strict: ProxyProcess) -> None:
    with socket.create_connection(("127.0.0.1", strict.port), timeout=10) as sock:
        assert sock.recv(1) == b"", "the proxy closed the connection"
    wait_for(
        lambda: strict.metric("tls_sidecar_tls_handshake_errors_total", 'reason="timeout"') >= 1
    )


def test_idle_keep_alive_connection_is_closed(strict: ProxyProcess, ca: Path) -> None:
    with tls_socket(strict.port, ca) as sock:
        client = RawClient(sock)
        client.send(request_bytes("GET", "/echo/then-idle"))
        response = client.read_response()
        assert response is not None and response.status == 200
        assert client.closed_by_peer(timeout=10)


def test_plaintext_http_on_the_tls_port_is_answered_400_in_plaintext(
    strict: ProxyProcess, upstream: UpstreamApp
) -> None:
    before = upstream.count()
    with socket.create_connection(("127.0.0.1", strict.port), timeout=10) as sock:
        sock.sendall(b"POST /echo/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        answer = sock.makefile("rb").read()  # until the proxy closes
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
    assert b"Connection: close" in answer and answer.endswith(b"use https:// in the URL.\n")
    assert strict.metric("tls_sidecar_tls_handshake_errors_total", 'reason="plain_http"') >= 1
    assert upstream.count() == before


def test_a_failing_connection_never_affects_another(strict: ProxyProcess, ca: Path) -> None:
    with tls_socket(strict.port, ca) as good_sock:
        good = RawClient(good_sock)
        good.send(request_bytes("GET", "/echo/good-1"))
        first = good.read_response()
        assert first is not None and first.status == 200
        for bad_bytes in (
            b"\x00\x01garbage\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        ):
            with tls_socket(strict.port, ca) as bad_sock:
                bad = RawClient(bad_sock)
                bad.send(bad_bytes)
                response = bad.read_response()
                assert response is not None and response.status == 400
        status, _, _ = https(strict, ca, path="/stall")
        assert status == 504
        good.send(request_bytes("GET", "/echo/good-2"))
        second = good.read_response()
        assert second is not None and second.status == 200


def test_connect_method_is_refused(strict: ProxyProcess, ca: Path) -> None:
    with tls_socket(strict.port, ca) as sock:
        client = RawClient(sock)
        client.send(b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n")
        response = client.read_response(method=b"CONNECT")
        assert response is not None and response.status == 405


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_tls_1_1_client_is_refused(strict: ProxyProcess, ca: Path) -> None:
    ctx = client_context(ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with contextlib.suppress(ssl.SSLError):
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    with (
        socket.create_connection(("127.0.0.1", strict.port), timeout=10) as raw,
        pytest.raises(ssl.SSLError),
    ):
        ctx.wrap_socket(raw, server_hostname="localhost")


def test_clients_closing_during_the_handshake_leave_nothing_behind(
    start_proxy: ProxyFactory, upstream: UpstreamApp
) -> None:
    proxy = start_proxy(upstream.base)
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10):
            pass  # connect and close (FIN) without a ClientHello
        raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        raw.sendall(b"\x16\x03\x01\x00\xa0\x01\x00\x00\x9c\x03\x03")  # half a ClientHello
        raw.close()
    wait_for(lambda: proxy.metric("tls_sidecar_connections_accepted_total") >= 40)
    wait_for(
        lambda: proxy.metric("tls_sidecar_connections_active") == 0,
        what="every connection forgotten",
    )
    proxy.signal(signal.SIGTERM)
    assert proxy.wait(10) == 0, "the drain found no connection left over"


def test_max_connections_refuses_new_ones_cleanly_and_keeps_the_rest(
    start_proxy: ProxyFactory, upstream: UpstreamApp, ca: Path
) -> None:
    proxy = start_proxy(upstream.base, "--max-connections", "20")
    held = []
    try:
        for _ in range(20):
            sock = client_context(ca).wrap_socket(
                socket.create_connection(("127.0.0.1", proxy.port), timeout=10),
                server_hostname="localhost",
            )
            held.append(sock)
        wait_for(lambda: proxy.metric("tls_sidecar_connections_active") == 20)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as extra:
            assert extra.recv(1) == b"", "the 21st connection is closed at once"
        assert (
            proxy.metric("tls_sidecar_connections_rejected_total", 'reason="max_connections"') == 1
        )
        for sock in held[:3]:
            client = RawClient(sock)
            client.send(request_bytes("GET", "/echo/held"))
            response = client.read_response()
            assert response is not None and response.status == 200, (
                "existing connections are unaffected"
            )
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: proxy.metric("tls_sidecar_connections_active") == 0)
    assert https(proxy, ca, path="/echo/room-again")[0] == 200
