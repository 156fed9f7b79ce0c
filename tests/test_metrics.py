"""Metrics: the events a call emits, StampedeStats' figures, and hooks that fail."""

from __future__ import annotations

import logging
import threading

import pytest

from stampede_guard import MemoryBackend, StampedeStats, cached_stampede_safe
from stampede_guard.metrics import (
    Computed,
    ComputeError,
    Event,
    Hit,
    LockAcquired,
    LockWait,
    Miss,
    Timeout,
)
from stampede_guard.testing import wait_for_joiners


def test_events_of_a_miss_then_a_hit() -> None:
    """A miss emits Miss, LockAcquired, Computed; the next call emits Hit."""
    events: list[Event] = []

    @cached_stampede_safe(key="k", backend=MemoryBackend(), metrics=events.append)
    def f() -> int:
        return 1

    f()
    f()
    assert [type(e) for e in events] == [Miss, LockAcquired, Computed, Hit]
    assert {e.key for e in events} == {"k"}


def test_failed_computation_is_an_error_and_a_computation() -> None:
    """A function that raises counts as a computation (the upstream was called) and an error."""
    stats = StampedeStats()

    @cached_stampede_safe(backend=MemoryBackend(), metrics=stats)
    def f() -> int:
        raise ValueError

    with pytest.raises(ValueError):  # noqa: PT011
        f()
    snap = stats.snapshot()
    assert (snap.requests, snap.misses, snap.computations, snap.errors, snap.hits) == (
        1,
        1,
        1,
        1,
        0,
    )


def test_snapshot_derives_the_stampede_figures() -> None:
    """Reduction, hit rate, timeout rate and average wait follow the usual stampede formulas."""
    stats = StampedeStats()
    leader: list[Event] = [Miss("k"), LockAcquired("k"), Computed("k", 1.0)]
    waiter: list[Event] = [Miss("k"), LockWait("k", 0.2, "value")]
    late: list[Event] = [
        Miss("k"),
        LockWait("k", 2.0, "timeout"),
        Timeout("k", 2.0, "compute"),
        Computed("k", 1.0),
    ]
    hits: list[Event] = [Hit("k")] * 10
    for event in leader + waiter * 8 + late + hits:
        stats(event)
    snap = stats.snapshot()
    assert snap.requests == 20
    assert snap.hits == 18
    assert snap.computations == 2
    assert snap.lock_waits == 9
    assert snap.api_call_reduction_pct == pytest.approx(90.0)
    assert snap.hit_rate_pct == pytest.approx(90.0)
    assert snap.timeout_rate_pct == pytest.approx(5.0)
    assert snap.average_wait_seconds == pytest.approx((8 * 0.2 + 2.0) / 9)
    stats.reset()
    assert stats.snapshot().requests == 0


def test_empty_snapshot_has_zero_rates() -> None:
    """With no requests every derived figure is 0, not a ZeroDivisionError."""
    snap = StampedeStats().snapshot()
    assert (
        snap.api_call_reduction_pct,
        snap.hit_rate_pct,
        snap.timeout_rate_pct,
        snap.average_wait_seconds,
    ) == (0, 0, 0, 0)


def test_hook_that_raises_is_logged_and_does_not_change_the_result(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failing metrics hook is logged on 'stampede_guard'; the call still returns its value."""

    def broken(event: Event) -> None:
        raise RuntimeError(type(event).__name__)

    @cached_stampede_safe(backend=MemoryBackend(), metrics=broken)
    def f() -> int:
        return 7

    with caplog.at_level(logging.ERROR, logger="stampede_guard"):
        assert f() == 7
        assert f() == 7
    assert any("metrics hook" in r.message for r in caplog.records)


def test_compute_error_event_carries_the_exception() -> None:
    """ComputeError holds the very exception the function raised."""
    events: list[Event] = []
    boom = KeyError("x")

    @cached_stampede_safe(key="f", backend=MemoryBackend(), metrics=events.append)
    def f() -> int:
        raise boom

    with pytest.raises(KeyError):
        f()
    errors = [e for e in events if isinstance(e, ComputeError)]
    assert len(errors) == 1
    assert errors[0].error is boom


@pytest.mark.timeout(30)
def test_stats_count_a_threaded_stampede_exactly() -> None:
    """50 threads on one cold key: 50 requests, 1 computation, 49 hits after waiting, 98 % reduction."""
    stats = StampedeStats()
    barrier = threading.Barrier(50)

    @cached_stampede_safe(
        key="k", backend=MemoryBackend(), metrics=stats, base_delay=0.01, max_delay=0.05
    )
    def f() -> int:
        wait_for_joiners(f, 49)  # every other caller shares this computation
        return 1

    def call() -> None:
        barrier.wait()
        f()

    threads = [threading.Thread(target=call) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    snap = stats.snapshot()
    assert (
        snap.requests,
        snap.computations,
        snap.hits,
        snap.timeouts,
        snap.errors,
    ) == (50, 1, 49, 0, 0)
    assert snap.lock_waits == 49
    assert snap.api_call_reduction_pct == pytest.approx(98.0)
