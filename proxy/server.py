"""Lifecycle: listeners, the connection registry, readiness, signals, drain and reload."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from . import codec
from . import headers as hdr
from .admin import AdminServer
from .config import Address, Config, ConfigError
from .descriptors import DescriptorReserve
from .downstream import ClientConnection, FailureLog
from .exchange import Session
from .h1 import Http1Connection
from .identity import identity_name
from .log import AccessLog, AccessRecord
from .metrics import PROTOCOLS, Metrics
from .request import RequestHead
from .tls import TlsState, out_of_descriptors
from .upstream import UpstreamPool, probe_upstream

if TYPE_CHECKING:
    from .upstream_h2 import H2UpstreamPool

log = logging.getLogger("tls_sidecar.server")

READINESS_CACHE_SECONDS = 1.0


class ProxyContext:
    """What every downstream connection shares: settings, TLS, the pool, metrics, the registry."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        config: Config,
        tls: TlsState,
        metrics: Metrics,
        access_log: AccessLog,
    ) -> None:
        self.loop = loop
        self.config = config
        self.tls = tls
        self.metrics = metrics
        self.access_log = access_log
        self.http = codec.resolve(config.http)
        self.http2 = config.http2
        self.server_codec = codec.server_codec_class(self.http)
        self.pool: UpstreamPool | H2UpstreamPool
        if config.upstream.h2c:
            from .upstream_h2 import H2UpstreamPool  # noqa: PLC0415

            self.pool = H2UpstreamPool(config, metrics, loop)
        else:
            self.pool = UpstreamPool(config, metrics, loop, codec.client_codec_class(self.http))
        self.allowed_upgrades = frozenset(u.encode() for u in config.upgrades)
        self.connections: set[ClientConnection] = set()
        self.draining = False
        upstream = config.upstream
        self.new_request_id = hdr.RequestIds()
        self.handshake_log = FailureLog()
        self.descriptors = DescriptorReserve.for_this_process(
            idle_upstreams=config.upstream_max_idle
        )
        self._refusal_log = FailureLog()
        self.upstream_host = (str(upstream.address) if upstream.address else "localhost").encode()
        self._handshake_children: dict[tuple[str, bool], Counter] = {}
        self._worker_connections = metrics.worker_connections_active.labels(
            str(config.worker_index or 0)
        )
        metrics.on_flush(self._export_connections)
        self._all_closed = asyncio.Event()

    def _export_connections(self) -> None:
        open_now = len(self.connections)
        self.metrics.connections_active.set(open_now)
        self._worker_connections.set(open_now)

    def handshake_done(self, version: str, resumed: bool) -> None:
        child = self._handshake_children.get((version, resumed))
        if child is None:
            child = self.metrics.tls_handshakes.labels(version, "true" if resumed else "false")
            self._handshake_children[(version, resumed)] = child
        child.inc()

    def refuse_for_descriptors(self, client: str) -> None:
        """A connection closed on accept: taking it would leave too few descriptors spare."""
        self.metrics.connections_rejected.labels("no_file_descriptors").inc()
        suppressed = self._refusal_log.allow("no_file_descriptors")
        if suppressed is not None:
            log.warning(
                "connection refused: out of file descriptors; raise the open-file limit "
                "(ulimit -n) or lower --max-connections",
                extra={
                    "client": client,
                    "open_file_limit": self.descriptors.limit,
                    "kept_free": self.descriptors.reserve,
                    "open_connections": len(self.connections),
                    "suppressed_since_last": suppressed,
                },
            )

    def connection_closed(self) -> None:
        self.descriptors.released()
        if not self.connections:
            self._all_closed.set()

    async def wait_all_closed(self) -> None:
        while self.connections:
            self._all_closed.clear()
            await self._all_closed.wait()

    def access(
        self,
        session: Session,
        head: RequestHead | None,
        *,
        status: int,
        bytes_in: int,
        bytes_out: int,
        duration: float,
        upstream_duration: float | None,
        request_id: bytes,
        local: str | None = None,
        detail: str | None = None,
        grpc_status: bytes | None = None,
        upstream_status: int | None = None,
        event: str | None = None,
    ) -> None:
        """One access-log line (built only when the access log is on)."""
        if not self.access_log.enabled:
            return
        host = user_agent = trace_id = None
        if head is not None:
            for name, value in head.headers:
                if name == b"host" and host is None:
                    host = value[:256].decode("latin-1")
                elif name == b"user-agent" and user_agent is None:
                    user_agent = value[:512].decode("latin-1")
                elif name == b"traceparent" and trace_id is None:
                    trace_id = hdr.trace_id(value)
        identity = session.identity
        self.access_log.write(
            AccessRecord(
                time=time.time(),
                client=session.client.address,
                method=head.method.decode("latin-1") if head else "-",
                path=head.target[:2048].decode("latin-1") if head else "-",
                status=status,
                bytes_in=bytes_in,
                bytes_out=bytes_out,
                duration=duration,
                upstream_duration=upstream_duration,
                tls_version=session.tls_version,
                request_id=request_id.decode("latin-1"),
                worker=self.config.worker_index,
                local=local,
                detail=detail,
                protocol=PROTOCOLS.get(head.version, "-") if head else "-",
                grpc_status=None if grpc_status is None else grpc_status.decode("latin-1"),
                host=host,
                user_agent=user_agent,
                sni=session.sni,
                cipher=session.cipher,
                upstream_status=upstream_status,
                identity=identity_name(identity) if identity is not None else None,
                denied=session.denied,
                trace_id=trace_id,
                event=event,
            )
        )


@dataclass(frozen=True, slots=True)
class Bound:
    """The addresses actually listened on (ports resolved when 0 was asked for)."""

    listen: list[Address]
    admin: list[Address]


def _addresses(sockets: Any) -> list[Address]:
    out = []
    for sock in sockets:
        name = sock.getsockname()
        out.append(Address(name[0], name[1]))
    return out


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc() -> bool:
    """Keep the TLS layer's read buffers out of mmap and off a trimmed heap top.

    uvloop reads TLS with `SSLObject.read(256 KiB)`: CPython allocates 256 KiB and shrinks it,
    per read. glibc serves that from mmap (or a heap top it trims back) until its dynamic
    threshold adapts, which can take a whole first load: measured, 2 page faults per request
    and half the throughput. Fixed thresholds above that size end it for the process's life.
    Only on glibc; elsewhere nothing happens. Returns whether the thresholds were set."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, 1024 * 1024) and mallopt(_M_TRIM_THRESHOLD, 2 * 1024 * 1024)
    )


def raise_open_file_limit(wanted: int) -> int:
    """Lift the soft RLIMIT_NOFILE toward the hard limit, as nginx's worker_rlimit_nofile and
    Go's runtime do: each client connection costs two descriptors (client and app side)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft < wanted:
        log.warning(
            "open-file limit is below what --max-connections needs; raise it (ulimit -n)",
            extra={"limit": soft, "needed": wanted},
        )
    return soft


def bind_error(option: str, address: Address, error: OSError) -> ConfigError:
    if error.errno == errno.EADDRINUSE:
        return ConfigError(
            f"{option} {address}: address already in use; stop the other process or pick "
            "another port"
        )
    if error.errno == errno.EACCES:
        return ConfigError(
            f"{option} {address}: permission denied; use a port above 1023 or grant "
            "CAP_NET_BIND_SERVICE"
        )
    if error.errno == errno.EADDRNOTAVAIL or isinstance(error, socket.gaierror):
        return ConfigError(f"{option} {address}: no such local address; check the host part")
    return ConfigError(f"{option} {address}: cannot listen ({error.strerror or error})")


class ProxyServer:
    """starting -> ready -> draining -> stopped."""

    def __init__(
        self,
        config: Config,
        *,
        metrics: Metrics | None = None,
        access_log: AccessLog | None = None,
        tls: TlsState | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.tls = tls or TlsState(config)
        self.access_log = access_log or AccessLog(config.log_format, config.access_log)
        self.state = "starting"
        self._ctx: ProxyContext | None = None
        self._listener: asyncio.Server | None = None
        self._admin: AdminServer | None = None
        self._stop = asyncio.Event()
        self._signals_seen = 0
        self._ready_lock = asyncio.Lock()
        self._upstream_checked_at = -1e9
        self._upstream_problem: str | None = "not checked yet"
        self._certificate_names: set[str] = set()
        self._record_certificates()
        self._watcher: asyncio.Task[None] | None = None
        self._reloads: set[asyncio.Task[bool]] = set()

    @property
    def ctx(self) -> ProxyContext:
        assert self._ctx is not None
        return self._ctx

    async def start(self) -> Bound:
        loop = asyncio.get_running_loop()
        config = self.config
        raise_open_file_limit(2 * config.max_connections)
        tune_malloc()
        self._ctx = ProxyContext(loop, config, self.tls, self.metrics, self.access_log)
        admin_sockets: list[socket.socket] = []
        if config.worker_index is None:  # workers leave the admin port to their supervisor
            self._admin = AdminServer(self.readiness, self.metrics)
            try:
                admin_sockets = await self._admin.start(config.admin_listen)
            except OSError as e:
                raise bind_error("--admin-listen", config.admin_listen, e) from None
        try:
            self._listener = await loop.create_server(
                lambda: Http1Connection(self.ctx),
                config.listen.host,
                config.listen.port,
                backlog=1024,
                reuse_address=True,
                reuse_port=config.worker_index is not None,
            )
        except OSError as e:
            if self._admin is not None:
                await self._admin.close()
            raise bind_error("--listen", config.listen, e) from None
        self.state = "ready"
        if config.worker_index is not None:
            self._flush_metrics_every_second()
        reloadable = not (self.tls.self_signed and self.config.client_ca is None)
        if self.config.reload_interval > 0 and reloadable:
            self._watcher = loop.create_task(self._watch_certificates())
        return Bound(_addresses(self._listener.sockets), _addresses(admin_sockets))

    def _flush_metrics_every_second(self) -> None:
        """A worker's metrics reach the supervisor through files: keep them at most 1 s old."""
        self.metrics.flush()
        if self.state != "stopped":
            self.ctx.loop.call_later(1.0, self._flush_metrics_every_second)

    async def readiness(self) -> tuple[bool, str]:
        """Ready only while serving, not draining, and while the app accepts connections."""
        if self.state != "ready":
            self.metrics.ready.set(0)
            return False, self.state
        async with self._ready_lock:
            now = asyncio.get_running_loop().time()
            if now - self._upstream_checked_at >= READINESS_CACHE_SECONDS:
                timeout = min(1.0, self.config.upstream_connect_timeout)
                self._upstream_problem = await probe_upstream(
                    self.config.upstream, timeout, self.config.upstream_health_path
                )
                self._upstream_checked_at = asyncio.get_running_loop().time()
                self.metrics.upstream_up.set(0 if self._upstream_problem else 1)
        ok = self._upstream_problem is None and self.state == "ready"
        self.metrics.ready.set(1 if ok else 0)
        return ok, "ready" if ok else (self._upstream_problem or self.state)

    def install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        self._signals_seen += 1
        if self._signals_seen > 1:
            open_connections = len(self._ctx.connections) if self._ctx else 0
            log.warning(
                "second stop signal: exiting now",
                extra={"signal": sig.name, "open_connections": open_connections},
            )
            self.access_log.flush()
            logging.shutdown()
            os._exit(128 + sig.value)
        log.info("stop signal: draining", extra={"signal": sig.name})
        self._stop.set()

    def _on_reload_signal(self) -> None:
        # The loop keeps only a weak reference to tasks: hold it until the reload is done.
        task = asyncio.get_running_loop().create_task(self.reload_certificates())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    def _record_certificates(self) -> None:
        expiry = self.metrics.certificate_expiry
        names = {served.name for served in self.tls.served}
        for gone in self._certificate_names - names:
            if self.config.worker_index is None:
                expiry.remove(gone)
            else:
                # prometheus-client cannot remove a series from a worker's multiprocess file
                # (remove() and clear() only warn): +Inf says "nothing expiring" for a
                # certificate no longer served, so no expiry alert fires for it.
                expiry.labels(gone).set(float("inf"))
        for served in self.tls.served:
            expiry.labels(served.name).set(served.not_after)
        self._certificate_names = names
        self.metrics.certificate_last_reload_success.set(time.time())

    async def reload_certificates(self) -> bool:
        loop = asyncio.get_running_loop()
        try:
            # OpenSSL takes milliseconds per context: build them off the event loop.
            served = await loop.run_in_executor(None, self.tls.reload)
        except (ConfigError, OSError) as e:
            if out_of_descriptors(e):
                # Not the certificates' fault: tried again at the next poll (or SIGHUP).
                log.warning(
                    "certificate reload postponed: no file descriptors left; trying again "
                    "at the next check",
                    extra={"reason": str(e)},
                )
                return False
            self.metrics.certificate_reloads.labels("failure").inc()
            log.error(
                "certificate reload failed; still serving the previous one",
                extra={"reason": str(e)},
            )
            return False
        self.metrics.certificate_reloads.labels("success").inc()
        self._record_certificates()
        log.info(
            "certificate reloaded",
            extra={"certificates": [f"{c.name}: {c.subject} serial {c.serial:x}" for c in served]},
        )
        return True

    async def _watch_certificates(self) -> None:
        """Poll the files' content; a change (a `..data` swap included) triggers a reload. The
        poll runs on the loop: no thread wakes while nothing changes."""
        interval = self.config.reload_interval
        while True:
            await asyncio.sleep(interval)
            try:
                changed = self.tls.changed()
            except OSError:
                continue
            if changed:
                await self.reload_certificates()

    def request_stop(self) -> None:
        self._stop.set()

    async def serve_until_stopped(self, on_ready: Callable[[Bound], None] | None = None) -> None:
        bound = await self.start()
        if on_ready:
            on_ready(bound)
        await self._stop.wait()
        await self.drain()

    async def drain(self) -> None:
        ctx = self.ctx
        config = self.config
        self.state = "draining"
        self.metrics.draining.set(1)
        self.metrics.ready.set(0)
        if config.shutdown_delay > 0:
            log.info(
                "readiness is now 503; serving on",
                extra={"shutdown_delay_s": config.shutdown_delay},
            )
            await asyncio.sleep(config.shutdown_delay)
        ctx.draining = True
        if self._watcher is not None:
            self._watcher.cancel()
        if self._listener is not None:
            self._listener.close()
        in_flight = [c for c in ctx.connections if not c.idle]
        log.info(
            "draining",
            extra={"in_flight": len(in_flight), "open_connections": len(ctx.connections)},
        )
        for connection in list(ctx.connections):
            connection.begin_drain()
        try:
            async with asyncio.timeout(config.drain_timeout):
                await ctx.wait_all_closed()
        except TimeoutError:
            log.warning(
                "drain timeout: closing the connections left",
                extra={"open_connections": len(ctx.connections)},
            )
            for connection in list(ctx.connections):
                connection.abort_all()
        ctx.pool.close_idle()
        self.metrics.flush()
        self.access_log.flush()
        if self._admin is not None:
            await self._admin.close()
        self.state = "stopped"
        log.info("stopped")
