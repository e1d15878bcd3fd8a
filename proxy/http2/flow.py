"""HTTP/2 flow control and the backpressure it carries, at both levels: a stream's response
within the client's windows (what waits in the codec, the cut of a window held shut, the end
behind the body), the app's side paused and resumed, and the connection's once-per-loop write
after which every waiting stream is looked at again. `stream.H2Stream` and
`server.Http2Connection` build on these."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Final, Protocol

from proxy.core.client_side import Downstream
from proxy.core.exchange import Exchange
from proxy.core.headers import Headers
from proxy.core.session import Session
from proxy.downstream import ClientConnection
from proxy.http2.codec import Http2ServerCodec

if TYPE_CHECKING:
    import asyncio

    from proxy.core.context import ProxyContext

# A response body waiting for the client's window: past this much per stream (or all streams
# together) the app's side is paused until the client reads.
STREAM_BUFFER: Final = 64 * 1024
CONNECTION_BUFFER: Final = 1024 * 1024
STATUS: Final = {code: b"%d" % code for code in range(100, 600)}


class StreamHost(Protocol):
    """What a stream needs of its connection (http2.server.Http2Connection)."""

    ctx: ProxyContext
    loop: asyncio.AbstractEventLoop
    session: Session
    codec: Http2ServerCodec
    waiting: dict[int, StreamSender]
    paused: dict[int, StreamSender]
    corked: int

    @property
    def streams(self) -> Mapping[int, object]: ...
    @property
    def buffered(self) -> int: ...

    def acknowledge(self, size: int, sid: int) -> None: ...
    def flush(self) -> None: ...
    def flush_now(self) -> None: ...
    def resume_streams(self) -> None: ...
    def stream_done(self, stream: StreamSender) -> None: ...


class StreamSender(Downstream):
    """A stream's state, and its response on its way within the client's windows (the base of
    `stream.H2Stream`)."""

    # ctx and loop are PhaseTimer's slots (a subclass that declares them again hides them
    # from the compiled PhaseTimer)
    __slots__ = (
        "client_ended",
        "conn",
        "discard_left",
        "ended",
        "exchange",
        "head",
        "head_sent",
        "holds",
        "local_sent",
        "sid",
        "unacked",
        "upstream_paused",
        "waiting_bytes",
        "waiting_end",
    )

    # Declared once in the hierarchy (ctx and loop are PhaseTimer's): compiled, an attribute
    # declared again is visited twice by the garbage collector, which then never frees a cycle
    # through it (a stream and its exchange, 1.2 KB per stream).
    conn: StreamHost
    sid: int
    exchange: Exchange | None
    head: Headers | None  # a response head held until we know if a body follows
    holds: int
    unacked: int  # request bytes taken but not acknowledged (the app is not reading)
    head_sent: bool
    client_ended: bool  # the client's END_STREAM came: its side is done
    # response bytes the client's windows have no room for, held by the codec (as it said
    # last), and whether our end (END_STREAM or trailers) waits behind them there
    waiting_bytes: int
    waiting_end: bool
    ended: bool  # our END_STREAM (or RST_STREAM) went out
    local_sent: bool
    discard_left: int  # after our own answer: request bytes still to be read and dropped
    upstream_paused: bool

    def _ended(self) -> None:
        """Our end went out (`H2Stream` decides what follows)."""
        raise NotImplementedError

    def send_head(self, status: int, reason: bytes, headers: Headers, length: int | None) -> None:
        self._phase_since = self.loop.time()
        headers.insert(0, (b":status", STATUS.get(status) or b"%d" % status))
        self.head = headers
        if not self.conn.corked:
            self._emit_head(False)
            self.conn.flush()

    def _emit_head(self, end: bool) -> None:
        """The held head goes out; with END_STREAM when nothing follows it (a gRPC
        trailers-only answer must be one HEADERS frame)."""
        head, self.head = self.head, None
        if head is not None:
            self.head_sent = True
            self.conn.codec.send_headers(self.sid, head, end_stream=end)

    def send_data(self, data: bytes) -> None:
        if not data:
            return
        self._phase_since = self.loop.time()
        if self.head is not None:
            self._emit_head(False)
        self._submitted(self.conn.codec.send_data(self.sid, data))
        self.conn.flush()

    def _submitted(self, waiting: int) -> None:
        """The codec took a response part; `waiting` bytes of this stream's wait for the
        client's windows (-1: the codec no longer has the stream)."""
        if waiting <= 0:
            return
        conn = self.conn
        if not self.waiting_bytes:  # the first: a shut window is cut in time
            self.arm("send", self.ctx.config.idle_timeout)
            conn.waiting[self.sid] = self
        self.waiting_bytes = waiting
        if not self.upstream_paused and (
            waiting > STREAM_BUFFER or conn.buffered > CONNECTION_BUFFER
        ):
            self.pause_upstream()

    def waiting_changed(self) -> None:
        """After a write: what the codec still holds of this stream's response."""
        before = self.waiting_bytes
        now = self.waiting_bytes = self.conn.codec.waiting(self.sid)
        if now:
            if now < before:
                self.arm("send", self.ctx.config.idle_timeout)  # it moved: the deadline too
            return
        self.conn.waiting.pop(self.sid, None)
        exchange = self.exchange
        if exchange is None or exchange.response_complete:
            self.stop_timer()
        elif self.upstream_paused:  # until the other streams' buffers drain: the client's
            self.arm("send", self.ctx.config.idle_timeout)
        else:
            self.arm("upstream", self.ctx.config.upstream_timeout)
        if self.waiting_end:  # the end went out behind the body
            self.waiting_end = False
            self._ended()

    def send_trailers(self, headers: Headers) -> None:
        if self.ended or self.waiting_end:
            return
        if self.head is not None:
            self._emit_head(False)
        self.conn.codec.send_trailers(self.sid, headers)  # after the body that waits
        self._end_submitted()

    def send_end(self) -> None:
        if self.ended or self.waiting_end:
            return
        if self.head is not None:
            self._emit_head(True)
        else:
            self._submitted(self.conn.codec.send_data(self.sid, b"", True))
        self._end_submitted()

    def _end_submitted(self) -> None:
        """The end is the codec's to send: done now, or once the body before it went out (the
        stream stays ours meanwhile, for the cut of a window held shut and for the drain)."""
        if self.waiting_bytes:
            self.waiting_end = True
            self.conn.flush()
            return
        self._ended()

    # --- backpressure on the app's side -----------------------------------------------------------
    def pause_upstream(self) -> None:
        self.upstream_paused = True
        self.conn.paused[self.sid] = self
        exchange = self.exchange
        if exchange is not None and exchange.upstream is not None:
            exchange.upstream.pause_reading()

    def resume_upstream(self) -> None:
        """Read from the app again (the connection decided there is room)."""
        if not self.upstream_paused:
            return
        self.upstream_paused = False
        self.conn.paused.pop(self.sid, None)
        exchange = self.exchange
        if exchange is not None and not exchange.finished:
            if not self.waiting_bytes and not exchange.response_complete:
                self.arm("upstream", self.ctx.config.upstream_timeout)  # the app's turn again
            if exchange.upstream is not None:
                exchange.upstream.resume_reading()


class ConnectionWriter(ClientConnection):
    """The connection's writing: the codec's output once per loop iteration, the streams that
    wait for the client's windows, resumed together once the buffers drained (the base of
    `server.Http2Connection`)."""

    codec: Http2ServerCodec
    # Streams with response bytes waiting in the codec for the client's windows: looked at
    # after each write, since a window opens as the codec writes.
    waiting: dict[int, StreamSender]
    # Streams whose app side is paused, resumed together once the buffers drained: a stream
    # paused for the connection's buffer may have nothing of its own waiting.
    paused: dict[int, StreamSender]
    writing_paused: bool  # the client's transport is over its high-water mark
    corked: int  # a response head waits while corked (it may end with its stream)
    _flush_soon: bool

    @property
    def buffered(self) -> int:
        """Response bytes waiting for the client's windows, all streams."""
        return self.codec.waiting(0)

    def acknowledge(self, size: int, sid: int) -> None:
        """Reopen the client's windows by what was taken (a closed stream's: the connection's
        only)."""
        self.codec.acknowledge(sid, size)

    def flush(self) -> None:
        """Write what the codec holds at the end of this loop iteration: the frames of every
        stream answered meanwhile go out in one TLS write."""
        if not self._flush_soon:
            self._flush_soon = True
            self.loop.call_soon(self.flush_now)

    def flush_now(self) -> None:
        self._flush_soon = False
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        data = self.codec.data_to_send()
        if data:
            self.write(data)
            if self.waiting:  # the windows let some of it through: who still waits, and what
                for stream in list(self.waiting.values()):
                    stream.waiting_changed()
                self.resume_streams()

    def close(self) -> None:
        """What the codec holds goes out first: nothing follows it."""
        self.flush_now()
        super().close()

    def open_streams(self) -> Iterable[StreamSender]:
        """The streams under way (the connection's own table)."""
        return ()

    # The stream a pooled upstream connection works for relays the app's backpressure.
    def pause_writing(self) -> None:
        self.writing_paused = True
        idle_timeout = self.ctx.config.idle_timeout
        for stream in self.open_streams():
            exchange = stream.exchange
            if stream._phase == "upstream" and exchange is not None and exchange.response_started:
                stream.arm("send", idle_timeout)  # the client is not reading: its time
            if not stream.upstream_paused:
                stream.pause_upstream()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.resume_streams()

    def resume_streams(self) -> None:
        """Every paused stream whose own buffer is low goes on, once the connection's buffer
        and transport have room again."""
        if not self.paused or self.writing_paused or self.buffered > CONNECTION_BUFFER // 2:
            return
        for stream in list(self.paused.values()):
            if stream.waiting_bytes <= STREAM_BUFFER // 2:
                stream.resume_upstream()
