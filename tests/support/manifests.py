"""Kubernetes manifests as the tests read them: the objects of a YAML stream (a `List`'s items
too), checked against the Kubernetes schemas, and the sidecar container of a workload."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import yaml

VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
# Custom resources have no schema in kubernetes-validate; they are checked by shape only.
CUSTOM_KINDS = {
    ("cert-manager.io/v1", "Issuer"),
    ("cert-manager.io/v1", "Certificate"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}


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


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]
    if workload["kind"] == "Pod":
        return spec
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return dict(spec["template"]["spec"])


def sidecar_of(workload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    spec = pod_spec(workload)
    for where in ("initContainers", "containers"):
        for container in spec.get(where) or []:
            if container["name"] == "tls-sidecar":
                return where, container
    raise AssertionError("no tls-sidecar container")
