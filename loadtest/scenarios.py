"""The benchmark scenarios S1-S6; each is bounded in time and request count."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .harness import Bench, H2Result, Target, rss_kib


@dataclass(frozen=True)
class Budget:
    seconds: int  # per h2load run
    s2_requests: int  # connections per S2 run
    s3_requests: int  # 10 MiB downloads per S3 run
    s5_connections: int


FULL = Budget(seconds=10, s2_requests=6000, s3_requests=200, s5_connections=1000)
SMOKE = Budget(seconds=1, s2_requests=200, s3_requests=8, s5_connections=50)


def _row(result: H2Result) -> dict[str, Any]:
    return {
        "req_s": round(result.requests_per_second, 1),
        "mb_s": round(result.bytes_per_second / 1e6, 1),
        "p50_ms": round(result.percentile(50), 3),
        "p99_ms": round(result.percentile(99), 3),
        "max_ms": round(max(result.latencies_ms), 3) if result.latencies_ms else None,
        "succeeded": result.succeeded,
        "failed": result.failed,
    }


def s1_keepalive(bench: Bench, target: Target, budget: Budget) -> dict[str, Any]:
    return _row(
        bench.h2load(
            f"{target.url}/small", "-c", "50", "-D", str(budget.seconds), "--warm-up-time", "1"
        )
    )


def s2_new_connections(bench: Bench, target: Target, budget: Budget) -> dict[str, Any]:
    result = bench.h2load(
        f"{target.url}/small",
        "-c",
        "20",
        "-n",
        str(budget.s2_requests),
        "-H",
        "Connection: close",
        timeout=max(60, budget.s2_requests / 100),
    )
    return _row(result)


def s3_downloads(bench: Bench, target: Target, budget: Budget) -> dict[str, Any]:
    return _row(
        bench.h2load(f"{target.url}/10m", "-c", "4", "-n", str(budget.s3_requests), timeout=300)
    )


def s4_fixed_rate(bench: Bench, target: Target, budget: Budget) -> dict[str, Any]:
    # 10 clients x 100 req/s = 1000 req/s
    seconds = max(budget.seconds, 2)
    return _row(bench.h2load(f"{target.url}/small", "-c", "10", "--rps", "100", "-D", str(seconds)))


def _memory(bench: Bench, target: Target, budget: Budget, *, h2: bool) -> dict[str, Any]:
    """RSS at rest, then with the budget's idle keep-alive connections (HTTP/2 with h2)."""
    assert target.pid is not None
    bench.h2load(f"{target.url}/small", "-c", "4", "-n", "200", h1=not h2)  # warm: lazy imports
    at_rest = rss_kib(target.pid)
    with bench.idle_tls_connections(target, budget.s5_connections, h2=h2) as opened:
        deadline = time.monotonic() + 2
        loaded = rss_kib(target.pid)
        while time.monotonic() < deadline:  # let the server finish settling its buffers
            time.sleep(0.1)
            loaded = max(loaded, rss_kib(target.pid))
    return {
        "rss_at_rest_mib": round(at_rest / 1024, 1),
        "rss_loaded_mib": round(loaded / 1024, 1),
        "connections": opened,
        "kib_per_connection": round((loaded - at_rest) / max(opened, 1), 1),
    }


def s5_memory(bench: Bench, target: Target, budget: Budget) -> dict[str, Any]:
    return _memory(bench, target, budget, h2=False)


def s5_h2_memory(bench: Bench, target: Target, budget: Budget) -> dict[str, Any]:
    return _memory(bench, target, budget, h2=True)


def _multiplexed(bench: Bench, url: str, budget: Budget, *extra: str) -> dict[str, Any]:
    """HTTP/2 load: 10 connections x 10 streams for the budget's seconds."""
    return _row(
        bench.h2load(
            url,
            "-c",
            "10",
            "-m",
            "10",
            "-D",
            str(budget.seconds),
            "--warm-up-time",
            "1",
            *extra,
            h1=False,
        )
    )


def s7_h2_multiplexed(bench: Bench, target: Target, budget: Budget) -> dict[str, Any]:
    return _multiplexed(bench, f"{target.url}/small", budget)


def s8_grpc_unary(bench: Bench, target: Target, budget: Budget) -> dict[str, Any]:
    return _multiplexed(
        bench,
        f"{target.url}/bench.Echo/Unary",
        budget,
        "-d",
        str(bench.grpc_message),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
    )


def s6_uploads(bench: Bench, target: Target, budget: Budget) -> dict[str, Any]:
    return _row(
        bench.h2load(
            f"{target.url}/upload", "-c", "10", "-D", str(budget.seconds), "-d", str(bench.upload)
        )
    )


SCENARIOS = {
    "S1": ("keep-alive, 50 connections, 6-byte responses", s1_keepalive),
    "S2": ("new TLS connection per request, session resumption", s2_new_connections),
    "S2full": ("new TLS connection per request, full handshakes", s2_new_connections),
    "S3": ("10 MiB downloads over 4 connections", s3_downloads),
    "S4": ("fixed 1000 req/s over 10 connections (latency)", s4_fixed_rate),
    "S5": ("memory: at rest and with idle keep-alive TLS connections", s5_memory),
    "S6": ("1 MiB uploads over 10 connections", s6_uploads),
    "S7": ("HTTP/2, 10 connections x 10 streams, 6-byte responses", s7_h2_multiplexed),
    "S8": ("gRPC unary over HTTP/2, 10 x 10 streams, to an h2c app", s8_grpc_unary),
    "S5h2": ("memory per idle HTTP/2 connection", s5_h2_memory),
}
