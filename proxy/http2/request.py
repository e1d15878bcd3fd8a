"""An HTTP/2 request's header block as a `RequestHead`, checked for what HTTP/1.1 can carry:
the checks that run the same for every HTTP/2 codec, and for what the h2c side sends an app."""

from __future__ import annotations

import re
from typing import Final

from proxy.core.headers import CONNECTION_SPECIFIC, Headers, HeaderSeq
from proxy.core.request import BadRequest, RequestHead

_H2_PSEUDO: Final = frozenset({b":method", b":scheme", b":authority", b":path"})
# RFC 9113 §8.2.1: a field name has no upper case, no controls, no separators that are not
# token characters. A value has no NUL, CR or LF and no leading or trailing whitespace there;
# here it also has no other control character (RFC 9110 §5.5 field-value: HTAB, SP, VCHAR and
# obs-text), as an HTTP/1.1 request's fields have: the app gets what HTTP/1.1 can carry.
_H2_BAD_NAME: Final = re.compile(rb"[^a-z0-9!#$%&'*+\-.^_`|~]")
_H2_CONTROL: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # one class: the fastest search
_WHITESPACE: Final = (0x20, 0x09)
# What becomes the request line and Host of an HTTP/1.1 request: a method that is a token
# (RFC 9110 §9.1); a path in origin-form, `/` then printable ASCII without `#` (RFC 3986's path
# and query characters, and the few it excludes that HTTP/1.1 parsers and browsers pass on
# unencoded: `"<>\^`{|}`), never SP, HTAB, a control, DEL or a byte >= 0x80 (RFC 9112 §3.2);
# an authority host[:port] without userinfo (RFC 3986 §3.2: reg-name, IPv4 or [IP-literal]).
# The h2 library checks none of these: a space in `:path` would end the request line early.
_METHOD: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_ORIGIN_FORM: Final = re.compile(rb"/[\x21\x22\x24-\x7e]*")  # printable ASCII but `#`
_AUTHORITY: Final = re.compile(
    rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=%]+|\[[0-9A-Fa-f:.]+(?:%25[A-Za-z0-9\-._~%]+)?\]"
    rb"|\[v[0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+\])(?::[0-9]{1,5})?"
)
_SCHEME: Final = re.compile(rb"[A-Za-z][A-Za-z0-9+\-.]*")


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
    # One search over all the values and one over all the names (single-byte classes: joining
    # makes no match and hides none); only a head that has a bad byte is searched field by field,
    # to name the field. Two searches per head instead of two per field (read_h2_head was 9%
    # of S7's profile).
    values_clean = _H2_CONTROL.search(b"".join([value for _, value in fields])) is None
    names_clean = _H2_BAD_NAME.search(b"".join([n for n, _ in fields if n[:1] != b":"])) is None
    for name, value in fields:
        size += len(name) + len(value) + 4
        if (not values_clean and _H2_CONTROL.search(value) is not None) or (
            value and (value[0] in _WHITESPACE or value[-1] in _WHITESPACE)
        ):
            raise BadRequest("malformed", f"invalid value of {name!r}")
        if name[:1] == b":":
            if headers or cookies or host is not None:
                raise BadRequest("malformed", f"pseudo-header {name!r} after a field")
            if name not in _H2_PSEUDO or name in pseudo:
                raise BadRequest("malformed", f"unknown or repeated pseudo-header {name!r}")
            pseudo[name] = value
            continue
        if not name or (not names_clean and _H2_BAD_NAME.search(name) is not None):
            raise BadRequest("malformed", f"invalid field name {name!r}")
        if name in CONNECTION_SPECIFIC:
            raise BadRequest("malformed", f"connection-specific field {name.decode()!r}")
        if name == b"cookie":
            cookies.append(value)
            continue
        if name == b"host":
            if host is not None:
                raise BadRequest("malformed", "more than one Host")
            host = value
            continue
        if name == b"te":
            if value.lower() != b"trailers":
                raise BadRequest("malformed", "te other than trailers")
        elif name == b"content-length":
            if length is not None and value != length:
                raise BadRequest("malformed", "more than one Content-Length")
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
            raise BadRequest("method_not_allowed", "CONNECT is not supported")
        raise BadRequest("malformed", "a request needs :method, :scheme and :path")
    if not valid_request_line(method, path):
        raise BadRequest("malformed", "invalid :method or :path")
    if _SCHEME.fullmatch(pseudo[b":scheme"]) is None:
        raise BadRequest("malformed", "invalid :scheme")
    if authority is not None:
        if host is not None and host != authority:
            raise BadRequest("malformed", "Host and :authority differ")
        host = authority
    if host is not None:
        if not valid_authority(host):
            raise BadRequest("malformed", "invalid :authority or Host")
        headers.insert(0, (b"host", host))
    if cookies:
        headers.append((b"cookie", b"; ".join(cookies)))
    content_length: int | None = None
    if length is not None:
        if not length.isdigit() or len(length) > 18:
            raise BadRequest("malformed", "Content-Length is not a number")
        content_length = int(length)
        if ended and content_length:  # H2.CL: no DATA can follow (RFC 9113 §8.1.1)
            raise BadRequest("malformed", "Content-Length on a request without a body")
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
        if name[:1] == b":" or not valid_h2_field(name, value) or name in CONNECTION_SPECIFIC:
            raise BadRequest("malformed", f"invalid trailer field {name!r}")
        out.append((name, value))
    return out
