"""`tls-sidecar inject`: add the sidecar to Kubernetes workloads in YAML (pure: text in, text out).

Documents that need no change are passed through byte for byte (comments and all); changed ones
are re-serialised. A second run changes nothing.
"""

from __future__ import annotations

import io
import sys
from typing import Any

import click

from proxy.commands.inject_services import (
    Injected,
    objects_of,
    port_name_references,
    rewire_service,
    where_of,
)
from proxy.commands.inject_sidecar import (
    APP_DRAIN_SECONDS,
    CERT_VOLUME,
    DEFAULT_GRACE_SECONDS,
    DEFAULT_IMAGE,
    DEFAULT_SECRET,
    DRAIN_TIMEOUT_SECONDS,
    PRESTOP_SECONDS,
    RESERVED_PORTS,
    SIDECAR,
    TMP_VOLUME,
    InjectError,
    InjectOptions,
    app_prestop,
    grace_needed,
    sidecar_container,
)
from proxy.commands.inject_yaml import (
    OctalMode,
    mapping_indent,
    represent_octal_mode,
    round_trip,
    split_documents,
    trailing_comments,
)
from proxy.options import CONTEXT

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

PROBES = ("livenessProbe", "readinessProbe", "startupProbe")


def _readiness_path(container: dict[str, Any], port: int, port_name: str | None) -> str | None:
    """The path of the app's HTTP readiness probe on the port the sidecar forwards to (one on
    another port, e.g. a management port, says nothing about that one)."""
    get = (container.get("readinessProbe") or {}).get("httpGet") or {}
    path = get.get("path")
    if get.get("port") not in (port, port_name):
        return None
    return path if isinstance(path, str) and path.startswith("/") else None


def app_container(containers: list[dict[str, Any]], options: InjectOptions) -> dict[str, Any]:
    """The container the sidecar fronts: the one declaring --upstream-port, else the first
    (a log shipper or another container beside it is not the app)."""
    if options.upstream_port is not None:
        for container in containers:
            ports = container.get("ports") or []
            if any(p.get("containerPort") == options.upstream_port for p in ports):
                return container
    return containers[0]


def probes_on_port(container: dict[str, Any], port: int, port_name: str | None) -> list[str]:
    """The container's own probes that the kubelet sends to the app's port (HTTP, TCP or gRPC):
    they reach it at the pod's IP, so they fail if the app listens on 127.0.0.1 only."""
    found = []
    for kind in PROBES:
        probe = container.get(kind) or {}
        for handler in ("httpGet", "tcpSocket", "grpc"):
            target = probe.get(handler)
            if isinstance(target, dict) and target.get("port") in (port, port_name):
                found.append(kind)
    return found


def app_port(
    container: dict[str, Any], options: InjectOptions, where: str
) -> tuple[int, str | None]:
    """The port the app serves on: --upstream-port, else its container's single port or the
    one named `http`; (port, its name)."""
    ports = [p for p in container.get("ports") or [] if isinstance(p.get("containerPort"), int)]
    if options.upstream_port is not None:
        named = next(
            (p.get("name") for p in ports if p["containerPort"] == options.upstream_port), None
        )
        return options.upstream_port, named
    if len(ports) == 1:
        return ports[0]["containerPort"], ports[0].get("name")
    http = [p for p in ports if p.get("name") == "http"]
    if len(http) == 1:
        return http[0]["containerPort"], "http"
    if not ports:
        return 8080, None
    choices = ", ".join(
        f"{p['containerPort']}" + (f" ({p['name']})" if p.get("name") else "") for p in ports
    )
    raise InjectError(
        f"{where}: container {container.get('name')} has ports {choices} and none is named "
        "http; say which one the app serves on with --upstream-port"
    )


def _block(seq: Any) -> Any:
    """A sequence the sidecar goes into is written in block style (a flow-style one would put
    the whole container on one line)."""
    fa = getattr(seq, "fa", None)
    if fa is not None:
        fa.set_block_style()
    return seq


def inject_pod_spec(
    spec: dict[str, Any],
    options: InjectOptions,
    where: str,
    notes: list[str] | None = None,
    found: list[tuple[int, str | None]] | None = None,
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
    app = app_container(containers, options)
    name = app.get("name")
    port, port_name = app_port(app, options, where)
    if found is not None:
        found.append((port, port_name))
    probed = probes_on_port(app, port, port_name)
    health = _readiness_path(app, port, port_name)
    if probed:
        # The kubelet probes the pod's IP: an app on 127.0.0.1 only would fail these probes
        # (a liveness failure restarts it), so inject does not advise that here.
        hint = (
            f"; its readiness already reaches the sidecar's /readyz (--upstream-health-path="
            f"{health}): without probes of its own on port {port} the app could listen on "
            "127.0.0.1 only"
            if health is not None
            else ""
        )
        notes.append(
            f"{where}: the app's {', '.join(probed)} reach container {name} on port {port} at "
            "the pod's IP (the kubelet's plaintext, inside the node): keep the app listening "
            "there, not on 127.0.0.1 only, or they fail; other pods can then reach port "
            f"{port} without TLS too: admit only port 8443 (https) with a NetworkPolicy{hint}"
        )
    else:
        notes.append(
            f"{where}: make container {name} listen on 127.0.0.1:{port} only (the sidecar's "
            "upstream): on the pod's IP other pods could reach it without TLS"
        )
    sidecar = sidecar_container(options, port)
    if health is not None:
        # The app's own readiness endpoint becomes the sidecar's: ready only when the app is.
        sidecar["args"].append(f"--upstream-health-path={health}")
    # Only the app is held while endpoints drop the pod, so no request reaches it after it
    # stopped accepting (the window every rollout has); other containers (a log shipper) stop
    # as they always did.
    lifecycle = app.setdefault("lifecycle", {})
    if "preStop" in lifecycle:
        notes.append(
            f"{where}: container {name} has a preStop already; kept as it is (it should last "
            f"at least {PRESTOP_SECONDS[options.native]}s while endpoints drop the pod)"
        )
    else:
        lifecycle["preStop"] = app_prestop(options.native)
        if not options.native:
            notes.append(
                f"{where}: container {name} gets preStop exec [sleep, "
                f"{PRESTOP_SECONDS[options.native]}]: its image needs a `sleep` program "
                "(distroless images have none: the hook fails and the app stops at once, "
                "with 502s during rollouts); give it a preStop of its own, or on Kubernetes "
                "1.30+ use `preStop: {sleep: {seconds: 15}}`"
            )
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
        if spec.get("initContainers"):
            _block(spec["initContainers"]).insert(0, sidecar)
        else:
            spec["initContainers"] = [sidecar]
    else:
        _block(containers).append(sidecar)
    volumes = _block(spec.setdefault("volumes", []))
    names = {v.get("name") for v in volumes}
    if CERT_VOLUME not in names:
        # Readable by the sidecar's user without touching the pod's securityContext (no
        # fsGroup): only the sidecar mounts this volume, so no other container sees the key.
        volumes.append(
            {
                "name": CERT_VOLUME,
                "secret": {"secretName": options.secret, "defaultMode": OctalMode(0o444)},
            }
        )
    if TMP_VOLUME not in names:
        volumes.append({"name": TMP_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}})
    return True


def inject_object(
    doc: dict[str, Any],
    options: InjectOptions,
    where: str,
    notes: list[str] | None = None,
    injected: list[Injected] | None = None,
) -> bool:
    kind = doc.get("kind")
    if kind == "List":
        changed = False
        for index, item in enumerate(doc.get("items") or []):
            if not isinstance(item, dict) or "kind" not in item:
                raise InjectError(f"{where}: item {index} is not a Kubernetes object")
            changed |= inject_object(item, options, f"{where} item {index}", notes, injected)
        return changed
    path = POD_SPEC_PATHS.get(str(kind))
    if path is None:
        return False  # a Service, ConfigMap, ...: left alone
    spec: Any = doc
    for key in path:
        spec = spec.get(key) if isinstance(spec, dict) else None
    if not isinstance(spec, dict):
        raise InjectError(f"{where_of(str(kind), doc)}: no pod spec at {'.'.join(path)}")
    found: list[tuple[int, str | None]] = []
    changed = inject_pod_spec(spec, options, where_of(str(kind), doc), notes, found)
    if changed and injected is not None:
        template = doc if kind == "Pod" else _template(doc, path)
        labels = dict(((template.get("metadata") or {}).get("labels")) or {})
        namespace = (doc.get("metadata") or {}).get("namespace")
        injected.append(Injected(where_of(str(kind), doc), namespace, labels, *found[0]))
    return changed


def _template(doc: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    """The pod template holding the pod spec at `path` (its last key is `spec`)."""
    node: Any = doc
    for key in path[:-1]:
        node = node.get(key) or {}
    return dict(node) if isinstance(node, dict) else {}


def inject(text: str, options: InjectOptions, notes: list[str] | None = None) -> str:
    """The injected YAML; what the user should know (Services rewired or left alone, a kept
    preStop, a raised grace period, ports that bypass TLS) is appended to `notes`.

    Round-trip YAML (ruamel.yaml): a changed document keeps its comments, key order, quoting
    and indentation, so the diff is the sidecar and what it needs; others pass through as they
    are."""
    from ruamel.yaml import YAML  # noqa: PLC0415  (loaded by `inject` only, not by `serve`)
    from ruamel.yaml.error import YAMLError  # noqa: PLC0415
    from ruamel.yaml.util import load_yaml_guess_indent  # noqa: PLC0415

    notes = notes if notes is not None else []
    parts = split_documents(text)
    docs: list[tuple[str, Any, int, int, str]] = []
    for number, part in enumerate(parts, start=1):
        body, trailer = trailing_comments(part)
        try:
            doc, _, offset = load_yaml_guess_indent(body, yaml=round_trip(YAML()))
        except YAMLError as e:
            raise InjectError(f"document {number} is not valid YAML: {e}".splitlines()[0]) from None
        if doc is not None and (
            not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc
        ):
            raise InjectError(
                f"document {number} is not a Kubernetes object (no apiVersion/kind); "
                "give manifests, e.g. kubectl get deploy web -o yaml | tls-sidecar inject"
            )
        docs.append((part, doc, mapping_indent(body), offset or 0, trailer))
    injected: list[Injected] = []
    changed: set[int] = set()
    for index, (_, doc, _, _, _) in enumerate(docs):
        if doc is not None and inject_object(
            doc, options, f"document {index + 1} ({doc['kind']})", notes, injected
        ):
            changed.add(index)
    if options.services and injected:
        everything = [obj for _, doc, _, _, _ in docs for obj in objects_of(doc)]
        references = port_name_references(everything)
        for index, (_, doc, _, _, _) in enumerate(docs):
            for obj in objects_of(doc):
                if obj.get("kind") == "Service" and rewire_service(
                    obj, injected, notes, references
                ):
                    changed.add(index)
    out: list[str] = []
    for index, (part, doc, indent, offset, trailer) in enumerate(docs):
        if index not in changed:
            if part.strip():  # a comment-only document (a file's header) is kept too
                out.append(part.strip("\n") + "\n")
            continue
        yaml = round_trip(YAML())
        yaml.indent(mapping=indent, sequence=offset + 2, offset=offset)
        yaml.representer.add_representer(OctalMode, represent_octal_mode)
        stream = io.StringIO()
        yaml.dump(doc, stream)
        out.append(stream.getvalue() + trailer)
    return "---\n".join(out)


@click.command("inject", context_settings=CONTEXT)
@click.argument("files", nargs=-1, type=click.File("r"))
@click.option("--image", default=DEFAULT_IMAGE, show_default=True, help="The sidecar image.")
@click.option(
    "--secret",
    default=DEFAULT_SECRET,
    show_default=True,
    help="Secret with tls.crt and tls.key, mounted at /etc/tls.",
)
@click.option(
    "--native/--classic",
    default=True,
    show_default=True,
    help="Native sidecar (an init container with restartPolicy Always, Kubernetes 1.29+) or a regular container.",
)
@click.option(
    "--upstream-port",
    default=None,
    type=click.IntRange(1, 65535),
    help="Port the app listens on at 127.0.0.1. Default: the app container's single port, or "
    "the one named http (8080 when it declares none).",
)
@click.option(
    "--services/--no-services",
    default=True,
    show_default=True,
    help="Point Services of the input that target the app's port at the sidecar's https port.",
)
def inject_command(
    files: tuple[Any, ...],
    image: str,
    secret: str,
    native: bool,
    upstream_port: int | None,
    services: bool,
) -> None:
    """Add tls-sidecar to the workloads in Kubernetes YAML (FILES or stdin) and print the result."""
    options = InjectOptions(
        image=image,
        secret=secret,
        native=native,
        upstream_port=upstream_port,
        services=services,
    )
    sources: list[Any] = list(files) if files else [sys.stdin]
    notes: list[str] = []
    click.echo(inject("---\n".join(f.read() for f in sources), options, notes), nl=False)
    for note in notes:
        click.echo(f"tls-sidecar: note: {note}", err=True)
