"""The sidecar container `inject` adds, and the options and timings that shape it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy import __version__
from proxy.config import ConfigError

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


class InjectError(ConfigError):
    """The input cannot be injected; the message names the document and the fix."""


DEFAULT_IMAGE = f"tls-sidecar:{__version__}"
DEFAULT_SECRET = "tls"  # noqa: S105  (the name of a Kubernetes Secret, not a password)


@dataclass(frozen=True, slots=True)
class InjectOptions:
    image: str = DEFAULT_IMAGE
    secret: str = DEFAULT_SECRET
    native: bool = True
    upstream_port: int | None = None  # None: read from the app container (default 8080)
    services: bool = True  # rewrite Services of the input that target the app's port


def sidecar_container(options: InjectOptions, port: int = 8080) -> dict[str, Any]:
    args = [
        "serve",
        "--cert=/etc/tls/tls.crt",
        "--key=/etc/tls/tls.key",
        f"--upstream=http://127.0.0.1:{port}",
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
            # The kubelet's default timeout is 1s; the base's 2s leaves room on a busy node
            # before a slow answer counts as a failure (and a liveness failure restarts).
            "livenessProbe": {
                "httpGet": {"path": "/livez", "port": "admin"},
                "periodSeconds": 10,
                "timeoutSeconds": 2,
            },
            "readinessProbe": {
                "httpGet": {"path": "/readyz", "port": "admin"},
                "periodSeconds": 5,
                "timeoutSeconds": 2,
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


def grace_needed(native: bool) -> int:
    """terminationGracePeriodSeconds that covers the app's preStop, its drain and the
    sidecar's --drain-timeout (classic: the preStop is as long as --shutdown-delay)."""
    return PRESTOP_SECONDS[native] + APP_DRAIN_SECONDS + DRAIN_TIMEOUT_SECONDS


def app_prestop(native: bool) -> dict[str, Any]:
    """Native sidecars need Kubernetes 1.29+, where the `sleep` action exists (beta and on by
    default from 1.30); the classic layout is for older clusters, which have only `exec`, so it
    runs `sleep` from the app's image (no shell needed, but a `sleep` binary: an image without
    one, e.g. distroless, needs its own preStop; the note says so)."""
    seconds = PRESTOP_SECONDS[native]
    if native:
        return {"sleep": {"seconds": seconds}}
    return {"exec": {"command": ["sleep", str(seconds)]}}
