"""The data path's accumulators: plain numbers it adds to (no locks, no label lookups), moved
into the exported metrics by `Metrics.flush`, on every scrape and every second in a worker."""

from __future__ import annotations

from prometheus_client import Counter


class Tally:
    """Counts by label values since the last flush, for a counter whose labels come from the
    proxy's own closed sets (reasons, codes): an error or abuse path adds a number, as the
    success path does, instead of looking up a child and taking its lock."""

    __slots__ = ("_children", "counter", "counts")

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.counts: dict[tuple[str, ...], int] = {}
        self._children: dict[tuple[str, ...], Counter] = {}

    def add(self, *labels: str) -> None:
        counts = self.counts
        counts[labels] = counts.get(labels, 0) + 1

    def flush(self) -> None:
        if not self.counts:
            return
        counts, self.counts = self.counts, {}
        children = self._children
        for labels, n in counts.items():
            child = children.get(labels)
            if child is None:
                child = children[labels] = self.counter.labels(*labels)
            child.inc(n)
