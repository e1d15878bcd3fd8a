"""Starts the upstream, tls-sidecar and the nginx reference; runs h2load against each; measures."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.tls import certs

REPO = Path(__file__).resolve().parents[1]
APT_HINT = "apt-get install -y nghttp2-client nginx haproxy caddy"


class MissingTool(Exception):
    pass


def optional_tool(name: str, fallback: str) -> str | None:
    path = shutil.which(name) or fallback
    return path if os.path.exists(path) else None


def require_tools() -> tuple[str, str]:
    h2load, nginx = shutil.which("h2load"), shutil.which("nginx") or "/usr/sbin/nginx"
    missing = [
        name
        for name, path in (("h2load", h2load), ("nginx", nginx))
        if not path or not os.path.exists(path)
    ]
    if missing:
        raise MissingTool(f"{' and '.join(missing)} not found; install with: {APT_HINT}")
    assert h2load is not None
    return h2load, nginx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User and system CPU of the process and its children now alive (nginx's workers), all
    threads included: what a target spent, which moves far less than throughput on a shared
    machine."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for each in (pid, *children(pid)):
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@dataclass
class H2Result:
    requests_per_second: float
    bytes_per_second: float
    succeeded: int
    failed: int
    latencies_ms: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def parse_h2load(output: str, log_file: Path | None) -> H2Result:
    finished = re.search(
        r"finished in [\d.]+(?:m|u)?s, ([\d.]+) req/s, ([\d.]+)([KMG]?B)/s", output
    )
    requests = re.search(
        r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", output
    )
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", output)
    if not finished or not requests or not codes:
        raise RuntimeError(f"unexpected h2load output:\n{output}")
    latencies: list[float] = []
    if log_file is not None and log_file.exists():
        for line in log_file.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3 and parts[1].startswith("2"):
                latencies.append(int(parts[2]) / 1000)
    return H2Result(
        float(finished.group(1)),
        float(finished.group(2)) * _UNITS[finished.group(3)],
        int(codes.group(1)),
        # h2load counts any complete response as succeeded; a non-2xx answer is a failure here
        int(requests.group(2)) + sum(int(codes.group(i)) for i in (2, 3, 4)),
        latencies,
    )


@dataclass
class Target:
    name: str
    url: str  # base URL, no trailing slash
    pid: int | None = None  # the process whose memory S5 measures
    proc: subprocess.Popen[bytes] | None = None  # the process to stop


class Bench:
    """Owns every process it starts and stops each by its PID."""

    def __init__(self, work: Path, *, pin: bool, progress: Callable[[str], None]) -> None:
        self.h2load_bin, self.nginx = require_tools()
        # Extra anchors: measured when installed, left out of the table when not.
        self.haproxy = optional_tool("haproxy", "/usr/sbin/haproxy")
        self.caddy = optional_tool("caddy", "/usr/bin/caddy")
        self.work = work
        self.pin = pin and (os.cpu_count() or 1) >= 2
        self.progress = progress
        self.procs: list[subprocess.Popen[bytes]] = []
        self.grpc_upstream: Target | None = None
        self._runs = 0
        self._make_files()

    # --- processes ------------------------------------------------------------------------------
    def _cmd(self, core: int, argv: list[str]) -> list[str]:
        return ["taskset", "-c", str(core), *argv] if self.pin and shutil.which("taskset") else argv

    def _spawn(
        self, argv: list[str], core: int, log_name: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.work / log_name).open("wb")
        proc = subprocess.Popen(
            self._cmd(core, argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, **env} if env else None,
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> int:
        """SIGTERM, then SIGKILL after 15 s; returns the exit code (-9 when it had to be killed)."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.returncode

    def close(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)

    def _make_files(self) -> None:
        self.work.chmod(0o755)  # nginx workers run as an unprivileged user and read www/
        ca = certs.create_ca("loadtest CA")
        leaf = certs.issue(ca, ["localhost", "127.0.0.1"])
        self.cert, self.key, self.ca = (
            self.work / "tls.crt",
            self.work / "tls.key",
            self.work / "ca.crt",
        )
        self.cert.write_bytes(leaf.cert_pem)
        certs.write_private(self.key, leaf.key_pem)
        self.ca.write_bytes(ca.cert_pem)
        self.upload = self.work / "1m.bin"
        self.upload.write_bytes(os.urandom(1024 * 1024))
        (self.work / "www").mkdir(exist_ok=True)
        (self.work / "www" / "10m").write_bytes(b"x" * (10 * 1024 * 1024))
        # S8: one unary gRPC message each way ("hello" framed: no compression, 5 bytes)
        self.grpc_message = self.work / "grpc.bin"
        self.grpc_message.write_bytes(GRPC_HELLO)
        (self.work / "www" / "bench.Echo").mkdir(exist_ok=True)
        (self.work / "www" / "bench.Echo" / "Unary").write_bytes(GRPC_HELLO)

    def start_upstream(self, builtin: bool) -> Target:
        """The app: nginx (or the built-in Python one). With nginx, `grpc_upstream` is the h2c
        gRPC app of S8 in the same process."""
        port = free_port()
        grpc_port = free_port()
        if builtin:
            proc = self._spawn(
                [sys.executable, "-m", "loadtest.upstream", str(port)], 1, "upstream.log"
            )
        else:
            conf = self.work / "upstream.conf"
            conf.write_text(
                _NGINX_HEAD.format(work=self.work, name="upstream")
                + f"""
http {{
  access_log off;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    client_max_body_size 0;
    location = /small {{ default_type text/plain; return 200 "hello\\n"; }}
    location = /10m {{ root {self.work / "www"}; }}
    location = /upload {{ return 200 "ok\\n"; }}
  }}
  server {{
    # the gRPC app of S8: h2c, a fixed unary answer with grpc-status in the trailers
    listen 127.0.0.1:{grpc_port} http2 backlog=4096;
    http2_max_requests 1000000;
    location / {{
      root {self.work / "www"};
      error_page 405 =200 $uri;  # POST to a static file
      default_type application/grpc;
      add_trailer grpc-status 0 always;
    }}
  }}
}}
"""
            )
            proc = self._spawn(
                [self.nginx, "-c", str(conf), "-p", str(self.work)], 1, "upstream.log"
            )
        wait_port(port, proc)
        if not builtin:
            wait_port(grpc_port, proc)
            self.grpc_upstream = Target("direct", f"h2c://127.0.0.1:{grpc_port}", proc.pid, None)
        return Target("direct", f"http://127.0.0.1:{port}", proc.pid, proc)

    def start_proxy(
        self,
        upstream: Target,
        *,
        resumption: bool = True,
        http: str = "httptools",
        compiled: bool = True,
        http2_codec: str = "auto",
    ) -> Target:
        port, admin = free_port(), free_port()
        argv = [
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--admin-listen",
            f"127.0.0.1:{admin}",
            "--upstream",
            upstream.url,
            "--cert",
            str(self.cert),
            "--key",
            str(self.key),
            "--no-access-log",
            "--max-body-bytes",
            "unlimited",
            "--http",
            http,
            "--http2-codec",
            http2_codec,
        ]
        if not resumption:
            argv.append("--no-tls-session-resumption")
        # TLS_SIDECAR_COMPILED=0: the compiled core's modules from their sources
        env = None if compiled else {"TLS_SIDECAR_COMPILED": "0"}
        proc = self._spawn(argv, 0, f"proxy-{http}-{http2_codec}-{compiled}.log", env)
        wait_port(port, proc)
        name = "tls-sidecar" if http == "httptools" else f"tls-sidecar {http}"
        if http2_codec == "h2":
            name += " h2"
        if not compiled:
            name += " interpreted"
        return Target(name, f"https://127.0.0.1:{port}", proc.pid, proc)

    def start_haproxy(self, upstream: Target, *, resumption: bool = True) -> Target:
        """HAProxy as a TLS-terminating HTTP proxy, one thread, keep-alive to the upstream."""
        assert self.haproxy is not None
        port = free_port()
        pem = self.work / "haproxy.pem"
        pem.write_bytes(self.cert.read_bytes() + self.key.read_bytes())
        pem.chmod(0o600)
        conf = self.work / f"haproxy-{port}.cfg"
        tickets = "" if resumption else " no-tls-tickets"
        cache = "" if resumption else "  tune.ssl.cachesize 0\n"
        conf.write_text(
            f"""global
  nbthread 1
  maxconn 8000
{cache}defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend tls
  bind 127.0.0.1:{port} ssl crt {pem} alpn http/1.1{tickets}
  default_backend app
backend app
  server app {upstream.url.removeprefix("http://")}
"""
        )
        proc = self._spawn([self.haproxy, "-db", "-f", str(conf)], 0, f"haproxy-{port}.log")
        wait_port(port, proc)
        return Target("haproxy", f"https://127.0.0.1:{port}", proc.pid, proc)

    def start_caddy(self, upstream: Target, *, resumption: bool = True) -> Target:
        """Caddy's reverse_proxy with GOMAXPROCS=1, HTTP/1.1 only, the same certificate."""
        assert self.caddy is not None
        port = free_port()
        conf = self.work / f"caddy-{port}.json"
        conf.write_text(
            json.dumps(
                {
                    "admin": {"disabled": True},
                    "logging": {"logs": {"default": {"level": "ERROR"}}},
                    "storage": {"module": "file_system", "root": str(self.work / "caddy")},
                    "apps": {
                        "http": {
                            "servers": {
                                "proxy": {
                                    "listen": [f"127.0.0.1:{port}"],
                                    "protocols": ["h1"],
                                    "automatic_https": {"disable": True},
                                    "tls_connection_policies": [
                                        {"certificate_selection": {"any_tag": ["bench"]}}
                                    ],
                                    "routes": [
                                        {
                                            "handle": [
                                                {
                                                    "handler": "reverse_proxy",
                                                    "upstreams": [
                                                        {
                                                            "dial": upstream.url.removeprefix(
                                                                "http://"
                                                            )
                                                        }
                                                    ],
                                                }
                                            ]
                                        }
                                    ],
                                }
                            }
                        },
                        "tls": {
                            "certificates": {
                                "load_files": [
                                    {
                                        "certificate": str(self.cert),
                                        "key": str(self.key),
                                        "tags": ["bench"],
                                    }
                                ]
                            },
                            "session_tickets": {"disabled": not resumption},
                        },
                    },
                }
            )
        )
        env = {
            "GOMAXPROCS": "1",
            "HOME": str(self.work),
            "XDG_DATA_HOME": str(self.work / "caddy"),
            "XDG_CONFIG_HOME": str(self.work / "caddy"),
        }
        proc = self._spawn(
            [self.caddy, "run", "--config", str(conf)], 0, f"caddy-{port}.log", env=env
        )
        wait_port(port, proc)
        return Target("caddy", f"https://127.0.0.1:{port}", proc.pid, proc)

    def start_baseline(self, kind: str, upstream: Target | None = None) -> Target:
        """A floor from loadtest.baselines: `pipe`, `parse`, `sockparse`, `h2relay` (in front of
        upstream), `h2` or `nghttp2`."""
        port = free_port()
        argv = [sys.executable, "-m", "loadtest.baselines", kind, str(port)]
        if upstream is not None:
            argv.append(upstream.url.rsplit(":", 1)[1])
        proc = self._spawn([*argv, str(self.cert), str(self.key)], 0, f"baseline-{kind}.log")
        wait_port(port, proc)
        return Target(f"{kind} floor", f"https://127.0.0.1:{port}", proc.pid, proc)

    def start_nginx_proxy(
        self, upstream: Target, *, resumption: bool = True, http2: bool = False
    ) -> Target:
        """nginx as a TLS proxy, one worker; with http2, ALPN h2 too; an h2c:// upstream is
        reached with grpc_pass (nginx's gRPC proxy)."""
        port = free_port()
        h2 = " http2" if http2 or upstream.url.startswith("h2c://") else ""
        address = upstream.url.split("://", 1)[1]
        if upstream.url.startswith("h2c://"):
            location = f"grpc_pass grpc://{address};"
        else:
            location = """proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-Forwarded-Proto https;"""
        conf = self.work / f"nginx-proxy-{port}.conf"
        sessions = "" if resumption else "ssl_session_tickets off; ssl_session_cache off;"
        conf.write_text(
            _NGINX_HEAD.format(work=self.work, name=f"nginx-proxy-{port}")
            + f"""
http {{
  access_log off;
  keepalive_requests 1000000;
  upstream app {{ server {address}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port} ssl{h2} backlog=4096;
    http2_max_requests 1000000;
    ssl_certificate {self.cert};
    ssl_certificate_key {self.key};
    ssl_protocols TLSv1.2 TLSv1.3;
    {sessions}
    client_max_body_size 0;
    location / {{
      {location}
    }}
  }}
}}
"""
        )
        proc = self._spawn(
            [self.nginx, "-c", str(conf), "-p", str(self.work)], 0, f"nginx-proxy-{port}.log"
        )
        wait_port(port, proc)
        workers = children(proc.pid)
        return Target(
            "nginx", f"https://127.0.0.1:{port}", workers[0] if workers else proc.pid, proc
        )

    # --- load -----------------------------------------------------------------------------------
    def h2load(self, url: str, *args: str, timeout: float = 120, h1: bool = True) -> H2Result:
        """Run h2load on core 1: HTTP/1.1 by default, HTTP/2 (ALPN h2) with h1=False."""
        self._runs += 1
        log_file = self.work / f"h2load-{self._runs}.log"
        protocol = ["--h1"] if h1 else []
        argv = self._cmd(1, [self.h2load_bin, *protocol, f"--log-file={log_file}", *args, url])
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        try:
            return parse_h2load(done.stdout, log_file)
        finally:
            log_file.unlink(missing_ok=True)

    @contextmanager
    def idle_tls_connections(
        self, target: Target, count: int, *, h2: bool = False
    ) -> Iterator[int]:
        """Open `count` keep-alive TLS connections, one request each (HTTP/2 with h2), and hold
        them open."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.check_hostname = False
        ctx.set_alpn_protocols(["h2"] if h2 else ["http/1.1"])
        port = int(target.url.rsplit(":", 1)[1])
        socks: list[ssl.SSLSocket] = []
        lock = threading.Lock()

        def opener(n: int) -> None:
            for _ in range(n):
                raw = socket.create_connection(("127.0.0.1", port), timeout=30)
                sock = ctx.wrap_socket(raw, server_hostname="localhost")
                if h2:
                    _h2_request(sock)
                else:
                    sock.sendall(b"GET /small HTTP/1.1\r\nHost: localhost\r\n\r\n")
                    data = b""
                    while b"hello" not in data:
                        chunk = sock.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                with lock:
                    socks.append(sock)

        threads = [
            threading.Thread(target=opener, args=(count // 10 + (1 if i < count % 10 else 0),))
            for i in range(10)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        try:
            yield len(socks)
        finally:
            for sock in socks:
                sock.close()


def _h2_request(sock: ssl.SSLSocket) -> None:
    """GET /small over HTTP/2 on `sock`, read until its stream ends; the connection stays."""
    import h2.config  # noqa: PLC0415
    import h2.connection  # noqa: PLC0415
    import h2.events  # noqa: PLC0415

    conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
    conn.initiate_connection()
    conn.send_headers(
        1,
        [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", b"localhost"),
            (b":path", b"/small"),
        ],
        end_stream=True,
    )
    sock.sendall(conn.data_to_send())
    while True:
        data = sock.recv(65536)
        if not data:
            return
        events = conn.receive_data(data)
        out = conn.data_to_send()
        if out:
            sock.sendall(out)
        if any(isinstance(e, h2.events.StreamEnded) for e in events):
            return


GRPC_HELLO = b"\x00\x00\x00\x00\x05hello"  # a gRPC length-prefixed message, uncompressed

_NGINX_HEAD = """
worker_processes 1;
daemon off;
pid {work}/{name}.pid;
error_log {work}/{name}.error.log warn;
events {{ worker_connections 8192; }}
"""


def summarize(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "runs": values} if values else {}
