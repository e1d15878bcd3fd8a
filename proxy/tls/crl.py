"""Certificate revocation lists for client certificates (`--client-crl`): read (PEM, several to
a file, or DER), checked against the client CA that signed them, and made for the development
CA (`certs revoke`). Pure: cryptography only; OpenSSL checks the handshakes."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.config import CertificateError
from proxy.tls import certs

PEM_BEGIN = b"-----BEGIN X509 CRL-----"


@dataclass(frozen=True, slots=True)
class LoadedCrls:
    """What OpenSSL gets (PEM), what the log warns, and each CRL's next update (metrics)."""

    pem: bytes
    warnings: tuple[str, ...]
    next_updates: tuple[tuple[str, float], ...]  # (file name, unix time)
    revoked: frozenset[tuple[str, int]]  # (issuer, serial), for re-validation


def load_crls(path: Path, option: str = "--client-crl") -> list[x509.CertificateRevocationList]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CertificateError(f"{option}: {path} cannot be read ({e.strerror})") from None
    try:
        if PEM_BEGIN in data:
            return [
                x509.load_pem_x509_crl(PEM_BEGIN + block) for block in data.split(PEM_BEGIN)[1:]
            ]
        return [x509.load_der_x509_crl(data)]
    except ValueError:
        raise CertificateError(
            f"{option}: {path} holds no CRL; expected PEM (-----BEGIN X509 CRL-----) or DER"
        ) from None


def _next_update(crl: x509.CertificateRevocationList) -> dt.datetime | None:
    return crl.next_update_utc


def check_client_crls(
    paths: Sequence[Path], client_ca: Path, now: float | None = None
) -> LoadedCrls:
    """Every CRL read and its signature checked against a CA of `client_ca` (a CRL no CA of the
    bundle signed would never be consulted: OpenSSL looks CRLs up by issuer). A CRL past its
    next update is kept (OpenSSL then refuses that CA's clients: fail closed) and warned of."""
    cas = certs.load_chain(client_ca, "--client-ca")
    now = time.time() if now is None else now
    pem: list[bytes] = []
    warnings: list[str] = []
    next_updates: list[tuple[str, float]] = []
    revoked: set[tuple[str, int]] = set()
    for path in paths:
        for index, crl in enumerate(load_crls(path)):
            issuer = next((ca for ca in cas if ca.subject == crl.issuer), None)
            public = issuer.public_key() if issuer is not None else None
            if not isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey) or not (
                crl.is_signature_valid(public)
            ):
                raise CertificateError(
                    f"--client-crl: {path} is not signed by a CA of --client-ca "
                    f"({crl.issuer.rfc4514_string()}); give the CRL of the CA that signs clients"
                )
            name = path.name if index == 0 else f"{path.name}#{index}"
            update = _next_update(crl)
            if update is not None:
                next_updates.append((name, update.timestamp()))
                if update.timestamp() < now:
                    warnings.append(
                        f"--client-crl {name}: past its next update ({update:%Y-%m-%d %H:%M} "
                        "UTC); clients of that CA are refused until a fresh CRL is loaded"
                    )
            issuer_name = crl.issuer.rfc4514_string()
            revoked.update((issuer_name, entry.serial_number) for entry in crl)
            pem.append(crl.public_bytes(serialization.Encoding.PEM))
    return LoadedCrls(b"".join(pem), tuple(warnings), tuple(next_updates), frozenset(revoked))


def make_crl(
    ca: certs.Issued,
    serials: Iterable[int],
    *,
    days: int = 7,
    last_update: dt.datetime | None = None,
) -> x509.CertificateRevocationList:
    """A CRL of `ca` revoking `serials`, valid for `days` from `last_update` (default: now)."""
    start = last_update or (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(start)
        .next_update(start + dt.timedelta(days=days))
    )
    for serial in sorted(set(serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(start).build()
        )
    return builder.sign(ca.key, hashes.SHA256())
