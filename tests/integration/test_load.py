"""Load and slow clients (marked slow: `make test-slow`). Every loop is bounded in count and time."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ProxyFactory
from tests.support.proxy import ProxyProcess, wait_for

pytestmark = pytest.mark.slow

REQUEST = b"GET /small HTTP/1.1\r\nHost: localhost\r\n\r\n"


@pytest.fixture(scope="module")
def fast_upstream() -> Iterator[str]:
    """The benchmark's plaintext upstream, in its own process (the test's client has the GIL)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtest.upstream", str(port)],
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        wait_for(lambda: _accepts(port), what="the fast upstream")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return status


def tls(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def test_1000_keep_alive_connections_20k_requests_zero_errors(
    start_proxy: ProxyFactory, fast_upstream: str, ca: Path
) -> None:
    proxy = start_proxy(fast_upstream, "--no-access-log")
    ctx = tls(ca)
    errors: list[str] = []
    done = 0

    async def one_client(handshakes: asyncio.Semaphore) -> None:
        nonlocal done
        async with handshakes:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", proxy.port, ssl=ctx, server_hostname="localhost"
            )
        try:
            for _ in range(20):
                writer.write(REQUEST)
                status = await read_response(reader)
                if status != 200:
                    errors.append(f"status {status}")
                done += 1
        finally:
            writer.close()

    async def main() -> None:
        handshakes = asyncio.Semaphore(100)
        results = await asyncio.wait_for(
            asyncio.gather(*(one_client(handshakes) for _ in range(1000)), return_exceptions=True),
            240,
        )
        errors.extend(repr(r) for r in results if isinstance(r, BaseException))

    started = time.monotonic()
    asyncio.run(main())
    print(
        f"\n1000 connections: {done} requests in {time.monotonic() - started:.1f}s, errors {len(errors)}"
    )
    assert errors == [], errors[:5]
    assert done == 20_000
    assert proxy.metric("tls_sidecar_connections_accepted_total") >= 1000


def test_slowloris_does_not_starve_normal_clients(
    start_proxy: ProxyFactory, fast_upstream: str, ca: Path
) -> None:
    proxy = start_proxy(fast_upstream, "--header-timeout", "3s", "--no-access-log")
    ctx = tls(ca)
    latencies: list[float] = []
    cut = 0
    connected = 0

    async def trickler() -> None:
        nonlocal cut, connected
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", proxy.port, ssl=ctx, server_hostname="localhost"
        )
        connected += 1
        try:
            for byte in b"GET /small HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 100:
                writer.write(bytes([byte]))
                await writer.drain()
                try:
                    data = await asyncio.wait_for(reader.read(4096), 1.0)  # one byte a second
                except TimeoutError:
                    continue
                if not data or data.startswith(b"HTTP/1.1 408"):
                    cut += 1
                    return
        except (ConnectionError, ssl.SSLError):
            cut += 1
        finally:
            writer.close()

    async def normal_client() -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            started = time.monotonic()
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", proxy.port, ssl=ctx, server_hostname="localhost"
            )
            writer.write(REQUEST)
            assert await read_response(reader) == 200
            writer.close()
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.02)

    async def main() -> None:
        slow = [asyncio.create_task(trickler()) for _ in range(200)]
        async with asyncio.timeout(30):
            while connected < 200:  # all 200 have their TLS connection and are trickling
                await asyncio.sleep(0.01)
        await normal_client()
        await asyncio.wait_for(asyncio.gather(*slow), 30)

    asyncio.run(main())
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    print(
        f"\nslowloris: normal requests {len(latencies)}, p99 {p99 * 1000:.0f} ms; slow connections cut {cut}/200"
    )
    assert p99 < 1.0
    assert cut == 200, "every trickling connection was cut by the header timeout"
    assert proxy.metric("tls_sidecar_timeouts_total", 'phase="header"') >= 200


def test_500_unfinished_handshakes_are_cut_and_others_served(
    start_proxy: ProxyFactory, fast_upstream: str, ca: Path
) -> None:
    proxy: ProxyProcess = start_proxy(fast_upstream, "--handshake-timeout", "2s", "--no-access-log")
    ctx = tls(ca)
    half_open = []
    for i in range(500):
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        if i % 2:
            sock.sendall(
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
            )  # a ClientHello that never ends
        half_open.append(sock)

    async def normal() -> int:
        served = 0
        for _ in range(50):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", proxy.port, ssl=ctx, server_hostname="localhost"
            )
            writer.write(REQUEST)
            served += await read_response(reader) == 200
            writer.close()
        return served

    assert asyncio.run(normal()) == 50
    closed = 0
    for sock in half_open:
        sock.settimeout(10)
        try:
            closed += sock.recv(1) == b""
        except ConnectionResetError:
            closed += 1
        sock.close()
    assert closed == 500
    wait_for(
        lambda: proxy.metric("tls_sidecar_tls_handshake_errors_total", 'reason="timeout"') >= 500
    )
