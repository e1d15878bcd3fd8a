"""`tls-sidecar inject`: add the sidecar to Kubernetes workloads in YAML (pure: text in, text out).

Documents that need no change are passed through byte for byte (comments and all); changed ones
are re-serialised. A second run changes nothing.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from . import __version__
from .config import ConfigError

SIDECAR = "tls-sidecar"
CERT_VOLUME = "tls-sidecar-certs"
TMP_VOLUME = "tls-sidecar-tmp"
RESERVED_PORTS = (8443, 9901)
SIDECAR_UID = 65532
# The termination arithmetic (deploy/README.md): the app's preStop holds it while endpoints
# drop the pod, the app drains, then the sidecar drains within --drain-timeout.
PRESTOP_SECONDS = {True: 10, False: 15}  # native; classic (= its --shutdown-delay)
APP_DRAIN_SECONDS = 10
DRAIN_TIMEOUT_SECONDS = 30
DEFAULT_GRACE_SECONDS = 30  # Kubernetes' default terminationGracePeriodSeconds

# kind -> path from the document to its pod spec
POD_SPEC_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}

_DOCUMENT_SEPARATOR = re.compile(r"^---[ \t]*(?:#.*)?$", re.MULTILINE)


class InjectError(ConfigError):
    """The input cannot be injected; the message names the document and the fix."""


DEFAULT_IMAGE = f"tls-sidecar:{__version__}"
DEFAULT_SECRET = "tls"  # noqa: S105  (the name of a Kubernetes Secret, not a password)


@dataclass(frozen=True, slots=True)
class InjectOptions:
    image: str = DEFAULT_IMAGE
    secret: str = DEFAULT_SECRET
    native: bool = True
    upstream_port: int = 8080


def sidecar_container(options: InjectOptions) -> dict[str, Any]:
    args = [
        "serve",
        "--cert=/etc/tls/tls.crt",
        "--key=/etc/tls/tls.key",
        f"--upstream=http://127.0.0.1:{options.upstream_port}",
    ]
    container: dict[str, Any] = {
        "name": SIDECAR,
        "image": options.image,
    }
    if options.native:
        container["restartPolicy"] = "Always"
    else:
        args.append("--shutdown-delay=15s")
    container.update(
        {
            "args": args,
            # The base's names: the shipped PodMonitor scrapes `admin`, Services target `https`.
            "ports": [
                {"name": "https", "containerPort": 8443},
                {"name": "admin", "containerPort": 9901},
            ],
            "startupProbe": {
                "httpGet": {"path": "/livez", "port": "admin"},
                "periodSeconds": 1,
                "failureThreshold": 30,
            },
            "livenessProbe": {"httpGet": {"path": "/livez", "port": "admin"}, "periodSeconds": 10},
            "readinessProbe": {
                "httpGet": {"path": "/readyz", "port": "admin"},
                "periodSeconds": 5,
            },
            "resources": {
                "requests": {"cpu": "100m", "memory": "64Mi"},
                "limits": {"cpu": "1", "memory": "256Mi"},
            },
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": SIDECAR_UID,
                "runAsGroup": SIDECAR_UID,
                "readOnlyRootFilesystem": True,
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "volumeMounts": [
                {"name": CERT_VOLUME, "mountPath": "/etc/tls", "readOnly": True},
                {"name": TMP_VOLUME, "mountPath": "/tmp"},  # noqa: S108  (a private emptyDir)
            ],
        }
    )
    return container


def _where(kind: str, doc: dict[str, Any]) -> str:
    name = (doc.get("metadata") or {}).get("name", "?")
    return f"{kind}/{name}"


def _readiness_path(container: dict[str, Any]) -> str | None:
    probe = container.get("readinessProbe") or {}
    path = (probe.get("httpGet") or {}).get("path")
    return path if isinstance(path, str) and path.startswith("/") else None


def grace_needed(native: bool) -> int:
    """terminationGracePeriodSeconds that covers the app's preStop, its drain and the
    sidecar's --drain-timeout (classic: the preStop is as long as --shutdown-delay)."""
    return PRESTOP_SECONDS[native] + APP_DRAIN_SECONDS + DRAIN_TIMEOUT_SECONDS


def app_prestop(native: bool) -> dict[str, Any]:
    """Native sidecars need Kubernetes 1.29+, where the `sleep` action exists (beta and on by
    default from 1.30); the classic layout is for older clusters, so it uses `sleep` in the
    app's image (an image without one needs its own preStop)."""
    seconds = PRESTOP_SECONDS[native]
    if native:
        return {"sleep": {"seconds": seconds}}
    return {"exec": {"command": ["sleep", str(seconds)]}}


def inject_pod_spec(
    spec: dict[str, Any], options: InjectOptions, where: str, notes: list[str] | None = None
) -> bool:
    """Add the sidecar to one pod spec; False when it is there already."""
    notes = notes if notes is not None else []
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        raise InjectError(f"{where}: the pod spec has no containers")
    present = [c.get("name") for c in containers + (spec.get("initContainers") or [])]
    if SIDECAR in present:
        return False
    for container in containers + (spec.get("initContainers") or []):
        for port in container.get("ports") or []:
            if port.get("containerPort") in RESERVED_PORTS:
                raise InjectError(
                    f"{where}: container {container.get('name')} already uses port "
                    f"{port['containerPort']}; tls-sidecar needs 8443 and 9901 (move the app's port)"
                )
    sidecar = sidecar_container(options)
    health = _readiness_path(containers[0])
    if health is not None:
        # The app's own readiness endpoint becomes the sidecar's: ready only when the app is.
        sidecar["args"].append(f"--upstream-health-path={health}")
    for container in containers:
        # The app is held while endpoints drop the pod, so no request reaches it after it
        # stopped accepting (the window every rollout has).
        lifecycle = container.setdefault("lifecycle", {})
        if "preStop" in lifecycle:
            notes.append(
                f"{where}: container {container.get('name')} has a preStop already; kept as "
                f"it is (it should last at least {PRESTOP_SECONDS[options.native]}s while "
                "endpoints drop the pod)"
            )
        else:
            lifecycle["preStop"] = app_prestop(options.native)
    needed = grace_needed(options.native)
    grace = spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS)
    if isinstance(grace, int) and grace < needed:
        spec["terminationGracePeriodSeconds"] = needed
        notes.append(
            f"{where}: terminationGracePeriodSeconds raised from {grace} to {needed} (preStop "
            f"{PRESTOP_SECONDS[options.native]}s + app drain {APP_DRAIN_SECONDS}s + sidecar "
            f"drain {DRAIN_TIMEOUT_SECONDS}s)"
        )
    if options.native:
        spec["initContainers"] = [sidecar, *(spec.get("initContainers") or [])]
    else:
        containers.append(sidecar)
    volumes = spec.setdefault("volumes", [])
    names = {v.get("name") for v in volumes}
    if CERT_VOLUME not in names:
        # Readable by the sidecar's user without touching the pod's securityContext (no
        # fsGroup): only the sidecar mounts this volume, so no other container sees the key.
        volumes.append(
            {"name": CERT_VOLUME, "secret": {"secretName": options.secret, "defaultMode": 0o444}}
        )
    if TMP_VOLUME not in names:
        volumes.append({"name": TMP_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}})
    return True


def inject_object(
    doc: dict[str, Any], options: InjectOptions, where: str, notes: list[str] | None = None
) -> bool:
    kind = doc.get("kind")
    if kind == "List":
        changed = False
        for index, item in enumerate(doc.get("items") or []):
            if not isinstance(item, dict) or "kind" not in item:
                raise InjectError(f"{where}: item {index} is not a Kubernetes object")
            changed |= inject_object(item, options, f"{where} item {index}", notes)
        return changed
    path = POD_SPEC_PATHS.get(str(kind))
    if path is None:
        return False  # a Service, ConfigMap, ...: left alone
    spec: Any = doc
    for key in path:
        spec = spec.get(key) if isinstance(spec, dict) else None
    if not isinstance(spec, dict):
        raise InjectError(f"{_where(str(kind), doc)}: no pod spec at {'.'.join(path)}")
    return inject_pod_spec(spec, options, _where(str(kind), doc), notes)


def split_documents(text: str) -> list[str]:
    """The YAML stream's documents as text, separators dropped (a leading '---' too)."""
    parts = _DOCUMENT_SEPARATOR.split(text)
    return [p for i, p in enumerate(parts) if p.strip() or 0 < i < len(parts) - 1]


def inject(text: str, options: InjectOptions, notes: list[str] | None = None) -> str:
    """The injected YAML; what the user should know (a kept preStop, a raised grace period) is
    appended to `notes`."""
    import yaml  # noqa: PLC0415  (loaded by `inject` only, not by `serve`)

    out: list[str] = []
    for number, part in enumerate(split_documents(text), start=1):
        try:
            doc = yaml.safe_load(part)
        except yaml.YAMLError as e:
            raise InjectError(f"document {number} is not valid YAML: {e}".splitlines()[0]) from None
        if doc is None:
            continue
        if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
            raise InjectError(
                f"document {number} is not a Kubernetes object (no apiVersion/kind); "
                "give manifests, e.g. kubectl get deploy web -o yaml | tls-sidecar inject"
            )
        changed_doc = copy.deepcopy(doc)
        if inject_object(changed_doc, options, f"document {number} ({doc['kind']})", notes):
            out.append(yaml.safe_dump(changed_doc, sort_keys=False, default_flow_style=False))
        else:
            out.append(part.strip("\n") + "\n")
    return "---\n".join(out)
