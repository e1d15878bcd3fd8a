"""One HTTP/2 stream as the exchange's `Downstream`: the response's head, body and trailers
within the client's flow-control windows, the request body acknowledged as the app takes it,
and the proxy's own answers ending the stream cleanly."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from proxy.core.answers import refuse
from proxy.core.headers import Headers
from proxy.core.links import Tunnel
from proxy.core.request import BadRequest
from proxy.http2.codec import ErrorCode
from proxy.http2.flow import STATUS, StreamHost, StreamSender

if TYPE_CHECKING:
    pass

log: Final = logging.getLogger("tls_sidecar.http")

# After an answer of the proxy's own while the client is still sending its body: read and drop
# up to this much (crediting the windows) before RST_STREAM NO_ERROR. Clients such as curl and
# httpx read the answer only once their body is sent, and treat the reset as an error.
DISCARD_BYTES: Final = 4 * 1024 * 1024


class H2Stream(StreamSender):
    """One request and its response on an HTTP/2 connection: the exchange's Downstream."""

    __slots__ = ()

    def __init__(self, conn: StreamHost, sid: int) -> None:
        super().__init__()
        self.conn = conn
        self.ctx = conn.ctx
        self.loop = conn.loop
        self.session = conn.session
        self.sid = sid
        self.exchange = None
        self.head = None  # a response head held until we know if a body follows
        self.holds = 0
        self.unacked = 0  # request bytes taken but not acknowledged (the app is not reading)
        self.head_sent = False
        self.client_ended = False  # the client's END_STREAM came: its side is done
        # response bytes the client's windows have no room for, held by the codec (as it said
        # last), and whether our end (END_STREAM or trailers) waits behind them there
        self.waiting_bytes = 0
        self.waiting_end = False
        self.ended = False  # our END_STREAM (or RST_STREAM) went out
        self.local_sent = False
        self.discard_left = 0  # after our own answer: request bytes still to be read and dropped
        self.upstream_paused = False

    # --- the request body -------------------------------------------------------------------------
    def request_data(self, data: bytes, size: int) -> None:
        if self.local_sent:  # answered already: the rest of the body is read and dropped
            self._discard(size)
            return
        exchange = self.exchange
        assert exchange is not None
        if self._phase == "request_body":
            self._phase_since = self.loop.time()
        exchange.request_data(data)
        if self.holds and not self.ended:
            self.unacked += size  # acknowledged when the app takes more
        elif size:
            self.conn.acknowledge(size, self.sid)

    def refuse(self, error: BadRequest) -> None:
        """A request refused before it had an exchange (431 for an oversized head, 405 for
        CONNECT): answered, counted and access-logged as over HTTP/1.1."""
        refuse(self.ctx, self, self.session, error, b"2")

    # --- Downstream -------------------------------------------------------------------------------
    def cork(self) -> None:
        self.conn.corked += 1

    def uncork(self) -> None:
        if self.head is not None:
            self._emit_head(False)
        conn = self.conn
        conn.corked -= 1
        if not conn.corked:
            conn.flush()

    def hold(self, reason: int) -> None:
        self.holds |= reason

    def release(self, reason: int) -> None:
        if self.holds & reason:
            self.holds &= ~reason
            if not self.holds and self.unacked and not self.ended:
                unacked, self.unacked = self.unacked, 0
                self.conn.acknowledge(unacked, self.sid)
                self.conn.flush()

    def _ended(self) -> None:
        self.ended = True
        self.conn.flush()
        exchange = self.exchange
        if self.local_sent:
            if not self.client_ended:  # the client is still sending
                self._start_discarding()
                return
            self._done()
        elif exchange is None or exchange.finished:
            self._done()

    # --- after an answer of our own, the rest of the request --------------------------------------
    def _start_discarding(self) -> None:
        """The answer went out whole while the request is still open: read and drop the rest
        of its body, so that a client sending it first sees the answer (RFC 9113 §8.1), up to
        DISCARD_BYTES or --idle-timeout without a byte, then RST_STREAM NO_ERROR."""
        if self.discard_left < 0:
            self.stop_discarding()
            return
        if self.unacked:
            unacked, self.unacked = self.unacked, 0
            self.conn.acknowledge(unacked, self.sid)
        self.arm("request_body", self.ctx.config.idle_timeout)

    def _discard(self, size: int) -> None:
        self._phase_since = self.loop.time()
        if size:
            self.conn.acknowledge(size, self.sid)
        self.discard_left -= size
        if self.discard_left < 0 and self.ended:  # else the answer still waits for the window
            self.stop_discarding()

    def stop_discarding(self) -> None:
        """Enough was dropped (or the client stalled): ask the client to stop, without error."""
        codec = self.conn.codec
        if codec.is_open(self.sid):
            # the answer goes out first: a codec may send a reset ahead of the frames it
            # still holds (nghttp2 does), and drop them
            self.conn.flush_now()
            codec.reset_stream(self.sid, ErrorCode.NO_ERROR)
            self.conn.flush()
        self._done()

    def request_ended(self) -> None:
        """The client's END_STREAM."""
        self.client_ended = True
        if self.local_sent:
            if self.ended:  # discarding: nothing more will come
                self._done()
            return
        exchange = self.exchange
        if exchange is not None:
            exchange.request_end()

    def send_informational(self, status: int, reason: bytes, headers: Headers) -> None:
        if status == 101:
            return
        self.conn.codec.send_headers(self.sid, [(b":status", STATUS[status]), *headers])
        self.conn.flush()

    def send_local(self, status: int, headers: Headers, body: bytes) -> None:
        """The proxy's own answer: the stream ends with it (the rest of the request is read and
        dropped, `_start_discarding`); the connection goes on."""
        if self.ended:
            return
        self.local_sent = True
        self.discard_left = DISCARD_BYTES
        codec = self.conn.codec
        head = [(b":status", STATUS.get(status) or b"%d" % status), *headers]
        if self.head_sent or self.waiting_bytes or not codec.is_open(self.sid):
            self.lost(ErrorCode.INTERNAL_ERROR)  # a response is under way: reset is all left
            return
        self.head = None
        self.head_sent = True
        if body:
            head.append((b"content-length", b"%d" % len(body)))
            codec.send_headers(self.sid, head)
            self.send_data(body)
            self.send_end()
        else:
            codec.send_headers(self.sid, head, end_stream=True)
            self._ended()
        self.conn.flush()

    def switch_protocols(self, upstream: Tunnel) -> None:
        upstream.abort()  # never asked for: an HTTP/2 request carries no Upgrade
        self.abort_all()

    def exchange_done(self) -> None:
        if self.ended:
            self._done()

    def abort_all(self) -> None:
        """The response cannot be completed: reset this stream, not the connection."""
        exchange = self.exchange
        code: int = ErrorCode.INTERNAL_ERROR
        if exchange is not None:
            code = exchange.reset_code or code
            if exchange.upstream is not None:
                exchange.upstream.abort()
        self._reset(code)

    def still_going(self, phase: str) -> bool:
        exchange = self.exchange
        return phase == "upstream" and exchange is not None and exchange.app_still_reading()

    def timed_out(self, phase: str) -> None:
        if self.local_sent and self.ended:  # the client stalled the body we were dropping
            self.stop_discarding()
            return
        exchange = self.exchange
        if phase == "upstream" and exchange is not None and exchange.timed_out():
            return
        if phase == "request_body" and exchange is not None and exchange.body_timed_out():
            if self.ended and self.sid in self.conn.streams:
                self.stop_discarding()  # the client is not sending: no point reading on
            return
        if exchange is not None and not exchange.finished:
            exchange.downstream_lost()
        self._reset(ErrorCode.CANCEL)

    def lost(self, code: int | None = None) -> None:
        """The client reset the stream, or the connection ended: nothing more is sent."""
        exchange = self.exchange
        if exchange is not None and not exchange.finished:
            exchange.downstream_lost()
        if code is not None and not self.ended:
            self._reset(code)
            return
        self.ended = True
        self._done()

    def _reset(self, code: int) -> None:
        self.head = None
        if not self.ended:
            self.ended = True
            codec = self.conn.codec
            if codec.is_open(self.sid):
                codec.reset_stream(self.sid, code)  # what waited there is dropped
                self.conn.flush()
        self._done()

    def _done(self) -> None:
        self.stop_timer()
        conn = self.conn
        if self.upstream_paused:
            self.upstream_paused = False
            conn.paused.pop(self.sid, None)
        if self.waiting_bytes:
            self.waiting_bytes = 0
            self.waiting_end = False
            conn.waiting.pop(self.sid, None)
            conn.resume_streams()  # what this stream held no longer fills the connection's
        if self.unacked:  # the connection's window still counts what this stream held back
            unacked, self.unacked = self.unacked, 0
            self.conn.acknowledge(unacked, self.sid)
        self.conn.stream_done(self)

    # --- backpressure on the app's side -----------------------------------------------------------
