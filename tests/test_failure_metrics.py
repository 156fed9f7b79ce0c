"""`FailureCached` and `FailureServed`: what an operator sees of ``cache_errors``.

Every caller of a failing key is accounted for exactly once: the leader computed
(`ComputeError`, then `FailureCached`), a caller of the same process shared its
failure (`LockWait` with the outcome ``"error"``), or a caller was raised the stored
failure without calling the function (`FailureServed`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest

from stampede_guard import (
    MemoryBackend,
    StampedeStats,
    cached_stampede_safe,
)
from stampede_guard.backends import Backend, CachedFailure, Entry
from stampede_guard.contrib.logging import LoggingHook
from stampede_guard.metrics import (
    ComputeError,
    Event,
    FailureCached,
    FailureServed,
    Hit,
    LockAcquired,
    LockWait,
    Miss,
)
from stampede_guard.testing import wait_for_joiners

pytestmark = pytest.mark.timeout(60)

CALLERS = 10  # in two simulated processes of CALLERS // 2 threads


class Recorder:
    """A hook that keeps every event and feeds a `StampedeStats`; thread-safe."""

    def __init__(self) -> None:
        self.stats = StampedeStats()
        self.events: list[Event] = []
        self._mutex = threading.Lock()

    def __call__(self, event: Event) -> None:
        self.stats(event)
        with self._mutex:
            self.events.append(event)

    def kinds(self) -> Counter[str]:
        with self._mutex:
            return Counter(type(e).__name__ for e in self.events)

    def of(self, kind: type) -> list[Event]:
        with self._mutex:
            return [e for e in self.events if type(e) is kind]


def test_a_stampede_on_a_failing_key_caches_it_once_and_reports_each_served_failure(
    make_backend: Callable[[], Backend],
) -> None:
    """10 threads in two processes: 1 FailureCached; every other caller shared or was served."""
    recorder = Recorder()
    release = threading.Event()
    calls = 0

    def slow(city: str) -> str:
        nonlocal calls
        calls += 1
        assert release.wait(10)
        raise TimeoutError(f"upstream for {city} took too long")

    functions = [
        cached_stampede_safe(
            key="w:{city}",
            cache_errors={TimeoutError: 5.0},
            backend=make_backend(),
            metrics=recorder,
        )(slow)
        for _ in range(2)
    ]
    raised: list[BaseException] = []

    def call(i: int) -> None:
        try:
            functions[i % 2]("Oslo")
        except Exception as exc:  # collected and checked below
            raised.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(CALLERS)]
    for thread in threads:
        thread.start()
    for function in functions:  # each process's leader, and its joiners behind it
        wait_for_joiners(function, CALLERS // 2 - 1, "Oslo")
    release.set()
    for thread in threads:
        thread.join(20)
    assert calls == 1
    assert len(raised) == CALLERS
    assert all(type(e) is TimeoutError for e in raised)

    kinds = recorder.kinds()
    assert kinds["ComputeError"] == 1
    assert recorder.of(FailureCached) == [
        FailureCached("w:Oslo", "builtins.TimeoutError", 5.0)
    ]
    shared = [
        e
        for e in recorder.of(LockWait)
        if isinstance(e, LockWait) and e.outcome == "error"
    ]
    served = recorder.of(FailureServed)
    # Each caller once: the leader, a joiner sharing its process's failure, or served.
    assert 1 + len(shared) + len(served) == CALLERS
    # The other process's leader waited for the lock and was served the stored failure.
    assert len(served) >= 1
    assert all(e == FailureServed("w:Oslo", "builtins.TimeoutError") for e in served)
    snap = recorder.stats.snapshot()
    assert (snap.failures_cached, snap.failures_served) == (1, len(served))
    assert (snap.computations, snap.errors) == (1, 1)

    # Within the period, a caller in either process: one Hit and one FailureServed each.
    for function in functions:
        with pytest.raises(TimeoutError, match="took too long"):
            function("Oslo")
    assert calls == 1
    assert len(recorder.of(FailureServed)) == len(served) + 2
    assert recorder.kinds()["Hit"] == kinds["Hit"] + 2
    assert recorder.kinds()["FailureCached"] == 1
    snap = recorder.stats.snapshot()
    assert snap.failures_served == len(served) + 2
    # A served failure is a hit (the function was not called) and counts as one.
    assert snap.hits >= snap.failures_served
    assert snap.api_call_reduction_pct == pytest.approx(
        (snap.requests - 1) / snap.requests * 100
    )


def test_a_served_failure_follows_its_hit() -> None:
    """On the hot path: `Hit` then `FailureServed`, nothing else, and no computation."""
    recorder = Recorder()
    backend = MemoryBackend()
    fn = cached_stampede_safe(
        key="k", cache_errors={ConnectionError: 60.0}, backend=backend, metrics=recorder
    )(_refused)
    with pytest.raises(ConnectionError):
        fn()
    assert [type(e) for e in recorder.events][-2:] == [ComputeError, FailureCached]
    recorder.events.clear()
    with pytest.raises(ConnectionError, match="refused"):
        fn()
    assert recorder.events == [Hit("k"), FailureServed("k", "builtins.ConnectionError")]


def _refused() -> str:
    raise ConnectionError("refused")


def test_no_failure_event_for_a_function_whose_errors_are_not_cached() -> None:
    """Without cache_errors (or for a class it does not name): ComputeError only, each call."""
    kept: list[dict[type[Exception], float] | None] = [None, {TimeoutError: 60.0}]
    for cache_errors in kept:
        recorder = Recorder()
        fn = cached_stampede_safe(
            key="k",
            cache_errors=cache_errors,
            backend=MemoryBackend(),
            metrics=recorder,
        )(_refused)
        for _ in range(3):
            with pytest.raises(ConnectionError):
                fn()
        kinds = recorder.kinds()
        assert kinds["ComputeError"] == 3
        assert kinds["FailureCached"] == kinds["FailureServed"] == 0
        snap = recorder.stats.snapshot()
        assert (snap.failures_cached, snap.failures_served) == (0, 0)


def test_a_failure_stored_by_another_process_is_reported_where_it_is_served() -> None:
    """A reader that did not store the failure still reports serving it."""
    backend = MemoryBackend()
    backend.set(
        "k", Entry(CachedFailure("builtins.TimeoutError", "slow"), 0.0, 0.0), 60
    )
    recorder = Recorder()
    fn = cached_stampede_safe(
        key="k", cache_errors={TimeoutError: 5.0}, backend=backend, metrics=recorder
    )(_refused)
    with pytest.raises(TimeoutError, match="slow"):
        fn()
    assert recorder.of(FailureServed) == [FailureServed("k", "builtins.TimeoutError")]
    assert recorder.kinds()["FailureCached"] == 0


def test_a_joiner_that_finds_a_failure_stored_elsewhere_raises_it(
    make_backend: Callable[[], Backend],
) -> None:
    """A leader past its lease, a failure stored by another process: a joiner raises it."""
    recorder = Recorder()
    hang = threading.Event()

    def hung(x: int) -> str:
        assert hang.wait(10)
        return "late"

    def failing(x: int) -> str:
        raise TimeoutError(f"{x} timed out")

    here, elsewhere = (
        cached_stampede_safe(
            key="k:{x}",
            lock_timeout=0.2,
            cache_errors={TimeoutError: 60.0},
            backend=make_backend(),
            metrics=recorder,
        )(fn)
        for fn in (hung, failing)
    )
    leader = threading.Thread(target=here, args=(1,))
    leader.start()
    try:
        time.sleep(0.35)  # the leader's lease runs out; it still computes
        with pytest.raises(TimeoutError, match="1 timed out"):
            elsewhere(1)
        with pytest.raises(TimeoutError, match="1 timed out"):
            here(1)  # joins the hung leader's flight, then looks at the backend
        assert len(recorder.of(FailureServed)) == 1
    finally:
        hang.set()
        leader.join(10)


def test_stats_count_served_failures_among_the_hits() -> None:
    """The snapshot counts both events; a served failure stays a hit, not a computation."""
    stats = StampedeStats()
    leader: list[Event] = [
        Miss("k"),
        LockAcquired("k"),
        ComputeError("k", 0.5, TimeoutError("slow")),
        FailureCached("k", "builtins.TimeoutError", 5.0),
    ]
    waiter: list[Event] = [
        Miss("k"),
        LockWait("k", 0.1, "value"),
        FailureServed("k", "builtins.TimeoutError"),
    ]
    later: list[Event] = [Hit("k"), FailureServed("k", "builtins.TimeoutError")] * 2
    for event in [*leader, *waiter, *later]:
        stats(event)
    snap = stats.snapshot()
    assert (snap.failures_cached, snap.failures_served) == (1, 3)
    assert (snap.requests, snap.hits, snap.computations, snap.errors) == (4, 3, 1, 1)
    assert snap.api_call_reduction_pct == 75.0
    assert snap.hits - snap.failures_served == 0  # no caller got a value
    stats.reset()
    assert (stats.snapshot().failures_cached, stats.snapshot().failures_served) == (
        0,
        0,
    )


def test_logging_names_a_stored_failure_type_as_it_names_an_exception(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`builtins.` is left out, as for `ComputeError`; other modules are kept; no message."""
    hook = LoggingHook()
    with caplog.at_level(logging.DEBUG, logger="stampede_guard.events"):
        hook(FailureCached("k", "builtins.TimeoutError", 2.5))
        hook(FailureServed("k", "myapp.errors.QuotaError"))
    assert [r.getMessage() for r in caplog.records] == [
        "failure_cached key=k error=TimeoutError seconds=2.500",
        "failure_served key=k error=myapp.errors.QuotaError",
    ]
