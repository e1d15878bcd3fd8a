"""`python -m loadtest`: tls-sidecar (both codecs) against nginx, HAProxy and Caddy as TLS
proxies (one worker or thread each), floors that do only the unavoidable work, and the app."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from .harness import Bench, MissingTool, Target, cpu_seconds
from .report import markdown_table, plot
from .scenarios import FULL, SCENARIOS, SMOKE, Budget

RESULTS = Path(__file__).resolve().parent / "results"

ANCHORS = ("nginx", "haproxy", "caddy")
OURS = ("tls-sidecar h11", "tls-sidecar")
# the same proxy with its compiled core's modules run from their sources (TLS_SIDECAR_COMPILED=0)
INTERPRETED = "tls-sidecar interpreted"
H2_CODEC = "tls-sidecar h2"
# Who runs in each scenario. Floors: `pipe` (TLS and byte relay only), `parse` (plus httptools
# both ways), `sockparse` (the parse floor with OpenSSL on the socket, not uvloop's TLS); the
# parse floors do not close on Connection: close, so they sit out S2.
PLAN = {
    "S1": (*ANCHORS, "pipe floor", "parse floor", "sockparse floor", *OURS, INTERPRETED, "direct"),
    "S2": (*ANCHORS, "pipe floor", *OURS),
    "S2full": (*ANCHORS, "pipe floor", *OURS),
    "S3": (*ANCHORS, "pipe floor", "parse floor", *OURS, "direct"),
    "S4": ("nginx", "tls-sidecar", "direct"),
    "S5": (*ANCHORS, "tls-sidecar"),
    "S6": (*ANCHORS, *OURS, "direct"),
    # HTTP/2: nginx with http2 on (S8: grpc_pass), and the h2 floor: the h2 library answering
    # every stream itself in one process, the ceiling of anything built on it; the nghttp2
    # floor is the same on the nghttp2 codec (left out when it is not built).
    # "tls-sidecar h2": the same proxy on the pure-Python HTTP/2 codec (--http2-codec h2)
    "S7": ("nginx", "h2 floor", "nghttp2 floor", H2_CODEC, "tls-sidecar", INTERPRETED),
    "S8": ("nginx", "h2 floor", "nghttp2 floor", "h2relay floor", H2_CODEC, "tls-sidecar"),
    "S5h2": ("nginx", "tls-sidecar"),
}
HTTP2 = ("S7", "S8", "S5h2")


def start(
    bench: Bench, who: str, upstream: Target, resumption: bool, http2: bool = False
) -> Target | None:
    """Start one target; None when its program is not installed (it is left out)."""
    if who == "direct":
        return upstream
    if who == "nginx":
        return bench.start_nginx_proxy(upstream, resumption=resumption, http2=http2)
    if who == "h2 floor":
        return bench.start_baseline("h2")
    if who == "nghttp2 floor":
        from proxy.http2 import nghttp2_codec  # noqa: PLC0415

        return bench.start_baseline("nghttp2") if nghttp2_codec.AVAILABLE else None
    if who == "haproxy":
        return bench.start_haproxy(upstream, resumption=resumption) if bench.haproxy else None
    if who == "caddy":
        return bench.start_caddy(upstream, resumption=resumption) if bench.caddy else None
    if who.endswith("floor"):
        return bench.start_baseline(who.split(maxsplit=1)[0], upstream)
    http = "h11" if who.endswith("h11") else "httptools"
    compiled = who != INTERPRETED
    http2_codec = "h2" if who == H2_CODEC else "auto"
    return bench.start_proxy(
        upstream, resumption=resumption, http=http, compiled=compiled, http2_codec=http2_codec
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--smoke", is_flag=True, help="About a second per scenario: checks the harness, not the speed."
)
@click.option(
    "--only", multiple=True, type=click.Choice(list(SCENARIOS)), help="Run these scenarios only."
)
@click.option(
    "--builtin-upstream",
    is_flag=True,
    help="Use the built-in Python upstream even if nginx is installed.",
)
@click.option("--no-pin", is_flag=True, help="Do not pin processes to cores with taskset.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Results folder. [default: loadtest/results/<timestamp>]",
)
def main(
    smoke: bool, only: tuple[str, ...], builtin_upstream: bool, no_pin: bool, out: Path | None
) -> None:
    """Run the scenarios and write results.json, results.md and PNG plots."""
    budget = SMOKE if smoke else FULL
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = out or RESULTS / (stamp + ("-smoke" if smoke else ""))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tls-sidecar-loadtest-"))
    try:
        bench = Bench(work, pin=not no_pin, progress=click.echo)
    except MissingTool as e:
        click.echo(f"loadtest: {e}", err=True)
        sys.exit(2)
    names = list(only) or list(SCENARIOS)
    results: dict[str, Any] = {
        "time": stamp,
        "smoke": smoke,
        "pinned": bench.pin,
        "upstream": "builtin" if builtin_upstream or not shutil.which("nginx") else "nginx",
        "scenarios": {},
        "proxy_exit_codes": [],
    }
    try:
        upstream = bench.start_upstream(builtin=results["upstream"] == "builtin")
        for name in names:
            title, run = SCENARIOS[name]
            resumption = name != "S2full"
            row: dict[str, Any] = {"title": title}
            app = bench.grpc_upstream if name == "S8" else upstream
            if app is None:
                click.echo(f"[{name}] {title}: skipped (needs nginx as the gRPC app)")
                continue
            for who in PLAN[name]:
                target = start(bench, who, app, resumption, http2=name in HTTP2)
                if target is None:
                    continue
                click.echo(f"[{name}] {title}: {target.name} ...", nl=False)
                pid = target.pid
                cpu_before = cpu_seconds(pid) if pid is not None else 0.0
                row[target.name] = run(bench, target, budget)
                if pid is not None and row[target.name].get("succeeded"):
                    # over the whole run, h2load's warm-up second included (a few % more)
                    spent = cpu_seconds(pid) - cpu_before
                    per_request = spent / row[target.name]["succeeded"] * 1e6
                    row[target.name]["cpu_us_per_req"] = round(per_request, 1)
                click.echo(f" {_brief(row[target.name])}")
                if target is not app and target.proc is not None:
                    code = bench.stop(target.proc)
                    if who in (*OURS, INTERPRETED, H2_CODEC):
                        # a clean drain after load: exit 0 at once, nothing left behind
                        results["proxy_exit_codes"].append(code)
            results["scenarios"][name] = row
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown_table(results)
    (out / "results.md").write_text(table)
    plots = plot(results, out)
    click.echo("\n" + table)
    click.echo(
        f"results: {out / 'results.json'}, {out / 'results.md'}" + "".join(f", {p}" for p in plots)
    )


def _brief(row: dict[str, Any]) -> str:
    if "req_s" in row:
        cpu = f", {row['cpu_us_per_req']} us CPU/req" if "cpu_us_per_req" in row else ""
        return f"{row['req_s']} req/s, {row['mb_s']} MB/s, p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, failed {row['failed']}{cpu}"
    return ", ".join(f"{k}={v}" for k, v in row.items())


_ = Budget  # re-exported for callers that tune the budget

if __name__ == "__main__":
    main()
