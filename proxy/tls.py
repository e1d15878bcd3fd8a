"""SSLContext construction from config and certificate material, and its swap on reload."""

from __future__ import annotations

import logging
import ssl
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from . import certs
from .config import Config

log = logging.getLogger("tls_sidecar.tls")

# TLS 1.2: forward secrecy (ECDHE) and AEAD only. TLS 1.3 suites are all AEAD and PFS.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"
ALPN = ["http/1.1"]


@dataclass(frozen=True, slots=True)
class ServedCertificate:
    """What a context serves, for logs and metrics (never key material)."""

    subject: str
    not_after: float
    serial: int
    source: str


def base_context(min_version: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= (
        ssl.OP_NO_COMPRESSION
        | ssl.OP_NO_RENEGOTIATION
        | ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_SINGLE_ECDH_USE
    )
    ctx.set_alpn_protocols(ALPN)
    return ctx


def warn_if_key_exposed(key_path: Path) -> None:
    """Private keys should not be readable by group or others (Secret volumes use 0400/0440)."""
    try:
        mode = key_path.stat().st_mode
    except OSError:
        return
    if mode & stat.S_IROTH:
        log.warning(
            "key file is readable by every user; restrict it with chmod 600",
            extra={"path": str(key_path)},
        )


def context_from_files(config: Config) -> tuple[ssl.SSLContext, ServedCertificate, list[str]]:
    """Validate the configured pair with `cryptography` first, so errors are one clear line."""
    assert config.cert_file is not None and config.key_file is not None
    chain = certs.load_chain(config.cert_file)
    key = certs.load_key(config.key_file)
    warnings = certs.check_pair(chain, key, config.cert_file)
    warn_if_key_exposed(config.key_file)
    ctx = base_context(config.tls_min_version)
    try:
        ctx.load_cert_chain(str(config.cert_file), str(config.key_file))
    except ssl.SSLError as e:
        raise certs.CertificateError(
            f"--cert/--key: OpenSSL refused {config.cert_file} ({e.reason}); "
            "check that both files are PEM"
        ) from None
    return ctx, _served(chain[0], str(config.cert_file)), warnings


def context_self_signed(config: Config) -> tuple[ssl.SSLContext, ServedCertificate]:
    """The embedded default: a fresh self-signed certificate that never touches the disk for long.

    OpenSSL loads certificates only from files, so the pair passes through a private temporary
    directory that is removed at once.
    """
    issued = certs.self_signed()
    ctx = base_context(config.tls_min_version)
    with tempfile.TemporaryDirectory(prefix="tls-sidecar-") as tmp:
        cert_path, key_path = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
        cert_path.write_bytes(issued.cert_pem)
        certs.write_private(key_path, issued.key_pem)
        ctx.load_cert_chain(str(cert_path), str(key_path))
    return ctx, _served(issued.certificate, "self-signed")


def _served(cert: x509.Certificate, source: str) -> ServedCertificate:
    return ServedCertificate(
        subject=cert.subject.rfc4514_string(),
        not_after=cert.not_valid_after_utc.timestamp(),
        serial=cert.serial_number,
        source=source,
    )


class TlsState:
    """The context new handshakes use; swapped whole on reload, never mutated in place."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self.context, self.served, warnings = self._build()
        for warning in warnings:
            log.warning(warning)

    def _build(self) -> tuple[ssl.SSLContext, ServedCertificate, list[str]]:
        if self._config.cert_file is None:
            ctx, served = context_self_signed(self._config)
            return ctx, served, []
        return context_from_files(self._config)

    @property
    def self_signed(self) -> bool:
        return self._config.cert_file is None

    def reload(self) -> ServedCertificate:
        """Build a new context from the files; on any error keep the old one and raise."""
        if self.self_signed:
            return self.served
        ctx, served, warnings = self._build()
        for warning in warnings:
            log.warning(warning)
        self.context, self.served = ctx, served
        return served
