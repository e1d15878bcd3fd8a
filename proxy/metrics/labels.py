"""The metrics' closed label sets and histogram buckets: what a client can never grow."""

from __future__ import annotations

PREFIX = "tls_sidecar"
# The protocol label of a request, from the version its head carries.
PROTOCOLS = {b"1.1": "http/1.1", b"1.0": "http/1.0", b"2": "h2"}

# Closed set: anything else is counted as OTHER so a client cannot grow our label space.
METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}
)

# The closed label sets, created at 0 at start-up (see Metrics.__init__).
CONNECTION_REJECT_REASONS = ("max_connections", "draining")
HANDSHAKE_ERROR_REASONS = ("timeout", "protocol", "client_certificate", "closed", "plain_http")
UPSTREAM_CONNECT_ERROR_REASONS = ("refused", "timeout", "error")
HTTP2_CONNECTION_ERROR_REASONS = (
    "protocol_error",
    "rapid_reset",
    "control_flood",
    "header_block",
    "header_list",
    "stream_reused",
    "internal_error",
)
HTTP2_STREAM_RESET_REASONS = ("malformed", "refused_stream")
TIMEOUT_PHASES = ("handshake", "header", "idle", "request_body", "upstream", "tunnel", "send")
RELOAD_RESULTS = ("success", "failure")
CLIENT_AUTH_DENIED_REASONS = ("no_certificate", "not_allowed")

UPSTREAM_UP_HELP = (
    "1 when the app accepted the last readiness check's connection, else 0 (a failing "
    "--upstream-health-path leaves it 1 and makes ready 0)."
)

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
HANDSHAKE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
