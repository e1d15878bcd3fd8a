"""The metrics where they are used: a real Prometheus (Debian's) scrapes a proxy and a
`--workers 2` proxy on 127.0.0.1, with the shipped alert rules loaded; after some traffic (200s,
a 502, a failed handshake) every PromQL expression of the alerts and of the dashboard evaluates,
and the ones that traffic feeds return data. A third proxy that never completes a handshake
makes alerts fire for real: a failed certificate reload, and failed handshakes with none ever
succeeding (pending, then firing, as `ALERTS` records them; `for:` shortened in a test copy of
the rules, the expressions as shipped)."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import socket
import ssl
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
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


# Alerts with a `for:` get this one in the test copy of the rules: long enough to be seen
# pending at a 1 s evaluation interval, short enough for a test.
TEST_FOR = "4s"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rules_for_tests(work: Path) -> Path:
    """The shipped rules with every `for:` shortened to TEST_FOR."""
    groups = yaml.safe_load(ALERTS.read_text())
    for group in groups["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = TEST_FOR
    copy = work / "alerts.yaml"
    copy.write_text(yaml.safe_dump(groups))
    return copy


class Prometheus:
    def __init__(self, work: Path, jobs: dict[str, list[str]]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is missing: apt-get install prometheus")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules_for_tests(work))],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": targets}]}
                for job, targets in jobs.items()
            ],
        }
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        # Prometheus cannot listen on port 0 and tell us the port: pick a free one, and pick
        # again if another process took it between our probe and Prometheus's bind.
        for _attempt in range(5):
            self.port = free_port()
            log_path = work / f"prometheus-{self.port}.log"
            self.log = log_path.open("w")
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
            wait_for(
                lambda: self.proc.poll() is not None or self._get("/-/ready") is not None,
                30,
                "Prometheus ready",
            )
            if self.proc.poll() is None:
                return
            self.log.close()
            if "address already in use" not in log_path.read_text():
                pytest.fail(f"Prometheus did not start: {log_path.read_text()}")
        pytest.fail("Prometheus found no free port in 5 attempts")

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


@dataclass
class Setup:
    prometheus: Prometheus
    single: ProxyProcess
    workers: ProxyProcess
    lonely: ProxyProcess  # never completes a handshake; its certificate files are its own
    lonely_certs: Path


@pytest.fixture(scope="module")
def setup(dev_certs: DevCerts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    app = UpstreamApp().start()
    single = ProxyProcess(serve_args(app.base, dev_certs)).start()
    workers = ProxyProcess(serve_args(app.base, dev_certs, "--workers", "2")).start()
    own = tmp_path_factory.mktemp("lonely-certs")
    for name in ("tls.crt", "tls.key"):
        shutil.copy(dev_certs.dir / name, own / name)
    mine = DevCerts(dev_certs.ca, own / "tls.crt", own / "tls.key", own)
    # reloaded by SIGHUP alone: the poll would count the test's one bad edit a second time
    lonely = ProxyProcess(serve_args(app.base, mine, "--reload-interval", "0")).start()
    wait_for(
        lambda: sum('"msg": "listening"' in line for line in list(workers.stderr_lines)) == 2,
        30,
        "both workers listening",
    )
    prometheus = Prometheus(
        tmp_path_factory.mktemp("prometheus"),
        {
            "tls-sidecar": [f"127.0.0.1:{single.admin_port}", f"127.0.0.1:{workers.admin_port}"],
            "lonely": [f"127.0.0.1:{lonely.admin_port}"],
        },
    )
    yield Setup(prometheus, single, workers, lonely, own)
    prometheus.stop()
    for proxy in (single, workers, lonely):
        proxy.stop()
    app.stop()


def fail_handshake(proxy: ProxyProcess) -> None:
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


def drive_traffic(proxy: ProxyProcess, ca: Path) -> None:
    for i in range(40):
        assert https(proxy, ca, path=f"/echo/{i}")[0] == 200
    assert https(proxy, ca, path="/reset")[0] == 502
    fail_handshake(proxy)


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


def test_prometheus_scrapes_and_every_shipped_expression_evaluates(setup: Setup, ca: Path) -> None:
    prometheus, single, workers = setup.prometheus, setup.single, setup.workers
    totals = 'sum by (instance) (tls_sidecar_http_requests_total{job="tls-sidecar"})'

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
    assert sorted(t["health"] for t in targets) == ["up", "up", "up"], targets
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
        "connections per worker": 'count by (instance) (tls_sidecar_worker_connections_active{job="tls-sidecar"})',
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
    # (the lonely proxy, in its own job, has its worker 0 series too once a handshake reaches it)
    assert sorted(values(prometheus.query(fed["connections per worker"]))) == [1.0, 2.0]
    assert values(prometheus.query(fed["local 502s"])) == [2.0]  # one from each proxy
    assert values(prometheus.query(fed["handshake errors"])) == [2.0]
    rules = prometheus._get("/api/v1/rules")["data"]["groups"]
    shipped = sum(len(g["rules"]) for g in yaml.safe_load(ALERTS.read_text())["groups"])
    assert [r["health"] for g in rules for r in g["rules"]] == ["ok"] * shipped
    assert re.search(r"tls_sidecar", json.dumps(rules))


def alert_states(prometheus: Prometheus, alert: str, instance: str) -> set[str]:
    """Every state the alert was in for this instance in the last 5 minutes, from ALERTS."""
    answer = prometheus.query(f'ALERTS{{alertname="{alert}",instance="{instance}"}}[5m]')
    return {r["metric"]["alertstate"] for r in answer["data"]["result"]}


def test_a_failed_reload_and_failed_handshakes_with_none_succeeding_fire_their_alerts(
    setup: Setup,
) -> None:
    prometheus, lonely = setup.prometheus, setup.lonely
    instance = f"127.0.0.1:{lonely.admin_port}"
    # Scraped before anything fails: the counters a real Prometheus sees from the start.
    before = f'tls_sidecar_certificate_reloads_total{{instance="{instance}",result="failure"}}'
    scrapes = f"count_over_time({before}[1m])"
    wait_for(lambda: (values(prometheus.query(scrapes)) or [0])[0] >= 2, 30, "two scrapes at 0")
    (setup.lonely_certs / "tls.crt").write_text("not a certificate\n")
    lonely.signal(signal.SIGHUP)
    wait_for(
        lambda: lonely.metric("tls_sidecar_certificate_reloads_total", 'result="failure"') == 1,
        30,
        "the failed reload counted",
    )
    # Over 0.5 a second in a 5-minute rate: more than 150 in the window.
    for _ in range(200):
        fail_handshake(lonely)
    assert lonely.metric("tls_sidecar_tls_handshakes_total") == 0  # none ever succeeded

    def fired(alert: str) -> set[str] | None:
        states = alert_states(prometheus, alert, instance)
        return states if "firing" in states else None

    # No `for:`: firing at the first evaluation that sees the failure.
    assert fired_within(fired, "TLSSidecarCertificateReloadFailing") == {"firing"}
    # `for:` (TEST_FOR here): pending first, then firing.
    assert fired_within(fired, "TLSSidecarHandshakeErrorsSpiking") == {"pending", "firing"}


def fired_within(fired: Any, alert: str) -> set[str]:
    return set(wait_for(lambda: fired(alert), 60, f"{alert} firing"))
