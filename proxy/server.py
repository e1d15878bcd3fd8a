"""Lifecycle: listeners, the connection registry, readiness, signals, drain and reload."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from proxy import compiled, http1, http2
from proxy.admin import AdminServer
from proxy.config import Address, Config, ConfigError, bind_error
from proxy.core.context import ProxyContext
from proxy.core.links import Pool
from proxy.http1.connection import Http1Connection
from proxy.http1.upstream import UpstreamPool
from proxy.log import AccessLog
from proxy.metrics import Metrics
from proxy.pool import PoolBase
from proxy.process import listening_marker, raise_open_file_limit, tune_malloc
from proxy.readiness import check_app
from proxy.sockets import bind_dual_stack, dual_stack
from proxy.tls.context import TlsState, out_of_descriptors
from proxy.tls.source import tls_state
from proxy.upstream_proxy import ClientPools

if TYPE_CHECKING:
    from proxy.revalidation import Revalidation

log = logging.getLogger("tls_sidecar.server")

READINESS_CACHE_SECONDS = 1.0


def build_context(
    loop: asyncio.AbstractEventLoop,
    config: Config,
    tls: TlsState,
    metrics: Metrics,
    access_log: AccessLog,
) -> ProxyContext:
    """The shared context with the codec, the pool and the ALPN successors chosen here, once.

    Imported on demand: a process that serves no HTTP/2 loads no HTTP/2 codec, and one codec
    never loads the other (nghttp2's process never imports h2)."""
    http = http1.resolve(config.http)
    http2_codec = "off"
    pool: Pool
    if config.upstream.h2c:
        from proxy.http2.pool import H2UpstreamPool  # noqa: PLC0415

        pool = H2UpstreamPool(config, metrics, loop)
    else:
        pool = UpstreamPool(config, metrics, loop, http1.client_codec_class(http))
    protocols: dict[str, Callable[[ProxyContext], Any]] = {}
    if config.http2:
        from proxy.http2.server import Http2Connection  # noqa: PLC0415

        http2_codec = http2.resolve(config.http2_codec)
        codec = http2.server_codec_class(http2_codec)
        protocols["h2"] = functools.partial(Http2Connection, codec=codec)
    metrics.built(http2_codec, compiled.in_use())
    ctx = ProxyContext(
        loop,
        config,
        tls,
        metrics,
        access_log,
        server_codec=http1.server_codec_class(http),
        pool=pool,
        protocols=protocols,
    )
    if config.upstream_proxy_protocol is not None:
        ctx.client_pools = _client_pools(loop, config, metrics, pool, http)
    return ctx


def _client_pools(
    loop: asyncio.AbstractEventLoop, config: Config, metrics: Metrics, shared: Pool, http: str
) -> ClientPools:
    """Pools of the upstream kind, one per client connection, members of the shared one's gauge."""
    assert config.upstream_proxy_protocol is not None
    assert isinstance(shared, PoolBase)
    if config.upstream.h2c:
        from proxy.http2.pool import H2UpstreamPool  # noqa: PLC0415

        def new_pool(preface: bytes) -> Pool:
            return H2UpstreamPool(config, metrics, loop, preface=preface, shared=shared)

    else:
        codec = http1.client_codec_class(http)

        def new_pool(preface: bytes) -> Pool:
            return UpstreamPool(config, metrics, loop, codec, preface=preface, shared=shared)

    return ClientPools(config.upstream_proxy_protocol, new_pool)


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
        self.tls = tls or tls_state(config)
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
        self._crl_names: set[str] = set()
        self._record_certificates()
        self._watcher: asyncio.Task[None] | None = None
        self._revalidation: Revalidation | None = None  # --client-cert-revalidate
        self._reloads: set[asyncio.Task[bool]] = set()
        # One attempt at a time: two attempts built in executor threads could finish out of
        # order and serve the older files; the poll also waits for a SIGHUP's attempt before
        # checking whether the files changed, so one edit is one attempt.
        self._reload_lock = asyncio.Lock()

    @property
    def ctx(self) -> ProxyContext:
        assert self._ctx is not None
        return self._ctx

    def _accepted(self) -> asyncio.BaseProtocol:
        # a connection is an asyncio protocol by its methods, not its class (downstream.py)
        return cast(asyncio.BaseProtocol, Http1Connection(self.ctx))

    async def start(self) -> Bound:
        loop = asyncio.get_running_loop()
        config = self.config
        raise_open_file_limit(2 * config.max_connections)
        tune_malloc()
        self._ctx = build_context(loop, config, self.tls, self.metrics, self.access_log)
        admin_sockets: list[socket.socket] = []
        if config.worker_index is None:  # workers leave the admin port to their supervisor
            self._admin = AdminServer(self.readiness, self.metrics)
            try:
                admin_sockets = await self._admin.start(config.admin_listen)
            except OSError as e:
                raise bind_error("--admin-listen", config.admin_listen, e) from None
        if not await self._first_certificate(admin_sockets):
            raise SystemExit(0)  # a stop signal came first: nothing was served
        try:
            reuse_port = config.worker_index is not None
            if dual_stack(config.listen.host):
                self._listener = await loop.create_server(
                    self._accepted,
                    sock=bind_dual_stack(config.listen, reuse_port=reuse_port),
                    backlog=1024,
                )
            else:
                self._listener = await loop.create_server(
                    self._accepted,
                    config.listen.host,
                    config.listen.port,
                    backlog=1024,
                    reuse_address=True,
                    reuse_port=reuse_port,
                )
        except OSError as e:
            if self._admin is not None:
                await self._admin.close()
            raise bind_error("--listen", config.listen, e) from None
        self.state = "ready"
        if config.worker_index is not None:
            self._flush_metrics_every_second()
            if directory := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                listening_marker(directory, os.getpid()).touch()
        fixed = self.tls.self_signed and self.config.client_ca is None
        polled = not (fixed or self.tls.pushes)  # a source that pushes reloads on each push
        if self.config.reload_interval > 0 and polled:
            self._watcher = loop.create_task(self._watch_certificates())
        if config.client_cert_revalidate > 0:
            from proxy.revalidation import Revalidation  # noqa: PLC0415

            self._revalidation = Revalidation(self.ctx, config.client_cert_revalidate)
            self._revalidation.start()
        return Bound(_addresses(self._listener.sockets), _addresses(admin_sockets))

    async def _first_certificate(self, admin_sockets: list[socket.socket]) -> bool:
        """A pushed source's first certificate (readiness 503 meanwhile); each push reloads."""
        waiting = self.tls.problem
        if waiting is not None:
            admin = [str(a) for a in _addresses(admin_sockets)]
            log.info("waiting for the certificate", extra={"reason": waiting, "admin": admin})
        try:
            if not await self.tls.ready(self._stop):
                return False
        except BaseException:
            if self._admin is not None:
                await self._admin.close()
            raise
        self._record_certificates()
        self.tls.subscribe(self._on_reload_signal)
        return True

    def _flush_metrics_every_second(self) -> None:
        """A worker's metrics reach the supervisor through files: keep them at most 1 s old."""
        self.metrics.flush()
        if self.state != "stopped":
            self.ctx.loop.call_later(1.0, self._flush_metrics_every_second)

    async def readiness(self) -> tuple[bool, str]:
        """Ready only while serving, not draining, and while the app accepts connections."""
        problem = self.tls.problem
        if self.state != "ready" or problem is not None:
            self.metrics.ready.set(0)
            return False, problem or self.state
        async with self._ready_lock:
            now = asyncio.get_running_loop().time()
            if now - self._upstream_checked_at >= READINESS_CACHE_SECONDS:
                check = await check_app(self.config, min(1.0, self.config.upstream_connect_timeout))
                self._upstream_problem = check.problem
                self._upstream_checked_at = asyncio.get_running_loop().time()
                self.metrics.upstream_up.set(1 if check.connected else 0)
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
        crl_gauge = self.metrics.client_crl_next_update
        crls = self.tls.bundle.crls
        next_updates = dict(crls.next_updates) if crls is not None else {}
        for gone in self._crl_names - next_updates.keys():
            if self.config.worker_index is None:
                crl_gauge.remove(gone)
            else:  # as for certificates: a worker's file keeps the series
                crl_gauge.labels(gone).set(float("inf"))
        for name, next_update in next_updates.items():
            crl_gauge.labels(name).set(next_update)
        self._crl_names = set(next_updates)
        self.metrics.certificate_last_reload_success.set(time.time())

    async def reload_certificates(self) -> bool:
        async with self._reload_lock:
            return await self._reload_certificates()

    async def _reload_certificates(self) -> bool:
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
        if self._revalidation is not None:  # new CRLs or CAs count for open connections now
            self._revalidation.check_now()
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
            async with self._reload_lock:
                try:
                    changed = self.tls.changed()
                except OSError:
                    continue
                if changed:
                    await self._reload_certificates()

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
        self.tls.close()
        if self._revalidation is not None:
            self._revalidation.stop()
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
