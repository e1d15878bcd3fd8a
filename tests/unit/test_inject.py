"""`inject()` as a function, text in and text out: the golden files, the notes, the round trip
of comments and quotes, and what it refuses. The CLI around it is tested in
tests/e2e/test_deploy.py."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.commands.inject import inject
from proxy.commands.inject_sidecar import InjectError, InjectOptions
from tests.support.manifests import objects, pod_spec, sidecar_of, validate

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "inject"


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


def _workload(containers: str, kind: str = "Deployment", name: str = "web") -> str:
    return (
        f"apiVersion: apps/v1\nkind: {kind}\nmetadata: {{name: {name}}}\nspec:\n"
        f"  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n"
        f"    metadata: {{labels: {{app: {name}}}}}\n    spec:\n"
        f"      containers:\n{containers}"
    )


_WEB = "        - {name: web, image: web, ports: [{name: http, containerPort: 8080}]}\n"


def _pod_spec(result: str, name: str = "web") -> dict[str, Any]:
    workload = next(o for o in objects(result) if o["metadata"]["name"] == name)
    return pod_spec(workload)


def test_services_inside_a_list_are_rewired() -> None:
    """`kubectl get deploy,svc -o yaml` prints one List holding both."""
    listed = """\
apiVersion: v1
kind: List
items:
  - apiVersion: apps/v1
    kind: Deployment
    metadata: {name: web}
    spec:
      selector: {matchLabels: {app: web}}
      template:
        metadata: {labels: {app: web}}
        spec:
          containers: [{name: web, image: web, ports: [{containerPort: 8080}]}]
  - apiVersion: v1
    kind: Service
    metadata: {name: web}
    spec:
      selector: {app: web}
      ports: [{name: web, port: 80, targetPort: 8080}]
"""
    notes: list[str] = []
    result = inject(listed, InjectOptions(), notes)
    service = next(o for o in objects(result) if o["kind"] == "Service")
    assert service["spec"]["ports"] == [{"name": "web", "port": 80, "targetPort": "https"}]
    assert any("Service/web: port 80 now goes to the sidecar" in n for n in notes)
    assert inject(result, InjectOptions()) == result


def test_a_header_comment_and_a_comment_before_a_separator_stay_where_they_were() -> None:
    source = (
        "# Rendered for prod; owned by team-web.\n---\n"
        + _workload(_WEB)
        + "# The ConfigMap the app reads.\n---\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web}\n"
    )
    result = inject(source, InjectOptions())
    assert result.startswith("# Rendered for prod; owned by team-web.\n---\napiVersion: apps/v1\n")
    assert "\n# The ConfigMap the app reads.\n---\napiVersion: v1\nkind: ConfigMap\n" in result
    assert inject(result, InjectOptions()) == result


def test_the_secret_volume_mode_is_written_in_octal() -> None:
    result = inject(_workload(_WEB), InjectOptions())
    assert "defaultMode: 0444\n" in result
    volume = next(v for v in _pod_spec(result)["volumes"] if v["name"] == "tls-sidecar-certs")
    assert volume["secret"]["defaultMode"] == 0o444  # as Kubernetes reads YAML 1.1


def test_only_the_app_container_the_sidecar_fronts_gets_the_prestop() -> None:
    shipper = "        - {name: logs, image: fluent-bit}\n"
    spec = _pod_spec(inject(_workload(_WEB + shipper), InjectOptions()))
    web, logs = spec["containers"]
    assert web["lifecycle"]["preStop"] == {"sleep": {"seconds": 10}}
    assert "lifecycle" not in logs
    # The app is the container that declares --upstream-port, wherever it is in the list.
    second = shipper + "        - {name: api, image: api, ports: [{containerPort: 3000}]}\n"
    spec = _pod_spec(inject(_workload(second), InjectOptions(upstream_port=3000)))
    logs, api = spec["containers"][:2]
    assert api["lifecycle"]["preStop"] == {"sleep": {"seconds": 10}}
    assert "lifecycle" not in logs


def test_the_classic_prestop_says_it_needs_sleep_in_the_app_image() -> None:
    notes: list[str] = []
    spec = _pod_spec(inject(_workload(_WEB), InjectOptions(native=False), notes))
    assert spec["containers"][0]["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "15"]}}
    assert any("needs a `sleep` program" in n and "distroless" in n for n in notes)
    notes.clear()
    inject(_workload(_WEB), InjectOptions(), notes)
    assert not any("sleep` program" in n for n in notes), "the native sleep action needs none"


def test_the_sidecar_probes_have_a_timeout() -> None:
    _, sidecar = sidecar_of(objects(inject(_workload(_WEB), InjectOptions()))[0])
    assert sidecar["livenessProbe"]["timeoutSeconds"] == 2
    assert sidecar["readinessProbe"]["timeoutSeconds"] == 2


def _service(ports: str, name: str = "web") -> str:
    return (
        f"---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n"
        f"spec:\n  selector: {{app: web}}\n  ports: {ports}\n"
    )


def test_a_service_port_named_http_that_now_carries_tls_is_renamed() -> None:
    notes: list[str] = []
    source = _workload(_WEB) + _service(
        "[{name: http, port: 80, targetPort: http, appProtocol: http}]"
    )
    result = inject(source, InjectOptions(), notes)
    service = next(o for o in objects(result) if o["kind"] == "Service")
    assert service["spec"]["ports"] == [
        {"name": "https", "port": 80, "targetPort": "https", "appProtocol": "https"}
    ]
    assert any("renamed http -> https" in n for n in notes)
    assert inject(result, InjectOptions()) == result


def test_a_service_port_name_something_uses_is_kept_with_a_note() -> None:
    ingress = (
        "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: web}\nspec:\n"
        "  defaultBackend: {service: {name: web, port: {name: http-web}}}\n"
    )
    notes: list[str] = []
    source = _workload(_WEB) + _service("[{name: http-web, port: 80, targetPort: 8080}]")
    result = inject(source + ingress, InjectOptions(), notes)
    service = next(o for o in objects(result) if o["kind"] == "Service")
    assert service["spec"]["ports"][0]["name"] == "http-web"
    [note] = [n for n in notes if "still named http-web" in n]
    assert "Ingress/web uses that name" in note and "backend-protocol: HTTPS" in note
    # A name the Service already uses is not taken twice.
    taken = "[{name: http, port: 80, targetPort: 8080}, {name: https, port: 443, targetPort: 8443}]"
    result = inject(_workload(_WEB) + _service(taken), InjectOptions(), notes)
    service = next(o for o in objects(result) if o["kind"] == "Service")
    assert [p["name"] for p in service["spec"]["ports"]] == ["http", "https"]
    assert any("another port of Service/web uses that name" in n for n in notes)


def test_loopback_is_advised_only_when_no_probe_of_the_kubelet_needs_the_pod_ip() -> None:
    """The kubelet probes the pod's IP: an app told to listen on 127.0.0.1 would fail its own
    probes (and liveness would restart it), so inject says so instead of advising loopback."""
    probed = (
        "        - name: web\n          image: web\n"
        "          ports: [{name: http, containerPort: 8080}]\n"
        "          livenessProbe: {httpGet: {path: /healthz, port: http}}\n"
        "          readinessProbe: {tcpSocket: {port: 8080}}\n"
    )
    notes: list[str] = []
    inject(_workload(probed), InjectOptions(), notes)
    assert not any("listen on 127.0.0.1:8080 only" in n for n in notes)
    [note] = [n for n in notes if "livenessProbe, readinessProbe reach container web" in n]
    assert "not on 127.0.0.1 only, or they fail" in note and "NetworkPolicy" in note
    notes.clear()
    inject(_workload(_WEB), InjectOptions(), notes)
    assert any("make container web listen on 127.0.0.1:8080 only" in n for n in notes)
    assert not any("reach container web" in n for n in notes)


def test_a_readiness_probe_on_another_port_is_not_the_apps_health_path() -> None:
    management = (
        "        - name: web\n          image: web\n"
        "          ports: [{name: http, containerPort: 8080}, {name: mgmt, containerPort: 8081}]\n"
        "          readinessProbe: {httpGet: {path: /actuator/health, port: mgmt}}\n"
    )
    notes: list[str] = []
    result = inject(_workload(management), InjectOptions(), notes)
    _, sidecar = sidecar_of(objects(result)[0])
    assert not any(a.startswith("--upstream-health-path") for a in sidecar["args"])
    assert any("make container web listen on 127.0.0.1:8080 only" in n for n in notes)
