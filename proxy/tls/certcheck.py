"""What a certificate is fit for, checked the way TLS clients check it (pure, cryptography only):
the names a CA's name constraints let it vouch for, a server certificate against a client one,
a CA against a leaf, and a whole chain through cryptography's verifier (the same WebPKI rules
as Chromium's and rustls' verifiers: purpose, name constraints, validity)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _constraints(ca: x509.Certificate) -> x509.NameConstraints | None:
    try:
        return ca.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None


def _dns_within(name: str, base: str) -> bool:
    name, base = name.lower().rstrip("."), base.lower().rstrip(".")
    if base.startswith("."):  # OpenSSL's reading: names under it, not the name itself
        return name.endswith(base)
    return not base or name == base or name.endswith("." + base)


def _ip_within(address: ipaddress.IPv4Address | ipaddress.IPv6Address, base: IPNetwork) -> bool:
    return address.version == base.version and address in base


def _allowed(name: x509.GeneralName, subtrees: Sequence[x509.GeneralName]) -> bool | None:
    """Whether one of `subtrees` covers `name`; None when none of them is of its kind."""
    same_kind = [t for t in subtrees if type(t) is type(name)]
    if not same_kind:
        return None
    if isinstance(name, x509.DNSName):
        return any(_dns_within(name.value, str(t.value)) for t in same_kind)
    if isinstance(name, x509.IPAddress):
        address = name.value
        assert isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address)
        return any(
            isinstance(t.value, ipaddress.IPv4Network | ipaddress.IPv6Network)
            and _ip_within(address, t.value)
            for t in same_kind
        )
    return True  # other kinds (URIs) are never constrained by the development CA


def outside_constraints(ca: x509.Certificate, names: Sequence[x509.GeneralName]) -> list[str]:
    """The SAN entries the CA's name constraints forbid it to vouch for (RFC 5280 4.2.1.10:
    a constraint limits only the names of its own kind)."""
    constraints = _constraints(ca)
    if constraints is None:
        return []
    out = []
    for name in names:
        permitted = _allowed(name, constraints.permitted_subtrees or [])
        excluded = _allowed(name, constraints.excluded_subtrees or [])
        if permitted is False or excluded is True:
            out.append(str(name.value))
    return out


_HOST_LIKE = re.compile(
    r"[A-Za-z0-9_]+(?:-+[A-Za-z0-9_]+)*(?:\.[A-Za-z0-9_]+(?:-+[A-Za-z0-9_]+)*)+"
)


def cn_outside_constraints(ca: x509.Certificate, leaf: x509.Certificate) -> list[str]:
    """OpenSSL also checks a subject CN that looks like a host name (two labels or more)
    against the CA's DNS constraints when the certificate has no DNS SAN."""
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if sans.get_values_for_type(x509.DNSName):
            return []
    except x509.ExtensionNotFound:
        pass
    cns = [str(a.value) for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return outside_constraints(ca, [x509.DNSName(cn) for cn in cns if _HOST_LIKE.fullmatch(cn)])


def constraints_text(ca: x509.Certificate) -> str:
    """What the CA may vouch for, for a message: 'localhost, test, internal and the names under
    them'; IP networks when it limits them."""
    constraints = _constraints(ca)
    if constraints is None or not constraints.permitted_subtrees:
        return "any name"
    dns = [str(t.value) for t in constraints.permitted_subtrees if isinstance(t, x509.DNSName)]
    ips = [str(t.value) for t in constraints.permitted_subtrees if isinstance(t, x509.IPAddress)]
    parts = []
    if dns:
        parts.append(", ".join(dns) + " and the names under them")
    if ips:
        parts.append("IP addresses in " + ", ".join(ips))
    return "; ".join(parts)


def limits_ip_addresses(ca: x509.Certificate) -> bool:
    """IP-address name constraints, which BoringSSL (grpcio) cannot check: it refuses every
    certificate with an IP SAN under such a CA ("unsupported name constraint type")."""
    constraints = _constraints(ca)
    if constraints is None:
        return False
    subtrees = [*(constraints.permitted_subtrees or []), *(constraints.excluded_subtrees or [])]
    return any(isinstance(t, x509.IPAddress) for t in subtrees)


def is_ca(cert: x509.Certificate) -> bool:
    """basicConstraints CA:TRUE, or a version 1 self-signed certificate (which OpenSSL also
    takes as a trust anchor)."""
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return cert.version == x509.Version.v1 and cert.issuer == cert.subject


def _usages(cert: x509.Certificate) -> list[x509.ObjectIdentifier] | None:
    try:
        return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return None  # no EKU: fit for any purpose


def is_client_only(cert: x509.Certificate) -> bool:
    """An extendedKeyUsage that leaves out serverAuth: TLS clients refuse it from a server."""
    usages = _usages(cert)
    return usages is not None and not {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    } & set(usages)


def is_client_certificate(cert: x509.Certificate) -> bool:
    usages = _usages(cert)
    return usages is not None and ExtendedKeyUsageOID.CLIENT_AUTH in usages and is_client_only(cert)


def server_name(cert: x509.Certificate) -> x509.DNSName | x509.IPAddress | None:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for name in names:
        if isinstance(name, x509.DNSName):
            # A wildcard stands for one label: check a name it covers.
            value = name.value
            return x509.DNSName("a" + value[1:] if value.startswith("*.") else value)
        if isinstance(name, x509.IPAddress) and not isinstance(
            name.value, ipaddress.IPv4Network | ipaddress.IPv6Network
        ):
            return x509.IPAddress(name.value)
    return None


def verify_chain(
    chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]
) -> str | None:
    """None when `chain` (leaf first) verifies up to one of `roots` for its purpose, as a TLS
    client checks a server certificate (for its first DNS name or IP address) or a server a
    client certificate (whose subject alternative name is optional, as OpenSSL has it); else
    why not. A server certificate without a DNS or IP name (a SPIFFE ID only) is checked for
    its chain, validity and the CA's name constraints alone."""
    leaf, intermediates = chain[0], [c for c in chain[1:] if c not in roots]
    builder = PolicyBuilder().store(Store(list(roots)))
    subject = server_name(leaf)
    try:
        if is_client_certificate(leaf) or subject is None:
            ee = (
                ExtensionPolicy.webpki_defaults_ee().may_be_present(
                    x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
                )
                if is_client_certificate(leaf)
                else ExtensionPolicy.permit_all()
            )
            builder = builder.extension_policies(
                ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee
            )
            builder.build_client_verifier().verify(leaf, intermediates)
        else:
            builder.build_server_verifier(subject).verify(leaf, intermediates)
    except VerificationError as e:
        return str(e)
    for root in roots:
        if root.subject == (intermediates[-1] if intermediates else leaf).issuer:
            outside = cn_outside_constraints(root, leaf)
            if outside:
                return (
                    f"its subject CN {outside[0]} is outside the CA's name constraints, which "
                    "OpenSSL checks when there is no DNS SAN"
                )
    return None
