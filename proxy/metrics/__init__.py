"""Every metric the sidecar exports, defined once, with help text and units."""

from __future__ import annotations

import platform
import ssl
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from proxy import __version__
from proxy.metrics.counts import DataCounts, Observed, RequestKey
from proxy.metrics.exposition import render
from proxy.metrics.labels import (
    CLIENT_AUTH_DENIED_REASONS,
    CONNECTION_REJECT_REASONS,
    HANDSHAKE_BUCKETS,
    HANDSHAKE_ERROR_REASONS,
    HTTP2_CONNECTION_ERROR_REASONS,
    HTTP2_STREAM_RESET_REASONS,
    LATENCY_BUCKETS,
    METHODS,
    PREFIX,
    PROTOCOLS,
    RELOAD_RESULTS,
    TIMEOUT_PHASES,
    UPSTREAM_CONNECT_ERROR_REASONS,
    UPSTREAM_UP_HELP,
)
from proxy.metrics.tallies import Tally

__all__ = [
    "PREFIX",
    "PROTOCOLS",
    "UPSTREAM_UP_HELP",
    "Metrics",
]

# No `_created` series next to every counter and histogram: half the series, nothing lost
# (Prometheus does not use them for rate()).
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    """The sidecar's metrics on their own registry (one per server, so tests can run several).

    The data path adds to plain numbers (`counts`, a `DataCounts`: `counts.down_in += n`,
    `counts.request_done`); `flush()` moves them into the exported metrics: on every scrape,
    and every second in a worker process. Gauges of live state (requests in flight,
    connections, the upstream pool) are read by the flush hooks.

    With --workers N each worker writes them to prometheus-client's multiprocess files and the
    supervisor sums them; every gauge says how (livesum: the live workers' values added up)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        p = PREFIX
        self.build_info = Gauge(
            f"{p}_build_info",
            "Always 1; labels say which version runs on which Python and OpenSSL, and the "
            "HTTP/2 codec serving clients (nghttp2, h2, or off with --no-http2), and whether the "
            "compiled core runs (true) or its modules run as plain Python (false).",
            ["version", "python", "openssl", "http2_codec", "compiled"],
            registry=r,
            multiprocess_mode="max",
        )

        self.connections_accepted = Counter(
            f"{p}_connections_accepted",
            "Downstream TCP connections accepted on the TLS port.",
            registry=r,
        )
        self.connections_active = Gauge(
            f"{p}_connections_active",
            "Downstream connections open now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        # By worker index, not pid: a restarted worker takes over its predecessor's series
        # instead of adding one per restart.
        self.worker_connections_active = Gauge(
            f"{p}_worker_connections_active",
            "Downstream connections open now, by worker (0..N-1 with --workers N; a single "
            "process is worker 0), for per-worker views.",
            ["worker"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.connections_rejected = Counter(
            f"{p}_connections_rejected",
            "Downstream connections closed at once, by reason (max_connections, draining, "
            "no_file_descriptors; with --accept-proxy-protocol: proxy_protocol_untrusted, "
            "_missing, _malformed, _timeout).",
            ["reason"],
            registry=r,
        )
        self.tls_handshakes = Counter(
            f"{p}_tls_handshakes",
            "Completed TLS handshakes by protocol version and whether the session was resumed.",
            ["version", "resumed"],
            registry=r,
        )
        self.tls_handshake_errors = Counter(
            f"{p}_tls_handshake_errors",
            "Failed TLS handshakes by reason (timeout, protocol, client_certificate, closed; "
            "plain_http: a plain HTTP request on the TLS port, answered 400; with --client-crl: "
            "client_certificate_revoked, client_crl_expired, client_crl_missing).",
            ["reason"],
            registry=r,
        )
        self.tls_handshake_duration = Histogram(
            f"{p}_tls_handshake_duration_seconds",
            "Time from accepting a connection to a completed TLS handshake.",
            buckets=HANDSHAKE_BUCKETS,
            registry=r,
        )
        self.http_requests = Counter(
            f"{p}_http_requests",
            "Requests answered, by method (GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE, "
            "CONNECT, else OTHER), status code and protocol (http/1.1, http/1.0, h2).",
            ["method", "code", "protocol"],
            registry=r,
        )
        self.http_request_duration = Histogram(
            f"{p}_http_request_duration_seconds",
            "Time from a complete request head to the last byte of the response, by status class.",
            ["code_class"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.http_requests_in_flight = Gauge(
            f"{p}_http_requests_in_flight",
            "Requests being proxied now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.upstream_response_duration = Histogram(
            f"{p}_upstream_response_duration_seconds",
            "Time from sending a request upstream to receiving the response head.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_connections_active = Gauge(
            f"{p}_upstream_connections_active",
            "Upstream connections open now: busy with a request, or idle in the pool.",
            ["state"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.upstream_connect_errors = Counter(
            f"{p}_upstream_connect_errors",
            "Failed attempts to connect to the upstream, by reason (refused, timeout, error).",
            ["reason"],
            registry=r,
        )
        self.grpc_responses = Counter(
            f"{p}_grpc_responses",
            "gRPC requests answered, by grpc-status (the app's, or the proxy's own).",
            ["grpc_status"],
            registry=r,
        )
        self.http2_connection_errors = Counter(
            f"{p}_http2_connection_errors",
            "HTTP/2 connections ended with GOAWAY for an error, by reason (protocol_error, "
            "rapid_reset, control_flood, header_block, header_list, stream_reused, internal_error; "
            "upstream_protocol_error, upstream_internal_error: a connection to an h2c app).",
            ["reason"],
            registry=r,
        )
        self.http2_stream_resets = Counter(
            f"{p}_http2_stream_resets",
            "HTTP/2 streams the proxy reset before they had an answer, by reason (malformed: a "
            "head HTTP/1.1 cannot carry, or a body its Content-Length contradicts, reset "
            "PROTOCOL_ERROR; refused_stream: past --max-concurrent-streams or after GOAWAY, "
            "REFUSED_STREAM). Not answers: local_responses_total does not count them.",
            ["reason"],
            registry=r,
        )
        self.local_responses = Counter(
            f"{p}_local_responses",
            "Responses the proxy made itself instead of the app, by code and reason.",
            ["code", "reason"],
            registry=r,
        )
        self.transferred_bytes = Counter(
            f"{p}_transferred_bytes",
            "Bytes relayed, by side (downstream = client, upstream = app) and direction.",
            ["side", "direction"],
            registry=r,
        )
        self.timeouts = Counter(
            f"{p}_timeouts",
            "Timeouts by phase (handshake, header, idle, request_body, upstream, tunnel; send: the "
            "client did not read the response, its socket or HTTP/2 flow-control window full; "
            "proxy_protocol: no whole PROXY header within the handshake timeout).",
            ["phase"],
            registry=r,
        )
        self.certificate_expiry = Gauge(
            f"{p}_certificate_expiry_timestamp_seconds",
            "Unix time at which the served certificate expires, by cert (default, or the file or "
            "folder name); days left: (this - time()) / 86400.",
            ["cert"],
            registry=r,
            multiprocess_mode="livemin",  # the live workers' only: a dead one's files go
        )
        self.client_crl_next_update = Gauge(
            f"{p}_client_crl_next_update_timestamp_seconds",
            "Unix time of the next update each --client-crl promises, by crl (its file name); "
            "past it, OpenSSL refuses that CA's clients until a fresh CRL is loaded.",
            ["crl"],
            registry=r,
            multiprocess_mode="min",
        )
        self.client_cert_revalidation_closed = Counter(
            f"{p}_client_cert_revalidation_closed",
            "Open connections closed by --client-cert-revalidate, by reason (expired, revoked, "
            "ca_removed): their client certificate is no longer valid.",
            ["reason"],
            registry=r,
        )
        self.certificate_reloads = Counter(
            f"{p}_certificate_reloads",
            "Certificate reload attempts by result (success, failure).",
            ["result"],
            registry=r,
        )
        self.certificate_last_reload_success = Gauge(
            f"{p}_certificate_last_reload_success_timestamp_seconds",
            "Unix time of the last successful certificate load (start-up counts); "
            "seconds since: time() - this.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.client_auth_denied = Counter(
            f"{p}_client_auth_denied",
            "Requests refused with 403 because of the client certificate, by reason "
            "(no_certificate, not_allowed).",
            ["reason"],
            registry=r,
        )
        self.ready = Gauge(
            f"{p}_ready", "1 when /readyz answers 200, else 0.", registry=r, multiprocess_mode="min"
        )
        self.draining = Gauge(
            f"{p}_draining", "1 while shutting down, else 0.", registry=r, multiprocess_mode="max"
        )
        self.upstream_up = Gauge(
            f"{p}_upstream_up",
            UPSTREAM_UP_HELP,
            registry=r,
            multiprocess_mode="min",
        )
        # Every series whose labels are known up front exists from start-up at 0: increase()
        # and rate() then see the first event (a series born at 1 has no before), and
        # dashboards show 0, not "No data".
        for counter, label_values in (
            (self.connections_rejected, CONNECTION_REJECT_REASONS),
            (self.tls_handshake_errors, HANDSHAKE_ERROR_REASONS),
            (self.upstream_connect_errors, UPSTREAM_CONNECT_ERROR_REASONS),
            (self.http2_connection_errors, HTTP2_CONNECTION_ERROR_REASONS),
            (self.http2_stream_resets, HTTP2_STREAM_RESET_REASONS),
            (self.timeouts, TIMEOUT_PHASES),
            (self.certificate_reloads, RELOAD_RESULTS),
            (self.client_auth_denied, CLIENT_AUTH_DENIED_REASONS),
        ):
            for value in label_values:
                counter.labels(value)
        self.upstream_idle = self.upstream_connections_active.labels("idle")
        self.upstream_busy = self.upstream_connections_active.labels("busy")
        # The data path's accumulators (see flush); the error and abuse paths' too.
        self.local = Tally(self.local_responses)  # .add(code, reason)
        self.resets = Tally(self.http2_stream_resets)  # .add(reason)
        self.denied = Tally(self.client_auth_denied)  # .add(reason)
        self.timed_out = Tally(self.timeouts)  # .add(phase)
        self.h2_errors = Tally(self.http2_connection_errors)  # .add(reason)
        self.rejected = Tally(self.connections_rejected)  # .add(reason)
        self.handshake_failed = Tally(self.tls_handshake_errors)  # .add(reason)
        self._tallies = (
            self.local,
            self.resets,
            self.denied,
            self.timed_out,
            self.h2_errors,
            self.rejected,
            self.handshake_failed,
        )
        self._buckets = (*LATENCY_BUCKETS, float("inf"))
        self.counts = DataCounts(self._buckets, self._request_entry)
        self._bytes_children = [
            self.transferred_bytes.labels("downstream", "in"),
            self.transferred_bytes.labels("downstream", "out"),
            self.transferred_bytes.labels("upstream", "in"),
            self.transferred_bytes.labels("upstream", "out"),
        ]
        self._requests: dict[RequestKey, tuple[Counter, Histogram, Observed]] = {}
        self._grpc: dict[bytes, Counter] = {}
        self._hooks: list[Callable[[], None]] = []

    def built(self, http2_codec: str, compiled: bool) -> None:
        """The build_info sample, once the server chose its codecs."""
        self.build_info.labels(
            __version__,
            platform.python_version(),
            ssl.OPENSSL_VERSION,
            http2_codec,
            "true" if compiled else "false",
        ).set(1)

    def _request_entry(self, key: RequestKey) -> Observed:
        """The accumulator of a method, code and protocol seen for the first time (counts'
        `new_entry`), with the exported series it flushes into."""
        method, code, version = key
        name = method.decode("ascii", "replace")
        label = name if name in METHODS else "OTHER"
        if label == "OTHER":
            method = b"OTHER"  # one entry for every unknown method: a client cannot grow this
        key = (method, code, version)
        entry = self._requests.get(key)
        if entry is None:
            entry = (
                self.http_requests.labels(label, str(code), PROTOCOLS.get(version, "other")),
                self.http_request_duration.labels(f"{code // 100}xx"),
                Observed(len(self._buckets)),
            )
            self._requests[key] = entry
            self.counts.requests[key] = entry[2]
        return entry[2]

    def grpc_done(self, status: bytes) -> None:
        child = self._grpc.get(status)
        if child is None:
            code = status.decode("latin-1")
            child = self.grpc_responses.labels(code if code.isdigit() and len(code) < 3 else "?")
            if len(self._grpc) < 64:
                self._grpc[status] = child
        child.inc()

    def on_flush(self, hook: Callable[[], None]) -> None:
        """Run `hook` at every flush: it sets gauges from live state."""
        self._hooks.append(hook)

    def flush(self) -> None:
        """Move what the data path counted into the exported metrics."""
        data = self.counts
        counts = (data.down_in, data.down_out, data.up_in, data.up_out)
        data.down_in = data.down_out = data.up_in = data.up_out = 0
        for child, count in zip(self._bytes_children, counts, strict=True):
            if count:
                child.inc(count)
        for counter, histogram, observed in self._requests.values():
            if observed.count:
                counter.inc(observed.count)
                observed.flush_into(histogram)
        if data.upstream.count:
            data.upstream.flush_into(self.upstream_response_duration)
        for tally in self._tallies:
            tally.flush()
        self.http_requests_in_flight.set(data.in_flight)
        for hook in self._hooks:
            hook()

    def exposition(self, accept: bytes = b"") -> tuple[bytes, bytes]:
        self.flush()
        return render(self.registry, accept)
