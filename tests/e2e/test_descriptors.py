"""Out of file descriptors: connections past the spare ones are refused, counted and logged; the
admin port answers throughout, certificates are not blamed, and clients are served once
descriptors are free again."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
from pathlib import Path

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
