"""The handshake's plumbing: getting a failed handshake's TLS alert to the client, telling plain
HTTP from TLS by a connection's first byte, and naming why a handshake failed.

The event loop's TLS layer closes the transport on a failed handshake with the alert unsent.
`AlertingSSLObject` (the contexts' `sslobject_class`) keeps OpenSSL's outgoing BIO, and during
a handshake a `HandshakeReader` sits between the raw transport and the TLS layer and sets the
module-global `handshaking` around each read it hands on: the one mutable global besides the
metrics, forced by the SSLObject API, which gives the object no way to reach its connection."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from typing import Any, Protocol, cast


class HandshakeWatch(Protocol):
    """The connection whose handshake bytes are being processed (see AlertingSSLObject)."""

    def alert_ready(self, alert: bytes, server_name: str | None) -> None: ...


# Set by the connection around each read it hands to the TLS layer during its handshake.
handshaking: HandshakeWatch | None = None


class AlertingSSLObject(ssl.SSLObject):
    """An SSLObject that gets the TLS alert of a failed handshake to the client.

    The event loop's TLS layer (asyncio's sslproto and uvloop's port of it) closes the transport
    at once when the handshake fails, and the alert OpenSSL wrote stays unsent in its outgoing
    memory BIO: the client sees EOF. This object keeps a reference to that BIO and, when
    do_handshake fails, hands its bytes to the connection being read (`handshaking`), which
    writes them to the socket before the close. It also records the client's SNI."""

    _alert_bio: ssl.MemoryBIO
    server_name_seen: str | None = None

    @classmethod
    def _create(
        cls, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, *args: Any, **kwargs: Any
    ) -> Any:
        self = super()._create(incoming, outgoing, *args, **kwargs)  # type: ignore[misc]
        self._alert_bio = outgoing
        # The TLS layer calls read, write and pending several times per request (read until
        # SSLWantReadError): bound to the C object, each call skips ssl.py's Python wrapper
        # (its frame, and its entry in each SSLWantReadError's traceback). The C methods take
        # no keywords and no defaults (`read` needs its size, and a buffer or none at all):
        # uvloop's and asyncio's TLS layers always call them so, positionally.
        raw = self._sslobj
        vars(self).update(read=raw.read, write=raw.write, pending=raw.pending)
        return self

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError:
            watch = handshaking
            if watch is not None:
                watch.alert_ready(self._alert_bio.read(), self.server_name_seen)
            raise


def record_server_name(
    ssl_object: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext
) -> None:
    if isinstance(ssl_object, AlertingSSLObject):
        ssl_object.server_name_seen = server_name


class HandshakingConnection(HandshakeWatch, Protocol):
    """What a HandshakeReader needs of the client connection (`downstream.ClientConnection`)."""

    def refuse_plain_http(self) -> None: ...

    def close_raw(self) -> None: ...


class HandshakeReader(asyncio.BufferedProtocol):
    """Between the raw transport and the TLS layer during a handshake: marks whose bytes are
    being processed (`handshaking`), so a failure's alert goes back on the right socket. It
    also tells plain HTTP from TLS by the connection's first byte."""

    def __init__(self, inner: Any, connection: HandshakingConnection) -> None:
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
            elif self._eof:
                self.connection.close_raw()  # the answer is written: close once it is sent
            return
        self._peeked = bool(early)
        if early:
            buffer = self.inner.get_buffer(len(early))
            buffer[: len(early)] = early
            self.buffer_updated(len(early))
        if self._lost is not None:
            self.inner.connection_lost(self._lost[0])
        elif self._eof and not self.inner.eof_received():
            self.connection.close_raw()

    def step_aside(self) -> None:
        """The handshake is done and the TLS layer reads for itself again. uvloop keeps this
        reader's bound methods for the connection's life, so it lets go of the connection: an
        HTTP/2 connection's HTTP/1.1 predecessor (ALPN's choice) is freed at once, not kept
        as long as the connection is open."""
        del self.inner, self.connection

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
        global handshaking  # noqa: PLW0603 -- the SSLObject API leaves no other way (see above)
        handshaking = self.connection
        try:
            self.inner.buffer_updated(nbytes)
        finally:
            handshaking = None

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


# --- a failed handshake's close: the alert first, then a short lingering close ---------------
# The event loop's TLS layer closes the socket as soon as the handshake fails. A TLS 1.3 client
# has finished its side by then and may already be sending its request: closing a socket with
# unread bytes makes the kernel answer with a reset, and the client loses the alert with it
# (curl: "getpeername() failed ... Transport endpoint is not connected" instead of "alert
# certificate required"). So the socket is kept through a duplicate descriptor: the alert, our
# FIN, then whatever the client still sends read and dropped until it closes or LINGER_SECONDS
# pass, as nginx's lingering close does. At most LINGER_MAX at once: beyond, a plain close.
LINGER_SECONDS = 2.0
LINGER_MAX = 64
_lingering: set[Lingering] = set()
_DROPPED = bytearray(65536)  # what lingering sockets read, shared: nobody looks at it


def lingering() -> int:
    """Sockets lingering now: one descriptor each, no longer a connection's (see Lingering)."""
    return len(_lingering)


class Lingering:
    """One failed handshake's socket, held open after its alert until the client closes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.loop = loop
        self.sock = sock
        loop.add_reader(sock, self._drain)
        self.timer = loop.call_later(LINGER_SECONDS, self.close)
        _lingering.add(self)

    def _drain(self) -> None:
        try:
            if self.sock.recv_into(_DROPPED):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self.close()  # the client closed (or reset): nothing is lost by closing now

    def close(self) -> None:
        if self in _lingering:
            _lingering.discard(self)
            self.timer.cancel()
            self.loop.remove_reader(self.sock)
            self.sock.close()


def linger_after_alert(raw: asyncio.Transport, alert: bytes) -> bool:
    """Send `alert` and close `raw`'s socket gracefully, whatever the TLS layer does with `raw`
    next; False when it cannot (then the caller writes the alert through `raw` itself)."""
    if len(_lingering) >= LINGER_MAX:
        return False
    pseudo = raw.get_extra_info("socket")
    # the alert must follow what the transport still has to send, not jump ahead of it
    if pseudo is None or raw.get_write_buffer_size():
        return False
    try:
        fd = os.dup(pseudo.fileno())
    except OSError:
        return False
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        return False
    try:
        sock.setblocking(False)
        sock.send(alert)  # a few bytes on a socket that has sent only the server's flight
        sock.shutdown(socket.SHUT_WR)
        Lingering(asyncio.get_running_loop(), sock)
    except (OSError, RuntimeError):
        sock.close()
        return False
    return True


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
CRL_VERDICTS = {
    23: "client_certificate_revoked",  # X509_V_ERR_CERT_REVOKED
    12: "client_crl_expired",  # X509_V_ERR_CRL_HAS_EXPIRED: fail closed until a fresh one
    3: "client_crl_missing",  # X509_V_ERR_UNABLE_TO_GET_CRL: no CRL of the client's CA
}


def refusal_reason(exc: ssl.SSLError, mtls: bool) -> str:
    """tls_handshake_errors_total's reason for a handshake OpenSSL refused."""
    about_client_cert = "CERTIFICATE" in str(exc.reason or "").upper()
    if not (mtls and about_client_cert):
        return "protocol"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return CRL_VERDICTS.get(exc.verify_code, "client_certificate")
    return "client_certificate"


def handshake_failure(exc: BaseException) -> str:
    """Why a handshake failed, in words an operator greps for."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in CRL_VERDICTS:
            return CRL_VERDICTS[exc.verify_code]
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
