"""The results as a markdown table with ratios to nginx and targets, and as PNG plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# scenario -> (metric, target ratio of tls-sidecar to nginx) for throughput scenarios
THROUGHPUT = {
    "S1": ("req_s", 0.50),
    "S2": ("req_s", 0.30),
    "S2full": ("req_s", 0.80),
    "S3": ("mb_s", 1.0),
    "S6": ("req_s", 1.0),
    "S7": ("req_s", 0.35),  # nginx with http2 on, proxying to the HTTP/1.1 app
    "S8": ("req_s", 0.40),  # nginx grpc_pass to the h2c app
}
S1_CPU_US_PER_REQ = 55.0  # CPU per request in S1: it moves far less than req/s on a shared machine
S4_ADDED_P99_MS = 0.5
S5H2_PER_CONNECTION_KIB = 40.0
# Columns, in this order, for whoever ran.
COLUMNS = (
    "direct",
    "nginx",
    "haproxy",
    "caddy",
    "pipe floor",
    "parse floor",
    "sockparse floor",
    "h2 floor",
    "nghttp2 floor",
    "h2relay floor",
    "tls-sidecar h11",
    "tls-sidecar h2",
    "tls-sidecar interpreted",
    "tls-sidecar",
)
S5_REST_MIB = 40.0
S5_PER_CONNECTION_KIB = 40.0


def _ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.1f}" if isinstance(value, float) else str(value)


def verdicts(results: dict[str, Any]) -> dict[str, tuple[float, float, bool]]:
    """scenario -> (measured, target, met) for every target the run can judge."""
    out: dict[str, tuple[float, float, bool]] = {}
    scenarios = results["scenarios"]
    for name, (metric, target) in THROUGHPUT.items():
        row = scenarios.get(name)
        if row and row["nginx"][metric]:
            ratio = row["tls-sidecar"][metric] / row["nginx"][metric]
            out[name] = (ratio, target, ratio >= target)
    if "S4" in scenarios and "direct" in scenarios["S4"]:
        added = scenarios["S4"]["tls-sidecar"]["p99_ms"] - scenarios["S4"]["direct"]["p99_ms"]
        out["S4"] = (added, S4_ADDED_P99_MS, added <= S4_ADDED_P99_MS)
    s1 = scenarios.get("S1", {}).get("tls-sidecar", {}).get("cpu_us_per_req")
    if s1:
        out["S1 cpu"] = (s1, S1_CPU_US_PER_REQ, s1 <= S1_CPU_US_PER_REQ)
    if "S5h2" in scenarios:
        kib = scenarios["S5h2"]["tls-sidecar"]["kib_per_connection"]
        out["S5h2 per conn"] = (kib, S5H2_PER_CONNECTION_KIB, kib <= S5H2_PER_CONNECTION_KIB)
    if "S5" in scenarios:
        ours = scenarios["S5"]["tls-sidecar"]
        out["S5 rest"] = (
            ours["rss_at_rest_mib"],
            S5_REST_MIB,
            ours["rss_at_rest_mib"] <= S5_REST_MIB,
        )
        out["S5 per conn"] = (
            ours["kib_per_connection"],
            S5_PER_CONNECTION_KIB,
            ours["kib_per_connection"] <= S5_PER_CONNECTION_KIB,
        )
    return out


def markdown_table(results: dict[str, Any]) -> str:
    scenarios = results["scenarios"]
    present = [c for c in COLUMNS if any(c in row for row in scenarios.values())]
    lines = [
        f"tls-sidecar load test, {results['time']}"
        + (" (smoke: figures mean nothing)" if results["smoke"] else "")
        + f"; upstream: {results['upstream']}; pinned to cores: {results['pinned']}",
        "",
        "| scenario | metric | " + " | ".join(present) + " | tls-sidecar / nginx | target | met |",
        "| --- | --- | " + " | ".join("---" for _ in present) + " | --- | --- | --- |",
    ]
    judged = verdicts(results)

    def cells(row: dict[str, Any], key: str) -> str:
        return " | ".join(_fmt(row.get(c, {}).get(key)) for c in present)

    for name, row in scenarios.items():
        title = row["title"]
        ours, nginx = row["tls-sidecar"], row["nginx"]
        if name in ("S5", "S5h2"):
            for metric, key, unit in (
                ("RSS at rest", "rss_at_rest_mib", "MiB"),
                ("per idle TLS connection", "kib_per_connection", "KiB"),
            ):
                if name == "S5h2" and key.startswith("rss"):
                    continue
                verdict = judged[f"{name} per conn" if key == "kib_per_connection" else "S5 rest"]
                ratio = ours[key] / nginx[key] if nginx[key] else float("nan")
                lines.append(
                    f"| {name} {title} | {metric} ({unit}) | {cells(row, key)} | "
                    f"{_ratio(ratio)} | <= {verdict[1]:g} {unit} | {'yes' if verdict[2] else 'no'} |"
                )
            continue
        metrics = [("req/s", "req_s"), ("MB/s", "mb_s"), ("p50 ms", "p50_ms"), ("p99 ms", "p99_ms")]
        if name == "S4":
            metrics = [("p50 ms", "p50_ms"), ("p99 ms", "p99_ms"), ("max ms", "max_ms")]
        # CPU per request: user + system time of each target over its run / requests served
        metrics.append(("CPU µs/req", "cpu_us_per_req"))
        for label, key in metrics:
            ratio = ours[key] / nginx[key] if nginx.get(key) else float("nan")
            target, met = "", ""
            if name in THROUGHPUT and THROUGHPUT[name][0] == key:
                target, met = f">= {THROUGHPUT[name][1]:.2f}x", "yes" if judged[name][2] else "no"
            if name == "S1" and key == "cpu_us_per_req" and "S1 cpu" in judged:
                target = f"<= {S1_CPU_US_PER_REQ:g} µs"
                met = "yes" if judged["S1 cpu"][2] else "no"
            if name == "S4" and key == "p99_ms":
                target = f"+{S4_ADDED_P99_MS:g} ms over direct (measured +{judged['S4'][0]:.2f} ms)"
                met = "yes" if judged["S4"][2] else "no"
            lines.append(
                f"| {name} {title} | {label} | {cells(row, key)} | {_ratio(ratio)} | {target} | {met} |"
            )
    failed = sum(
        r.get("failed", 0)
        for row in scenarios.values()
        for r in row.values()
        if isinstance(r, dict)
    )
    codes = results.get("proxy_exit_codes", [])
    lines += [
        "",
        f"failed requests across all runs: {failed}; tls-sidecar exit codes after each run: "
        + (", ".join(map(str, codes)) or "-"),
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    try:
        import matplotlib  # noqa: PLC0415  (optional, and slow to import)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return []
    written: list[Path] = []
    scenarios = results["scenarios"]
    names = [n for n in THROUGHPUT if n in scenarios]
    if names:
        fig, ax = plt.subplots(figsize=(10, 4.5))
        others = [c for c in COLUMNS[2:] if any(c in scenarios[n] for n in names)]
        width = 0.8 / max(len(others), 1)
        for i, who in enumerate(others):
            ratios = [
                scenarios[n][who][THROUGHPUT[n][0]] / scenarios[n]["nginx"][THROUGHPUT[n][0]]
                if who in scenarios[n]
                and scenarios[n][who].get(THROUGHPUT[n][0])
                and scenarios[n]["nginx"].get(THROUGHPUT[n][0])
                else 0.0
                for n in names
            ]
            ax.bar(
                [k - 0.4 + width * (i + 0.5) for k in range(len(names))],
                ratios,
                width=width,
                label=who,
            )
        ax.set_xticks(range(len(names)), names)
        ax.scatter(
            names,
            [THROUGHPUT[n][1] for n in names],
            color="#d83b3b",
            marker="_",
            s=800,
            label="tls-sidecar target",
            zorder=3,
        )
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_ylabel("throughput relative to nginx (1 worker each)")
        ax.set_title("throughput relative to nginx, same run")
        ax.legend()
        path = out / "throughput.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    latency = [n for n in ("S1", "S4") if n in scenarios]
    if latency:
        fig, axes = plt.subplots(1, len(latency), figsize=(5 * len(latency), 4), squeeze=False)
        for ax, name in zip(axes[0], latency, strict=True):
            row = scenarios[name]
            shown = [w for w in COLUMNS if w in row]
            for offset, key in ((-0.2, "p50_ms"), (0.2, "p99_ms")):
                ax.bar(
                    [i + offset for i in range(len(shown))],
                    [row[w][key] for w in shown],
                    width=0.4,
                    label=key,
                )
            ax.set_xticks(range(len(shown)), shown, rotation=30, fontsize=7)
            ax.set_ylabel("latency (ms)")
            ax.set_title(f"{name}: {row['title']}", fontsize=9)
            ax.legend()
        path = out / "latency.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
