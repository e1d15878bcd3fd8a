"""One request on a shared h2c connection to the app (`http2/upstream.py`): to its exchange what
an HTTP/1.1 `UpstreamConnection` is, the client codec and the way to the app. Its request body
waits in the connection's HTTP/2 codec for the app's window (past `REQUEST_BUFFER` the client's
body is paused); the connection reads the answers for all streams."""

from __future__ import annotations

from typing import Protocol

from proxy.core.headers import CONNECTION_SPECIFIC, Headers
from proxy.core.links import ClientCodec, ResponseSink, Tunnel, UpstreamOwner
from proxy.core.request import BadRequest
from proxy.http2.client_codec import Http2ClientCodec
from proxy.http2.codec import ErrorCode
from proxy.http2.request import valid_authority, valid_h2_field, valid_request_line

REQUEST_BUFFER = 64 * 1024  # a request body waiting for the app's window, past which we pause

# Not sent over HTTP/2 (RFC 9113 §8.2.2): the connection-specific fields, Host, which becomes
# :authority, and TE, which HTTP/2 allows only as "trailers" and is added back for gRPC.
_NOT_SENT = CONNECTION_SPECIFIC | {b"host", b"te"}


class _Authority(Protocol):
    @property
    def authority(self) -> bytes: ...


class StreamConnection(Protocol):
    """What a stream needs of its connection (`H2UpstreamConnection`, which imports this module)."""

    @property
    def codec(self) -> Http2ClientCodec: ...

    @property
    def pool(self) -> _Authority: ...

    @property
    def writing_paused(self) -> bool: ...

    @property
    def write_waiting(self) -> set[H2UpstreamStream]: ...

    def flush(self) -> None: ...

    def stream_opened(self, stream: H2UpstreamStream) -> None: ...

    def write(self, data: bytes) -> None: ...

    def reset(self, stream: H2UpstreamStream, code: int) -> None: ...

    def stream_closed(self, stream: H2UpstreamStream) -> None: ...


class H2UpstreamStream(ClientCodec):
    """One request on a shared HTTP/2 connection to the app; its own client codec."""

    __slots__ = (
        "closed",
        "codec",
        "conn",
        "ended",
        "owner",
        "paused",
        "received_any",
        "reused",
        "sid",
        "unacked",
        "write_paused",
    )

    def __init__(self, conn: StreamConnection, reused: bool) -> None:
        self.conn = conn
        self.sid = 0  # given with the head
        self.codec: ClientCodec = self
        self.owner: UpstreamOwner | None = None
        self.reused = reused
        self.received_any = False
        self.paused = False
        self.closed = False
        self.ended = False  # our END_STREAM went out
        self.unacked = 0  # response bytes taken while the client side is slow
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
                        raise BadRequest("bad_request", "Host cannot be an :authority")
                    authority = value
                continue
            if not valid_h2_field(name, value):
                # the codec sends what it is given (neither validates it): an app's HTTP/2 stack
                # would refuse it, maybe for the whole connection. This request alone is 400.
                raise BadRequest("bad_request", f"field {name!r} cannot go over HTTP/2")
            if name == b"content-type" and value[:16] == b"application/grpc":
                grpc = True
            out.append((name, value))
        if not valid_request_line(method, target):
            raise BadRequest("bad_request", "method or target cannot go over HTTP/2")
        if grpc:
            out.append((b"te", b"trailers"))  # gRPC servers require it (gRPC over HTTP/2)
        out[:0] = [
            (b":method", method),
            (b":scheme", b"http"),
            (b":authority", authority),
            (b":path", target),
        ]
        sid = self.conn.codec.send_request(out)
        if sid < 0:  # the connection's state, not the request's
            raise BadRequest("upstream_closed", "the app's connection takes no new stream")
        self.sid = sid
        self.conn.stream_opened(self)
        self.conn.flush()
        return b""  # the connection writes every stream's frames once per loop iteration

    def request_data(self, data: bytes) -> list[bytes]:
        if self.closed or not data:
            return []
        if self.conn.codec.send_data(self.sid, data) > REQUEST_BUFFER:
            self._queued()
        self.conn.flush()
        return []

    def _queued(self) -> None:
        """More of the request waits for the app's window than we hold: the client waits."""
        self.conn.write_waiting.add(self)
        if not self.write_paused and self.owner:
            self.write_paused = True
            self.owner.upstream_write_paused(True)

    def request_end(self, trailers: Headers | None = None) -> bytes:
        if self.closed or self.ended:
            return b""
        self.ended = True
        codec = self.conn.codec
        if trailers:
            codec.send_trailers(self.sid, trailers)
        else:
            codec.send_data(self.sid, b"", end_stream=True)
        self.conn.flush()
        return b""

    def window_opened(self) -> None:
        """What waited for the app's window went: the client's body comes again."""
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
            self.conn.codec.acknowledge_stream(self.sid, unacked)
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
            self.conn.reset(self, ErrorCode.CANCEL)
