"""Client-certificate identity, access policy and the X-Forwarded-Client-Cert value (pure)."""

from __future__ import annotations

import hashlib
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509

# cryptography is imported where certificates are decoded (mutual TLS, certificate loading):
# a serving process without mutual TLS never loads it.


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """What a verified client certificate says about its holder."""

    subject: str
    common_names: tuple[str, ...]
    organizational_units: tuple[str, ...]
    dns_sans: tuple[str, ...]
    uri_sans: tuple[str, ...]
    sha256: str
    pem: str


def identity_name(identity: ClientIdentity) -> str:
    """How the access log names a client: its SPIFFE id when it has one, else its subject."""
    for uri in identity.uri_sans:
        if uri.startswith("spiffe://"):
            return uri
    return identity.subject


def dns_and_uri_sans(cert: x509.Certificate) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A certificate's DNS and URI subject alternative names."""
    from cryptography import x509  # noqa: PLC0415

    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return (), ()
    dns = tuple(sans.get_values_for_type(x509.DNSName))
    return dns, tuple(sans.get_values_for_type(x509.UniformResourceIdentifier))


def identity_from_der(der: bytes) -> ClientIdentity:
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    cert = x509.load_der_x509_certificate(der)
    subject = cert.subject
    dns, uris = dns_and_uri_sans(cert)
    return ClientIdentity(
        subject=subject.rfc4514_string(),
        common_names=tuple(
            str(a.value) for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ),
        organizational_units=tuple(
            str(a.value) for a in subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        ),
        dns_sans=dns,
        uri_sans=uris,
        sha256=hashlib.sha256(der).hexdigest(),
        pem=cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
    )


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """Who may pass: any rule that matches admits; no certificate never does."""

    allow_cn: tuple[str, ...] = ()
    allow_ou: tuple[str, ...] = ()
    allow_dns_san: tuple[str, ...] = ()
    allow_uri_san: tuple[str, ...] = ()
    allow_all: bool = False

    @property
    def has_rules(self) -> bool:
        return bool(
            self.allow_all
            or self.allow_cn
            or self.allow_ou
            or self.allow_dns_san
            or self.allow_uri_san
        )

    def decide(self, identity: ClientIdentity | None) -> str | None:
        """None when the client is allowed; otherwise the reason (a metric label)."""
        if identity is None:
            return "no_certificate"
        if self.allow_all:
            return None
        if any(cn in self.allow_cn for cn in identity.common_names):
            return None
        if any(ou in self.allow_ou for ou in identity.organizational_units):
            return None
        if any(name in self.allow_dns_san for name in identity.dns_sans):
            return None
        if any(
            uri_matches(pattern, uri) for pattern in self.allow_uri_san for uri in identity.uri_sans
        ):
            return None
        return "not_allowed"


def uri_matches(pattern: str, uri: str) -> bool:
    """Exact, or a prefix when the pattern ends in '/*' (spiffe://td/ns/* matches spiffe://td/ns/a)."""
    if pattern.endswith("/*"):
        return uri.startswith(pattern[:-1]) and len(uri) > len(pattern) - 1
    return uri == pattern


def _printable(value: str) -> str:
    """Certificate text is attacker-chosen: no control characters may reach a header."""
    return "".join(c if " " <= c <= "~" or c > "\x9f" else f"\\x{ord(c):02x}" for c in value)


def _quoted(value: str) -> str:
    return '"' + _printable(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def xfcc_value(identity: ClientIdentity, *, by: str | None, include_pem: bool) -> bytes:
    """Envoy's X-Forwarded-Client-Cert element: By, Hash, Cert, Subject, URI, DNS."""
    parts = []
    if by:
        parts.append(f"By={by}")
    parts.append(f"Hash={identity.sha256}")
    if include_pem:
        parts.append(f'Cert="{urllib.parse.quote(identity.pem, safe="")}"')
    parts.append(f"Subject={_quoted(identity.subject)}")
    parts.extend(f"URI={_printable(uri)}" for uri in identity.uri_sans)
    parts.extend(f"DNS={_printable(name)}" for name in identity.dns_sans)
    return ";".join(parts).encode("utf-8", "replace")
