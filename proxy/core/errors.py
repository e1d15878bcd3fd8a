"""One vocabulary for the proxy's own errors, whichever protocol: each kind, named by the reason
that metrics and the access log carry, with the HTTP status a client gets, the gRPC status a
gRPC client reads instead (as Envoy maps them,
https://github.com/grpc/grpc/blob/master/doc/http-grpc-status-mapping.md), and the HTTP/2
error code a stream is reset with when it cannot be answered. HTTP/1.1, HTTP/2 and the gRPC
answers all read it here (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.core import grpc

# RFC 9113 §7's error codes (the core imports no HTTP/2 library)
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
REFUSED_STREAM = 0x7
CANCEL = 0x8


@dataclass(frozen=True, slots=True)
class ErrorKind:
    reason: str  # the metric label and the access log's `local`
    status: int  # the answer's HTTP status (0: never answered, the stream is reset)
    grpc: int  # the gRPC status of the answer to a gRPC request
    reset: int = INTERNAL_ERROR  # the HTTP/2 code when the stream is reset instead


KINDS: dict[str, ErrorKind] = {
    kind.reason: kind
    for kind in (
        # the request
        ErrorKind("bad_request", 400, grpc.INTERNAL, PROTOCOL_ERROR),
        # over HTTP/2, a head HTTP/1.1 cannot carry is malformed (RFC 9113 §8.1.1): a reset
        ErrorKind("malformed", 400, grpc.INTERNAL, PROTOCOL_ERROR),
        # past --max-concurrent-streams, or after our GOAWAY: retry elsewhere (§8.7)
        ErrorKind("refused_stream", 0, grpc.UNAVAILABLE, REFUSED_STREAM),
        ErrorKind("method_not_allowed", 405, grpc.UNIMPLEMENTED, PROTOCOL_ERROR),
        ErrorKind("header_timeout", 408, grpc.DEADLINE_EXCEEDED, CANCEL),
        ErrorKind("request_timeout", 408, grpc.DEADLINE_EXCEEDED, CANCEL),
        ErrorKind("body_too_large", 413, grpc.RESOURCE_EXHAUSTED),
        ErrorKind("header_too_large", 431, grpc.RESOURCE_EXHAUSTED),
        ErrorKind("version_not_supported", 505, grpc.UNKNOWN, PROTOCOL_ERROR),
        # the client certificate (--allow-*)
        ErrorKind("client_no_certificate", 403, grpc.PERMISSION_DENIED),
        ErrorKind("client_not_allowed", 403, grpc.PERMISSION_DENIED),
        # the app
        ErrorKind("upstream_refused", 502, grpc.UNAVAILABLE),
        ErrorKind("upstream_error", 502, grpc.UNAVAILABLE),
        ErrorKind("upstream_timeout", 504, grpc.DEADLINE_EXCEEDED),
        ErrorKind("upstream_closed", 502, grpc.UNAVAILABLE),
        ErrorKind("bad_response", 502, grpc.UNAVAILABLE),
        ErrorKind("internal_error", 502, grpc.UNAVAILABLE),
    )
}
_UNKNOWN_KIND = ErrorKind("", 0, grpc.UNKNOWN)


def kind(reason: str) -> ErrorKind:
    """The kind a reason names (one not in the table: gRPC's UNKNOWN, reset INTERNAL_ERROR)."""
    return KINDS.get(reason, _UNKNOWN_KIND)
