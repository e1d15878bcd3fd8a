"""The shipped artefacts, checked: Dockerfile (hadolint), kustomizations (render + Kubernetes
schemas for 1.29 and the newest version), and the `tls-sidecar inject` command (its function
is tested in tests/unit/test_inject.py)."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.commands.inject import inject
from proxy.commands.inject_sidecar import APP_DRAIN_SECONDS, InjectOptions
from tests.support import tools
from tests.support.manifests import VERSIONS, objects, sidecar_of, validate

REPO = Path(__file__).resolve().parents[2]
KUSTOMIZATIONS = sorted(
    p.parent for p in (REPO / "deploy" / "kubernetes").rglob("kustomization.yaml")
)
GOLDEN = REPO / "tests" / "golden" / "inject"
PROMETHEUS = REPO / "deploy" / "prometheus"
OVERLAY = REPO / "deploy" / "kubernetes" / "overlays" / "prometheus"


BUILD_SCRIPT = REPO / "deploy" / "image" / "build-root.sh"


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
    assert '"build-root.sh", "runtime", "harden"' in final.replace("/usr/local/sbin/", ""), (
        "the final stage installs libnghttp2, then removes pip and the shell"
    )
    runtime = BUILD_SCRIPT.read_text().split("\nruntime)")[1].split(";;")[0]
    assert "libnghttp2-14" in runtime and "-dev" not in runtime, "the runtime library only"
    build = text.split("\nFROM ")[1]
    assert '"build-root.sh", "build-tools"' in build.replace("/usr/local/sbin/", "")
    tools = BUILD_SCRIPT.read_text().split("\nbuild-tools)")[1].split(";;")[0]
    assert "gcc" in tools and "libnghttp2-dev" in tools
    harden = BUILD_SCRIPT.read_text().split("\nharden)")[1].split(";;")[0]
    assert "pip uninstall" in harden and "/bin/sh" in harden and "/usr/bin/sh" in harden
    assert "python:3.13-slim-trixie" in text


def test_the_base_image_is_pinned_by_digest_and_dependencies_have_their_own_layer() -> None:
    text = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE=(\S+)$", text, re.MULTILINE)
    assert base and re.fullmatch(r"python:3\.13-slim-trixie@sha256:[0-9a-f]{64}", base.group(1))
    assert [line for line in text.splitlines() if line.startswith("FROM ")] == [
        "FROM ${BASE} AS build",
        "FROM ${BASE}",
    ]
    build = text.split("\nFROM ")[1]
    # The lock is copied and installed before the source: a source change keeps that layer.
    assert (
        build.index("COPY requirements.lock")
        < build.index('"deps", "requirements.lock"')
        < build.index("COPY proxy")
        < build.index('"package", "/src"')
    )
    deps = BUILD_SCRIPT.read_text().split("\ndeps)")[1].split(";;")[0]
    assert "--require-hashes --no-deps -r" in deps and "--without-pip" in deps
    # the package is built from the locked build requirements, not pip's build isolation, and
    # they too have their own layer before the source
    assert (
        build.index('"deps", "requirements.lock"')
        < build.index("COPY build-requirements.lock")
        < build.index('"build-deps", "build-requirements.lock"')
        < build.index("COPY proxy")
    )
    script = BUILD_SCRIPT.read_text()
    assert "--require-hashes --no-deps -r" in script.split("\nbuild-deps)")[1].split(";;")[0]
    package = script.split("\npackage)")[1].split(";;")[0]
    assert "--no-build-isolation" in package and "--check-build-dependencies" in package


def _pins(lock: str) -> dict[str, str]:
    """A lock file's `name==version` pins (pip-compile's layout: each followed by its hashes)."""
    return dict(re.findall(r"^([a-z0-9_.-]+)==(\S+) \\$", lock, re.MULTILINE))


@pytest.mark.parametrize(
    ("lock_name", "table", "key"),
    [
        ("requirements.lock", "project", "dependencies"),
        ("build-requirements.lock", "build-system", "requires"),
    ],
)
def test_the_lock_files_pin_every_requirement_of_pyproject_with_hashes(
    lock_name: str, table: str, key: str
) -> None:
    """requirements.lock and build-requirements.lock (pip-compile --generate-hashes, `make lock`)
    match pyproject: each dependency (of the package, of its build) is pinned at a version its
    specifier allows, and every pin has hashes."""
    from packaging.requirements import Requirement  # noqa: PLC0415

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    lock = (REPO / lock_name).read_text()
    pins = _pins(lock)
    assert pins, f"no pins in {lock_name}"
    for line in pyproject[table][key]:
        requirement = Requirement(line)
        name = re.sub(r"[-_.]+", "-", requirement.name.lower())  # PEP 503
        assert name in pins, f"{name} is not in {lock_name}: run make lock"
        assert requirement.specifier.contains(pins[name]), (
            f"{lock_name} pins {name}=={pins[name]}, pyproject wants {requirement.specifier}: "
            "run make lock"
        )
    blocks = re.split(r"\n(?=[a-z0-9_.-]+==)", lock)  # the header has no `==` line
    for block in blocks:
        if "==" in block:
            assert "--hash=sha256:" in block, block.splitlines()[0]
    assert "/opt/" not in lock and "/tmp/" not in lock and "--find-links" not in lock


def test_the_two_locks_pin_the_packages_they_share_at_one_version() -> None:
    """The dev constraints hold both locks' pins: two versions of one package would stop pip."""
    runtime = _pins((REPO / "requirements.lock").read_text())
    build = _pins((REPO / "build-requirements.lock").read_text())
    shared = runtime.keys() & build.keys()
    assert {
        name: (runtime[name], build[name]) for name in shared if runtime[name] != build[name]
    } == {}


def test_the_type_checker_is_the_mypy_that_compiles_the_core() -> None:
    """`make typecheck` runs the mypy whose mypyc builds the compiled core (the build lock's)."""
    pinned = _pins((REPO / "build-requirements.lock").read_text()).get("mypy")
    assert pinned, "mypy is not in build-requirements.lock: run make lock"
    assert importlib.metadata.version("mypy") == pinned


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    return {str(folder.relative_to(REPO)): tools.kustomize(folder) for folder in KUSTOMIZATIONS}


def test_every_kustomization_renders_and_validates(rendered: dict[str, str]) -> None:
    assert set(rendered) == {
        "deploy/kubernetes/base",
        "deploy/kubernetes/overlays/cert-manager",
        "deploy/kubernetes/overlays/prometheus",
        "deploy/kubernetes/overlays/classic-sidecar",
        "deploy/kubernetes/overlays/grpc",
        "deploy/kubernetes/overlays/spiffe",
        "deploy/kubernetes/overlays/spiffe-hostpath",
    }
    counts = {}
    for name, text in rendered.items():
        found = objects(text)
        counts[name] = len(found)
        for obj in found:
            validate(obj)
    print(f"\nrendered objects: {counts}; schemas: {VERSIONS}")


def test_the_grpc_example_reaches_its_app_over_h2c(rendered: dict[str, str]) -> None:
    grpc = next(
        o for o in objects(rendered["deploy/kubernetes/overlays/grpc"]) if o["kind"] == "Deployment"
    )
    _, sidecar = sidecar_of(grpc)
    assert "--upstream=h2c://127.0.0.1:9000" in sidecar["args"]
    [app] = grpc["spec"]["template"]["spec"]["containers"]
    assert app["ports"] == [{"name": "grpc", "containerPort": 9000}]
    assert not any(a.startswith("--no-http2") for a in sidecar["args"])  # h2 is on by default
    # The overlay patches the base's app, it does not replace it: the preStop that holds the
    # app while endpoints drop the pod (no 502s during a rollout) and its hardening stay.
    base = next(o for o in objects(rendered["deploy/kubernetes/base"]) if o["kind"] == "Deployment")
    [base_app] = base["spec"]["template"]["spec"]["containers"]
    assert app["lifecycle"] == base_app["lifecycle"]
    assert app["securityContext"] == base_app["securityContext"]
    assert "args" not in app, "grpcbin takes no flags"


@pytest.mark.parametrize(
    ("overlay", "source"),
    [
        (
            "deploy/kubernetes/overlays/spiffe",
            {"csi": {"driver": "csi.spiffe.io", "readOnly": True}},
        ),
        (
            "deploy/kubernetes/overlays/spiffe-hostpath",
            {"hostPath": {"path": "/run/spire/sockets", "type": "Directory"}},
        ),
    ],
)
def test_the_spiffe_overlays_mount_the_agent_socket_the_sidecar_is_pointed_at(
    rendered: dict[str, str], overlay: str, source: dict[str, Any]
) -> None:
    deployment = next(o for o in objects(rendered[overlay]) if o["kind"] == "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    _, sidecar = sidecar_of(deployment)
    endpoint = next(a for a in sidecar["args"] if a.startswith("--spiffe-endpoint="))
    socket = endpoint.split("=", 1)[1].removeprefix("unix://")
    mount = next(m for m in sidecar["volumeMounts"] if socket.startswith(m["mountPath"] + "/"))
    assert mount.get("readOnly") is True
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert {k: v for k, v in volume.items() if k != "name"} == source
    assert not any(a.startswith(("--cert", "--key")) for a in sidecar["args"])
    assert all("secret" not in v for v in spec["volumes"]), "no Secret is left to mount"


def test_every_image_of_the_manifests_is_pinned(rendered: dict[str, str]) -> None:
    """A version tag or a digest, never `latest` or no tag: every pod runs the same build."""
    for name, text in rendered.items():
        for obj in objects(text):
            if obj["kind"] != "Deployment":
                continue
            spec = obj["spec"]["template"]["spec"]
            for container in spec["containers"] + (spec.get("initContainers") or []):
                image = container["image"]
                tag = image.rsplit("/", 1)[-1].partition(":")[2]
                assert "@sha256:" in image or tag not in ("", "latest"), (name, image)


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
    "overlay",
    [
        "deploy/kubernetes/base",
        "deploy/kubernetes/overlays/classic-sidecar",
        "deploy/kubernetes/overlays/grpc",
        "deploy/kubernetes/overlays/spiffe",
    ],
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


def test_the_prometheusrule_carries_exactly_the_plain_rules(rendered: dict[str, str]) -> None:
    rule = next(
        o
        for o in objects(rendered["deploy/kubernetes/overlays/prometheus"])
        if o["kind"] == "PrometheusRule"
    )
    plain = yaml.safe_load((PROMETHEUS / "alerts.yaml").read_text())
    assert rule["spec"]["groups"] == plain["groups"]
    alerts = [r for g in plain["groups"] for r in g["rules"]]
    assert len(alerts) == 8
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


@pytest.mark.needs("promtool", install="apt-get install prometheus")
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


def test_the_grace_periods_in_deploy_readme_are_the_manifests(rendered: dict[str, str]) -> None:
    """deploy/README.md states terminationGracePeriodSeconds in prose and two tables: each figure
    is the one the native base and the classic overlay render."""

    def grace(overlay: str) -> int:
        deployment = next(o for o in objects(rendered[overlay]) if o["kind"] == "Deployment")
        return int(deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])

    native = grace("deploy/kubernetes/base")
    classic = grace("deploy/kubernetes/overlays/classic-sidecar")
    text = (REPO / "deploy" / "README.md").read_text()
    stated = re.findall(r"terminationGracePeriodSeconds: (\d+)`?(?: \((\d+) classic\))?", text)
    assert stated, "deploy/README.md names no grace period"
    for figure, classic_figure in stated:
        assert int(figure) == native and int(classic_figure or classic) == classic, stated
    assert re.findall(r"= \*\*(\d+)\*\*", text) == [str(native), str(classic)]
