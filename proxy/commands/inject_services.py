"""`tls-sidecar inject`'s Services: those of the input (in `List`s too) that select an injected
workload's pods go to the sidecar's `https` port where they targeted the app's; a port named for
plaintext HTTP is renamed when nothing in the input refers to it by that name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Injected:
    """A workload that got the sidecar: what its Services are matched against."""

    where: str
    namespace: str | None
    labels: dict[str, str]
    port: int
    port_name: str | None


def where_of(kind: str, doc: dict[str, Any]) -> str:
    name = (doc.get("metadata") or {}).get("name", "?")
    return f"{kind}/{name}"


def objects_of(doc: Any) -> list[dict[str, Any]]:
    """The Kubernetes objects of one YAML document: itself, or a `List`'s items (what
    `kubectl get deploy,svc -o yaml` prints)."""
    if not isinstance(doc, dict):
        return []
    if doc.get("kind") == "List":
        return [item for item in doc.get("items") or [] if isinstance(item, dict)]
    return [doc]


def port_name_references(objects: list[dict[str, Any]]) -> dict[tuple[Any, Any, Any], str]:
    """(namespace, Service name, port name) -> who in the input refers to that Service port by
    its name (an Ingress backend): renaming the port would break them."""
    found: dict[tuple[Any, Any, Any], str] = {}
    for obj in objects:
        if obj.get("kind") != "Ingress":
            continue
        spec = obj.get("spec") or {}
        backends = [spec.get("defaultBackend") or {}]
        for rule in spec.get("rules") or []:
            backends += [
                path.get("backend") or {} for path in (rule.get("http") or {}).get("paths") or []
            ]
        namespace = (obj.get("metadata") or {}).get("namespace")
        for backend in backends:
            service = backend.get("service") or {}
            name = (service.get("port") or {}).get("name")
            if name is not None:
                found[(namespace, service.get("name"), name)] = where_of("Ingress", obj)
    return found


def _tls_port_name(name: Any) -> str | None:
    """A plaintext port name's TLS twin (`http` -> `https`, `http-web` -> `https-web`): the
    convention Istio, Linkerd and others read the protocol from."""
    if isinstance(name, str) and (name == "http" or name.startswith("http-")):
        return "https" + name[4:]
    return None


def rewire_service(
    doc: dict[str, Any],
    injected: list[Injected],
    notes: list[str],
    references: dict[tuple[Any, Any, Any], str] | None = None,
) -> bool:
    """Point a Service that selects an injected workload's pods at the sidecar's `https`
    port where it targeted the app's port, rename a port named for plaintext HTTP when nothing
    in the input names it; report what it leaves alone."""
    spec = doc.get("spec") or {}
    selector = spec.get("selector") or {}
    metadata = doc.get("metadata") or {}
    namespace = metadata.get("namespace")
    where = where_of("Service", doc)
    changed = False
    for workload in injected:
        if not selector or namespace != workload.namespace:
            continue
        if any(workload.labels.get(k) != v for k, v in selector.items()):
            continue
        ports = spec.get("ports") or []
        for port in ports:
            target = port.get("targetPort", port.get("port"))
            if target in (workload.port, workload.port_name):
                port["targetPort"] = "https"
                changed = True
                notes.append(
                    f"{where}: port {port.get('port')} now goes to the sidecar (targetPort "
                    f"https, TLS) instead of the app's plaintext {target}"
                )
                _rename_for_tls(port, ports, where, notes, references or {}, namespace, metadata)
            else:
                notes.append(
                    f"{where}: port {port.get('port')} (targetPort {target}) selects "
                    f"{workload.where} but not the app's port {workload.port}: left alone"
                )
    return changed


def _rename_for_tls(
    port: dict[str, Any],
    ports: list[dict[str, Any]],
    where: str,
    notes: list[str],
    references: dict[tuple[Any, Any, Any], str],
    namespace: Any,
    metadata: dict[str, Any],
) -> None:
    """A port named `http` that now carries TLS misleads whatever reads the protocol from the
    name (service meshes, some ingress controllers): rename it, or say why not."""
    old = port.get("name")
    new = _tls_port_name(old)
    if port.get("appProtocol") == "http":
        port["appProtocol"] = "https"
        notes.append(f"{where}: port {port.get('port')} appProtocol http -> https")
    if new is None:
        return
    user = references.get((namespace, metadata.get("name"), old))
    if user is None and any(p.get("name") == new for p in ports):
        user = f"another port of {where}"
    if user is None:
        port["name"] = new
        notes.append(
            f"{where}: port {port.get('port')} renamed {old} -> {new} (it carries TLS now); "
            "rename it too wherever something outside this input refers to it by name"
        )
    else:
        notes.append(
            f"{where}: port {port.get('port')} is still named {old} though it carries TLS now "
            f"({user} uses that name): rename it to {new} there and here"
            + (
                f"; {user} now reaches a TLS port: set its controller to HTTPS backends "
                "(ingress-nginx: nginx.ingress.kubernetes.io/backend-protocol: HTTPS)"
                if user.startswith("Ingress/")
                else ""
            )
        )
