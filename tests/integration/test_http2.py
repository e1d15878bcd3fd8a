"""HTTP/2 to clients: real clients (curl, httpx, h2load) and the h2 library's own frames,
through the proxy to an HTTP/1.1 app. Each stream is one exchange: the same headers, limits,
errors and access log as HTTP/1.1."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import ssl
import subprocess
from pathlib import Path

import h2.errors
import h2.settings
import httpx
import pytest
from hyperframe.frame import GoAwayFrame, HeadersFrame

from tests.conftest import ProxyFactory
from tests.support.codecs import http2_env
from tests.support.h2client import H2Client
from tests.support.proxy import ProxyProcess, wait_for
from tests.support.upstream import UpstreamApp, pattern


@pytest.fixture(scope="module")
def codec_env(http2_codec: str) -> dict[str, str]:
    """Every test here runs once per HTTP/2 codec (with its HTTP/1.1 pair to the app)."""
    return http2_env(http2_codec)


@pytest.fixture(scope="module")
def proxy(start_proxy: ProxyFactory, upstream: UpstreamApp) -> ProxyProcess:
    return start_proxy(upstream.base, "--upstream-timeout", "2s", "--max-body-bytes", "8MiB")


def url(proxy: ProxyProcess, path: str = "/") -> str:
    return f"https://localhost:{proxy.port}{path}"


def curl_http2(ca: Path, target: str, *extra: str) -> str:
    """curl offering HTTP/2; its output ends with the HTTP version it used."""
    return subprocess.run(
        ["curl", "-sS", "--http2", "--cacert", str(ca), *extra, "-w", "\n%{http_version}", target],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout


def test_curl_speaks_http2(proxy: ProxyProcess, ca: Path) -> None:
    body, version = curl_http2(ca, url(proxy, "/echo")).rsplit("\n", 1)
    assert version == "2"
    assert json.loads(body)["path"] == "/echo"


def test_http2_off_offers_only_http11(
    start_proxy: ProxyFactory, upstream: UpstreamApp, ca: Path
) -> None:
    plain = start_proxy(upstream.base, "--no-http2")
    assert curl_http2(ca, url(plain), "-o", "/dev/null").strip() == "1.1"


def test_httpx_bodies_both_ways(proxy: ProxyProcess, ca: Path) -> None:
    body = pattern(3 * 1024 * 1024 + 17)
    with httpx.Client(
        http2=True, verify=ssl.create_default_context(cafile=ca), timeout=30
    ) as client:
        r = client.post(url(proxy, "/echo"), content=body)
        assert r.http_version == "HTTP/2"
        doc = r.json()
        assert doc["body_length"] == len(body)
        assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()
        # A streamed upload of unknown length reaches an HTTP/1.1 app chunked.
        r = client.post(url(proxy, "/echo"), content=iter([body[:100_000], body[100_000:]]))
        assert r.json()["body_length"] == len(body)
        assert ["transfer-encoding", "chunked"] in r.json()["headers"]
        big = client.get(url(proxy, "/bytes/5000000"))
        assert big.content == pattern(5_000_000)
        chunked = client.get(url(proxy, "/chunked/1000000"))
        assert chunked.content == pattern(1_000_000)


def test_the_app_gets_what_an_http11_client_would_send(proxy: ProxyProcess, ca: Path) -> None:
    client = H2Client(proxy.port, ca)
    sid = client.request(
        b"/echo?q=1",
        headers=[
            (b"cookie", b"a=1"),
            (b"cookie", b"b=2"),
            (b"x-forwarded-for", b"203.0.113.9"),
            (b"x-request-id", b"trace-me-42"),
            (b"te", b"trailers"),
        ],
    )
    response = client.response(sid)
    client.close()
    assert response.status == 200
    doc = json.loads(response.body)
    headers = doc["headers"]
    names = [n for n, _ in headers]
    assert doc["path"] == "/echo?q=1"
    assert ["host", "localhost"] in headers  # :authority became Host, first
    assert names[0] == "host"
    assert ["cookie", "a=1; b=2"] in headers  # RFC 9113 §8.2.3: cookies joined for HTTP/1.1
    assert ["x-forwarded-for", "127.0.0.1"] in headers  # the client's own is not trusted
    assert ["x-forwarded-proto", "https"] in headers
    assert ["x-request-id", "trace-me-42"] in headers
    assert "te" not in names and not any(n.startswith(":") for n in names)


@pytest.mark.parametrize(
    "fields",
    [
        [(b"Upper", b"x")],
        [(b"connection", b"keep-alive")],
        [(b"transfer-encoding", b"chunked")],
        [(b"te", b"gzip")],
        [(b"x-bad", b"a\r\nx-injected: 1")],
        [(b"host", b"other.example")],
    ],
    ids=[
        "uppercase-name",
        "connection",
        "transfer-encoding",
        "te-not-trailers",
        "crlf-value",
        "host-differs",
    ],
)
def test_a_malformed_request_resets_its_stream_only(
    proxy: ProxyProcess, upstream: UpstreamApp, ca: Path, fields: list[tuple[bytes, bytes]]
) -> None:
    before = upstream.count("/malformed")
    client = H2Client(proxy.port, ca, validate=False)
    bad = client.request(b"/malformed", headers=fields)
    assert client.response(bad).reset == h2.errors.ErrorCodes.PROTOCOL_ERROR
    good = client.request(b"/echo")  # the same connection goes on
    assert client.response(good).status == 200
    client.close()
    assert upstream.count("/malformed") == before  # the app never saw it


@pytest.mark.parametrize(
    "fields",
    [
        [(b":method", b"GET"), (b":scheme", b"https"), (b"x-a", b"1"), (b":path", b"/")],
        [(b":method", b"GET"), (b":scheme", b"https")],
        [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":path", b"/")],
        [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":status", b"200")],
        [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"")],
    ],
    ids=["pseudo-after-field", "no-path", "repeated-path", "response-pseudo", "empty-path"],
)
def test_bad_pseudo_headers_reset_the_stream(
    proxy: ProxyProcess, ca: Path, fields: list[tuple[bytes, bytes]]
) -> None:
    client = H2Client(proxy.port, ca, validate=False)
    sid = client.request(fields=fields)
    assert client.response(sid).reset == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert client.goaway is None
    client.close()


def test_limits_and_errors_are_answered_per_stream(proxy: ProxyProcess, ca: Path) -> None:
    client = H2Client(proxy.port, ca)
    big = client.request(
        b"/echo",
        method=b"POST",
        headers=[(b"content-length", b"%d" % (9 * 1024 * 1024))],
        end=False,
    )
    slow = client.request(b"/slow/5")
    ok = client.request(b"/echo")
    assert client.response(ok).status == 200
    too_big = client.response(big)
    assert too_big.status == 413
    timed_out = client.response(slow, timeout=15)
    assert timed_out.status == 504
    assert timed_out.body.startswith(b"504 Gateway Timeout: request id")
    assert client.goaway is None  # the connection survived all three
    client.close()


def test_access_log_and_metrics_carry_the_protocol(proxy: ProxyProcess, ca: Path) -> None:
    client = H2Client(proxy.port, ca)
    assert client.response(client.request(b"/echo?h2-log")).status == 200
    client.close()
    record = wait_for(
        lambda: next((r for r in proxy.access_records() if r["path"] == "/echo?h2-log"), None),
        what="the access line",
    )
    assert record["protocol"] == "h2"
    assert (
        proxy.metric("tls_sidecar_http_requests_total", 'code="200",method="GET",protocol="h2"')
        >= 1
    )


def test_response_flow_control_respects_a_small_client_window(
    proxy: ProxyProcess, ca: Path
) -> None:
    """A client advertising a 1 KiB window still gets the whole body, in window-sized steps."""
    client = H2Client(proxy.port, ca, settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1024})
    sid = client.request(b"/bytes/300000")
    response = client.response(sid, timeout=30)
    client.close()
    assert bytes(response.body) == pattern(300000)


def test_a_client_goaway_lets_the_streams_under_way_finish(proxy: ProxyProcess, ca: Path) -> None:
    """A client saying GOAWAY (NO_ERROR) right after a response's head, as the AWS SDK's
    HTTP/2 handler does, still gets the whole body (RFC 9113 §6.8); a stream it opens after
    its GOAWAY is refused; then the proxy says GOAWAY too and closes."""
    client = H2Client(proxy.port, ca, settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1024})
    sid = client.request(b"/bytes/300000")
    assert client.pump(lambda: client.responses[sid].status == 200)
    goaway = GoAwayFrame(0)
    goaway.last_stream_id = 0
    goaway.error_code = h2.errors.ErrorCodes.NO_ERROR
    client.send_frames([goaway])  # past the client's own h2, which would stop reading
    late = client.request(b"/echo/late")
    response = client.response(sid, timeout=30)
    assert bytes(response.body) == pattern(300000) and response.ended
    assert client.response(late).reset == h2.errors.ErrorCodes.REFUSED_STREAM
    assert client.pump(lambda: client.closed, 10), "the proxy kept the connection open"
    assert client.wait_goaway(1).error_code == h2.errors.ErrorCodes.NO_ERROR
    client.close()


def test_h2load_multiplexed(proxy: ProxyProcess, ca: Path) -> None:
    if shutil.which("h2load") is None:
        pytest.fail("h2load is missing: apt-get install -y nghttp2-client")
    out = subprocess.run(
        ["h2load", "-n", "2000", "-c", "4", "-m", "10", url(proxy, "/bytes/100")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "Application protocol: h2" in out
    assert "2000 succeeded, 0 failed, 0 errored" in out


def test_drain_says_goaway_twice_and_finishes_the_streams_in_flight(
    start_proxy: ProxyFactory, upstream: UpstreamApp, ca: Path
) -> None:
    """On SIGTERM: GOAWAY with the largest stream id (streams already sent still count), a
    PING, then GOAWAY with the last stream taken; the stream in flight is answered in full and
    the proxy exits 0."""
    draining = start_proxy(upstream.base, "--drain-timeout", "10s")
    client = H2Client(draining.port, ca)
    gate = f"drain-h2-{draining.port}"
    sid = client.request(f"/gate/{gate}".encode())
    client.pump(lambda: client.responses[sid].status == 200, 10)  # the head came: in flight
    draining.signal(signal.SIGTERM)
    assert client.pump(
        lambda: len([f for f in client.raw_frames() if isinstance(f, GoAwayFrame)]) >= 2, 10
    ), "no second GOAWAY"
    goaways = [f for f in client.raw_frames() if isinstance(f, GoAwayFrame)]
    assert [(g.last_stream_id, g.error_code) for g in goaways] == [(2**31 - 1, 0), (sid, 0)]
    upstream.open_gate(gate)
    assert client.pump(lambda: client.raw_body(sid)[1], 10), "the stream in flight did not end"
    assert client.raw_body(sid) == (b"first;last", True)
    client.close()
    assert draining.wait(15) == 0


def test_a_stream_opened_after_the_final_goaway_is_refused(
    start_proxy: ProxyFactory, upstream: UpstreamApp, ca: Path
) -> None:
    """Past the last stream id our final GOAWAY promised, a new stream gets REFUSED_STREAM (so
    the client knows at once to retry it elsewhere), the same on both codecs; the stream in
    flight is still answered. Before: nghttp2 ignored it without a word."""
    draining = start_proxy(upstream.base, "--drain-timeout", "10s")
    client = H2Client(draining.port, ca)
    gate = f"late-h2-{draining.port}"
    sid = client.request(f"/gate/{gate}".encode())
    client.pump(lambda: client.responses[sid].status == 200, 10)  # the head came: in flight
    draining.signal(signal.SIGTERM)
    assert client.pump(
        lambda: len([f for f in client.raw_frames() if isinstance(f, GoAwayFrame)]) >= 2, 10
    ), "no second GOAWAY"
    late = sid + 2
    fields = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"localhost")]
    block = bytes(client.conn.encoder.encode([*fields, (b":path", b"/echo")]))
    client.send_frames([HeadersFrame(late, block, flags=["END_HEADERS", "END_STREAM"])])
    assert client.pump(lambda: late in client.raw_resets(), 10), "the late stream got no answer"
    assert client.raw_resets()[late] == h2.errors.ErrorCodes.REFUSED_STREAM
    upstream.open_gate(gate)
    assert client.pump(lambda: client.raw_body(sid)[1], 10), "the stream in flight did not end"
    client.close()
    assert draining.wait(15) == 0
