"""Waiters wake when the value lands: pub/sub notices on real Redis, polling as the safety net."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from _waiting import Waiting
from stampede_guard import (
    AsyncRedisBackend,
    MemoryBackend,
    RedisBackend,
    cached_stampede_safe,
)
from stampede_guard.testing import wait_for_joiners

# Waiters that only polled would sleep this long between looks: a test that finishes
# well within its timeout proves that a notice woke them.
SLOW_POLL: dict[str, Any] = {
    "base_delay": 30,
    "max_delay": 30,
    "wait_timeout": 60,
    "lock_timeout": 60,
}

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def backends(redis_url: str, redis_prefix: str) -> Iterator[Callable[[], RedisBackend]]:
    """Make RedisBackends on one prefix (each stands for a process); closed afterwards."""
    made: list[RedisBackend] = []

    def make() -> RedisBackend:
        backend = RedisBackend.from_url(redis_url, prefix=redis_prefix)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


def listener_threads() -> int:
    return sum(t.name == "stampede_guard-listener" for t in threading.enumerate())


def start_leader(
    backend: RedisBackend, key: str, release: threading.Event, fail: bool = False
) -> threading.Thread:
    """Compute *key* through *backend* in a thread, finishing when *release* is set."""

    @cached_stampede_safe(key=key, backend=backend, ttl=60, lock_timeout=60)
    def lead() -> str:
        release.wait(10)
        if fail:
            raise RuntimeError("leader fails")
        return "from-leader"

    def run() -> None:
        with contextlib.suppress(RuntimeError):
            lead()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def wait_for_lock(client: redis.Redis, prefix: str) -> None:
    for _ in range(500):
        if list(client.scan_iter(match=f"{prefix}:*:l:*")):
            return
        threading.Event().wait(0.01)
    pytest.fail("the leader never took the lock")


def wait_for_pubsub_client(client: redis.Redis) -> None:
    for _ in range(500):
        if client.client_list(_type="pubsub"):
            return
        threading.Event().wait(0.01)
    pytest.fail("no pub/sub connection was opened")


def test_a_waiter_in_another_process_wakes_on_the_notice(
    backends: Callable[[], RedisBackend], redis_client: redis.Redis, redis_prefix: str
) -> None:
    """A waiter that would poll only every 30 s gets the value as soon as it is stored."""
    release = threading.Event()
    leader = start_leader(backends(), "k", release)
    wait_for_lock(redis_client, redis_prefix)

    waiting = Waiting()

    @cached_stampede_safe(key="k", backend=backends(), metrics=waiting, **SLOW_POLL)
    def wait() -> str:
        raise AssertionError("the waiter must not compute")

    result: list[str] = []
    waiter = threading.Thread(target=lambda: result.append(wait()))
    waiter.start()
    waiting.until_missed()
    release.set()
    waiter.join(10)
    leader.join(10)
    assert result == ["from-leader"]
    assert waiting.waited("value") == 1


def test_a_release_notice_lets_a_waiter_take_over_at_once(
    backends: Callable[[], RedisBackend], redis_client: redis.Redis, redis_prefix: str
) -> None:
    """When the leader fails, a slow-polling waiter elsewhere takes the lock and computes."""
    release = threading.Event()
    leader = start_leader(backends(), "k", release, fail=True)
    wait_for_lock(redis_client, redis_prefix)

    waiting = Waiting()

    @cached_stampede_safe(key="k", backend=backends(), metrics=waiting, **SLOW_POLL)
    def take_over() -> str:
        return "from-waiter"

    result: list[str] = []
    waiter = threading.Thread(target=lambda: result.append(take_over()))
    waiter.start()
    waiting.until_missed()
    release.set()
    waiter.join(10)
    leader.join(10)
    assert result == ["from-waiter"]
    assert waiting.waited("lock") == 1


def test_lost_notices_still_end_in_a_served_value(
    backends: Callable[[], RedisBackend], redis_client: redis.Redis, redis_prefix: str
) -> None:
    """With every pub/sub connection killed mid-wait, the waiter's polls still find the value."""
    release = threading.Event()
    leader = start_leader(backends(), "k", release)
    wait_for_lock(redis_client, redis_prefix)

    waiting = Waiting()

    @cached_stampede_safe(
        key="k",
        backend=backends(),
        metrics=waiting,
        base_delay=0.05,
        max_delay=0.1,
        lock_timeout=60,
    )
    def wait() -> str:
        raise AssertionError("the waiter must not compute")

    result: list[str] = []
    waiter = threading.Thread(target=lambda: result.append(wait()))
    waiter.start()
    waiting.until_missed()
    wait_for_pubsub_client(redis_client)
    assert redis_client.client_kill_filter(_type="pubsub") >= 1
    release.set()
    waiter.join(10)
    leader.join(10)
    assert result == ["from-leader"]
    assert waiting.waited("value") == 1


def test_one_listener_connection_and_thread_whatever_the_number_of_keys(
    backends: Callable[[], RedisBackend], redis_client: redis.Redis, redis_prefix: str
) -> None:
    """50 keys waited on at once through one backend: one pub/sub connection, one thread."""
    before = listener_threads()
    release = threading.Event()
    leader_backend, waiter_backend = backends(), backends()
    leaders = [start_leader(leader_backend, f"k{i}", release) for i in range(50)]
    for _ in range(500):
        if len(list(redis_client.scan_iter(match=f"{redis_prefix}:*:l:*"))) == 50:
            break
        threading.Event().wait(0.01)

    def waiter(i: int) -> Callable[[], str]:
        @cached_stampede_safe(key=f"k{i}", backend=waiter_backend, **SLOW_POLL)
        def wait() -> str:
            raise AssertionError

        return wait

    results: list[str] = []
    waiters = [
        threading.Thread(target=lambda i=i: results.append(waiter(i)()))
        for i in range(50)
    ]
    for t in waiters:
        t.start()
    for _ in range(500):  # until every waiter has subscribed to its key's channel
        if len(redis_client.pubsub_channels(f"{redis_prefix}:*")) == 50:
            break
        threading.Event().wait(0.01)
    channels = redis_client.pubsub_channels(f"{redis_prefix}:*")
    assert len(channels) == 50
    # One connection holds all 50 (the server may hold other tests' connections).
    assert all(count == 1 for _, count in redis_client.pubsub_numsub(*channels))
    holders = redis_client.client_list(_type="pubsub")
    assert len([c for c in holders if str(c.get("sub")) == "50"]) == 1
    assert listener_threads() - before == 1
    release.set()
    for t in [*leaders, *waiters]:
        t.join(10)
    assert results == ["from-leader"] * 50


def test_no_subscription_or_thread_outlives_the_waits(
    backends: Callable[[], RedisBackend], redis_client: redis.Redis, redis_prefix: str
) -> None:
    """After 100 keys were waited on, no channel is subscribed; close() stops the thread."""
    before = listener_threads()
    backend = backends()
    for i in range(100):
        release = threading.Event()
        leader = start_leader(backends(), f"k{i}", release)
        wait_for_lock(redis_client, redis_prefix)

        @cached_stampede_safe(
            key=f"k{i}", backend=backend, base_delay=0.01, max_delay=0.05
        )
        def wait() -> str:
            raise AssertionError

        done: list[str] = []
        waiter = threading.Thread(
            target=lambda wait=wait, done=done: done.append(wait())
        )
        waiter.start()
        release.set()
        waiter.join(10)
        leader.join(10)
        assert done == ["from-leader"]
        for key in redis_client.scan_iter(match=f"{redis_prefix}:*:l:*"):
            redis_client.delete(key)
    for _ in range(200):
        if not redis_client.pubsub_channels(f"{redis_prefix}:*"):
            break
        threading.Event().wait(0.01)
    assert redis_client.pubsub_channels(f"{redis_prefix}:*") == []
    backend.close()
    assert (
        listener_threads() <= before + 0
    )  # the other backends' threads end at teardown


def test_a_stampede_in_one_process_costs_at_most_thirteen_redis_commands(
    redis_url: str, private_redis_client: redis.Redis
) -> None:
    """200 threads on one cold key: at most 13 commands (commandstats), in 3 round trips.

    9 for the lock, the value and the notice; 3 inside the same two scripts for the
    fence (the ticket's TIME, the floor's GET and SET); 1 inside the store script that
    tells near caches the key changed (a PUBLISH on ``<prefix>:near``).
    """
    backend = RedisBackend.from_url(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}")

    @cached_stampede_safe(key="k", backend=backend)
    def f() -> str:
        wait_for_joiners(f, 199)  # one stampede: every other caller shares this call
        return "v"

    @cached_stampede_safe(key="warm", backend=backend)
    def warm() -> str:
        return "w"

    # One miss outside the count opens the connections and loads the scripts, which a
    # server does once, whatever test ran before.
    assert warm() == "w"
    private_redis_client.config_resetstat()
    barrier = threading.Barrier(200)
    results: list[str] = []

    def call() -> None:
        barrier.wait()
        results.append(f())

    threads = [threading.Thread(target=call) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    stats = private_redis_client.info("commandstats")
    backend.close()
    calls = {name.removeprefix("cmdstat_"): v["calls"] for name, v in stats.items()}
    calls.pop("config|resetstat", None)
    calls.pop("info", None)
    assert results == ["v"] * 200
    assert sum(calls.values()) <= 13, calls
    assert calls["evalsha"] == 2, calls  # the lock script and the store script


def test_async_waiter_wakes_on_the_notice(
    redis_url: str, redis_client: redis.Redis, redis_prefix: str
) -> None:
    """An asyncio waiter that would poll every 30 s is woken by the notice of a sync leader."""
    release = threading.Event()
    sync_backend = RedisBackend.from_url(redis_url, prefix=redis_prefix)
    leader = start_leader(sync_backend, "k", release)
    wait_for_lock(redis_client, redis_prefix)

    async def scenario() -> str:
        backend = AsyncRedisBackend.from_url(redis_url, prefix=redis_prefix)

        @cached_stampede_safe(key="k", backend=backend, metrics=waiting, **SLOW_POLL)
        async def wait() -> str:
            raise AssertionError

        try:
            task = asyncio.create_task(wait())
            await waiting.until_missed_async()
            release.set()
            return await asyncio.wait_for(task, 10)
        finally:
            await backend.aclose()

    waiting = Waiting()
    try:
        assert asyncio.run(scenario()) == "from-leader"
        assert waiting.waited("value") == 1
    finally:
        leader.join(10)
        sync_backend.close()


def test_memory_waiters_wake_on_the_notice_too() -> None:
    """On MemoryBackend a waiter (another copy of the function: another 'process') wakes at once."""
    backend = MemoryBackend()
    release, computing = threading.Event(), threading.Event()
    waiting = Waiting()

    # SLOW_POLL spelled out: through **, mypy cannot pick the memory backend's overload.
    @cached_stampede_safe(
        key="k",
        backend=backend,
        base_delay=30,
        max_delay=30,
        wait_timeout=60,
        lock_timeout=60,
    )
    def lead() -> str:
        computing.set()  # holding the lock
        release.wait(10)
        return "v"

    @cached_stampede_safe(
        key="k",
        backend=backend,
        metrics=waiting,
        base_delay=30,
        max_delay=30,
        wait_timeout=60,
        lock_timeout=60,
    )
    def wait() -> str:
        raise AssertionError

    leader = threading.Thread(target=lead)
    leader.start()
    assert computing.wait(10)
    result: list[str] = []
    waiter = threading.Thread(target=lambda: result.append(wait()))
    waiter.start()
    waiting.until_missed()
    release.set()
    waiter.join(10)
    leader.join(10)
    assert result == ["v"]
    assert waiting.waited("value") == 1
