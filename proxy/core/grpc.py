"""gRPC's view of the proxy's own answers: status codes and trailers-only responses (pure);
which status each of the proxy's errors gets is `errors.KINDS`.

A gRPC client reads the outcome from `grpc-status`, not from the HTTP status, so an error of the
proxy's own for a gRPC request is HTTP 200 with the status in a trailers-only response, as Envoy
does (https://github.com/grpc/grpc/blob/master/doc/http-grpc-status-mapping.md)."""

from __future__ import annotations

from proxy.core.headers import Headers

OK = 0
CANCELLED = 1
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16

STATUS_BYTES = {code: b"%d" % code for code in range(17)}


def _percent_encode(message: str) -> bytes:
    """grpc-message is percent-encoded UTF-8: bytes outside 0x20-0x7E, and '%' itself."""
    return b"".join(
        bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b
        for b in message.encode("utf-8")
    )


def status_trailers(code: int, message: str) -> Headers:
    """Trailers that end a response under way with the proxy's status (the app failed)."""
    return [
        (b"grpc-status", STATUS_BYTES.get(code) or b"%d" % code),
        (b"grpc-message", _percent_encode(message)),
    ]


def trailers_only(code: int, message: str, request_id: bytes | None) -> Headers:
    """The headers of a trailers-only response (HTTP 200, no body)."""
    out = [
        (b"content-type", b"application/grpc"),
        (b"grpc-status", STATUS_BYTES.get(code) or b"%d" % code),
        (b"grpc-message", _percent_encode(message)),
    ]
    if request_id is not None:
        out.append((b"x-request-id", request_id))
    return out
