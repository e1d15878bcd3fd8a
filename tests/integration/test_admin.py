"""The admin port: liveness, readiness that follows the app, and Prometheus metrics."""

from __future__ import annotations

import http.client
import math
import urllib.request
from pathlib import Path

from tests.conftest import ProxyFactory
from tests.support.proxy import ProxyProcess, https, wait_for
from tests.support.upstream import UpstreamApp


def test_liveness_endpoints(proxy: ProxyProcess) -> None:
    assert proxy.admin_get("/healthz") == (200, "ok\n")
    assert proxy.admin_get("/livez") == (200, "ok\n")


def test_unknown_admin_path_is_404_and_never_proxied(
    proxy: ProxyProcess, upstream: UpstreamApp
) -> None:
    before = upstream.count()
    status, body = proxy.admin_get("/echo/through-admin")
    assert status == 404
    assert "/readyz" in body
    assert upstream.count() == before


def test_admin_refuses_other_methods(proxy: ProxyProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.admin_port, timeout=10)
    conn.request("POST", "/readyz", body=b"x")
    assert conn.getresponse().status == 405
    conn.close()


def test_admin_keeps_connections_alive_for_scrapers(proxy: ProxyProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.admin_port, timeout=10)
    for path in ("/metrics", "/healthz", "/metrics"):
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200
        response.read()
    conn.close()


def test_readiness_follows_the_upstream(start_proxy: ProxyFactory) -> None:
    app = UpstreamApp().start()
    try:
        proxy = start_proxy(app.base)
        assert proxy.admin_get("/readyz") == (200, "ready\n")
        app.stop_listening()
        _status, body = wait_for(
            lambda: (r := proxy.admin_get("/readyz"))[0] == 503 and r,
            what="/readyz to say 503 while the app is down",
        )
        assert "not ready" in body and str(app.port) in body
        assert proxy.metric("tls_sidecar_upstream_up") == 0
        app.listen_again()
        wait_for(lambda: proxy.admin_get("/readyz")[0] == 200, what="/readyz back to 200")
        assert proxy.metric("tls_sidecar_ready") == 1
    finally:
        app.stop()


def test_counters_with_known_labels_are_exported_at_zero_from_start_up(
    start_proxy: ProxyFactory, upstream: UpstreamApp
) -> None:
    # A series born at 1 has no before: increase() over it is 0 and the first failed reload
    # would never fire TLSSidecarCertificateReloadFailing; dashboards would show "No data".
    proxy = start_proxy(upstream.base)
    for name, labels in (
        ("tls_sidecar_certificate_reloads_total", 'result="failure"'),
        ("tls_sidecar_certificate_reloads_total", 'result="success"'),
        ("tls_sidecar_tls_handshake_errors_total", 'reason="protocol"'),
        ("tls_sidecar_tls_handshake_errors_total", 'reason="client_certificate"'),
        ("tls_sidecar_connections_rejected_total", 'reason="max_connections"'),
        ("tls_sidecar_upstream_connect_errors_total", 'reason="refused"'),
        ("tls_sidecar_http2_connection_errors_total", 'reason="rapid_reset"'),
        ("tls_sidecar_timeouts_total", 'phase="upstream"'),
        ("tls_sidecar_client_auth_denied_total", 'reason="not_allowed"'),
        ("tls_sidecar_tls_handshakes_total", 'version="TLSv1.3",resumed="false"'),
        ("tls_sidecar_tls_handshakes_total", 'version="TLSv1.3",resumed="true"'),
        ("tls_sidecar_tls_handshakes_total", 'version="TLSv1.2",resumed="false"'),
        ("tls_sidecar_tls_handshakes_total", 'version="TLSv1.2",resumed="true"'),
    ):
        assert proxy.metric(name, labels) == 0, (name, labels)
    # only the versions the listener takes
    strict = start_proxy(upstream.base, "--tls-min-version", "1.3")
    assert strict.metric("tls_sidecar_tls_handshakes_total", 'version="TLSv1.3"') == 0
    assert math.isnan(strict.metric("tls_sidecar_tls_handshakes_total", 'version="TLSv1.2"'))


def test_metrics_count_what_happened(proxy: ProxyProcess, ca: Path) -> None:
    before = proxy.metric("tls_sidecar_http_requests_total", 'method="GET",code="200"')
    before = 0.0 if math.isnan(before) else before  # NaN: no such sample yet
    for _ in range(3):
        assert https(proxy, ca, path="/echo/metrics")[0] == 200
    assert https(proxy, ca, method="DELETE", path="/status/404")[0] == 404
    status, text = proxy.admin_get("/metrics")
    assert status == 200
    for name in (
        "tls_sidecar_build_info{",
        "tls_sidecar_connections_accepted_total ",
        "tls_sidecar_connections_active ",
        "tls_sidecar_http_request_duration_seconds_bucket{",
        "tls_sidecar_tls_handshake_duration_seconds_bucket{",
        "tls_sidecar_upstream_response_duration_seconds_bucket{",
        'tls_sidecar_upstream_connections_active{state="idle"}',
        'tls_sidecar_transferred_bytes_total{direction="in",side="downstream"}',
        "tls_sidecar_ready ",
        "process_resident_memory_bytes ",
    ):
        assert name in text, name
    after = proxy.metric("tls_sidecar_http_requests_total", 'method="GET",code="200"')
    assert after - before >= 3
    assert proxy.metric("tls_sidecar_http_requests_total", 'method="DELETE",code="404"') == 1
    assert proxy.metric("tls_sidecar_tls_handshakes_total", 'version="TLSv1.3"') >= 4
    assert proxy.metric("tls_sidecar_transferred_bytes_total", 'side="upstream",direction="in"') > 0


def test_unknown_methods_share_one_label(proxy: ProxyProcess, ca: Path) -> None:
    for method in ("BREW", "FROB", "ZAP"):
        assert https(proxy, ca, method=method, path="/echo/m")[0] == 200
    assert proxy.metric("tls_sidecar_http_requests_total", 'method="OTHER"') >= 3
    _, text = proxy.admin_get("/metrics")
    assert 'method="BREW"' not in text


def test_metrics_without_created_series_and_in_openmetrics_when_asked(proxy: ProxyProcess) -> None:
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{proxy.admin_port}/metrics", timeout=10)
        .read()
        .decode()
    )
    assert (
        "tls_sidecar_http_requests_total" in text
        or "tls_sidecar_connections_accepted_total" in text
    )
    assert "_created" not in text
    request = urllib.request.Request(
        f"http://127.0.0.1:{proxy.admin_port}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["content-type"].startswith("application/openmetrics-text")
        body = response.read().decode()
    assert body.rstrip().endswith("# EOF")
    assert "# TYPE tls_sidecar_connections_accepted counter" in body


def test_readiness_follows_the_apps_health_endpoint(
    start_proxy: ProxyFactory, upstream: UpstreamApp
) -> None:
    """--upstream-health-path: ready only while the app answers 2xx/3xx there; the checks are
    not requests in the metrics."""
    failing = start_proxy(upstream.base, "--upstream-health-path", "/status/503")
    status, body = failing.admin_get("/readyz")
    assert status == 503
    assert "health check GET /status/503: 503 Service Unavailable" in body
    # The app accepts connections: upstream_up (the runbook's "no TCP connection") stays 1,
    # ready says the health path failed.
    assert failing.metric("tls_sidecar_upstream_up") == 1
    assert failing.metric("tls_sidecar_ready") == 0
    healthy = start_proxy(upstream.base, "--upstream-health-path", "/status/204")
    assert healthy.admin_get("/readyz") == (200, "ready\n")
    assert math.isnan(failing.metric("tls_sidecar_http_requests_total"))  # no request counted
