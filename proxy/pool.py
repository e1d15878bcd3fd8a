"""Connections to the app, for every upstream kind: opening one (TCP or unix socket) within the
connect timeout, with errors counted by reason."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable
from typing import TypeVar

from proxy.config import Upstream
from proxy.core.links import UpstreamConnectError
from proxy.metrics import Metrics

P = TypeVar("P", bound=asyncio.BaseProtocol)


async def open_to_app(
    loop: asyncio.AbstractEventLoop,
    target: Upstream,
    factory: Callable[[], P],
    limit: float,
    metrics: Metrics,
    then: Callable[[P], Awaitable[None]] | None = None,
) -> P:
    """A connection to the app (TCP or unix socket) within `limit`, `then` awaited in the same
    time; an UpstreamConnectError (counted by reason) when it cannot be had."""
    try:
        async with asyncio.timeout(limit):
            if target.unix_path:
                _, protocol = await loop.create_unix_connection(factory, target.unix_path)
            else:
                assert target.address is not None
                _, protocol = await loop.create_connection(
                    factory, target.address.host, target.address.port
                )
            if then is not None:
                await then(protocol)
    except TimeoutError:
        metrics.upstream_connect_errors.labels("timeout").inc()
        raise UpstreamConnectError(
            "timeout", 504, f"upstream {target} did not accept within {limit:g}s"
        ) from None
    except OSError as e:
        refused = e.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ECONNRESET)
        reason = "refused" if refused else "error"
        metrics.upstream_connect_errors.labels(reason).inc()
        raise UpstreamConnectError(
            reason, 502, f"upstream {target} {e.strerror or e}".rstrip()
        ) from None
    return protocol
