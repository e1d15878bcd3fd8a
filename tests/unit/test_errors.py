"""The one error vocabulary (core.errors) and the accumulators the error paths count through."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from proxy.core import errors, grpc
from proxy.metrics.tallies import Tally

# What a gRPC client read for each HTTP status of the proxy's own answer before the table
# (grpc.status_for): the table must not change it.
GRPC_BY_STATUS = {
    400: grpc.INTERNAL,
    403: grpc.PERMISSION_DENIED,
    405: grpc.UNIMPLEMENTED,
    408: grpc.DEADLINE_EXCEEDED,
    413: grpc.RESOURCE_EXHAUSTED,
    431: grpc.RESOURCE_EXHAUSTED,
    502: grpc.UNAVAILABLE,
    504: grpc.DEADLINE_EXCEEDED,
    505: grpc.UNKNOWN,
}


def test_every_answered_kind_keeps_the_grpc_status_its_http_status_had() -> None:
    for kind in errors.KINDS.values():
        if kind.status:
            assert kind.grpc == GRPC_BY_STATUS[kind.status], kind


def test_a_malformed_or_refused_stream_is_reset_with_the_rfc_code() -> None:
    assert errors.kind("malformed").reset == errors.PROTOCOL_ERROR
    assert errors.kind("refused_stream").reset == errors.REFUSED_STREAM
    assert errors.kind("refused_stream").status == 0  # never answered


def test_an_unknown_reason_is_grpc_unknown_and_an_internal_error_reset() -> None:
    kind = errors.kind("not_a_reason")
    assert (kind.grpc, kind.reset) == (grpc.UNKNOWN, errors.INTERNAL_ERROR)


def test_a_tally_reaches_its_counter_at_flush_only() -> None:
    registry = CollectorRegistry()
    counter = Counter("x_resets", "resets", ["reason"], registry=registry)
    tally = Tally(counter)
    for _ in range(3):
        tally.add("malformed")
    tally.add("refused_stream")

    def value(reason: str) -> float | None:
        return registry.get_sample_value("x_resets_total", {"reason": reason})

    assert value("malformed") is None
    tally.flush()
    assert (value("malformed"), value("refused_stream")) == (3.0, 1.0)
    tally.add("malformed")
    tally.flush()
    tally.flush()  # nothing new: nothing added twice
    assert value("malformed") == 4.0
