"""Hypothesis over raw request bytes sent through TLS: whatever arrives, the proxy answers with a
2xx from the app, a 4xx (or 505) of its own, or closes; the app never sees two requests for one.

Bounded in CI (TLS_SIDECAR_FUZZ_EXAMPLES, default 200); `make fuzz` runs thousands.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ProxyFactory
from tests.support.proxy import ProxyProcess, RawClient, https, tls_socket
from tests.support.upstream import UpstreamApp

EXAMPLES = int(os.environ.get("TLS_SIDECAR_FUZZ_EXAMPLES", "200"))

nasty = st.sampled_from(
    [b"\r", b"\n", b"\x00", b":", b" ", b"\t", b",", b"\x7f", b"\xff", b"chunked", b"0"]
)
token = st.one_of(
    st.sampled_from(
        [b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"DELETE", b"get", b"G ET", b""]
    ),
    st.binary(max_size=8),
)
target = st.one_of(
    st.sampled_from(
        [b"/echo/fuzz", b"/echo/fuzz?a=b", b"*", b"http://h/echo/fuzz", b"h:1", b"", b"/a b"]
    ),
    st.builds(lambda a, b: b"/echo/" + a + b, st.binary(max_size=10), nasty),
)
version = st.sampled_from(
    [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 ", b"http/1.1", b"HTTP/1.x", b""]
)
header_name = st.one_of(
    st.sampled_from(
        [
            b"Host",
            b"Content-Length",
            b"Transfer-Encoding",
            b"Connection",
            b"Expect",
            b"Upgrade",
            b"X-A",
        ]
    ),
    st.binary(min_size=0, max_size=6),
)
header_value = st.one_of(
    st.sampled_from(
        [b"localhost", b"chunked", b"5", b"-1", b"5, 6", b"close", b"upgrade", b"100-continue", b""]
    ),
    st.builds(lambda a, n, b: a + n + b, st.binary(max_size=6), nasty, st.binary(max_size=6)),
)
eol = st.sampled_from([b"\r\n", b"\n", b"\r"])
body = st.one_of(
    st.just(b""),
    st.binary(max_size=40),
    st.sampled_from([b"5\r\nhello\r\n0\r\n\r\n", b"0\r\n\r\n", b"zz\r\n"]),
)


@st.composite
def raw_request(draw: st.DrawFn) -> bytes:
    line_end = draw(eol)
    lines = [draw(token) + b" " + draw(target) + b" " + draw(version)]
    if draw(st.booleans()):
        lines.append(b"Host: localhost")
    lines += [
        draw(header_name) + draw(st.sampled_from([b": ", b":", b" : "])) + draw(header_value)
        for _ in range(draw(st.integers(0, 5)))
    ]
    return line_end.join(lines) + line_end + line_end + draw(body)


def send(port: int, ca: Path, data: bytes) -> list[int]:
    statuses: list[int] = []
    with tls_socket(port, ca) as sock:
        sock.sendall(data)
        sock.settimeout(2)
        client = RawClient(sock)
        try:
            response = client.read_response()
        except (TimeoutError, ssl.SSLError, OSError):
            response = None
        if response is not None:
            statuses.append(response.status)
    return statuses


@pytest.fixture(scope="module")
def quick(start_proxy: ProxyFactory, upstream: UpstreamApp) -> ProxyProcess:
    """Short timeouts: incomplete requests are answered (408) or cut in a tenth of a second."""
    return start_proxy(
        upstream.base, "--header-timeout", "100ms", "--idle-timeout", "100ms", "--no-access-log"
    )


def test_fuzzed_requests_never_get_through_twice_or_break_the_proxy(
    quick: ProxyProcess, upstream: UpstreamApp, ca: Path
) -> None:
    proxy = quick

    @settings(
        max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    @given(raw_request())
    def check(data: bytes) -> None:
        before = upstream.count()
        statuses = send(proxy.port, ca, data)
        assert upstream.count() - before <= 1, data
        for status in statuses:
            assert 200 <= status < 300 or 400 <= status < 500 or status == 505, (status, data)

    check()
    assert https(proxy, ca, path="/echo/after-fuzz")[0] == 200
    assert "unexpected error" not in proxy.stderr_text(), (
        "no request reached an unhandled exception"
    )
