"""A client's TLS connection: accepting (a PROXY header first, if trusted), the handshake, the
client identity, reading holds, the registry and drain. Protocol codecs build on it."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import TYPE_CHECKING, Any, Final, cast

from proxy import process, proxy_protocol
from proxy.core.client_side import Downstream
from proxy.core.headers import ClientInfo
from proxy.core.session import Session
from proxy.identity import identity_from_der, xfcc_value
from proxy.metrics.counts import DataCounts
from proxy.proxy_header_reader import ProxyHeaderReader
from proxy.tls.handshake import (
    PLAIN_HTTP_ANSWER,
    HandshakeReader,
    handshake_failure,
    linger_after_alert,
    lingering,
    refusal_reason,
)

if TYPE_CHECKING:
    from proxy.core.context import ProxyContext

log: Final = logging.getLogger("tls_sidecar.http")


# No asyncio.Protocol base: compiled, that would make it a Python class with its attributes in a
# dict, and uvloop needs only the methods.
class ClientConnection(Downstream):
    """Owns the TLS side of one client connection; subclasses speak the protocol over it."""

    def __init__(self, ctx: ProxyContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.loop = ctx.loop
        self.counts: DataCounts = ctx.metrics.counts  # typed: adding to it is a field update
        self.transport: asyncio.Transport | None = None
        self.session = Session(ClientInfo("-", 0))
        self.closed = False
        self.handshaking = True
        self._holds = 0
        self._handshake: Any = None
        self._handshake_started = 0.0
        self._raw: asyncio.Transport | None = None
        self._tls_protocol: Any = None  # the TLS layer's protocol, while HandshakeReader is in
        self._server_name: str | None = None  # SNI of a failed handshake, for its log line
        # A failed handshake is counted once (plain HTTP: before the TLS layer fails too).
        self._failure_counted = False
        self.retiring = False  # its client certificate is no longer valid: close when idle
        self._peer: Any = None  # the client's and our address, as the PROXY header out says
        self._local: Any = None

    # --- to be provided by the protocol -------------------------------------------------------
    def handshake_complete(self) -> None:
        """The TLS session is up and `session` filled in."""

    def timed_out(self, phase: str) -> None:
        self.abort_all()

    def abort_all(self) -> None:
        self.abort()

    @property
    def idle(self) -> bool:
        """Between requests with nothing received: safe to close while draining."""
        return not self.handshaking

    def begin_drain(self) -> None:
        if self.idle:
            self.close()

    def retire(self) -> None:
        """Close after the request in flight, as a drain does, for this connection alone."""
        self.retiring = True
        self.begin_drain()

    # --- accepting and the handshake ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        ctx = self.ctx
        ctx.metrics.connections_accepted.inc()
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        self._peer, self._local = peer, sock  # the PROXY header the app gets says these
        self.session.client = ClientInfo(
            peer[0] if isinstance(peer, tuple) else "-",
            sock[1] if isinstance(sock, tuple) else 0,
        )
        if len(ctx.connections) >= ctx.config.max_connections or ctx.draining:
            reason = "draining" if ctx.draining else "max_connections"
            ctx.metrics.rejected.add(reason)
            self.closed = True
            transport.close()
            return
        # A lingering socket is a descriptor no connection counts any more: counted as one, or
        # 64 of them take the spare descriptors the admin port and reloads need.
        if not ctx.descriptors.admits(len(ctx.connections) + lingering()):
            ctx.refuse_for_descriptors(self.session.client.address)
            self.closed = True
            transport.close()
            return
        ctx.connections.add(self)
        self._handshake_started = time.perf_counter()
        self._raw = transport
        if ctx.config.accept_proxy_protocol:
            self._read_proxy_header(transport)
            return
        self._start_tls(transport, ctx.config.handshake_timeout)

    def _start_tls(self, transport: asyncio.Transport, timeout: float, early: bytes = b"") -> None:
        """The TLS handshake on `transport`; `early`, read already after a PROXY header, first."""
        # uvloop reads once connection_made returns: start_tls's coroutine is stepped here, not
        # in a Task a loop turn later, which could let the ClientHello reach the codec.
        process.clean_tls_read_buffer()  # for the read buffer that first step allocates
        self._handshake = self.loop.start_tls(
            transport,
            cast(asyncio.BaseProtocol, self),
            self.ctx.tls.context,
            server_side=True,
            ssl_handshake_timeout=timeout,
        )
        self._step_handshake(None)
        if self.handshaking and not self.closed:
            # Every read of the handshake goes through HandshakeReader, so that a failed
            # handshake's alert reaches the client (tls.AlertingSSLObject); it steps aside after.
            self._tls_protocol = transport.get_protocol()
            reader = HandshakeReader(self._tls_protocol, self)
            if early:
                assert reader.early is not None
                reader.early += early
            transport.set_protocol(reader)
            # After the TLS layer's own connection_made (start_tls queued it just now).
            self.loop.call_soon(reader.start)

    # --- the PROXY protocol header, before any TLS byte -----------------------------------------
    def _read_proxy_header(self, transport: asyncio.Transport) -> None:
        config = self.ctx.config
        if not proxy_protocol.trusted(self.session.client.address, config.proxy_protocol_from):
            self.proxy_header_refused("untrusted", "a PROXY header is not taken from this address")
            return
        transport.set_protocol(ProxyHeaderReader(self, config.handshake_timeout))

    def proxy_header_read(self, header: proxy_protocol.ProxyHeader, rest: bytes) -> None:
        """The header is in: its client is this connection's; the TLS layer gets what follows."""
        if header.source is not None and header.destination is not None:
            self.session.client = ClientInfo(header.source[0], header.destination[1])
            self._peer, self._local = header.source, header.destination
        assert self._raw is not None
        spent = time.perf_counter() - self._handshake_started
        # The header and the handshake share --handshake-timeout.
        self._start_tls(self._raw, max(self.ctx.config.handshake_timeout - spent, 0.001), rest)

    def proxy_header_refused(self, reason: str, detail: str) -> None:
        """Missing, malformed, untrusted or too slow: closed at once and counted, nothing sent."""
        self.ctx.metrics.rejected.add("proxy_protocol_" + reason)
        suppressed = self.ctx.handshake_log.allow("proxy_protocol_" + reason)
        if suppressed is not None:
            log.info(
                "proxy protocol header refused",
                extra={
                    "client": self.session.client.address,
                    "reason": reason,
                    "error": detail,
                    "suppressed_since_last": suppressed,
                },
            )
        if self._raw is not None:
            self._raw.abort()
        self.forget()

    def _step_handshake(self, _done: object) -> None:
        coro = self._handshake
        try:
            waiting = coro.send(None)
        except StopIteration as finished:
            self._handshake_done(finished.value)
            return
        except (TimeoutError, ConnectionAbortedError) as e:  # compiled, `e` has one type:
            timed_out = isinstance(e, TimeoutError) or "taking longer" in str(e)  # one name each
            if timed_out and not self._failure_counted:
                self.ctx.metrics.timed_out.add("handshake")
            self._handshake_failed("timeout" if timed_out else "closed", e)
            return
        except ssl.SSLError as refused:
            self._handshake_failed(refusal_reason(refused, self.ctx.config.mutual_tls), refused)
            return
        except (OSError, EOFError, RuntimeError, asyncio.CancelledError) as closed:
            self._handshake_failed("closed", closed)
            return
        if isinstance(waiting, asyncio.Future):
            waiting.add_done_callback(self._step_handshake)
        else:  # a bare yield: go on at the next loop turn
            self.loop.call_soon(self._step_handshake, None)

    def alert_ready(self, alert: bytes, server_name: str | None) -> None:
        """The TLS layer failed the handshake: send its alert before the transport closes."""
        self._server_name = server_name
        raw = self._raw
        if (
            alert
            and raw is not None
            and not raw.is_closing()
            and not linger_after_alert(raw, alert)
        ):
            raw.write(alert)  # no lingering close: the alert, then the TLS layer's close

    def _handshake_done(self, tls: asyncio.BaseTransport) -> None:
        ctx = self.ctx
        if self._tls_protocol is not None and self._raw is not None:
            if isinstance(reader := self._raw.get_protocol(), HandshakeReader):  # None: closed
                reader.step_aside()
            self._raw.set_protocol(self._tls_protocol)  # the hot path reads without the hook
            self._tls_protocol = None
        tls = cast(asyncio.Transport, tls)
        ssl_object = tls.get_extra_info("ssl_object")
        self.handshaking = False
        if self.closed or tls.is_closing() or not isinstance(ssl_object, ssl.SSLObject):
            # uvloop ends start_tls without an error when the client closes cleanly during the
            # handshake: the transport it returns is already dead and no connection_lost follows.
            self._handshake_failed("closed", ConnectionResetError("closed during the handshake"))
            return
        self.transport = tls
        session = self.session
        session.tls_version = ssl_object.version() or "-"
        cipher = ssl_object.cipher()
        session.cipher = cipher[0] if cipher else None
        session.sni = getattr(ssl_object, "server_name_seen", None)
        ctx.handshake_done(session.tls_version, ssl_object.session_reused)
        if ctx.config.mutual_tls:
            self._check_client(ssl_object)
        if ctx.client_pools is not None and isinstance(self._peer, tuple):
            session.pool = ctx.client_pools.open(
                session, self._peer[:2], self._local[:2], ssl_object.selected_alpn_protocol()
            )
        ctx.metrics.tls_handshake_duration.observe(time.perf_counter() - self._handshake_started)
        self.arm("header", ctx.config.header_timeout)
        self.handshake_complete()

    def _check_client(self, ssl_object: ssl.SSLObject) -> None:
        """Decide once per connection; each request on it is then admitted or answered 403."""
        config = self.ctx.config
        session = self.session
        der = ssl_object.getpeercert(binary_form=True)
        session.identity = identity_from_der(der) if der else None
        session.denied = config.policy.decide(session.identity)
        if session.identity is not None and session.denied is None and config.client_cert_header:
            session.xfcc = xfcc_value(
                session.identity,
                by=self.ctx.tls.server_uri,
                include_pem=config.client_cert_header_pem,
            )

    def _handshake_failed(self, reason: str, exc: BaseException) -> None:
        if not self._failure_counted:
            self._count_failure(reason, handshake_failure(exc), str(exc))
        if self._raw is not None:
            self._raw.abort()
        self.forget()

    def _count_failure(self, reason: str, detail: str, error: str) -> None:
        """Count and log (rate-limited) a failed handshake: `reason` is the metric's label too,
        `detail` the finer cause (OpenSSL's reason)."""
        self._failure_counted = True
        self.ctx.metrics.handshake_failed.add(reason)
        suppressed = self.ctx.handshake_log.allow(detail)
        if suppressed is not None:
            log.info(
                "tls handshake failed",
                extra={
                    "client": self.session.client.address,
                    "reason": reason,
                    "detail": detail,
                    "sni": self._server_name,
                    "error": error,
                    "suppressed_since_last": suppressed,
                },
            )

    def refuse_plain_http(self) -> None:
        """Plain HTTP to the TLS port: a 400 in plain HTTP (as nginx answers) instead of an
        empty reply, closed once the client has read it (the handshake timeout bounds that)."""
        raw = self._raw
        if raw is None or raw.is_closing():
            return
        self._count_failure("plain_http", "plain_http_on_tls_port", "plain HTTP on the TLS port")
        raw.write(PLAIN_HTTP_ANSWER)
        if raw.can_write_eof():
            raw.write_eof()
        else:
            raw.close()

    def close_raw(self) -> None:
        """Close the socket itself: the handshake ended before the TLS layer could."""
        if self._raw is not None:
            self._raw.close()

    def hand_over(self, successor: ClientConnection) -> None:
        """ALPN chose another protocol: `successor` takes this connection's place."""
        assert self.transport is not None
        successor.transport = self.transport
        successor._raw = self._raw
        successor.session = self.session
        successor.handshaking = False
        self.stop_timer()
        connections = self.ctx.connections
        connections.discard(self)
        connections.add(successor)
        self.closed = True
        self.transport.set_protocol(cast(asyncio.BaseProtocol, successor))

    # --- closing --------------------------------------------------------------------------------
    def forget(self) -> None:
        self.closed = True
        if self not in self.ctx.connections:
            return
        pool = self.session.pool
        if pool is not None and self.ctx.client_pools is not None:
            self.session.pool = None
            self.ctx.client_pools.close(pool)
        self.stop_timer()
        self.ctx.connections.discard(self)
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

    # --- reading holds --------------------------------------------------------------------------
    def hold(self, reason: int) -> None:
        if not self._holds and self.transport is not None:
            self.transport.pause_reading()
        self._holds |= reason

    def release(self, reason: int) -> None:
        if self._holds & reason:
            self._holds &= ~reason
            if not self._holds and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.counts.down_out += len(data)
        self.transport.write(data)

    def writelines(self, parts: list[bytes]) -> None:
        assert self.transport is not None
        self.counts.down_out += sum(map(len, parts))
        self.transport.writelines(parts)
