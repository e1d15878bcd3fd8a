"""The h2c client codecs without sockets, both of them: a request out and its answer back, a
body held for the app's window, and an answer HTTP/2 forbids (a CR or LF in a value, which an
HTTP/1.1 client would take for a header of its own) never delivered as a response."""

from __future__ import annotations

from collections.abc import Callable

import h2.config
import h2.connection
import h2.events
import pytest

from proxy.http2 import nghttp2_client
from proxy.http2.client_codec import (
    ClientSettings,
    DataReceived,
    Http2ClientCodec,
    ResponseReceived,
    SettingsChanged,
    StreamEnded,
    StreamRefused,
    TrailersReceived,
)
from proxy.http2.codec import CodecError
from proxy.http2.h2_client import H2ClientCodec
from proxy.http2.nghttp2_codec import AVAILABLE, HOW_TO_BUILD
from tests.support import tools

SETTINGS = ClientSettings(max_header_bytes=65536, stream_window=65535, connection_window=1 << 20)
REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a")]


def _nghttp2(settings: ClientSettings) -> Http2ClientCodec:
    if not AVAILABLE:
        tools.missing(HOW_TO_BUILD)
    return nghttp2_client.Nghttp2ClientCodec(settings)


@pytest.fixture(params=["h2", "nghttp2"])
def make(request: pytest.FixtureRequest) -> Callable[[ClientSettings], Http2ClientCodec]:
    return {"h2": H2ClientCodec, "nghttp2": _nghttp2}[request.param]


class App:
    """h2 as the app (server side), over byte buffers; it sends what it is given."""

    def __init__(self, codec: Http2ClientCodec) -> None:
        self.codec = codec
        config = h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_outbound_headers=False
        )
        self.h2 = h2.connection.H2Connection(config)
        self.h2.initiate_connection()
        self.events: list[h2.events.Event] = []
        self.got: list[object] = []
        self.exchange()

    def exchange(self) -> None:
        self.events += self.h2.receive_data(self.codec.data_to_send())
        try:
            self.got += self.codec.receive(self.h2.data_to_send())
        finally:
            self.events += self.h2.receive_data(self.codec.data_to_send())


def test_a_request_and_its_answer(make: Callable[[ClientSettings], Http2ClientCodec]) -> None:
    app = App(make(SETTINGS))
    assert any(isinstance(e, SettingsChanged) for e in app.got)
    codec = app.codec
    sid = codec.send_request(REQUEST)
    assert sid == 1
    assert codec.send_data(sid, b"x" * 100_000) == 100_000 - 65_535  # the rest waits
    assert codec.send_trailers(sid, [(b"grpc-timeout", b"1S")])
    app.exchange()
    body = sum(len(e.data) for e in app.events if isinstance(e, h2.events.DataReceived))
    assert body == 65_535
    app.h2.increment_flow_control_window(100_000)
    app.h2.increment_flow_control_window(100_000, sid)
    app.exchange()
    app.exchange()  # nghttp2 sends what the window allows at the next output
    body = sum(len(e.data) for e in app.events if isinstance(e, h2.events.DataReceived))
    assert body == 100_000
    assert any(isinstance(e, h2.events.TrailersReceived) for e in app.events)
    app.h2.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    app.h2.send_data(sid, b"hello")
    app.h2.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
    app.exchange()
    answer = (ResponseReceived, DataReceived, TrailersReceived, StreamEnded)
    kinds = [type(e) for e in app.got if isinstance(e, answer)]
    assert kinds == [ResponseReceived, DataReceived, TrailersReceived, StreamEnded]
    assert not codec.is_open(sid) or codec.waiting(sid) == 0


def test_a_cr_lf_in_the_apps_answer_is_never_delivered(
    make: Callable[[ClientSettings], Http2ClientCodec],
) -> None:
    app = App(make(SETTINGS))
    sid = app.codec.send_request(REQUEST, end_stream=True)
    app.exchange()
    app.h2.send_headers(sid, [(b":status", b"200"), (b"x-evil", b"a\r\nset-cookie: b")])
    try:
        app.exchange()
    except CodecError:  # h2: the app's connection ends
        return
    # nghttp2: the stream is reset, and its client answered 502 (the connection goes on)
    assert not any(isinstance(e, ResponseReceived) for e in app.got)
    assert any(isinstance(e, StreamRefused) and e.stream_id == sid for e in app.got)


def test_no_new_stream_after_the_apps_goaway(
    make: Callable[[ClientSettings], Http2ClientCodec],
) -> None:
    """RFC 9113 §6.8: after the app's GOAWAY no stream is opened (the pool opens a new
    connection); a stream it kept still takes its body. Before: the h2 codec sent the new
    request, which the app ignores, and its client waited for the timeout."""
    app = App(make(SETTINGS))
    kept = app.codec.send_request(REQUEST)
    app.exchange()
    app.h2.close_connection(last_stream_id=kept)
    app.exchange()
    assert app.codec.send_request(REQUEST, end_stream=True) == -1
    assert app.codec.send_data(kept, b"rest", end_stream=True) == 0
