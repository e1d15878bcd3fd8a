"""A pod, simulated with local processes: the sidecar runs with the args and env of the rendered
manifest (only paths and ports substituted), certificates sit in a Secret-like volume, the probes
are polled at the manifest's periods as the kubelet would, the Secret rotates under traffic, and
the pod shuts down in native-sidecar order and in classic order. No accepted request may fail."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from proxy import certs
from tests.support.proxy import ProxyProcess, wait_for
from tests.support.upstream import UpstreamApp

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def rendered_sidecar(overlay: str) -> tuple[list[str], dict[str, str], dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with kustomize) is not installed")
    text = subprocess.run(
        [kubectl, "kustomize", str(REPO / "deploy" / "kubernetes" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    deployment = next(d for d in yaml.safe_load_all(text) if d and d["kind"] == "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    sidecar = next(
        c
        for c in (spec.get("initContainers") or []) + spec["containers"]
        if c["name"] == "tls-sidecar"
    )
    env = {e["name"]: e["value"] for e in sidecar.get("env", [])}
    return sidecar["args"], env, sidecar


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
    volume: Path  # the Secret-like folder behind --cert/--key
    ca: certs.Issued
    ca_file: Path
    app_port: int


def start_pod(tmp_path: Path, overlay: str) -> Pod:
    args, env, sidecar = rendered_sidecar(overlay)
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
        a.replace("/etc/tls", str(volume)).replace("127.0.0.1:8080", f"127.0.0.1:{app_port}")
        for a in args
    ]
    proxy = ProxyProcess(
        [*substituted, "--listen=127.0.0.1:0", "--admin-listen=127.0.0.1:0"], env=env
    ).start()
    return Pod(proxy, sidecar, volume, ca, ca_file, app_port)


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


def test_native_sidecar_pod(tmp_path: Path) -> None:
    pod = start_pod(tmp_path, "base")
    proxy, sidecar, volume, ca, ca_file, app_port = (
        pod.proxy,
        pod.sidecar,
        pod.volume,
        pod.ca,
        pod.ca_file,
        pod.app_port,
    )
    kubelet_startup(proxy, sidecar)  # native: the app container starts only after this
    app = UpstreamApp(port=app_port).start()
    kubelet_ready(proxy, sidecar, True)
    traffic = Traffic(proxy.port, ca_file).start()
    wait_for(lambda: len(traffic.results) > 30, 30, "traffic flowing")
    secret_volume(volume, 2, ca)
    rotated = time.monotonic()
    wait_for(lambda: served_cn(proxy.port, ca_file) == "gen-2", 30, "the rotated certificate")
    rotation_s = time.monotonic() - rotated
    wait_for(lambda: len(traffic.results) > 80, 30, "traffic after the rotation")
    # Termination: endpoints drop the pod; the app gets SIGTERM first and finishes what it has;
    # then the sidecar gets SIGTERM and drains.
    traffic.stop_and_wait()
    app.drain()
    proxy.signal(signal.SIGTERM)
    assert proxy.wait(30) == 0
    failures = [r for r in traffic.results if r != 200]
    print(
        f"\nnative pod: requests {len(traffic.results)}, failed {len(failures)}, rotation seen after {rotation_s:.1f}s"
    )
    assert failures == []


def test_classic_sidecar_pod(tmp_path: Path) -> None:
    pod = start_pod(tmp_path, "overlays/classic-sidecar")
    proxy, sidecar, ca_file, app_port = pod.proxy, pod.sidecar, pod.ca_file, pod.app_port
    app = UpstreamApp(port=app_port).start()  # classic: the containers start together
    kubelet_startup(proxy, sidecar)
    kubelet_ready(proxy, sidecar, True)
    traffic = Traffic(proxy.port, ca_file).start()
    wait_for(lambda: len(traffic.results) > 30, 30, "traffic flowing")
    # Termination: every container gets SIGTERM at once. The app's preStop sleep holds its
    # SIGTERM; the sidecar serves on for --shutdown-delay with readiness at 503; traffic goes on
    # until the kubelet's readiness probe sees 503 and the endpoints drop the pod.
    terminating = time.monotonic()
    proxy.signal(signal.SIGTERM)
    before = len(traffic.results)
    # Worst case for the endpoint update: the kubelet's next readiness probe is a whole period
    # away. Modelled lag, not a wait: traffic keeps flowing through the draining sidecar.
    time.sleep(sidecar["readinessProbe"]["periodSeconds"])
    assert not probe(proxy.admin_port, sidecar["readinessProbe"]), "readiness says 503 by now"
    during_delay = len(traffic.results) - before
    traffic.stop_and_wait()
    delay = next(
        int(a.split("=")[1].rstrip("s")) for a in proxy.args if a.startswith("--shutdown-delay=")
    )
    # The app's preStop sleep, modelled: part of the behaviour under test, not a wait.
    time.sleep(max(0.0, delay - (time.monotonic() - terminating)))
    app.drain()
    assert proxy.wait(45) == 0
    failures = [r for r in traffic.results if r != 200]
    print(
        f"\nclassic pod: requests {len(traffic.results)} ({during_delay} after SIGTERM), "
        f"failed {len(failures)}"
    )
    assert during_delay > 50, "requests arrived while the sidecar was shutting down"
    assert failures == []
