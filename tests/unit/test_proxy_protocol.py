"""The PROXY protocol parser and builder: v1 and v2 as the spec writes them, and what a broken
or hostile header gets (never an exception other than ProxyProtocolError, never unbounded)."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import proxy_protocol as pp
from proxy.proxy_protocol import ProxyProtocolError, parse

CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


def v2(command: int, family: int, payload: bytes) -> bytes:
    return pp.V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, family, len(payload)) + payload


def test_v1_tcp4_and_what_follows_it() -> None:
    data = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\n" + CLIENT_HELLO
    header = parse(data)
    assert header is not None
    assert header.version == 1
    assert header.source == ("192.0.2.7", 56324)
    assert header.destination == ("198.51.100.1", 443)
    assert data[header.length :] == CLIENT_HELLO


def test_v1_tcp6_is_normalised() -> None:
    header = parse(b"PROXY TCP6 2001:db8:0::1 2001:db8::2 1 65535\r\n")
    assert header is not None
    assert header.source == ("2001:db8::1", 1)
    assert header.destination == ("2001:db8::2", 65535)


def test_v1_unknown_carries_no_address() -> None:
    header = parse(b"PROXY UNKNOWN ffff:: whatever\r\nrest")
    assert header is not None
    assert header.source is None
    assert header.length == len(b"PROXY UNKNOWN ffff:: whatever\r\n")


def test_v1_needs_more_until_crlf() -> None:
    line = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\n"
    for cut in range(len(line)):
        assert parse(line[:cut]) is None, cut


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 192.0.2.7 198.51.100.1 56324\r\n",  # a field short
        b"PROXY TCP4 192.0.2.7  198.51.100.1 56324 443\r\n",  # two spaces
        b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n",  # family mismatch
        b"PROXY TCP6 192.0.2.7 198.51.100.1 1 2\r\n",
        b"PROXY TCP4 192.0.2.007 198.51.100.1 1 2\r\n",  # leading zeros in an octet
        b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 443\r\n",  # port out of range
        b"PROXY TCP4 192.0.2.7 198.51.100.1 0443 443\r\n",  # leading zero
        b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 443\r\n",
        b"PROXY UDP4 192.0.2.7 198.51.100.1 1 2\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\n",  # LF alone
        b"PROXY TCP4 192.0.2.\x007 198.51.100.1 1 2\r\n",  # control character
        b"PROXY " + b"A" * 120,  # no CRLF within 107 bytes
    ],
)
def test_v1_malformed(line: bytes) -> None:
    with pytest.raises(ProxyProtocolError) as raised:
        parse(line)
    assert raised.value.reason == "malformed"


@pytest.mark.parametrize(
    "data", [CLIENT_HELLO, b"GET / HTTP/1.1\r\n", b"PROXX ", b"\r\n\r\n\x00\r\nQUIX\n", b"\x00"]
)
def test_no_header_is_missing_from_the_first_byte_that_says_so(data: bytes) -> None:
    with pytest.raises(ProxyProtocolError) as raised:
        parse(data)
    assert raised.value.reason == "missing"


def test_v2_tcp4_with_tlvs() -> None:
    addresses = socket.inet_aton("192.0.2.7") + socket.inet_aton("198.51.100.1")
    payload = addresses + struct.pack("!HH", 56324, 443) + pp.tlv(pp.TLV_AUTHORITY, b"app.test")
    data = v2(1, 0x11, payload) + CLIENT_HELLO
    header = parse(data)
    assert header is not None
    assert (header.version, header.local) == (2, False)
    assert header.source == ("192.0.2.7", 56324)
    assert header.destination == ("198.51.100.1", 443)
    assert header.tlvs == ((pp.TLV_AUTHORITY, b"app.test"),)
    assert data[header.length :] == CLIENT_HELLO


def test_v2_tcp6() -> None:
    src = ipaddress.IPv6Address("2001:db8::7").packed
    dst = ipaddress.IPv6Address("::1").packed
    header = parse(v2(1, 0x21, src + dst + struct.pack("!HH", 1, 2)))
    assert header is not None
    assert header.source == ("2001:db8::7", 1)
    assert header.destination == ("::1", 2)


def test_v2_local_ignores_its_addresses() -> None:
    header = parse(v2(0, 0x11, b"\x01" * 12))
    assert header is not None
    assert header.local
    assert header.source is None


@pytest.mark.parametrize("family", [0x00, 0x31, 0x01])  # UNSPEC, unix stream, UNSPEC stream
def test_v2_unspec_and_unix_leave_the_connection_address(family: int) -> None:
    size = {0x00: 0, 0x01: 0, 0x31: 216}[family]
    header = parse(v2(1, family, b"/tmp/x".ljust(size, b"\x00")[:size]))
    assert header is not None
    assert header.source is None
    assert not header.local


def test_v2_needs_more_until_whole() -> None:
    data = v2(1, 0x11, b"\x01" * 12)
    for cut in range(len(data)):
        assert parse(data[:cut]) is None, cut


@pytest.mark.parametrize(
    "data",
    [
        pp.V2_SIGNATURE + bytes([0x11, 0x11, 0, 12]) + b"\x00" * 12,  # version 1
        pp.V2_SIGNATURE + bytes([0x22, 0x11, 0, 12]) + b"\x00" * 12,  # command 2
        v2(1, 0x11, b"\x00" * 11),  # addresses cut short
        v2(1, 0x21, b"\x00" * 12),  # IPv6 needs 36
        v2(1, 0x12, b"\x00" * 12),  # datagram
        v2(1, 0x41, b"\x00" * 12),  # family 4
        v2(1, 0x11, b"\x00" * 12 + b"\x01\x00"),  # TLV cut short
        v2(1, 0x11, b"\x00" * 12 + b"\x01\x00\x05ab"),  # TLV longer than the header
        pp.V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", pp.V2_MAX_PAYLOAD + 1),
    ],
)
def test_v2_malformed(data: bytes) -> None:
    with pytest.raises(ProxyProtocolError) as raised:
        parse(data)
    assert raised.value.reason == "malformed"


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_are_refused_cleanly(data: bytes) -> None:
    try:
        header = parse(data)
    except ProxyProtocolError as e:
        assert e.reason in ("missing", "malformed")
        return
    if header is not None:
        assert 0 < header.length <= len(data)
    else:  # more is needed: only ever a prefix of a header within the bounds
        assert len(data) < 16 + pp.V2_MAX_PAYLOAD


@given(st.binary(max_size=80), st.integers(0, 0xFF), st.integers(0, 0xFF))
def test_any_v2_payload_parses_or_is_refused_cleanly(
    payload: bytes, version_command: int, family: int
) -> None:
    data = pp.V2_SIGNATURE + struct.pack("!BBH", version_command, family, len(payload)) + payload
    try:
        header = parse(data)
    except ProxyProtocolError as e:
        assert e.reason == "malformed"
        return
    assert header is not None
    assert header.length == len(data)


@given(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=4).map(str),
    st.integers(0, 65535),
    st.integers(0, 65535),
)
def test_what_we_build_we_parse_v1_and_v2(src: str, dst: str, sport: int, dport: int) -> None:
    for built in (
        pp.build_v1((src, sport), (dst, dport)),
        pp.build_v2((src, sport), (dst, dport), [(pp.TLV_ALPN, b"h2")]),
    ):
        header = parse(built)
        assert header is not None
        assert header.source == (src, sport)
        assert header.destination == (dst, dport)
        assert header.length == len(built)


@given(st.ip_addresses(v=6).map(str), st.integers(0, 65535))
def test_what_we_build_we_parse_ipv6(src: str, port: int) -> None:
    header = parse(pp.build_v2((src, port), ("::1", 8443)))
    assert header is not None
    assert header.source == (str(ipaddress.IPv6Address(src)), port)


def test_trusted_networks_and_ipv4_mapped() -> None:
    allowed = pp.networks(["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"])
    assert pp.trusted("10.1.2.3", allowed)
    assert pp.trusted("::ffff:10.1.2.3", allowed)
    assert pp.trusted("192.0.2.7", allowed)
    assert pp.trusted("2001:db8::1", allowed)
    assert not pp.trusted("127.0.0.1", allowed)
    assert not pp.trusted("192.0.2.8", allowed)
    assert not pp.trusted("-", allowed)


def test_a_bad_cidr_names_itself() -> None:
    with pytest.raises(ValueError, match=r"--proxy-protocol-from '10\.0\.0\.0/33'"):
        pp.networks(["10.0.0.0/33"])


def test_a_health_check_says_local_or_unknown() -> None:
    v2_local = parse(pp.build_local("v2"))
    assert v2_local is not None
    assert v2_local.local
    v1_unknown = parse(pp.build_local("v1"))
    assert v1_unknown is not None
    assert v1_unknown.source is None
    assert pp.build_local(None) == b""
