"""HTTP/2 to an HTTP/1.1 app ("HTTP/2: The Sequel is Always Worse"): what a stream carries must
never become more, or other, than one HTTP/1.1 request. Raw frames in; what the app read and
what the client saw are both checked, for each HTTP/1.1 codec. A malformed request resets its
own stream, the connection's other streams are answered, and nothing is logged as a traceback.
Malformed frames end the connection with GOAWAY, counted."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from pathlib import Path

import h2.errors
import pytest
from hyperframe.frame import DataFrame, HeadersFrame

from tests.conftest import ProxyFactory
from tests.support.codecs import http2_env
from tests.support.h2client import H2Client, get
from tests.support.proxy import ProxyProcess, wait_for
from tests.support.upstream import UpstreamApp

PROTOCOL_ERROR = h2.errors.ErrorCodes.PROTOCOL_ERROR
FRAME_SIZE_ERROR = h2.errors.ErrorCodes.FRAME_SIZE_ERROR
COMPRESSION_ERROR = h2.errors.ErrorCodes.COMPRESSION_ERROR
END = ["END_HEADERS", "END_STREAM"]


@pytest.fixture(scope="module")
def codec_env(http2_codec: str) -> dict[str, str]:
    """Every test here runs once per HTTP/2 codec (with its HTTP/1.1 pair to the app)."""
    return http2_env(http2_codec)


@pytest.fixture(scope="module")
def proxy(start_proxy: ProxyFactory, upstream: UpstreamApp) -> ProxyProcess:
    upstream.record = True  # every byte the app reads, to find what must never reach it
    # The upstream timeout is longer than any wait here: a request the app waits on shows as
    # a missing answer, not as a 504.
    return start_proxy(upstream.base, "--upstream-timeout", "30s")


@pytest.fixture(autouse=True)
def no_traceback(proxy: ProxyProcess, upstream: UpstreamApp, ca: Path) -> Iterator[None]:
    malformed = upstream.malformed
    yield
    assert get(proxy.port, ca, b"/echo/after").status == 200  # other connections: served
    assert upstream.malformed == malformed, "the app read a request it could not parse"
    assert "Traceback" not in proxy.stderr_text()


def fields(
    method: bytes = b"GET",
    path: bytes = b"/echo",
    authority: bytes = b"localhost",
    extra: list[tuple[bytes, bytes]] | None = None,
) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", method),
        (b":scheme", b"https"),
        (b":authority", authority),
        (b":path", path),
        *(extra or []),
    ]


def block(client: H2Client, header_fields: list[tuple[bytes, bytes]]) -> bytes:
    return bytes(client.conn.encoder.encode(header_fields))  # the server's HPACK in step


def seen(upstream: UpstreamApp, path: bytes) -> int:
    """How many requests for exactly `path` the app read."""
    return sum(r.path == path.decode() for r in list(upstream.requests))


def good_after(client: H2Client, upstream: UpstreamApp, sid: int, path: bytes) -> None:
    """The next stream on the same connection is served: one bad stream cost only itself."""
    before = seen(upstream, path)
    client.send_frames([HeadersFrame(sid, block(client, fields(path=path)), flags=END)])
    client.pump(
        lambda: sid in {f.stream_id for f in client.raw_frames() if "END_STREAM" in f.flags}
    )
    frames = client.raw_frames()
    assert not [f for f in frames if f.type == 0x7], "GOAWAY for one malformed stream"
    assert any(f.stream_id == sid and "END_STREAM" in f.flags for f in frames)
    wait_for(lambda: seen(upstream, path) == before + 1, what="the good request at the app")


NO_AUTHORITY = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/echo/SMUGGLED")]
INJECTIONS = {
    "space in :path": fields(path=b"/echo /SMUGGLED"),
    "version in :path": fields(path=b"/SMUGGLED HTTP/1.0"),
    "tab in :path": fields(path=b"/echo\t/SMUGGLED"),
    "8-bit :path": fields(path=b"/echo/SMUGGLED\xff"),
    "fragment in :path": fields(path=b"/echo#SMUGGLED"),
    "no slash in :path": fields(path=b"SMUGGLED"),
    "asterisk for GET": fields(path=b"*", extra=[(b"x-a", b"SMUGGLED")]),
    "space in :method": fields(method=b"GET /SMUGGLED"),
    "method not a token": fields(method=b"G(E)T", path=b"/echo/SMUGGLED"),
    "space in :authority": fields(authority=b"local host", path=b"/echo/SMUGGLED"),
    "userinfo in :authority": fields(authority=b"user@localhost", path=b"/echo/SMUGGLED"),
    "port not digits": fields(authority=b"localhost:8x", path=b"/echo/SMUGGLED"),
    "empty :authority": fields(authority=b"", path=b"/echo/SMUGGLED"),
    "space in host": [*NO_AUTHORITY, (b"host", b"local host")],
    "control in a value": fields(path=b"/echo/SMUGGLED", extra=[(b"x-a", b"a\x01b")]),
    "DEL in a value": fields(path=b"/echo/SMUGGLED", extra=[(b"x-a", b"a\x7fb")]),
    "space in a name": fields(path=b"/echo/SMUGGLED", extra=[(b"x a", b"b")]),
}


@pytest.mark.parametrize("case", INJECTIONS)
def test_what_http11_cannot_carry_resets_its_stream_only(
    proxy: ProxyProcess, upstream: UpstreamApp, ca: Path, case: str
) -> None:
    """Before: `:path=/echo /SMUGGLED` reached the app as `GET /echo /SMUGGLED HTTP/1.1`
    (httptools), or ended the connection with GOAWAY INTERNAL_ERROR and a traceback (h11)."""
    client = H2Client(proxy.port, ca)
    before = len(upstream.received)
    client.send_frames([HeadersFrame(1, block(client, INJECTIONS[case]), flags=END)])
    client.pump(lambda: 1 in client.raw_resets() or client._raw_goaway() is not None)
    assert client.raw_resets() == {1: PROTOCOL_ERROR}
    good_after(client, upstream, 3, b"/echo/" + case.replace(" ", "-").encode())
    assert b"SMUGGLED" not in upstream.received[before:], "the malformed request reached the app"
    client.close()


def test_a_trailer_http11_cannot_carry_resets_its_stream(
    proxy: ProxyProcess, upstream: UpstreamApp, ca: Path
) -> None:
    client = H2Client(proxy.port, ca)
    client.send_frames(
        [
            HeadersFrame(
                1, block(client, fields(b"POST", b"/echo/trailer")), flags=["END_HEADERS"]
            ),
            DataFrame(1, b"body"),
            HeadersFrame(1, block(client, [(b"x-t", b"a\x7fb")]), flags=END),
        ]
    )
    client.pump(lambda: 1 in client.raw_resets())
    assert client.raw_resets() == {1: PROTOCOL_ERROR}
    good_after(client, upstream, 3, b"/echo/after-trailer")
    client.close()


# --- H2.CL: a Content-Length the DATA frames contradict -------------------------------------


@pytest.mark.parametrize(
    ("case", "length", "body"),
    [
        ("declared, no DATA", b"100", None),
        ("not a number", b"abc", [b"SMUGGLED"]),
        ("more DATA", b"3", [b"abcSMUGGLED"]),
        ("more DATA, in a second frame", b"3", [b"ab", b"cSMUGGLED"]),
        ("less DATA", b"10", [b"12345"]),
    ],
)
def test_a_content_length_the_data_contradicts_resets_its_stream(
    proxy: ProxyProcess,
    upstream: UpstreamApp,
    ca: Path,
    case: str,
    length: bytes,
    body: list[bytes] | None,
) -> None:
    """RFC 9113 §8.1.1: a stream error, refused at once. Before: END_STREAM with
    `content-length: 100` waited for the upstream timeout with httptools; too much or too
    little DATA ended the whole connection with GOAWAY. The app's connection is not reused
    afterwards: the next request read there would complete the short body."""
    client = H2Client(proxy.port, ca)
    path = b"/echo/cl-" + case.replace(" ", "-").replace(",", "").encode()
    before, whole = len(upstream.received), seen(upstream, path)
    head = block(client, fields(b"POST", path, extra=[(b"content-length", length)]))
    frames: list[HeadersFrame | DataFrame] = [
        HeadersFrame(1, head, flags=END if body is None else ["END_HEADERS"])
    ]
    for index, chunk in enumerate(body or []):
        last = index == len(body or []) - 1
        frames.append(DataFrame(1, chunk, flags=["END_STREAM"] if last else []))
    client.send_frames(frames)
    client.pump(lambda: 1 in client.raw_resets() or client._raw_goaway() is not None)
    assert client.raw_resets() == {1: PROTOCOL_ERROR}
    assert not [f for f in client.raw_frames() if f.stream_id == 1 and f.type == 0x1]  # no answer
    good_after(client, upstream, 3, path + b"-next")
    assert seen(upstream, path) == whole  # never read whole by the app
    assert b"SMUGGLED" not in upstream.received[before:], "DATA past Content-Length reached the app"
    client.close()


def test_conflicting_content_lengths_reset_the_stream(
    proxy: ProxyProcess, upstream: UpstreamApp, ca: Path
) -> None:
    """Before: h2 ended the connection (GOAWAY PROTOCOL_ERROR) for one stream's headers."""
    client = H2Client(proxy.port, ca)
    extra = [(b"content-length", b"3"), (b"content-length", b"4")]
    client.send_frames(
        [HeadersFrame(1, block(client, fields(b"POST", extra=extra)), flags=["END_HEADERS"])]
    )
    client.pump(lambda: 1 in client.raw_resets())
    assert client.raw_resets() == {1: PROTOCOL_ERROR}
    good_after(client, upstream, 3, b"/echo/after-conflict")
    client.close()


# --- malformed frames -----------------------------------------------------------------------


def frame(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
    """A frame as bytes, by hand: hyperframe refuses to build the malformed ones."""
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", sid)
        + payload
    )


PADDED, END_HEADERS, END_STREAM = 0x8, 0x4, 0x1


def protocol_errors(proxy: ProxyProcess) -> float:
    value = proxy.metric("tls_sidecar_http2_connection_errors_total", 'reason="protocol_error"')
    return 0.0 if math.isnan(value) else value


@pytest.mark.parametrize(
    ("case", "codes"),
    [
        ("DATA pad length past its payload", {PROTOCOL_ERROR}),
        ("HEADERS pad length past its payload", {PROTOCOL_ERROR}),
        # no room for the Pad Length field: too small (RFC 9113 §4.2; h2) or no room for the
        # padding (§6.1; nghttp2); both end the connection
        ("DATA padded but empty", {FRAME_SIZE_ERROR, PROTOCOL_ERROR}),
        ("SETTINGS of 5 bytes", {FRAME_SIZE_ERROR}),
        ("PING of 4 bytes", {FRAME_SIZE_ERROR}),
        ("WINDOW_UPDATE of 2 bytes", {FRAME_SIZE_ERROR}),
        ("RST_STREAM of 2 bytes", {FRAME_SIZE_ERROR}),
        # RFC 9113 §4.3 says COMPRESSION_ERROR (nghttp2); h2 says PROTOCOL_ERROR
        ("HPACK garbage", {PROTOCOL_ERROR, COMPRESSION_ERROR}),
    ],
)
def test_a_malformed_frame_ends_the_connection_with_goaway(
    proxy: ProxyProcess, upstream: UpstreamApp, ca: Path, case: str, codes: set[int]
) -> None:
    """RFC 9113 §4.2, §6: GOAWAY with the error's code, counted, no traceback; the proxy
    serves other connections on (checked after each)."""
    client = H2Client(proxy.port, ca)
    errors, padded = protocol_errors(proxy), seen(upstream, b"/echo/padded")
    head = block(client, fields(b"POST", b"/echo/padded"))
    raw = {
        "DATA pad length past its payload": frame(0x1, END_HEADERS, 1, head)
        + frame(0x0, PADDED | END_STREAM, 1, bytes([5]) + b"abcd"),
        "HEADERS pad length past its payload": frame(
            0x1, PADDED | END_HEADERS | END_STREAM, 1, bytes([200]) + head
        ),
        "DATA padded but empty": frame(0x1, END_HEADERS, 1, head) + frame(0x0, PADDED, 1, b""),
        "SETTINGS of 5 bytes": frame(0x4, 0, 0, b"\x00\x03\x00\x00\x00"),
        "PING of 4 bytes": frame(0x6, 0, 0, b"ping"),
        "WINDOW_UPDATE of 2 bytes": frame(0x8, 0, 0, b"\x00\x01"),
        "RST_STREAM of 2 bytes": frame(0x1, END_HEADERS, 1, head) + frame(0x3, 0, 1, b"\x00\x08"),
        "HPACK garbage": frame(0x1, END_HEADERS | END_STREAM, 1, b"\xff" * 8),
    }[case]
    client.send_raw(raw)
    assert client.wait_goaway().error_code in codes
    assert client.pump(lambda: client.closed, 10), "the connection stayed open"
    assert seen(upstream, b"/echo/padded") == padded
    wait_for(lambda: protocol_errors(proxy) > errors, what="the connection error counted")
    client.close()
