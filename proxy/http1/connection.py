"""HTTP/1.1 to one client: keep-alive, pipelining, early answers and WebSocket tunnels, over a
codec (httptools or h11); each request is an `Exchange`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from proxy.core.answers import refuse
from proxy.core.exchange import HOLD_PIPELINE, HOLD_UPSTREAM_FULL, Exchange
from proxy.core.headers import Headers
from proxy.core.links import Tunnel, UpstreamLink
from proxy.core.request import BadRequest, RequestHead
from proxy.downstream import ClientConnection

if TYPE_CHECKING:
    from proxy.core.context import ProxyContext
    from proxy.http1.codec import ServerCodec

log: Final = logging.getLogger("tls_sidecar.http")


class Http1Connection(ClientConnection):
    """Serves HTTP/1.1 over TLS to one client; a Downstream for one exchange at a time."""

    def __init__(self, ctx: ProxyContext) -> None:
        super().__init__(ctx)
        # Made once the handshake is done and ALPN did not choose HTTP/2 (see handshake_complete).
        self.codec: ServerCodec
        self.exchange: Exchange | None = None
        self.tunnel: Tunnel | None = None
        self._early: list[bytes] | None = None  # bytes that came with the handshake's last flight
        self._corked: list[bytes] | None = None  # response parts gathered during one app read
        self._received_since_idle = False
        # A WebSocket session (after 101): its request, when it started, bytes each way.
        self._tunnel_exchange: Exchange | None = None
        self._tunnel_started = 0.0
        self._tunnel_in = 0
        self._tunnel_out = 0

    @property
    def idle(self) -> bool:
        return not self.handshaking and self.exchange is None and not self._received_since_idle

    def begin_drain(self) -> None:
        if (self.idle and self.tunnel is None) or (self.retiring and self.tunnel is not None):
            self.close()

    def handshake_complete(self) -> None:
        early, self._early = self._early, None
        successor_class = self._alpn_successor()
        if successor_class is not None:
            successor = successor_class(self.ctx)
            self.hand_over(successor)
            successor.start(b"".join(early) if early else None)
            return
        self.codec = self.ctx.server_codec(self, self.ctx.config.max_header_bytes)
        if early:
            self._received(b"".join(early))  # counted when it arrived

    def _alpn_successor(self) -> Callable[[ProxyContext], Any] | None:
        """The connection class for the protocol ALPN chose, when it is not HTTP/1.1."""
        protocols = self.ctx.protocols
        if not protocols:
            return None
        assert self.transport is not None
        ssl_object = self.transport.get_extra_info("ssl_object")
        chosen = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        return protocols.get(chosen) if chosen else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.handshaking:
            self.closed = True  # the handshake step sees this and cleans up
            return
        exchange = self.exchange
        if exchange is not None and not exchange.finished:
            exchange.downstream_lost()
        if self.tunnel is not None:
            self.tunnel.abort()
            self.tunnel = None
            self._tunnel_ended()
        self.forget()
        codec = getattr(self, "codec", None)  # none when the handshake failed
        if codec is not None:
            codec.detach()  # freed by reference counting, not by the cycle collector

    def eof_received(self) -> bool | None:
        return False  # TLS has no half-close: the client is gone

    # --- the client's bytes -------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.counts.down_in += len(data)
        if self.handshaking:  # delivered before the handshake step returned: parse after it
            if self._early is None:
                self._early = []
            self._early.append(data)
            return
        self._received(data)

    def _received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self._phase_since = self.loop.time()
            self._tunnel_in += len(data)
            self.tunnel.write(data)
            return
        codec = self.codec
        starting = False
        if self.exchange is None:
            if not self._received_since_idle:
                self._received_since_idle = starting = True
        elif codec.paused:
            self.hold(HOLD_PIPELINE)  # a pipelined request: parsed after the current response
        elif self._phase == "request_body":
            self._phase_since = self.loop.time()
        try:
            codec.feed(data)
            if starting and self.exchange is None and not self.closed:
                # The head did not come whole in this read: it now has --header-timeout.
                self.arm("header", self.ctx.config.header_timeout)
        except BadRequest as e:
            self._refuse(e)
        except Exception:
            log.exception(
                "unexpected error on a client connection",
                extra={"client": self.session.client.address},
            )
            self.ctx.metrics.local.add("500", "internal_error")
            self.abort_all()

    # RequestSink: what the codec parsed
    def on_request_head(self, head: RequestHead) -> None:
        self._phase = None
        self._received_since_idle = True
        exchange = self.exchange = Exchange(self.ctx, self, self.session, head)
        exchange.start()

    def on_request_data(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.request_data(data)

    def on_request_end(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.request_end()

    def _refuse(self, error: BadRequest) -> None:
        exchange = self.exchange
        if exchange is not None and not exchange.finished:
            exchange.local(error.status, error.reason, str(error))
            return
        refuse(self.ctx, self, self.session, error, b"1.1")

    # --- Downstream: what the exchange sends --------------------------------------------------
    def cork(self) -> None:
        """Gather what is sent until `uncork`: one TLS record and one write for a response
        that arrived in one read, instead of one per part."""
        if self._corked is None:
            self._corked = []

    def close(self) -> None:
        self.uncork()  # a response gathered before the close goes out first
        super().close()

    def uncork(self) -> None:
        parts, self._corked = self._corked, None
        if parts and not self.closed:
            self.write(parts[0] if len(parts) == 1 else b"".join(parts))

    def _send(self, data: bytes) -> None:
        if self._corked is not None:
            self._corked.append(data)
        else:
            self.write(data)

    def send_head(self, status: int, reason: bytes, headers: Headers, length: int | None) -> None:
        self._phase_since = self.loop.time()
        if self.ctx.draining or self.retiring:
            headers.append((b"connection", b"close"))
        self._send(self.codec.response_head(status, reason, headers, length))

    def send_data(self, data: bytes) -> None:
        self._phase_since = self.loop.time()
        parts = self.codec.response_data(data)
        if not parts:
            return
        if self._corked is not None:
            self._corked += parts
        else:
            self.writelines(parts)

    def send_trailers(self, headers: Headers) -> None:
        """Response trailers reach an HTTP/1.1 client that sent `TE: trailers` as the trailer
        section of a chunked body (gRPC's `grpc-status`, as nginx and HAProxy relay it);
        otherwise the body ends as usual without them."""
        exchange = self.exchange
        if headers and exchange is not None and exchange.head.trailers:
            self.codec.response_trailers(headers)

    def send_end(self) -> None:
        end = self.codec.response_end()
        if end:
            self._send(end)

    def send_informational(self, status: int, reason: bytes, headers: Headers) -> None:
        self._send(self.codec.informational(status, reason, headers))

    def send_local(self, status: int, headers: Headers, body: bytes) -> None:
        """The proxy's own answer; the connection closes after it (its framing is done with)."""
        self._phase = None
        self.uncork()
        parts = self.codec.local_response(status, headers, body)
        if parts is None:
            self.abort()  # a response is already under way: closing is the only answer left
            return
        self.write(b"".join(parts))
        self.close()

    def switch_protocols(self, upstream: Tunnel) -> None:
        self.uncork()
        self._tunnel_exchange = self.exchange
        self._tunnel_started = time.perf_counter()
        self.exchange = None
        self.tunnel = upstream
        upstream.start_tunnel(self)
        leftover_up = upstream.codec.take_leftover()
        leftover_down = self.codec.take_leftover()
        if leftover_up:
            self.tunnel_data(leftover_up)
        if leftover_down:
            upstream.write(leftover_down)
        self.release(HOLD_PIPELINE)
        self.arm("tunnel", self.ctx.config.idle_timeout)

    def exchange_done(self) -> None:
        self.exchange = None
        # A pooled connection no longer reports to us: its backpressure hold ends with it.
        if self._holds:
            self.release(HOLD_UPSTREAM_FULL | HOLD_PIPELINE)
        if self.ctx.draining or self.retiring:
            self.close()
            return
        self._received_since_idle = False
        self.arm("idle", self.ctx.config.idle_timeout)
        # This runs inside the app connection's read (its codec just ended the response): a
        # pipelined request parsed now is the client's, and so is its refusal, answered here;
        # nothing of it may reach the app connection's code, which went back to the pool.
        try:
            going_on = self.codec.next_cycle()  # which delivers a pipelined request at once
        except BadRequest as e:
            self._refuse(e)
            return
        except Exception:
            log.exception(
                "unexpected error on a client connection",
                extra={"client": self.session.client.address},
            )
            self.ctx.metrics.local.add("500", "internal_error")
            self.abort_all()
            return
        if not going_on:
            self.close()

    def still_going(self, phase: str) -> bool:
        exchange = self.exchange
        return phase == "upstream" and exchange is not None and exchange.app_still_reading()

    def timed_out(self, phase: str) -> None:
        exchange = self.exchange
        if phase == "header" and self._received_since_idle and exchange is None:
            self._refuse(BadRequest("header_timeout", "request head not received in time"))
        elif exchange is not None and (
            (phase == "upstream" and exchange.timed_out())
            or (phase == "request_body" and exchange.body_timed_out())
        ):
            return  # answered (504, 408)
        elif phase == "idle":
            self.close()
        else:
            self.abort_all()

    def abort_all(self) -> None:
        exchange = self.exchange
        if exchange is not None and exchange.upstream is not None:
            exchange.upstream.abort()
        if self.tunnel is not None:
            self.tunnel.abort()
        self.abort()

    # --- the client's transport and the tunnel --------------------------------------------------
    def pause_writing(self) -> None:
        if self._phase == "upstream":  # the client is not reading: its time, not the app's
            self.arm("send", self.ctx.config.idle_timeout)
        upstream = self.tunnel or (self.exchange.upstream if self.exchange else None)
        if upstream is not None:
            upstream.pause_reading()

    def resume_writing(self) -> None:
        if self._phase == "send":
            self.arm("upstream", self.ctx.config.upstream_timeout)
        else:
            self._phase_since = self.loop.time()
        upstream = self.tunnel or (self.exchange.upstream if self.exchange else None)
        if upstream is not None:
            upstream.resume_reading()

    def tunnel_data(self, data: bytes) -> None:
        self._phase_since = self.loop.time()
        self._tunnel_out += len(data)
        self.write(data)

    def upstream_lost(self, upstream: UpstreamLink, exc: Exception | None) -> None:
        if self.tunnel is upstream:
            self.tunnel = None
            self._tunnel_ended()
            self.close()

    def _tunnel_ended(self) -> None:
        """One access-log line per WebSocket session, when it ends: how long, bytes each way."""
        exchange, self._tunnel_exchange = self._tunnel_exchange, None
        if exchange is None:
            return
        self.ctx.access(
            self.session,
            exchange.head,
            status=101,
            bytes_in=self._tunnel_in,
            bytes_out=self._tunnel_out,
            duration=time.perf_counter() - self._tunnel_started,
            upstream_duration=None,
            request_id=exchange.request_id,
            upstream_status=101,
            event="websocket_end",
        )

    def upstream_write_paused(self, paused: bool) -> None:
        if paused:
            self.hold(HOLD_UPSTREAM_FULL)
        else:
            self.release(HOLD_UPSTREAM_FULL)
