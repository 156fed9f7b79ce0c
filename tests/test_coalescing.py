"""In-process coalescing: concurrent callers of one key share one call to the backend."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from _waiting import until_async
from stampede_guard import (
    BackendError,
    Entry,
    MemoryBackend,
    StampedeStats,
    cached_stampede_safe,
)
from stampede_guard.testing import joiners, wait_for_joiners


class CountingBackend:
    """A remote-looking backend (no fast local reads) that counts every call made to it."""

    def __init__(self, fail: bool = False) -> None:
        self.store = MemoryBackend()
        self.calls: Counter[str] = Counter()
        self.fail = fail
        # What a failing call waits for before it fails: the test's callers piling up.
        self.before_failing: Callable[[], object] = lambda: None
        self.guard = threading.Lock()

    def _count(self, name: str, key: str) -> None:
        with self.guard:
            self.calls[name] += 1
        if self.fail:
            self.before_failing()
            raise BackendError(key, name)

    def get(self, key: str) -> Entry | None:
        self._count("get", key)
        return self.store.get(key)

    def get_or_lock(self, key: str, token: str, lock_ttl: float) -> Entry | str:
        self._count("get_or_lock", key)
        return self.store.get_or_lock(key, token, lock_ttl)

    def lock(self, key: str, token: str, lock_ttl: float) -> str:
        self._count("lock", key)
        return self.store.lock(key, token, lock_ttl)

    def set(
        self, key: str, entry: Entry, ttl: float, *, ticket: int | None = None
    ) -> Entry | None:
        self._count("set", key)
        return self.store.set(key, entry, ttl, ticket=ticket)

    def set_and_unlock(
        self,
        key: str,
        entry: Entry,
        ttl: float,
        token: str,
        *,
        ticket: int | None = None,
    ) -> Entry | None:
        self._count("set_and_unlock", key)
        return self.store.set_and_unlock(key, entry, ttl, token, ticket=ticket)

    def unlock(self, key: str, token: str) -> bool:
        self._count("unlock", key)
        return self.store.unlock(key, token)

    def extend(self, key: str, token: str, lock_ttl: float) -> bool:
        self._count("extend", key)
        return self.store.extend(key, token, lock_ttl)

    def delete(self, key: str) -> None:
        self._count("delete", key)
        self.store.delete(key)


def thread_stampede(fn: Any, callers: int) -> list[object]:
    barrier = threading.Barrier(callers)
    results: list[object] = [None] * callers

    def call(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return results


@pytest.mark.timeout(30)
def test_thousand_threads_make_one_conversation_with_the_backend() -> None:
    """1,000 threads on one cold key: one GET, one get_or_lock, one store, one computation."""
    backend = CountingBackend()
    computations = 0

    @cached_stampede_safe(key="k", backend=backend)
    def f() -> str:
        nonlocal computations
        computations += 1
        wait_for_joiners(f, 999, timeout=20)  # no caller arrives after it is stored
        return "v"

    assert thread_stampede(f, 1000) == ["v"] * 1000
    assert computations == 1
    assert backend.calls == Counter({"get": 1, "get_or_lock": 1, "set_and_unlock": 1})


@pytest.mark.timeout(30)
def test_concurrent_hits_share_one_read() -> None:
    """Callers arriving while a read is in flight share it instead of each reading."""
    backend = CountingBackend()
    backend.store.set("k", Entry("v", 0.0, 0.0), 60)
    entered = threading.Event()
    release = threading.Event()
    original = backend.get

    def slow_get(key: str) -> Entry | None:
        entered.set()
        release.wait(5)
        return original(key)

    backend.get = slow_get  # type: ignore[method-assign]

    @cached_stampede_safe(key="k", backend=backend)
    def f() -> str:
        raise AssertionError

    results: list[str] = []
    first = threading.Thread(target=lambda: results.append(f()))
    first.start()
    entered.wait(5)
    others = [threading.Thread(target=lambda: results.append(f())) for _ in range(50)]
    for t in others:
        t.start()
    wait_for_joiners(f, 50)  # every other caller shares the first one's read
    release.set()
    for t in [first, *others]:
        t.join(10)
    assert results == ["v"] * 51
    assert backend.calls["get"] == 1


@pytest.mark.timeout(30)
def test_backend_down_costs_one_read_and_one_computation_per_process() -> None:
    """Backend failing: 200 concurrent callers make one backend call and one computation."""
    backend = CountingBackend(fail=True)
    stats = StampedeStats()
    computations = 0

    @cached_stampede_safe(key="k", backend=backend, metrics=stats)
    def f() -> str:
        nonlocal computations
        computations += 1
        return "computed anyway"

    # The failing read holds until every other caller joined the call it is part of.
    backend.before_failing = lambda: wait_for_joiners(f, 199)
    results = thread_stampede(f, 200)
    assert results == ["computed anyway"] * 200
    assert backend.calls == Counter({"get": 1})
    assert computations == 1
    assert stats.snapshot().backend_errors == 1


@pytest.mark.timeout(30)
def test_backend_down_with_raise_shares_the_backend_error() -> None:
    """on_backend_error='raise': one backend call, every concurrent caller gets BackendError."""
    backend = CountingBackend(fail=True)

    @cached_stampede_safe(key="k", backend=backend, on_backend_error="raise")
    def f() -> str:
        raise AssertionError

    backend.before_failing = lambda: wait_for_joiners(f, 199)
    results = thread_stampede(f, 200)
    assert all(isinstance(r, BackendError) for r in results)
    assert backend.calls == Counter({"get": 1})


@pytest.mark.timeout(30)
def test_joined_callers_are_counted_as_hits_or_waits() -> None:
    """Callers that joined a computing call count as misses that waited; all are requests."""
    stats = StampedeStats()

    @cached_stampede_safe(key="k", backend=CountingBackend(), metrics=stats)
    def f() -> str:
        wait_for_joiners(f, 99)  # no caller arrives after it is stored
        return "v"

    thread_stampede(f, 100)
    snap = stats.snapshot()
    assert (snap.requests, snap.computations, snap.hits, snap.lock_waits) == (
        100,
        1,
        99,
        99,
    )


@pytest.mark.timeout(30)
def test_thousand_tasks_make_one_conversation_with_the_backend() -> None:  # noqa: C901
    """1,000 tasks on one cold key share one plan: one GET, one lock, one store."""
    backend = CountingBackend()

    class AsyncFace:
        async def aget(self, key: str) -> Entry | None:
            return backend.get(key)

        async def aget_or_lock(
            self, key: str, token: str, lock_ttl: float
        ) -> Entry | str:
            return backend.get_or_lock(key, token, lock_ttl)

        async def alock(self, key: str, token: str, lock_ttl: float) -> str:
            return backend.lock(key, token, lock_ttl)

        async def aset(
            self, key: str, entry: Entry, ttl: float, *, ticket: int | None = None
        ) -> Entry | None:
            return backend.set(key, entry, ttl, ticket=ticket)

        async def aset_and_unlock(
            self,
            key: str,
            entry: Entry,
            ttl: float,
            token: str,
            *,
            ticket: int | None = None,
        ) -> Entry | None:
            return backend.set_and_unlock(key, entry, ttl, token, ticket=ticket)

        async def aunlock(self, key: str, token: str) -> bool:
            return backend.unlock(key, token)

        async def aextend(self, key: str, token: str, lock_ttl: float) -> bool:
            return backend.extend(key, token, lock_ttl)

        async def adelete(self, key: str) -> None:
            backend.delete(key)

    computations = 0

    @cached_stampede_safe(key="k", backend=AsyncFace())
    async def f() -> str:
        nonlocal computations
        computations += 1
        # No task arrives after it is stored (the tasks run on this loop: look between).
        await until_async("999 joiners", lambda: joiners(f) == 999)
        return "v"

    async def scenario() -> list[str]:
        return list(await asyncio.gather(*(f() for _ in range(1000))))

    assert asyncio.run(scenario()) == ["v"] * 1000
    assert computations == 1
    assert backend.calls == Counter({"get": 1, "get_or_lock": 1, "set_and_unlock": 1})


@pytest.mark.timeout(30)
def test_a_cancelled_joiner_does_not_cancel_the_call_it_joined() -> None:
    """Cancelling a task that joined another's call leaves that call and its value intact."""
    started, release = asyncio.Event(), asyncio.Event()

    @cached_stampede_safe(key="k", backend=MemoryBackend())
    async def f() -> str:
        started.set()
        await release.wait()  # computing until the joiner has been cancelled
        return "v"

    async def scenario() -> str:
        leader = asyncio.create_task(f())
        await started.wait()
        joiner = asyncio.create_task(f())
        await until_async("the joiner joining", lambda: joiners(f) == 1)
        joiner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await joiner
        release.set()
        return await leader

    assert asyncio.run(scenario()) == "v"
