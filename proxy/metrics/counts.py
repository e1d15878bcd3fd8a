"""The data path's accumulators: plain numbers every request adds to (bytes each way, requests
in flight, one histogram's worth of observations per method, code and protocol), read and reset
by `Metrics.flush`. Compiled with the core (proxy/compiled.py): the connections and the exchange
keep a typed reference, so adding is a field update in C, not an attribute lookup and a call
into the interpreter."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import Any

RequestKey = tuple[bytes, int, bytes]  # method, status code, protocol version


class Observed:
    """Observations of one histogram child since the last flush: plain numbers, no locks."""

    __slots__ = ("buckets", "count", "sum")

    def __init__(self, buckets: int) -> None:
        self.count = 0
        self.sum = 0.0
        self.buckets = [0] * buckets

    def flush_into(self, child: Any) -> None:
        """Add what was observed to `child` (a prometheus-client Histogram child), then reset."""
        # prometheus-client has no public "observe N values at once": add to the child's
        # bucket and sum values directly (le buckets: bisect_left finds the first bound >= v).
        buckets = self.buckets
        for i, n in enumerate(buckets):
            if n:
                child._buckets[i].inc(n)
                buckets[i] = 0
        child._sum.inc(self.sum)
        self.count = 0
        self.sum = 0.0


class DataCounts:
    """What the data path counts between two flushes. `new_entry` (set by `Metrics`) makes the
    exported series of a method, code and protocol seen for the first time and gives back its
    accumulator; it is called once per such key (unknown methods share one, as OTHER)."""

    def __init__(self, bounds: tuple[float, ...], new_entry: Callable[[RequestKey], Observed]):
        self.down_in = 0
        self.down_out = 0
        self.up_in = 0
        self.up_out = 0
        self.in_flight = 0
        self.bounds = bounds  # the latency buckets' upper bounds, +Inf last
        self.requests: dict[RequestKey, Observed] = {}
        self.upstream = Observed(len(bounds))
        self._new_entry = new_entry

    def request_done(self, method: bytes, code: int, seconds: float, version: bytes) -> None:
        key = (method, code, version)
        observed = self.requests.get(key)
        if observed is None:
            observed = self._new_entry(key)
        observed.count += 1
        observed.sum += seconds
        observed.buckets[bisect_left(self.bounds, seconds)] += 1

    def upstream_responded(self, seconds: float) -> None:
        observed = self.upstream
        observed.count += 1
        observed.sum += seconds
        observed.buckets[bisect_left(self.bounds, seconds)] += 1
