"""Lifecycle of the real process: graceful drain on SIGTERM, second signal, SIGHUP reload."""

from __future__ import annotations

import http.client
import signal
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from proxy.tls import certs
from tests.conftest import ProxyFactory
from tests.support.proxy import DevCerts, ProxyProcess, client_context, serve_args, wait_for
from tests.support.upstream import UpstreamApp


@pytest.fixture
def app() -> Iterator[UpstreamApp]:
    application = UpstreamApp().start()
    yield application
    application.stop()


@pytest.fixture(scope="module")
def codec_env() -> dict[str, str]:
    """The lifecycle is the codecs' common part: the default codecs only."""
    return {}


def slow_requests(
    proxy: ProxyProcess, ca: Path, n: int, path: str
) -> tuple[list[threading.Thread], list[tuple[int, str | None] | Exception]]:
    results: list[tuple[int, str | None] | Exception] = []

    def one() -> None:
        try:
            conn = http.client.HTTPSConnection(
                "localhost", proxy.port, context=client_context(ca), timeout=30
            )
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            results.append((response.status, response.getheader("connection")))
            conn.close()
        except Exception as e:
            results.append(e)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for thread in threads:
        thread.start()
    return threads, results


def test_sigterm_lets_20_in_flight_requests_finish(
    dev_certs: DevCerts, app: UpstreamApp, start_proxy: ProxyFactory
) -> None:
    proxy = start_proxy(app.base, "--drain-timeout", "20s")
    threads, results = slow_requests(proxy, dev_certs.ca, 20, "/hold/drain")
    wait_for(lambda: app.count("/hold/") == 20, what="20 requests to reach the app")
    proxy.signal(signal.SIGTERM)
    wait_for(lambda: "draining" in proxy.stderr_text(), what="the draining log line")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
    app.open_gate("drain")  # the app answers only now, while the proxy drains
    for thread in threads:
        thread.join(30)
    assert results == [(200, "close")] * 20
    assert proxy.wait(30) == 0
    assert len([r for r in proxy.access_records() if r["path"] == "/hold/drain"]) == 20


def test_shutdown_delay_keeps_serving_while_readiness_is_503(
    dev_certs: DevCerts, app: UpstreamApp, start_proxy: ProxyFactory
) -> None:
    proxy = start_proxy(app.base, "--shutdown-delay", "3s")
    proxy.signal(signal.SIGTERM)
    wait_for(lambda: proxy.admin_get("/readyz")[0] == 503, what="readiness to turn 503")
    conn = http.client.HTTPSConnection(
        "localhost", proxy.port, context=client_context(dev_certs.ca), timeout=10
    )
    conn.request("GET", "/echo/during-delay")
    assert conn.getresponse().status == 200, "new requests are still served during the delay"
    conn.close()
    assert proxy.wait(30) == 0


def test_second_signal_exits_at_once(
    dev_certs: DevCerts, app: UpstreamApp, start_proxy: ProxyFactory
) -> None:
    proxy = start_proxy(app.base, "--drain-timeout", "60s", "--upstream-timeout", "60s")
    threads, results = slow_requests(proxy, dev_certs.ca, 1, "/stall")
    wait_for(lambda: app.count("/stall") == 1, what="the request to reach the app")
    proxy.signal(signal.SIGTERM)
    wait_for(lambda: "draining" in proxy.stderr_text(), what="draining")
    proxy.signal(signal.SIGINT)
    assert proxy.wait(10) == 128 + signal.SIGINT
    for thread in threads:
        thread.join(10)
    assert isinstance(results[0], Exception), "the stalled request was cut"


def test_drain_timeout_bounds_the_shutdown(
    dev_certs: DevCerts, app: UpstreamApp, start_proxy: ProxyFactory
) -> None:
    proxy = start_proxy(app.base, "--drain-timeout", "1s", "--upstream-timeout", "60s")
    threads, _ = slow_requests(proxy, dev_certs.ca, 1, "/stall")
    wait_for(lambda: app.count("/stall") == 1, what="the request to reach the app")
    proxy.signal(signal.SIGTERM)
    assert proxy.wait(15) == 0
    assert "drain timeout" in proxy.stderr_text()
    for thread in threads:
        thread.join(10)


def served_serial(port: int, ca: Path) -> int:
    ctx = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_sighup_reloads_the_certificate_and_keeps_it_on_bad_files(
    tmp_path: Path, app: UpstreamApp
) -> None:
    ca = certs.create_ca()
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    first = certs.issue(ca, ["localhost"])
    (tmp_path / "tls.crt").write_bytes(first.cert_pem)
    certs.write_private(tmp_path / "tls.key", first.key_pem)
    proxy = ProxyProcess(
        [
            *serve_args(app.base),
            "--cert",
            str(tmp_path / "tls.crt"),
            "--key",
            str(tmp_path / "tls.key"),
            # SIGHUP alone: the poll would reload these edits too, and count them twice
            "--reload-interval",
            "0",
        ]
    ).start()
    try:
        assert served_serial(proxy.port, tmp_path / "ca.crt") == first.certificate.serial_number
        second = certs.issue(ca, ["localhost"])
        (tmp_path / "tls.crt").write_bytes(second.cert_pem)
        certs.write_private(tmp_path / "tls.key", second.key_pem)
        proxy.signal(signal.SIGHUP)
        wait_for(
            lambda: (
                served_serial(proxy.port, tmp_path / "ca.crt") == second.certificate.serial_number
            ),
            what="new handshakes to get the new certificate",
        )
        assert proxy.metric("tls_sidecar_certificate_reloads_total", 'result="success"') == 1
        (tmp_path / "tls.key").write_text("garbage")
        proxy.signal(signal.SIGHUP)
        wait_for(
            lambda: proxy.metric("tls_sidecar_certificate_reloads_total", 'result="failure"') == 1
        )
        assert served_serial(proxy.port, tmp_path / "ca.crt") == second.certificate.serial_number
        assert "still serving the previous one" in proxy.stderr_text()
    finally:
        proxy.stop()
