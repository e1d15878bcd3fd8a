"""`inject()` as a function, text in and text out: the golden files, the notes, the round trip
of comments and quotes, and what it refuses. The CLI around it is tested in
tests/e2e/test_deploy.py."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import pytest
import yaml

from proxy.inject import InjectError, InjectOptions, inject
from tests.support.manifests import objects, validate

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
