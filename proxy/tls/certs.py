"""Generate, load and inspect keys and certificates with `cryptography` (pure, no sockets)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import itertools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.config import CertificateError
from proxy.tls import certcheck

KeyType = Literal["ecdsa", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate with its private key, and the PEM bytes of both."""

    certificate: x509.Certificate
    key: PrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def new_key(key_type: KeyType = "ecdsa") -> PrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def subject_alt_names(names: Sequence[str]) -> list[x509.GeneralName]:
    """DNS names, IP addresses and URIs (e.g. spiffe://...) as SAN entries."""
    sans: list[x509.GeneralName] = []
    for name in names:
        if "://" in name:
            sans.append(x509.UniformResourceIdentifier(name))
            continue
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    return sans


def default_common_name(names: Sequence[str]) -> str:
    """The first DNS name (or URI), else a one-label name for an address: OpenSSL checks a CN
    that looks like a host name (`10.0.0.5` does) against a CA's DNS name constraints when the
    certificate has no DNS SAN, and refuses it; `ip-10-0-0-5` is never taken for one."""
    for name in names:
        if not is_address(name):
            return name
    if names:
        return "ip-" + re.sub(r"[^0-9A-Za-z]+", "-", names[0]).strip("-")
    return "tls-sidecar"


def is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# What a development CA may sign (X.509 name constraints): a leaked development CA key cannot
# impersonate a real site. A DNS constraint covers the name and every name under it. DNS names
# only: BoringSSL (grpcio) refuses a chain whose CA constrains IP addresses when the leaf has an
# IP SAN ("unsupported name constraint type"), so IP addresses are left unconstrained.
DEV_PERMITTED = ("localhost", "test", "internal")


def permitted_subtrees(names: Sequence[str]) -> list[x509.GeneralName]:
    """Name-constraint subtrees for names: DNS names (a leading `*.` dropped) or IP networks."""
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_network(name, strict=False)))
        except ValueError:
            out.append(x509.DNSName(name.removeprefix("*.").lower()))
    return out


def create_ca(
    common_name: str = "tls-sidecar development CA",
    *,
    key_type: KeyType = "ecdsa",
    days: int = 3650,
    permitted: Sequence[str] | None = None,
) -> Issued:
    """A CA; with `permitted`, limited by name constraints to those names and networks."""
    key = new_key(key_type)
    name = _name(common_name, "tls-sidecar")
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if permitted is not None:
        cert = cert.add_extension(
            x509.NameConstraints(
                permitted_subtrees=permitted_subtrees(permitted), excluded_subtrees=None
            ),
            critical=True,
        )
    return Issued(cert.sign(key, hashes.SHA256()), key)


def issue(
    ca: Issued | None,
    names: Sequence[str],
    *,
    common_name: str | None = None,
    organizational_unit: str | None = None,
    client: bool = False,
    key_type: KeyType = "ecdsa",
    days: int = 825,
    not_before: dt.datetime | None = None,
) -> Issued:
    """A leaf certificate for `names`, signed by `ca` (self-signed when ca is None)."""
    key = new_key(key_type)
    cn = common_name or default_common_name(names)
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if organizational_unit:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, organizational_unit))
    subject = x509.Name(attrs)
    start = not_before or (_now() - dt.timedelta(minutes=5))
    issuer_name = ca.certificate.subject if ca else subject
    signing_key = ca.key if ca else key
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(subject_alt_names(names)), critical=False
        )
    if ca:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    return Issued(builder.sign(signing_key, hashes.SHA256()), key)


def self_signed(names: Sequence[str] = DEFAULT_HOSTS) -> Issued:
    """The zero-configuration certificate: self-signed for localhost, 127.0.0.1 and ::1."""
    return issue(None, names, common_name="tls-sidecar self-signed", days=30)


def write_private(path: Path, data: bytes) -> None:
    """Write a key file readable by its owner only (0600), replacing any old file atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def load_chain(path: Path, option: str = "--cert") -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CertificateError(f"{option}: {path} cannot be read ({e.strerror})") from None
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateError(
            f"{option}: {path} holds no PEM certificate; expected -----BEGIN CERTIFICATE-----"
        ) from None
    return chain


def load_key(path: Path, option: str = "--key", password: bytes | None = None) -> PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CertificateError(f"{option}: {path} cannot be read ({e.strerror})") from None
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except TypeError:
        raise CertificateError(
            f"{option}: {path} is encrypted; give its password with --key-password-file"
        ) from None
    except ValueError:
        raise CertificateError(
            f"{option}: {path} holds no usable PEM private key (or the password is wrong)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CertificateError(f"{option}: {path} is a {type(key).__name__}; use an EC or RSA key")
    return key


def key_matches(cert: x509.Certificate, key: PrivateKey) -> bool:
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return cert.public_key().public_bytes(der, public) == key.public_key().public_bytes(der, public)


def check_pair(
    chain: list[x509.Certificate],
    key: PrivateKey,
    cert_path: Path | str,  # named in the messages: a file, or the SVID's endpoint and ID
    *,
    allow_expired: bool = False,
    now: dt.datetime | None = None,
    option: str = "--cert",
) -> list[str]:
    """Raise CertificateError for a pair that must not be served; return warnings otherwise."""
    leaf = chain[0]
    if certcheck.is_ca(leaf):
        raise CertificateError(
            f"{option}: {cert_path} is a CA certificate (basicConstraints CA:TRUE), which TLS "
            "clients refuse from a server; give the server certificate the CA issued"
        )
    if certcheck.is_client_only(leaf):
        raise CertificateError(
            f"{option}: {cert_path} is a client certificate (extendedKeyUsage without "
            "serverAuth), which TLS clients refuse from a server; give a server certificate"
        )
    if not key_matches(leaf, key):
        raise CertificateError(
            f"--key does not match the certificate in {cert_path}; "
            "give the key the certificate was issued for"
        )
    for child, parent in itertools.pairwise(chain):
        if child.issuer != parent.subject:
            raise CertificateError(
                f"{option}: {cert_path} chain is out of order: {child.subject.rfc4514_string()} is "
                f"not issued by the next certificate; list leaf first, then each issuer"
            )
    warnings = []
    moment = now or _now()
    if leaf.not_valid_before_utc > moment:
        raise CertificateError(
            f"{option}: {cert_path} is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M}"
            " UTC; check the clock or the certificate"
        )
    if leaf.not_valid_after_utc < moment:
        message = (
            f"{option}: {cert_path} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
            "renew it"
        )
        if not allow_expired:
            raise CertificateError(message + " (or start with --allow-expired)")
        warnings.append(message)
    return warnings


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def san_strings(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out: list[str] = []
    for general_name in ext:
        if isinstance(general_name, x509.DNSName):
            out.append(f"DNS:{general_name.value}")
        elif isinstance(general_name, x509.IPAddress):
            out.append(f"IP:{general_name.value}")
        elif isinstance(general_name, x509.UniformResourceIdentifier):
            out.append(f"URI:{general_name.value}")
    return out
