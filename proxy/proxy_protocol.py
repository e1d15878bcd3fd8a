"""The PROXY protocol (HAProxy's, versions 1 and 2), both directions: parsing the header a load
balancer puts before a connection's first byte, and building the one the sidecar sends the app.
Pure: bytes in, a `ProxyHeader` (or bytes) out; the sockets are downstream's and the pool's."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the spec's longest v1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# A v2 header is 16 bytes and up to 65535 more. Senders put a few TLVs there (AWS's VPC
# endpoint id, GCP's connection id, HAProxy's SSL fields): 4 KiB is plenty, and is what a
# trusted sender may make a connection hold before its first TLS byte.
V2_MAX_PAYLOAD = 4096

# v2 TLV types (the spec's PP2_TYPE_* and PP2_SUBTYPE_SSL_*)
TLV_ALPN = 0x01
TLV_AUTHORITY = 0x02
TLV_CRC32C = 0x03
TLV_NOOP = 0x04
TLV_UNIQUE_ID = 0x05
TLV_SSL = 0x20
SSL_VERSION = 0x21
SSL_CN = 0x22
SSL_CIPHER = 0x23
SSL_SIG_ALG = 0x24
SSL_KEY_ALG = 0x25
# The client certificate's SPIFFE ID: a type of this sidecar's own, in the spec's custom range
# (0xE0-0xEF), away from the clouds' (GCP 0xE0, AWS 0xEA, Azure 0xEE).
TLV_SPIFFE_ID = 0xE5
# PP2_CLIENT_SSL: the client connected over TLS; PP2_CLIENT_CERT_CONN: it presented a
# certificate on this connection; PP2_CLIENT_CERT_SESS: ... on this TLS session.
CLIENT_SSL = 0x01
CLIENT_CERT_CONN = 0x02
CLIENT_CERT_SESS = 0x04

Reason = Literal["missing", "malformed"]


class ProxyProtocolError(ValueError):
    """The bytes are not a PROXY header (`missing`) or a broken one (`malformed`)."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason: Reason = reason


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What a PROXY header said. `source` and `destination` are None when it carries no usable
    addresses (v1 UNKNOWN, v2 LOCAL, UNSPEC or unix): the connection's own then stand."""

    version: int
    length: int  # bytes of the header, to skip before the TLS layer's first
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    local: bool = False  # v2 LOCAL: the balancer's own connection (a health check)
    tlvs: tuple[tuple[int, bytes], ...] = ()


def parse(data: bytes | bytearray) -> ProxyHeader | None:
    """The header at the start of `data`; None while more bytes are needed (never past the
    bounds above). Raises ProxyProtocolError for anything else."""
    if data[:1] == V1_PREFIX[:1]:
        if not V1_PREFIX.startswith(bytes(data[:6])):
            raise ProxyProtocolError("missing", "no PROXY header (the connection began otherwise)")
        return _parse_v1(data)
    if data[:1] == V2_SIGNATURE[:1]:
        if not V2_SIGNATURE.startswith(bytes(data[:12])):
            raise ProxyProtocolError("missing", "no PROXY header (the connection began otherwise)")
        return _parse_v2(data)
    if not data:
        return None
    raise ProxyProtocolError("missing", "no PROXY header (the connection began otherwise)")


def _parse_v1(data: bytes | bytearray) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or b"\n" in data[:V1_MAX]:
            raise ProxyProtocolError("malformed", "PROXY v1 line without CRLF within 107 bytes")
        return None
    line = bytes(data[:end])
    if not all(0x20 <= b < 0x7F for b in line):
        raise ProxyProtocolError("malformed", "PROXY v1 line with control characters")
    parts = line.decode("ascii").split(" ")
    if parts[1:2] == ["UNKNOWN"]:
        return ProxyHeader(1, end + 2)  # the rest of an UNKNOWN line is to be ignored
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(
            "malformed", "PROXY v1 line is not 'PROXY TCP4|TCP6 SRC DST SPORT DPORT'"
        )
    version = 4 if parts[1] == "TCP4" else 6
    source = _v1_address(parts[2], parts[4], version)
    destination = _v1_address(parts[3], parts[5], version)
    return ProxyHeader(1, end + 2, source, destination)


def _v1_address(host: str, port: str, version: int) -> tuple[str, int]:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ProxyProtocolError("malformed", f"PROXY v1 address {host!r} is not an IP") from None
    if address.version != version:
        raise ProxyProtocolError("malformed", f"PROXY v1 address {host!r} is not IPv{version}")
    # 1-5 digits, no sign, no leading zero (the spec's wording: "0 to 65535, no leading 0")
    if not (port.isdigit() and port.isascii() and len(port) <= 5) or (
        len(port) > 1 and port[0] == "0"
    ):
        raise ProxyProtocolError("malformed", f"PROXY v1 port {port!r} is not a port")
    if int(port) > 65535:
        raise ProxyProtocolError("malformed", f"PROXY v1 port {port!r} is not a port")
    return str(address), int(port)


def _parse_v2(data: bytes | bytearray) -> ProxyHeader | None:
    if len(data) < 16:
        return None
    version_command, family, length = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != 2:
        raise ProxyProtocolError("malformed", f"PROXY v2 header of version {version_command >> 4}")
    command = version_command & 0x0F
    if command > 1:
        raise ProxyProtocolError(
            "malformed", f"PROXY v2 command {command} is neither LOCAL nor PROXY"
        )
    if length > V2_MAX_PAYLOAD:
        raise ProxyProtocolError(
            "malformed", f"PROXY v2 header of {length} bytes (at most {V2_MAX_PAYLOAD} taken)"
        )
    address_family, transport = family >> 4, family & 0x0F
    if address_family > 3 or transport > 2:
        raise ProxyProtocolError("malformed", f"PROXY v2 family byte 0x{family:02x} is unknown")
    if command == 1 and transport == 2:
        raise ProxyProtocolError("malformed", "PROXY v2 says datagram on a stream connection")
    if len(data) < 16 + length:
        return None
    payload = bytes(data[16 : 16 + length])
    sizes = {0: 0, 1: 12, 2: 36, 3: 216}
    size = sizes[address_family]
    if command == 1 and len(payload) < size:
        raise ProxyProtocolError("malformed", "PROXY v2 addresses are cut short")
    tlvs = _tlvs(payload[size:]) if command == 1 else _tlvs_lenient(payload, size)
    if command == 0:  # LOCAL: the balancer speaking for itself; addresses are to be ignored
        return ProxyHeader(2, 16 + length, local=True, tlvs=tlvs)
    if address_family in (1, 2) and transport == 1:
        width = 4 if address_family == 1 else 16
        cls = ipaddress.IPv4Address if address_family == 1 else ipaddress.IPv6Address
        src = cls(payload[:width])
        dst = cls(payload[width : 2 * width])
        sport, dport = struct.unpack_from("!HH", payload, 2 * width)
        return ProxyHeader(2, 16 + length, (str(src), sport), (str(dst), dport), tlvs=tlvs)
    # UNSPEC, or unix sockets (a path is no client address): the connection's own stands.
    return ProxyHeader(2, 16 + length, tlvs=tlvs)


def _tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    found: list[tuple[int, bytes]] = []
    at = 0
    while at < len(data):
        if len(data) - at < 3:
            raise ProxyProtocolError("malformed", "PROXY v2 TLV cut short")
        kind, size = struct.unpack_from("!BH", data, at)
        if at + 3 + size > len(data):
            raise ProxyProtocolError("malformed", "PROXY v2 TLV longer than the header")
        found.append((kind, data[at + 3 : at + 3 + size]))
        at += 3 + size
    return tuple(found)


def _tlvs_lenient(payload: bytes, size: int) -> tuple[tuple[int, bytes], ...]:
    """LOCAL's payload is to be skipped; its TLVs are read only when they parse."""
    try:
        return _tlvs(payload[size:]) if len(payload) >= size else ()
    except ProxyProtocolError:
        return ()


def networks(cidrs: Iterable[str], option: str = "--proxy-protocol-from") -> tuple[IPNetwork, ...]:
    """'10.0.0.0/8', '192.0.2.7', '2001:db8::/32' -> networks; ValueError naming a bad one."""
    found: list[IPNetwork] = []
    for text in cidrs:
        try:
            found.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"{option} {text!r} is not an address or CIDR; use e.g. 10.0.0.0/8 or 192.0.2.7"
            ) from None
    return tuple(found)


def trusted(address: str, allowed: Sequence[IPNetwork]) -> bool:
    """Whether a connection from `address` may send a PROXY header (IPv4-mapped IPv6 counts
    as the IPv4 address, as a dual-stack listener reports it)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in allowed)


# --- building: the header the sidecar sends the app -------------------------------------------


def build_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """`PROXY TCP4|TCP6 ...`; UNKNOWN when the two are not of one family."""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        return b"PROXY UNKNOWN\r\n"
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {source[1]} {destination[1]}\r\n".encode("ascii")


def build_v2(
    source: tuple[str, int],
    destination: tuple[str, int],
    tlvs: Sequence[tuple[int, bytes]] = (),
) -> bytes:
    """A v2 PROXY command over TCP, with `tlvs` after the addresses."""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:  # no one family for both: UNSPEC, as the spec says
        family, addresses = 0x00, b""
    elif src.version == 4:
        family = 0x11
        addresses = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    else:
        family = 0x21
        addresses = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    payload = addresses + b"".join(tlv(kind, value) for kind, value in tlvs)
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(payload)) + payload


def build_local(version: str | None) -> bytes:
    """What a health check says first to an app that expects a header (v2 LOCAL, v1 UNKNOWN:
    the connection is the sender's own); nothing without one."""
    if version == "v2":
        return V2_SIGNATURE + bytes([0x20, 0x00, 0, 0])
    return b"PROXY UNKNOWN\r\n" if version == "v1" else b""


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def ssl_value(*, client_cert: bool, version: str | None, cn: str | None) -> bytes:
    """PP2_TYPE_SSL's value for a verified client: flags, verify 0 (the certificate, if any,
    verified), then the version and CN sub-TLVs."""
    flags = CLIENT_SSL | ((CLIENT_CERT_CONN | CLIENT_CERT_SESS) if client_cert else 0)
    body = struct.pack("!BI", flags, 0)
    if version:
        body += tlv(SSL_VERSION, version.encode("ascii"))
    if cn:
        body += tlv(SSL_CN, cn.encode("utf-8"))
    return body
