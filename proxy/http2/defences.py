"""The HTTP/2 attack budgets the client connection keeps itself, the same for every codec:
token buckets for resets and for frames that make the server work without a request (rapid
reset CVE-2023-44487, CVE-2025-8671; SETTINGS, PING and empty DATA floods), and the bound of a
header block the codecs hold a client to (CONTINUATION flood, CVE-2024-27316)."""

from __future__ import annotations

from typing import Final

# Frames that cost work but carry no request (SETTINGS, PING, empty DATA, unknown types): a
# burst, then a steady rate per second; past it, GOAWAY ENHANCE_YOUR_CALM.
CONTROL_BURST: Final = 1000.0
CONTROL_RATE: Final = 100.0


def header_list_bound(max_header_bytes: int) -> int:
    """What one header block may be, encoded or decoded (HPACK counts 32 bytes more per
    field than a head's size): twice --max-header-bytes."""
    return 2 * max_header_bytes


class CalmDown(Exception):
    """The client spent a budget: the connection ends with GOAWAY ENHANCE_YOUR_CALM."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Budget:
    """A token bucket: `burst` at once, refilled at `rate` per second."""

    __slots__ = ("_at", "_level", "burst", "rate")

    def __init__(self, burst: float, rate: float, now: float) -> None:
        self.burst = burst
        self.rate = rate
        self._level = burst
        self._at = now

    def spend(self, now: float) -> bool:
        """Take one token; False when none is left."""
        level = min(self.burst, self._level + (now - self._at) * self.rate) - 1.0
        self._at = now
        self._level = level
        return level >= 0.0
