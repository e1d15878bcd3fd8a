"""CI has no Docker engine: repeat the image's install steps in a fresh virtual environment and
run the result as the image would — user 65532, nothing writable but TMPDIR, signals as PID 1."""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

import pytest

from tests.support.proxy import serve_args, wait_for
from tests.support.upstream import UpstreamApp

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# The build stage's RUN lines, with the image's paths as placeholders.
EXPECTED_RUN = [
    "RUN python -m venv --without-pip /opt/tls-sidecar",
    "RUN python -m pip --python /opt/tls-sidecar/bin/python install --require-hashes --no-deps -r requirements.lock",
    "RUN python -m pip --python /opt/tls-sidecar/bin/python install --no-deps .",
]


def test_dockerfile_build_steps_are_the_ones_this_test_repeats() -> None:
    build = (REPO / "Dockerfile").read_text().split("\nFROM ")[1]
    assert [line for line in build.splitlines() if line.startswith("RUN ")] == EXPECTED_RUN


SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to uid 65532 needs root")
@pytest.mark.skipif(
    not Path(SYSTEM_PYTHON).exists(),
    reason="needs the system python3 (apt-get install python3-venv)",
)
def test_installed_image_serves_as_a_non_root_user(tmp_path: Path) -> None:
    # pytest's own temporary folders are closed to other users: the "image" lives beside them
    root = Path(tempfile.mkdtemp(prefix="tls-sidecar-image-"))
    root.chmod(0o755)
    venv, tmp = root / "opt" / "tls-sidecar", root / "tmp"
    tmp.mkdir(parents=True)
    source = tmp_path / "src"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "*.egg-info", "build", "results", "__pycache__"
        ),
    )
    # The Dockerfile's three steps, with /opt/tls-sidecar under a temporary root. The image's
    # interpreter is world-readable (/usr/local), as the system one is; an interpreter under a
    # private home directory would not run as uid 65532.
    subprocess.run(
        [SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q"]
    subprocess.run(
        [*pip, "--require-hashes", "--no-deps", "-r", "requirements.lock"],
        cwd=source,
        check=True,
        timeout=600,
    )
    subprocess.run([*pip, "--no-deps", "."], cwd=source, check=True, timeout=600)
    assert not list(venv.glob("lib/python3*/site-packages/pip")), "no pip in the image's venv"
    os.chown(tmp, 65532, 65532)
    for path in (root, root / "opt", venv):
        path.chmod(0o755)
    app = UpstreamApp().start()
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "TMPDIR": str(tmp),
        "HOME": "/nonexistent",
    }

    def become_65532() -> None:
        os.setgroups([])
        os.setgid(65532)
        os.setuid(65532)

    proc = subprocess.Popen(
        [
            str(venv / "bin" / "tls-sidecar"),
            *serve_args(app.base),
            "--log-format",
            "text",
        ],
        env=env,
        preexec_fn=become_65532,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    lines: list[str] = []
    stderr = proc.stderr
    assert stderr is not None
    threading.Thread(target=lambda: lines.extend(iter(stderr.readline, "")), daemon=True).start()
    try:
        line = wait_for(
            lambda: next((x for x in lines if " listening " in x), None), 30, "the listening line"
        )
        port = int(line.split("listen=['127.0.0.1:")[1].split("'")[0])
        admin = int(line.split("admin=['127.0.0.1:")[1].split("'")[0])
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with urllib.request.urlopen(
            f"https://127.0.0.1:{port}/echo/image", context=ctx, timeout=10
        ) as response:
            assert response.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=10) as response:
            assert response.status == 200
        assert Path(f"/proc/{proc.pid}/status").read_text().count("65532") >= 2, (
            "runs as uid/gid 65532"
        )
        assert list(tmp.iterdir()) == [], (
            "the self-signed key passed through TMPDIR and was removed"
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        app.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare"
)
def test_signals_work_when_the_proxy_is_pid_1(tmp_path: Path) -> None:
    """In a container the proxy is PID 1: the kernel delivers only signals it handles itself."""
    app = UpstreamApp().start()
    argv = [
        "unshare",
        "--pid",
        "--fork",
        "--kill-child",
        sys.executable,
        "-m",
        "proxy",
        *serve_args(app.base),
        "--log-format",
        "text",
    ]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, cwd=REPO)
    lines: list[str] = []
    stderr = proc.stderr
    assert stderr is not None
    threading.Thread(target=lambda: lines.extend(iter(stderr.readline, "")), daemon=True).start()
    try:
        wait_for(lambda: any(" listening " in x for x in lines), 30, "the listening line")
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        (inner,) = children
        nspid = [
            line
            for line in Path(f"/proc/{inner}/status").read_text().splitlines()
            if line.startswith("NSpid:")
        ]
        assert nspid[0].split()[-1] == "1", "the proxy is PID 1 in its namespace"
        os.kill(int(inner), signal.SIGTERM)
        assert proc.wait(30) == 0
        assert any(" stopped" in x for x in lines), "it drained and stopped on SIGTERM"
    finally:
        if proc.poll() is None:
            proc.kill()
        app.stop()


@pytest.mark.skipif(
    not Path(SYSTEM_PYTHON).exists(),
    reason="needs the system python3 (apt-get install python3-venv)",
)
def test_the_locked_cryptography_makes_checks_and_serves_certificates(tmp_path: Path) -> None:
    # The development environment has the cryptography sslyze allows (< 47); the image ships
    # the lock's. This runs the cryptography-heavy paths on what ships: the development CA and
    # certificates, and mutual TLS (cryptography in the serving process).
    venv = tmp_path / "image"
    subprocess.run(
        [SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q"]
    subprocess.run(
        [*pip, "--require-hashes", "--no-deps", "-r", str(REPO / "requirements.lock")],
        check=True,
        timeout=600,
    )
    subprocess.run([*pip, "--no-deps", str(REPO)], check=True, timeout=600)
    locked = next(
        line.split("==")[1].split()[0]
        for line in (REPO / "requirements.lock").read_text().splitlines()
        if line.startswith("cryptography==")
    )
    shipped = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import cryptography; print(cryptography.__version__)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert shipped == locked
    tool = str(venv / "bin" / "tls-sidecar")
    certs_dir = tmp_path / "certs"
    made = subprocess.run(
        [tool, "certs", "init", "--out", str(certs_dir)], capture_output=True, text=True, timeout=60
    )
    assert made.returncode == 0, made.stderr
    app = UpstreamApp().start()
    proc = subprocess.Popen(
        [
            tool,
            *serve_args(app.base),
            "--cert",
            str(certs_dir / "server.crt"),
            "--key",
            str(certs_dir / "server.key"),
            "--client-ca",
            str(certs_dir / "ca.crt"),
            "--allow-all",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    stderr = proc.stderr
    assert stderr is not None
    threading.Thread(target=lambda: lines.extend(iter(stderr.readline, "")), daemon=True).start()
    try:
        line = wait_for(
            lambda: next((x for x in lines if '"msg": "listening"' in x), None), 30, "listening"
        )
        port = int(line.split('"listen": ["127.0.0.1:')[1].split('"')[0])
        ctx = ssl.create_default_context(cafile=str(certs_dir / "ca.crt"))
        ctx.load_cert_chain(certs_dir / "client.crt", certs_dir / "client.key")
        with urllib.request.urlopen(
            f"https://localhost:{port}/echo/locked", context=ctx, timeout=10
        ) as response:
            assert response.status == 200
            assert b"x-forwarded-client-cert" in response.read().lower()
    finally:
        proc.terminate()
        proc.wait(30)
        app.stop()
