"""A pod, simulated with local processes: the sidecar runs with the args and env of the rendered
manifest (only paths and ports substituted), certificates sit in a Secret-like volume, the probes
are polled at the manifest's periods as the kubelet would, the Secret rotates under traffic, and
the pod shuts down in native-sidecar order and in classic order. No accepted request may fail."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from proxy.commands.inject import inject
from proxy.commands.inject_sidecar import InjectOptions
from proxy.tls import certs
from tests.support import tools
from tests.support.proxy import ProxyProcess, wait_for
from tests.support.upstream import UpstreamApp

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


# How long after a pod's deletion its endpoints are gone everywhere (kube-proxy, ingress, other
# clients' caches): new connections still arrive meanwhile. A few seconds is typical.
PROPAGATION_S = 3.0


def render(overlay: str) -> str:
    return tools.kustomize(REPO / "deploy" / "kubernetes" / overlay)


def injected(native: bool) -> str:
    """A workload of a user's, through `tls-sidecar inject`."""
    workload = (REPO / "tests" / "golden" / "inject" / "input.yaml").read_text()
    return inject(workload, InjectOptions(native=native))


def rendered_sidecar(
    overlay: str, text: str | None = None
) -> tuple[list[str], dict[str, str], dict[str, Any], dict[str, Any]]:
    """The sidecar's args, env and container spec, and the app container, of the Deployment."""
    text = render(overlay) if text is None else text
    deployment = next(d for d in yaml.safe_load_all(text) if d and d["kind"] == "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    sidecar = next(
        c
        for c in (spec.get("initContainers") or []) + spec["containers"]
        if c["name"] == "tls-sidecar"
    )
    app = next(c for c in spec["containers"] if c["name"] != "tls-sidecar")
    env = {e["name"]: e["value"] for e in sidecar.get("env", [])}
    return sidecar["args"], env, sidecar, app


def prestop_seconds(app: dict[str, Any]) -> float:
    """The app's preStop, as the kubelet runs it: a sleep action or an exec `sleep N`."""
    prestop = (app.get("lifecycle") or {}).get("preStop")
    if prestop is None:
        return 0.0
    if "sleep" in prestop:
        return float(prestop["sleep"]["seconds"])
    command = prestop["exec"]["command"]
    assert command[0] == "sleep", command
    return float(command[1])


def secret_volume(folder: Path, generation: int, ca: certs.Issued) -> certs.Issued:
    """Write a Secret's files the way the kubelet does: a hidden folder, then a `..data` swap."""
    leaf = certs.issue(ca, ["localhost"], common_name=f"gen-{generation}")
    target = folder / f"..2026_11_24_{generation}"
    target.mkdir()
    (target / "tls.crt").write_bytes(leaf.cert_pem + ca.cert_pem)
    (target / "tls.key").write_bytes(leaf.key_pem)
    (target / "ca.crt").write_bytes(ca.cert_pem)
    for name in ("tls.crt", "tls.key", "ca.crt"):
        (target / name).chmod(0o440)
    (folder / "..data_tmp").symlink_to(target.name)
    os.replace(folder / "..data_tmp", folder / "..data")
    for name in ("tls.crt", "tls.key", "ca.crt"):
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(f"..data/{name}")
    return leaf


def probe(port: int, probe_spec: dict[str, Any]) -> bool:
    get = probe_spec["httpGet"]
    conn = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=probe_spec.get("timeoutSeconds", 1)
    )
    try:
        conn.request("GET", get["path"])
        return 200 <= conn.getresponse().status < 400
    except OSError:
        return False
    finally:
        conn.close()


def served_cn(port: int, ca: Path) -> str:
    ctx = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return str(
        x509.load_der_x509_certificate(der)
        .subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0]
        .value
    )


class Traffic:
    """Clients sending while the pod is in the Service's endpoints; every answer is recorded."""

    def __init__(self, port: int, ca: Path) -> None:
        self.port, self.ca = port, ca
        self.in_endpoints = True
        self.results: list[int | str] = []
        self.threads = [
            threading.Thread(target=self._run, args=(path,))
            for path in ("/echo/pod", "/slow/0.3", "/echo/pod2")
        ]

    def start(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def leave_endpoints(self) -> None:
        """The endpoint update has reached every client: no new requests."""
        self.in_endpoints = False

    def stop_and_wait(self) -> None:
        self.in_endpoints = False
        for thread in self.threads:
            thread.join(60)

    def _run(self, path: str) -> None:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        deadline = time.monotonic() + 120
        while self.in_endpoints and time.monotonic() < deadline and len(self.results) < 20000:
            conn = http.client.HTTPSConnection("localhost", self.port, context=ctx, timeout=30)
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                self.results.append(response.status)
            except (OSError, http.client.HTTPException) as e:
                self.results.append(repr(e))
            finally:
                conn.close()


@dataclass
class Pod:
    proxy: ProxyProcess
    sidecar: dict[str, Any]  # the rendered container spec
    app_spec: dict[str, Any]  # the app container's
    volume: Path  # the Secret-like folder behind --cert/--key
    ca: certs.Issued
    ca_file: Path
    app_port: int


def start_pod(tmp_path: Path, overlay: str, text: str | None = None) -> Pod:
    args, env, sidecar, app_spec = rendered_sidecar(overlay, text)
    volume = tmp_path / "etc-tls"
    volume.mkdir()
    ca = certs.create_ca("pod CA")
    secret_volume(volume, 1, ca)
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca.cert_pem)
    with socket.socket() as s:  # the app's port, reserved before the app starts
        s.bind(("127.0.0.1", 0))
        app_port = s.getsockname()[1]
    substituted = [
        re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{app_port}", a.replace("/etc/tls", str(volume)))
        for a in args
    ]
    proxy = ProxyProcess(
        [*substituted, "--listen=127.0.0.1:0", "--admin-listen=127.0.0.1:0"], env=env
    ).start()
    return Pod(proxy, sidecar, app_spec, volume, ca, ca_file, app_port)


def kubelet_startup(proxy: ProxyProcess, sidecar: dict[str, Any]) -> None:
    spec = sidecar["startupProbe"]
    for _ in range(spec["failureThreshold"]):
        if probe(proxy.admin_port, spec):
            return
        time.sleep(spec["periodSeconds"])
    raise AssertionError("the startup probe never passed")


def kubelet_ready(
    proxy: ProxyProcess, sidecar: dict[str, Any], want: bool, limit: float = 60
) -> float:
    """Poll readiness at its period until it says `want`; returns how long that took."""
    spec = sidecar["readinessProbe"]
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if probe(proxy.admin_port, spec) == want:
            return time.monotonic() - started
        time.sleep(spec["periodSeconds"])
    raise AssertionError(f"readiness never became {want}")


def delete_native_pod(pod: Pod, app: UpstreamApp, traffic: Traffic) -> float:
    """Pod deletion, native sidecar order. Endpoints drop the pod PROPAGATION_S later, and
    requests arrive until then. The kubelet runs the app's preStop, then SIGTERMs the app; the
    sidecar gets SIGTERM only once the app has exited. Returns the preStop's length."""
    prestop = prestop_seconds(pod.app_spec)
    endpoints = threading.Timer(PROPAGATION_S, traffic.leave_endpoints)
    endpoints.start()
    time.sleep(prestop)  # the app's preStop, modelled: part of the behaviour under test
    app.drain()  # SIGTERM: the app stops accepting and finishes what it has
    endpoints.join()
    traffic.stop_and_wait()
    pod.proxy.signal(signal.SIGTERM)
    assert pod.proxy.wait(30) == 0
    return prestop


def run_native_pod(tmp_path: Path, overlay: str, text: str | None = None) -> tuple[int, int]:
    """A native-sidecar pod under traffic through its deletion: (requests, failed)."""
    pod = start_pod(tmp_path, overlay, text)
    kubelet_startup(pod.proxy, pod.sidecar)  # native: the app container starts only after this
    app = UpstreamApp(port=pod.app_port).start()
    kubelet_ready(pod.proxy, pod.sidecar, True)
    traffic = Traffic(pod.proxy.port, pod.ca_file).start()
    wait_for(lambda: len(traffic.results) > 30, 30, "traffic flowing")
    before = len(traffic.results)
    delete_native_pod(pod, app, traffic)
    failures = [r for r in traffic.results if r != 200]
    print(
        f"\n{overlay}: requests {len(traffic.results)} "
        f"({len(traffic.results) - before} after the deletion), failed {len(failures)}"
    )
    assert len(traffic.results) - before > 20, "requests arrived after the deletion"
    return len(traffic.results), len(failures)


def test_native_sidecar_pod_rotates_and_loses_nothing_on_deletion(tmp_path: Path) -> None:
    pod = start_pod(tmp_path, "base")
    proxy, sidecar, volume, ca, ca_file = pod.proxy, pod.sidecar, pod.volume, pod.ca, pod.ca_file
    kubelet_startup(proxy, sidecar)
    app = UpstreamApp(port=pod.app_port).start()
    kubelet_ready(proxy, sidecar, True)
    traffic = Traffic(proxy.port, ca_file).start()
    wait_for(lambda: len(traffic.results) > 30, 30, "traffic flowing")
    secret_volume(volume, 2, ca)
    rotated = time.monotonic()
    wait_for(lambda: served_cn(proxy.port, ca_file) == "gen-2", 30, "the rotated certificate")
    rotation_s = time.monotonic() - rotated
    wait_for(lambda: len(traffic.results) > 80, 30, "traffic after the rotation")
    before = len(traffic.results)
    prestop = delete_native_pod(pod, app, traffic)
    failures = [r for r in traffic.results if r != 200]
    print(
        f"\nnative pod: requests {len(traffic.results)} ({len(traffic.results) - before} after "
        f"the deletion, app preStop {prestop:g}s), failed {len(failures)}, rotation seen after "
        f"{rotation_s:.1f}s"
    )
    assert prestop >= PROPAGATION_S
    assert failures == []


def test_an_injected_workload_loses_nothing_on_deletion(tmp_path: Path) -> None:
    _, failed = run_native_pod(tmp_path, "injected workload", injected(native=True))
    assert failed == 0


def test_without_the_app_prestop_the_deletion_window_fails_requests(tmp_path: Path) -> None:
    """The control: the base as it was before the app's preStop. The app exits at once while
    endpoints still send requests, and some of them fail: the simulation can see the window."""
    text = render("base")
    broken = yaml.safe_load_all(text)
    docs = [d for d in broken if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        container.pop("lifecycle", None)
    requests, failed = run_native_pod(
        tmp_path, "base without the app's preStop", yaml.safe_dump_all(docs)
    )
    assert failed > 0, f"no request failed out of {requests}: the window was not exercised"


def test_classic_sidecar_pod_loses_nothing_on_deletion(tmp_path: Path) -> None:
    pod = start_pod(tmp_path, "overlays/classic-sidecar")
    proxy, sidecar, ca_file, app_port = pod.proxy, pod.sidecar, pod.ca_file, pod.app_port
    app = UpstreamApp(port=app_port).start()  # classic: the containers start together
    kubelet_startup(proxy, sidecar)
    kubelet_ready(proxy, sidecar, True)
    traffic = Traffic(proxy.port, ca_file).start()
    wait_for(lambda: len(traffic.results) > 30, 30, "traffic flowing")
    # Deletion: every container is told at once. The app's preStop holds its SIGTERM; the
    # sidecar gets SIGTERM now and serves on for --shutdown-delay with readiness at 503; the
    # endpoints drop the pod PROPAGATION_S later, and requests arrive until then.
    before = len(traffic.results)
    prestop = prestop_seconds(pod.app_spec)
    endpoints = threading.Timer(PROPAGATION_S, traffic.leave_endpoints)
    endpoints.start()
    proxy.signal(signal.SIGTERM)
    time.sleep(prestop)  # the app's preStop, modelled: part of the behaviour under test
    app.drain()
    endpoints.join()
    traffic.stop_and_wait()
    assert not probe(proxy.admin_port, sidecar["readinessProbe"]), "readiness says 503"
    assert proxy.wait(45) == 0
    failures = [r for r in traffic.results if r != 200]
    after = len(traffic.results) - before
    print(
        f"\nclassic pod: requests {len(traffic.results)} ({after} after the deletion, app "
        f"preStop {prestop:g}s), failed {len(failures)}"
    )
    assert after > 20, "requests arrived while the sidecar was shutting down"
    assert failures == []
