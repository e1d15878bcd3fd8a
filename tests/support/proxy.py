"""Start `tls-sidecar` as a real process on ephemeral ports, and talk to it like a client."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll until condition() is truthy; fail with `what` after timeout. No fixed sleeps."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


@dataclass(frozen=True)
class DevCerts:
    ca: Path
    cert: Path
    key: Path
    dir: Path


def serve_args(upstream: str, dev: DevCerts | None = None, *extra: str) -> list[str]:
    """`serve` on ephemeral ports in front of `upstream`, with `dev`'s certificate if given."""
    args = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--upstream",
        upstream,
    ]
    if dev is not None:
        args += ["--cert", str(dev.cert), "--key", str(dev.key)]
    return [*args, *extra]


@dataclass
class ProxyProcess:
    """A running `python -m proxy serve ...`; stdout (access log) and stderr (logs) are collected."""

    args: list[str]
    env: dict[str, str] | None = None
    # options for the interpreter itself, before `-m proxy` (e.g. `-X importtime`)
    interpreter: tuple[str, ...] = ()
    proc: subprocess.Popen[str] | None = None
    port: int = 0
    admin_port: int = 0
    stdout_lines: list[str] = field(default_factory=list)
    stderr_lines: list[str] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self, *, expect_ready: bool = True, timeout: float = 20) -> ProxyProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.update(self.env or {})
        self.proc = subprocess.Popen(
            [sys.executable, *self.interpreter, "-m", "proxy", *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for stream, sink in (
            (self.proc.stdout, self.stdout_lines),
            (self.proc.stderr, self.stderr_lines),
        ):
            thread = threading.Thread(target=_pump, args=(stream, sink), daemon=True)
            thread.start()
            self._threads.append(thread)
        if expect_ready:
            line = wait_for(
                lambda: self._listening() or self._exited(), timeout, "the listening line"
            )
            if line is True:
                raise AssertionError(f"proxy exited early: {self.stderr_text()}")
            self.port = _port(line["listen"][0])
            self.admin_port = _port(line["admin"][0])
        return self

    def _listening(self) -> dict[str, Any] | None:
        """The line that says where it listens: `listening`, or `supervising` with --workers."""
        for line in list(self.stderr_lines):
            if '"msg": "supervising"' in line or (
                '"msg": "listening"' in line and '"worker"' not in line
            ):
                return dict(json.loads(line))
        return None

    def _exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def stderr_text(self) -> str:
        return "\n".join(self.stderr_lines)

    def access_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in list(self.stdout_lines) if line.startswith("{")]

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        for thread in self._threads:
            thread.join(5)
        return code

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def admin_get(self, path: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=10)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()

    def metric(self, name: str, labels: str = "") -> float:
        """A sample's value from /metrics, e.g. metric('tls_sidecar_http_requests_total', 'code="200"')."""
        _, text = self.admin_get("/metrics")
        total = 0.0
        found = False
        for line in text.splitlines():
            if (
                line.startswith(name)
                and (line[len(name)] in " {")
                and all(part in line for part in labels.split(",") if part)
            ):
                total += float(line.rsplit(" ", 1)[1])
                found = True
        return total if found else float("nan")


def _pump(stream: Any, sink: list[str]) -> None:
    for line in stream:
        sink.append(line.rstrip("\n"))


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def client_context(ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    return ctx


def https(
    proxy: ProxyProcess,
    ca: Path,
    method: str = "GET",
    path: str = "/",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 20,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPSConnection(
        "localhost", proxy.port, context=client_context(ca), timeout=timeout
    )
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        conn.close()


@contextlib.contextmanager
def tls_socket(
    port: int, ca: Path, host: str = "127.0.0.1", timeout: float = 10
) -> Iterator[ssl.SSLSocket]:
    raw = socket.create_connection((host, port), timeout=timeout)
    sock = client_context(ca).wrap_socket(raw, server_hostname="localhost")
    try:
        yield sock
    finally:
        sock.close()


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        return next((v.decode() for n, v in self.headers if n == key), None)


class RawClient:
    """Raw bytes out, h11-parsed responses in: for pipelining and malformed-input tests."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.h11 = h11.Connection(h11.CLIENT)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_response(self, method: bytes = b"GET", head_only: bool = False) -> RawResponse | None:
        """The next response (to a request of `method`), or None when the proxy closed first."""
        if self.h11.our_state is h11.IDLE:
            self.expect_request(method, b"/")
        status = 0
        headers: list[tuple[bytes, bytes]] = []
        body = bytearray()
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError:
                return None
            if event is h11.NEED_DATA:
                data = self._recv()
                self.h11.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                status, headers = event.status_code, list(event.headers)
                if head_only:
                    return RawResponse(status, headers, b"")
            elif isinstance(event, h11.InformationalResponse):
                continue
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                    self.h11.start_next_cycle()
                return RawResponse(status, headers, bytes(body))
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None if not status else RawResponse(status, headers, bytes(body))

    def expect_request(self, method: bytes, target: bytes) -> None:
        """Tell the h11 parser which request a raw response answers (HEAD has no body)."""
        self.h11.send(h11.Request(method=method, target=target, headers=[(b"host", b"x")]))
        self.h11.send(h11.EndOfMessage())

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(262144)
        except (ConnectionResetError, ssl.SSLError):
            return b""

    def closed_by_peer(self, timeout: float = 10) -> bool:
        """True when the proxy closes the connection (EOF or reset) within timeout."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        except ssl.SSLError:
            return True


def request_bytes(
    method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body and not any(
        k.lower() in ("content-length", "transfer-encoding") for k in (headers or {})
    ):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
