"""--workers N: requests spread over worker processes, a dead worker is replaced, metrics summed."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.tls import certs
from proxy.workers import cpu_quota_workers
from tests.support.proxy import DevCerts, ProxyProcess, client_context, serve_args, wait_for
from tests.support.upstream import UpstreamApp


@pytest.fixture
def group(dev_certs: DevCerts) -> Iterator[tuple[ProxyProcess, UpstreamApp]]:
    app = UpstreamApp().start()
    proxy = ProxyProcess(
        [
            *serve_args(app.base, dev_certs),
            "--workers",
            "2",
        ]
    ).start()
    wait_for(lambda: len(worker_lines(proxy, "listening")) == 2, what="both workers listening")
    yield proxy, app
    proxy.stop()
    app.stop()


def worker_lines(proxy: ProxyProcess, msg: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in list(proxy.stderr_lines) if f'"msg": "{msg}"' in line]


def request(proxy: ProxyProcess, ca: Path, path: str) -> int:
    conn = http.client.HTTPSConnection(
        "localhost", proxy.port, context=client_context(ca), timeout=10
    )
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_requests_spread_over_workers_and_metrics_add_up(
    group: tuple[ProxyProcess, UpstreamApp], dev_certs: DevCerts
) -> None:
    proxy, _ = group
    for i in range(60):
        assert request(proxy, dev_certs.ca, f"/echo/spread/{i}") == 200
    records = wait_for(
        lambda: (
            len(r := [x for x in proxy.access_records() if x["path"].startswith("/echo/spread/")])
            == 60
            and r
        )
    )
    assert {r["worker"] for r in records} == {0, 1}, "SO_REUSEPORT spread the connections"
    # Workers hand their counts over every second; the supervisor sums them.
    wait_for(
        lambda: proxy.metric("tls_sidecar_http_requests_total", 'code="200"') >= 60,
        timeout=5,
        what="the supervisor's sum of the workers' requests",
    )
    assert proxy.metric("tls_sidecar_workers") == 2
    assert proxy.admin_get("/readyz")[0] == 200


def test_a_killed_worker_is_replaced(
    group: tuple[ProxyProcess, UpstreamApp], dev_certs: DevCerts
) -> None:
    proxy, _ = group
    first = {
        int(str(w["worker"])): int(str(w["pid"])) for w in worker_lines(proxy, "worker started")
    }
    os.kill(first[0], signal.SIGKILL)
    wait_for(
        lambda: worker_lines(proxy, "worker exited; starting it again"),
        what="the supervisor to notice",
    )
    wait_for(lambda: len(worker_lines(proxy, "worker started")) == 3, what="a new worker 0")
    replacement = worker_lines(proxy, "worker started")[-1]
    assert replacement["worker"] == 0 and replacement["pid"] != first[0]
    wait_for(lambda: len(worker_lines(proxy, "listening")) == 3, what="the new worker listening")
    for i in range(20):
        assert request(proxy, dev_certs.ca, f"/echo/after-kill/{i}") == 200
    assert proxy.metric("tls_sidecar_worker_restarts_total") == 1
    wait_for(lambda: proxy.admin_get("/readyz")[0] == 200, what="readiness back")


def test_sigterm_drains_every_worker(
    group: tuple[ProxyProcess, UpstreamApp], dev_certs: DevCerts
) -> None:
    proxy, _ = group
    assert request(proxy, dev_certs.ca, "/echo/before-stop") == 200
    proxy.signal(signal.SIGTERM)
    assert proxy.wait(30) == 0
    stopped = worker_lines(proxy, "stopped")
    assert any(line.get("worker_exit_codes") == {"0": 0, "1": 0} for line in stopped), stopped


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "150000 100000\n"}, 2),
        ({"cpu.max": "400000 100000\n"}, 4),
        ({"cpu/cpu.cfs_quota_us": "250000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
    ],
)
def test_auto_follows_the_cpu_quota(tmp_path: Path, files: dict[str, str], expected: int) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_quota_workers(tmp_path) == expected


def test_auto_without_a_quota_uses_the_usable_cpus(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_quota_workers(tmp_path) == len(os.sched_getaffinity(0))


def test_library_warnings_are_json_log_lines_with_workers(
    dev_certs: DevCerts, tmp_path: Path
) -> None:
    """A warning raised in each process while it starts (here when proxy.cli is imported, as
    any library's import could; it used to be raised a second after start, and a worker still
    loading on a busy machine printed it as raw text) reaches stderr as a JSON log line like
    every other line."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys, warnings\n"
        "def warn_on_import(event, args):\n"
        "    if event == 'import' and args[0] == 'proxy.cli':\n"
        "        warnings.warn('a library warning', stacklevel=1)\n"
        "sys.addaudithook(warn_on_import)\n"
    )
    app = UpstreamApp().start()
    proxy = ProxyProcess(
        [*serve_args(app.base, dev_certs), "--workers", "2"],
        env={"PYTHONPATH": str(tmp_path)},
    ).start()
    try:
        wait_for(
            lambda: sum("a library warning" in line for line in list(proxy.stderr_lines)) >= 3,
            20,
            "the warning from the supervisor and both workers",
        )
    finally:
        proxy.stop()
        app.stop()
    lines = [line for line in proxy.stderr_lines if line.strip()]
    for line in lines:
        json.loads(line)  # every line is one JSON object
    warned = [json.loads(line) for line in lines if "a library warning" in line]
    assert all(w["level"] == "warning" and "UserWarning" in w["msg"] for w in warned)


def test_tls_sessions_resume_on_any_worker(
    group: tuple[ProxyProcess, UpstreamApp], dev_certs: DevCerts
) -> None:
    """Workers share their session ticket keys: a returning client resumes its TLS session
    whichever worker the kernel hands its new connection to (TLS 1.3 and 1.2)."""
    proxy, _ = group
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        ctx = client_context(dev_certs.ca)
        ctx.maximum_version = version
        session = None
        resumed = 0
        workers = set()
        for i in range(40):
            with (
                socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw,
                ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
            ):
                tls.sendall(f"GET /echo/resume/{i} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
                data = b""
                while b"body_sha256" not in data:
                    data += tls.recv(65536)
                resumed += bool(tls.session_reused)
                session = tls.session
        records = wait_for(
            lambda: [r for r in proxy.access_records() if r["path"].startswith("/echo/resume/")]
        )
        workers |= {r["worker"] for r in records}
        print(f"\n{version.name}: {resumed} of 39 reconnections resumed, workers {sorted(workers)}")
        assert workers == {0, 1}, "connections reached both workers"
        assert resumed == 39, f"only {resumed} of 39 reconnections resumed their session"


def test_a_worker_without_its_ticket_keys_says_so(
    upstream: UpstreamApp, dev_certs: DevCerts
) -> None:
    """A worker whose keys pipe cannot be read serves on with keys of its own, and says that
    returning clients resume only on the same worker (as when OpenSSL refuses the keys)."""
    unused_fd = "987"  # not open in the worker: what a lost pipe looks like
    proxy = ProxyProcess(serve_args(upstream.base, dev_certs, "--ticket-keys-fd", unused_fd))
    proxy.start()
    try:
        wait_for(
            lambda: any("cannot share session ticket keys" in line for line in proxy.stderr_lines),
            what="the warning",
        )
    finally:
        proxy.stop()


def test_workers_on_the_ipv6_wildcard_serve_ipv4_and_ipv6_clients(dev_certs: DevCerts) -> None:
    app = UpstreamApp().start()
    proxy = ProxyProcess(
        [*serve_args(app.base, dev_certs, "--listen", "[::]:0", "--workers", "2")]
    ).start()
    try:
        wait_for(lambda: len(worker_lines(proxy, "listening")) == 2, what="both workers listening")
        hosts = ["127.0.0.1"]
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
            hosts.append("::1")
        for host in hosts:
            raw = socket.create_connection((host, proxy.port), timeout=10)
            with client_context(dev_certs.ca).wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET /echo/w HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                assert tls.makefile("rb").readline().startswith(b"HTTP/1.1 200"), host
    finally:
        proxy.stop()
        app.stop()


def series(proxy: ProxyProcess, name: str) -> dict[str, float]:
    """Every sample of one metric on /metrics: {labels text: value}."""
    _, text = proxy.admin_get("/metrics")
    found = {}
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            head, value = line.rsplit(" ", 1)
            found[head[len(name) :]] = float(value)
    return found


def test_after_a_worker_dies_the_metrics_describe_the_served_certificate(
    tmp_path: Path, upstream: UpstreamApp
) -> None:
    """A worker killed, its replacement started, then the certificate rotated: the expiry and
    last-reload gauges show the new certificate (a dead worker's old values must not win the
    min), each worker keeps one connections series by its index, and no worker start logs
    prometheus-client's warning."""
    ca = certs.create_ca("workers CA")
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    cert_path, key_path = tmp_path / "tls.crt", tmp_path / "tls.key"
    old = certs.issue(ca, ["localhost"], days=30)
    cert_path.write_bytes(old.cert_pem)
    certs.write_private(key_path, old.key_pem)
    proxy = ProxyProcess(
        [
            *serve_args(upstream.base),
            "--cert",
            str(cert_path),
            "--key",
            str(key_path),
            "--workers",
            "2",
            "--reload-interval",
            "200ms",
        ]
    ).start()
    expiry = "tls_sidecar_certificate_expiry_timestamp_seconds"
    reloaded = "tls_sidecar_certificate_last_reload_success_timestamp_seconds"
    try:
        wait_for(lambda: len(worker_lines(proxy, "listening")) == 2, what="both workers listening")
        old_expiry = old.certificate.not_valid_after_utc.timestamp()
        wait_for(lambda: proxy.metric(expiry) == old_expiry, what="the first certificate")
        pids = {
            int(str(w["worker"])): int(str(w["pid"])) for w in worker_lines(proxy, "worker started")
        }
        os.kill(pids[0], signal.SIGKILL)
        wait_for(lambda: len(worker_lines(proxy, "listening")) == 3, what="worker 0 replaced")
        before_rotation = time.time()
        new = certs.issue(ca, ["localhost"], days=90)
        cert_path.write_bytes(new.cert_pem)
        certs.write_private(key_path, new.key_pem)
        wait_for(
            lambda: len(worker_lines(proxy, "certificate reloaded")) == 2,
            what="both live workers to reload",
        )
        new_expiry = new.certificate.not_valid_after_utc.timestamp()
        wait_for(
            lambda: series(proxy, expiry) == {'{cert="default"}': new_expiry},
            what="the expiry of the certificate served now",
        )
        wait_for(
            lambda: proxy.metric(reloaded) >= before_rotation,
            what="the last reload to be the rotation",
        )
        assert set(series(proxy, "tls_sidecar_worker_connections_active")) == {
            '{worker="0"}',
            '{worker="1"}',
        }
        assert request(proxy, tmp_path / "ca.crt", "/echo/after-rotation") == 200
    finally:
        proxy.stop()
    assert "UserWarning" not in proxy.stderr_text()
