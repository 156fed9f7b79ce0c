"""Real threads on the memory backend and on real Redis: one computation per key and TTL window."""

from __future__ import annotations

import threading
import uuid
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stampede_guard import Backend, MemoryBackend, RedisBackend, cached_stampede_safe
from stampede_guard.testing import wait_for_joiners


def stampede(
    threads: int, keys: int, compute_s: float, backend: Backend | None = None
) -> tuple[Counter[int], list[object]]:
    """Release *threads* threads at once on *keys* cold keys; count computations per key."""
    computed: Counter[int] = Counter()
    guard = threading.Lock()
    barrier = threading.Barrier(threads)
    results: list[object] = [None] * threads

    @cached_stampede_safe(
        key="k:{k}",
        backend=backend or MemoryBackend(),
        base_delay=0.005,
        max_delay=0.05,
        ttl=60,
    )
    def f(k: int) -> tuple[int, str]:
        with guard:
            computed[k] += 1
        threading.Event().wait(compute_s)
        return (k, f"value-{k}")

    def call(i: int) -> None:
        barrier.wait()
        try:
            results[i] = f(i % keys)
        except Exception as exc:
            results[i] = (exc, exc.__cause__)  # keep a backend error's cause

    pool = [threading.Thread(target=call, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(30)
    assert not any(t.is_alive() for t in pool), "a caller hung"
    return computed, results


@pytest.mark.timeout(120)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    threads=st.integers(1, 200),
    keys=st.integers(1, 5),
    compute_s=st.sampled_from([0.0, 0.01, 0.05, 0.2]),
)
def test_each_key_is_computed_once_and_everyone_gets_its_value(
    threads: int, keys: int, compute_s: float
) -> None:
    """Any number of threads (up to 200) over any keys: one computation per key, one value per key."""
    computed, results = stampede(threads, keys, compute_s)
    used = {i % keys for i in range(threads)}
    assert computed == Counter(dict.fromkeys(used, 1))
    for i, result in enumerate(results):
        assert result == (i % keys, f"value-{i % keys}")


@pytest.mark.timeout(60)
def test_thousand_threads_one_cold_key_compute_once() -> None:
    """1,000 threads released together on one cold key: exactly one computation."""
    computed, results = stampede(1000, 1, 0.3)
    assert computed == Counter({0: 1})
    assert set(map(repr, results)) == {repr((0, "value-0"))}


@pytest.mark.timeout(30)
def test_a_new_ttl_window_computes_once_more() -> None:
    """After the entry expires, the next stampede computes exactly once again."""
    now = [0.0]
    backend = MemoryBackend(clock=lambda: now[0])
    calls = Counter[str]()
    guard = threading.Lock()

    @cached_stampede_safe(
        key="k",
        backend=backend,
        ttl=60,
        lock_timeout=10,
        base_delay=0.005,
        max_delay=0.02,
    )
    def f() -> int:
        with guard:
            calls["n"] += 1
        wait_for_joiners(f, 29)  # one stampede per burst: the others all join it
        return calls["n"]

    def burst() -> set[int]:
        barrier = threading.Barrier(30)
        seen: set[int] = set()

        def call() -> None:
            barrier.wait()
            value = f()
            with guard:
                seen.add(value)

        pool = [threading.Thread(target=call) for _ in range(30)]
        for t in pool:
            t.start()
        for t in pool:
            t.join(10)
        return seen

    assert burst() == {1}
    now[0] = 61.0
    assert burst() == {2}
    assert calls["n"] == 2


@pytest.mark.timeout(180)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    threads=st.integers(1, 200),
    keys=st.integers(1, 5),
    compute_s=st.sampled_from([0.0, 0.01, 0.05, 0.2]),
)
def test_each_key_is_computed_once_on_real_redis(
    redis_url: str, threads: int, keys: int, compute_s: float
) -> None:
    """The same property through a real redis-server: one computation per key, same values."""
    backend = RedisBackend.from_url(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}")
    try:
        computed, results = stampede(threads, keys, compute_s, backend)
    finally:
        backend.close()
    used = {i % keys for i in range(threads)}
    assert computed == Counter(dict.fromkeys(used, 1))
    for i, result in enumerate(results):
        assert result == [
            i % keys,
            f"value-{i % keys}",
        ]  # JSON brings tuples back as lists


@pytest.mark.timeout(120)
def test_thousand_threads_one_cold_key_compute_once_on_real_redis(
    redis_url: str,
) -> None:
    """1,000 threads sharing one RedisBackend on one cold key: one computation, no pool errors."""
    backend = RedisBackend.from_url(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}")
    try:
        computed, results = stampede(1000, 1, 0.5, backend)
    finally:
        backend.close()
    assert computed == Counter({0: 1})
    assert all(r == [0, "value-0"] for r in results), {repr(r) for r in results}
