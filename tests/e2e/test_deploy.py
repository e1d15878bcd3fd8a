"""The shipped artefacts, checked: Dockerfile (hadolint), kustomizations (render + Kubernetes
schemas for 1.29 and the newest version), and `tls-sidecar inject` against golden files."""

from __future__ import annotations

import difflib
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from proxy.inject import APP_DRAIN_SECONDS, InjectError, InjectOptions, inject

REPO = Path(__file__).resolve().parents[2]
KUSTOMIZATIONS = sorted(
    p.parent for p in (REPO / "deploy" / "kubernetes").rglob("kustomization.yaml")
)
GOLDEN = REPO / "tests" / "golden" / "inject"
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
# Custom resources have no schema in kubernetes-validate; they are checked by shape only.
CUSTOM_KINDS = {
    ("cert-manager.io/v1", "Issuer"),
    ("cert-manager.io/v1", "Certificate"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
PROMETHEUS = REPO / "deploy" / "prometheus"
OVERLAY = REPO / "deploy" / "kubernetes" / "overlays" / "prometheus"


def objects(text: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for doc in yaml.safe_load_all(text):
        if doc is None:
            continue
        found.extend(doc["items"] if doc.get("kind") == "List" else [doc])
    return found


def validate(obj: dict[str, Any]) -> None:
    if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
        assert obj["metadata"]["name"] and isinstance(obj["spec"], dict)
        return
    for version in VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_without_a_shell_in_exec_form() -> None:
    text = (REPO / "Dockerfile").read_text()
    final = text.split("\nFROM ")[-1]
    assert "USER 65532:65532" in final
    assert 'ENTRYPOINT ["tls-sidecar"]' in final and 'CMD ["serve"]' in final
    assert "EXPOSE 8443 9901" in final and "STOPSIGNAL SIGTERM" in final
    assert '"/bin/sh"' in final, "the final stage removes the shell"
    assert '"pip", "uninstall"' in final, "the final stage removes pip"
    assert "python:3.12-slim" in text


def test_the_base_image_is_pinned_by_digest_and_dependencies_have_their_own_layer() -> None:
    text = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE=(\S+)$", text, re.MULTILINE)
    assert base and re.fullmatch(r"python:3\.12-slim@sha256:[0-9a-f]{64}", base.group(1))
    assert [line for line in text.splitlines() if line.startswith("FROM ")] == [
        "FROM ${BASE} AS build",
        "FROM ${BASE}",
    ]
    build = text.split("\nFROM ")[1]
    steps = [
        line.split()[0] + " " + line.split()[1]
        for line in build.splitlines()
        if line[:4] in ("COPY", "RUN ")
    ]
    # The lock is copied and installed before the source: a source change keeps that layer.
    assert (
        build.index("COPY requirements.lock")
        < build.index("--require-hashes")
        < build.index("COPY proxy")
    )
    assert steps[0] == "RUN python"


def test_the_lock_file_pins_every_dependency_of_pyproject_with_hashes() -> None:
    """requirements.lock (pip-compile --generate-hashes, `make lock`) matches pyproject: each
    dependency is pinned at a version its specifier allows, and every pin has hashes."""
    from packaging.requirements import Requirement  # noqa: PLC0415

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    lock = (REPO / "requirements.lock").read_text()
    pins = dict(re.findall(r"^([a-z0-9_.-]+)==(\S+) \\$", lock, re.MULTILINE))
    assert pins, "no pins in requirements.lock"
    for line in pyproject["project"]["dependencies"]:
        requirement = Requirement(line)
        name = re.sub(r"[-_.]+", "-", requirement.name.lower())  # PEP 503
        assert name in pins, f"{name} is not in requirements.lock: run make lock"
        assert requirement.specifier.contains(pins[name]), (
            f"requirements.lock pins {name}=={pins[name]}, pyproject wants {requirement.specifier}: "
            "run make lock"
        )
    blocks = re.split(r"\n(?=[a-z0-9_.-]+==)", lock.split("\n\n", 1)[-1])
    for block in blocks:
        if "==" in block:
            assert "--hash=sha256:" in block, block.splitlines()[0]
    assert "/opt/" not in lock and "--find-links" not in lock


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with kustomize) is not installed")
    out = {}
    for folder in KUSTOMIZATIONS:
        result = subprocess.run(
            [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"{folder}: {result.stderr}"
        out[str(folder.relative_to(REPO))] = result.stdout
    return out


def test_every_kustomization_renders_and_validates(rendered: dict[str, str]) -> None:
    assert set(rendered) == {
        "deploy/kubernetes/base",
        "deploy/kubernetes/overlays/cert-manager",
        "deploy/kubernetes/overlays/prometheus",
        "deploy/kubernetes/overlays/classic-sidecar",
        "deploy/kubernetes/overlays/grpc",
    }
    counts = {}
    for name, text in rendered.items():
        found = objects(text)
        counts[name] = len(found)
        for obj in found:
            validate(obj)
    print(f"\nrendered objects: {counts}; schemas: {VERSIONS}")


def sidecar_of(deployment: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    for where in ("initContainers", "containers"):
        for container in spec.get(where) or []:
            if container["name"] == "tls-sidecar":
                return where, container
    raise AssertionError("no tls-sidecar container")


def test_the_grpc_example_reaches_its_app_over_h2c(rendered: dict[str, str]) -> None:
    grpc = next(
        o for o in objects(rendered["deploy/kubernetes/overlays/grpc"]) if o["kind"] == "Deployment"
    )
    _, sidecar = sidecar_of(grpc)
    assert "--upstream=h2c://127.0.0.1:9000" in sidecar["args"]
    [app] = grpc["spec"]["template"]["spec"]["containers"]
    assert app["ports"] == [{"name": "grpc", "containerPort": 9000}]
    assert not any(a.startswith("--no-http2") for a in sidecar["args"])  # h2 is on by default


def test_native_and_classic_sidecars_are_wired_as_documented(rendered: dict[str, str]) -> None:
    base = next(o for o in objects(rendered["deploy/kubernetes/base"]) if o["kind"] == "Deployment")
    where, sidecar = sidecar_of(base)
    assert where == "initContainers" and sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/livez", (
        "startup must not wait for the app"
    )
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    security = sidecar["securityContext"]
    assert (
        security["readOnlyRootFilesystem"]
        and security["runAsNonRoot"]
        and not security["allowPrivilegeEscalation"]
    )
    assert (
        security["capabilities"]["drop"] == ["ALL"]
        and security["seccompProfile"]["type"] == "RuntimeDefault"
    )
    classic = next(
        o
        for o in objects(rendered["deploy/kubernetes/overlays/classic-sidecar"])
        if o["kind"] == "Deployment"
    )
    where, sidecar = sidecar_of(classic)
    assert where == "containers" and "restartPolicy" not in sidecar
    assert "--shutdown-delay=15s" in sidecar["args"]
    app = classic["spec"]["template"]["spec"]["containers"][0]
    assert app["lifecycle"]["preStop"]["sleep"]["seconds"] == 15
    service = next(o for o in objects(rendered["deploy/kubernetes/base"]) if o["kind"] == "Service")
    assert service["spec"]["ports"] == [{"name": "https", "port": 443, "targetPort": "https"}]


@pytest.mark.parametrize(
    ("golden", "options"),
    [
        ("native.yaml", InjectOptions()),
        (
            "classic.yaml",
            InjectOptions(
                native=False,
                secret="shop-tls",
                image="registry.example/tls-sidecar:0.1.0",
                upstream_port=3000,
            ),
        ),
    ],
)
def test_inject_matches_golden_validates_and_is_idempotent(
    golden: str, options: InjectOptions
) -> None:
    source = (GOLDEN / "input.yaml").read_text()
    result = inject(source, options)
    assert result == (GOLDEN / golden).read_text(), f"regenerate {golden} if the change is intended"
    # The diff is the sidecar: a line of the input goes only where inject had to change it
    # (a flow list of containers that gains one, a Service port that now targets https).
    removed = [
        d[2:] for d in difflib.ndiff(source.splitlines(), result.splitlines()) if d[0] == "-"
    ]
    assert removed and all(re.search(r"(?i)containers: \[|targetPort", line) for line in removed)
    assert inject(result, options) == result, "a second run changes nothing"
    found = objects(result)
    assert sum(1 for o in found if "tls-sidecar" in yaml.safe_dump(o)) == 7
    for obj in found:
        validate(obj)
    assert "kind: Service   # untouched, comment and all" in result


def test_inject_refuses_port_conflicts_and_non_kubernetes_input() -> None:
    taken = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: a, image: a, ports: [{containerPort: 9901}]}]\n"
    with pytest.raises(InjectError, match="already uses port 9901"):
        inject(taken, InjectOptions())
    with pytest.raises(InjectError, match="not a Kubernetes object"):
        inject("just: yaml\n", InjectOptions())
    with pytest.raises(InjectError, match="not valid YAML"):
        inject("a: [unclosed\n", InjectOptions())


def test_inject_cli_reads_stdin_and_fails_with_one_line() -> None:
    cli = [sys.executable, "-m", "proxy", "inject"]
    ok = subprocess.run(
        cli, input=(GOLDEN / "input.yaml").read_text(), capture_output=True, text=True, timeout=30
    )
    assert ok.returncode == 0 and ok.stdout == (GOLDEN / "native.yaml").read_text()
    bad = subprocess.run(cli, input="not: kubernetes\n", capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def _named_ports(pod_spec: dict[str, Any]) -> dict[str, int]:
    return {
        port["name"]: port["containerPort"]
        for container in (pod_spec.get("initContainers") or []) + pod_spec["containers"]
        for port in container.get("ports") or []
        if "name" in port
    }


def test_every_metrics_port_reference_resolves_to_a_named_container_port(
    rendered: dict[str, str],
) -> None:
    """The shipped PodMonitor and scrape annotations point at the admin port of the pods they
    select: the base's, and an injected workload's (inject names ports as the base does)."""
    monitored = objects(rendered["deploy/kubernetes/overlays/prometheus"])
    monitor = next(o for o in monitored if o["kind"] == "PodMonitor")
    deployment = next(o for o in monitored if o["kind"] == "Deployment")
    injected = next(
        o
        for o in objects(inject((GOLDEN / "input.yaml").read_text(), InjectOptions()))
        if o["kind"] == "Deployment"
    )
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    for workload in (deployment, injected):
        ports = _named_ports(workload["spec"]["template"]["spec"])
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in ports, (workload["metadata"]["name"], endpoint, ports)
            assert ports[endpoint["port"]] == 9901
        assert int(annotations["prometheus.io/port"]) in ports.values()
        _, sidecar = sidecar_of(workload)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            port = sidecar[probe]["httpGet"]["port"]
            assert port in ports or port in ports.values(), (probe, port)


@pytest.mark.parametrize(
    "overlay", ["deploy/kubernetes/base", "deploy/kubernetes/overlays/classic-sidecar"]
)
def test_the_grace_period_covers_prestop_app_drain_and_sidecar_drain(
    rendered: dict[str, str], overlay: str
) -> None:
    deployment = next(o for o in objects(rendered[overlay]) if o["kind"] == "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    app = spec["containers"][0]
    prestop = app["lifecycle"]["preStop"]["sleep"]["seconds"]
    _, sidecar = sidecar_of(deployment)
    assert "lifecycle" not in sidecar, "the sidecar must outlive the app: no draining preStop"
    drain = next(
        (
            int(a.split("=")[1].rstrip("s"))
            for a in sidecar["args"]
            if a.startswith("--drain-timeout=")
        ),
        30,
    )
    assert prestop >= 5, "endpoints need a few seconds to drop the pod"
    assert spec["terminationGracePeriodSeconds"] >= prestop + APP_DRAIN_SECONDS + drain
    if overlay.endswith("classic-sidecar"):
        delay = next(
            int(a.split("=")[1].rstrip("s"))
            for a in sidecar["args"]
            if a.startswith("--shutdown-delay=")
        )
        assert prestop == delay, "classic: the app is held as long as the sidecar serves on"


def test_inject_adds_the_app_prestop_raises_the_grace_period_and_adds_no_fsgroup() -> None:
    notes: list[str] = []
    injected = objects(inject((GOLDEN / "input.yaml").read_text(), InjectOptions(), notes))
    shop = next(o for o in injected if o["metadata"]["name"] == "shop")
    spec = shop["spec"]["template"]["spec"]
    assert spec["containers"][0]["lifecycle"]["preStop"] == {"sleep": {"seconds": 10}}
    assert spec["terminationGracePeriodSeconds"] == 50
    assert "securityContext" not in spec, "the pod's security context is left alone"
    db = next(o for o in injected if o["kind"] == "StatefulSet")
    assert db["spec"]["template"]["spec"]["securityContext"] == {"fsGroup": 2000}
    volume = next(v for v in spec["volumes"] if v["name"] == "tls-sidecar-certs")
    assert volume["secret"]["defaultMode"] == 0o444
    debug = next(o for o in injected if o["metadata"]["name"] == "debug")
    assert debug["spec"]["terminationGracePeriodSeconds"] == 120  # never lowered
    assert debug["spec"]["containers"][0]["lifecycle"]["preStop"] == {
        "exec": {"command": ["/bin/drain"]}
    }
    assert any("debug has a preStop already" in n for n in notes)
    assert any(
        "Deployment/shop: terminationGracePeriodSeconds raised from 30 to 50" in n for n in notes
    )
    classic = objects(inject((GOLDEN / "input.yaml").read_text(), InjectOptions(native=False)))
    shop = next(o for o in classic if o["metadata"]["name"] == "shop")
    app = shop["spec"]["template"]["spec"]["containers"][0]
    assert app["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "15"]}}
    assert shop["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 55


def test_the_prometheusrule_carries_exactly_the_plain_rules(rendered: dict[str, str]) -> None:
    rule = next(
        o
        for o in objects(rendered["deploy/kubernetes/overlays/prometheus"])
        if o["kind"] == "PrometheusRule"
    )
    plain = yaml.safe_load((PROMETHEUS / "alerts.yaml").read_text())
    assert rule["spec"]["groups"] == plain["groups"]
    alerts = [r for g in plain["groups"] for r in g["rules"]]
    assert len(alerts) == 7
    runbook = (REPO / "docs" / "runbook.md").read_text()
    for alert in alerts:
        annotations = alert["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(annotations), alert["alert"]
        assert (
            "$labels.pod" in annotations["description"] and "$value" in annotations["description"]
        )
        anchor = annotations["runbook_url"].split("#", 1)[1]
        heading = anchor.replace("-", " ")
        assert f"## {heading}" in runbook.lower(), f"docs/runbook.md has no section #{anchor}"


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool is missing: apt-get install prometheus"
)
def test_promtool_checks_the_rules_and_every_alert_fires_and_stays_silent_as_tested() -> None:
    check = subprocess.run(
        ["promtool", "check", "rules", "alerts.yaml"],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    tested = subprocess.run(
        ["promtool", "test", "rules", "alerts_test.yaml"],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    cases = yaml.safe_load((PROMETHEUS / "alerts_test.yaml").read_text())["tests"]
    # As real scrapes see them: no series before the pod's first scrape.
    for case in cases:
        for series in case["input_series"]:
            assert series["values"].startswith("_ "), (case["name"], series["series"])
    covered = {t["alertname"] for case in cases for t in case["alert_rule_test"] if t["exp_alerts"]}
    plain = yaml.safe_load((PROMETHEUS / "alerts.yaml").read_text())
    assert covered == {r["alert"] for g in plain["groups"] for r in g["rules"]}


def test_the_dashboard_ships_as_a_file_and_as_a_sidecar_configmap(
    rendered: dict[str, str],
) -> None:
    text = (OVERLAY / "tls-sidecar-dashboard.json").read_text()
    dashboard = json.loads(text)
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names[0] == "datasource" and dashboard["templating"]["list"][0]["type"] == "datasource"
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert len(rows) >= 5
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            assert all(t["expr"] for t in panel["targets"]), panel["title"]
    configmap = next(
        o
        for o in objects(rendered["deploy/kubernetes/overlays/prometheus"])
        if o["kind"] == "ConfigMap"
    )
    assert configmap["metadata"]["labels"] == {"grafana_dashboard": "1"}
    assert configmap["data"]["tls-sidecar-dashboard.json"] == text


def test_inject_rewires_services_reads_the_port_and_keeps_comments() -> None:
    notes: list[str] = []
    source = (GOLDEN / "input.yaml").read_text()
    result = inject(source, InjectOptions(), notes)
    plain = next(o for o in objects(result) if o["metadata"]["name"] == "shop-plain")
    assert plain["spec"]["ports"] == [{"name": "web", "port": 80, "targetPort": "https"}]
    assert any("Service/shop-plain: port 80 now goes to the sidecar" in n for n in notes)
    assert any("Service/shop: port 443 (targetPort 8443)" in n and "left alone" in n for n in notes)
    # Round trip: the changed documents keep their comments and flow style.
    assert (
        "readinessProbe: {httpGet: {path: /ready, port: 8080}}  # becomes the sidecar's health path"
        in result
    )
    assert "app: shop   # the Deployment's pods" in result
    assert "ports: [{containerPort: 8080}]" in result
    untouched = inject(source, InjectOptions(services=False))
    plain = next(o for o in objects(untouched) if o["metadata"]["name"] == "shop-plain")
    assert plain["spec"]["ports"][0]["targetPort"] == 8080


_COMMENTED = """\
# The shop's web front end. Owned by team-web.
apiVersion: apps/v1
kind: Deployment
metadata:
  name: shop   # keep in sync with the Service
  annotations: {owner: 'team-web', "tier": front}
spec:
  replicas: 2
  selector:
    matchLabels: {app: shop}
  template:
    metadata:
      labels: {app: shop}
    spec:
      containers:
        - name: web
          image: "ghcr.io/example/shop:1.4.2"
          env:
            - {name: GREETING, value: 'hello, world'}
          ports:
            - name: http
              containerPort: 3000
---
# Public entry point.
apiVersion: v1
kind: Service
metadata:
  name: shop
spec:
  selector: {app: shop}
  ports:
    - name: web
      port: 80
      targetPort: 3000
"""


def test_inject_diff_is_only_the_sidecar_quotes_and_comments_kept() -> None:
    """What a reviewer sees in a GitOps diff: every line of the input is still there, byte for
    byte (comments, quotes of both kinds, flow style), but the Service's rewired targetPort."""
    result = inject(_COMMENTED, InjectOptions())
    diff = difflib.ndiff(_COMMENTED.splitlines(), result.splitlines())
    removed = [line[2:] for line in diff if line.startswith("- ")]
    assert removed == ["      targetPort: 3000"]
    assert "      targetPort: https" in result


def test_inject_reads_the_app_port_or_asks_for_it() -> None:
    def deployment(ports: str) -> str:
        return (
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: two}\nspec:\n"
            "  selector: {matchLabels: {app: two}}\n  template:\n"
            "    metadata: {labels: {app: two}}\n    spec:\n"
            f"      containers: [{{name: two, image: two, ports: {ports}}}]\n"
        )

    ambiguous = deployment(
        "[{name: web, containerPort: 3000}, {name: metrics, containerPort: 9090}]"
    )
    with pytest.raises(InjectError, match=r"ports 3000 \(web\), 9090 \(metrics\).*--upstream-port"):
        inject(ambiguous, InjectOptions())
    assert "--upstream=http://127.0.0.1:9090" in inject(
        ambiguous, InjectOptions(upstream_port=9090)
    )
    named = deployment("[{name: http, containerPort: 5000}, {name: metrics, containerPort: 9090}]")
    assert "--upstream=http://127.0.0.1:5000" in inject(named, InjectOptions())
    single = deployment("[{containerPort: 4000}]")
    assert "--upstream=http://127.0.0.1:4000" in inject(single, InjectOptions())
