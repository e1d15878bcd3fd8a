"""What every downstream connection shares (settings, TLS, the pool, metrics, the registry of
open connections) and the access record each finished request writes. A plain holder: the
server builds the collaborators and passes them in."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from prometheus_client import Counter

from proxy.config import Config
from proxy.core import headers as hdr
from proxy.core.links import Pool
from proxy.core.request import RequestHead
from proxy.core.session import Session
from proxy.descriptors import DescriptorReserve
from proxy.identity import identity_name
from proxy.log import AccessLog, AccessRecord, FailureLog, connection_facts
from proxy.metrics import PROTOCOLS, Metrics
from proxy.tls.context import TlsState

log = logging.getLogger("tls_sidecar.server")


class Connection(Protocol):
    """A client connection as the registry and the drain see it."""

    @property
    def idle(self) -> bool: ...

    def begin_drain(self) -> None: ...
    def close(self) -> None: ...
    def abort_all(self) -> None: ...


class ClientPools(Protocol):
    """--upstream-proxy-protocol: a pool of app connections per client connection."""

    def open(
        self,
        session: Session,
        source: tuple[str, int],
        destination: tuple[str, int],
        alpn: str | None,
    ) -> Pool: ...
    def close(self, pool: Pool) -> None: ...


class ProxyContext:
    """What every downstream connection shares: settings, TLS, the pool, metrics, the registry."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        config: Config,
        tls: TlsState,
        metrics: Metrics,
        access_log: AccessLog,
        *,
        server_codec: Any,
        pool: Pool,
        protocols: dict[str, Callable[[ProxyContext], Any]],
    ) -> None:
        self.loop = loop
        self.config = config
        self.tls = tls
        self.metrics = metrics
        self.access_log = access_log
        self.http2 = config.http2
        # The HTTP/1.1 server codec's class, the pool of the upstream kind, and the connection
        # class for each protocol ALPN may choose besides http/1.1 ({"h2": Http2Connection}):
        # chosen by the server, so no protocol module imports another.
        self.server_codec = server_codec
        self.pool = pool
        self.protocols = protocols
        self.client_pools: ClientPools | None = None  # set by the server with PROXY out
        self.allowed_upgrades = frozenset(u.encode() for u in config.upgrades)
        self.connections: set[Connection] = set()
        self.draining = False
        upstream = config.upstream
        self.new_request_id = hdr.RequestIds()
        self.handshake_log = FailureLog()
        self.descriptors = DescriptorReserve.for_this_process(
            idle_upstreams=config.upstream_max_idle
        )
        self._refusal_log = FailureLog()
        self.upstream_host = upstream.authority.encode()
        # Exported at 0 from start-up, as the other counters with known labels are: a pod
        # whose every handshake fails still has a series to set its errors against.
        versions = ("TLSv1.3",) if config.tls_min_version == "1.3" else ("TLSv1.2", "TLSv1.3")
        self._handshake_children: dict[tuple[str, bool], Counter] = {
            (version, resumed): metrics.tls_handshakes.labels(version, str(resumed).lower())
            for version in versions
            for resumed in (False, True)
        }
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
        self.metrics.rejected.add("no_file_descriptors")
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
        protocol: bytes | None = None,
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
        facts = session.access_facts
        if facts is None:  # the first line of this connection
            identity = session.identity
            session.access_identity = identity_name(identity) if identity is not None else None
            facts = session.access_facts = connection_facts(
                session.client.address,
                session.tls_version,
                session.cipher,
                session.sni,
                session.access_identity,
                session.denied,
            )
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
                protocol=PROTOCOLS.get(head.version if head else protocol or b"", "-"),
                grpc_status=None if grpc_status is None else grpc_status.decode("latin-1"),
                host=host,
                user_agent=user_agent,
                sni=session.sni,
                cipher=session.cipher,
                upstream_status=upstream_status,
                identity=session.access_identity,
                denied=session.denied,
                trace_id=trace_id,
                event=event,
                facts=facts,
            )
        )
