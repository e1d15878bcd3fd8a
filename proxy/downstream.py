"""A client's TLS connection: accepting, the handshake, the client identity, one lazy timer,
reading holds, the registry and drain. Protocol codecs (HTTP/1.1) build on it."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import TYPE_CHECKING, Any, cast

from proxy import proxy_protocol
from proxy.core.headers import ClientInfo
from proxy.core.session import Session
from proxy.core.timer import PhaseTimer
from proxy.identity import identity_from_der, xfcc_value
from proxy.tls import context as tls

if TYPE_CHECKING:
    from proxy.core.context import ProxyContext

log = logging.getLogger("tls_sidecar.http")


class ClientConnection(PhaseTimer, asyncio.Protocol):
    """Owns the TLS side of one client connection; subclasses speak the protocol over it."""

    def __init__(self, ctx: ProxyContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.loop = ctx.loop
        self.transport: asyncio.Transport | None = None
        self.session = Session(ClientInfo("-", 0))
        self.closed = False
        self.handshaking = True
        self._holds = 0
        self._handshake: Any = None
        self._handshake_started = 0.0
        self._raw: asyncio.Transport | None = None
        self._tls_protocol: Any = None  # the TLS layer's protocol, while _HandshakeReader is in
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
            ctx.metrics.connections_rejected.labels(reason).inc()
            self.closed = True
            transport.close()
            return
        if not ctx.descriptors.admits(len(ctx.connections)):
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
        """The TLS handshake on `transport`; `early` are bytes read already (after a PROXY
        header), handed to the TLS layer first."""
        # uvloop starts reading as soon as connection_made returns, so the TLS protocol must be
        # in place before then: step start_tls's coroutine here instead of in a Task, whose
        # first step would run a loop turn later and could let the ClientHello reach the codec.
        self._handshake = self.loop.start_tls(
            transport,
            self,
            self.ctx.tls.context,
            server_side=True,
            ssl_handshake_timeout=timeout,
        )
        self._step_handshake(None)
        if self.handshaking and not self.closed:
            # Every read of the handshake goes through _HandshakeReader, so that a failed
            # handshake's alert reaches the client (tls.AlertingSSLObject); it steps aside after.
            self._tls_protocol = transport.get_protocol()
            reader = _HandshakeReader(self._tls_protocol, self)
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
        transport.set_protocol(_ProxyHeaderReader(self, config.handshake_timeout))

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
        self.ctx.metrics.connections_rejected.labels("proxy_protocol_" + reason).inc()
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
        except (TimeoutError, ConnectionAbortedError) as e:
            timed_out = isinstance(e, TimeoutError) or "taking longer" in str(e)
            if timed_out and not self._failure_counted:
                self.ctx.metrics.timeouts.labels("handshake").inc()
            self._handshake_failed("timeout" if timed_out else "closed", e)
            return
        except ssl.SSLError as e:
            about_client_cert = "CERTIFICATE" in str(e.reason or "").upper()
            mtls = self.ctx.config.client_ca is not None
            reason = "client_certificate" if mtls and about_client_cert else "protocol"
            if reason == "client_certificate" and isinstance(e, ssl.SSLCertVerificationError):
                reason = _CRL_VERDICTS.get(e.verify_code, reason)
            self._handshake_failed(reason, e)
            return
        except (OSError, EOFError, RuntimeError, asyncio.CancelledError) as e:
            self._handshake_failed("closed", e)
            return
        if isinstance(waiting, asyncio.Future):
            waiting.add_done_callback(self._step_handshake)
        else:  # a bare yield: go on at the next loop turn
            self.loop.call_soon(self._step_handshake, None)

    def alert_ready(self, alert: bytes, server_name: str | None) -> None:
        """The TLS layer failed the handshake: send its alert before the transport closes."""
        self._server_name = server_name
        if alert and self._raw is not None and not self._raw.is_closing():
            self._raw.write(alert)

    def _handshake_done(self, tls: asyncio.BaseTransport) -> None:
        ctx = self.ctx
        if self._tls_protocol is not None and self._raw is not None:
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
        if ctx.config.client_ca is not None:
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
        """Count and log (rate-limited) a failed handshake. The log's `reason` is the metric's
        label, so one word finds both; `detail` is the finer cause (OpenSSL's reason)."""
        self._failure_counted = True
        self.ctx.metrics.tls_handshake_errors.labels(reason).inc()
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
        """The client spoke plain HTTP to the TLS port: answer 400 in plain HTTP (nginx's
        "The plain HTTP request was sent to HTTPS port") instead of an empty reply, then close
        once the client has read it. The handshake timeout bounds the wait."""
        raw = self._raw
        if raw is None or raw.is_closing():
            return
        self._count_failure("plain_http", "plain_http_on_tls_port", "plain HTTP on the TLS port")
        raw.write(PLAIN_HTTP_ANSWER)
        if raw.can_write_eof():
            raw.write_eof()
        else:
            raw.close()

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
        self.transport.set_protocol(successor)

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
        self.ctx.metrics.down_out += len(data)
        self.transport.write(data)

    def writelines(self, parts: list[bytes]) -> None:
        assert self.transport is not None
        self.ctx.metrics.down_out += sum(map(len, parts))
        self.transport.writelines(parts)


class _ProxyHeaderReader(asyncio.Protocol):
    """The raw transport's protocol until the PROXY header is whole: bounded in time (the
    handshake timeout) and in size (proxy_protocol's bounds); only then does TLS start."""

    def __init__(self, connection: ClientConnection, timeout: float) -> None:
        self.connection = connection
        self.buffer = bytearray()
        self.done = False
        self.timer = connection.loop.call_later(timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self.buffer += data
        try:
            header = proxy_protocol.parse(self.buffer)
        except proxy_protocol.ProxyProtocolError as e:
            self._finish()
            self.connection.proxy_header_refused(e.reason, str(e))
            return
        if header is not None:
            self._finish()
            self.connection.proxy_header_read(header, bytes(self.buffer[header.length :]))

    def eof_received(self) -> bool:
        if not self.done:
            self._finish()
            if self.buffer:
                self.connection.proxy_header_refused("missing", "closed within a PROXY header")
            else:  # a balancer's TCP check: connected and closed, nothing to count
                self.connection.abort()
                self.connection.forget()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done:
            self._finish()
            self.connection.forget()

    def _timed_out(self) -> None:
        if not self.done:
            self._finish()
            self.connection.ctx.metrics.timeouts.labels("proxy_protocol").inc()
            self.connection.proxy_header_refused("timeout", "no whole PROXY header in time")

    def _finish(self) -> None:
        self.done = True
        self.timer.cancel()


class _HandshakeReader(asyncio.BufferedProtocol):
    """Between the raw transport and the TLS layer during a handshake: marks whose bytes are
    being processed (tls.handshaking), so a failure's alert goes back on the right socket."""

    def __init__(self, inner: Any, connection: ClientConnection) -> None:
        self.inner = inner
        self.connection = connection
        # uvloop reads as soon as the connection is accepted, possibly before the TLS layer
        # has started its handshake: what comes that early waits here.
        self.early: bytearray | None = bytearray()
        self._buffer: bytearray | None = None
        self._eof = False
        self._lost: tuple[Exception | None] | None = None
        self._first: Any = None  # the buffer the connection's first bytes are read into
        self._peeked = False
        self._refused = False  # plain HTTP answered: what else comes is read and dropped

    def start(self) -> None:
        """The TLS layer has started: hand it what came early, then an early EOF or close."""
        early, self.early = self.early, None
        # uvloop keeps this reader's bound methods after the TLS layer is put back: drop the
        # 16 KiB buffer here, or it lives as long as the connection (S5: 53.5 -> 33.8 KiB).
        self._buffer = None
        if early and _plain_http(early[0]):
            self._refuse()
            if self._lost is not None:
                self.inner.connection_lost(self._lost[0])
            elif self._eof and self.connection._raw is not None:
                self.connection._raw.close()  # the answer is written: close once it is sent
            return
        self._peeked = bool(early)
        if early:
            buffer = self.inner.get_buffer(len(early))
            buffer[: len(early)] = early
            self.buffer_updated(len(early))
        if self._lost is not None:
            self.inner.connection_lost(self._lost[0])
        elif self._eof and not self.inner.eof_received():
            raw = self.connection._raw
            if raw is not None:
                raw.close()

    def _refuse(self) -> None:
        self._refused = True
        self._buffer = bytearray(4096)
        self.connection.refuse_plain_http()

    def get_buffer(self, sizehint: int) -> Any:
        if self.early is not None or self._refused:
            if self._buffer is None:
                self._buffer = bytearray(16384)
            return self._buffer
        buffer = self.inner.get_buffer(sizehint)
        if not self._peeked:
            self._first = buffer
        return buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.early is not None:
            assert self._buffer is not None
            self.early += self._buffer[:nbytes]
            return
        if self._refused:
            return
        if not self._peeked:  # once per connection: the first byte says TLS or plain HTTP
            self._peeked = True
            first, self._first = self._first, None
            if nbytes and first is not None and _plain_http(first[0]):
                self._refuse()
                return
        tls.handshaking = self.connection
        try:
            self.inner.buffer_updated(nbytes)
        finally:
            tls.handshaking = None

    def eof_received(self) -> bool | None:
        if self._refused:
            return False  # the client read the 400 and closed: close our side too
        if self.early is not None:
            self._eof = True
            return True  # kept open until the TLS layer has seen what came before the EOF
        return cast(bool | None, self.inner.eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.early is not None:
            self._lost = (exc,)
            return
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


# A TLS connection starts with a handshake record (0x16; 0x80 for an SSLv2-style hello); an
# HTTP request starts with its method, upper-case letters.
_METHOD_LETTERS = frozenset(range(ord("A"), ord("Z") + 1))


def _plain_http(first_byte: int) -> bool:
    return first_byte in _METHOD_LETTERS


PLAIN_HTTP_BODY = (
    b"400 Bad Request: this port speaks HTTPS, and a plain HTTP request was sent to it; "
    b"use https:// in the URL.\n"
)
PLAIN_HTTP_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(PLAIN_HTTP_BODY), PLAIN_HTTP_BODY)
)

# OpenSSL's reasons for a failed handshake -> the log line's detail.
_FAILURES = {
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "NO_SHARED_CIPHER": "no_shared_cipher",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_client_certificate",
    "HTTP_REQUEST": "plain_http_on_tls_port",
    "WRONG_VERSION_NUMBER": "not_tls",
}


# OpenSSL's verify codes of --client-crl -> tls_handshake_errors_total's reason
_CRL_VERDICTS = {
    23: "client_certificate_revoked",  # X509_V_ERR_CERT_REVOKED
    12: "client_crl_expired",  # X509_V_ERR_CRL_HAS_EXPIRED: fail closed until a fresh one
    3: "client_crl_missing",  # X509_V_ERR_UNABLE_TO_GET_CRL: no CRL of the client's CA
}


def handshake_failure(exc: BaseException) -> str:
    """Why a handshake failed, in words an operator greps for."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in _CRL_VERDICTS:
            return _CRL_VERDICTS[exc.verify_code]
        message = (exc.verify_message or "").lower()
        if "expired" in message:
            return "expired_client_certificate"
        if "issuer" in message or "self-signed" in message or "self signed" in message:
            return "unknown_ca"
        return "bad_client_certificate"
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or "").upper()
        if reason in _FAILURES:
            return _FAILURES[reason]
        if reason.startswith(("TLSV1_ALERT_", "SSLV3_ALERT_", "TLSV13_ALERT_")):
            return "client_alert_" + reason.split("_ALERT_", 1)[1].lower()
        return reason.lower() or "protocol"
    if isinstance(exc, TimeoutError) or "taking longer" in str(exc):
        return "timeout"
    return "closed"
