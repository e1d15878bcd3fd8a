"""`--upstream h2c://` and `h2c+unix:` against a small HTTP/2 app of our own (tests/support/h2app):
trailers both ways, resets relayed back, the app's stream limit respected with few
connections."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import h2.errors
import h11
import pytest

from tests.conftest import ProxyFactory
from tests.support.codecs import http2_env
from tests.support.h2app import H2App
from tests.support.h2client import H2Client
from tests.support.proxy import DevCerts, ProxyProcess, serve_args, tls_socket, wait_for


@pytest.fixture
def run(dev_certs: DevCerts) -> Iterator[list[object]]:
    """Apps and proxies started by a test, stopped after it."""
    started: list[object] = []
    yield started
    for thing in reversed(started):
        thing.stop()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def codec_env(http2_codec: str) -> dict[str, str]:
    """The tests that start their proxy with `start_proxy` run once per HTTP/2 codec."""
    return http2_env(http2_codec)


def start(run: list[object], app: H2App, start_proxy: ProxyFactory, *extra: str) -> ProxyProcess:
    """`app` for this test, and a proxy in front of it that clients reach over HTTP/2."""
    run.append(app.start())
    return start_proxy(app.url, *extra)


def test_trailers_go_both_ways(
    run: list[object], ca: Path, start_proxy: ProxyFactory, http2_codec: str
) -> None:
    proxy = start(run, H2App(), start_proxy)
    listening = proxy._listening()
    assert listening is not None
    assert listening["h2c_codec"] == http2_codec  # the same codec both ways
    client = H2Client(proxy.port, ca)
    sid = client.request(
        b"/upload",
        method=b"POST",
        headers=[(b"content-type", b"application/grpc")],
        body=b"\x00\x00\x00\x00\x02hi",
        end=False,
    )
    client.conn.send_headers(sid, [(b"x-client-trailer", b"sent")], end_stream=True)
    client.flush()
    response = client.response(sid)
    client.close()
    seen = json.loads(response.body)
    assert seen["trailers"] == [["x-client-trailer", "sent"]]
    assert seen["body_length"] == 7
    headers = dict(seen["headers"])
    assert headers[":authority"] == "localhost"
    assert headers["te"] == "trailers"  # gRPC servers require it
    assert headers["x-forwarded-proto"] == "https"
    assert response.trailers == [(b"x-app-trailer", b"done")]


def test_a_unix_socket_app(
    run: list[object], ca: Path, tmp_path: Path, start_proxy: ProxyFactory
) -> None:
    proxy = start(run, H2App(unix_path=str(tmp_path / "app.sock")), start_proxy)
    client = H2Client(proxy.port, ca)
    response = client.response(client.request(b"/hello"))
    client.close()
    assert response.status == 200
    assert json.loads(response.body)["body_length"] == 0


def test_the_apps_reset_reaches_the_client(
    run: list[object], ca: Path, start_proxy: ProxyFactory
) -> None:
    proxy = start(run, H2App(), start_proxy)
    client = H2Client(proxy.port, ca)
    response = client.response(client.request(b"/reset-mid"))
    assert response.status == 200 and bytes(response.body) == b"partial"
    assert response.reset == h2.errors.ErrorCodes.CANCEL  # relayed, not turned into an error
    again = client.response(client.request(b"/after"))  # the connection goes on
    client.close()
    assert again.status == 200


def test_streams_spread_over_few_connections_within_the_apps_limit(
    run: list[object], ca: Path, start_proxy: ProxyFactory
) -> None:
    """The app allows 5 streams per connection: 20 at once take 4 connections, not 20. The
    app holds every answer until all 20 are with it, so they are all in flight together."""
    app = H2App(max_streams=5)
    proxy = start(run, app, start_proxy)
    client = H2Client(proxy.port, ca)
    streams = [client.request(b"/hold/pool") for _ in range(20)]
    wait_for(lambda: app.held.get("pool") == 20, timeout=20, what="20 streams at the app")
    app.open_gate("pool")
    statuses = [client.response(sid, timeout=20).status for sid in streams]
    client.close()
    assert statuses == [200] * 20
    assert 4 <= app.connections <= 6


def test_a_chunked_http11_request_reaches_the_h2c_app_without_its_framing(
    run: list[object], ca: Path, start_proxy: ProxyFactory
) -> None:
    """HTTP/1.1's framing (Transfer-Encoding, Connection, Keep-Alive, Host) is connection-specific:
    an HTTP/2 app must never see it (RFC 9113 §8.2.2); the body arrives whole, its length known
    only from the stream."""
    app = H2App()
    proxy = start(run, app, start_proxy)
    request = (
        b"POST /upload HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive, x-hop\r\n"
        b"Keep-Alive: timeout=5\r\nX-Hop: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/", headers=[("host", "x")]))
    with tls_socket(proxy.port, ca) as sock:
        sock.sendall(request)
        response: h11.Response | None = None
        body = b""
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
    assert response is not None and response.status_code == 200, (response, body)
    seen = json.loads(body)
    assert seen["body_length"] == 11
    names = {name for name, _ in seen["headers"]}
    assert not names & {"transfer-encoding", "connection", "keep-alive", "x-hop", "host"}, names
    assert dict(seen["headers"])[":authority"] == "localhost"


def test_readiness_asks_an_h2c_app_over_http2(run: list[object], start_proxy: ProxyFactory) -> None:
    app = H2App()
    proxy = start(run, app, start_proxy, "--upstream-health-path", "/health")
    assert proxy.admin_get("/readyz") == (200, "ready\n")
    assert app.seen and dict(app.seen[-1]["headers"])[":path"] == "/health"


def test_an_h2c_apps_health_answer_without_a_valid_status_is_not_ready(
    run: list[object], start_proxy: ProxyFactory
) -> None:
    """`:status: abc` reaches readiness as it reaches a client (h2 checks only that there is
    one): said in one line, not an exception out of the probe."""
    proxy = start(run, H2App(), start_proxy, "--upstream-health-path", "/bad-status")
    status, body = proxy.admin_get("/readyz")
    assert (status, body) == (503, "not ready: health check GET /bad-status: not an HTTP answer\n")
    assert "Traceback" not in proxy.stderr_text()


def grpc_over_http11(
    port: int, ca: Path, te: bool
) -> tuple[h11.Response, bytes, list[tuple[bytes, bytes]]]:
    """A gRPC call over HTTP/1.1 from a raw client: the response head, body and trailers."""
    message = b"\x00\x00\x00\x00\x02hi"
    head = (
        b"POST /grpc/Greeter/Say HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/grpc\r\nContent-Length: %d\r\n" % len(message)
    )
    if te:
        head += b"TE: trailers\r\n"
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/", headers=[("host", "x")]))
    with tls_socket(port, ca) as sock:
        sock.sendall(head + b"\r\n" + message)
        response: h11.Response | None = None
        body = b""
        trailers: list[tuple[bytes, bytes]] = []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                trailers = list(event.headers)
                break
            else:
                raise AssertionError(f"unexpected {event!r}")
    assert response is not None
    return response, body, trailers


def test_grpc_trailers_reach_an_http11_client_that_accepts_them(
    run: list[object], ca: Path, start_proxy: ProxyFactory
) -> None:
    """An HTTP/1.1 client sending `TE: trailers` gets the app's trailers (grpc-status) at the
    end of a chunked body, as nginx and HAProxy relay them; one that did not gets none. (Each
    HTTP/1.1 codec answers it: `codec_env` pairs one with each HTTP/2 codec.)"""
    proxy = start(run, H2App(), start_proxy)
    response, body, trailers = grpc_over_http11(proxy.port, ca, te=True)
    assert response.status_code == 200
    assert (b"transfer-encoding", b"chunked") in response.headers
    assert body == b"\x00\x00\x00\x00\x05hello"
    assert (b"grpc-status", b"0") in trailers and (b"grpc-message", b"ok") in trailers
    response, body, trailers = grpc_over_http11(proxy.port, ca, te=False)
    assert response.status_code == 200 and body == b"\x00\x00\x00\x00\x05hello"
    assert trailers == []


def test_an_h2c_app_resetting_the_health_check_is_reported_at_once(
    run: list[object], dev_certs: DevCerts, start_proxy: ProxyFactory, codec_env: dict[str, str]
) -> None:
    """The app resets the health check's stream 0.1 s after it: readiness and `check` say so,
    rather than waiting out their timeout to report an app that "did not answer"."""
    app = H2App()
    health = ("--upstream-health-path", "/reset-unanswered")
    proxy = start(run, app, start_proxy, *health)
    reset = "health check GET /reset-unanswered: the app reset the stream (INTERNAL_ERROR)"
    assert proxy.admin_get("/readyz") == (503, f"not ready: {reset}\n")
    # A timeout far longer than the test may take: only a reset seen at once ends the check.
    args = [*serve_args(app.url, dev_certs, *health)[1:], "--upstream-connect-timeout", "600s"]
    checked = subprocess.run(
        [sys.executable, "-m", "proxy", "check", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **codec_env},  # `check` asks through the same codec
    )
    assert f"warn  upstream: {reset}" in checked.stdout, checked.stdout + checked.stderr
