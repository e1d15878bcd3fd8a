"""The image's root filesystem, run for real without a container engine: a Debian 13 root
(debootstrap) built with the Dockerfile's own script, hardened as the Dockerfile hardens it, and
the sidecar run in it as the image runs it (user 65532, read-only root, only /tmp writable,
PID 1 of its own PID namespace), checked from outside."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.proxy import wait_for
from tests.support.rootfs import (
    SCRIPT,
    Steps,
    build_image_root,
    dockerfile_final_stage,
    in_root,
    missing_tools,
    run_in_root,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(os.geteuid() != 0, reason="chroot and mount namespaces need root"),
    pytest.mark.skipif(bool(missing_tools()), reason=f"needs {', '.join(missing_tools())}"),
]


@dataclass
class RootProcess:
    """A process started in the image root, its stderr collected line by line."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        stderr = self.proc.stderr
        assert stderr is not None
        threading.Thread(
            target=lambda: self.lines.extend(iter(stderr.readline, "")), daemon=True
        ).start()

    def line(self, marker: str) -> str:
        return str(
            wait_for(
                lambda: (
                    next((x for x in self.lines if marker in x), None)
                    or (self.proc.poll() is not None and "".join(self.lines) + "(exited)")
                ),
                60,
                f"{marker!r} in the log",
            )
        )

    def ports(self) -> tuple[int, int]:
        line = self.line(" listening ")
        assert " listening " in line, line
        port = int(line.split("listen=['127.0.0.1:")[1].split("'")[0])
        admin = int(line.split("admin=['127.0.0.1:")[1].split("'")[0])
        return port, admin

    @property
    def inner_pid(self) -> int:
        """The sidecar's PID on this machine (unshare forks it as PID 1 of its namespace)."""
        children = wait_for(
            lambda: (
                Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            ),
            10,
            "unshare's child",
        )
        return int(children[0])

    def stop(self) -> None:
        """Kill the sidecar, then unshare. unshare's `--kill-child` does not reach a sidecar
        that runs as another user (the kernel clears the parent-death signal when a process's
        credentials change): killing unshare alone left it running after the test."""
        if self.proc.poll() is None:
            pid = self.proc.pid
            with contextlib.suppress(OSError):
                for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
                    os.kill(int(child), signal.SIGKILL)
            self.proc.kill()
            self.proc.wait(10)


def running(pid: int) -> bool:
    """Whether `pid` is alive (not gone, not a zombie waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.fixture(scope="module")
def image_root() -> Iterator[tuple[Path, Steps]]:
    steps = Steps()
    root = build_image_root(steps)
    yield root, steps
    print("\nimage root steps:\n" + steps.summary())


def start(root: Path, argv: list[str], extra_env: dict[str, str] | None = None) -> RootProcess:
    env, user, _ = dockerfile_final_stage()
    command = in_root(root, argv, env={**env, **(extra_env or {})}, user=user, pid_namespace=True)
    return RootProcess(
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/"
        )
    )


def s_client(root: Path, port: int, groups: str) -> str:
    """Debian 13's own openssl (3.5), run in the image root as its user, read-only."""
    env, user, _ = dockerfile_final_stage()
    command = in_root(
        root,
        [
            "/usr/bin/openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-servername",
            "localhost",
            "-groups",
            groups,
            "-tls1_3",
        ],
        env=env,
        user=user,
    )
    done = subprocess.run(
        command, input="", capture_output=True, text=True, timeout=60, check=False
    )
    return done.stdout + done.stderr


def group_lines(s_client_output: str) -> list[str]:
    """The key exchange lines of OpenSSL 3.5's s_client: a hybrid group is "Negotiated TLS1.3
    group", a classic one "Peer Temp Key"."""
    return [
        x
        for x in s_client_output.splitlines()
        if x.startswith(("Negotiated TLS1.3 group:", "Peer Temp Key:", "Server Temp Key:"))
    ]


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "20", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_the_hardened_root_has_no_shell_no_pip_and_debian_13s_openssl(
    image_root: tuple[Path, Steps],
) -> None:
    root, steps = image_root
    for shell in ("sh", "bash", "dash"):
        assert not (root / "usr" / "bin" / shell).exists(), f"/usr/bin/{shell} is still there"
    assert not list(root.glob("opt/tls-sidecar/lib/python3*/site-packages/pip"))
    assert not list(root.glob("usr/lib/python3*/site-packages/pip"))
    assert not (root / "opt" / "build-pip").exists() and not (root / "src").exists()
    with steps.step("python3 -c ssl.OPENSSL_VERSION in the root"):
        version = run_in_root(
            root,
            ["/opt/tls-sidecar/bin/python", "-c", "import ssl; print(ssl.OPENSSL_VERSION)"],
            60,
            user="65532:65532",
        )
    assert version.startswith("OpenSSL 3.5"), version
    writes = (
        "import os, sys\n"
        "open('/tmp/ok', 'w').close()\n"
        "try:\n    open('/etc/written', 'w')\nexcept OSError as e:\n    sys.exit(e.strerror)\n"
    )
    with pytest.raises(AssertionError, match="Read-only file system"):
        run_in_root(root, ["/opt/tls-sidecar/bin/python", "-c", writes], 60)
    assert not (root / "etc" / "written").exists()
    env, user, argv = dockerfile_final_stage()
    assert user == "65532:65532" and argv == ["tls-sidecar", "serve"]
    assert env["PATH"].startswith("/opt/tls-sidecar/bin:")
    assert "harden)" in SCRIPT.read_text()


def test_the_image_root_serves_as_user_65532_read_only_and_drains_on_sigterm(
    image_root: tuple[Path, Steps],
) -> None:
    root, steps = image_root
    _, _, image_argv = dockerfile_final_stage()
    # The demo app (with its own proxy) in the root, then the image's own command in front of it.
    with steps.step("start tls-sidecar demo in the root"):
        demo = start(
            root,
            [
                "tls-sidecar",
                "demo",
                "--app-listen",
                "127.0.0.1:0",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--certs-dir",
                "/tmp/certs",
            ],
        )
        app = demo.line("demo app   http://").split("demo app   ")[1].split()[0]
    try:
        with steps.step("start the image's ENTRYPOINT + CMD (tls-sidecar serve) in the root"):
            sidecar = start(
                root,
                image_argv,
                {
                    "TLS_SIDECAR_UPSTREAM": app,
                    "TLS_SIDECAR_LISTEN": "127.0.0.1:0",
                    "TLS_SIDECAR_ADMIN_LISTEN": "127.0.0.1:0",
                    "TLS_SIDECAR_LOG_FORMAT": "text",
                },
            )
            port, admin = sidecar.ports()
        try:
            status = Path(f"/proc/{sidecar.inner_pid}/status").read_text()
            assert "\nUid:\t65532\t65532\t65532\t65532\n" in status, status
            assert "\nGid:\t65532\t65532\t65532\t65532\n" in status, status
            nspid = next(x for x in status.splitlines() if x.startswith("NSpid:"))
            assert nspid.split()[-1] == "1", "the sidecar is PID 1 in its namespace"
            assert any(
                "post-quantum key exchange (X25519MLKEM768) available" in x for x in sidecar.lines
            )
            with steps.step("curl over HTTP/1.1 and HTTP/2, /readyz, /metrics"):
                for flag, version in (("--http1.1", "1.1"), ("--http2", "2")):
                    done = curl(
                        "-k", flag, "-w", "\n%{http_version}", f"https://127.0.0.1:{port}/hello"
                    )
                    body, _, seen = done.stdout.rpartition("\n")
                    assert done.returncode == 0 and seen == version, done.stdout + done.stderr
                    assert json.loads(body)["path"] == "/hello", "the demo app's answer"
                ready = curl("-f", f"http://127.0.0.1:{admin}/readyz")
                assert ready.returncode == 0, ready.stderr
                metrics = curl("-f", f"http://127.0.0.1:{admin}/metrics").stdout
                assert 'openssl="OpenSSL 3.5' in metrics, "build_info carries the OpenSSL version"
                # the image's HTTP/2 is nghttp2's: built in the build stage, libnghttp2-14 here
                assert 'http2_codec="nghttp2"' in metrics, "HTTP/2 on the nghttp2 codec"
                # and the core is the compiled one, built in the same stage
                assert 'compiled="true"' in metrics, "the compiled core"
            with steps.step("openssl s_client -groups X25519MLKEM768 from the root"):
                out = s_client(root, port, "X25519MLKEM768")
            print("\ns_client -groups X25519MLKEM768:\n" + "\n".join(group_lines(out)))
            assert "Negotiated TLS1.3 group: X25519MLKEM768" in group_lines(out), out
            with steps.step("SIGTERM: drain and exit"):
                os.kill(sidecar.inner_pid, signal.SIGTERM)
                assert sidecar.proc.wait(60) == 0, "".join(sidecar.lines)
            assert any(" stopped" in x for x in sidecar.lines), "it drained and stopped"
            assert not any("Traceback" in x for x in sidecar.lines), "".join(sidecar.lines)
        finally:
            sidecar.stop()
        with steps.step("--tls-groups X25519 refuses an X25519MLKEM768-only client"):
            classic = start(
                root,
                [*image_argv, "--tls-groups", "X25519", "--upstream", app],
                {
                    "TLS_SIDECAR_LISTEN": "127.0.0.1:0",
                    "TLS_SIDECAR_ADMIN_LISTEN": "127.0.0.1:0",
                    "TLS_SIDECAR_LOG_FORMAT": "text",
                },
            )
            try:
                classic_port, _ = classic.ports()
                classic_pid = classic.inner_pid
                refused = s_client(root, classic_port, "X25519MLKEM768")
                accepted = s_client(root, classic_port, "X25519")
            finally:
                classic.stop()
            wait_for(lambda: not running(classic_pid), 10, "the stopped sidecar to be gone")
        alert = [x for x in refused.splitlines() if "alert" in x]
        print("\n--tls-groups X25519, s_client -groups X25519MLKEM768:\n" + "\n".join(alert))
        assert "alert handshake failure" in "".join(alert), refused
        assert all(x.endswith("<NULL>") for x in group_lines(refused)), "no group was agreed"
        print("--tls-groups X25519, s_client -groups X25519:\n" + "\n".join(group_lines(accepted)))
        assert "Peer Temp Key: X25519, 253 bits" in group_lines(accepted), accepted
    finally:
        demo.stop()
