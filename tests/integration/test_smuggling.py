"""Request smuggling and malformed input, as raw bytes over TLS.

For every entry: the app never sees more requests than the client meant, the client gets a 4xx
or a closed connection (or a 2xx for the entries that are valid), and the proxy keeps serving.
"""

from __future__ import annotations

import json
import math
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ProxyFactory
from tests.support.h2client import H2Client
from tests.support.proxy import (
    ProxyProcess,
    RawClient,
    RawResponse,
    https,
    request_bytes,
    tls_socket,
    wait_for,
)
from tests.support.upstream import Received, UpstreamApp

H = b"Host: localhost\r\n"


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    meant: int  # requests the app may see
    ok: bool = False  # a valid request: a 2xx is expected


CASES = [
    Case(
        "cl-and-te",
        b"POST /c HTTP/1.1\r\n"
        + H
        + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n"
        + H
        + b"\r\n",
        0,
    ),
    Case(
        "te-and-cl",
        b"POST /c HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
        0,
    ),
    Case(
        "two-content-lengths",
        b"POST /c HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 40\r\n\r\nabc",
        0,
    ),
    Case(
        "content-length-list", b"POST /c HTTP/1.1\r\n" + H + b"Content-Length: 3, 40\r\n\r\nabc", 0
    ),
    Case(
        "te-chunked-identity",
        b"POST /c HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        0,
    ),
    Case(
        "te-xchunked",
        b"POST /c HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        0,
    ),
    Case("te-identity", b"POST /c HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\nabc", 0),
    Case(
        "te-duplicate",
        b"POST /c HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        0,
    ),
    Case(
        "te-space-before-colon",
        b"POST /c HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        0,
    ),
    Case(
        "te-obs-fold",
        b"POST /c HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding:\r\n chunked\r\nContent-Length: 3\r\n\r\nabc",
        0,
    ),
    Case(
        "te-vertical-tab",
        b"POST /c HTTP/1.1\r\n" + H + b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n",
        0,
    ),
    Case(
        "te-mixed-case-valid",
        b"POST /echo/te-case HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: ChUnKeD\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        1,
        ok=True,
    ),
    Case(
        "te-tab-valid",
        b"POST /echo/te-tab HTTP/1.1\r\n" + H + b"Transfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n",
        1,
        ok=True,
    ),
    Case(
        "chunk-size-not-hex",
        b"POST /c HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        0,
    ),
    Case(
        "chunk-size-negative",
        b"POST /c HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n",
        0,
    ),
    Case(
        "chunk-size-huge",
        b"POST /c HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\nabc\r\n",
        0,
    ),
    Case(
        "chunk-size-0x",
        b"POST /c HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
        0,
    ),
    Case(
        "chunk-data-longer-than-size",
        b"POST /c HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n",
        1,
    ),
    Case(
        "chunk-extension-valid",
        b"POST /echo/ext HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\n3;name=value\r\nabc\r\n0\r\n\r\n",
        1,
        ok=True,
    ),
    Case(
        "chunk-extension-bare-cr",
        b"POST /c HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\n3;a\rb\r\nabc\r\n0\r\n\r\n",
        1,
    ),
    Case("bare-lf-line-endings", b"GET /echo/lf HTTP/1.1\n" + b"Host: localhost\n\n", 1),
    Case("space-before-colon", b"GET /c HTTP/1.1\r\n" + H + b"X-Thing : 1\r\n\r\n", 0),
    Case("nul-in-header-value", b"GET /c HTTP/1.1\r\n" + H + b"X-Thing: a\x00b\r\n\r\n", 0),
    Case("cr-in-header-value", b"GET /c HTTP/1.1\r\n" + H + b"X-Thing: a\rb\r\n\r\n", 0),
    Case("lf-in-header-name", b"GET /c HTTP/1.1\r\n" + H + b"X-\nThing: a\r\n\r\n", 0),
    Case(
        "absolute-form",
        b"GET http://other.example/echo/abs?q=1 HTTP/1.1\r\n" + H + b"\r\n",
        1,
        ok=True,
    ),
    Case("absolute-form-no-host", b"GET http:///x HTTP/1.1\r\n" + H + b"\r\n", 0),
    Case("asterisk-form-options", b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", 1, ok=True),
    Case("asterisk-form-get", b"GET * HTTP/1.1\r\n" + H + b"\r\n", 0),
    Case("authority-form-get", b"GET example.org:443 HTTP/1.1\r\n" + H + b"\r\n", 0),
    Case("overlong-request-line", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n" + H + b"\r\n", 0),
    Case(
        "overlong-header-section",
        b"GET /c HTTP/1.1\r\n"
        + H
        + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 100) for i in range(400))
        + b"\r\n",
        0,
    ),
    Case("http-0.9", b"GET /\r\n\r\n", 0),
    Case("http-1.1-without-host", b"GET /c HTTP/1.1\r\n\r\n", 0),
    Case("http-1.0-without-host", b"GET /echo/h10 HTTP/1.0\r\n\r\n", 1, ok=True),
    Case("http-2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 0),
    Case("unknown-version", b"GET /c HTTP/3.7\r\n" + H + b"\r\n", 0),
    # HTTP/1.2 does not exist; llhttp refuses it unless made lenient, so both codecs answer 505.
    Case("minor-version-above-1", b"GET /echo/v12 HTTP/1.2\r\n" + H + b"\r\n", 0),
    Case("garbage", b"\x00\x01\x02\x03 not http at all\r\n\r\n", 0),
    Case("pipeline-then-garbage", b"GET /echo/p1 HTTP/1.1\r\n" + H + b"\r\nGARBAGE\r\n\r\n", 1),
]


@pytest.fixture(scope="module")
def app() -> Iterator[UpstreamApp]:
    application = UpstreamApp().start()
    yield application
    application.stop()


@pytest.fixture(scope="module")
def guarded(start_proxy: ProxyFactory, app: UpstreamApp) -> ProxyProcess:
    return start_proxy(app.base, "--header-timeout", "2s")


def exchange(port: int, ca: Path, data: bytes) -> list[int]:
    """Send the bytes; the statuses that came back before the proxy closed (or went quiet)."""
    statuses = []
    with tls_socket(port, ca) as sock:
        sock.sendall(data)
        client = RawClient(sock)
        sock.settimeout(5)
        for _ in range(3):
            try:
                response = client.read_response()
            except (TimeoutError, ssl.SSLError, OSError):
                break
            if response is None:
                break
            statuses.append(response.status)
            sock.settimeout(0.3)  # anything pipelined behind it comes at once, or not at all
    return statuses


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus(case: Case, guarded: ProxyProcess, app: UpstreamApp, ca: Path) -> None:
    before = app.count()
    statuses = exchange(guarded.port, ca, case.data)
    reached = app.count() - before
    assert reached <= case.meant, f"the app saw {reached} requests, the client meant {case.meant}"
    assert app.count("/smuggled") == 0
    if case.ok:
        assert statuses and 200 <= statuses[0] < 300, statuses
    else:
        errors = [s for s in statuses if not 200 <= s < 300]
        # 4xx, or 505 for another major HTTP version (RFC 9110 §15.6.6)
        assert all(400 <= s < 500 or s == 505 for s in errors), f"only 4xx answers, got {statuses}"
    assert https(guarded, ca, path="/echo/still-serving")[0] == 200


def test_absolute_form_target_is_rewritten_with_its_host(
    guarded: ProxyProcess, app: UpstreamApp, ca: Path
) -> None:
    exchange(
        guarded.port,
        ca,
        b"GET http://other.example/echo/abs2?q=1 HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    seen = next(r for r in reversed(app.requests) if r.path.startswith("/echo/abs2"))
    assert seen.path == "/echo/abs2?q=1"
    assert seen.header("host") == "other.example"


def test_plaintext_and_garbage_client_hello_are_refused(guarded: ProxyProcess) -> None:
    # Plain HTTP gets only the proxy's own 400 saying to use https; garbage gets nothing HTTP.
    for data, expected in (
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 400 Bad Request\r\n"),
        (b"\x16\x03\x01\x00\x05garbage-hello", None),
        (b"\xff" * 300, None),
    ):
        with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as sock:
            sock.sendall(data)
            try:
                answer = sock.recv(4096)
            except ConnectionResetError:
                answer = b""
            if expected is None:
                assert not answer.startswith(b"HTTP/")
            else:
                assert answer.startswith(expected) and b"use https://" in answer


# --- the response side: an app's bytes after its response (response-queue poisoning) ---------


def last_received(app: UpstreamApp, path: str) -> Received:
    return next(r for r in reversed(app.requests) if r.path == path)


def clean(response: RawResponse | None, path: str) -> None:
    """The app's own answer to `path`: nothing of the injected one."""
    assert response is not None, "the proxy closed the connection"
    assert response.status == 200, response
    assert response.header("x-injected") is None, "an injected answer reached the client"
    assert json.loads(response.body)["path"] == path, response.body


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/extra/get", 200),
        ("HEAD", "/extra/head", 200),
        ("GET", "/extra-status/204", 204),
        ("GET", "/extra-status/304", 304),
    ],
    ids=["content-length", "head", "204", "304"],
)
def test_bytes_after_a_response_reach_no_client_and_the_connection_is_closed(
    method: str, path: str, status: int, guarded: ProxyProcess, app: UpstreamApp, ca: Path
) -> None:
    """The app answers, then writes a whole second answer on the same connection at once: it
    answers no one (not this client's next request, not another client's), and the app
    connection is closed rather than pooled, so the next request goes out on a fresh one."""
    after = f"/echo/after-{method.lower()}-{status}"
    with tls_socket(guarded.port, ca) as sock:
        client = RawClient(sock)
        client.send(request_bytes(method, path))
        first = client.read_response(method.encode())
        assert first is not None and first.status == status, first
        assert first.header("x-injected") is None
        assert first.body == (b"hello" if method == "GET" and status == 200 else b"")
        client.send(request_bytes("GET", after))  # the same client connection, kept alive
        clean(client.read_response(), after)
    other = f"/echo/other-{method.lower()}-{status}"
    answer, headers, body = https(guarded, ca, path=other)
    assert answer == 200 and "x-injected" not in headers and b"INJECTED" not in body
    poisoned = last_received(app, path).connection_id
    assert last_received(app, after).connection_id != poisoned, "the app connection was reused"
    assert "Traceback" not in guarded.stderr_text()


def test_bytes_an_idle_app_connection_sends_later_reach_no_client(
    guarded: ProxyProcess, app: UpstreamApp, ca: Path
) -> None:
    """The injected answer comes after the response, while the connection waits in the pool."""
    gate = f"late-{guarded.port}"  # one per proxy: the app outlives each codec's
    path, after = f"/extra-gate/{gate}", f"/echo/after-{gate}"
    with tls_socket(guarded.port, ca) as sock:
        client = RawClient(sock)
        client.send(request_bytes("GET", path))
        first = client.read_response()
        assert first is not None and first.body == b"hello", first
        closed = app.closed
        app.open_gate(gate)
        wait_for(lambda: app.closed > closed, what="the proxy closing the app connection")
        client.send(request_bytes("GET", after))
        clean(client.read_response(), after)
    poisoned = last_received(app, path).connection_id
    assert last_received(app, after).connection_id != poisoned


def test_a_malformed_pipelined_request_is_refused_and_the_app_connection_pooled(
    guarded: ProxyProcess, app: UpstreamApp, ca: Path
) -> None:
    """A good request and a malformed one in one write: the first is answered, the second gets
    its 400 (counted, logged) on the client's side, and the app connection that answered the
    first goes back to the pool unharmed."""
    bad = b"GET  /echo/pipelined-bad HTTP/1.1\r\nHost: localhost\r\n\r\n"  # two spaces
    refused = guarded.metric("tls_sidecar_local_responses_total", 'code="400"')
    refused = 0.0 if math.isnan(refused) else refused  # absent before the first
    with tls_socket(guarded.port, ca) as sock:
        client = RawClient(sock)
        client.send(request_bytes("GET", "/echo/pipelined-good") + bad)
        clean(client.read_response(), "/echo/pipelined-good")
        second = client.read_response()
        assert second is not None and second.status == 400, second
        assert client.closed_by_peer()
    assert app.count("/echo/pipelined-bad") == 0
    assert guarded.metric("tls_sidecar_local_responses_total", 'code="400"') == refused + 1
    wait_for(
        lambda: any(
            r["status"] == 400 and r.get("local") == "bad_request" for r in guarded.access_records()
        ),
        what="the refusal in the access log",
    )
    assert https(guarded, ca, path="/echo/pooled-after")[0] == 200
    good = last_received(app, "/echo/pipelined-good").connection_id
    assert last_received(app, "/echo/pooled-after").connection_id == good, "not pooled"
    assert "Traceback" not in guarded.stderr_text()
    assert "unexpected error" not in guarded.stderr_text()


def test_bytes_after_a_response_reach_no_http2_client(
    guarded: ProxyProcess, app: UpstreamApp, ca: Path
) -> None:
    """The same over HTTP/2: the next stream, on the same client connection, gets its own
    answer from a fresh app connection."""
    after = f"/echo/after-h2-{guarded.port}"
    client = H2Client(guarded.port, ca)
    try:
        first = client.response(client.request(b"/extra-status/204"))
        assert first.status == 204 and first.header(b"x-injected") is None
        second = client.response(client.request(after.encode()))
    finally:
        client.close()
    assert second.status == 200 and second.header(b"x-injected") is None
    assert json.loads(bytes(second.body))["path"] == after
    poisoned = last_received(app, "/extra-status/204").connection_id
    assert last_received(app, after).connection_id != poisoned
