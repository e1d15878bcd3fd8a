"""HTTP/2 cleartext to the app (`--upstream h2c://`, `h2c+unix:`), as gRPC servers speak it.

One `H2UpstreamConnection` carries many requests, each an `H2UpstreamStream`
(`http2/upstream_stream.py`); the pool (`http2/pool.py`) opens a new one only when every open
one has as many streams as the app's SETTINGS_MAX_CONCURRENT_STREAMS allows. Flow control is
the backpressure both ways; trailers and resets travel in both directions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes

from proxy.core.headers import Headers
from proxy.core.links import UpstreamOwner
from proxy.http2.h2conn import H2Connection
from proxy.http2.upstream_stream import H2UpstreamStream
from proxy.metrics import Metrics

log = logging.getLogger("tls_sidecar.upstream")

STREAM_WINDOW = 256 * 1024  # what the app may send on one stream before we pass it on
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_STREAMS = 1000  # per connection, whatever the app allows

_CLIENT_CONFIG = h2.config.H2Configuration(
    client_side=True,
    header_encoding=None,
    validate_inbound_headers=True,  # the app's answer is checked before a client sees it
    normalize_inbound_headers=False,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    split_outbound_cookies=False,
)


class ConnectionPool(Protocol):
    """What an app connection needs of its pool (`http2/pool.py`, which imports this module)."""

    authority: bytes
    loop: asyncio.AbstractEventLoop
    metrics: Metrics

    def went_idle(self, conn: H2UpstreamConnection) -> None: ...

    def forget(self, conn: H2UpstreamConnection) -> None: ...


class StreamReset(ConnectionError):
    """The app reset a stream; `code` is relayed to the client's stream."""

    def __init__(self, code: int) -> None:
        super().__init__(f"the app reset the stream ({ErrorCodes(code).name})")
        self.code = code


class H2UpstreamConnection(asyncio.Protocol):
    """One HTTP/2 connection to the app, carrying many streams."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        conn = H2Connection(config=_CLIENT_CONFIG)
        conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 256 * 1024,
            },
        )
        self.h2 = conn
        self.streams: dict[int, H2UpstreamStream] = {}
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.writing_paused = False  # the app's transport is over its high-water mark
        self.going_away = False  # the app sent GOAWAY, or we are closing: no new streams
        self.used = False
        self.idle_since = 0.0
        self._flush_soon = False
        # Streams go on a connection only once the app said how many it takes (its first
        # SETTINGS), as gRPC clients do: until then HTTP/2 would allow unlimited streams.
        self.settled: asyncio.Future[None] = pool.loop.create_future()

    @property
    def has_room(self) -> bool:
        if self.closed or self.going_away or not self.settled.done():
            return False
        limit = min(self.h2.remote_settings.max_concurrent_streams, MAX_STREAMS)
        return len(self.streams) < limit

    def open_stream(self) -> H2UpstreamStream:
        stream = H2UpstreamStream(self, self.h2.get_next_available_stream_id(), self.used)
        self.used = True
        self.streams[stream.sid] = stream
        return stream

    def stream_closed(self, stream: H2UpstreamStream) -> None:
        stream.closed = True
        stream.owner = None
        if self.streams.pop(stream.sid, None) is not None and not self.streams and not self.closed:
            self.idle_since = self.pool.loop.time()
            self.pool.went_idle(self)
            if self.going_away:
                self.close()

    def reset(self, stream: H2UpstreamStream, code: int) -> None:
        # A stream whose head was never sent (refused by request_head) is unknown to h2, and
        # resetting it there would close h2's whole connection (an invalid input in IDLE).
        if not stream.closed and not self.closed and stream.sid in self.h2.streams:
            with contextlib.suppress(h2.exceptions.ProtocolError):  # ended on h2's side
                self.h2.reset_stream(stream.sid, code)
            self.flush()
        self.stream_closed(stream)

    # --- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    def data_received(self, data: bytes) -> None:
        self.pool.metrics.up_in += len(data)
        if self.closed:
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:  # h2 queued a GOAWAY with the error's code
            self._broken("upstream_protocol_error", e)
            return
        except Exception as e:
            # h2 turns the frame errors it knows into ProtocolError; anything else h2,
            # hyperframe or hpack raise while reading is the app's bytes' doing all the same.
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.close_connection(ErrorCodes.PROTOCOL_ERROR)
            self._broken("upstream_protocol_error", e)
            return
        corked: list[Any] = []
        try:
            for event in events:
                handler = _CLIENT_HANDLERS.get(type(event))
                if handler is None:
                    continue
                stream = self.streams.get(getattr(event, "stream_id", 0))
                if stream is not None and stream.owner is not None:
                    down = stream.owner.down
                    if down not in corked:
                        down.cork()
                        corked.append(down)
                handler(self, event)
        except Exception as e:
            # As the HTTP/1.1 connection does: this app connection ends, its streams get 502
            # (or a reset, when their answer had begun); the proxy and other connections go on.
            log.exception("unexpected error relaying responses from an h2c app")
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.close_connection(ErrorCodes.INTERNAL_ERROR)
            self._broken("upstream_internal_error", e)
            return
        finally:
            for down in corked:
                down.uncork()
        self.flush()

    def _broken(self, reason: str, exc: Exception) -> None:
        """The app's connection can no longer be trusted: GOAWAY, counted; every stream on it
        is lost (a 502 for those not answered yet)."""
        self.pool.metrics.http2_connection_errors.labels(reason).inc()
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
            if stream.owner is not None and not stream.write_paused:
                stream.owner.upstream_write_paused(False)

    # --- events -----------------------------------------------------------------------------------
    def _owner(self, sid: int) -> tuple[H2UpstreamStream, UpstreamOwner] | None:
        stream = self.streams.get(sid)
        if stream is None or stream.owner is None:
            return None
        stream.received_any = True
        return stream, stream.owner

    def _on_response(self, event: h2.events.ResponseReceived) -> None:
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
        self.reset(stream, ErrorCodes.PROTOCOL_ERROR)
        owner.response_malformed(message)

    def _on_informational(self, event: h2.events.InformationalResponseReceived) -> None:
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

    def _on_data(self, event: h2.events.DataReceived) -> None:
        size = event.flow_controlled_length
        found = self._owner(event.stream_id)
        if found is None:
            if size:
                self.h2.acknowledge_received_data(size, event.stream_id)
            return
        stream, owner = found
        owner.response_data(event.data)
        if not size:
            return
        if stream.paused:
            # Held back from this stream's window only: the connection's is shared with other
            # clients' streams, which a client that does not read must not stop.
            stream.unacked += size
            self.h2.increment_flow_control_window(size)
        else:
            self.h2.acknowledge_received_data(size, event.stream_id)

    def _on_trailers(self, event: h2.events.TrailersReceived) -> None:
        found = self._owner(event.stream_id)
        if found is not None:
            found[1].response_trailers(list(event.headers))

    def _on_ended(self, event: h2.events.StreamEnded) -> None:
        found = self._owner(event.stream_id)
        if found is None:
            return
        stream, owner = found
        if stream.ended:
            self.stream_closed(stream)
        owner.response_end()

    def _on_reset(self, event: h2.events.StreamReset) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return
        owner = stream.owner
        self.stream_closed(stream)
        if owner is not None:
            # REFUSED_STREAM: the app did not process it at all (retried when that is safe).
            if event.error_code == ErrorCodes.REFUSED_STREAM:
                stream.received_any = False
            owner.upstream_lost(stream, StreamReset(event.error_code))

    def _on_window(self, event: h2.events.WindowUpdated) -> None:
        if event.stream_id:
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream.queue.parts:
                stream.window_opened()
            return
        for stream in list(self.streams.values()):
            if stream.queue.parts:
                stream.window_opened()

    def _on_settings(self, event: h2.events.RemoteSettingsChanged) -> None:
        if not self.settled.done():
            self.settled.set_result(None)
        if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            for stream in list(self.streams.values()):
                if stream.queue.parts:
                    stream.window_opened()

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        """The app is going away: no new stream goes on this connection, and streams above its
        last stream id were not processed (retryable). With NO_ERROR the others are still
        answered (an app stopping with a grace period), so they stay, and the connection
        closes with the last of them; with an error code they are lost too."""
        self.going_away = True
        last = event.last_stream_id if event.last_stream_id is not None else 0
        graceful = event.error_code == ErrorCodes.NO_ERROR
        self._lose_all(ConnectionResetError("the app sent GOAWAY"), above=last if graceful else 0)
        if not self.streams:
            self.close()

    # --- writing ----------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not self.closed:
            self.pool.metrics.up_out += len(data)
            transport.write(data)

    def flush(self) -> None:
        """Write what h2 holds at the end of this loop iteration, for all streams at once."""
        if not self._flush_soon:
            self._flush_soon = True
            self.pool.loop.call_soon(self.flush_now)

    def flush_now(self) -> None:
        self._flush_soon = False
        data = self.h2.data_to_send()
        if data:
            self.write(data)

    def close(self) -> None:
        """GOAWAY, then close once what was written is flushed."""
        self.going_away = True
        if self.transport is not None and not self.closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.close_connection()
            self.flush_now()
            self.transport.close()


def _status(value: bytes) -> int:
    """A `:status` of three digits, else 0 (h2 checks only that there is one)."""
    return int(value) if len(value) == 3 and value.isdigit() else 0


# Event type -> handler, for every connection.
_CLIENT_HANDLERS: dict[type[h2.events.Event], Callable[[H2UpstreamConnection, Any], None]] = {
    h2.events.ResponseReceived: H2UpstreamConnection._on_response,
    h2.events.InformationalResponseReceived: H2UpstreamConnection._on_informational,
    h2.events.DataReceived: H2UpstreamConnection._on_data,
    h2.events.TrailersReceived: H2UpstreamConnection._on_trailers,
    h2.events.StreamEnded: H2UpstreamConnection._on_ended,
    h2.events.StreamReset: H2UpstreamConnection._on_reset,
    h2.events.WindowUpdated: H2UpstreamConnection._on_window,
    h2.events.RemoteSettingsChanged: H2UpstreamConnection._on_settings,
    h2.events.ConnectionTerminated: H2UpstreamConnection._on_goaway,
}
