"""Final invalidation, fresh refreshes, and no older value over a newer one.

Every store carries the ticket of the look before its computation; the backend refuses
it when an invalidation or a value begun later came first. Proven on the in-memory
backend and on a real redis-server, across threads and processes, and by hypothesis
interleaving misses, refreshes, stores and invalidations op by op.
"""

from __future__ import annotations

import itertools
import multiprocessing
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _waiting import Waiting
from stampede_guard import Backend, MemoryBackend, RedisBackend, cached_stampede_safe
from stampede_guard._context import Context, Plan, Policy
from stampede_guard._ops import (
    AwaitFlight,
    AwaitNotice,
    Bypass,
    Compute,
    Delete,
    Extend,
    Get,
    GetOrLock,
    Op,
    Set,
    SetAndUnlock,
    Spawn,
    Subscribe,
    TakeLock,
    Tick,
    Unlock,
    Unsubscribe,
)
from stampede_guard._plan import plan, refresh_now
from stampede_guard.backends.redis._codec import _tag

pytestmark = pytest.mark.timeout(60)


class Gate:
    """Holds a computation until the test opens it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()

    def wait(self) -> None:
        self.entered.set()
        assert self.open.wait(20), "the test never opened the gate"


def background(call: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    got: list[object] = []
    thread = threading.Thread(target=lambda: got.append(call()))
    thread.start()
    return thread, got


def test_invalidate_is_final_against_a_computation_in_flight(
    make_backend: Callable[[], Backend],
) -> None:
    """A computation begun before invalidate() stores nothing; later callers never see it."""
    source = ["old"]
    gate = Gate()

    @cached_stampede_safe(key="doc", backend=make_backend(), lock_timeout=30)
    def doc() -> str:
        value = source[0]
        if value == "old":
            gate.wait()
        return value

    thread, got = background(doc)
    assert gate.entered.wait(10)
    source[0] = "new"
    doc.invalidate()
    assert doc() == "new", "a call after invalidate() computes at once"
    gate.open.set()
    thread.join(10)
    assert got == ["old"], "the call that began before gets what it computed"
    assert doc() == "new"
    entry = doc.get_cached()
    assert entry is not None
    assert entry.value == "new"


def test_invalidate_revokes_the_lock_so_waiters_are_not_stranded(
    make_backend: Callable[[], Backend],
) -> None:
    """Waiters of a revoked holder look again at once; one computes the new value."""
    source = ["old"]
    gate = Gate()
    options: dict[str, Any] = {"key": "doc", "lock_timeout": 30, "max_delay": 0.2}

    def compute() -> str:
        value = source[0]
        if value == "old":
            gate.wait()
        return value

    waiting = Waiting()
    holder_process = cached_stampede_safe(backend=make_backend(), **options)(compute)
    waiter_process = cached_stampede_safe(
        backend=make_backend(), metrics=waiting, **options
    )(compute)
    holder, _ = background(holder_process)
    assert gate.entered.wait(10)
    waiter, waited = background(waiter_process)
    waiting.until_missed()  # it found the lock held: it waits for the holder
    source[0] = "new"
    waiter_process.invalidate()
    waiter.join(10)
    assert waited == ["new"]
    assert holder.is_alive(), "served before the revoked holder finished"
    gate.open.set()
    holder.join(10)
    assert holder_process() == "new"


def test_an_older_value_never_overwrites_a_newer_one(
    make_backend: Callable[[], Backend],
) -> None:
    """A leader hangs past its lease; another stores "new"; the late "old" is refused."""
    gate = Gate()
    options: dict[str, Any] = {
        "key": "k",
        "lock_timeout": 0.3,
        "base_delay": 0.02,
        "max_delay": 0.05,
    }
    calls = itertools.count()

    def compute() -> str:
        if next(calls) == 0:
            gate.wait()
            return "old"
        return "new"

    late_process = cached_stampede_safe(backend=make_backend(), **options)(compute)
    other_process = cached_stampede_safe(backend=make_backend(), **options)(compute)
    late, got = background(late_process)
    assert gate.entered.wait(10)
    assert other_process() == "new"  # waited out the lease, took over, stored
    gate.open.set()
    late.join(10)
    assert got == ["old"]
    assert other_process() == "new"
    assert late_process() == "new"


def test_refresh_returns_and_stores_a_value_begun_after_the_call(
    make_backend: Callable[[], Backend],
) -> None:
    """refresh() while a miss computes the old value: it returns the new one, which stays."""
    source = ["old"]
    gate = Gate()
    backend = make_backend()

    @cached_stampede_safe(key="doc", backend=backend, lock_timeout=30)
    def doc() -> str:
        value = source[0]
        if value == "old":
            gate.wait()
        return value

    miss, got = background(doc)
    assert gate.entered.wait(10)
    source[0] = "new"
    assert doc.refresh() == "new"
    gate.open.set()
    miss.join(10)
    assert got == ["old"]
    entry = doc.get_cached()
    assert entry is not None
    assert entry.value == "new", "the older computation did not replace the refresh"
    assert doc() == "new"


@pytest.mark.redis
@pytest.mark.slow
def test_invalidate_is_final_across_processes(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    """A process computing when another invalidates: its value is refused on the server."""
    import _workers

    ctx = multiprocessing.get_context("spawn")
    started, go = ctx.Event(), ctx.Event()
    child = ctx.Process(
        target=_workers.compute_until_told, args=(redis_url, redis_prefix, started, go)
    )
    child.start()
    backend = RedisBackend.from_url(redis_url, prefix=redis_prefix)
    try:
        assert started.wait(30), "the child never started computing"

        @cached_stampede_safe(key="doc", backend=backend, lock_timeout=30, ttl=60)
        def doc() -> str:
            return "new"

        doc.invalidate()
        go.set()
        child.join(30)
        assert child.exitcode == 0
        assert redis_client.get(f"{redis_prefix}:child-got") == b"old"
        assert doc.get_cached() is None, "the child's older value was refused"
        assert doc() == "new"
    finally:
        go.set()
        child.join(5)
        backend.close()


# --- hypothesis: misses, refreshes, stores and invalidations interleaved op by op ---


@dataclass
class World:
    """A source of truth that changes only together with an invalidation."""

    version: int = 0
    clock: float = 1000.0

    def now(self) -> float:
        return self.clock


def contexts(world: World, lock_timeout: float) -> Context:
    policy = Policy(
        ttl=600,
        lock_timeout=lock_timeout,
        wait_timeout=lock_timeout,
        base_delay=0.1,
        max_delay=0.4,
        max_retries=None,
        on_timeout="compute",
    )
    tokens = itertools.count()
    return Context(
        policy,
        lambda _: None,
        observed=False,
        clock=world.now,
        wall_clock=world.now,
        new_token=lambda: f"t{next(tokens)}",
    )


def perform(backend: Any, op: Op, world: World) -> object:  # noqa: C901 - one case an op
    match op:
        case Get(key):
            return backend.get(key)
        case GetOrLock(key, token, ttl):
            return backend.get_or_lock(key, token, ttl)
        case TakeLock(key, token, ttl):
            return backend.lock(key, token, ttl)
        case Compute():
            return world.version  # the value is the source as it is now
        case Set(key, entry, ttl, ticket):
            return backend.set(key, entry, ttl, ticket=ticket)
        case SetAndUnlock(key, entry, ttl, token, ticket):
            return backend.set_and_unlock(key, entry, ttl, token, ticket=ticket)
        case Unlock(key, token):
            return backend.unlock(key, token)
        case AwaitNotice(seconds=seconds):
            world.clock += seconds  # nobody announces anything: the wait runs out
            return None
        case Subscribe() | Unsubscribe():
            return None
        case AwaitFlight() | Extend() | Tick() | Bypass() | Delete() | Spawn():
            raise AssertionError(op)


def check_invalidation_is_final(
    world: World, backend: Any, steps: list[tuple[str, int]]
) -> None:
    """Run the *steps*; after each, nothing older than the last invalidation is served.

    The plans' clock is *world*'s, which each step and each wait moves on, so leases
    run out, waiters give up and compute without the lock, holders are taken over.
    """
    ctx = contexts(world, lock_timeout=1.0)
    plans: dict[int, tuple[Plan, int, Op | None]] = {}  # id -> plan, floor, pending
    ids = itertools.count()
    floor = 0  # the version of the last completed invalidation
    for action, pick in steps:
        if action == "invalidate":
            world.version += 1
            backend.delete("k")
            floor = world.version
        elif action in {"miss", "refresh"}:
            new = plan("k", ctx) if action == "miss" else refresh_now("k", ctx)
            plans[next(ids)] = (new, floor, None)
        elif plans:
            i = sorted(plans)[pick % len(plans)]
            gen, started_after, pending = plans[i]
            try:
                op = (
                    gen.send(None)
                    if pending is None
                    else gen.send(perform(backend, pending, world))
                )
            except StopIteration as stop:
                value, _ = stop.value
                assert value >= started_after, "a call got a value older than it"
                del plans[i]
            else:
                plans[i] = (gen, started_after, op)
        world.clock += 0.05
        stored = backend.get("k")
        if stored is not None:
            assert stored.value >= floor, "an invalidated value was stored after it"


STEPS = st.lists(
    st.tuples(
        st.sampled_from(["step"] * 6 + ["miss", "refresh", "invalidate"]),
        st.integers(0, 7),
    ),
    min_size=1,
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(steps=STEPS)
def test_no_value_older_than_the_last_invalidation_is_stored_or_served(
    steps: list[tuple[str, int]],
) -> None:
    """Hypothesis, in memory: misses, refreshes, stores and invalidations in any order."""
    world = World()
    check_invalidation_is_final(world, MemoryBackend(clock=world.now), steps)


@pytest.mark.redis
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(steps=STEPS)
def test_no_value_older_than_the_last_invalidation_on_a_real_server(
    steps: list[tuple[str, int]], redis_url: str
) -> None:
    """The same interleavings against redis-server: its scripts fence the stores."""
    prefix = f"h{time.monotonic_ns()}"
    backend = RedisBackend.from_url(redis_url, prefix=prefix)
    try:
        check_invalidation_is_final(World(), backend, steps)
    finally:
        client = backend.client
        for key in client.scan_iter(match=f"{prefix}:*"):
            client.delete(key)
        backend.close()


@pytest.mark.parametrize(
    "write",
    [
        lambda client, key: client.set(key, b"not a number"),
        lambda client, key: client.rpush(key, b"a list"),
    ],
    ids=["garbage-string", "wrong-type"],
)
def test_a_floor_key_written_by_someone_else_is_replaced_not_fatal(
    redis_url: str,
    redis_prefix: str,
    redis_client: redis.Redis,
    write: Callable[[redis.Redis, str], object],
) -> None:
    """Hostile data at the floor key: stores and invalidations still work, and fix it."""
    backend = RedisBackend.from_url(redis_url, prefix=redis_prefix)
    calls = itertools.count(1)

    @cached_stampede_safe(key="doc", backend=backend, on_backend_error="raise")
    def doc() -> int:
        return next(calls)

    floor = f"{redis_prefix}:{{{_tag('doc')}}}:f:doc"
    try:
        write(redis_client, floor)
        assert doc() == 1
        assert doc() == 1, "stored despite the foreign floor"
        redis_client.delete(floor)
        write(redis_client, floor)
        doc.invalidate()
        assert doc() == 2
        assert doc() == 2
    finally:
        backend.close()
