"""The one error vocabulary (core.errors) and the accumulators the error paths count through."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

import proxy
from proxy.core import errors, grpc
from proxy.core.request import BadRequest
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


def _raise_site_reasons() -> list[tuple[str, object]]:
    """Every `BadRequest("<reason>", ...)` written in the package, with where it is."""
    sites: list[tuple[str, object]] = []
    for path in sorted(Path(proxy.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "BadRequest"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                sites.append((f"{path.name}:{node.lineno}", node.args[0].value))
    return sites


def test_every_refusal_names_a_kind_of_the_table_and_no_status_of_its_own() -> None:
    sites = _raise_site_reasons()
    assert len(sites) > 40  # the walk found the raise sites of both protocols
    for where, reason in sites:
        assert isinstance(reason, str), f"{where}: a status instead of a kind"
        assert reason in errors.KINDS, f"{where}: {reason!r} is not in errors.KINDS"


def test_a_refusal_is_answered_with_its_kinds_status() -> None:
    for reason in ("bad_request", "header_too_large", "method_not_allowed", "upstream_closed"):
        refusal = BadRequest(reason, "why")
        assert (refusal.status, refusal.reason, str(refusal)) == (
            errors.KINDS[reason].status,
            reason,
            "why",
        )
    with pytest.raises(KeyError):
        BadRequest("not_a_reason", "a typo fails where it is written")


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
