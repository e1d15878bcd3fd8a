"""The YAML stream `tls-sidecar inject` reads and writes: documents split as written (comments
before a separator kept), each one's indentation, ruamel.yaml set for a round trip, and file
modes in octal."""

from __future__ import annotations

import re
from typing import Any

_DOCUMENT_SEPARATOR = re.compile(r"^---[ \t]*(?:#.*)?$", re.MULTILINE)


class OctalMode(int):
    """A file mode, written as Kubernetes manifests write it (`0444`, YAML 1.1's octal, which
    the API server reads), not as the decimal 292 that means the same."""


def represent_octal_mode(representer: Any, mode: OctalMode) -> Any:
    return representer.represent_scalar("tag:yaml.org,2002:int", f"0{int(mode):o}")


def split_documents(text: str) -> list[str]:
    """The YAML stream's documents as text, separators dropped (a leading '---' too)."""
    parts = _DOCUMENT_SEPARATOR.split(text)
    return [p for i, p in enumerate(parts) if p.strip() or 0 < i < len(parts) - 1]


def mapping_indent(part: str) -> int:
    """The document's mapping indentation: how much deeper than a key alone on its line the
    first key of the mapping under it starts (a sequence under a key does not tell)."""
    parent: int | None = None
    for line in part.splitlines():
        stripped = line.lstrip(" ")
        if not stripped or stripped[0] == "#":
            continue
        depth = len(line) - len(stripped)
        if parent is not None and depth > parent and stripped[0] != "-":
            return depth - parent
        key_alone = stripped.split(" #", 1)[0].rstrip().endswith(":")
        parent = depth + (2 if stripped.startswith("- ") else 0) if key_alone else None
    return 2


def round_trip(yaml: Any) -> Any:
    """ruamel.yaml set to give back what it read: quotes (kept at load time), long lines and
    flow mappings as they were."""
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.brace_single_entry_mapping_in_flow_sequence = True
    return yaml


def trailing_comments(part: str) -> tuple[str, str]:
    """A document's text and the comment lines after its last value (often a note about the
    next document): kept after the document as they were, where ruamel would attach them to
    the last value, inside what inject appends."""
    lines = part.splitlines(keepends=True)
    end = len(lines)
    while end > 0 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
        end -= 1
    trailer = "".join(line for line in lines[end:] if line.strip())
    return "".join(lines[:end]), trailer
