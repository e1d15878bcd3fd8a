"""One downstream connection: TLS handshake, h11 server side, streaming to and from the app."""

from __future__ import annotations

import asyncio
import http
import logging
import ssl
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import h11

from . import headers as hdr
from .identity import ClientIdentity, identity_from_der, xfcc_value
from .upstream import UpstreamConnectError, UpstreamConnection

if TYPE_CHECKING:
    from .server import ProxyContext

log = logging.getLogger("tls_sidecar.http")

# Why downstream reading is paused; reading resumes only when no reason is left.
_HOLD_CONNECT = 1  # waiting for an upstream connection
_HOLD_PIPELINE = 2  # a pipelined request waits until the current response is done
_HOLD_UPSTREAM_FULL = 4  # the app is not reading the request body fast enough

# Timeout phases (metric labels) and whether activity pushes the deadline back.
_INACTIVITY = frozenset({"idle", "request_body", "upstream", "tunnel"})


_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}


def reason_phrase(response: h11.Response | h11.InformationalResponse) -> bytes:
    """The app's reason phrase, or the standard one when it sent none."""
    return response.reason or _REASONS.get(response.status_code, b"")


@dataclass(slots=True)
class Exchange:
    """One request/response pair on a downstream connection."""

    request: h11.Request
    request_id: bytes
    started: float
    upstream_request: h11.Request
    has_body: bool
    upstream: UpstreamConnection | None = None
    request_complete: bool = False
    response_started: bool = False
    response_complete: bool = False
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    sent_at: float = 0.0
    upstream_duration: float | None = None
    retried: bool = False
    finished: bool = False
    connect_task: asyncio.Task[None] | None = field(default=None, repr=False)


class Http1Connection(asyncio.Protocol):
    """Serves HTTP/1.1 over TLS to one client and relays each request to the app."""

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.loop = ctx.loop
        self.transport: asyncio.Transport | None = None
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=ctx.config.max_header_bytes)
        self.exchange: Exchange | None = None
        self.client = hdr.ClientInfo("-", 0)
        self.tls_version = "-"
        self.closed = False
        self.handshaking = True
        self.tunnel: UpstreamConnection | None = None
        self.client_identity: ClientIdentity | None = None
        self._denied: str | None = None  # why the client certificate is refused, if it is
        self._xfcc: bytes | None = None
        self._holds = 0
        self._received_since_idle = False
        self._handshake: Any = None
        self._handshake_started = 0.0
        self._raw: asyncio.Transport | None = None
        # One timer per connection, pushed back lazily (see _on_timer).
        self._phase: str | None = None
        self._phase_timeout = 0.0
        self._phase_since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # --- connection lifecycle ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        ctx = self.ctx
        ctx.metrics.connections_accepted.inc()
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        self.client = hdr.ClientInfo(
            peer[0] if isinstance(peer, tuple) else "-",
            sock[1] if isinstance(sock, tuple) else 0,
        )
        if len(ctx.connections) >= ctx.config.max_connections or ctx.draining:
            reason = "draining" if ctx.draining else "max_connections"
            ctx.metrics.connections_rejected.labels(reason).inc()
            self.closed = True
            transport.close()
            return
        ctx.connections.add(self)
        ctx.metrics.connections_active.inc()
        self._handshake_started = time.perf_counter()
        # uvloop starts reading as soon as connection_made returns, so the TLS protocol must be
        # in place before then: step start_tls's coroutine here instead of in a Task, whose
        # first step would run a loop turn later and could let the ClientHello reach h11.
        self._handshake = self.loop.start_tls(
            transport,
            self,
            ctx.tls.context,
            server_side=True,
            ssl_handshake_timeout=ctx.config.handshake_timeout,
        )
        self._raw = transport
        self._step_handshake(None)

    def _step_handshake(self, _done: object) -> None:
        coro = self._handshake
        try:
            waiting = coro.send(None)
        except StopIteration as finished:
            self._handshake_done(finished.value)
            return
        except (TimeoutError, ConnectionAbortedError) as e:
            timed_out = isinstance(e, TimeoutError) or "taking longer" in str(e)
            if timed_out:
                self.ctx.metrics.timeouts.labels("handshake").inc()
            self._handshake_failed("timeout" if timed_out else "closed", e)
            return
        except ssl.SSLError as e:
            about_client_cert = "CERTIFICATE" in str(e.reason or "").upper()
            mtls = self.ctx.config.client_ca is not None
            self._handshake_failed(
                "client_certificate" if mtls and about_client_cert else "protocol", e
            )
            return
        except (OSError, EOFError, RuntimeError, asyncio.CancelledError) as e:
            self._handshake_failed("closed", e)
            return
        if isinstance(waiting, asyncio.Future):
            waiting.add_done_callback(self._step_handshake)
        else:  # a bare yield: go on at the next loop turn
            self.loop.call_soon(self._step_handshake, None)

    def _handshake_done(self, tls: asyncio.BaseTransport) -> None:
        ctx = self.ctx
        tls = cast(asyncio.Transport, tls)
        ssl_object = tls.get_extra_info("ssl_object")
        if self.closed or tls.is_closing() or not isinstance(ssl_object, ssl.SSLObject):
            # uvloop ends start_tls without an error when the client closes cleanly during the
            # handshake: the transport it returns is already dead and no connection_lost follows.
            self.handshaking = False
            self._handshake_failed("closed", ConnectionResetError("closed during the handshake"))
            return
        self.handshaking = False
        self.transport = tls
        self.tls_version = ssl_object.version() or "-"
        ctx.handshake_done(self.tls_version, ssl_object.session_reused)
        if ctx.config.client_ca is not None:
            self._check_client(ssl_object)
        ctx.metrics.tls_handshake_duration.observe(time.perf_counter() - self._handshake_started)
        self._arm("header", ctx.config.header_timeout)
        if self._received_since_idle:  # the request arrived with the handshake's last flight
            self._next_events()

    def _check_client(self, ssl_object: ssl.SSLObject) -> None:
        """Decide once per connection; each request on it is then admitted or answered 403."""
        config = self.ctx.config
        der = ssl_object.getpeercert(binary_form=True)
        self.client_identity = identity_from_der(der) if der else None
        self._denied = config.policy.decide(self.client_identity)
        if self.client_identity is not None and self._denied is None and config.client_cert_header:
            self._xfcc = xfcc_value(
                self.client_identity,
                by=self.ctx.tls.server_uri,
                include_pem=config.client_cert_header_pem,
            )

    def _handshake_failed(self, reason: str, exc: BaseException) -> None:
        self.ctx.metrics.tls_handshake_errors.labels(reason).inc()
        log.debug("tls handshake failed", extra={"client": self.client.address, "reason": str(exc)})
        if self._raw is not None:
            self._raw.abort()
        self._forget()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.handshaking:
            self.closed = True  # _handshake sees this and cleans up
            return
        exchange = self.exchange
        if exchange is not None and not exchange.finished:
            upstream = exchange.upstream
            if upstream is not None:
                upstream.abort()
            if exchange.connect_task is not None:
                exchange.connect_task.cancel()
            self._finish(exchange, status=exchange.status if exchange.response_started else 499)
        if self.tunnel is not None:
            self.tunnel.abort()
            self.tunnel = None
        self._forget()

    def _forget(self) -> None:
        if self not in self.ctx.connections:
            self.closed = True
            return
        self.closed = True
        self._phase = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.ctx.connections.discard(self)
        self.ctx.metrics.connections_active.dec()
        self.ctx.connection_closed()

    def close(self) -> None:
        """Close after what was written is flushed (TLS close_notify included)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        elif self._raw is not None:
            self._raw.abort()

    @property
    def idle(self) -> bool:
        """Between requests with nothing received: safe to close while draining."""
        return not self.handshaking and self.exchange is None and not self._received_since_idle

    def begin_drain(self) -> None:
        if self.idle and self.tunnel is None:
            self.close()

    # --- timeouts --------------------------------------------------------------------------
    def _arm(self, phase: str, timeout: float) -> None:
        now = self.loop.time()
        self._phase, self._phase_timeout, self._phase_since = phase, timeout, now
        deadline = now + timeout
        if self._timer is None or deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline

    def _on_timer(self) -> None:
        self._timer = None
        if self._phase is None or self.closed:
            return
        deadline = self._phase_since + self._phase_timeout
        if self.loop.time() < deadline:
            self._timer = self.loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline
            return
        phase, self._phase = self._phase, None
        self.ctx.metrics.timeouts.labels(phase).inc()
        exchange = self.exchange
        if phase == "header" and self._received_since_idle:
            self._local_response(408, "header_timeout", "request head not received in time")
        elif phase == "upstream" and exchange is not None and not exchange.response_started:
            if exchange.upstream is not None:
                exchange.upstream.abort()
                exchange.upstream = None
            self._local_response(504, "upstream_timeout", "the app did not answer in time")
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

    # --- reading from the client -------------------------------------------------------------
    def _hold(self, reason: int) -> None:
        if not self._holds and self.transport is not None:
            self.transport.pause_reading()
        self._holds |= reason

    def _release(self, reason: int) -> None:
        if self._holds & reason:
            self._holds &= ~reason
            if not self._holds and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.ctx.metrics.bytes_down_in.inc(len(data))
        if self.handshaking:  # delivered before the handshake step returned: parse after it
            self.h11.receive_data(data)
            self._received_since_idle = True
            return
        if self.tunnel is not None:
            self._phase_since = self.loop.time()
            self.tunnel.write(data)
            return
        self.h11.receive_data(data)
        exchange = self.exchange
        if exchange is None:
            if not self._received_since_idle:
                self._received_since_idle = True
                self._arm("header", self.ctx.config.header_timeout)
        elif exchange.request_complete:
            self._hold(_HOLD_PIPELINE)  # parsed only after the current response
            return
        elif self._phase == "request_body":
            self._phase_since = self.loop.time()
        if not self._holds & _HOLD_CONNECT:
            self._next_events()

    def eof_received(self) -> bool | None:
        return False  # TLS has no half-close: the client is gone

    def pause_writing(self) -> None:
        upstream = self.tunnel or (self.exchange.upstream if self.exchange else None)
        if upstream is not None:
            upstream.pause_reading()

    def resume_writing(self) -> None:
        self._phase_since = self.loop.time()
        upstream = self.tunnel or (self.exchange.upstream if self.exchange else None)
        if upstream is not None:
            upstream.resume_reading()

    def _next_events(self) -> None:
        try:
            while not self.closed:
                try:
                    event = self.h11.next_event()
                except h11.RemoteProtocolError as e:
                    self._bad_request(e)
                    return
                kind = type(event)
                if kind is h11.Data:
                    self._request_data(event)  # type: ignore[arg-type]
                elif event is h11.NEED_DATA or event is h11.PAUSED:
                    return
                elif kind is h11.Request:
                    self._request_head(event)  # type: ignore[arg-type]
                    if self._holds & _HOLD_CONNECT:
                        return
                elif kind is h11.EndOfMessage:
                    self._request_end()
                elif kind is h11.ConnectionClosed:
                    self.close()
                    return
        except Exception:
            log.exception(
                "unexpected error on a client connection", extra={"client": self.client.address}
            )
            self.ctx.metrics.local_responses.labels("500", "internal_error").inc()
            self.abort_all()

    def _request_head(self, request: h11.Request) -> None:
        ctx = self.ctx
        config = ctx.config
        names = list(request.headers)  # lower-cased names, as HTTP/2 and Envoy send them
        target = request.target
        bad_target = ""
        if target[:1] != b"/":
            try:
                absolute = hdr.origin_form(target, names)
            except ValueError as e:
                absolute = None
                target = b""
                bad_target = str(e)
            if absolute is not None:
                target, names = absolute
            elif target == b"*" and request.method != b"OPTIONS":
                target, bad_target = b"", "asterisk-form is only for OPTIONS"
            elif target != b"*" and target:
                target, bad_target = b"", "authority-form is only for CONNECT"
        request_id = hdr.request_id_for(names, ctx.new_request_id)
        upstream_headers = hdr.forwarded_headers(
            names,
            self.client,
            trust_forwarded=config.trust_forwarded_headers,
            request_id=request_id,
        )
        chunked = hdr.has_header(names, b"transfer-encoding")
        length = hdr.header_value(names, b"content-length")
        if chunked:
            upstream_headers.append((b"transfer-encoding", b"chunked"))
        if self._xfcc is not None:
            upstream_headers.append((b"x-forwarded-client-cert", self._xfcc))
        if not hdr.has_header(names, b"host"):
            upstream_headers.insert(0, (b"host", ctx.upstream_host))
        self._phase = None
        self._received_since_idle = True
        exchange = self.exchange = Exchange(
            request=request,
            request_id=request_id,
            started=time.perf_counter(),
            # Method, target and the client's headers were validated by h11's parser, and the
            # headers we add are ours: skip h11's per-header regexes (it still checks framing).
            upstream_request=h11.Request(
                method=request.method, target=target or b"/", headers=upstream_headers, _parsed=True
            ),
            has_body=chunked or (length is not None and length != b"0"),
        )
        ctx.metrics.http_requests_in_flight.inc()
        if self._denied is not None:
            ctx.metrics.client_auth_denied.labels(self._denied).inc()
            who = self.client_identity.subject if self.client_identity else ""
            message = (
                f"client certificate {who} is not allowed"
                if who
                else "a client certificate is required"
            )
            self._local_response(403, f"client_{self._denied}", message)
            return
        # h11 caps only an incomplete head; one that arrived whole is measured here.
        head_size = (
            len(request.method)
            + len(request.target)
            + 12
            + sum(len(n) + len(v) + 4 for n, v in names)
        )
        if head_size > config.max_header_bytes:
            self._local_response(
                431, "header_too_large", f"request head over {config.max_header_bytes} bytes"
            )
            return
        # Smuggling guard: h11 lets Transfer-Encoding win over Content-Length; we refuse both.
        if chunked and length is not None:
            self._local_response(400, "bad_request", "both Content-Length and Transfer-Encoding")
            return
        if not request.http_version.startswith(b"1."):
            self._local_response(505, "version_not_supported", "only HTTP/1.0 and HTTP/1.1")
            return
        if request.method == b"CONNECT":
            self._local_response(405, "method_not_allowed", "CONNECT is not supported")
            return
        if not target:
            self._local_response(400, "bad_request", f"bad request target: {bad_target}")
            return
        limit = config.max_body_bytes
        if limit is not None and length is not None and int(length) > limit:
            self._local_response(413, "body_too_large", f"request body over {limit} bytes")
            return
        upstream = ctx.pool.take_idle()
        if upstream is not None:
            self._attach(exchange, upstream)
        else:
            self._hold(_HOLD_CONNECT)
            exchange.connect_task = self.loop.create_task(self._connect(exchange))

    async def _connect(self, exchange: Exchange) -> None:
        try:
            upstream = await self.ctx.pool.connect()
        except UpstreamConnectError as e:
            if self.exchange is exchange and not self.closed:
                self._local_response(e.status, f"upstream_{e.reason}", str(e))
            return
        exchange.connect_task = None
        if self.closed or self.exchange is not exchange:
            self.ctx.pool.close(upstream)
            return
        try:
            self._attach(exchange, upstream)
            self._release(_HOLD_CONNECT)
            self._next_events()
        except Exception:
            # Nobody awaits this task: an error here must still end the connection.
            log.exception(
                "unexpected error starting a request", extra={"client": self.client.address}
            )
            self.abort_all()

    def _attach(self, exchange: Exchange, upstream: UpstreamConnection) -> None:
        upstream.owner = self
        exchange.upstream = upstream
        try:
            head = upstream.h11.send(exchange.upstream_request)
        except h11.LocalProtocolError as e:
            self.ctx.pool.close(upstream)
            exchange.upstream = None
            self._local_response(400, "bad_request", f"request cannot be forwarded: {e}")
            return
        assert head is not None
        upstream.write(head)
        exchange.sent_at = time.perf_counter()
        if exchange.request_complete:  # a retry: the request had no body
            self._send_upstream(upstream, h11.EndOfMessage())
            self._arm("upstream", self.ctx.config.upstream_timeout)
        else:
            self._arm("request_body", self.ctx.config.idle_timeout)

    def _send_upstream(self, upstream: UpstreamConnection, event: h11.Event) -> None:
        parts = upstream.h11.send_with_data_passthrough(event)
        if parts:
            upstream.writelines(parts)

    def _request_data(self, event: h11.Data) -> None:
        exchange = self.exchange
        assert exchange is not None
        exchange.bytes_in += len(event.data)
        limit = self.ctx.config.max_body_bytes
        if limit is not None and exchange.bytes_in > limit:
            self._local_response(413, "body_too_large", f"request body over {limit} bytes")
            return
        upstream = exchange.upstream
        if upstream is None or exchange.finished:
            return
        self._send_upstream(upstream, event)

    def _request_end(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        exchange.request_complete = True
        upstream = exchange.upstream
        if exchange.finished:
            return
        if upstream is not None:
            self._send_upstream(upstream, h11.EndOfMessage())
        if exchange.response_complete:
            self._complete(exchange)
        elif not exchange.response_started:
            self._arm("upstream", self.ctx.config.upstream_timeout)

    def _bad_request(self, error: h11.RemoteProtocolError) -> None:
        # h11 suggests 501 for transfer codings other than chunked; as a smuggling defence we
        # treat them as malformed framing, like any other: 400 and close.
        status = 400 if error.error_status_hint >= 500 else error.error_status_hint
        reason = "header_too_large" if status == 431 else "bad_request"
        self._local_response(status, reason, str(error) or "malformed request")

    # --- the app's response ---------------------------------------------------------------------
    def upstream_readable(self, upstream: UpstreamConnection) -> None:
        exchange = self.exchange
        if exchange is None or exchange.upstream is not upstream:
            upstream.abort()
            return
        try:
            self._relay_response(exchange, upstream)
        except Exception:
            log.exception(
                "unexpected error relaying a response", extra={"client": self.client.address}
            )
            self.abort_all()

    def _relay_response(self, exchange: Exchange, upstream: UpstreamConnection) -> None:
        server = self.h11
        transport = self.transport
        assert transport is not None
        while True:
            try:
                event = upstream.h11.next_event()
            except h11.RemoteProtocolError as e:
                self._upstream_failed(
                    exchange, "bad_response", f"malformed response from the app: {e}"
                )
                return
            kind = type(event)
            if kind is h11.Data:
                data = event.data  # type: ignore[union-attr]
                exchange.bytes_out += len(data)
                self._phase_since = self.loop.time()
                parts = server.send_with_data_passthrough(event)  # type: ignore[arg-type]
                if parts:
                    self._write_client(parts)
            elif event is h11.NEED_DATA:
                return
            elif kind is h11.Response:
                self._response_head(exchange, event)  # type: ignore[arg-type]
            elif kind is h11.EndOfMessage:
                parts = server.send_with_data_passthrough(h11.EndOfMessage())
                if parts:
                    self._write_client(parts)
                self._response_done(exchange)
                return
            elif kind is h11.InformationalResponse:
                self._informational(exchange, upstream, event)  # type: ignore[arg-type]
                if self.tunnel is not None:
                    return
            elif event is h11.PAUSED or kind is h11.ConnectionClosed:
                return

    def _write_client(self, parts: list[bytes]) -> None:
        assert self.transport is not None
        self.ctx.metrics.bytes_down_out.inc(sum(map(len, parts)))
        self.transport.writelines(parts)

    def _response_head(self, exchange: Exchange, response: h11.Response) -> None:
        exchange.status = response.status_code
        exchange.response_started = True
        exchange.upstream_duration = time.perf_counter() - exchange.sent_at
        self.ctx.metrics.upstream_response_duration.observe(exchange.upstream_duration)
        out = hdr.response_headers(list(response.headers))
        if self.ctx.draining:
            out.append((b"connection", b"close"))
        self._write_client(
            [
                self.h11.send(
                    h11.Response(  # headers from h11's parser, plus ours: see _request_head
                        status_code=response.status_code,
                        headers=out,
                        reason=reason_phrase(response),
                        _parsed=True,
                    )
                )
            ]
        )
        self._arm("upstream", self.ctx.config.upstream_timeout)

    def _informational(
        self, exchange: Exchange, upstream: UpstreamConnection, info: h11.InformationalResponse
    ) -> None:
        switching = info.status_code == 101
        out = hdr.response_headers(list(info.headers), switching_protocols=switching)
        data = self.h11.send(
            h11.InformationalResponse(
                status_code=info.status_code, headers=out, reason=reason_phrase(info), _parsed=True
            )
        )
        assert data is not None
        self._write_client([data])
        if not switching:
            return
        # The app switched protocols (WebSocket): from now on, relay raw bytes both ways.
        exchange.status = 101
        exchange.upstream_duration = time.perf_counter() - exchange.sent_at
        self.tunnel = upstream
        upstream.tunnel = True
        self._finish(exchange, status=101)
        self.exchange = None
        leftover_up = upstream.h11.trailing_data[0]
        leftover_down = self.h11.trailing_data[0]
        if leftover_up:
            self.tunnel_from_upstream(leftover_up)
        if leftover_down:
            upstream.write(leftover_down)
        self._release(_HOLD_PIPELINE)
        self._arm("tunnel", self.ctx.config.idle_timeout)

    def tunnel_from_upstream(self, data: bytes) -> None:
        self._phase_since = self.loop.time()
        self._write_client([data])

    def _response_done(self, exchange: Exchange) -> None:
        exchange.response_complete = True
        if not exchange.request_complete and self.h11.our_state is h11.DONE:
            # The app answered before the whole body arrived (a 401 or 413, or an app that
            # does not read bodies): relay or discard the rest, then both sides can go on.
            self._arm("request_body", self.ctx.config.idle_timeout)
            return
        self._complete(exchange)

    def _complete(self, exchange: Exchange) -> None:
        upstream = exchange.upstream
        exchange.upstream = None
        self._finish(exchange, status=exchange.status)
        self.exchange = None
        if upstream is not None:
            self.ctx.pool.release(upstream)
        # A pooled connection no longer reports to us: its backpressure hold ends with it.
        self._release(_HOLD_UPSTREAM_FULL)
        if (
            not exchange.request_complete
            or self.h11.our_state is not h11.DONE
            or self.h11.their_state is not h11.DONE
        ):
            self.close()  # early answer or Connection: close: the request framing is done with
            return
        if self.ctx.draining:
            self.close()
            return
        self.h11.start_next_cycle()
        self._received_since_idle = False
        self._arm("idle", self.ctx.config.idle_timeout)
        self._release(_HOLD_PIPELINE)
        self._next_events()  # a pipelined request may already be buffered

    def upstream_write_paused(self, paused: bool) -> None:
        if paused:
            self._hold(_HOLD_UPSTREAM_FULL)
        else:
            self._release(_HOLD_UPSTREAM_FULL)

    def upstream_lost(self, upstream: UpstreamConnection, exc: Exception | None) -> None:
        if self.tunnel is upstream:
            self.tunnel = None
            self.close()
            return
        exchange = self.exchange
        if exchange is None or exchange.upstream is not upstream:
            return
        exchange.upstream = None
        if exchange.response_complete:
            return  # answered already; the rest of the request body is read and dropped
        if exchange.response_started:
            self.abort()  # truncated: closing is the only honest signal left
            return
        # The app closed a pooled connection just as we reused it: safe to send again only
        # when it saw no body and we saw no answer.
        if (
            upstream.reused
            and not upstream.received_any
            and not exchange.has_body
            and not exchange.retried
        ):
            exchange.retried = True
            self._hold(_HOLD_CONNECT)
            exchange.connect_task = self.loop.create_task(self._connect(exchange))
            return
        self._upstream_failed(
            exchange, "upstream_closed", "the app closed the connection without answering"
        )

    def _upstream_failed(self, exchange: Exchange, reason: str, message: str) -> None:
        upstream = exchange.upstream
        exchange.upstream = None
        if upstream is not None:
            upstream.abort()
        if exchange.response_started:
            self.abort()
            return
        self._local_response(502, reason, message)

    # --- answers of our own -------------------------------------------------------------------
    def _local_response(self, status: int, reason: str, message: str) -> None:
        """Answer the client ourselves and close the connection: its framing is done with."""
        ctx = self.ctx
        ctx.metrics.local_responses.labels(str(status), reason).inc()
        exchange = self.exchange
        if exchange is not None and exchange.upstream is not None:
            exchange.upstream.abort()
            exchange.upstream = None
        body = f"{status} {message}\n".encode("utf-8", "replace")
        response_headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        if exchange is not None:
            response_headers.append((b"x-request-id", exchange.request_id))
        try:
            parts = [
                self.h11.send(
                    h11.Response(
                        status_code=status,
                        headers=response_headers,
                        reason=_REASONS.get(status, b""),
                    )
                ),
                self.h11.send(h11.Data(data=body)),
                self.h11.send(h11.EndOfMessage()),
            ]
        except h11.LocalProtocolError:
            self.abort()  # a response is already under way: closing is the only answer left
        else:
            self._write_client([p for p in parts if p])
            self.close()
        if exchange is not None:
            exchange.status = status
            self._finish(exchange, status=status)
        else:
            self._log_unparsed(status)
        self._phase = None

    def _finish(self, exchange: Exchange, *, status: int) -> None:
        if exchange.finished:
            return
        exchange.finished = True
        ctx = self.ctx
        duration = time.perf_counter() - exchange.started
        ctx.metrics.http_requests_in_flight.dec()
        ctx.metrics.request_done(exchange.request.method, status, duration)
        ctx.access(
            client=self.client.address,
            method=exchange.request.method,
            target=exchange.request.target,
            status=status,
            bytes_in=exchange.bytes_in,
            bytes_out=exchange.bytes_out,
            duration=duration,
            upstream_duration=exchange.upstream_duration,
            tls_version=self.tls_version,
            request_id=exchange.request_id,
        )

    def _log_unparsed(self, status: int) -> None:
        self.ctx.metrics.request_done(b"OTHER", status, 0.0)
        self.ctx.access(
            client=self.client.address,
            method=b"-",
            target=b"-",
            status=status,
            bytes_in=0,
            bytes_out=0,
            duration=0.0,
            upstream_duration=None,
            tls_version=self.tls_version,
            request_id=b"-",
        )
