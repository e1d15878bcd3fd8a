"""Memory of one long-lived HTTP/2 connection stays flat over 100k streams: h2 keeps a record of
every closed stream up to 65,536 of them (8-12 MiB per connection), which the proxy bounds."""

from __future__ import annotations

import math
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.tls import certs
from tests.support.proxy import DevCerts, ProxyProcess, serve_args, wait_for

pytestmark = pytest.mark.slow

WARM_UP = 20_000
STREAMS = 120_000  # 100k past the warm-up, on one connection


def _rss(pid: int) -> int:
    """The process's resident set, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def refusing(dev_certs: DevCerts, tmp_path: Path) -> Iterator[ProxyProcess]:
    """A proxy that answers every request itself (403: no client certificate), so that the
    streams cost only the HTTP/2 side, not an app."""
    ca = certs.create_ca("clients CA")
    (tmp_path / "clients.crt").write_bytes(ca.cert_pem)
    args = serve_args(
        "http://127.0.0.1:9",
        dev_certs,
        "--client-ca",
        str(tmp_path / "clients.crt"),
        "--client-auth",
        "optional",
        "--allow-cn",
        "nobody",
        "--no-access-log",
    )
    proxy = ProxyProcess(args).start()
    yield proxy
    proxy.stop()


def test_memory_of_one_connection_stays_flat_over_100k_streams(refusing: ProxyProcess) -> None:
    if shutil.which("h2load") is None:
        pytest.fail("h2load is missing: apt-get install -y nghttp2-client")
    assert refusing.proc is not None
    pid = refusing.proc.pid
    load = subprocess.Popen(
        [
            "h2load",
            "-n",
            str(STREAMS),
            "-c",
            "1",
            "-m",
            "100",
            f"https://localhost:{refusing.port}/",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def answered() -> float:
            value = refusing.metric("tls_sidecar_http_requests_total", 'code="403"')
            return 0.0 if math.isnan(value) else value  # NaN before the first

        wait_for(lambda: answered() >= WARM_UP, timeout=300, what=f"{WARM_UP} streams")
        warm = _rss(pid)
        out, _ = load.communicate(timeout=600)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    after = _rss(pid)
    assert f"status codes: 0 2xx, 0 3xx, {STREAMS} 4xx, 0 5xx" in out, out
    assert answered() >= STREAMS
    growth = after - warm
    assert growth < 2 * 1024 * 1024, f"RSS grew {growth / 2**20:.1f} MiB over 100k streams"
