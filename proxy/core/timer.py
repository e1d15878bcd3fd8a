"""The timeout phases of a connection or stream, on one lazy timer."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from proxy.compiled import mypyc_attr

if TYPE_CHECKING:
    from proxy.core.context import ProxyContext


# the tests subclass it interpreted
@mypyc_attr(allow_interpreted_subclasses=True)
class PhaseTimer:
    """One lazy timer for what is being waited for (a phase) and how long it may take.

    Activity moves `_phase_since`, not the timer: the timer fires at the first deadline, sees
    the phase was pushed back, and sleeps again. One timer handle per connection (or HTTP/2
    stream), not one per read."""

    # ctx and loop are the subclass's to set, but slots of this class: compiled, a subclass's
    # slot of the same name would hide them from the timer's own code
    __slots__ = ("_phase", "_phase_since", "_phase_timeout", "_timer", "_timer_at", "ctx", "loop")

    ctx: ProxyContext
    loop: asyncio.AbstractEventLoop

    def __init__(self) -> None:
        self._phase: str | None = None
        self._phase_timeout = 0.0
        self._phase_since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def timed_out(self, phase: str) -> None:
        """The phase ran out; counted already."""

    def still_going(self, phase: str) -> bool:
        """The phase ran out but is making progress it cannot report: start it again."""
        return False

    def arm(self, phase: str, timeout: float) -> None:
        """Start a timeout phase."""
        now = self.loop.time()
        self._phase, self._phase_timeout, self._phase_since = phase, timeout, now
        deadline = now + timeout
        if self._timer is None or deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline

    def stop_timer(self) -> None:
        self._phase = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self._phase is None:
            return
        deadline = self._phase_since + self._phase_timeout
        if self.loop.time() < deadline:
            self._timer = self.loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline
            return
        if self.still_going(self._phase):
            self.arm(self._phase, self._phase_timeout)
            return
        phase, self._phase = self._phase, None
        self.ctx.metrics.timed_out.add(phase)
        self.timed_out(phase)
