"""A request refused before it had an exchange is answered, counted and access-logged the same
way over HTTP/1.1 and HTTP/2: one `local_responses_total` sample, one `http_requests_total`
sample and one access line with the reason. An HTTP/2 stream reset for a malformed head is not
an answer: it is counted as a reset, with its reason, and still gets its access line. Each test
runs once per HTTP/2 codec, with its HTTP/1.1 pair (so once per HTTP/1.1 codec too)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h2.errors
import pytest

from tests.conftest import ProxyFactory
from tests.support.codecs import http2_env
from tests.support.h2client import H2Client
from tests.support.proxy import ProxyProcess, RawClient, request_bytes, tls_socket, wait_for
from tests.support.upstream import UpstreamApp

PROTOCOL_ERROR = h2.errors.ErrorCodes.PROTOCOL_ERROR


@pytest.fixture(scope="module")
def codec_env(http2_codec: str) -> dict[str, str]:
    return http2_env(http2_codec)


@pytest.fixture(scope="module")
def proxy(start_proxy: ProxyFactory, upstream: UpstreamApp) -> ProxyProcess:
    return start_proxy(upstream.base, "--max-header-bytes", "4KiB")


def _count(proxy: ProxyProcess, name: str, labels: str) -> float:
    """A counter's value; a series not there yet is 0."""
    value = proxy.metric(name, labels)
    return 0.0 if math.isnan(value) else value


def _records(proxy: ProxyProcess, protocol: str, local: str) -> list[dict[str, Any]]:
    return [
        r
        for r in proxy.access_records()
        if r.get("protocol") == protocol and r.get("local") == local
    ]


def _refused_alike(
    proxy: ProxyProcess, send: Callable[[], int], *, code: int, reason: str, protocol: str
) -> dict[str, Any]:
    """`send` makes one refused request and returns the status the client saw: the same
    status in the answer, the metrics and one new access line, which is returned."""
    local = f'code="{code}",reason="{reason}"'
    requests = f'code="{code}",protocol="{protocol}"'
    answered = _count(proxy, "tls_sidecar_local_responses_total", local)
    counted = _count(proxy, "tls_sidecar_http_requests_total", requests)
    lines = len(_records(proxy, protocol, reason))
    assert send() == code
    wait_for(lambda: len(_records(proxy, protocol, reason)) == lines + 1, what="an access line")
    record = _records(proxy, protocol, reason)[-1]
    assert record["status"] == code
    assert record["detail"]
    wait_for(
        lambda: _count(proxy, "tls_sidecar_local_responses_total", local) == answered + 1,
        what="the answer counted",
    )
    wait_for(
        lambda: _count(proxy, "tls_sidecar_http_requests_total", requests) == counted + 1,
        what="the request counted",
    )
    return record


def _h1(proxy: ProxyProcess, ca: Path, data: bytes) -> int:
    with tls_socket(proxy.port, ca) as sock:
        client = RawClient(sock)
        client.send(data)
        response = client.read_response()
        assert response is not None
        return response.status


def _h2(proxy: ProxyProcess, ca: Path, **request: Any) -> int:
    client = H2Client(proxy.port, ca)
    try:
        return client.response(client.request(**request)).status
    finally:
        client.close()


BIG = "x" * 6000  # past --max-header-bytes 4KiB


def test_an_oversized_head_over_http11_is_refused_counted_and_logged(
    proxy: ProxyProcess, ca: Path
) -> None:
    data = request_bytes("GET", "/echo/big", {"x-big": BIG})
    _refused_alike(
        proxy,
        lambda: _h1(proxy, ca, data),
        code=431,
        reason="header_too_large",
        protocol="http/1.1",
    )


def test_an_oversized_head_over_http2_is_refused_counted_and_logged(
    proxy: ProxyProcess, ca: Path
) -> None:
    """Before: answered 431 and counted in local_responses_total, but no access line and no
    http_requests_total sample."""
    _refused_alike(
        proxy,
        lambda: _h2(proxy, ca, path=b"/echo/big", headers=[(b"x-big", BIG.encode())]),
        code=431,
        reason="header_too_large",
        protocol="h2",
    )


def test_connect_over_http11_is_405_counted_and_logged(proxy: ProxyProcess, ca: Path) -> None:
    data = b"CONNECT localhost:443 HTTP/1.1\r\nHost: localhost:443\r\n\r\n"
    _refused_alike(
        proxy,
        lambda: _h1(proxy, ca, data),
        code=405,
        reason="method_not_allowed",
        protocol="http/1.1",
    )


def test_connect_over_http2_is_405_counted_and_logged(proxy: ProxyProcess, ca: Path) -> None:
    """Before: answered 405 without an access line or an http_requests_total sample."""
    fields = [(b":method", b"CONNECT"), (b":authority", b"localhost:443")]
    _refused_alike(
        proxy,
        lambda: _h2(proxy, ca, fields=fields),
        code=405,
        reason="method_not_allowed",
        protocol="h2",
    )


def test_a_malformed_http11_head_is_400_counted_and_logged(proxy: ProxyProcess, ca: Path) -> None:
    data = (
        b"GET /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
    )
    _refused_alike(
        proxy, lambda: _h1(proxy, ca, data), code=400, reason="bad_request", protocol="http/1.1"
    )


def test_a_malformed_http2_head_is_a_reset_counted_as_one_and_logged(
    proxy: ProxyProcess, ca: Path
) -> None:
    """A head HTTP/1.1 cannot carry resets its stream (PROTOCOL_ERROR): the client sees no
    status, so none is counted. Before: counted as local_responses_total{code="400"}, with no
    access line."""
    resets = 'reason="malformed"'
    before_400 = _count(proxy, "tls_sidecar_local_responses_total", 'code="400",reason="malformed"')
    before_resets = _count(proxy, "tls_sidecar_http2_stream_resets_total", resets)
    lines = len(_records(proxy, "h2", "malformed"))
    client = H2Client(proxy.port, ca, validate=False)
    try:
        sid = client.request(b"/echo/malformed", headers=[(b"connection", b"keep-alive")])
        client.pump(lambda: sid in client.raw_resets())
        assert client.raw_resets() == {sid: PROTOCOL_ERROR}
    finally:
        client.close()
    wait_for(lambda: len(_records(proxy, "h2", "malformed")) == lines + 1, what="an access line")
    record = _records(proxy, "h2", "malformed")[-1]
    assert record["event"] == "stream_reset"
    assert record["status"] == 0  # no answer: the stream was reset
    assert "connection" in record["detail"]
    wait_for(
        lambda: _count(proxy, "tls_sidecar_http2_stream_resets_total", resets) == before_resets + 1,
        what="the reset counted",
    )
    after_400 = _count(proxy, "tls_sidecar_local_responses_total", 'code="400",reason="malformed"')
    assert after_400 == before_400
