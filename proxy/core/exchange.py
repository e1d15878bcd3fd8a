"""One request's life between a downstream and the app, knowing no wire protocol.

A downstream (an HTTP/1.1 connection; an HTTP/2 stream) hands over a checked `RequestHead`, body
chunks and an end; the exchange decides what the app gets (or answers itself), holds the upstream
connection, relays the response back through the downstream's `send_*`, retries what is safe to
retry and moves the timeout phases; how it ends (its own answers, timeouts, the one record in
metrics and the access log) is `ending.ExchangeEnds`, its base.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Final

from proxy.core import headers as hdr
from proxy.core.client_side import Downstream
from proxy.core.ending import ExchangeEnds
from proxy.core.headers import Headers
from proxy.core.links import UpstreamConnectError, UpstreamLink
from proxy.core.request import (
    BadRequest,
    RequestHead,
    upgrade_protocol,
    upstream_request,
)
from proxy.core.session import HOLD_CONNECT, HOLD_PIPELINE, HOLD_UPSTREAM_FULL, Session

if TYPE_CHECKING:
    from proxy.core.context import ProxyContext

log: Final = logging.getLogger("tls_sidecar.http")

__all__ = [
    "HOLD_CONNECT",
    "HOLD_PIPELINE",
    "HOLD_UPSTREAM_FULL",
    "Downstream",
    "Exchange",
]


_UNKNOWN: Final = 1 << 62
# A body this large may still sit in buffers when the request ends (see app_still_reading).
_LARGE_BODY: Final = 65536


class Exchange(ExchangeEnds):
    """One request and its response."""

    __slots__ = ()

    # Every attribute is declared once, in ExchangeEnds: compiled, one declared again is
    # visited twice by the garbage collector, which then never frees a cycle through it.
    def __init__(
        self, ctx: ProxyContext, down: Downstream, session: Session, head: RequestHead
    ) -> None:
        self.ctx = ctx
        self.counts = counts = ctx.metrics.counts
        self.down = down
        self.session = session
        self.pool = session.pool or ctx.pool  # a client connection's own with PROXY out
        self.head = head
        self.started = time.perf_counter()
        client_id = head.request_id
        self.request_id = (
            client_id
            if client_id is not None and hdr.valid_request_id(client_id)
            else ctx.new_request_id()
        )
        self.request = None
        self.upstream = None
        self.connect_task = None
        self.request_complete = False
        self.response_started = False
        self.response_complete = False
        self.finished = False
        self.retried = False
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.sent_at = 0.0
        self.upstream_duration = None
        self.upstream_status = None  # what the app answered, if it did
        self.local_reason = None  # (reason, detail) of our own answer
        self.request_trailers = None  # the client's, sent on with the end
        self.reset_code = None  # how the app's HTTP/2 stream was reset
        self.grpc_status = None
        self._unread = _UNKNOWN  # request bytes the app had not read when last asked
        self._pending = None  # body that arrived while connecting
        counts.in_flight += 1

    # --- the request ----------------------------------------------------------------------------
    def start(self) -> None:
        ctx = self.ctx
        config = ctx.config
        session = self.session
        if session.denied is not None:
            ctx.metrics.denied.add(session.denied)
            who = session.identity.subject if session.identity else ""
            message = (
                f"client certificate {who} is not allowed"
                if who
                else "a client certificate is required"
            )
            self.local(403, f"client_{session.denied}", message)
            return
        prepared = upstream_request(
            self.head,
            session.client,
            trust_forwarded=config.trust_forwarded_headers,
            request_id=self.request_id,
            upstream_host=ctx.upstream_host,
            max_header_bytes=config.max_header_bytes,
            max_body_bytes=config.max_body_bytes,
            allowed_upgrades=ctx.allowed_upgrades,
            xfcc=session.xfcc,
        )
        if isinstance(prepared, BadRequest):
            self.local(prepared.status, prepared.reason, str(prepared))
            return
        self.request = prepared
        if self.head.expect_continue and self.head.has_body:
            # As Envoy does: once admitted (403, 413 and the rest were decided above), the
            # client may send its body at once; most apps never send 100 themselves.
            self.down.send_informational(100, b"Continue", [])
        upstream = self.pool.take_idle()
        if upstream is not None:
            self._attach(upstream)
        else:
            self._connect_soon()

    def _connect_soon(self) -> None:
        self.down.hold(HOLD_CONNECT)
        if self._pending is None:
            self._pending = []
        self.connect_task = self.ctx.loop.create_task(self._connect())

    async def _connect(self) -> None:
        try:
            upstream = await self.pool.connect()
        except UpstreamConnectError as e:
            if not self.finished:
                self.local(e.status, f"upstream_{e.reason}", str(e))
            return
        self.connect_task = None
        if self.finished:
            self.pool.close(upstream)
            return
        try:
            self._attach(upstream)
            self.down.release(HOLD_CONNECT)
        except Exception:
            # Nobody awaits this task: an error here must still end the connection.
            log.exception(
                "unexpected error starting a request",
                extra={"client": self.session.client.address},
            )
            self.down.abort_all()

    def _attach(self, upstream: UpstreamLink) -> None:
        request = self.request
        assert request is not None
        upstream.owner = self
        self.upstream = upstream
        codec = upstream.codec
        try:
            parts = [
                codec.request_head(
                    self.head.method, request.target, request.headers, chunked=self.head.chunked
                )
            ]
        except BadRequest as e:
            self.pool.close(upstream)
            self.upstream = None
            self.local(e.status, e.reason, f"request cannot be forwarded: {e}")
            return
        except Exception:
            # Never into the connection: one request that cannot be encoded fails alone.
            log.exception(
                "unexpected error encoding a request for the app",
                extra={"client": self.session.client.address},
            )
            self.ctx.pool.close(upstream)
            self.upstream = None
            self.local(502, "internal_error", "the request could not be sent to the app")
            return
        pending, self._pending = self._pending, None
        if pending:
            for data in pending:
                parts += codec.request_data(data)
        if self.request_complete:
            parts.append(codec.request_end(self.request_trailers))
        if len(parts) == 1:
            upstream.write(parts[0])
        else:
            upstream.writelines(parts)
        self.sent_at = time.perf_counter()
        config = self.ctx.config
        if self.request_complete:
            self._upstream_phase(upstream)
        elif self.head.has_body:  # a bodiless request's end follows at once and arms upstream
            self.down.arm("request_body", config.idle_timeout)

    def request_data(self, data: bytes) -> None:
        self.bytes_in += len(data)
        limit = self.ctx.config.max_body_bytes
        if limit is not None and self.bytes_in > limit:
            self.local(413, "body_too_large", f"request body over {limit} bytes")
            return
        upstream = self.upstream
        if upstream is not None:
            upstream.writelines(upstream.codec.request_data(data))
        elif self._pending is not None:
            self._pending.append(data)
        # else: answered already (an early answer, or our own): the rest is read and dropped

    def request_end(self) -> None:
        self.request_complete = True
        if self.finished:
            return
        upstream = self.upstream
        if upstream is not None:
            end = upstream.codec.request_end(self.request_trailers)
            if end:
                upstream.write(end)
        if self.response_complete:
            self._complete()
        elif not self.response_started and self._pending is None:
            self._upstream_phase(upstream)

    def _upstream_phase(self, upstream: UpstreamLink | None) -> None:
        """The request is all with the app's connection: the app's time starts."""
        if upstream is not None and self.bytes_in >= _LARGE_BODY:
            # Where the body stands now, so an app that reads none of it gets no extension.
            self._unread = upstream.unread_request_bytes()
        self.down.arm("upstream", self.ctx.config.upstream_timeout)

    # --- the app's response (called by the upstream connection's codec) -------------------------
    def response_head(
        self, status: int, reason: bytes, headers: Headers, length: int | None
    ) -> None:
        self.status = self.upstream_status = status
        self.response_started = True
        self.upstream_duration = time.perf_counter() - self.sent_at
        self.counts.upstream_responded(self.upstream_duration)
        if self.head.grpc:  # a trailers-only answer carries the status in its head
            self.grpc_status = hdr.get_header(headers, b"grpc-status")
        # Sending pushes the downstream's deadline: the upstream phase now times the body.
        self.down.send_head(
            status, reason or hdr.reason_phrase(status), hdr.response_headers(headers), length
        )

    def response_data(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self.down.send_data(data)

    def response_trailers(self, headers: Headers) -> None:
        if self.head.grpc:
            self.grpc_status = hdr.get_header(headers, b"grpc-status")
        self.down.send_trailers(hdr.trailer_fields(headers))

    def response_end(self) -> None:
        self.response_complete = True
        self.down.send_end()
        if not self.request_complete:
            # The app answered before the whole body arrived (a 401 or 413, or an app that does
            # not read bodies): the rest is relayed or dropped, then both sides can go on.
            self.down.arm("request_body", self.ctx.config.idle_timeout)
            return
        self._complete()

    def response_informational(self, status: int, reason: bytes, headers: Headers) -> None:
        reason = reason or hdr.reason_phrase(status)
        if status != 101:
            if self.head.version != b"1.0":  # RFC 9110 §15.2: never a 1xx to HTTP/1.0
                self.down.send_informational(status, reason, hdr.response_headers(headers))
            return
        if self.request is None or not self.request.upgrade:
            self.response_malformed("101 Switching Protocols to a request that did not upgrade")
            return
        # The protocol switched to is the one the client asked for (RFC 9110 §7.8), never
        # another (an app answering `Upgrade: h2c` to a WebSocket request).
        asked = upgrade_protocol(self.head.upgrade or b"")
        if upgrade_protocol(hdr.get_header(headers, b"upgrade") or b"") != asked:
            self.response_malformed("101 Switching Protocols to a protocol not asked for")
            return
        # The app switched protocols (WebSocket): from now on the downstream relays raw bytes.
        tunnel = self.upstream.as_tunnel() if self.upstream is not None else None
        if tunnel is None:
            self.response_malformed("101 Switching Protocols over HTTP/2")
            return
        self.upstream = None
        self.status = 101
        self.upstream_duration = time.perf_counter() - self.sent_at
        self.down.send_informational(
            status, reason, hdr.response_headers(headers, switching_protocols=True)
        )
        self._finish(101)
        self.down.switch_protocols(tunnel)

    def response_malformed(self, message: str) -> None:
        self._upstream_failed("bad_response", f"malformed response from the app: {message}")

    def upstream_write_paused(self, paused: bool) -> None:
        if paused:
            self.down.hold(HOLD_UPSTREAM_FULL)
        else:
            self.down.release(HOLD_UPSTREAM_FULL)

    def upstream_lost(self, upstream: UpstreamLink, exc: Exception | None) -> None:
        if self.upstream is not upstream:
            return
        self.upstream = None
        self.reset_code = getattr(exc, "code", None)  # an HTTP/2 app's RST_STREAM, relayed
        if self.response_complete or self.finished:
            return  # answered already; the rest of the request body is read and dropped
        if self.response_started:
            self._cut("upstream_closed", "the app closed the stream mid-response")
            return
        # The app closed a pooled connection just as we reused it: safe to send again only
        # when it saw no body and we saw no answer.
        if (
            upstream.reused
            and not upstream.received_any
            and not self.head.has_body
            and not self.retried
        ):
            self.retried = True
            self._connect_soon()
            return
        self._upstream_failed("upstream_closed", "the app closed the connection without answering")

    def _upstream_failed(self, reason: str, message: str) -> None:
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.abort()
        if self.response_started:
            self._cut(reason, message)
            return
        self.local(502, reason, message)

    def _complete(self) -> None:
        upstream = self.upstream
        self.upstream = None
        self._finish(self.status)
        if upstream is not None:
            self.pool.release(upstream)
        self.down.exchange_done()
