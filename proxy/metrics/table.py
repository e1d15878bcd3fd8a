"""The README's metrics table, generated from the definitions (`python -m proxy.metrics`); a
test keeps the two equal."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from proxy.metrics import PREFIX, Metrics


def reference() -> str:
    """The README's metrics table, generated from the definitions in `proxy.metrics`."""
    metrics = Metrics()
    rows = ["| metric | type | labels | meaning |", "| --- | --- | --- | --- |"]
    families = [
        v
        for v in vars(metrics).values()
        if isinstance(v, Counter | Gauge | Histogram) and not v._labelvalues  # not a child
    ]
    for collector in families:
        for family in collector.collect():
            if not family.name.startswith(PREFIX):
                continue
            labels = list(getattr(collector, "_labelnames", ()))
            suffix = "_total" if family.type == "counter" else ""
            name = family.name.removeprefix(PREFIX + "_") + suffix
            rows.append(
                f"| `{name}` | {family.type} | {', '.join(f'`{x}`' for x in labels)} | "
                f"{family.documentation} |"
            )
    return "\n".join(rows) + "\n"
