"""A request head as every codec hands it over, its framing checks, and what the app gets (pure).

Both HTTP/1.1 codecs (httptools and h11) call `read_head` on what their parser accepted, so the
checks a lenient parser would skip run once, for both; `upstream_request` then decides what to
send the app, or which answer the proxy gives itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.core import headers as hdr
from proxy.core.headers import ClientInfo, Headers, HeaderSeq

# Upgrade protocols that are never tunnelled over TLS, whatever --upgrade says: h2c skips every
# per-request rule once the app switches (the "h2c smuggling" technique).
NEVER_UPGRADED = frozenset({b"h2c"})


_VERSIONS = frozenset({b"1.1", b"1.0", b"2"})
# The headers read_head looks at; every other one costs one set lookup.
_FRAMING = frozenset(
    {b"content-length", b"transfer-encoding", b"host", b"connection", b"upgrade", b"expect", b"te"}
)


class BadRequest(Exception):
    """The request cannot be trusted or served; `status` and `reason` say how it is answered."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


@dataclass(slots=True)
class RequestHead:
    """What a downstream codec parsed, already checked for framing by `read_head`."""

    method: bytes
    target: bytes
    version: bytes  # b"1.1", b"1.0"; b"2" for HTTP/2 streams
    headers: Headers  # lower-case names, in the client's order
    content_length: int | None
    chunked: bool
    keep_alive: bool  # the client did not ask to close after this request
    upgrade: bytes | None  # the Upgrade header when Connection names it (HTTP/1.1 only)
    request_id: bytes | None = None  # the client's X-Request-Id, unchecked
    connection: bool = False  # a Connection header is present (it may name more to drop)
    size: int = 0  # bytes of the head as received (method, target, headers)
    has_body: bool = False  # chunked, or a Content-Length above 0
    expect_continue: bool = False  # `Expect: 100-continue`: the client waits before its body
    grpc: bool = False  # content-type application/grpc*: the proxy's own errors speak gRPC
    trailers: bool = False  # `TE: trailers` (HTTP/1.1): a chunked answer may carry trailers


def read_head(
    method: bytes, target: bytes, version: bytes, headers: Headers, size: int = -1
) -> RequestHead:
    """One pass over the headers: framing, Host and keep-alive, the same for every codec.

    Refuses what parsers disagree on or let through (RFC 9112 §6.3): Content-Length together
    with Transfer-Encoding, repeated or non-numeric Content-Length, a transfer coding other than
    chunked, a missing or repeated Host on HTTP/1.1, and a chunked upgrade request (llhttp would
    take its body for the new protocol's bytes)."""
    if version not in _VERSIONS:
        raise BadRequest(505, "version_not_supported", "only HTTP/1.0, HTTP/1.1 and HTTP/2")
    length: bytes | None = None
    te: bytes | None = None
    hosts = 0
    close = version == b"1.0"
    upgrade: bytes | None = None
    connection_upgrade = False
    connection = False
    expect_continue = False
    trailers = False
    request_id: bytes | None = None
    for name, value in headers:
        if name not in _FRAMING:
            if name == b"x-request-id" and request_id is None:
                request_id = value
            continue
        if name == b"content-length":
            if length is not None:
                raise BadRequest(400, "bad_request", "more than one Content-Length")
            length = value
        elif name == b"transfer-encoding":
            if te is not None:
                raise BadRequest(400, "bad_request", "more than one Transfer-Encoding")
            te = value
        elif name == b"host":
            hosts += 1
        elif name == b"connection":
            connection = True
            for raw in value.lower().split(b","):
                token = raw.strip()
                # An HTTP/1.0 connection closes after its answer even with `keep-alive`: h11
                # cannot keep one open, and both codecs must frame alike (docs/DESIGN.md).
                if token == b"close":
                    close = True
                elif token == b"upgrade":
                    connection_upgrade = True
        elif name == b"upgrade":
            upgrade = value
        elif name == b"expect":
            expect_continue = value.strip().lower() == b"100-continue"
        elif name == b"te":
            trailers = trailers or b"trailers" in (t.strip() for t in value.lower().split(b","))
    if te is not None:
        if version == b"1.0":
            # RFC 9112 §6.1: HTTP/1.0 has no transfer codings; such a request's framing is
            # faulty (a smuggling vector between an HTTP/1.0-minded parser and ours). nginx: 400.
            raise BadRequest(400, "bad_request", "Transfer-Encoding in an HTTP/1.0 request")
        if te.strip().lower() != b"chunked":
            raise BadRequest(400, "bad_request", "the only transfer coding accepted is chunked")
        if length is not None:
            raise BadRequest(400, "bad_request", "both Content-Length and Transfer-Encoding")
    content_length: int | None = None
    if length is not None:
        if not length.isdigit() or len(length) > 18:
            raise BadRequest(400, "bad_request", "Content-Length is not a number")
        content_length = int(length)
    if hosts > 1 or (hosts == 0 and version == b"1.1"):
        raise BadRequest(400, "bad_request", "HTTP/1.1 needs exactly one Host header")
    if not connection_upgrade or version == b"1.0":
        upgrade = None  # RFC 9110 §7.8: Upgrade is HTTP/1.1's; an HTTP/1.0 request's is ignored
    elif upgrade is not None and te is not None:
        raise BadRequest(400, "bad_request", "an upgrade request cannot have a chunked body")
    if size < 0:
        size = len(method) + len(target) + sum(len(n) + len(v) + 4 for n, v in headers)
    return RequestHead(
        method,
        target,
        version,
        headers,
        content_length,
        te is not None,
        not close,
        upgrade,
        request_id,
        connection,
        size,
        te is not None or bool(content_length),
        expect_continue and version == b"1.1",
        trailers=trailers and version == b"1.1",
    )


# RFC 9113 §8.2.2: connection-specific fields make an HTTP/2 request malformed.
_H2_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_H2_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})
# RFC 9113 §8.2.1: a field name has no upper case, no controls, no separators that are not
# token characters. A value has no NUL, CR or LF and no leading or trailing whitespace there;
# here it also has no other control character (RFC 9110 §5.5 field-value: HTAB, SP, VCHAR and
# obs-text), as an HTTP/1.1 request's fields have: the app gets what HTTP/1.1 can carry.
_H2_BAD_NAME = re.compile(rb"[^a-z0-9!#$%&'*+\-.^_`|~]")
_H2_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # one class: the fastest search
_WHITESPACE = (0x20, 0x09)
# What becomes the request line and Host of an HTTP/1.1 request: a method that is a token
# (RFC 9110 §9.1); a path in origin-form, `/` then printable ASCII without `#` (RFC 3986's path
# and query characters, and the few it excludes that HTTP/1.1 parsers and browsers pass on
# unencoded: `"<>\^`{|}`), never SP, HTAB, a control, DEL or a byte >= 0x80 (RFC 9112 §3.2);
# an authority host[:port] without userinfo (RFC 3986 §3.2: reg-name, IPv4 or [IP-literal]).
# The h2 library checks none of these: a space in `:path` would end the request line early.
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_ORIGIN_FORM = re.compile(rb"/[\x21\x22\x24-\x7e]*")  # printable ASCII but `#`
_AUTHORITY = re.compile(
    rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=%]+|\[[0-9A-Fa-f:.]+(?:%25[A-Za-z0-9\-._~%]+)?\]"
    rb"|\[v[0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+\])(?::[0-9]{1,5})?"
)
_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9+\-.]*")


def valid_authority(value: bytes) -> bool:
    """host[:port] without userinfo, as `:authority` and Host must be (RFC 3986 §3.2.2)."""
    return _AUTHORITY.fullmatch(value) is not None


def valid_h2_value(value: bytes) -> bool:
    """No control but HTAB, no leading or trailing whitespace (RFC 9113 §8.2.1, RFC 9110 §5.5)."""
    return _H2_CONTROL.search(value) is None and not (
        value and (value[0] in _WHITESPACE or value[-1] in _WHITESPACE)
    )


def valid_h2_field(name: bytes, value: bytes) -> bool:
    """A regular field HTTP/2 and HTTP/1.1 can both carry (RFC 9113 §8.2.1, RFC 9110 §5)."""
    return bool(name) and _H2_BAD_NAME.search(name) is None and valid_h2_value(value)


def valid_request_line(method: bytes, path: bytes) -> bool:
    """A method token and an origin-form path (`*` only for OPTIONS): what an HTTP/1.1 request
    line can carry, and what an HTTP/2 request's `:method` and `:path` must be."""
    if _METHOD.fullmatch(method) is None:
        return False
    if path == b"*":
        return method == b"OPTIONS"
    return _ORIGIN_FORM.fullmatch(path) is not None


def read_h2_head(fields: HeaderSeq, ended: bool) -> RequestHead:
    """An HTTP/2 request's header block as a `RequestHead`, checked per RFC 9113 §8.

    What makes a request malformed raises BadRequest (the stream is reset; the app never sees
    it): a missing, repeated, unknown or late pseudo-header, an invalid field name or value, a
    connection-specific field, `te` other than `trailers`, a Host that names another authority
    than `:authority`, a repeated or non-numeric Content-Length or one on a request that ended
    with its head, and whatever an HTTP/1.1 request line or Host could not carry (`valid_*`
    above). `:authority` becomes Host for an HTTP/1.1 app; cookie fields are joined (§8.2.3)."""
    pseudo: dict[bytes, bytes] = {}
    headers: Headers = []
    cookies: list[bytes] = []
    host: bytes | None = None
    length: bytes | None = None
    request_id: bytes | None = None
    grpc = False
    size = 0
    for name, value in fields:
        size += len(name) + len(value) + 4
        if _H2_CONTROL.search(value) is not None or (
            value and (value[0] in _WHITESPACE or value[-1] in _WHITESPACE)
        ):
            raise BadRequest(400, "malformed", f"invalid value of {name!r}")
        if name[:1] == b":":
            if headers or cookies or host is not None:
                raise BadRequest(400, "malformed", f"pseudo-header {name!r} after a field")
            if name not in _H2_PSEUDO or name in pseudo:
                raise BadRequest(400, "malformed", f"unknown or repeated pseudo-header {name!r}")
            pseudo[name] = value
            continue
        if _H2_BAD_NAME.search(name) is not None or not name:
            raise BadRequest(400, "malformed", f"invalid field name {name!r}")
        if name in _H2_CONNECTION_SPECIFIC:
            raise BadRequest(400, "malformed", f"connection-specific field {name.decode()!r}")
        if name == b"cookie":
            cookies.append(value)
            continue
        if name == b"host":
            if host is not None:
                raise BadRequest(400, "malformed", "more than one Host")
            host = value
            continue
        if name == b"te":
            if value.lower() != b"trailers":
                raise BadRequest(400, "malformed", "te other than trailers")
        elif name == b"content-length":
            if length is not None and value != length:
                raise BadRequest(400, "malformed", "more than one Content-Length")
            if length is not None:
                continue
            length = value
        elif name == b"content-type":
            grpc = value[:16] == b"application/grpc"
        elif name == b"x-request-id" and request_id is None:
            request_id = value
        headers.append((name, value))
    method = pseudo.get(b":method")
    path = pseudo.get(b":path")
    authority = pseudo.get(b":authority")
    if method is None or path is None or b":scheme" not in pseudo:
        if method == b"CONNECT":
            raise BadRequest(405, "method_not_allowed", "CONNECT is not supported")
        raise BadRequest(400, "malformed", "a request needs :method, :scheme and :path")
    if not valid_request_line(method, path):
        raise BadRequest(400, "malformed", "invalid :method or :path")
    if _SCHEME.fullmatch(pseudo[b":scheme"]) is None:
        raise BadRequest(400, "malformed", "invalid :scheme")
    if authority is not None:
        if host is not None and host != authority:
            raise BadRequest(400, "malformed", "Host and :authority differ")
        host = authority
    if host is not None:
        if not valid_authority(host):
            raise BadRequest(400, "malformed", "invalid :authority or Host")
        headers.insert(0, (b"host", host))
    if cookies:
        headers.append((b"cookie", b"; ".join(cookies)))
    content_length: int | None = None
    if length is not None:
        if not length.isdigit() or len(length) > 18:
            raise BadRequest(400, "malformed", "Content-Length is not a number")
        content_length = int(length)
        if ended and content_length:  # H2.CL: no DATA can follow (RFC 9113 §8.1.1)
            raise BadRequest(400, "malformed", "Content-Length on a request without a body")
    has_body = not ended and content_length != 0
    return RequestHead(
        method,
        path,
        b"2",
        headers,
        content_length,
        has_body and content_length is None,  # an HTTP/1.1 app gets such a body chunked
        True,
        None,
        request_id,
        False,
        size,
        has_body,
        False,
        grpc,
    )


def read_h2_trailers(fields: HeaderSeq) -> Headers:
    """An HTTP/2 request's trailers, checked as its head is: no pseudo-header, valid names and
    values, nothing connection-specific (RFC 9113 §8.1)."""
    out: Headers = []
    for name, value in fields:
        if name[:1] == b":" or not valid_h2_field(name, value) or name in _H2_CONNECTION_SPECIFIC:
            raise BadRequest(400, "malformed", f"invalid trailer field {name!r}")
        out.append((name, value))
    return out


def upgrade_protocol(value: bytes) -> bytes:
    """`websocket` from `WebSocket`, `h2c` from `h2c, foo/2`: the first protocol's name."""
    return value.split(b",", 1)[0].split(b"/", 1)[0].strip().lower()


def allowed_upgrade(head: RequestHead, allowed: frozenset[bytes]) -> bool:
    """Whether the head's Upgrade goes to the app (`--upgrade`); any other is stripped."""
    if head.upgrade is None:
        return False
    protocol = upgrade_protocol(head.upgrade)
    return protocol in allowed and protocol not in NEVER_UPGRADED


@dataclass(slots=True)
class UpstreamRequest:
    """What the app is sent: origin-form target and rewritten headers."""

    target: bytes
    headers: Headers
    upgrade: bool


def upstream_request(
    head: RequestHead,
    client: ClientInfo,
    *,
    trust_forwarded: bool,
    request_id: bytes,
    upstream_host: bytes,
    max_header_bytes: int,
    max_body_bytes: int | None,
    allowed_upgrades: frozenset[bytes],
    xfcc: bytes | None,
) -> UpstreamRequest | BadRequest:
    """The request for the app, or the answer the proxy gives itself instead (431, 405,
    400 for an unusable target, 413 for a declared body over the limit)."""
    names = head.headers
    target = head.target
    bad_target = ""
    if target[:1] != b"/":
        try:
            absolute = hdr.origin_form(target, names)
        except ValueError as e:
            absolute, target, bad_target = None, b"", str(e)
        if absolute is not None:
            target, names = absolute
        elif target == b"*" and head.method != b"OPTIONS":
            target, bad_target = b"", "asterisk-form is only for OPTIONS"
        elif target != b"*" and target:
            target, bad_target = b"", "authority-form is only for CONNECT"
    upgrade = head.upgrade is not None and allowed_upgrade(head, allowed_upgrades)
    out = hdr.forwarded_headers(
        names,
        client,
        trust_forwarded=trust_forwarded,
        request_id=request_id,
        upgrade=upgrade,
        connection=head.connection,
    )
    if head.expect_continue:
        # The proxy answers 100 Continue itself (see Exchange.start): the app is not asked.
        out = [(n, v) for n, v in out if n != b"expect"]
    if head.chunked:
        out.append((b"transfer-encoding", b"chunked"))
    if xfcc is not None:
        out.append((b"x-forwarded-client-cert", xfcc))
    if head.version == b"2":
        no_host = not names or names[0][0] != b"host"  # read_h2_head puts it first
    else:
        no_host = head.version == b"1.0" and not hdr.has_header(names, b"host")
    if no_host:
        out.insert(0, (b"host", upstream_host))
    # The parsers cap a head that arrives in pieces; one that arrived whole is measured here.
    if head.size + 12 > max_header_bytes:
        return BadRequest(431, "header_too_large", f"request head over {max_header_bytes} bytes")
    if head.method == b"CONNECT":
        return BadRequest(405, "method_not_allowed", "CONNECT is not supported")
    if not target:
        return BadRequest(400, "bad_request", f"bad request target: {bad_target}")
    if (
        max_body_bytes is not None
        and head.content_length is not None
        and head.content_length > max_body_bytes
    ):
        return BadRequest(413, "body_too_large", f"request body over {max_body_bytes} bytes")
    return UpstreamRequest(target, out, upgrade)
