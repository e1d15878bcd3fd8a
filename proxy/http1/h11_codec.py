"""HTTP/1.1 on h11, the strict pure-Python reference codec (`--http h11`).

h11 frames both directions itself; events it built from bytes it parsed are re-sent with
`_parsed=True`, which skips its per-header regexes (framing is still checked)."""

from __future__ import annotations

import re
from typing import Any

import h11

from proxy.core.headers import Headers, reason_phrase
from proxy.core.links import ClientCodec, ResponseSink
from proxy.core.request import BadRequest, read_head
from proxy.http1._wire import BARE_LF, CHUNKED
from proxy.http1.codec import DETACHED, RequestSink, ServerCodec

_MAX_CHUNK = 0xFFFF_FFFF_FFFF_FFFF  # llhttp's bound; h11 reads up to 20 hex digits
# h11 merges repeated or listed identical Content-Lengths ("5, 5") before we see them.
_RAW_LENGTH = re.compile(rb"(?im)^content-length[ \t]*:[ \t]*([^\r\n]*?)[ \t]*\r?$")
# Control characters other than HTAB (and the CRLFs between lines): llhttp refuses them in a head,
# h11 takes anything but NUL and whitespace in a field value.
_CTL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)")


def _head_part(raw: bytes) -> bytes:
    """The head at the start of `raw`, its terminating blank line included (either style)."""
    ends = [i + 2 for i in (raw.find(b"\n\n"),) if i >= 0]
    ends += [i + 3 for i in (raw.find(b"\n\r\n"),) if i >= 0]
    return raw[: min(ends)] if ends else raw


def _bad(error: h11.RemoteProtocolError) -> BadRequest:
    # h11 suggests 501 for transfer codings other than chunked; as a smuggling defence they are
    # malformed framing like any other: 400 and close.
    reason = "header_too_large" if error.error_status_hint == 431 else "bad_request"
    return BadRequest(reason, str(error) or "malformed request")


class H11Server(ServerCodec):
    """The server side of one client connection (see codec.ServerCodec)."""

    __slots__ = (
        "_closed_input",
        "_conn",
        "_keep_alive",
        "_stopped",
        "_trailers",
        "sink",
    )

    def __init__(self, sink: RequestSink, max_header_bytes: int) -> None:
        self.sink = sink
        self.paused = False
        self._trailers: Headers = []
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self._stopped = False
        self._closed_input = False
        self._keep_alive = True

    def feed(self, data: bytes) -> None:
        if self._closed_input or self._stopped:
            return
        self._conn.receive_data(data)
        if not self.paused:
            # A head can only have completed in a read with a line end in it: only then are the
            # unparsed bytes copied for the raw-head checks (a trickling client stays linear).
            self._events(may_complete_head=b"\n" in data)

    def _events(self, *, may_complete_head: bool = True) -> None:
        conn = self._conn
        sink = self.sink
        while not self.paused and not self._stopped:
            # The bytes of a head about to be parsed, for the checks h11 does not make.
            idle = conn.their_state is h11.IDLE
            pending = bytes(conn.trailing_data[0]) if idle and may_complete_head else b""
            try:
                event: Any = conn.next_event()
            except h11.RemoteProtocolError as e:
                raise _bad(e) from None
            kind = type(event)
            if kind is h11.Data:
                if event.chunk_start:
                    self._check_chunk_size(len(event.data))
                # h11 hands out bytearray slices; the compiled core takes bytes (mypyc checks)
                sink.on_request_data(bytes(event.data))
            elif event is h11.NEED_DATA or event is h11.PAUSED:
                return
            elif kind is h11.Request:
                raw_head = _head_part(pending)
                if BARE_LF.search(raw_head):
                    # RFC 9112 §2.2 lets a recipient accept a bare LF; llhttp does not, and
                    # where the codecs would differ the proxy refuses.
                    raise BadRequest("bad_request", "line ending without CR in the head")
                if _CTL.search(raw_head):
                    raise BadRequest("bad_request", "control character in the head")
                lengths = _RAW_LENGTH.findall(raw_head)
                if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
                    raise BadRequest("bad_request", "Content-Length is not one number")
                if b"\n " in raw_head or b"\n\t" in raw_head:
                    # obs-fold: RFC 9112 §5.2 lets a server refuse it; llhttp does, h11 unfolds.
                    raise BadRequest("bad_request", "obsolete line folding in the head")
                head = read_head(
                    event.method, event.target, event.http_version, list(event.headers)
                )
                self._keep_alive = head.keep_alive
                sink.on_request_head(head)
            elif kind is h11.EndOfMessage:
                if not self._keep_alive:
                    self._closed_input = True  # RFC 9112 §9.6: what follows `close` is ignored
                self.paused = True  # set first: the sink may finish the exchange and resume
                sink.on_request_end()
            else:  # ConnectionClosed
                return

    def _check_chunk_size(self, received: int) -> None:
        # h11 accepts chunk sizes up to 20 hex digits (80 bits); llhttp and nginx stop at 64.
        # The declared size is what arrived plus what h11 still expects of this chunk.
        reader = getattr(self._conn, "_reader", None)
        if received + getattr(reader, "_bytes_in_chunk", 0) > _MAX_CHUNK:
            raise BadRequest("bad_request", "Chunk size overflow")

    def stop(self) -> None:
        self._stopped = True

    def detach(self) -> None:
        self._stopped = True
        self.sink = DETACHED

    def take_leftover(self) -> bytes:
        self._closed_input = True  # from now on the bytes belong to the tunnel
        return bytes(self._conn.trailing_data[0])

    def response_head(
        self, status: int, reason: bytes, headers: Headers, length: int | None
    ) -> bytes:
        data = self._conn.send(
            h11.Response(status_code=status, headers=headers, reason=reason, _parsed=True)
        )
        assert data is not None
        return data

    def response_data(self, data: bytes) -> list[bytes]:
        return self._conn.send_with_data_passthrough(h11.Data(data=data)) or []

    def response_trailers(self, headers: Headers) -> None:
        # h11 takes trailers only at the end of a chunked body (it chose the framing).
        if type(getattr(self._conn, "_writer", None)).__name__ == "ChunkedWriter":
            self._trailers = headers

    def response_end(self) -> bytes:
        trailers = self._trailers
        if trailers:
            self._trailers = []
            return self._conn.send(h11.EndOfMessage(headers=trailers)) or b""
        return self._conn.send(h11.EndOfMessage()) or b""

    def informational(self, status: int, reason: bytes, headers: Headers) -> bytes:
        data = self._conn.send(
            h11.InformationalResponse(
                status_code=status, headers=headers, reason=reason, _parsed=True
            )
        )
        return data or b""

    def local_response(self, status: int, headers: Headers, body: bytes) -> list[bytes] | None:
        self.stop()
        conn = self._conn
        headers = [*headers, (b"content-length", b"%d" % len(body)), (b"connection", b"close")]
        try:
            parts = [
                conn.send(
                    h11.Response(status_code=status, headers=headers, reason=reason_phrase(status))
                ),
                conn.send(h11.Data(data=body)),
                conn.send(h11.EndOfMessage()),
            ]
        except h11.LocalProtocolError:
            return None
        return [p for p in parts if p]

    def next_cycle(self) -> bool:
        conn = self._conn
        if self._stopped or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return False
        conn.start_next_cycle()
        self.paused = False
        self._events()  # a request that waited behind the last one
        return True


class H11Client(ClientCodec):
    """The client side of one connection to the app (see codec.ClientCodec)."""

    __slots__ = ("_conn",)

    def __init__(self) -> None:
        self._conn = h11.Connection(h11.CLIENT)

    def request_head(
        self, method: bytes, target: bytes, headers: Headers, *, chunked: bool
    ) -> bytes:
        try:
            if chunked:  # the framing is HTTP/1.1's, so it is decided here, not in the core
                headers = [*headers, CHUNKED]
            data = self._conn.send(
                h11.Request(method=method, target=target, headers=headers, _parsed=True)
            )
        except h11.LocalProtocolError as e:  # what HTTP/1.1 cannot carry: this request only
            raise BadRequest("bad_request", str(e)) from None
        assert data is not None
        return data

    def request_data(self, data: bytes) -> list[bytes]:
        return self._conn.send_with_data_passthrough(h11.Data(data=data)) or []

    def request_end(self, trailers: Headers | None = None) -> bytes:
        """The end of the body; request trailers are not sent to an HTTP/1.1 app."""
        return self._conn.send(h11.EndOfMessage()) or b""

    def feed(self, data: bytes, sink: ResponseSink) -> None:
        self._conn.receive_data(data)
        conn = self._conn
        while True:
            try:
                event: Any = conn.next_event()
            except h11.RemoteProtocolError as e:
                sink.response_malformed(str(e))
                return
            kind = type(event)
            if kind is h11.Data:
                sink.response_data(bytes(event.data))
            elif event is h11.NEED_DATA:
                return
            elif kind is h11.Response:
                headers = list(event.headers)
                sink.response_head(event.status_code, event.reason, headers, _length(headers))
            elif kind is h11.EndOfMessage:
                sink.response_end()
                return
            elif kind is h11.InformationalResponse:
                sink.response_informational(event.status_code, event.reason, list(event.headers))
                if event.status_code == 101:
                    return
            else:  # PAUSED, ConnectionClosed
                return

    def feed_eof(self, sink: ResponseSink) -> None:
        self.feed(b"", sink)

    def recycle(self) -> bool:
        conn = self._conn
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return False
        if conn.trailing_data[0]:
            # The app sent more after its response (a second answer, bytes after a 204, 304 or
            # HEAD answer): h11 would read it as the next request's response. Never reused.
            return False
        conn.start_next_cycle()
        return True

    def take_leftover(self) -> bytes:
        return bytes(self._conn.trailing_data[0])


def _length(headers: Headers) -> int | None:
    """The body's Content-Length when it frames the body (not beside Transfer-Encoding)."""
    length = None
    for name, value in headers:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            length = int(value)
    return length
