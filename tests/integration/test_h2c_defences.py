"""An h2c app that breaks HTTP/2, and requests HTTP/2 cannot carry: the proxy answers the
streams concerned (502 or 400), logs no traceback, and goes on serving the client. Every test
runs once per HTTP/2 codec, which is the client codec to the app too."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import h2.errors
import pytest
from hyperframe.frame import DataFrame

from tests.conftest import ProxyFactory
from tests.support.codecs import http2_env
from tests.support.h2app import H2App
from tests.support.h2client import H2Client
from tests.support.proxy import ProxyProcess, RawClient, request_bytes, tls_socket, wait_for


@pytest.fixture(scope="module")
def codec_env(http2_codec: str) -> dict[str, str]:
    return http2_env(http2_codec)


@pytest.fixture(scope="module")
def app() -> Iterator[H2App]:
    h2app = H2App().start()
    yield h2app
    h2app.stop()


@pytest.fixture(scope="module")
def proxy(start_proxy: ProxyFactory, app: H2App) -> ProxyProcess:
    return start_proxy(app.url)


@pytest.fixture(autouse=True)
def no_traceback(proxy: ProxyProcess) -> Iterator[None]:
    yield
    assert "Traceback" not in proxy.stderr_text()


def upstream_errors(proxy: ProxyProcess, reason: str) -> float:
    value = proxy.metric("tls_sidecar_http2_connection_errors_total", f'reason="{reason}"')
    return 0.0 if math.isnan(value) else value


def test_an_invalid_status_is_a_502_for_its_stream_only(proxy: ProxyProcess, ca: Path) -> None:
    """Before: `int(b"abc")` escaped the app connection's data_received (a traceback), and the
    streams on that connection were lost with it."""
    client = H2Client(proxy.port, ca)
    slow = client.request(b"/slow/other")  # answered 0.3 s later, on the same app connection
    bad = client.request(b"/bad-status")
    assert client.response(bad).status == 502
    assert client.response(slow).status == 200
    assert client.response(client.request(b"/after")).status == 200
    client.close()


def test_a_malformed_frame_from_the_app_ends_that_connection_only(
    proxy: ProxyProcess, ca: Path
) -> None:
    """Bad padding from the app: GOAWAY to it, counted; its stream is a 502 and the client's
    next request goes on a new app connection."""
    before = upstream_errors(proxy, "upstream_protocol_error")
    client = H2Client(proxy.port, ca)
    assert client.response(client.request(b"/bad-padding")).status == 502
    after = client.response(client.request(b"/after"))
    assert after.status == 200
    # (the request may have been retried once on a new connection: it reached a reused one)
    assert upstream_errors(proxy, "upstream_protocol_error") >= before + 1
    client.close()


@pytest.mark.parametrize(
    "request_line",
    [b"GET /h2c HTTP/1.1\r\nHost: local host\r\n", b"GET /h2c HTTP/1.1\r\nHost: u@localhost\r\n"],
)
def test_a_host_http2_cannot_carry_is_a_400(
    proxy: ProxyProcess, app: H2App, ca: Path, request_line: bytes
) -> None:
    """An HTTP/1.1 request's Host becomes the h2c request's :authority. Before: sent as it
    was, for the app's HTTP/2 stack to refuse (or not)."""
    seen = len(app.seen)
    with tls_socket(proxy.port, ca) as sock:
        raw = RawClient(sock)
        raw.send(request_line + b"\r\n")
        response = raw.read_response()
    assert response is not None
    assert response.status == 400
    assert len(app.seen) == seen
    with tls_socket(proxy.port, ca) as sock:
        raw = RawClient(sock)
        raw.send(request_bytes("GET", "/h2c/good"))
        good = raw.read_response()
    assert good is not None
    assert good.status == 200
    assert dict(json.loads(good.body)["headers"])[":authority"] == "localhost"


def test_a_fragment_in_an_http11_target_is_a_400(proxy: ProxyProcess, app: H2App, ca: Path) -> None:
    """HTTP/1.1 parsers take `/a#b`; an HTTP/2 :path cannot carry a fragment (RFC 9113 §8.3.1)."""
    seen = len(app.seen)
    with tls_socket(proxy.port, ca) as sock:
        raw = RawClient(sock)
        raw.send(request_bytes("GET", "/h2c#fragment"))
        response = raw.read_response()
    assert response is not None
    assert response.status == 400
    assert len(app.seen) == seen


def test_a_content_length_the_data_contradicts_resets_the_app_stream_too(
    proxy: ProxyProcess, app: H2App, ca: Path
) -> None:
    """H2.CL in front of an h2c app: the client's stream is reset PROTOCOL_ERROR, the app's
    stream is reset (it never sees the request end), the client's other streams go on.
    Before: GOAWAY PROTOCOL_ERROR for the client's whole connection."""
    seen, resets = len(app.seen), len(app.resets)
    client = H2Client(proxy.port, ca)
    sid = client.request(
        b"/h2c/short", method=b"POST", headers=[(b"content-length", b"10")], end=False
    )
    client.pump(lambda: bool(client.remote_settings), 5)
    client.send_frames([DataFrame(sid, b"12345", flags=["END_STREAM"])])
    assert client.response(sid).reset == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert client.response(client.request(b"/after")).status == 200
    wait_for(lambda: len(app.resets) > resets, what="the app's stream reset")
    assert [r for r in app.seen[seen:] if dict(r["headers"])[":path"] == "/h2c/short"] == []
    client.close()
