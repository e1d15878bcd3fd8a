"""The load-test harness runs end to end (about a second per scenario) so it never rots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.needs("h2load", install="apt-get install nghttp2-client")
@pytest.mark.needs("nginx", install="apt-get install nginx", path="/usr/sbin/nginx")
def test_smoke_run_writes_results_table_and_plots(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loadtest", "--smoke", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["scenarios"]) == {
        "S1",
        "S2",
        "S2full",
        "S3",
        "S4",
        "S5",
        "S6",
        "S7",
        "S8",
        "S5h2",
    }
    for name, row in data["scenarios"].items():
        for who in ("tls-sidecar", "nginx"):
            figures = row[who]
            if name.startswith("S5"):
                assert figures["connections"] == 50 and figures["rss_at_rest_mib"] > 0
            else:
                assert figures["failed"] == 0, (name, who, figures)
                assert figures["succeeded"] > 0, (name, who, figures)
                assert figures["cpu_us_per_req"] > 0, (name, who, figures)
    for floor in ("pipe floor", "parse floor", "sockparse floor"):  # the floors serve too
        figures = data["scenarios"]["S1"][floor]
        assert figures["failed"] == 0 and figures["succeeded"] > 0, (floor, figures)
    runs = sum(1 for row in data["scenarios"].values() for who in row if who.startswith("tls-"))
    assert "tls-sidecar h11" in data["scenarios"]["S1"], "both codecs are measured"
    assert "tls-sidecar interpreted" in data["scenarios"]["S1"], "and the core interpreted"
    assert data["proxy_exit_codes"] == [0] * runs, "the proxy drained and exited 0 after every run"
    table = (tmp_path / "results.md").read_text()
    assert "| S1 keep-alive" in table and "tls-sidecar / nginx" in table
    assert "| CPU µs/req |" in table
    # S7 and S8 are judged against nginx, S1's CPU per request too
    assert "| S7 HTTP/2" in table and "| S8 gRPC" in table and "<= 55 µs" in table
    assert "h2 floor" in data["scenarios"]["S8"]
    assert (tmp_path / "throughput.png").stat().st_size > 1000
    assert (tmp_path / "latency.png").stat().st_size > 1000


def test_missing_tools_print_the_apt_command(tmp_path: Path) -> None:
    env = dict(os.environ, PATH=str(tmp_path))  # neither h2load nor nginx on PATH
    result = subprocess.run(
        [sys.executable, "-m", "loadtest", "--smoke", "--out", str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    if Path("/usr/sbin/nginx").exists():
        assert "h2load" in result.stderr
    assert result.returncode == 2
    assert "apt-get install -y nghttp2-client nginx" in result.stderr
