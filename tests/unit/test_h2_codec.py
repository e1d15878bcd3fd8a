"""The HTTP/2 server codecs without sockets: what the interface promises (flow-controlled
bodies that wait in the codec, trailers behind them, backpressure by acknowledgement, the
bounds), for both codecs; then the nghttp2 codec alone: built under CI, no exception but its
own for any bytes, and no memory kept across many sessions."""

from __future__ import annotations

import gc
import os
import struct
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from hpack import Encoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.http2 import nghttp2_codec
from proxy.http2.codec import (
    CodecError,
    CodecSettings,
    DataReceived,
    GoAwayReceived,
    Http2ServerCodec,
    RequestReceived,
    StreamRefused,
)
from proxy.http2.h2_codec import H2ServerCodec
from tests.support import tools

SETTINGS = CodecSettings(
    max_concurrent_streams=4,
    max_header_bytes=4096,
    stream_window=256 * 1024,
    connection_window=1024 * 1024,
)
EXAMPLES = int(os.environ.get("TLS_SIDECAR_FUZZ_EXAMPLES", "300"))
REQUEST = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"a")]
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _nghttp2(settings: CodecSettings) -> Http2ServerCodec:
    if not nghttp2_codec.AVAILABLE:
        tools.missing(nghttp2_codec.HOW_TO_BUILD)
    return nghttp2_codec.Nghttp2ServerCodec(settings)


CODECS: dict[str, Callable[[CodecSettings], Http2ServerCodec]] = {
    "h2": H2ServerCodec,
    "nghttp2": _nghttp2,
}


def test_the_nghttp2_codec_is_built_under_ci() -> None:
    """A CI run without the extension would test h2 twice and say nothing of nghttp2."""
    if tools.in_ci():
        assert nghttp2_codec.AVAILABLE, nghttp2_codec.HOW_TO_BUILD
    assert (nghttp2_codec.version() is not None) == nghttp2_codec.AVAILABLE


class Client:
    """h2 as the client, over byte buffers."""

    def __init__(self, codec: Http2ServerCodec) -> None:
        self.codec = codec
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.h2.initiate_connection()
        self.events: list[h2.events.Event] = []
        self.sent = self.exchange()

    def exchange(self) -> list[object]:
        """Client bytes to the codec, then the codec's bytes to the client."""
        events = self.codec.receive(self.h2.data_to_send())
        self.events += self.h2.receive_data(self.codec.data_to_send())
        return list(events)

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


@pytest.fixture(params=list(CODECS))
def make(request: pytest.FixtureRequest) -> Callable[[CodecSettings], Http2ServerCodec]:
    return CODECS[request.param]


def test_a_body_the_window_has_no_room_for_waits_in_the_codec(
    make: Callable[[CodecSettings], Http2ServerCodec],
) -> None:
    client = Client(make(SETTINGS))
    client.h2.send_headers(1, REQUEST, end_stream=True)
    client.exchange()
    codec = client.codec
    assert codec.send_headers(1, [(b":status", b"200")])
    codec.send_data(1, b"x" * 100_000)
    codec.send_trailers(1, [(b"grpc-status", b"0")])
    client.exchange()
    got = sum(len(e.data) for e in client.of(h2.events.DataReceived))
    assert got == 65_535  # the client's default window, all of it and no more
    assert codec.waiting(1) == codec.waiting(0) == 100_000 - 65_535
    assert not client.of(h2.events.TrailersReceived)  # the trailers wait behind the body
    client.h2.increment_flow_control_window(100_000)
    client.h2.increment_flow_control_window(100_000, 1)
    client.exchange()
    assert sum(len(e.data) for e in client.of(h2.events.DataReceived)) == 100_000
    assert codec.waiting(1) == codec.waiting(0) == 0
    (trailers,) = client.of(h2.events.TrailersReceived)
    assert trailers.headers == [(b"grpc-status", b"0")]
    assert client.of(h2.events.StreamEnded)
    assert not codec.is_open(1)
    assert codec.send_data(1, b"late") == -1  # a closed stream takes nothing, and says so


def test_request_bytes_reopen_the_window_only_when_acknowledged(
    make: Callable[[CodecSettings], Http2ServerCodec],
) -> None:
    client = Client(make(SETTINGS))
    client.h2.send_headers(1, [(b":method", b"POST"), *REQUEST[1:]])
    for _ in range(10):  # past half the stream's window: both codecs then reopen it
        client.h2.send_data(1, b"a" * 16_000, pad_length=10)
    events = client.exchange()
    (head,) = [e for e in events if isinstance(e, RequestReceived)]
    assert head.headers[0] == (b":method", b"POST")
    data = [e for e in events if isinstance(e, DataReceived)]
    assert b"".join(e.data for e in data) == b"a" * 160_000
    window = client.h2.local_flow_control_window(1)

    def stream_updates() -> list[Any]:
        return [e for e in client.of(h2.events.WindowUpdated) if e.stream_id == 1]

    assert not stream_updates()  # nothing taken yet: no window reopened
    for e in data:
        client.codec.acknowledge(1, e.flow_controlled_length)
    client.exchange()
    assert stream_updates()
    assert client.h2.local_flow_control_window(1) > window


def test_streams_past_the_limit_are_refused_alone(
    make: Callable[[CodecSettings], Http2ServerCodec],
) -> None:
    codec = make(SETTINGS)
    encoder = Encoder()
    # six streams where four may be open (written by hand: h2's client would not send them)
    flood = b"".join(_frame(1, 0x4, sid, encoder.encode(REQUEST)) for sid in range(1, 13, 2))
    events = codec.receive(PREFACE + flood)
    opened = [e.stream_id for e in events if isinstance(e, RequestReceived)]
    refused = [e.stream_id for e in events if isinstance(e, StreamRefused)]
    assert opened == [1, 3, 5, 7]
    assert refused == [9, 11]
    out = _frames(codec.data_to_send())
    resets = {sid: payload for kind, sid, payload in out if kind == 3}
    assert resets == {9: b"\x00\x00\x00\x07", 11: b"\x00\x00\x00\x07"}  # REFUSED_STREAM
    assert 7 not in [kind for kind, _, _ in out]  # no GOAWAY: the connection goes on


def _frame(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", sid)
        + payload
    )


def test_a_header_block_is_bounded_in_total_across_continuation_frames(
    make: Callable[[CodecSettings], Http2ServerCodec],
) -> None:
    codec = make(SETTINGS)
    # one literal field of 5000 bytes, spread over CONTINUATION frames without END_HEADERS
    literal = b"\x00\x01x\x7f" + bytes([0x80 | (4873 & 0x7F), 4873 >> 7]) + b"v" * 5000
    pieces = [literal[i : i + 1000] for i in range(0, len(literal), 1000)]
    flood = _frame(1, 0, 1, b"\x82") + b"".join(_frame(9, 0, 1, p) for p in pieces)
    with pytest.raises(CodecError) as raised:
        codec.receive(PREFACE + flood)
    assert raised.value.reason == "header_block"
    assert raised.value.code == 0xB  # ENHANCE_YOUR_CALM
    assert _goaway(codec.data_to_send()) == 0xB


def test_a_stream_id_used_again_ends_the_connection(
    make: Callable[[CodecSettings], Http2ServerCodec],
) -> None:
    client = Client(make(SETTINGS))
    client.h2.send_headers(1, REQUEST, end_stream=True)
    client.exchange()
    client.codec.send_headers(1, [(b":status", b"204")], end_stream=True)
    client.exchange()
    block = client.h2.encoder.encode(REQUEST)
    with pytest.raises(CodecError) as raised:
        client.codec.receive(_frame(1, 0x5, 1, block))
    assert raised.value.code == 0x1  # PROTOCOL_ERROR
    assert _goaway(client.codec.data_to_send()) == 0x1


def test_a_graceful_goaway_lets_the_streams_under_way_finish(
    make: Callable[[CodecSettings], Http2ServerCodec],
) -> None:
    codec = make(SETTINGS)
    encoder = Encoder()
    codec.receive(PREFACE + _frame(1, 0x5, 1, encoder.encode(REQUEST)))
    codec.data_to_send()
    codec.goaway(0, 2**31 - 1)
    assert codec.send_headers(1, [(b":status", b"200")])
    assert codec.send_data(1, b"body", end_stream=True) == 0
    out = _frames(codec.data_to_send())
    kinds = [(kind, sid) for kind, sid, _ in out]
    assert kinds.index((7, 0)) < kinds.index((1, 1)) < kinds.index((0, 1))
    (goaway,) = [p for kind, _, p in out if kind == 7]
    assert goaway == struct.pack(">II", 2**31 - 1, 0)
    assert (0, 1, b"body") in out


def test_the_clients_goaway_leaves_its_streams_open(
    make: Callable[[CodecSettings], Http2ServerCodec],
) -> None:
    codec = make(SETTINGS)
    encoder = Encoder()
    goaway = _frame(7, 0, 0, struct.pack(">II", 0, 0))  # no stream of ours: 0
    events = codec.receive(PREFACE + _frame(1, 0x5, 1, encoder.encode(REQUEST)) + goaway)
    (seen,) = [e for e in events if isinstance(e, GoAwayReceived)]
    assert (seen.error_code, seen.last_stream_id) == (0, 0)
    assert codec.send_headers(1, [(b":status", b"204")], end_stream=True)
    assert (1, 1) in [(kind, sid) for kind, sid, _ in _frames(codec.data_to_send())]


def _frames(out: bytes) -> list[tuple[int, int, bytes]]:
    """The frames in a codec's output: type, stream id, payload."""
    at, found = 0, []
    while at + 9 <= len(out):
        length = int.from_bytes(out[at : at + 3], "big")
        sid = int.from_bytes(out[at + 5 : at + 9], "big") & 0x7FFFFFFF
        found.append((out[at + 3], sid, out[at + 9 : at + 9 + length]))
        at += 9 + length
    return found


def _goaway(out: bytes) -> int | None:
    """The error code of the last GOAWAY in the output, None without one."""
    codes = [int.from_bytes(p[4:8], "big") for kind, _, p in _frames(out) if kind == 7]
    return codes[-1] if codes else None


# --- nghttp2 alone ----------------------------------------------------------------------------------
frames = st.builds(
    _frame,
    st.integers(0, 12),
    st.integers(0, 255),
    st.sampled_from([0, 1, 3, 5, 2**31 - 1]),
    st.binary(max_size=40),
)


@settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
)
@given(
    st.booleans(),
    st.lists(frames, max_size=12),
    st.binary(max_size=200),
    st.lists(st.integers(1, 64), max_size=6),
)
def test_no_bytes_make_the_nghttp2_codec_raise_but_its_own_error(
    preface: bool, garbage_frames: list[bytes], tail: bytes, reads: list[int]
) -> None:
    codec = _nghttp2(SETTINGS)
    data = (PREFACE if preface else b"") + b"".join(garbage_frames) + tail
    try:
        for size in [*reads, len(data)]:
            piece, data = data[:size], data[size:]
            for event in codec.receive(piece):
                if isinstance(event, RequestReceived):  # answered, so responses run too
                    codec.send_headers(event.stream_id, [(b":status", b"200")])
                    codec.send_data(event.stream_id, b"ok", end_stream=True)
            codec.data_to_send()
    except CodecError:
        assert _goaway(codec.data_to_send()) is not None or not preface


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


@pytest.mark.slow
def test_nghttp2_sessions_are_freed() -> None:
    """100k sessions, each with a request answered, a request reset and a body left waiting:
    the process's memory stays where it was after the first 10k."""
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    client.initiate_connection()
    client.send_headers(1, REQUEST, end_stream=True)
    client.send_headers(3, REQUEST)
    client.reset_stream(3)
    client.send_headers(5, REQUEST, end_stream=True)
    data = client.data_to_send()

    def sessions(count: int) -> None:
        for _ in range(count):
            codec = _nghttp2(SETTINGS)
            codec.receive(data)
            codec.send_headers(1, [(b":status", b"200")])
            codec.send_data(1, b"x" * 100, end_stream=True)
            codec.send_headers(5, [(b":status", b"200")])
            codec.send_data(5, b"y" * 70_000)  # past the window: waits in the codec
            codec.data_to_send()

    sessions(10_000)
    gc.collect()
    before = _rss_kib()
    sessions(90_000)
    gc.collect()
    grown = _rss_kib() - before
    assert grown < 4096, f"RSS grew {grown} KiB over 90k sessions"


@pytest.mark.parametrize("written_between", [False, True])
def test_an_end_submitted_after_the_body_ends_the_stream(
    make: Callable[[CodecSettings], Http2ServerCodec], written_between: bool
) -> None:
    """A proxied body arrives in parts and its end comes on its own (an empty end, as the
    connection sends once the app's response is complete): the stream must still end."""
    client = Client(make(SETTINGS))
    client.h2.send_headers(1, REQUEST, end_stream=True)
    client.exchange()
    codec = client.codec
    assert codec.send_headers(1, [(b":status", b"200")])
    assert codec.send_data(1, b"abc") == 0
    if written_between:
        client.exchange()
    assert codec.send_data(1, b"", True) == 0
    client.exchange()
    assert b"".join(e.data for e in client.of(h2.events.DataReceived)) == b"abc"
    assert [e.stream_id for e in client.of(h2.events.StreamEnded)] == [1]
    assert not codec.is_open(1)


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_a_body_part_may_be_any_bytes_like(
    make: Callable[[CodecSettings], Http2ServerCodec], kind: Callable[[bytes], Any]
) -> None:
    """h11 hands a response body on as bytearrays: before, nghttp2's codec raised TypeError
    for them and every such response was reset INTERNAL_ERROR."""
    client = Client(make(SETTINGS))
    client.h2.send_headers(1, REQUEST, end_stream=True)
    client.exchange()
    codec = client.codec
    assert codec.send_headers(1, [(b":status", b"200")])
    assert codec.send_data(1, kind(b"hello"), True) == 0
    client.exchange()
    assert b"".join(e.data for e in client.of(h2.events.DataReceived)) == b"hello"
    assert [e.stream_id for e in client.of(h2.events.StreamEnded)] == [1]


def test_a_stream_between_the_drains_two_goaways_is_delivered(
    make: Callable[[CodecSettings], Http2ServerCodec],
) -> None:
    """The drain's first GOAWAY (last stream id 2^31-1) still takes new streams, as RFC 9113
    §6.8 means it: a request already on its way is served. Before: nghttp2 took it for a final
    GOAWAY and dropped every new stream after it without a word (h2 delivered them)."""
    client = Client(make(SETTINGS))
    codec = client.codec
    codec.goaway(0, 2**31 - 1)
    client.exchange()
    frames = _after_preface(client, 3)
    events = codec.receive(frames)
    assert [type(e) for e in events if not isinstance(e, GoAwayReceived)][:1] == [RequestReceived]


def _after_preface(client: Client, sid: int) -> bytes:
    """A new request's HEADERS from the client, past its own state machine (which stops at a
    GOAWAY it received), encoded in its HPACK context."""
    block = bytes(client.h2.encoder.encode(REQUEST))
    return struct.pack(">I", len(block))[1:] + bytes([1, 5]) + struct.pack(">I", sid) + block
