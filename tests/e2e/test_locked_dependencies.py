"""The lock's dependencies at work: the development environment runs the cryptography sslyze
allows (< 47), the image ships the lock's; this installs the lock with its hashes and runs the
cryptography-heavy paths on what ships (the development CA, mutual TLS)."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from tests.support.proxy import serve_args, wait_for
from tests.support.upstream import UpstreamApp

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.needs("python3", install="apt-get install python3-venv", path=SYSTEM_PYTHON)
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
    # The compiled core is left out (the same modules run as Python): it takes cryptography
    # from interpreted modules either way, and the image's root builds and runs it compiled
    # (test_image_root); compiling it again here was most of this test's time.
    subprocess.run(
        [*pip, "--no-deps", str(REPO)],
        check=True,
        timeout=600,
        env={**os.environ, "TLS_SIDECAR_NO_COMPILE": "1"},
    )
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
        [tool, "certs", "init", "--certs-dir", str(certs_dir)],
        capture_output=True,
        text=True,
        timeout=60,
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
