"""Timeout phases on a clock the test moves, and the HTTP/2 attack budgets as plain objects: no
sockets and no waiting, so a loaded machine cannot make these flaky."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest
from prometheus_client import CollectorRegistry

from proxy.core.context import ProxyContext
from proxy.core.timer import PhaseTimer
from proxy.http2.defences import Budget
from proxy.metrics import Metrics
from tests.support.exchange import FakeClock


class Timed(PhaseTimer):
    """A connection's timer and nothing else: records which phase ran out, and when."""

    def __init__(self, clock: FakeClock, metrics: Metrics) -> None:
        super().__init__()
        self.loop = cast(asyncio.AbstractEventLoop, clock)
        self.metrics = metrics
        self.ctx = cast(ProxyContext, self)
        self.expired: list[tuple[str, float]] = []

    def timed_out(self, phase: str) -> None:
        self.expired.append((phase, self.loop.time()))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def timed(clock: FakeClock) -> Timed:
    return Timed(clock, Metrics(CollectorRegistry()))


def timeouts(timed: Timed, phase: str) -> float:
    timed.metrics.flush()  # as a scrape does: the data path counts in plain numbers
    value = timed.metrics.registry.get_sample_value("tls_sidecar_timeouts_total", {"phase": phase})
    return value or 0.0


def test_a_phase_runs_out_at_its_deadline_and_is_counted(clock: FakeClock, timed: Timed) -> None:
    timed.arm("header", 10.0)
    clock.advance(9.9)
    assert timed.expired == []
    clock.advance(0.2)
    assert timed.expired == [("header", 10.0)]
    assert timeouts(timed, "header") == 1


def test_activity_pushes_the_deadline_without_rescheduling_the_timer(
    clock: FakeClock, timed: Timed
) -> None:
    timed.arm("idle", 10.0)
    first_timer = timed._timer
    clock.advance(8.0)
    timed._phase_since = clock.time()  # what a read does: an attribute write
    assert timed._timer is first_timer
    clock.advance(5.0)  # the first deadline passes: the timer sees the activity, sleeps again
    assert timed.expired == []
    clock.advance(5.1)
    assert timed.expired == [("idle", 18.0)]


def test_a_new_phase_replaces_the_old_one(clock: FakeClock, timed: Timed) -> None:
    timed.arm("request_body", 60.0)
    clock.advance(1.0)
    timed.arm("upstream", 2.0)  # a shorter deadline reschedules the one timer
    clock.advance(2.0)
    assert timed.expired == [("upstream", 3.0)]
    clock.advance(100.0)
    assert timed.expired == [("upstream", 3.0)]  # the request_body phase is gone


def test_a_stopped_timer_never_fires(clock: FakeClock, timed: Timed) -> None:
    timed.arm("tunnel", 1.0)
    timed.stop_timer()
    clock.advance(10.0)
    assert timed.expired == []
    assert timeouts(timed, "tunnel") == 0


def test_a_budget_allows_its_burst_then_its_rate() -> None:
    budget = Budget(burst=3, rate=2, now=0.0)
    assert [budget.spend(0.0) for _ in range(3)] == [True, True, True]
    assert budget.spend(0.5)  # one token came back in half a second
    assert not budget.spend(0.5)


def test_a_refused_spend_still_costs_so_a_client_that_keeps_trying_stays_refused() -> None:
    budget = Budget(burst=1, rate=1, now=0.0)
    assert budget.spend(0.0)
    assert not budget.spend(0.0)  # in debt by one token
    assert not budget.spend(1.0)  # a second paid the debt, not the next frame
    assert not budget.spend(2.0)
    assert budget.spend(4.0)  # only a client that stopped for a while is served again


def test_a_budget_refills_to_its_burst_and_no_further() -> None:
    budget = Budget(burst=2, rate=100, now=0.0)
    assert budget.spend(0.0) and budget.spend(0.0)
    assert [budget.spend(3600.0) for _ in range(3)] == [True, True, False]
