"""Differential: the same bytes through both HTTP/1.1 codecs are accepted or refused alike.

Hypothesis builds request streams (heads, bodies in either framing, pipelined requests, and the
nasty bytes of the smuggling corpus); each is fed to the httptools and the h11 server codec, whole
and in random pieces. Both must deliver the same requests (method, target, headers, body) before
the same outcome: a refusal, or waiting for more (one known, benign difference: see `agreed`). Where the parsers themselves differ, the
checks in request.read_head (and the codecs) make the proxy refuse.

On the response side the two client codecs get an app's answer followed by what an app might
send after it: both hand on the answer and nothing more, and neither lets the connection carry
another request when anything followed.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.core.headers import ClientInfo
from proxy.core.request import BadRequest, RequestHead, upstream_request
from proxy.http1.codec import ServerCodec
from proxy.http1.h11_codec import H11Client, H11Server
from proxy.http1.httptools_client import HttptoolsClient
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
    # The requests delivered, then "refused" or "more" (waiting for the rest). A request with
    # several faults may be named by another first: the status is not compared.
    return (*recorder.requests, outcome)


# The head's end, given to a codec still waiting for it (see `agreed`).
HEAD_END = b"\r\n\r\n"


def agreed(pieces: list[bytes]) -> tuple[object, ...]:
    """What both codecs make of `pieces`, which must be the same.

    One difference is known and benign: a head that is not complete yet may be refused at once by
    one codec (h11 knows a bad request line early, llhttp a bare LF) while the other waits for its
    end; either way nothing is served. The waiting one must then refuse it once the head is
    complete: both are fed the head's end and compared again."""
    httptools, h11 = run(HttptoolsServer, pieces), run(H11Server, pieces)
    if httptools != h11 and httptools[:-1] == h11[:-1]:
        assert {httptools[-1], h11[-1]} == {"more", "refused"}, (httptools, h11)
        httptools = run(HttptoolsServer, [*pieces, HEAD_END])
        h11 = run(H11Server, [*pieces, HEAD_END])
    assert h11 == httptools, pieces
    return httptools


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
@example([b"GET /a HTTP/1.1\r\nHost: h\r\nConnection: ! \r\n\r\n"], [])  # trailing OWS
@example([b"GET /a HTTP/1.1\r\nHOST: h\r\nX-Mixed-Case: v \t\r\nX-B: \t\r\n\r\n"], [])
@example([b"GET /a HTTP/1.1\r\nHost: h\r\n*:: \r\n\r\n"], [])
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
    whole = agreed([data])
    pieces = split(data, cuts)
    in_pieces = agreed(pieces)
    assert in_pieces == whole, (data, pieces)  # how the bytes are cut into reads changes nothing


def test_known_cases_agree() -> None:
    """The cases issue reports named, as plain assertions (refused, or what is delivered)."""
    overflow = _valid(
        b"POST", b"/a", b"Transfer-Encoding: chunked\r\n", b"ffffffffffffffffff5\r\nhello\r\n"
    )
    after_close = _valid(b"GET", b"/a", b"Connection: close\r\n") + _valid(b"GET", b"/b")
    for codec in (HttptoolsServer, H11Server):
        assert run(codec, [overflow]) == ("refused",)
        delivered = run(codec, [after_close])
        assert [r[1] for r in delivered[:-1] if isinstance(r, tuple)] == [b"/a"], (
            "only the request before close"
        )
        assert delivered[-1] == "more", "what follows close is ignored, not refused"
    # The known difference (see `agreed`): refused early by one, at the head's end by the other.
    for partial in (b"\x00GET /a HTTP/1.1\r\n", b"GET /a HTTP/1.1\r\nHost: h\r\nX: a\nb"):
        assert {run(HttptoolsServer, [partial])[-1], run(H11Server, [partial])[-1]} == {
            "more",
            "refused",
        }
        assert agreed([partial]) == ("refused",)


# --- the response side: the two client codecs, and what an app sends after its response --------


@dataclass
class ResponseRecorder:
    """A ResponseSink noting what a client codec hands on: the head, the body, the end."""

    status: int = 0
    body: bytearray = field(default_factory=bytearray)
    ends: int = 0
    malformed: bool = False
    heads: int = 0

    def response_head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], length: int | None
    ) -> None:
        self.status = status
        self.heads += 1

    def response_informational(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        pass

    def response_data(self, data: bytes) -> None:
        self.body += data

    def response_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        pass

    def response_end(self) -> None:
        self.ends += 1

    def response_malformed(self, message: str) -> None:
        self.malformed = True


def run_client(
    codec_class: type[HttptoolsClient] | type[H11Client], method: bytes, pieces: list[bytes]
) -> tuple[object, ...]:
    """One request's answer through a client codec: what was handed on, and whether the
    connection may carry the next request."""
    codec = codec_class()
    codec.request_head(method, b"/", [(b"host", b"app")], chunked=False)
    codec.request_end()
    sink = ResponseRecorder()
    for piece in pieces:
        codec.feed(piece, sink)
    return (sink.heads, sink.status, bytes(sink.body), sink.ends, sink.malformed, codec.recycle())


INJECTED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Injected: INJECTED\r\n\r\nINJECTED"


@st.composite
def answer(draw: st.DrawFn) -> tuple[bytes, bytes, bytes]:
    """(request method, a whole response, its body as the client must get it)."""
    method = draw(st.sampled_from([b"GET", b"HEAD"]))
    status = draw(st.sampled_from([200, 201, 204, 304, 404]))
    payload = draw(st.binary(max_size=20))
    head = b"HTTP/1.1 %d X\r\n" % status
    if status in (204, 304):
        return method, head + b"\r\n", b""
    if draw(st.booleans()):
        head += b"Content-Length: %d\r\n\r\n" % len(payload)
        body = payload
    else:
        head += b"Transfer-Encoding: chunked\r\n\r\n"
        body = (b"%x\r\n%s\r\n" % (len(payload), payload) if payload else b"") + b"0\r\n\r\n"
    if method == b"HEAD":
        return method, head, b""
    return method, head + body, payload


after = st.sampled_from(
    [b"", INJECTED, b"H", b"HTTP/1.1 200 OK\r\n", b"garbage\r\n\r\n", b"\x00", b"0\r\n\r\n"]
)


@settings(
    max_examples=EXAMPLES // 4,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
@given(answer(), after, st.lists(st.integers(0, 200), max_size=3))
@example((b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello"), INJECTED, [])
@example((b"GET", b"HTTP/1.1 204 No Content\r\n\r\n", b""), INJECTED, [])
@example((b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b""), INJECTED, [])
def test_both_client_codecs_hand_on_the_response_and_nothing_after_it(
    response: tuple[bytes, bytes, bytes], extra: bytes, cuts: list[int]
) -> None:
    """An app's bytes after its response (a second answer nobody asked for, garbage, a lone
    byte) are handed to no one, and the connection is not used again; without them it is."""
    method, data, body = response
    status = int(data[9:12])
    # A HEAD answer comes in one read: one whose last read starts at a line end is closed by the
    # httptools codec to be safe (it cannot see where llhttp stopped), which h11 need not do.
    pieces = split(data, cuts) if method != b"HEAD" else [data]
    if extra:
        pieces.append(extra)
    expected = (1, status, body, 1, False, not extra)
    assert run_client(HttptoolsClient, method, pieces) == expected, pieces
    assert run_client(H11Client, method, pieces) == expected, pieces
    together = [*pieces[:-2], pieces[-2] + pieces[-1]] if extra else pieces  # in the same read
    assert run_client(HttptoolsClient, method, together) == expected, together
    assert run_client(H11Client, method, together) == expected, together


def test_an_answer_after_a_head_answer_split_in_its_blank_line_is_not_pooled() -> None:
    """The HEAD answer's blank line split across reads, an injected answer right after it."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    for cut in (1, 2, 3):
        pieces = [head[:-cut], head[-cut:] + b"HTTP/1.1 204 X\r\n\r\n"]
        for codec in (HttptoolsClient, H11Client):
            assert run_client(codec, b"HEAD", pieces) == (1, 200, b"", 1, False, False), cut


def test_a_line_end_after_a_response_is_the_known_difference() -> None:
    """llhttp skips empty lines between messages (RFC 9112 §2.2 lets a recipient), so a CRLF
    after a response leaves the httptools connection usable; h11 keeps it and the proxy closes
    the connection. Either way the CRLF reaches no client."""
    pieces = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\r\n"]
    assert run_client(HttptoolsClient, b"GET", pieces) == (1, 200, b"ok", 1, False, True)
    assert run_client(H11Client, b"GET", pieces) == (1, 200, b"ok", 1, False, False)


def test_a_pooled_connection_keeps_nothing_of_the_exchange_it_served() -> None:
    """An idle app connection waits in the pool for minutes: its codec lets go of the last
    exchange (and through it the client's connection or stream), not the next request."""
    for codec_class in (HttptoolsClient, H11Client):
        codec = codec_class()
        codec.request_head(b"GET", b"/", [(b"host", b"app")], chunked=False)
        codec.request_end()
        sink = ResponseRecorder()
        codec.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", sink)
        assert sink.ends == 1 and codec.recycle(), codec_class
        gone = weakref.ref(sink)
        del sink
        assert gone() is None, f"{codec_class.__name__} still holds the exchange it served"


def test_both_client_codecs_frame_a_body_of_unknown_length_as_chunked_themselves() -> None:
    """The core hands on no framing: a request without a Content-Length reaches an HTTP/1.1
    app chunked because the client codec decides so, and one with a length is sent as is."""
    headers = [(b"host", b"app")]
    for codec in (H11Client(), HttptoolsClient()):
        head = codec.request_head(b"POST", b"/up", headers, chunked=True)
        wire = head + b"".join(codec.request_data(b"abc")) + codec.request_end()
        assert wire.lower().startswith(b"post /up http/1.1\r\nhost: app\r\n"), (codec, wire)
        assert b"transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n" in wire.lower(), codec
    for codec in (H11Client(), HttptoolsClient()):
        sized = [*headers, (b"content-length", b"3")]
        head = codec.request_head(b"POST", b"/up", sized, chunked=False)
        wire = head + b"".join(codec.request_data(b"abc")) + codec.request_end()
        assert b"transfer-encoding" not in wire.lower() and wire.endswith(b"\r\n\r\nabc"), codec
