"""Differential: the same bytes through both HTTP/1.1 codecs are accepted or refused alike.

Hypothesis builds request streams (heads, bodies in either framing, pipelined requests, and the
nasty bytes of the smuggling corpus); each is fed to the httptools and the h11 server codec, whole
and in random pieces. Both must deliver the same requests (method, target, headers, body) before
the same outcome: a refusal, or waiting for more. Where the parsers themselves differ, the
checks in request.read_head (and the codecs) make the proxy refuse.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.core.headers import ClientInfo
from proxy.core.request import BadRequest, RequestHead, upstream_request
from proxy.http1.codec import ServerCodec
from proxy.http1.h11_codec import H11Server
from proxy.http1.httptools_server import HttptoolsServer

CLIENT = ClientInfo("192.0.2.1", 8443)

EXAMPLES = int(os.environ.get("TLS_SIDECAR_FUZZ_EXAMPLES", "300")) * 4


@dataclass
class Recorder:
    """A RequestSink that decides on each head as the exchange does (request.upstream_request),
    then answers an admitted request with an empty 204, or refuses and stops, as the proxy does."""

    codec: ServerCodec | None = None
    refused: int = 0
    requests: list[tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]], bytes]] = field(
        default_factory=list
    )
    body: bytearray = field(default_factory=bytearray)
    head: RequestHead | None = None

    def on_request_head(self, head: RequestHead) -> None:
        self.head = head
        self.body = bytearray()
        decision = upstream_request(
            head,
            CLIENT,
            trust_forwarded=False,
            request_id=b"id",
            upstream_host=b"app",
            max_header_bytes=16384,
            max_body_bytes=None,
            allowed_upgrades=frozenset({b"websocket"}),
            xfcc=None,
        )
        if isinstance(decision, BadRequest):
            assert self.codec is not None
            self.refused = decision.status
            self.codec.local_response(decision.status, [], b"")

    def on_request_data(self, data: bytes) -> None:
        self.body += data

    def on_request_end(self) -> None:
        head = self.head
        assert head is not None and self.codec is not None
        self.requests.append(
            (head.method, head.target, head.version, list(head.headers), bytes(self.body))
        )
        codec = self.codec
        codec.response_head(204, b"No Content", [], None)
        codec.response_end()
        codec.next_cycle()


def run(
    codec_class: type[HttptoolsServer] | type[H11Server], pieces: list[bytes]
) -> tuple[object, ...]:
    recorder = Recorder()
    codec = codec_class(recorder, 16384)
    recorder.codec = codec
    outcome: object = "more"
    try:
        for piece in pieces:
            codec.feed(piece)
    except BadRequest:
        outcome = "refused"
    if recorder.refused:
        outcome = "refused"
    # What follows the last delivered request is refused, or waited on (for a header timeout)
    # by a codec that cannot tell yet: either way nothing more is served. And a request with
    # several faults may be named by another first: what must agree is what is delivered.
    return (*recorder.requests, "not served" if outcome in ("more", "refused") else outcome)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a]


nasty = st.sampled_from(
    [b"\r", b"\n", b"\x00", b":", b" ", b"\t", b",", b"\x7f", b"\xff", b"\x0b", b"chunked"]
)
method = st.one_of(
    st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"BREW", b"get", b"G ET"]),
    st.binary(min_size=1, max_size=5),
)
target = st.one_of(
    st.sampled_from([b"/a", b"/a?b=c", b"*", b"http://h/x", b"h:1", b"/a b", b"/%00"]),
    st.builds(lambda a, n: b"/" + a + n, st.binary(max_size=6), nasty),
)
version = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"http/1.1"])
name = st.one_of(
    st.sampled_from(
        [b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Upgrade", b"X-A"]
    ),
    st.builds(lambda a, n: a + n, st.binary(min_size=1, max_size=4), nasty),
)
value = st.one_of(
    st.sampled_from(
        [b"x", b"chunked", b"5", b"0", b"+5", b"5, 5", b"close", b"upgrade", b"websocket", b""]
    ),
    st.builds(lambda a, n, b: a + n + b, st.binary(max_size=4), nasty, st.binary(max_size=4)),
)
chunked_body = st.lists(st.binary(min_size=1, max_size=12), max_size=3).map(
    lambda chunks: b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
)
body = st.one_of(
    st.just(b""),
    st.binary(max_size=16),
    chunked_body,
    st.sampled_from(
        [
            b"ffffffffffffffffff5\r\nhello\r\n0\r\n\r\n",
            b"10000000000000000\r\nx\r\n",
            b"000000000000000000005\r\nhello\r\n0\r\n\r\n",
            b"5;ext=1\r\nhello\r\n0\r\n\r\n",
            b"5\nhello\n0\n\n",
            b"0\r\nTrailer: x\r\n\r\n",
        ]
    ),
)


@st.composite
def request(draw: st.DrawFn) -> bytes:
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"]))
    lines = [draw(method) + b" " + draw(target) + b" " + draw(version)]
    if draw(st.booleans()):
        lines.append(b"Host: h")
    for _ in range(draw(st.integers(0, 4))):
        lines.append(draw(name) + draw(st.sampled_from([b": ", b":", b" : "])) + draw(value))
    return eol.join(lines) + eol + eol + draw(body)


def _valid(method: bytes, path: bytes, extra: bytes = b"", payload: bytes = b"") -> bytes:
    return method + b" " + path + b" HTTP/1.1\r\nHost: h\r\n" + extra + b"\r\n" + payload


@settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
)
@given(st.lists(request(), min_size=1, max_size=3), st.lists(st.integers(0, 400), max_size=4))
@example([_valid(b"GET", b"/a") + _valid(b"BREW", b"/b")], [])
@example([b"GET /a HTTP/1.0\r\nContent-Length: 5, 5\r\n\r\nGET /a HTTP/1.1\r\n\r\n"], [])
@example([b"GET /a HTTP/1.1\r\nHost: \r\n\n\r\n\r\n"], [])
@example(
    [
        _valid(
            b"POST",
            b"/a",
            b"Transfer-Encoding: chunked\r\n",
            b"0" * 21 + b"5\r\nhello\r\n0\r\n\r\n",
        )
    ],
    [60, 70],
)
@example([b"GET /a HTTP/1.1\r\nHost: h\r\n :: x\r\n\r\n"], [])
@example(
    [
        _valid(
            b"POST", b"/a", b"Transfer-Encoding: chunked\r\n", b"ffffffffffffffffff5\r\nhello\r\n"
        )
    ],
    [],
)
@example([_valid(b"GET", b"/a", b"Connection: close\r\n") + _valid(b"GET", b"/b")], [])
@example(
    [_valid(b"POST", b"/a", b"Content-Length: 10\r\n", b"0123456789") + _valid(b"GET", b"/b")],
    [3, 30, 60],
)
def test_both_codecs_deliver_the_same_requests_or_refuse(
    stream: list[bytes], cuts: list[int]
) -> None:
    data = b"".join(stream)
    whole = run(HttptoolsServer, [data])
    assert run(H11Server, [data]) == whole, data
    pieces = split(data, cuts)
    in_pieces = run(HttptoolsServer, pieces)
    assert run(H11Server, pieces) == in_pieces, (data, pieces)
    assert in_pieces == whole, (data, pieces)  # how the bytes are cut into reads changes nothing


def test_known_cases_agree() -> None:
    """The cases issue reports named, as plain assertions (refused, or what is delivered)."""
    overflow = _valid(
        b"POST", b"/a", b"Transfer-Encoding: chunked\r\n", b"ffffffffffffffffff5\r\nhello\r\n"
    )
    after_close = _valid(b"GET", b"/a", b"Connection: close\r\n") + _valid(b"GET", b"/b")
    for codec in (HttptoolsServer, H11Server):
        assert run(codec, [overflow]) == ("not served",)
        delivered = run(codec, [after_close])
        assert [r[1] for r in delivered[:-1] if isinstance(r, tuple)] == [b"/a"], (
            "only the request before close"
        )
        assert delivered[-1] == "not served"
