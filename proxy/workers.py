"""--workers N: a supervisor that runs N worker processes sharing the TLS port (SO_REUSEPORT).

The supervisor owns the admin port, readiness and the aggregated metrics; each worker is a
whole `serve` process (re-executed, not forked from a running loop) that drains on SIGTERM.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy import __version__
from proxy.admin import AdminServer
from proxy.config import Config, ConfigError, bind_error
from proxy.metrics import PREFIX, UPSTREAM_UP_HELP
from proxy.metrics.exposition import render
from proxy.process import listening_marker
from proxy.readiness import check_app
from proxy.sockets import dual_stack
from proxy.tls.tickets import TICKET_KEYS_SIZE

log = logging.getLogger("tls_sidecar.workers")

# Owned by the supervisor; the workers' copies are left out of the aggregate.
SUPERVISOR_METRICS = frozenset({f"{PREFIX}_ready", f"{PREFIX}_draining", f"{PREFIX}_upstream_up"})
RESTART_BACKOFF_SECONDS = 1.0


def cpu_quota_workers(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Workers for `--workers auto`: the container's CPU quota (cgroup v2, else v1), rounded up;
    without a quota, the CPUs this process may run on."""
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text())
        if quota_us > 0 and period_us > 0:
            return max(1, math.ceil(quota_us / period_us))
    except (OSError, ValueError):
        pass
    return max(1, len(os.sched_getaffinity(0)))


def die_with_parent() -> None:
    """Linux: a worker gets SIGTERM if its supervisor dies, instead of running on orphaned."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _WorkerMetrics:
    """The workers' metrics summed (prometheus-client multiprocess mode), minus supervisor-owned."""

    def __init__(self, directory: str) -> None:
        # Imported here: only a supervisor reads the workers' files (a worker or a single
        # process never loads the multiprocess collector).
        from prometheus_client.multiprocess import MultiProcessCollector  # noqa: PLC0415

        self._collector = MultiProcessCollector(None, path=directory)

    def collect(self) -> Iterator[object]:
        for family in self._collector.collect():
            if family.name not in SUPERVISOR_METRICS:
                yield family


class SupervisorMetrics:
    """Duck-types metrics.Metrics for the admin server."""

    def __init__(self, multiproc_dir: str) -> None:
        r = self.registry = CollectorRegistry()
        r.register(_WorkerMetrics(multiproc_dir))  # type: ignore[arg-type]
        self.ready = Gauge(f"{PREFIX}_ready", "1 when /readyz answers 200, else 0.", registry=r)
        self.draining = Gauge(f"{PREFIX}_draining", "1 while shutting down, else 0.", registry=r)
        self.upstream_up = Gauge(f"{PREFIX}_upstream_up", UPSTREAM_UP_HELP, registry=r)
        self.workers = Gauge(f"{PREFIX}_workers", "Worker processes running now.", registry=r)
        self.worker_restarts = Counter(
            f"{PREFIX}_worker_restarts", "Workers that died and were started again.", registry=r
        )

    def exposition(self, accept: bytes = b"") -> tuple[bytes, bytes]:
        return render(self.registry, accept)


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    def __init__(self, config: Config, worker_argv: list[str]) -> None:
        self.config = config
        self.worker_argv = worker_argv
        self.workers: dict[int, Worker] = {}
        self.state = "starting"
        self._multiproc = tempfile.mkdtemp(prefix="tls-sidecar-metrics-")
        # One set of session ticket keys for every worker, for the supervisor's life (as nginx
        # shares its keys between workers): a session resumes whichever worker gets the client.
        self._ticket_keys = os.urandom(TICKET_KEYS_SIZE)
        self.metrics = SupervisorMetrics(self._multiproc)
        self._stop = asyncio.Event()
        self._signals = 0
        self._reserved: socket.socket | None = None
        self._port = 0
        self._ready_checked = -1e9
        self._ready_problem: str | None = "not checked yet"

    def _reserve_port(self) -> int:
        """Bind (not listen) with SO_REUSEPORT: fixes the port, also when :0 was asked for."""
        address = self.config.listen
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if dual_stack(address.host):  # as the workers' own sockets (sockets.py)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            sock.bind((address.host, address.port))
        except OSError as e:
            sock.close()
            raise bind_error("--listen", address, e) from None
        self._reserved = sock
        return int(sock.getsockname()[1])

    def _spawn(self, index: int) -> Worker:
        host = self.config.listen.host
        listen = f"[{host}]:{self._port}" if ":" in host else f"{host}:{self._port}"
        argv = [
            sys.executable,
            "-m",
            "proxy",
            *self.worker_argv,
            "--listen",
            listen,
            "--workers",
            "1",
            "--worker-index",
            str(index),
        ]
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=self._multiproc)
        # The keys travel through a pipe the worker inherits: not argv, not the environment.
        read_end, write_end = os.pipe()
        os.write(write_end, self._ticket_keys)
        os.close(write_end)
        argv += ["--ticket-keys-fd", str(read_end)]
        try:
            proc = subprocess.Popen(
                argv,
                env=env,
                preexec_fn=die_with_parent,  # noqa: PLW1509
                pass_fds=(read_end,),
            )
        finally:
            os.close(read_end)
        log.info("worker started", extra={"worker": index, "pid": proc.pid})
        return Worker(index, proc)

    async def readiness(self) -> tuple[bool, str]:
        if self.state != "ready":
            self.metrics.ready.set(0)
            return False, self.state
        alive = sum(1 for w in self.workers.values() if w.proc.poll() is None)
        if alive < len(self.workers):
            self.metrics.ready.set(0)
            return False, f"{len(self.workers) - alive} of {len(self.workers)} workers are down"
        waiting = sum(
            1
            for w in self.workers.values()
            if not listening_marker(self._multiproc, w.proc.pid).exists()
        )
        if waiting:
            self.metrics.ready.set(0)
            return False, f"{waiting} of {len(self.workers)} workers are not listening yet"
        now = time.monotonic()
        if now - self._ready_checked >= 1.0:
            check = await check_app(self.config, min(1.0, self.config.upstream_connect_timeout))
            self._ready_problem = check.problem
            self._ready_checked = time.monotonic()
            self.metrics.upstream_up.set(1 if check.connected else 0)
        ok = self._ready_problem is None
        self.metrics.ready.set(1 if ok else 0)
        return ok, "ready" if ok else (self._ready_problem or "not ready")

    async def _watch(self) -> None:
        # uvloop keeps SIGCHLD for itself; polling a handful of children costs nothing.
        while True:
            self._reap()
            await asyncio.sleep(0.2)

    def _reap(self) -> None:
        """Collect exited workers; start again any that died while serving."""
        for index, worker in list(self.workers.items()):
            code = worker.proc.poll()
            if code is None:
                continue
            self._forget_gauges(worker.proc.pid)
            if self.state == "ready":
                log.error(
                    "worker exited; starting it again",
                    extra={"worker": index, "pid": worker.proc.pid, "exit_code": code},
                )
                self.metrics.worker_restarts.inc()
                delay = RESTART_BACKOFF_SECONDS if time.monotonic() - worker.started < 5 else 0
                asyncio.get_running_loop().call_later(delay, self._restart, index)
                del self.workers[index]
        self.metrics.workers.set(sum(1 for w in self.workers.values() if w.proc.poll() is None))

    def _forget_gauges(self, pid: int) -> None:
        """Remove a dead worker's gauge files, whatever their mode. prometheus-client's
        mark_process_dead removes only the live* ones: a dead worker's `min` or `max` values
        would otherwise take part in the aggregate for the supervisor's life. Counter and
        histogram files stay: the totals must not go back."""
        for path in Path(self._multiproc).glob(f"gauge_*_{pid}.db"):
            path.unlink(missing_ok=True)
        listening_marker(self._multiproc, pid).unlink(missing_ok=True)

    def _restart(self, index: int) -> None:
        if self.state == "ready" and index not in self.workers:
            self.workers[index] = self._spawn(index)
            self.metrics.workers.set(len(self.workers))

    def _on_stop(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second stop signal: stopping the workers now", extra={"signal": sig.name})
            for worker in self.workers.values():
                if worker.proc.poll() is None:
                    worker.proc.kill()
            os._exit(128 + sig.value)
        log.info("stop signal: draining the workers", extra={"signal": sig.name})
        self._stop.set()

    def _forward(self, sig: signal.Signals) -> None:
        for worker in self.workers.values():
            if worker.proc.poll() is None:
                worker.proc.send_signal(sig)

    async def run(self, workers: int) -> None:
        loop = asyncio.get_running_loop()
        self._port = self._reserve_port()
        admin = AdminServer(self.readiness, self.metrics)  # type: ignore[arg-type]
        try:
            admin_sockets = await admin.start(self.config.admin_listen)
        except OSError as e:
            raise bind_error("--admin-listen", self.config.admin_listen, e) from None
        for index in range(workers):
            self.workers[index] = self._spawn(index)
        self.metrics.workers.set(workers)
        watcher = loop.create_task(self._watch())
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        self.state = "ready"
        admin_addresses = [f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in admin_sockets]
        log.info(
            "supervising",
            extra={
                "listen": [f"{self.config.listen.host}:{self._port}"],
                "admin": admin_addresses,
                "workers": workers,
                "version": __version__,
            },
        )
        await self._stop.wait()
        watcher.cancel()
        self.state = "draining"
        self.metrics.draining.set(1)
        self.metrics.ready.set(0)
        if self.config.shutdown_delay > 0:
            await asyncio.sleep(self.config.shutdown_delay)
        self._forward(signal.SIGTERM)
        deadline = time.monotonic() + self.config.drain_timeout + 5
        while any(w.proc.poll() is None for w in self.workers.values()):
            if time.monotonic() > deadline:
                self._forward(signal.SIGKILL)
                break
            await asyncio.sleep(0.05)
        codes = {w.index: w.proc.wait() for w in self.workers.values()}
        await admin.close()
        if self._reserved is not None:
            self._reserved.close()
        for path in [
            *Path(self._multiproc).glob("*.db"),
            *Path(self._multiproc).glob("listening-*"),
        ]:
            path.unlink(missing_ok=True)
        os.rmdir(self._multiproc)
        log.info("stopped", extra={"worker_exit_codes": codes})
        if any(codes.values()):
            raise SystemExit(1)


def check_workers(value: str) -> int:
    if value == "auto":
        return cpu_quota_workers()
    if value.isdigit() and 1 <= int(value) <= 256:
        return int(value)
    raise ConfigError(f"--workers: {value!r} must be a number 1-256 or auto")
