"""The exposition formats: the Prometheus text format, or OpenMetrics when the scraper asks for
it; for one process's registry and for the supervisor's sum of its workers' files."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


def render(registry: CollectorRegistry, accept: bytes) -> tuple[bytes, bytes]:
    """(content type, body): OpenMetrics when the scraper asks for it (Prometheus does, for
    exemplars and native formats), else the Prometheus text format."""
    if b"application/openmetrics-text" in accept:
        from prometheus_client.openmetrics import exposition as om  # noqa: PLC0415

        return om.CONTENT_TYPE_LATEST.encode(), om.generate_latest(registry)  # type: ignore[no-untyped-call]
    return CONTENT_TYPE_LATEST.encode(), generate_latest(registry)
