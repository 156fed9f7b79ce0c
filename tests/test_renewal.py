"""Lease renewal: a computation longer than lock_timeout keeps its lock (and nothing else).

The decisions (when to extend, when to stop) are one plan, `renew`, stepped here on a
fake clock; the drivers are checked to run it beside a computation and stop it after,
synchronised on the backend's answers rather than on sleeps; one real-server test
proves renewal end to end.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import pytest

from stampede_guard import (
    BackendError,
    MemoryBackend,
    RedisBackend,
    cached_stampede_safe,
)
from stampede_guard._context import Context, Policy, Via
from stampede_guard._drivers import run_async, run_sync
from stampede_guard._ops import Extend, Op, Tick
from stampede_guard._plan import plan
from stampede_guard._renewal import renew

pytestmark = pytest.mark.timeout(30)


@dataclass
class FakeClock:
    now: float = 100.0

    def __call__(self) -> float:
        return self.now


def context(clock: FakeClock, lock_timeout: float = 3.0) -> Context:
    policy = Policy(
        ttl=60,
        lock_timeout=lock_timeout,
        wait_timeout=10,
        base_delay=0.1,
        max_delay=1.6,
        max_retries=None,
        on_timeout="compute",
        lock_renewal=True,
    )
    return Context(policy, lambda _event: None, clock=clock, new_token=lambda: "tok")


def step(
    gen: Generator[Op, Any, None], clock: FakeClock, extend: Any = True
) -> list[tuple[float, Op]]:
    """Run *gen* to its end: every Tick advances *clock*; every Extend gets *extend*."""
    seen: list[tuple[float, Op]] = []
    answer: Any = None
    op = next(gen)
    while True:
        seen.append((clock.now, op))
        if isinstance(op, Tick):
            clock.now += op.seconds
            answer = True
        elif isinstance(extend, BaseException):
            try:
                op = gen.throw(extend)
            except StopIteration:
                return seen
            continue
        else:
            answer = extend
        try:
            op = gen.send(answer)
        except StopIteration:
            return seen


def test_renewal_extends_every_third_of_the_lease_never_past_the_limit() -> None:
    """Each round waits a third of the lease, then extends; the lease never outlasts the limit."""
    clock = FakeClock()
    seen = step(renew("k", "tok", 3.0, 30.0, context(clock)), clock)
    extends = [(at, op) for at, op in seen if isinstance(op, Extend)]
    assert all(op == Extend("k", "tok", 3.0) for _, op in extends)
    assert [at - 100.0 for at, _ in extends] == pytest.approx(
        [1.0 * n for n in range(1, len(extends) + 1)]
    )
    assert extends[-1][0] - 100.0 + 3.0 <= 30.0, "no lease past the renewal limit"
    assert len(extends) == 27, "renewed up to the limit"
    assert isinstance(seen[0][1], Tick), "the lock was just taken: wait first"


def test_renewal_stops_at_once_when_the_computation_ends() -> None:
    """A Tick answered False (the function returned) ends the watchdog without an extend."""
    clock = FakeClock()
    gen = renew("k", "tok", 3.0, 30.0, context(clock))
    assert next(gen) == Tick(1.0)
    with pytest.raises(StopIteration):
        gen.send(False)


def test_renewal_stops_when_the_lock_turns_out_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An extend answered False (another holder, or none) ends renewal, with a warning."""
    clock = FakeClock()
    with caplog.at_level(logging.WARNING, logger="stampede_guard"):
        seen = step(renew("k", "tok", 3.0, 30.0, context(clock)), clock, extend=False)
    assert [type(op) for _, op in seen] == [Tick, Extend]
    assert "lost the lock on 'k'" in caplog.text


def test_a_failed_renewal_is_logged_and_tried_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A backend failure while extending is logged, never raised: the next round tries again."""
    clock = FakeClock()
    with caplog.at_level(logging.WARNING, logger="stampede_guard"):
        seen = step(
            renew("k", "tok", 3.0, 30.0, context(clock)),
            clock,
            extend=BackendError("k", "extend"),
        )
    assert sum(isinstance(op, Extend) for _, op in seen) == 27
    assert "could not renew the lock on 'k'" in caplog.text


class CountingBackend(MemoryBackend):
    """A memory backend on a fake clock that counts extends and says when it saw *wanted*."""

    def __init__(self, wanted: int) -> None:
        super().__init__(clock=FakeClock())
        self.extends = 0
        self.wanted = wanted
        self.enough = threading.Event()
        self.results: list[bool] = []

    def extend(self, key: str, token: str, lock_ttl: float) -> bool:
        held = super().extend(key, token, lock_ttl)
        self.extends += 1
        self.results.append(held)
        if self.extends >= self.wanted or not held:
            self.enough.set()
        return held

    async def aextend(self, key: str, token: str, lock_ttl: float) -> bool:
        return self.extend(key, token, lock_ttl)


def test_sync_driver_renews_while_computing_and_stops_with_the_computation() -> None:
    """The sync driver runs the watchdog in a thread beside the function and joins it after."""
    backend = CountingBackend(wanted=3)
    ctx = context(FakeClock(), lock_timeout=0.03)

    def compute() -> str:
        assert backend.enough.wait(10), "renewed while computing"
        return "v"

    assert run_sync(plan("k", ctx), backend, compute) == ("v", Via.COMPUTED)
    renewed = backend.extends
    assert renewed >= 3
    assert all(backend.results), "the lock was held at every renewal"
    assert not any(t.name == "stampede_guard-renewal" for t in threading.enumerate())
    assert backend.extends == renewed, "no renewal after the computation"


def test_async_driver_renews_while_computing_and_stops_with_the_computation() -> None:
    """The asyncio driver runs the same watchdog plan in a task, cancelled after."""
    backend = CountingBackend(wanted=3)
    ctx = context(FakeClock(), lock_timeout=0.03)

    async def compute() -> str:
        assert await asyncio.to_thread(backend.enough.wait, 10), "renewed meanwhile"
        return "v"

    async def scenario() -> tuple[object, object]:
        served = await run_async(plan("k", ctx), backend, compute, set())
        renewed = backend.extends
        others = asyncio.all_tasks() - {asyncio.current_task()}
        assert not others, "the renewal task ended with the computation"
        assert backend.extends == renewed, "no renewal after the computation"
        return served

    assert asyncio.run(scenario()) == ("v", Via.COMPUTED)
    assert all(backend.results)


def test_a_lock_lost_mid_computation_still_returns_the_value() -> None:
    """If the lock vanishes while computing, renewal stops; the caller still gets its value."""
    backend = CountingBackend(wanted=1_000)
    ctx = context(FakeClock(), lock_timeout=0.03)
    started = threading.Event()

    def compute() -> str:
        started.set()
        assert backend.enough.wait(10), "the watchdog found the lock gone"
        return "v"

    result: list[object] = []
    worker = threading.Thread(
        target=lambda: result.append(run_sync(plan("k", ctx), backend, compute))
    )
    worker.start()
    assert started.wait(5)
    backend.clear()  # the lock is gone (as after a failover)
    worker.join(10)
    assert result == [("v", Via.COMPUTED)]
    assert backend.results[-1] is False
    assert backend.get("k") is not None, "with the lock free, the value is stored"


def test_renewal_on_real_redis_keeps_one_computation_for_a_long_call(
    redis_url: str, redis_prefix: str
) -> None:
    """End to end on Redis: two 'processes', 20 callers, a call three leases long: one computation."""
    calls = Counter[str]()
    guard = threading.Lock()
    release = threading.Event()
    backends = [RedisBackend.from_url(redis_url, prefix=redis_prefix) for _ in range(2)]

    def compute() -> str:
        with guard:
            calls["n"] += 1
        # Three leases long: without renewal the lock would run out twice over.
        release.wait(1.5)
        return "v"

    copies = [
        cached_stampede_safe(
            key="k",
            backend=backend,
            ttl=60,
            lock_timeout=0.5,
            wait_timeout=20,  # waiters (and joiners) outwait the computation
            lock_renewal=True,
        )(compute)
        for backend in backends
    ]
    barrier = threading.Barrier(20)
    results: list[str] = []

    def call(i: int) -> None:
        barrier.wait()
        results.append(copies[i % 2]())

    threads = [threading.Thread(target=call, args=(i,)) for i in range(20)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(25)
    finally:
        for backend in backends:
            backend.close()
    assert results == ["v"] * 20
    assert calls["n"] == 1
