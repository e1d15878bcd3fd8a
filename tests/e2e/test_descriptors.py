"""Out of file descriptors: connections past the spare ones are refused, counted and logged; the
admin port answers throughout, certificates are not blamed, and clients are served once
descriptors are free again."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from proxy.descriptors import reserve_for
from proxy.tls import certs
from tests.support.proxy import DevCerts, ProxyProcess, client_context, https, serve_args, wait_for
from tests.support.upstream import UpstreamApp

OPEN_FILE_LIMIT = 256
MAX_ATTEMPTS = 600  # bounds the loop: far more than 256 descriptors can hold
REFUSALS_WANTED = 30


def open_tls(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket | None:
    """A completed TLS handshake, or None when the proxy closed the connection first."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    try:
        return ctx.wrap_socket(raw, server_hostname="localhost")
    except (OSError, ssl.SSLError):
        raw.close()
        return None


def test_running_out_of_descriptors_is_counted_logged_and_survived(
    tmp_path: Path, upstream: UpstreamApp, dev_certs: DevCerts
) -> None:
    # The limit is set in the proxy's own interpreter before it starts, as `ulimit -n` would.
    (tmp_path / "sitecustomize.py").write_text(
        "import resource\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({OPEN_FILE_LIMIT}, {OPEN_FILE_LIMIT}))\n"
    )
    proxy = ProxyProcess(
        serve_args(
            upstream.base,
            dev_certs,
            "--header-timeout",
            "120s",
            "--reload-interval",
            "200ms",
        ),
        env={"PYTHONPATH": str(tmp_path)},
    ).start()
    ctx = client_context(dev_certs.ca)
    held: list[ssl.SSLSocket] = []
    refused = 0
    try:
        for _ in range(MAX_ATTEMPTS):
            tls = open_tls(proxy.port, ctx)
            if tls is None:
                refused += 1
                if refused == REFUSALS_WANTED:
                    break
            else:
                held.append(tls)
        assert refused == REFUSALS_WANTED, f"{len(held)} connections held, none refused"
        print(f"\n{len(held)} connections held, {refused} refused")
        # While every spare descriptor is in use by clients, the admin port still answers.
        assert proxy.admin_get("/readyz") == (200, "ready\n")
        rejected = 'reason="no_file_descriptors"'
        assert proxy.metric("tls_sidecar_connections_rejected_total", rejected) == refused
        assert proxy.metric("tls_sidecar_connections_active") == len(held)
        lines = [
            json.loads(line)
            for line in list(proxy.stderr_lines)
            if "connection refused: out of file descriptors" in line
        ]
        assert 1 <= len(lines) < refused, "logged, and rate-limited"
        assert lines[0]["open_file_limit"] == OPEN_FILE_LIMIT
    finally:
        for tls in held:
            with contextlib.suppress(OSError):
                tls.close()
    try:
        wait_for(
            lambda: proxy.metric("tls_sidecar_connections_active") == 0,
            what="the held connections to close",
        )
        status, _, _ = https(proxy, dev_certs.ca, path="/echo/after")
        assert status == 200, "served again once descriptors are free"
        assert "certificate reload" not in proxy.stderr_text()
        assert "Traceback" not in proxy.stderr_text()
    finally:
        proxy.stop()


STALLED = 95  # requests the app holds: two descriptors each, fewer than are admitted uncounted
REFUSED = 64  # clients without a certificate at once: each refused one's socket lingers


def test_refused_handshakes_lingering_leave_the_spare_descriptors_free(
    tmp_path: Path, upstream: UpstreamApp, dev_certs: DevCerts
) -> None:
    """A refused handshake's socket lingers after its alert, one descriptor with no connection
    left to count it: the spare descriptors must still be there for the admin port."""
    (tmp_path / "sitecustomize.py").write_text(
        "import resource\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({OPEN_FILE_LIMIT}, {OPEN_FILE_LIMIT}))\n"
    )
    clients = certs.create_ca("clients")
    client = certs.issue(clients, [], common_name="app", client=True)
    (tmp_path / "clients.crt").write_bytes(clients.cert_pem)
    (tmp_path / "client.pem").write_bytes(client.cert_pem + client.key_pem)
    proxy = ProxyProcess(
        serve_args(
            upstream.base,
            dev_certs,
            "--client-ca",
            str(tmp_path / "clients.crt"),
            "--allow-all",
            "--upstream-max-idle",
            "0",
        ),
        env={"PYTHONPATH": str(tmp_path)},
    ).start()
    admitted = client_context(dev_certs.ca)
    admitted.load_cert_chain(tmp_path / "client.pem")
    stalled_before = upstream.count("/stall")
    held: list[ssl.SSLSocket] = []
    try:
        for _ in range(STALLED):
            tls = open_tls(proxy.port, admitted)
            assert tls is not None, f"refused after {len(held)} connections"
            tls.sendall(b"GET /stall HTTP/1.1\r\nHost: app\r\n\r\n")
            held.append(tls)
        wait_for(
            lambda: upstream.count("/stall") - stalled_before == STALLED,
            what="the app to hold every request",
        )
        assert proxy.admin_get("/readyz") == (200, "ready\n")
        refused = client_context(dev_certs.ca)  # no client certificate
        with ThreadPoolExecutor(REFUSED) as pool:
            silent = list(pool.map(lambda _: open_tls(proxy.port, refused), range(REFUSED)))
        held += [tls for tls in silent if tls is not None]
        # The refused clients stay silent, so their sockets linger: the spare descriptors are
        # still free, and a client turned away for want of them is counted as such.
        assert proxy.proc is not None
        free = OPEN_FILE_LIMIT - len(os.listdir(f"/proc/{proxy.proc.pid}/fd"))
        assert free >= reserve_for(OPEN_FILE_LIMIT), f"{free} descriptors free"
        assert proxy.admin_get("/readyz") == (200, "ready\n")
        rejected = 'reason="no_file_descriptors"'
        turned_away = silent.count(None)
        assert proxy.metric("tls_sidecar_connections_rejected_total", rejected) == turned_away
        assert "Traceback" not in proxy.stderr_text()
    finally:
        for tls in held:
            with contextlib.suppress(OSError):
                tls.close()
        proxy.stop()
