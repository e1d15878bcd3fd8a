"""File descriptors kept in reserve, so that running out of them is seen and survived.

When every descriptor the process may open is taken, the event loop's accept fails with
EMFILE. uvloop never tells Python: libuv keeps one spare descriptor for this case, closes it,
accepts every pending connection and closes each at once, then opens the spare again (its
"EMFILE trick"), so the clients see a reset and the proxy logs and counts nothing; the admin
port, on the same loop, is treated alike, so /metrics and /readyz stop answering. (asyncio's
own loop logs the error and stops accepting for a second instead.) And whatever else needs a
descriptor meanwhile fails: a connection to the app, a certificate reload.

So a client connection is admitted only while, with it and a connection to the app it may
need, some descriptors stay free for the admin port, health checks and reloads. A connection
refused for that is closed at once, counted and logged (see server.ProxyContext), and the
data listener keeps accepting: each refusal costs one accept and one close, done when a
client connects, never in a loop of its own.
"""

from __future__ import annotations

import os
import resource
import time

FD_DIRECTORY = "/proc/self/fd"  # Linux; elsewhere nothing is counted and all is admitted
RECOUNT_WHILE_FULL_SECONDS = 0.1


def reserve_for(limit: int) -> int:
    """Descriptors kept free: the admin port, probes, a reload's helper (pipes, temp files)
    and app connections being opened; an eighth of a small limit, 16 to 64 (pure)."""
    return min(64, max(16, limit // 8))


def open_descriptors() -> int | None:
    """Descriptors open in this process now; None where that cannot be counted."""
    try:
        return len(os.listdir(FD_DIRECTORY)) - 1  # the listing's own descriptor
    except OSError:
        return None


class DescriptorReserve:
    """Admits client connections while `reserve` descriptors stay free after each.

    Counting costs a listing of /proc/self/fd, so it is done only near the limit: while fewer
    connections are open than could reach it (two descriptors each, client and app side, plus
    the pool's idle app connections), one comparison admits. Near it, a count admits that many
    more connections as it leaves room for; once full, connections are refused without a
    count until a connection closes or RECOUNT_WHILE_FULL_SECONDS pass."""

    def __init__(self, limit: int, *, idle_upstreams: int) -> None:
        self.limit = limit
        self.reserve = reserve_for(limit)
        baseline = open_descriptors()
        self._countable = baseline is not None and 0 < limit < 2**31
        self._unchecked = (limit - self.reserve - (baseline or 0) - idle_upstreams) // 2
        self._credit = 0
        self._full_since: float | None = None

    @classmethod
    def for_this_process(cls, *, idle_upstreams: int) -> DescriptorReserve:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return cls(soft if soft != resource.RLIM_INFINITY else 0, idle_upstreams=idle_upstreams)

    def admits(self, connections: int) -> bool:
        """Whether a connection just accepted (its descriptor open already) may stay, with
        `connections` others open."""
        if not self._countable or connections < self._unchecked:
            return True
        if self._credit > 0:
            self._credit -= 1
            return True
        now = time.monotonic()
        if self._full_since is not None and now - self._full_since < RECOUNT_WHILE_FULL_SECONDS:
            return False
        used = open_descriptors()
        spare = self.limit - (self.limit if used is None else used) - 1 - self.reserve
        if spare < 0:
            self._full_since = now
            return False
        self._full_since = None
        self._credit = spare // 2
        return True

    def released(self) -> None:
        """A connection closed: the next one is counted again rather than refused unseen."""
        self._full_since = None
