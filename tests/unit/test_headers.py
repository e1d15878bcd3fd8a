"""Header rewriting decisions (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.headers import (
    HOP_BY_HOP,
    ClientInfo,
    RequestIds,
    forwarded_headers,
    response_headers,
    valid_request_id,
)
from proxy.core.request import BadRequest, read_head
from proxy.identity import ClientIdentity, xfcc_value

CLIENT = ClientInfo("192.0.2.7", 8443)


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [n for n, _ in headers]


def forward(headers: list[tuple[bytes, bytes]], trust: bool = False) -> list[tuple[bytes, bytes]]:
    return forwarded_headers(headers, CLIENT, trust_forwarded=trust, request_id=b"rid")


def test_sets_forwarded_headers_and_keeps_host() -> None:
    out = dict(forward([(b"host", b"example.org"), (b"accept", b"*/*")]))
    assert out[b"host"] == b"example.org"
    assert out[b"x-forwarded-for"] == b"192.0.2.7"
    assert out[b"x-forwarded-proto"] == b"https"
    assert out[b"x-forwarded-host"] == b"example.org"
    assert out[b"x-forwarded-port"] == b"8443"
    assert out[b"x-request-id"] == b"rid"


def test_untrusted_client_values_are_replaced() -> None:
    spoofed = [
        (b"host", b"h"),
        (b"x-forwarded-for", b"1.1.1.1"),
        (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-host", b"evil"),
        (b"forwarded", b"for=1.1.1.1"),
        (b"x-forwarded-client-cert", b"By=spoof"),
    ]
    out = forward(spoofed)
    assert dict(out)[b"x-forwarded-for"] == b"192.0.2.7"
    assert dict(out)[b"x-forwarded-host"] == b"h"
    assert b"forwarded" not in names(out)
    assert b"x-forwarded-client-cert" not in names(out)
    assert names(out).count(b"x-forwarded-for") == 1


def test_trusted_client_values_are_kept_and_extended() -> None:
    out = dict(
        forward([(b"x-forwarded-for", b"1.1.1.1"), (b"x-forwarded-proto", b"http")], trust=True)
    )
    assert out[b"x-forwarded-for"] == b"1.1.1.1, 192.0.2.7"
    assert out[b"x-forwarded-proto"] == b"http"


def test_client_cert_header_is_stripped_even_when_trusted() -> None:
    assert b"x-forwarded-client-cert" not in names(
        forward([(b"x-forwarded-client-cert", b"x")], trust=True)
    )


def test_connection_named_headers_are_dropped_but_never_host() -> None:
    out = forward(
        [
            (b"connection", b"x-a, host, keep-alive"),
            (b"x-a", b"1"),
            (b"host", b"h"),
            (b"keep-alive", b"5"),
        ]
    )
    assert (
        b"x-a" not in names(out)
        and b"keep-alive" not in names(out)
        and b"connection" not in names(out)
    )
    assert dict(out)[b"host"] == b"h"


def test_allowed_upgrade_keeps_upgrade_and_says_connection_upgrade() -> None:
    request = [(b"connection", b"Upgrade"), (b"upgrade", b"websocket"), (b"host", b"h")]
    assert read_head(b"GET", b"/", b"1.1", request).upgrade == b"websocket"
    out = forwarded_headers(request, CLIENT, trust_forwarded=False, request_id=b"r", upgrade=True)
    assert (b"upgrade", b"websocket") in out and (b"connection", b"upgrade") in out
    # Upgrade without Connection naming it is no upgrade request
    assert (
        read_head(b"GET", b"/", b"1.1", [(b"upgrade", b"websocket"), (b"host", b"h")]).upgrade
        is None
    )


def test_an_upgrade_not_allowed_goes_with_its_connection_token() -> None:
    request = [(b"connection", b"Upgrade, HTTP2-Settings"), (b"upgrade", b"h2c"), (b"host", b"h")]
    out = forward([*request, (b"http2-settings", b"AAMAAABkAAQAoAAAAAIAAAAA")])
    assert names(out)[0] == b"host"
    assert not {b"upgrade", b"connection", b"http2-settings"} & set(names(out))


def test_request_id_passthrough_and_generation() -> None:
    ids = RequestIds()
    assert valid_request_id(b"abc-1")
    assert not valid_request_id(b"bad value\x01") and not valid_request_id(b"x" * 201)
    generated = ids()
    assert len(generated) == 32 and generated != ids()


def test_response_drops_hop_by_hop_and_conflicting_length() -> None:
    out = response_headers(
        [
            (b"connection", b"x-int"),
            (b"x-int", b"1"),
            (b"transfer-encoding", b"chunked"),
            (b"content-length", b"9"),
            (b"x-app", b"1"),
        ]
    )
    assert out == [(b"x-app", b"1")]
    switching = response_headers(
        [(b"upgrade", b"websocket"), (b"connection", b"upgrade")], switching_protocols=True
    )
    assert (b"upgrade", b"websocket") in switching and (b"connection", b"upgrade") in switching


header_name = st.sampled_from(
    [
        b"host",
        b"accept",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"forwarded",
        b"connection",
        b"keep-alive",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"x-custom",
        b"x-request-id",
        b"content-length",
        b"x-forwarded-client-cert",
    ]
)
header_value = st.binary(min_size=0, max_size=20).filter(
    lambda v: b"\r" not in v and b"\n" not in v
)


@given(st.lists(st.tuples(header_name, header_value), max_size=12), st.booleans())
def test_forwarded_headers_properties(headers: list[tuple[bytes, bytes]], trust: bool) -> None:
    out = forward(headers, trust=trust)
    for name in names(out):
        assert name not in HOP_BY_HOP
    assert names(out).count(b"x-forwarded-for") == 1
    assert names(out).count(b"x-request-id") == 1
    assert b"x-forwarded-client-cert" not in names(out)
    assert dict(out)[b"x-forwarded-for"].endswith(b"192.0.2.7")
    if not trust:
        assert dict(out)[b"x-forwarded-for"] == b"192.0.2.7"
        assert b"forwarded" not in names(out)
    # everything end-to-end that was not named in Connection survives, in order
    end_to_end = [(n, v) for n, v in headers if n in (b"accept", b"x-custom")]
    named = {t.strip().lower() for n, v in headers if n == b"connection" for t in v.split(b",")}
    assert [(n, v) for n, v in out if n in (b"accept", b"x-custom")] == [
        (n, v) for n, v in end_to_end if n not in named
    ]


def test_xfcc_escapes_control_characters_from_certificates() -> None:
    evil = ClientIdentity(
        subject='CN=a\r\nX-Injected: 1,O="q"',
        common_names=("a",),
        organizational_units=(),
        dns_sans=("d\nx",),
        uri_sans=("spiffe://t/\x00",),
        sha256="ab",
        pem="",
    )
    value = xfcc_value(evil, by=None, include_pem=False)
    assert b"\r" not in value and b"\n" not in value and b"\x00" not in value
    assert (
        value
        == b'Hash=ab;Subject="CN=a\\\\x0d\\\\x0aX-Injected: 1,O=\\"q\\"";URI=spiffe://t/\\x00;DNS=d\\x0ax'
    )


def test_an_http10_request_with_transfer_encoding_is_refused() -> None:
    """RFC 9112 §6.1: HTTP/1.0 has no transfer codings, so its framing is faulty; nginx: 400."""
    with pytest.raises(BadRequest) as refused:
        read_head(b"POST", b"/", b"1.0", [(b"transfer-encoding", b"chunked")])
    assert refused.value.status == 400
    assert read_head(b"POST", b"/", b"1.1", [(b"host", b"x"), (b"transfer-encoding", b"chunked")])


def test_an_http10_upgrade_is_ignored() -> None:
    """RFC 9110 §7.8: Upgrade is HTTP/1.1's; an HTTP/1.0 request never switches protocols."""
    fields = [(b"connection", b"upgrade"), (b"upgrade", b"websocket")]
    assert read_head(b"GET", b"/ws", b"1.0", fields).upgrade is None
    assert read_head(b"GET", b"/ws", b"1.1", [(b"host", b"x"), *fields]).upgrade == b"websocket"
