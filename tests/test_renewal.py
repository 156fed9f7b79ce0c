"""Lease renewal: a computation longer than lock_timeout keeps its lock (and nothing else)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
import redis

from stampede_guard import MemoryBackend, RedisBackend, cached_stampede_safe

pytestmark = pytest.mark.timeout(30)


def two_processes(
    backend_of: Callable[[], object], renewal: bool
) -> tuple[list[str], int]:
    """Two copies of one function ('processes') on a shared backend, 20 callers, a 0.6 s
    computation and a 0.2 s lease: return the results and the number of computations."""
    calls = Counter[str]()
    guard = threading.Lock()

    def compute() -> str:
        with guard:
            calls["n"] += 1
        time.sleep(0.6)
        return "v"

    copies = [
        cached_stampede_safe(
            key="k",
            backend=backend_of(),  # type: ignore[call-overload]
            ttl=60,
            lock_timeout=0.2,
            wait_timeout=5,  # waiters (and joiners) outwait the computation
            lock_renewal=renewal,
            base_delay=0.02,
            max_delay=0.05,
        )(compute)
        for _ in range(2)
    ]
    barrier = threading.Barrier(20)
    results: list[str] = []

    def call(i: int) -> None:
        barrier.wait()
        results.append(copies[i % 2]())

    threads = [threading.Thread(target=call, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return results, calls["n"]


def test_without_renewal_a_long_computation_loses_its_lock() -> None:
    """The control: a 0.6 s computation on a 0.2 s lease lets a second one start."""
    backend = MemoryBackend()
    results, computations = two_processes(lambda: backend, renewal=False)
    assert results == ["v"] * 20
    assert computations == 2


def test_with_renewal_a_long_computation_keeps_its_lock() -> None:
    """lock_renewal=True: the lease is renewed while computing; one computation in all."""
    backend = MemoryBackend()
    results, computations = two_processes(lambda: backend, renewal=True)
    assert results == ["v"] * 20
    assert computations == 1


def test_renewal_on_real_redis_keeps_the_lock_alive(
    redis_url: str, redis_client: redis.Redis, redis_prefix: str
) -> None:
    """On Redis, the lock's PTTL never runs out while the holder computes, and one computes."""
    backends: list[RedisBackend] = []

    def make() -> RedisBackend:
        backends.append(RedisBackend.from_url(redis_url, prefix=redis_prefix))
        return backends[-1]

    ttls: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            locks = redis_client.scan_iter(match=f"{redis_prefix}:*:l:*")
            ttls.extend(int(redis_client.pttl(lock)) for lock in locks)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        results, computations = two_processes(make, renewal=True)
    finally:
        done.set()
        sampler.join(5)
        for backend in backends:
            backend.close()
    assert results == ["v"] * 20
    assert computations == 1
    assert ttls, "the lock was sampled"
    assert min(t for t in ttls if t != -2) > 0, (
        "the lease never ran out while computing"
    )


def test_a_lock_lost_mid_computation_still_returns_the_value() -> None:
    """If the lock vanishes while computing, renewal stops; the caller still gets its value."""
    backend = MemoryBackend()
    started = threading.Event()

    @cached_stampede_safe(key="k", backend=backend, lock_timeout=0.2, lock_renewal=True)
    def f() -> str:
        started.set()
        time.sleep(0.5)
        return "v"

    result: list[str] = []
    worker = threading.Thread(target=lambda: result.append(f()))
    worker.start()
    assert started.wait(5)
    backend.clear()  # the lock is gone (as after a failover)
    worker.join(10)
    assert result == ["v"]
    assert backend.get("k") is not None, "with the lock free, the value is stored"


def test_async_renewal_keeps_the_lock() -> None:
    """The same for async def: a renewal task keeps the lease while computing."""
    backend = MemoryBackend()
    calls = Counter[str]()

    def make() -> object:
        @cached_stampede_safe(
            key="k",
            backend=backend,
            ttl=60,
            lock_timeout=0.2,
            lock_renewal=True,
            base_delay=0.02,
            max_delay=0.05,
        )
        async def f() -> str:
            calls["n"] += 1
            await asyncio.sleep(0.6)
            return "v"

        return f

    copies = [make(), make()]

    async def scenario() -> list[str]:
        return list(await asyncio.gather(*(copies[i % 2]() for i in range(20))))  # type: ignore[operator]

    assert asyncio.run(scenario()) == ["v"] * 20
    assert calls["n"] == 1
