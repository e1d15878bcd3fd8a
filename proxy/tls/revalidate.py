"""--client-cert-revalidate: is a client certificate that passed its handshake still good now?
Pure: the certificate, the current client CA bundle and CRLs, and a time in; a reason out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from proxy.tls.crl import LoadedCrls


@dataclass(frozen=True, slots=True)
class Trust:
    """The client CAs and revocations of one generation of TLS contexts."""

    cas: tuple[x509.Certificate, ...]
    revoked: frozenset[tuple[str, int]]


def trust_from(client_ca_pem: bytes, crls: LoadedCrls | None) -> Trust:
    cas = tuple(x509.load_pem_x509_certificates(client_ca_pem))
    return Trust(cas, crls.revoked if crls is not None else frozenset())


def verdict(cert_pem: str, trust: Trust, now: float) -> str | None:
    """None while the certificate is still good; else why not: `expired`, `revoked` (by a
    CRL loaded since), or `ca_removed` (no CA of the bundle signed it any more)."""
    cert = x509.load_pem_x509_certificate(cert_pem.encode("ascii"))
    if cert.not_valid_after_utc.timestamp() < now:
        return "expired"
    issuer = cert.issuer.rfc4514_string()
    if (issuer, cert.serial_number) in trust.revoked:
        return "revoked"
    for ca in trust.cas:
        if ca.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return None
    return "ca_removed"


def cached_verdicts(trust: Trust, now: float) -> Callable[[str, str], str | None]:
    """verdict() once per distinct certificate (by its hash) in one round of checks."""
    seen: dict[str, str | None] = {}

    def check(sha256: str, cert_pem: str) -> str | None:
        if sha256 not in seen:
            seen[sha256] = verdict(cert_pem, trust, now)
        return seen[sha256]

    return check
