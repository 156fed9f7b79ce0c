"""Serving stale values while one caller refreshes; XFetch early refresh; what gets cached."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _waiting import until_async
from stampede_guard import Entry, MemoryBackend, StampedeStats, cached_stampede_safe
from stampede_guard._context import Context, Policy, Via
from stampede_guard._freshness import RefreshDue
from stampede_guard._ops import (
    AwaitNotice,
    Compute,
    Get,
    GetOrLock,
    Op,
    Set,
    SetAndUnlock,
    Subscribe,
    TakeLock,
    Unlock,
    Unsubscribe,
)
from stampede_guard._plan import plan, refresh
from stampede_guard.metrics import Event, Refresh, RefreshFailed, StaleServed

pytestmark = pytest.mark.timeout(20)

TTL = 60.0


def stale_entry(
    value: object, *, seconds_stale: float = 5.0, compute: float = 0.1
) -> Entry:
    """An entry that expired (by its ttl) *seconds_stale* ago."""
    return Entry(value, time.time() - TTL - seconds_stale, compute)


def stored(backend: MemoryBackend, key: str = "k") -> object:
    """The value stored for *key*, or None."""
    entry = backend.get(key)
    return None if entry is None else entry.value


def wait_for(condition: Any, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        threading.Event().wait(0.005)
    return True


def test_stale_value_is_served_at_once_and_refreshed_once_in_the_background() -> None:
    """50 threads find a stale value: all get it at once; one background refresh stores a new one."""
    backend, stats = MemoryBackend(), StampedeStats()
    backend.set("k", stale_entry("old"), 600)
    release, calls = threading.Event(), Counter[str]()

    @cached_stampede_safe(
        key="k", backend=backend, ttl=TTL, stale_ttl=600, metrics=stats
    )
    def f() -> str:
        calls["n"] += 1
        release.wait(5)
        return "new"

    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(f())) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert results == ["old"] * 50, "nobody waited for the refresh"
    release.set()
    assert wait_for(lambda: stored(backend) == "new")
    assert calls["n"] == 1
    assert f() == "new"
    snap = stats.snapshot()
    assert (snap.stale_served, snap.refreshes, snap.computations) == (50, 1, 1)


def test_inline_refresh_gives_the_refreshing_caller_the_new_value() -> None:
    """background_refresh=False: the first caller computes and gets 'new'; the others get 'old'."""
    backend = MemoryBackend()
    backend.set("k", stale_entry("old"), 600)
    started, release = threading.Event(), threading.Event()

    @cached_stampede_safe(
        key="k", backend=backend, ttl=TTL, stale_ttl=600, background_refresh=False
    )
    def f() -> str:
        started.set()
        release.wait(5)
        return "new"

    first: list[str] = []
    leader = threading.Thread(target=lambda: first.append(f()))
    leader.start()
    assert started.wait(5)
    others = [f() for _ in range(10)]  # while the refresh runs
    release.set()
    leader.join(5)
    assert first == ["new"]
    assert others == ["old"] * 10


def test_only_one_process_refreshes_a_stale_key() -> None:
    """Two copies of a function (two 'processes') on one backend: exactly one refresh."""
    backend = MemoryBackend()
    backend.set("k", stale_entry("old"), 600)
    calls = Counter[str]()
    release = threading.Event()

    def compute() -> str:
        calls["n"] += 1
        release.wait(5)
        return "new"

    copies = [
        cached_stampede_safe(key="k", backend=backend, ttl=TTL, stale_ttl=600)(compute)
        for _ in range(2)
    ]
    assert [copies[i % 2]() for i in range(20)] == ["old"] * 20
    release.set()
    assert wait_for(lambda: stored(backend) == "new")
    assert calls["n"] == 1


def test_failed_refresh_keeps_the_stale_value_and_is_reported() -> None:
    """A refresh that raises leaves the stale value served, reports RefreshFailed, caches nothing."""
    backend = MemoryBackend()
    backend.set("k", stale_entry("old"), 600)
    events: list[Event] = []
    boom = RuntimeError("upstream down")

    @cached_stampede_safe(
        key="k",
        backend=backend,
        ttl=TTL,
        stale_ttl=600,
        background_refresh=False,
        metrics=events.append,
    )
    def f() -> str:
        raise boom

    assert f() == "old"
    failures = [e for e in events if isinstance(e, RefreshFailed)]
    assert [e.error for e in failures] == [boom]
    assert stored(backend) == "old"
    assert backend.get_or_lock("k", "probe", 1) == backend.get("k"), (
        "the lock was released"
    )


def test_stale_if_error_false_raises_to_the_inline_refresher() -> None:
    """With stale_if_error=False the caller that refreshed inline gets the exception."""
    backend = MemoryBackend()
    backend.set("k", stale_entry("old"), 600)

    @cached_stampede_safe(
        key="k",
        backend=backend,
        ttl=TTL,
        stale_ttl=600,
        background_refresh=False,
        stale_if_error=False,
    )
    def f() -> str:
        raise RuntimeError("upstream down")

    with pytest.raises(RuntimeError, match="upstream down"):
        f()


def test_fresh_values_are_not_refreshed() -> None:
    """Within ttl a value is a plain hit: no refresh, no stale event."""
    backend, events = MemoryBackend(), list[Event]()
    backend.set("k", Entry("fresh", time.time(), 0.1), 600)

    @cached_stampede_safe(
        key="k", backend=backend, ttl=TTL, stale_ttl=600, metrics=events.append
    )
    def f() -> str:
        raise AssertionError

    assert f() == "fresh"
    assert not any(isinstance(e, Refresh | StaleServed) for e in events)


def test_values_past_the_stale_window_are_misses() -> None:
    """With stale_ttl, the backend keeps entries ttl + stale_ttl; after that a call computes."""
    now = [0.0]
    backend = MemoryBackend(clock=lambda: now[0])

    @cached_stampede_safe(key="k", backend=backend, ttl=1, lock_timeout=1, stale_ttl=2)
    def f() -> float:
        return time.time()

    first = f()
    now[0] = 2.9
    assert backend.get("k") is not None
    now[0] = 3.0
    assert backend.get("k") is None
    assert f() != first


def test_early_refresh_recomputes_a_hot_value_before_it_expires() -> None:
    """XFetch: a value near expiry that took long to compute is refreshed early, once."""
    backend, stats = MemoryBackend(), StampedeStats()
    # 2 s before expiry (1 ms was too close: on a loaded machine the call came after
    # expiry, a stale refresh), computed in 1e6 s: XFetch refreshes with probability ~1.
    backend.set("k", Entry("old", time.time() - TTL + 2.0, 1e6), 600)

    @cached_stampede_safe(
        key="k", backend=backend, ttl=TTL, early_refresh=True, metrics=stats
    )
    def f() -> str:
        return "new"

    assert f() == "old"
    assert wait_for(lambda: stored(backend) == "new")
    snap = stats.snapshot()
    assert (snap.early_refreshes, snap.refreshes, snap.stale_served) == (1, 1, 0)


def test_early_refresh_leaves_values_far_from_expiry_alone() -> None:
    """A value far from expiry and quick to compute is never refreshed early."""
    backend, events = MemoryBackend(), list[Event]()
    backend.set("k", Entry("v", time.time(), 0.001), 600)

    @cached_stampede_safe(
        key="k", backend=backend, ttl=TTL, early_refresh=True, metrics=events.append
    )
    def f() -> str:
        raise AssertionError

    assert [f() for _ in range(1000)] == ["v"] * 1000
    assert not any(isinstance(e, Refresh) for e in events)


def test_cache_none_false_and_should_cache_keep_results_out_of_the_cache() -> None:
    """Values refused by cache_none=False or should_cache are returned, not stored."""
    backend = MemoryBackend()
    calls = Counter[str]()

    @cached_stampede_safe(key="n", backend=backend, cache_none=False)
    def nothing() -> None:
        calls["none"] += 1

    @cached_stampede_safe(
        key="s:{code}", backend=backend, should_cache=lambda r: r["status"] == 200
    )
    def status(code: int) -> dict[str, int]:
        calls[str(code)] += 1
        return {"status": code}

    assert nothing() is None
    assert nothing() is None
    assert status(500) == {"status": 500}
    assert status(500) == {"status": 500}
    assert status(200) == {"status": 200}
    assert status(200) == {"status": 200}
    assert calls == Counter({"none": 2, "500": 2, "200": 1})
    assert backend.get_or_lock("n", "probe", 1) == "probe", "no lock left behind"


def test_refresh_get_cached_and_bypass_helpers() -> None:
    """refresh() recomputes and stores; get_cached() peeks; bypass() calls the function alone."""
    backend = MemoryBackend()
    calls = Counter[str]()

    @cached_stampede_safe(key="h:{x}", backend=backend)
    def f(x: int) -> int:
        calls["n"] += 1
        return calls["n"] * 100 + x

    assert f.get_cached(1) is None
    assert f(1) == 101
    assert f.refresh(1) == 201
    assert f(1) == 201
    cached = f.get_cached(1)
    assert cached is not None
    assert cached.value == 201
    assert f.bypass(1) == 301
    assert f(1) == 201, "bypass stored nothing"


def test_refresh_while_another_holds_the_lock_computes_anew_and_wins() -> None:
    """refresh() never takes the holder's older value: it computes, stores, and stays."""
    backend = MemoryBackend()
    backend.set("k", Entry("current", time.time(), 0.1), 600)
    holder = backend.lock("k", "someone-else", 60)
    assert holder == "someone-else"
    source = ["changed"]

    @cached_stampede_safe(key="k", backend=backend, wait_timeout=0.1)
    def f() -> str:
        return source[0]

    assert f.refresh() == "changed"
    assert stored(backend) == "changed"
    # The holder began before the refresh: its value must not replace the newer one.
    late = backend.set_and_unlock(
        "k", Entry("older", time.time(), 0.1), 600, "someone-else", ticket=holder.ticket
    )
    assert late is None
    assert stored(backend) == "changed"
    assert f() == "changed"


def test_async_stale_value_is_served_and_refreshed_in_a_task() -> None:
    """The same for async def: the stale value at once, one background task refreshes."""
    backend = MemoryBackend()
    backend.set("k", stale_entry("old"), 600)
    calls = Counter[str]()
    served = asyncio.Event()

    @cached_stampede_safe(key="k", backend=backend, ttl=TTL, stale_ttl=600)
    async def f() -> str:
        calls["n"] += 1
        await served.wait()  # refreshing while all 50 are served, without it
        return "new"

    async def scenario() -> tuple[list[str], str]:
        callers = asyncio.gather(*(f() for _ in range(50)))
        first = list(await asyncio.wait_for(callers, 10))
        served.set()
        await until_async("the refresh", lambda: stored(backend) == "new")
        return first, await f()

    first, later = asyncio.run(scenario())
    assert first == ["old"] * 50
    assert later == "new"
    assert calls["n"] == 1


def test_bad_stale_options_fail_at_decoration_time() -> None:
    """Negative stale_ttl, non-bool flags and a non-callable should_cache are refused."""
    with pytest.raises(ValueError, match="stale_ttl=-1"):
        cached_stampede_safe(stale_ttl=-1)
    with pytest.raises(TypeError, match="background_refresh must be True or False"):
        cached_stampede_safe(background_refresh="yes")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="should_cache must be a callable"):
        cached_stampede_safe(should_cache=3)  # type: ignore[call-overload]
    with pytest.warns(
        UserWarning, match="beta=2.0 has no effect without early_refresh"
    ):
        cached_stampede_safe(beta=2)


# --- Property: under any interleaving, at most one computation per key at a time ----------


def contexts(wall: float) -> Context:
    policy = Policy(
        ttl=TTL,
        lock_timeout=600,
        wait_timeout=30,
        base_delay=0.1,
        max_delay=1.6,
        max_retries=None,
        on_timeout="compute",
        stale_ttl=600,
    )
    tokens = iter(range(10_000))
    return Context(
        policy,
        lambda _: None,
        observed=False,
        wall_clock=lambda: wall,
        new_token=lambda: f"t{next(tokens)}",
    )


@settings(max_examples=200, deadline=None)
@given(
    schedule=st.lists(st.integers(0, 5), min_size=1, max_size=300),
    kinds=st.lists(st.sampled_from(["refresh", "miss"]), min_size=2, max_size=6),
)
def test_at_most_one_computation_runs_under_any_interleaving(
    schedule: list[int], kinds: list[str]
) -> None:
    """Refreshes and misses interleaved op by op never compute concurrently.

    (``refresh()`` on demand is left out: it computes at once by design, even while
    another caller holds the lock, since that caller's value began before it.)
    """
    backend = MemoryBackend()
    ctx = contexts(time.time())
    due = RefreshDue(Entry("old", 0.0, 0.1), "stale")
    plans = []
    for kind in kinds:
        if kind == "refresh":
            plans.append(refresh("k", due, ctx))
        else:
            plans.append(plan("k", ctx))
    pending: list[Op | None] = [next(p) for p in plans]
    computing: set[int] = set()
    done: set[int] = set()
    for pick in schedule + list(range(len(plans))) * 50:
        i = pick % len(plans)
        if i in done:
            continue
        op = pending[i]
        result: object = None
        if isinstance(op, Compute):
            assert i in computing
            computing.discard(i)
            result = f"computed-by-{i}"
        elif isinstance(op, AwaitNotice):
            result = None  # no notice: look again
        else:
            result = perform(backend, op)
        try:
            pending[i] = plans[i].send(result)
        except StopIteration:
            done.add(i)
            continue
        if isinstance(pending[i], Compute):
            computing.add(i)
            assert len(computing) <= 1, "two computations at once"
    assert len(done) == len(plans), "every plan finished"


def perform(backend: MemoryBackend, op: Op | None) -> object:
    match op:
        case Get(key):
            return backend.get(key)
        case GetOrLock(key, token, ttl):
            return backend.get_or_lock(key, token, ttl)
        case TakeLock(key, token, ttl):
            return backend.lock(key, token, ttl)
        case Set(key, entry, ttl, ticket):
            return backend.set(key, entry, ttl, ticket=ticket)
        case SetAndUnlock(key, entry, ttl, token, ticket):
            return backend.set_and_unlock(key, entry, ttl, token, ticket=ticket)
        case Unlock(key, token):
            return backend.unlock(key, token)
        case Subscribe() | Unsubscribe():
            return None
        case _:
            raise AssertionError(op)


def test_a_refresh_whose_double_check_fails_releases_the_lock_and_keeps_the_value() -> (
    None
):
    """If the read after taking the lock fails, the lock is released and the stale value kept."""
    from stampede_guard import BackendError

    events: list[Event] = []
    ctx = contexts(time.time())
    ctx = Context(
        ctx.policy, events.append, wall_clock=ctx.wall_clock, new_token=lambda: "tok"
    )
    gen = refresh("k", RefreshDue(Entry("old", 0.0, 0.1), "stale"), ctx)
    assert next(gen) == TakeLock("k", "tok", 600)
    assert gen.send("tok") == Get("k")
    assert gen.throw(BackendError("k", "get")) == Unlock("k", "tok")
    with pytest.raises(StopIteration) as stop:
        gen.send(True)
    assert stop.value.value == ("old", Via.CACHE)
    assert [type(e) for e in events] == [RefreshFailed]
