"""A client's TLS connection: accepting, the handshake, the client identity, one lazy timer,
reading holds, the registry and drain. Protocol codecs (HTTP/1.1) build on it."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import TYPE_CHECKING, Any, cast

from . import tls
from .exchange import Session
from .headers import ClientInfo
from .identity import identity_from_der, xfcc_value

if TYPE_CHECKING:
    from .server import ProxyContext

log = logging.getLogger("tls_sidecar.http")


class PhaseTimer:
    """One lazy timer for what is being waited for (a phase) and how long it may take.

    Activity moves `_phase_since`, not the timer: the timer fires at the first deadline, sees
    the phase was pushed back, and sleeps again. One timer handle per connection (or HTTP/2
    stream), not one per read."""

    ctx: ProxyContext
    loop: asyncio.AbstractEventLoop

    def __init__(self) -> None:
        self._phase: str | None = None
        self._phase_timeout = 0.0
        self._phase_since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def timed_out(self, phase: str) -> None:
        """The phase ran out; counted already."""

    def arm(self, phase: str, timeout: float) -> None:
        """Start a timeout phase."""
        now = self.loop.time()
        self._phase, self._phase_timeout, self._phase_since = phase, timeout, now
        deadline = now + timeout
        if self._timer is None or deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline

    def stop_timer(self) -> None:
        self._phase = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self._phase is None:
            return
        deadline = self._phase_since + self._phase_timeout
        if self.loop.time() < deadline:
            self._timer = self.loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline
            return
        phase, self._phase = self._phase, None
        self.ctx.metrics.timeouts.labels(phase).inc()
        self.timed_out(phase)


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

    # --- accepting and the handshake ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        ctx = self.ctx
        ctx.metrics.connections_accepted.inc()
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
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
        # uvloop starts reading as soon as connection_made returns, so the TLS protocol must be
        # in place before then: step start_tls's coroutine here instead of in a Task, whose
        # first step would run a loop turn later and could let the ClientHello reach the codec.
        self._handshake = self.loop.start_tls(
            transport,
            self,
            ctx.tls.context,
            server_side=True,
            ssl_handshake_timeout=ctx.config.handshake_timeout,
        )
        self._raw = transport
        self._step_handshake(None)
        if self.handshaking and not self.closed:
            # Every read of the handshake goes through _HandshakeReader, so that a failed
            # handshake's alert reaches the client (tls.AlertingSSLObject); it steps aside after.
            self._tls_protocol = transport.get_protocol()
            reader = _HandshakeReader(self._tls_protocol, self)
            transport.set_protocol(reader)
            # After the TLS layer's own connection_made (start_tls queued it just now).
            self.loop.call_soon(reader.start)

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
        self.ctx.metrics.tls_handshake_errors.labels(reason).inc()
        detail = handshake_failure(exc)
        suppressed = self.ctx.handshake_log.allow(detail)
        if suppressed is not None:
            log.info(
                "tls handshake failed",
                extra={
                    "client": self.session.client.address,
                    "reason": detail,
                    "sni": self._server_name,
                    "error": str(exc),
                    "suppressed_since_last": suppressed,
                },
            )
        if self._raw is not None:
            self._raw.abort()
        self.forget()

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

    def start(self) -> None:
        """The TLS layer has started: hand it what came early, then an early EOF or close."""
        early, self.early = self.early, None
        # uvloop keeps this reader's bound methods after the TLS layer is put back: drop the
        # 16 KiB buffer here, or it lives as long as the connection (S5: 53.5 -> 33.8 KiB).
        self._buffer = None
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

    def get_buffer(self, sizehint: int) -> Any:
        if self.early is not None:
            if self._buffer is None:
                self._buffer = bytearray(16384)
            return self._buffer
        return self.inner.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self.early is not None:
            assert self._buffer is not None
            self.early += self._buffer[:nbytes]
            return
        tls.handshaking = self.connection
        try:
            self.inner.buffer_updated(nbytes)
        finally:
            tls.handshaking = None

    def eof_received(self) -> bool | None:
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


# OpenSSL's reasons for a failed handshake -> what the log line says.
_FAILURES = {
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "NO_SHARED_CIPHER": "no_shared_cipher",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_client_certificate",
    "HTTP_REQUEST": "plain_http_on_tls_port",
    "WRONG_VERSION_NUMBER": "not_tls",
}


def handshake_failure(exc: BaseException) -> str:
    """Why a handshake failed, in words an operator greps for."""
    if isinstance(exc, ssl.SSLCertVerificationError):
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


class FailureLog:
    """At most one log line per failure reason every `every` seconds, saying how many were
    left out since: a scanner cannot flood the log, and nothing goes unseen."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, reason: str) -> int | None:
        """None when this one is left out; else how many were left out before it."""
        now = time.monotonic()
        if now - self._last.get(reason, -1e9) < self.every:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return None
        if len(self._last) > 64:  # reasons are a closed set, but stay bounded anyway
            self._last.clear()
        self._last[reason] = now
        return self._suppressed.pop(reason, 0)
