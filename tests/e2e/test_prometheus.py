"""The metrics where they are used: a real Prometheus (Debian's) scrapes a proxy and a
`--workers 2` proxy on 127.0.0.1, with the shipped alert rules loaded; after some traffic (200s,
a 502, a failed handshake) every PromQL expression of the alerts and of the dashboard evaluates,
and the ones that traffic feeds return data."""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import ssl
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.proxy import DevCerts, ProxyProcess, https, serve_args, wait_for
from tests.support.upstream import UpstreamApp

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARD = (
    REPO / "deploy" / "kubernetes" / "overlays" / "prometheus" / "tls-sidecar-dashboard.json"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    def __init__(self, work: Path, targets: list[str]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is missing: apt-get install prometheus")
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {
                    "job_name": "tls-sidecar",
                    "static_configs": [{"targets": targets}],
                }
            ],
        }
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (work / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: self._get("/-/ready") is not None, 30, "Prometheus ready")

    def _get(self, path: str) -> Any:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                body = r.read()
        except OSError:
            return None
        return json.loads(body) if body.startswith(b"{") else body

    def query(self, expr: str) -> dict[str, Any]:
        answer = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert answer is not None, f"no answer for {expr}"
        return dict(answer)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


@pytest.fixture(scope="module")
def setup(
    dev_certs: DevCerts, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Prometheus, ProxyProcess, ProxyProcess]]:
    app = UpstreamApp().start()
    single = ProxyProcess(serve_args(app.base, dev_certs)).start()
    workers = ProxyProcess(serve_args(app.base, dev_certs, "--workers", "2")).start()
    wait_for(
        lambda: sum('"msg": "listening"' in line for line in list(workers.stderr_lines)) == 2,
        30,
        "both workers listening",
    )
    prometheus = Prometheus(
        tmp_path_factory.mktemp("prometheus"),
        [f"127.0.0.1:{single.admin_port}", f"127.0.0.1:{workers.admin_port}"],
    )
    yield prometheus, single, workers
    prometheus.stop()
    single.stop()
    workers.stop()
    app.stop()


def drive_traffic(proxy: ProxyProcess, ca: Path) -> None:
    for i in range(40):
        assert https(proxy, ca, path=f"/echo/{i}")[0] == 200
    assert https(proxy, ca, path="/reset")[0] == 502
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no shared cipher: a failed handshake
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("AES128-SHA")  # RSA key exchange, CBC: the proxy offers neither
    with (
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw,
        pytest.raises((ssl.SSLError, OSError)),
    ):
        ctx.wrap_socket(raw, server_hostname="localhost")


def expressions() -> dict[str, str]:
    """Every PromQL expression shipped: the alerts', and the dashboard's with Grafana's
    variables given values (all pods, a 1m rate window)."""
    found: dict[str, str] = {}
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            found[f"alert {rule['alert']}"] = rule["expr"]
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$pod", ".*")
            found[f"panel {panel['title']} {target['refId']}"] = expr
    assert not any("$" in e for e in found.values())
    return found


def values(answer: dict[str, Any]) -> list[float]:
    return [float(r["value"][1]) for r in answer["data"]["result"]]


def test_prometheus_scrapes_and_every_shipped_expression_evaluates(
    setup: tuple[Prometheus, ProxyProcess, ProxyProcess], ca: Path
) -> None:
    prometheus, single, workers = setup
    totals = "sum by (instance) (tls_sidecar_http_requests_total)"

    def scraped(at_least: float) -> bool:
        got = values(prometheus.query(totals))
        return len(got) == 2 and min(got) >= at_least

    # One request first, so that the series exist before the rest: rates need a before.
    for proxy in (single, workers):
        assert https(proxy, ca, path="/echo/first")[0] == 200
    wait_for(lambda: scraped(1), 60, "the first requests in Prometheus")
    for proxy in (single, workers):
        drive_traffic(proxy, ca)
    wait_for(lambda: scraped(42), 60, "the traffic in Prometheus")
    targets = prometheus._get("/api/v1/targets")["data"]["activeTargets"]
    assert sorted(t["health"] for t in targets) == ["up", "up"], targets
    # Rates need two scrapes after the traffic: wait until the request rate shows it.
    # Series born with the traffic (the 502, the failed handshake) need a few scrapes too.
    samples = (
        'min(count_over_time(tls_sidecar_local_responses_total{code="502"}[1m]))'
        " and min(count_over_time(tls_sidecar_tls_handshake_errors_total[1m]))"
    )
    wait_for(lambda: (values(prometheus.query(samples)) or [0])[0] >= 3, 30, "three scrapes")
    report = []
    for name, expr in expressions().items():
        answer = prometheus.query(expr)
        assert answer["status"] == "success", (name, expr, answer)
        report.append(f"{name}: {len(answer['data']['result'])} series")
    print("\n" + "\n".join(report))
    # Where traffic made some, there is data.
    fed = {
        "request rate by code": "sum by (code) (rate(tls_sidecar_http_requests_total[1m]))",
        "p99 request latency": "histogram_quantile(0.99, sum by (le) (rate(tls_sidecar_http_request_duration_seconds_bucket[1m])))",
        "p50 upstream latency": "histogram_quantile(0.5, sum by (le) (rate(tls_sidecar_upstream_response_duration_seconds_bucket[1m])))",
        "certificate days left": "(min by (instance, cert) (tls_sidecar_certificate_expiry_timestamp_seconds) - time()) / 86400",
        "local 502s": 'sum(tls_sidecar_local_responses_total{code="502"})',
        "handshake errors": 'sum(tls_sidecar_tls_handshake_errors_total{reason="protocol"})',
        "connections per worker": "count by (instance) (tls_sidecar_worker_connections_active)",
    }
    for what, expr in fed.items():
        got = values(prometheus.query(expr))
        assert got and all(not math.isnan(v) for v in got), (what, expr, got)
        print(f"{what}: {[round(v, 4) for v in got]}")
    codes = {
        r["metric"]["code"] for r in prometheus.query(fed["request rate by code"])["data"]["result"]
    }
    assert {"200", "502"} <= codes
    days = values(prometheus.query(fed["certificate days left"]))
    assert all(300 < d < 900 for d in days), days  # the test certificates' 825 days
    # one series per worker index: worker 0 for the single process, 0 and 1 for --workers 2
    assert sorted(values(prometheus.query(fed["connections per worker"]))) == [1.0, 2.0]
    assert values(prometheus.query(fed["local 502s"])) == [2.0]  # one from each proxy
    assert values(prometheus.query(fed["handshake errors"])) == [2.0]
    rules = prometheus._get("/api/v1/rules")["data"]["groups"]
    assert [r["health"] for g in rules for r in g["rules"]] == ["ok"] * 7
    assert re.search(r"tls_sidecar", json.dumps(rules))
