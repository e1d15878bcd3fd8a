"""A soak (marked slow: `make test-slow`): a few minutes of mixed traffic with certificate swaps,
the proxies' descriptors and memory sampled. Rounds are bounded in count and time.

Each round runs at once, with h2load (the load test's driver, in processes of its own):
HTTP/1.1 keep-alive, a new TLS connection per request, HTTP/2 multiplexed, 1 MiB uploads and
unary gRPC (through a second proxy in front of nginx's h2c gRPC app), then swaps the certificate
the way the kubelet updates a Secret volume. It fails on any failed request, any traceback or
error line from a proxy, descriptors not back to their number at rest once the load is over, or
resident memory growing by more than RSS_GROWTH_BOUND_MIB between the first and the last round.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest

from loadtest.harness import Bench, H2Result, MissingTool, rss_kib
from proxy.tls import certs
from tests.integration.test_certificates import common_name, handshake, secret_volume_update
from tests.support.proxy import ProxyProcess, serve_args, wait_for

pytestmark = pytest.mark.slow

SOAK_SECONDS = float(os.environ.get("TLS_SIDECAR_SOAK_SECONDS", "150"))
MAX_ROUNDS = 6
# From the first round's end to the last's. A closed HTTP/1.1 connection and its codec used to
# reference each other, so each kept its TLS transport and buffers until a full collection:
# 25-40 MiB of growth over a soak. With the codec detached at close, 12 MiB over six rounds
# (50.6 -> 62.6 MiB); the rest is allocator high-water marks from 1 MiB uploads and HTTP/2. A
# leak per request or per connection (300k requests, 10k connections) shows far past this.
RSS_GROWTH_BOUND_MIB = 24


@pytest.fixture
def bench() -> Iterator[Bench]:
    # Not under pytest's private tmp_path: nginx's workers, another user, read files there.
    work = Path(tempfile.mkdtemp(prefix="tls-sidecar-soak-"))
    try:
        harness = Bench(work, pin=False, progress=lambda _: None)
    except MissingTool as e:
        shutil.rmtree(work, ignore_errors=True)
        pytest.skip(str(e))
    try:
        yield harness
    finally:
        harness.close()
        shutil.rmtree(work, ignore_errors=True)


def descriptors(pid: int) -> list[str]:
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            found.append(os.readlink(fd))
        except OSError:
            continue
    return found


class Sampler:
    """Descriptors and resident memory of some processes, every 0.5 s while the soak runs."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak_fds = dict.fromkeys(pids, 0)
        self.peak_rss_kib = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for name, pid in self.pids.items():
                self.peak_fds[name] = max(self.peak_fds[name], len(descriptors(pid)))
                self.peak_rss_kib[name] = max(self.peak_rss_kib[name], rss_kib(pid))


def fewer_descriptors(pid: int, most: int) -> bool:
    return len(descriptors(pid)) <= most


def at_rest(proxy: ProxyProcess) -> bool:
    """No client connection and no app connection open (idle ones have timed out)."""
    return (
        proxy.metric("tls_sidecar_connections_active") == 0
        and proxy.metric("tls_sidecar_upstream_connections_active") == 0
    )


@pytest.mark.timeout(SOAK_SECONDS + 300)  # a round started near the end, and the checks after
def test_soak_mixed_traffic_with_certificate_swaps(bench: Bench, tmp_path: Path) -> None:
    upstream = bench.start_upstream(builtin=False)
    assert bench.grpc_upstream is not None
    ca = certs.create_ca("soak CA")
    ca_path = tmp_path / "ca.crt"
    ca_path.write_bytes(ca.cert_pem)
    secret = tmp_path / "secret"
    secret.mkdir()

    def swap(generation: int) -> None:
        leaf = certs.issue(ca, ["localhost", "127.0.0.1"], common_name=f"soak-{generation}")
        secret_volume_update(secret, f"gen_{generation}", leaf.cert_pem, leaf.key_pem)

    swap(0)
    common = (
        "--cert",
        str(secret / "tls.crt"),
        "--key",
        str(secret / "tls.key"),
        "--reload-interval",
        "500ms",
        "--upstream-idle-timeout",
        "2s",
        "--no-access-log",
    )
    web = ProxyProcess(serve_args(upstream.url, None, *common)).start()
    grpc = ProxyProcess(serve_args(bench.grpc_upstream.url, None, *common)).start()
    proxies = {"web": web, "grpc": grpc}
    pids = {name: p.proc.pid for name, p in proxies.items() if p.proc is not None}
    web_url, grpc_url = f"https://127.0.0.1:{web.port}", f"https://127.0.0.1:{grpc.port}"
    runs: dict[str, Callable[[], H2Result]] = {
        "http/1.1 keep-alive": lambda: bench.h2load(f"{web_url}/small", "-c", "16", "-n", "20000"),
        "new connection per request": lambda: bench.h2load(
            f"{web_url}/small", "-c", "8", "-n", "1500", "-H", "Connection: close"
        ),
        "h2 multiplexed": lambda: bench.h2load(
            f"{web_url}/small", "-c", "8", "-m", "10", "-n", "20000", h1=False
        ),
        "1 MiB uploads": lambda: bench.h2load(
            f"{web_url}/upload", "-c", "4", "-n", "200", "-d", str(bench.upload)
        ),
        "grpc unary": lambda: bench.h2load(
            f"{grpc_url}/bench.Echo/Unary",
            "-c",
            "4",
            "-m",
            "10",
            "-n",
            "10000",
            "-d",
            str(bench.grpc_message),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            h1=False,
        ),
    }
    failures: list[str] = []
    totals = dict.fromkeys(runs, 0)
    try:
        # Warm up (lazy imports, first buffers), then take the numbers at rest.
        bench.h2load(f"{web_url}/small", "-c", "2", "-n", "200")
        bench.h2load(f"{grpc_url}/bench.Echo/Unary", "-n", "200", "-d", str(bench.grpc_message))
        for proxy in proxies.values():
            wait_for(partial(at_rest, proxy), 30, "the proxy at rest")
        fds_at_rest = {name: len(descriptors(pid)) for name, pid in pids.items()}
        rss_after_first: dict[str, int] = {}
        by_round: list[dict[str, int]] = []
        started = time.monotonic()
        rounds = 0
        with Sampler(pids) as sampler, ThreadPoolExecutor(len(runs)) as pool:
            while rounds < MAX_ROUNDS and time.monotonic() - started < SOAK_SECONDS:
                rounds += 1
                results = {name: pool.submit(run) for name, run in runs.items()}
                swap(rounds)  # under load
                for name, proxy in proxies.items():
                    wait_for(
                        partial(serves, proxy.port, ca_path, f"soak-{rounds}"),
                        30,
                        f"{name} to serve certificate {rounds}",
                    )
                for name, future in results.items():
                    result = future.result(timeout=300)
                    totals[name] += result.succeeded
                    if result.failed:
                        failures.append(f"round {rounds} {name}: {result.failed} failed")
                by_round.append({name: rss_kib(pid) for name, pid in pids.items()})
                if rounds == 1:
                    rss_after_first = by_round[0]
        elapsed = time.monotonic() - started
        for proxy in proxies.values():
            wait_for(partial(at_rest, proxy), 30, "the proxy at rest after the load")
        for name, pid in pids.items():
            # at_rest's own scrape leaves the admin socket open until the proxy reads its end:
            # a descriptor that stays is a leak, one that closes within the wait is not
            with contextlib.suppress(AssertionError):  # the assertion below names what stayed
                wait_for(partial(fewer_descriptors, pid, fds_at_rest[name]), 30)
        fds_after = {name: descriptors(pid) for name, pid in pids.items()}
        rss_after = {name: rss_kib(pid) for name, pid in pids.items()}
        print(
            f"\nsoak: {rounds} rounds in {elapsed:.0f}s, requests {totals}\n"
            f"descriptors at rest {fds_at_rest}, peak {sampler.peak_fds}, "
            f"after { ({n: len(f) for n, f in fds_after.items()}) }\n"
            f"RSS MiB after round 1 {mib(rss_after_first)}, peak {mib(sampler.peak_rss_kib)}, "
            f"after {mib(rss_after)}; by round {[mib(r) for r in by_round]}"
        )
        assert failures == [], failures
        assert rounds >= 2, "at least two rounds, to compare memory between them"
        for name in pids:
            assert len(fds_after[name]) <= fds_at_rest[name], (name, sorted(fds_after[name]))
            growth = (rss_after[name] - rss_after_first[name]) / 1024
            assert growth <= RSS_GROWTH_BOUND_MIB, f"{name}: RSS grew {growth:.1f} MiB"
            reloads = proxies[name].metric(
                "tls_sidecar_certificate_reloads_total", 'result="success"'
            )
            assert reloads == rounds, (name, reloads)
    finally:
        for proxy in proxies.values():
            proxy.stop()
    for name, proxy in proxies.items():
        text = proxy.stderr_text()
        assert "Traceback" not in text, f"{name}: {text[-3000:]}"
        assert '"level": "error"' not in text, f"{name}: {text[-3000:]}"


def serves(port: int, ca: Path, name: str) -> bool:
    return common_name(handshake(port, ca, "localhost")) == name


def mib(values: dict[str, int]) -> dict[str, float]:
    return {name: round(kib / 1024, 1) for name, kib in values.items()}
