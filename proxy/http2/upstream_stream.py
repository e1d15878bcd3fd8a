"""One request on a shared h2c connection to the app (`http2/upstream.py`): to its exchange what
an HTTP/1.1 `UpstreamConnection` is, the client codec and the way to the app. Its request body
waits in a `SendQueue` for the app's window; the connection reads the answers for all streams."""

from __future__ import annotations

import contextlib
from typing import Protocol

import h2.exceptions
from h2.errors import ErrorCodes

from proxy.core.headers import Headers
from proxy.core.links import ClientCodec, ResponseSink, Tunnel, UpstreamOwner
from proxy.core.request import BadRequest
from proxy.http2.h2conn import H2Connection, SendQueue
from proxy.http2.request import valid_authority, valid_h2_field, valid_request_line

REQUEST_BUFFER = 64 * 1024  # a request body waiting for the app's window, past which we pause

# Not sent over HTTP/2 (RFC 9113 §8.2.2); Host becomes :authority.
_NOT_SENT = frozenset(
    {
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
    }
)


class _Authority(Protocol):
    @property
    def authority(self) -> bytes: ...


class StreamConnection(Protocol):
    """What a stream needs of its connection (`H2UpstreamConnection`, which imports this module)."""

    @property
    def h2(self) -> H2Connection: ...

    @property
    def pool(self) -> _Authority: ...

    @property
    def writing_paused(self) -> bool: ...

    def flush(self) -> None: ...

    def write(self, data: bytes) -> None: ...

    def reset(self, stream: H2UpstreamStream, code: int) -> None: ...

    def stream_closed(self, stream: H2UpstreamStream) -> None: ...


class H2UpstreamStream:
    """One request on a shared HTTP/2 connection to the app; its own client codec."""

    __slots__ = (
        "closed",
        "codec",
        "conn",
        "ended",
        "owner",
        "paused",
        "queue",
        "received_any",
        "reused",
        "sid",
        "unacked",
        "waiting_end",
        "write_paused",
    )

    def __init__(self, conn: StreamConnection, sid: int, reused: bool) -> None:
        self.conn = conn
        self.sid = sid
        self.codec: ClientCodec = self
        self.owner: UpstreamOwner | None = None
        self.reused = reused
        self.received_any = False
        self.paused = False
        self.closed = False
        self.ended = False  # our END_STREAM went out
        self.unacked = 0  # response bytes taken while the client side is slow
        self.queue = SendQueue()  # request bytes the app's window has no room for
        self.waiting_end: Headers | bool = False
        self.write_paused = False

    # --- ClientCodec ------------------------------------------------------------------------------
    def request_head(
        self, method: bytes, target: bytes, headers: Headers, *, chunked: bool
    ) -> bytes:
        authority = self.conn.pool.authority
        out: Headers = []
        grpc = False
        for name, value in headers:
            if name in _NOT_SENT:
                if name == b"host" and value:  # an empty Host (HTTP/1.1 allows it): ours
                    if not valid_authority(value):
                        raise BadRequest(400, "bad_request", "Host cannot be an :authority")
                    authority = value
                continue
            if not valid_h2_field(name, value):
                # h2 sends what it is given (outbound validation is off): an app's h2 stack
                # would refuse it, maybe for the whole connection. This request alone is 400.
                raise BadRequest(400, "bad_request", f"field {name!r} cannot go over HTTP/2")
            if name == b"content-type" and value[:16] == b"application/grpc":
                grpc = True
            out.append((name, value))
        if not valid_request_line(method, target):
            raise BadRequest(400, "bad_request", "method or target cannot go over HTTP/2")
        if grpc:
            out.append((b"te", b"trailers"))  # gRPC servers require it (gRPC over HTTP/2)
        out[:0] = [
            (b":method", method),
            (b":scheme", b"http"),
            (b":authority", authority),
            (b":path", target),
        ]
        try:
            self.conn.h2.send_headers(self.sid, out)
        except h2.exceptions.ProtocolError as e:  # the connection's state, not the request's
            raise BadRequest(502, "upstream_closed", f"the app's connection: {e}") from None
        self.conn.flush()
        return b""  # the connection writes every stream's frames once per loop iteration

    def request_data(self, data: bytes) -> list[bytes]:
        if self.closed or not data:
            return []
        if self.queue.send(self.conn.h2, self.sid, data):
            self._queued()
        self.conn.flush()
        return []

    def _queued(self) -> None:
        """More of the request waits for the app's window."""
        if self.queue.size > REQUEST_BUFFER and not self.write_paused and self.owner:
            self.write_paused = True
            self.owner.upstream_write_paused(True)

    def request_end(self, trailers: Headers | None = None) -> bytes:
        if self.closed or self.ended:
            return b""
        if self.queue.parts:
            self.waiting_end = trailers or True
            return b""
        self._end(trailers)
        self.conn.flush()
        return b""

    def _end(self, trailers: Headers | None) -> None:
        self.ended = True
        conn = self.conn.h2
        if trailers:
            conn.send_headers(self.sid, trailers, end_stream=True)
        else:
            conn.end_stream(self.sid)

    def window_opened(self) -> None:
        """The app's window grew: send what waited, then the end that waited behind it."""
        self.queue.drain(self.conn.h2, self.sid)
        if self.queue.parts:
            return
        if self.waiting_end is not False:
            end, self.waiting_end = self.waiting_end, False
            self._end(end if isinstance(end, list) else None)
        if self.write_paused and self.owner is not None:
            self.write_paused = False
            if not self.conn.writing_paused:  # else the transport's resume releases it
                self.owner.upstream_write_paused(False)

    def feed(self, data: bytes, sink: ResponseSink) -> None:
        raise NotImplementedError  # the connection reads for all its streams

    def feed_eof(self, sink: ResponseSink) -> None:
        raise NotImplementedError

    def recycle(self) -> bool:
        return False  # a stream carries one request; the connection is what is reused

    def take_leftover(self) -> bytes:
        return b""

    # --- the way to the app -----------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if data:
            self.conn.write(data)

    def writelines(self, parts: list[bytes]) -> None:
        for part in parts:
            if part:
                self.conn.write(part)

    def pause_reading(self) -> None:
        """The client is slow: stop reopening the app's window for this stream."""
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
        if self.unacked and not self.closed:
            unacked, self.unacked = self.unacked, 0
            # The connection's share was credited on arrival: this stream's window alone.
            with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):  # closed there
                self.conn.h2.increment_flow_control_window(unacked, stream_id=self.sid)
            self.conn.flush()

    def as_tunnel(self) -> Tunnel | None:
        return None  # RFC 8441's extended CONNECT is not offered, so no 101 either

    def unread_request_bytes(self) -> int:
        # HTTP/2 flow control: the app takes DATA as its window allows; what waits for the
        # window is ours, not the socket's.
        return 0

    def abort(self) -> None:
        """The exchange gave up (the client went away, a timeout): RST_STREAM CANCEL."""
        self.owner = None
        if not self.closed:
            self.conn.reset(self, ErrorCodes.CANCEL)
