"""The operator's docs say what the shipped files do: commands that run in the shipped image,
alert texts with the real defaults, and performance and memory figures kept in one place
(loadtest/README.md) instead of copies that drift."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from proxy.cli import serve
from proxy.commands.inject_sidecar import PRESTOP_SECONDS
from proxy.config import parse_duration

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", REPO / "deploy" / "README.md", REPO / "docs" / "runbook.md"]
# What `kubectl exec` can start in the image: no shell, no coreutils, no curl (Dockerfile).
IN_THE_IMAGE = {"tls-sidecar", "python"}


def section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def test_kubectl_exec_in_the_docs_runs_only_what_the_image_has() -> None:
    found = []
    for doc in DOCS:
        for command in re.findall(r"kubectl exec [^`]*? -- (\S+)", doc.read_text()):
            found.append(command)
            assert command in IN_THE_IMAGE, f"{doc.name}: kubectl exec ... -- {command}"
    assert found, "the runbook's exec examples were not found"
    # what IN_THE_IMAGE assumes: a slim Python base whose shells the build removes
    dockerfile = (REPO / "Dockerfile").read_text()
    harden = (REPO / "deploy" / "image" / "build-root.sh").read_text().split("\nharden)")[1]
    assert "python:3.13-slim" in dockerfile and '"harden"]' in dockerfile
    assert "/bin/sh" in harden.split(";;")[0]


def test_the_drain_stuck_alert_states_the_real_drain_time() -> None:
    defaults = {p.name: p.default for p in serve.params}
    drain = parse_duration(str(defaults["drain_timeout"]), option="--drain-timeout")
    delay = parse_duration(str(defaults["shutdown_delay"]), option="--shutdown-delay")
    classic = drain + PRESTOP_SECONDS[False]  # the classic layout's --shutdown-delay
    expected = f"({drain + delay:g} s with the defaults, {classic:g} s in the classic layout)"
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yaml").read_text())
    [alert] = [
        r for g in rules["groups"] for r in g["rules"] if r["alert"] == "TLSSidecarDrainStuck"
    ]
    assert expected in alert["annotations"]["description"]
    assert alert["for"] == "1m" and classic < 60, "a normal drain ends before it fires"


def test_performance_and_memory_figures_live_in_the_loadtest_readme_only() -> None:
    readme = (REPO / "README.md").read_text()
    performance = section(readme, "## Performance")
    figure = re.compile(r"\d[\d,.]*\s*(?:x\b|k\b|req/s|MiB|KiB|MB/s|vCPU|µs|ms\b)")
    assert not figure.search(performance), figure.search(performance)
    anchor = re.search(r"loadtest/README\.md#([\w-]+)", performance)
    assert anchor, "the Performance section links the figures"
    headings = re.findall(r"^#+ (.+)$", (REPO / "loadtest" / "README.md").read_text(), re.M)
    slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
    assert anchor.group(1) in slugs
    for doc in (REPO / "deploy" / "README.md", REPO / "deploy/kubernetes/base/deployment.yaml"):
        assert not re.search(r"\d+\s*MiB at rest", doc.read_text()), doc.name


def test_grpcurl_is_never_used_without_saying_where_it_comes_from() -> None:
    for doc in DOCS:
        text = doc.read_text()
        if "grpcurl" in text:
            assert "fullstorydev/grpcurl" in text, doc.name
