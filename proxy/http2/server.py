"""HTTP/2 to one client (RFC 9113) through a server codec (`codec.Http2ServerCodec`: nghttp2
or h2, `--http2-codec`): each stream is one `Exchange`.

The connection turns the codec's events into exchanges and back; a stream is the exchange's
`Downstream`. Flow control is the backpressure both ways (`flow`): a request body is
acknowledged only once it went on to the app; a response body waits in the codec. The defences
against the known HTTP/2 attacks are ours, the same whichever codec runs: budgets for resets
and for frames that make the server work without a request (rapid reset; SETTINGS, PING and
empty DATA floods), the header block bound the codec is given (CONTINUATION flood), the cut of
a stream the client's window holds shut, the drain and the linger; the codec answers the
protocol errors it finds with GOAWAY.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

from proxy.core.answers import refuse_stream
from proxy.core.exchange import Exchange
from proxy.core.request import BadRequest
from proxy.http2.codec import (
    CodecError,
    CodecSettings,
    DataReceived,
    ErrorCode,
    GoAwayReceived,
    Http2ServerCodec,
    PingAcknowledged,
    PingReceived,
    RequestReceived,
    SettingsReceived,
    StreamEnded,
    StreamRefused,
    StreamReset,
    TrailersReceived,
    UnknownFrameReceived,
)
from proxy.http2.defences import CONTROL_BURST, CONTROL_RATE, Budget, CalmDown, header_list_bound
from proxy.http2.flow import ConnectionWriter, StreamSender
from proxy.http2.request import read_h2_head, read_h2_trailers
from proxy.http2.stream import H2Stream

if TYPE_CHECKING:
    from proxy.core.context import ProxyContext

log: Final = logging.getLogger("tls_sidecar.http")

# Windows we open to the client: what it may send before the app has taken it. A stream's
# window bounds what one slow upload buffers here; the connection's bounds them all together.
STREAM_WINDOW: Final = 256 * 1024
CONNECTION_WINDOW: Final = 1024 * 1024

LINGER_SECONDS: Final = 1.0
_DRAIN_PING: Final = b"drain\x00\x00\x00"
MALFORMED: Final = "malformed"  # errors.KINDS: how such a stream is reset
REFUSED: Final = "refused_stream"
CodecClass = Callable[[CodecSettings], Http2ServerCodec]


class Http2Connection(ConnectionWriter):
    """Serves HTTP/2 over TLS to one client; created when ALPN chose h2, with the codec class
    the server chose (`server.build_context`)."""

    def __init__(self, ctx: ProxyContext, codec: CodecClass) -> None:
        super().__init__(ctx)
        config = ctx.config
        # Up to the header block bound a head past --max-header-bytes is decoded whole (HPACK
        # state stays shared) and answered 431 on its stream; past it the connection ends.
        self.codec = codec(
            CodecSettings(
                max_concurrent_streams=config.max_concurrent_streams,
                max_header_bytes=header_list_bound(config.max_header_bytes),
                stream_window=STREAM_WINDOW,
                connection_window=CONNECTION_WINDOW,
            )
        )
        self.streams: dict[int, H2Stream] = {}
        self.waiting = {}
        self.paused = {}
        self.writing_paused = False
        self.corked = 0
        self._flush_soon = False
        self.going_away = False  # a GOAWAY went out (or came in): no new streams
        self._final_sent = False
        self._client_left = False  # the client said GOAWAY, with streams still under way
        now = self.loop.time()
        self._control = Budget(CONTROL_BURST, CONTROL_RATE, now)
        streams = config.max_concurrent_streams
        # Rapid reset (CVE-2023-44487): streams the client cancels before their answer, and
        # those the proxy or the codec refuses (past the limit, after a GOAWAY, malformed),
        # which a client can provoke as fast (the shape of "MadeYouReset", CVE-2025-8671).
        self._resets = Budget(max(200.0, 2.0 * streams), max(100.0, float(streams)), now)

    def start(self, early: bytes | None) -> None:
        """After the handshake: our SETTINGS (the codec's first output), then the client's. A
        connection that opens no stream is idle from the start: --idle-timeout closes it."""
        self.arm("idle", self.ctx.config.idle_timeout)
        self.flush()
        if early:
            self._received(early)

    @property
    def idle(self) -> bool:
        return not self.streams

    def open_streams(self) -> Iterable[H2Stream]:
        return list(self.streams.values())

    def _lose_streams(self) -> None:
        for stream in self.open_streams():
            stream.lost()

    def begin_drain(self) -> None:
        """GOAWAY with the largest stream id first (streams under way may still arrive), then,
        a round trip later (a PING's answer), with the last stream actually taken."""
        if self.closed or self.going_away:
            return
        self.going_away = True
        if not self.streams:
            self._final_goaway()
            return
        self._goaway(2**31 - 1)
        self.codec.ping(_DRAIN_PING)
        self.flush()

    def _final_goaway(self) -> None:
        if self._final_sent:
            return
        self._final_sent = True
        self._goaway(self.codec.highest_stream_id)
        if not self.streams:
            self.close()

    def _goaway(self, last_stream_id: int) -> None:
        """A graceful GOAWAY: the streams in flight are still answered."""
        self.codec.goaway(ErrorCode.NO_ERROR, last_stream_id)
        self.flush_now()

    # --- the client's bytes ---------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.counts.down_in += len(data)
        self._received(data)

    def eof_received(self) -> bool | None:
        return False

    def _received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.codec.receive(data)
        except CodecError as refused:  # the codec queued a GOAWAY with the error's code
            self._connection_error(refused.reason, str(refused))
            return
        except Exception as e:  # each handler its own name: compiled, `e` has one type
            # A codec turns the frame errors it knows into CodecError; anything else raised
            # while reading is still the client's bytes' doing: a connection error, not a
            # traceback.
            detail = f"{type(e).__name__}: {e}"
            self._connection_error("protocol_error", detail, ErrorCode.PROTOCOL_ERROR)
            return
        self.corked += 1
        try:
            for event in events:
                handler = _SERVER_HANDLERS.get(type(event))
                if handler is not None:
                    handler(self, event)
        except CalmDown as spent:
            self.corked -= 1
            self._connection_error(spent.reason, str(spent), ErrorCode.ENHANCE_YOUR_CALM)
            return
        except Exception:
            log.exception(
                "unexpected error on an HTTP/2 connection",
                extra={"client": self.session.client.address},
            )
            self.corked -= 1
            self._connection_error("internal_error", "", ErrorCode.INTERNAL_ERROR)
            return
        self.corked -= 1
        self.flush()

    def _connection_error(self, reason: str, message: str, code: int | None = None) -> None:
        """End the connection with GOAWAY (the codec queued it already unless `code` is given)."""
        self.ctx.metrics.h2_errors.add(reason)
        self.stop_timer()  # the linger ends it; an idle timeout would say GOAWAY once more
        log.info(
            "http/2 connection error",
            extra={"client": self.session.client.address, "reason": reason, "detail": message},
        )
        if code is not None:
            self.codec.goaway(code, self.codec.highest_stream_id, terminate=True)
        self.going_away = self._final_sent = True
        self.flush_now()
        self._linger()
        self._lose_streams()

    def _linger(self) -> None:
        """Close a little later, reading and dropping what still comes (nginx's lingering close):
        unread bytes at close make a TCP reset, which kills the GOAWAY before a flood reads it."""
        self.closed = True
        if self.transport is not None:
            self.loop.call_later(LINGER_SECONDS, self.abort)

    def _calm(self, budget: Budget, reason: str) -> None:
        if not budget.spend(self.loop.time()):
            raise CalmDown(reason, f"{reason.replace('_', ' ')} budget spent")

    # --- events ---------------------------------------------------------------------------------
    def _on_request(self, event: RequestReceived) -> None:
        sid = event.stream_id
        # past the last stream id our GOAWAY promised to serve, or past the limit (exchanges
        # may outlive the codec's streams: an answer of our own still reading the body)
        if self._final_sent or len(self.streams) >= self.ctx.config.max_concurrent_streams:
            self._calm(self._resets, "rapid_reset")
            why = "after GOAWAY" if self._final_sent else "past --max-concurrent-streams"
            self.codec.reset_stream(sid, refuse_stream(self.ctx, self.session, REFUSED, why))
            return
        try:
            head = read_h2_head(event.headers, event.ended)
        except BadRequest as e:
            if e.reason == MALFORMED:  # a reset, not an answer
                self._calm(self._resets, "rapid_reset")
                self.codec.reset_stream(
                    sid, refuse_stream(self.ctx, self.session, MALFORMED, str(e))
                )
                return
            head = None
            refusal: BadRequest | None = e
        else:
            refusal = None
        self.stop_timer()  # the idle timer runs only while no stream is open
        stream = H2Stream(self, sid)
        stream.client_ended = event.ended
        self.streams[sid] = stream
        if head is None:
            assert refusal is not None
            stream.refuse(refusal)
            return
        exchange = Exchange(self.ctx, stream, self.session, head)
        stream.exchange = exchange
        exchange.start()

    def _on_data(self, event: DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        size = event.flow_controlled_length
        if not event.data:
            self._calm(self._control, "control_flood")  # empty DATA frames: work, no progress
        if stream is None or stream.exchange is None:
            if size:
                self.acknowledge(size, event.stream_id)
            return
        exchange = stream.exchange
        declared = exchange.head.content_length
        if declared is not None and exchange.bytes_in + len(event.data) > declared:
            self._body_length_wrong(stream, "more DATA than its Content-Length")
            if size:
                self.acknowledge(size, event.stream_id)
            return
        stream.request_data(event.data, size)

    def _on_stream_ended(self, event: StreamEnded) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            exchange = stream.exchange
            if exchange is not None and not stream.local_sent:
                declared = exchange.head.content_length
                if declared is not None and exchange.bytes_in != declared:
                    self._body_length_wrong(stream, "less DATA than its Content-Length")
                    return
            stream.request_ended()

    def _body_length_wrong(self, stream: H2Stream, detail: str) -> None:
        """H2.CL: DATA contradicting the Content-Length, a malformed request (RFC 9113 §8.1.1).
        The bytes past it never reach the app (HTTP/1.1 would read them as the next request);
        the stream is reset PROTOCOL_ERROR, the others go on, the app's side is given up."""
        self._malformed(detail)
        answered = stream.ended
        stream.lost(ErrorCode.PROTOCOL_ERROR)
        if answered:
            self.codec.reset_stream(stream.sid, ErrorCode.PROTOCOL_ERROR)
        self._calm(self._resets, "rapid_reset")

    def _malformed(self, detail: str) -> None:
        """Reset for breaking the protocol under way: counted (its exchange logs the line)."""
        self.ctx.metrics.resets.add(MALFORMED)
        log.debug(
            "malformed http/2 request",
            extra={"client": self.session.client.address, "detail": detail},
        )

    def _on_trailers(self, event: TrailersReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.exchange is None:
            return
        try:
            stream.exchange.request_trailers = read_h2_trailers(event.headers)
        except BadRequest:
            stream.lost(ErrorCode.PROTOCOL_ERROR)

    def _on_reset(self, event: StreamReset) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return
        exchange = stream.exchange
        if exchange is not None and not exchange.response_complete:
            self._calm(self._resets, "rapid_reset")
        stream.lost(event.error_code)

    def _on_refused(self, event: StreamRefused) -> None:
        """The codec reset a stream itself (past the limit, or the client broke the protocol
        on it, as a body contradicting its Content-Length): the refused-stream budget pays."""
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            if event.error_code == ErrorCode.PROTOCOL_ERROR and stream.exchange is not None:
                self._malformed("the stream broke the protocol (its body's length)")
            stream.lost()
        else:  # refused before the proxy saw it (the codec's own stream limit)
            refuse_stream(self.ctx, self.session, REFUSED, "refused by the codec")
        self._calm(self._resets, "rapid_reset")

    def _on_control(self, event: SettingsReceived | PingReceived | UnknownFrameReceived) -> None:
        self._calm(self._control, "control_flood")

    def _on_ping_ack(self, event: PingAcknowledged) -> None:
        if event.data == _DRAIN_PING and self.going_away:
            self._final_goaway()  # a round trip after the first GOAWAY: no stream is in flight

    def _on_goaway(self, event: GoAwayReceived) -> None:
        """The client is going away: it opens no new stream. With NO_ERROR the streams under
        way are still answered (RFC 9113 §6.8; a client may say GOAWAY right after a response's
        head and read its body on), and the last of them closes the connection with our
        GOAWAY; with an error code they end now."""
        if event.error_code == ErrorCode.NO_ERROR and not self.closed:
            # Our GOAWAY goes last: a client on h2 itself would stop reading at it.
            self.going_away = self._final_sent = self._client_left = True
            self._when_idle()
            return
        self.going_away = self._final_sent = True
        self.closed = True
        self._lose_streams()
        self.close()

    # --- writing ----------------------------------------------------------------------------------
    def stream_done(self, stream: StreamSender) -> None:
        if self.streams.pop(stream.sid, None) is not None:
            self._when_idle()

    def _when_idle(self) -> None:
        """No stream left: close after the final GOAWAY, else wait --idle-timeout for one."""
        if self.streams or self.closed:
            return
        if self._final_sent:
            if self._client_left:
                self._goaway(self.codec.highest_stream_id)
            self.close()
        elif self.going_away:
            # Draining, and the last stream is done before the PING's answer came (or it never
            # comes): no stream is in flight that the final GOAWAY could cut, so it goes now.
            self._final_goaway()
        else:
            self.arm("idle", self.ctx.config.idle_timeout)

    def timed_out(self, phase: str) -> None:
        if phase in ("idle", "header") and not self.streams:
            self.going_away = self._final_sent = True
            self.codec.goaway(ErrorCode.NO_ERROR, self.codec.highest_stream_id, terminate=True)
            self.flush()
            self.close()
        else:
            self.abort_all()

    def abort_all(self) -> None:
        self._lose_streams()
        self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose_streams()
        self.streams.clear()
        self.waiting.clear()
        self.codec.close()  # nghttp2's session is freed now, on every way a connection ends
        self.forget()


# Event type -> handler: one table for every connection (not bound methods per connection).
# WindowUpdated needs none: what waited goes out at the next write, looked at after it.
_SERVER_HANDLERS: Final[dict[type[Any], Callable[[Http2Connection, Any], None]]] = {
    RequestReceived: Http2Connection._on_request,
    DataReceived: Http2Connection._on_data,
    StreamEnded: Http2Connection._on_stream_ended,
    TrailersReceived: Http2Connection._on_trailers,
    StreamReset: Http2Connection._on_reset,
    StreamRefused: Http2Connection._on_refused,
    SettingsReceived: Http2Connection._on_control,
    PingReceived: Http2Connection._on_control,
    PingAcknowledged: Http2Connection._on_ping_ack,
    UnknownFrameReceived: Http2Connection._on_control,
    GoAwayReceived: Http2Connection._on_goaway,
}
