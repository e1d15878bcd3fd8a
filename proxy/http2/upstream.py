"""HTTP/2 cleartext to the app (`--upstream h2c://`, `h2c+unix:`), as gRPC servers speak it.

One `H2UpstreamConnection` carries many requests, each an `H2UpstreamStream`
(`http2/upstream_stream.py`); the pool (`http2/pool.py`) opens a new one only when every open
one has as many streams as the app's SETTINGS_MAX_CONCURRENT_STREAMS allows. Flow control is
the backpressure both ways; trailers and resets travel in both directions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol, cast

from proxy.core.headers import Headers
from proxy.core.links import UpstreamOwner
from proxy.http2.client_codec import (
    ClientSettings,
    DataReceived,
    GoAwayReceived,
    Http2ClientCodec,
    InformationalReceived,
    ResponseReceived,
    SettingsChanged,
    StreamEnded,
    StreamRefused,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from proxy.http2.codec import CodecError, ErrorCode
from proxy.http2.upstream_stream import H2UpstreamStream
from proxy.metrics import Metrics

log = logging.getLogger("tls_sidecar.upstream")

STREAM_WINDOW = 256 * 1024  # what the app may send on one stream before we pass it on
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_STREAMS = 1000  # per connection, whatever the app allows

SETTINGS = ClientSettings(
    max_header_bytes=256 * 1024,
    stream_window=STREAM_WINDOW,
    connection_window=CONNECTION_WINDOW,
)


class ConnectionPool(Protocol):
    """What an app connection needs of its pool (`http2/pool.py`, which imports this module)."""

    authority: bytes
    loop: asyncio.AbstractEventLoop
    metrics: Metrics
    codec_class: Callable[[ClientSettings], Http2ClientCodec]

    def went_idle(self, conn: H2UpstreamConnection) -> None: ...

    def forget(self, conn: H2UpstreamConnection) -> None: ...


class AppReset(ConnectionError):
    """The app reset a stream; `code` is relayed to the client's stream."""

    def __init__(self, code: int) -> None:
        super().__init__(f"the app reset the stream ({_code_name(code)})")
        self.code = code


class H2UpstreamConnection(asyncio.Protocol):
    """One HTTP/2 connection to the app, carrying many streams."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.codec: Http2ClientCodec = pool.codec_class(SETTINGS)
        self.streams: dict[int, H2UpstreamStream] = {}
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.writing_paused = False  # the app's transport is over its high-water mark
        self.going_away = False  # the app sent GOAWAY, or we are closing: no new streams
        self.used = False
        self.opening = 0  # streams taken whose head has not gone out yet
        self.idle_since = 0.0
        self._flush_soon = False
        self.write_waiting: set[H2UpstreamStream] = set()  # paused until the app's window opens
        # Streams go on a connection only once the app said how many it takes (its first
        # SETTINGS), as gRPC clients do: until then HTTP/2 would allow unlimited streams.
        self.settled: asyncio.Future[None] = pool.loop.create_future()

    @property
    def has_room(self) -> bool:
        if self.closed or self.going_away or not self.settled.done():
            return False
        limit = min(self.codec.max_concurrent_streams, MAX_STREAMS)
        return len(self.streams) + self.opening < limit

    def open_stream(self) -> H2UpstreamStream:
        """A stream for one request; its id comes with its head (`stream_opened`)."""
        stream = H2UpstreamStream(self, self.used)
        self.used = True
        self.opening += 1
        return stream

    def stream_opened(self, stream: H2UpstreamStream) -> None:
        self.opening -= 1
        self.streams[stream.sid] = stream

    def stream_closed(self, stream: H2UpstreamStream) -> None:
        if stream.closed:
            return
        stream.closed = True
        stream.owner = None
        self.write_waiting.discard(stream)
        if stream.sid:
            if self.streams.pop(stream.sid, None) is None:
                return
        else:  # its head never went out
            self.opening -= 1
        if not self.busy and not self.closed:
            self.idle_since = self.pool.loop.time()
            self.pool.went_idle(self)
            if self.going_away:
                self.close()

    @property
    def busy(self) -> bool:
        """Streams are on it, or taken for a request whose head is on its way."""
        return bool(self.streams) or self.opening > 0

    def reset(self, stream: H2UpstreamStream, code: int) -> None:
        # a stream whose head never went out (refused by request_head) has nothing to reset
        if not stream.closed and not self.closed and stream.sid:
            self.codec.reset_stream(stream.sid, code)
            self.flush()
        self.stream_closed(stream)

    # --- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.flush()

    def data_received(self, data: bytes) -> None:
        self.pool.metrics.counts.up_in += len(data)
        if self.closed:
            return
        try:
            events = self.codec.receive(data)
        except CodecError as e:  # the codec queued a GOAWAY with the error's code
            self._broken("upstream_protocol_error", e)
            return
        corked: list[Any] = []
        try:
            for event in events:
                stream = self.streams.get(getattr(event, "stream_id", 0))
                if stream is not None and stream.owner is not None:
                    down = stream.owner.down
                    if down not in corked:
                        down.cork()
                        corked.append(down)
                _CLIENT_HANDLERS[type(event)](self, event)
        except Exception as e:
            # As the HTTP/1.1 connection does: this app connection ends, its streams get 502
            # (or a reset, when their answer had begun); the proxy and other connections go on.
            log.exception("unexpected error relaying responses from an h2c app")
            self.codec.goaway(ErrorCode.INTERNAL_ERROR)
            self._broken("upstream_internal_error", e)
            return
        finally:
            for down in corked:
                down.uncork()
        self.flush()

    def _broken(self, reason: str, exc: Exception) -> None:
        """The app's connection can no longer be trusted: GOAWAY, counted; every stream on it
        is lost (a 502 for those not answered yet)."""
        self.pool.metrics.h2_errors.add(reason)
        if reason == "upstream_protocol_error":
            log.warning(
                "the app broke HTTP/2; closing its connection",
                extra={"detail": f"{type(exc).__name__}: {exc}"},
            )
        self.going_away = True
        self.flush_now()
        self._lose_all(exc)
        self.close()
        self.closed = True  # what the app sends until the close is not read

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.settled.done():
            self.settled.set_exception(ConnectionResetError("the app closed the connection"))
        self.pool.forget(self)
        self._lose_all(exc)
        self.codec.close()  # nghttp2's session is freed now, not when the connection is collected

    def _lose_all(self, exc: Exception | None, above: int = 0) -> None:
        for sid, stream in list(self.streams.items()):
            if sid > above:
                owner = stream.owner
                self.stream_closed(stream)
                if owner is not None:
                    owner.upstream_lost(stream, exc)

    def pause_writing(self) -> None:
        self.writing_paused = True
        for stream in list(self.streams.values()):
            if stream.owner is not None:
                stream.owner.upstream_write_paused(True)

    def resume_writing(self) -> None:
        self.writing_paused = False
        for stream in list(self.streams.values()):
            if stream.owner is not None and stream not in self.write_waiting:
                stream.owner.upstream_write_paused(False)

    # --- events -----------------------------------------------------------------------------------
    def _owner(self, sid: int) -> tuple[H2UpstreamStream, UpstreamOwner] | None:
        stream = self.streams.get(sid)
        if stream is None or stream.owner is None:
            return None
        stream.received_any = True
        return stream, stream.owner

    def _on_response(self, event: ResponseReceived) -> None:
        found = self._owner(event.stream_id)
        if found is None:
            return
        status = 0
        length: int | None = None
        headers: Headers = []
        for name, value in event.headers:
            if name[:1] == b":":
                if name == b":status":
                    status = _status(value)
                continue
            if name == b"content-length" and value.isdigit():
                length = int(value)
            headers.append((name, value))
        if not 200 <= status <= 599:
            self._malformed(found, "invalid :status")
            return
        found[1].response_head(status, b"", headers, length)

    def _malformed(self, found: tuple[H2UpstreamStream, UpstreamOwner], message: str) -> None:
        """A malformed response is a stream error (RFC 9113 §8.1.1): that stream is reset and
        its client answered 502; the connection's other streams go on."""
        stream, owner = found
        self.reset(stream, ErrorCode.PROTOCOL_ERROR)
        owner.response_malformed(message)

    def _on_informational(self, event: InformationalReceived) -> None:
        found = self._owner(event.stream_id)
        if found is None:
            return
        status = 0
        headers: Headers = []
        for name, value in event.headers:
            if name == b":status":
                status = _status(value)
            elif name[:1] != b":":
                headers.append((name, value))
        if not 100 <= status <= 199:
            self._malformed(found, "invalid :status")
            return
        found[1].response_informational(status, b"", headers)

    def _on_data(self, event: DataReceived) -> None:
        size = event.flow_controlled_length
        found = self._owner(event.stream_id)
        if found is None:
            self.codec.acknowledge(event.stream_id, size)
            return
        stream, owner = found
        if event.data:
            owner.response_data(event.data)
        if not size:
            return
        if stream.paused:
            # Held back from this stream's window only: the connection's is shared with other
            # clients' streams, which a client that does not read must not stop.
            stream.unacked += size
            self.codec.acknowledge_connection(size)
        else:
            self.codec.acknowledge(event.stream_id, size)

    def _on_trailers(self, event: TrailersReceived) -> None:
        found = self._owner(event.stream_id)
        if found is not None:
            found[1].response_trailers(list(event.headers))

    def _on_ended(self, event: StreamEnded) -> None:
        found = self._owner(event.stream_id)
        if found is None:
            return
        stream, owner = found
        if stream.ended:
            self.stream_closed(stream)
        owner.response_end()

    def _on_reset(self, event: StreamReset | StreamRefused) -> None:
        """The app reset the stream, or the codec did for an answer HTTP/2 does not allow."""
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return
        owner = stream.owner
        self.stream_closed(stream)
        if owner is None:
            return
        if isinstance(event, StreamRefused):
            owner.response_malformed("the app's answer broke HTTP/2")
            return
        # REFUSED_STREAM: the app did not process it at all (retried when that is safe).
        if event.error_code == ErrorCode.REFUSED_STREAM:
            stream.received_any = False
        owner.upstream_lost(stream, AppReset(event.error_code))

    def _on_window(self, event: WindowUpdated | SettingsChanged) -> None:
        """The codec sends what waited; `flush_now` resumes the streams it was for."""

    def _on_settings(self, event: SettingsChanged) -> None:
        if not self.settled.done():
            self.settled.set_result(None)

    def _on_goaway(self, event: GoAwayReceived) -> None:
        """The app is going away: no new stream goes on this connection, and streams above its
        last stream id were not processed (retryable). With NO_ERROR the others are still
        answered (an app stopping with a grace period), so they stay, and the connection
        closes with the last of them; with an error code they are lost too."""
        self.going_away = True
        graceful = event.error_code == ErrorCode.NO_ERROR
        above = event.last_stream_id if graceful else 0
        self._lose_all(ConnectionResetError("the app sent GOAWAY"), above=above)
        if not self.busy:
            self.close()

    # --- writing ----------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not self.closed:
            self.pool.metrics.counts.up_out += len(data)
            transport.write(data)

    def flush(self) -> None:
        """Write what the codec holds at the end of this loop iteration, for all streams."""
        if not self._flush_soon:
            self._flush_soon = True
            self.pool.loop.call_soon(self.flush_now)

    def flush_now(self) -> None:
        self._flush_soon = False
        data = self.codec.data_to_send()
        if data:
            self.write(data)
        if self.write_waiting:
            # what the windows let go went with these bytes: a stream whose request no longer
            # waits takes its client's body again
            for stream in [s for s in self.write_waiting if not self.codec.waiting(s.sid)]:
                self.write_waiting.discard(stream)
                stream.window_opened()

    def close(self) -> None:
        """GOAWAY, then close once what was written is flushed."""
        self.going_away = True
        if self.transport is not None and not self.closed:
            self.codec.goaway(ErrorCode.NO_ERROR)
            self.flush_now()
            self.transport.close()


def _status(value: bytes) -> int:
    """A `:status` of three digits, else 0 (h2 checks only that there is one)."""
    return int(value) if len(value) == 3 and value.isdigit() else 0


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return hex(code)


# Event type -> handler, for every connection.
_CLIENT_HANDLERS: dict[type[Any], Callable[[H2UpstreamConnection, Any], None]] = {
    ResponseReceived: H2UpstreamConnection._on_response,
    InformationalReceived: H2UpstreamConnection._on_informational,
    DataReceived: H2UpstreamConnection._on_data,
    TrailersReceived: H2UpstreamConnection._on_trailers,
    StreamEnded: H2UpstreamConnection._on_ended,
    StreamReset: H2UpstreamConnection._on_reset,
    StreamRefused: H2UpstreamConnection._on_reset,
    WindowUpdated: H2UpstreamConnection._on_window,
    SettingsChanged: H2UpstreamConnection._on_settings,
    GoAwayReceived: H2UpstreamConnection._on_goaway,
}
