"""asyncio: the same decorator on async functions, driven from the same plan."""

from __future__ import annotations

import asyncio
import functools
import inspect
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any, Literal

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from asgiref.sync import iscoroutinefunction as asgiref_iscoroutinefunction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _waiting import Waiting, until_async
from stampede_guard import (
    AsyncBackend,
    AsyncRedisBackend,
    Entry,
    LockTimeoutError,
    MemoryBackend,
    RedisBackend,
    StampedeStats,
    cached_stampede_safe,
)
from stampede_guard.testing import joiners, wait_for_joiners


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run *coro* in a fresh event loop (no plugin needed)."""
    return asyncio.run(coro)


async def stampede(
    tasks: int, keys: int, together: bool, backend: AsyncBackend
) -> tuple[Counter[int], list[object]]:
    """Start *tasks* tasks at once on *keys* cold keys; count computations per key.

    With *together*, each computation holds until every other task of its key joined
    it; without, it returns at once and the tasks arriving later find its value.
    """
    computed: Counter[int] = Counter()
    callers = Counter(i % keys for i in range(tasks))
    release = asyncio.Event()

    @cached_stampede_safe(
        key="k:{k}", backend=backend, ttl=60, base_delay=0.005, max_delay=0.05
    )
    async def f(k: int) -> list[object]:
        computed[k] += 1
        if together:
            await until_async(
                f"every caller of {k} joining", lambda: joiners(f, k) == callers[k] - 1
            )
        return [k, f"value-{k}"]

    async def call(i: int) -> object:
        await release.wait()
        return await f(i % keys)

    calls = [asyncio.create_task(call(i)) for i in range(tasks)]
    await asyncio.sleep(0)  # one turn of the loop, no time: every task awaits release
    release.set()
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 60)
    return computed, list(results)


@pytest.mark.timeout(60)
def test_thousand_tasks_one_cold_key_compute_once_in_memory() -> None:
    """1,000 tasks on one cold key, MemoryBackend: exactly one computation, one value."""
    computed, results = run(stampede(1000, 1, True, MemoryBackend()))
    assert computed == Counter({0: 1})
    assert results == [[0, "value-0"]] * 1000


@pytest.mark.timeout(60)
def test_thousand_tasks_one_cold_key_compute_once_on_real_redis(redis_url: str) -> None:
    """1,000 tasks sharing one AsyncRedisBackend on one cold key: one computation."""

    async def scenario() -> tuple[Counter[int], list[object]]:
        backend = AsyncRedisBackend.from_url(
            redis_url, prefix=f"t{uuid.uuid4().hex[:8]}"
        )
        try:
            return await stampede(1000, 1, True, backend)
        finally:
            await backend.aclose()

    computed, results = run(scenario())
    assert computed == Counter({0: 1})
    assert results == [[0, "value-0"]] * 1000


@pytest.mark.timeout(120)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tasks=st.integers(1, 300),
    keys=st.integers(1, 5),
    together=st.booleans(),
)
def test_each_key_is_computed_once_by_any_number_of_tasks(
    tasks: int, keys: int, together: bool
) -> None:
    """Any number of tasks over any keys: one computation per key, every task its key's value."""
    computed, results = run(stampede(tasks, keys, together, MemoryBackend()))
    assert computed == Counter(dict.fromkeys({i % keys for i in range(tasks)}, 1))
    assert results == [[i % keys, f"value-{i % keys}"] for i in range(tasks)]


@pytest.mark.timeout(30)
def test_threads_and_tasks_share_one_memory_backend() -> None:
    """Sync threads and async tasks on one MemoryBackend and key coordinate: one computation."""
    backend = MemoryBackend()
    computed: list[str] = []
    guard = threading.Lock()
    # A Miss comes from each side's first caller once its get-or-lock has answered
    # (the others join it, and report theirs once served): the computation holds
    # until the other side has found the lock held.
    waiting = Waiting()

    @cached_stampede_safe(
        key="shared",
        backend=backend,
        base_delay=0.005,
        max_delay=0.02,
        metrics=waiting,
    )
    def sync_get() -> str:
        with guard:
            computed.append("sync")
        waiting.until_missed(2)
        return "value"

    @cached_stampede_safe(
        key="shared",
        backend=backend,
        base_delay=0.005,
        max_delay=0.02,
        metrics=waiting,
    )
    async def async_get() -> str:
        with guard:
            computed.append("async")
        await waiting.until_missed_async(2)
        return "value"

    results: list[str] = []
    start = threading.Barrier(11)

    def thread() -> None:
        start.wait()
        results.append(sync_get())

    async def tasks() -> list[str]:
        await asyncio.to_thread(start.wait)
        return list(await asyncio.gather(*(async_get() for _ in range(50))))

    threads = [threading.Thread(target=thread) for _ in range(10)]
    for t in threads:
        t.start()
    results += run(tasks())
    for t in threads:
        t.join(10)
    assert len(computed) == 1
    assert results == ["value"] * 60


def test_decorated_coroutine_function_stays_awaitable_and_typed_as_async() -> None:
    """The wrapper is awaitable, reports itself as a coroutine function, and keeps metadata."""

    async def original(x: int) -> int:
        """Doc."""
        return x * 2

    wrapped = cached_stampede_safe(backend=MemoryBackend())(original)
    assert inspect.iscoroutinefunction(wrapped)
    assert inspect.iscoroutinefunction(wrapped.__call__)
    assert wrapped.__wrapped__ is original
    assert wrapped.__doc__ == "Doc."
    assert run(wrapped(21)) == 42


def test_async_helpers_invalidate_and_cache_key() -> None:
    """invalidate() is awaited, cache_key() is plain; the next call computes again."""
    calls: list[int] = []

    @cached_stampede_safe(key="sq:{x}", backend=MemoryBackend())
    async def square(x: int) -> int:
        calls.append(x)
        return x * x

    async def scenario() -> None:
        assert await square(3) == 9
        assert await square(3) == 9
        assert square.cache_key(3) == "sq:3"
        await square.invalidate(3)
        assert await square(3) == 9

    run(scenario())
    assert calls == [3, 3]


class Repo:
    def __init__(self, ident: int) -> None:
        self.ident = ident

    @cached_stampede_safe(key="repo:{self.ident}:{x}", backend=MemoryBackend())
    async def find(self, x: int) -> int:
        return self.ident * 100 + x


def test_async_methods_bind_self_for_calls_and_helpers() -> None:
    """An async method binds: awaiting it, cache_key and invalidate all get self."""
    repo = Repo(4)

    async def scenario() -> None:
        assert await repo.find(2) == 402
        assert repo.find.cache_key(2) == "repo:4:2"
        await repo.find.invalidate(2)

    run(scenario())
    assert inspect.iscoroutinefunction(repo.find.__call__)


class Endpoint:
    """A callable object with an async ``__call__``, as some views are."""

    async def __call__(self, x: int) -> int:
        return x


def _decorated_coroutine_functions() -> list[object]:
    @cached_stampede_safe(backend=MemoryBackend())
    async def plain(x: int, y: int = 2) -> int:
        return x + y

    endpoint = cached_stampede_safe(backend=MemoryBackend(), key="ep:{x}")(Endpoint())
    return [plain, Repo.find, Repo(1).find, endpoint, functools.partial(plain, 1)]


def _is_coroutine_function_to_every_check(fn: object) -> list[str]:
    """Return the names of the coroutine-function checks that *fn* fails."""
    checks: dict[str, Callable[[Any], bool]] = {
        "inspect": inspect.iscoroutinefunction,
        "asgiref": asgiref_iscoroutinefunction,
    }
    if sys.version_info < (3, 14):  # deprecated in 3.14
        checks["asyncio"] = asyncio.iscoroutinefunction
    return [name for name, check in checks.items() if not check(fn)]


def test_decorated_async_functions_are_coroutine_functions_to_every_check() -> None:
    """Functions, methods (bound or not), async callables and partials pass every check."""
    for fn in _decorated_coroutine_functions():
        assert _is_coroutine_function_to_every_check(fn) == [], fn


def test_decorated_sync_functions_are_not_coroutine_functions() -> None:
    """A sync function stays sync to every check, method or not."""

    @cached_stampede_safe(backend=MemoryBackend())
    def plain(x: int) -> int:
        return x

    class Sync:
        @cached_stampede_safe(backend=MemoryBackend())
        def find(self, x: int) -> int:
            return x

    for fn in (plain, Sync.find, Sync().find):
        assert not inspect.iscoroutinefunction(fn)
        assert not asgiref_iscoroutinefunction(fn)


def test_decorated_async_functions_keep_their_signature_for_introspection() -> None:
    """inspect.signature sees the function's own parameters, self dropped when bound."""
    plain, unbound, bound, endpoint, partial = _decorated_coroutine_functions()

    def names(fn: Any, *, follow_wrapped: bool = True) -> list[str]:
        return list(inspect.signature(fn, follow_wrapped=follow_wrapped).parameters)

    assert names(plain) == names(plain, follow_wrapped=False) == ["x", "y"]
    assert names(unbound) == ["self", "x"]
    assert names(bound) == ["x"]
    assert names(endpoint) == ["x"]
    assert names(partial) == ["y"]


def test_asgiref_runs_a_decorated_view_as_async_and_caches_it() -> None:
    """asgiref (Django's bridge) awaits the decorated method in the loop, not a thread."""
    loops: list[asyncio.AbstractEventLoop] = []

    class View:
        @cached_stampede_safe(key="view:{x}", backend=MemoryBackend())
        async def get(self, x: int) -> int:
            loops.append(asyncio.get_running_loop())
            return x * 2

    view = View()

    async def scenario() -> list[int]:
        # SyncToAsync refuses a coroutine function; AsyncToSync runs it in its loop.
        with pytest.raises(TypeError, match="only be applied to sync functions"):
            sync_to_async(view.get)
        return [await view.get(2), await view.get(2)]

    assert run(scenario()) == [4, 4]
    assert async_to_sync(view.get)(2) == 4
    assert len(loops) == 1


def test_wrong_backend_kind_fails_at_decoration_time(redis_url: str) -> None:
    """An async function on RedisBackend, or a sync one on AsyncRedisBackend, is a TypeError."""
    sync_backend = RedisBackend.from_url(redis_url)
    async_backend = AsyncRedisBackend.from_url(redis_url)

    async def coro() -> int:
        return 1

    def plain() -> int:
        return 1

    with pytest.raises(
        TypeError,
        match=r"is async, but backend=.* has no async methods; use AsyncRedisBackend",
    ):
        cached_stampede_safe(backend=sync_backend)(coro)  # type: ignore[deprecated]
    with pytest.raises(
        TypeError, match=r"is not async, but backend=.* only serves async functions"
    ):
        cached_stampede_safe(backend=async_backend)(plain)  # type: ignore[arg-type]


def test_leader_error_is_shared_with_the_tasks_that_joined_it() -> None:
    """Tasks that joined a failing call get its exception: one call; the next call computes."""
    calls = 0
    boom = RuntimeError("first fails")

    @cached_stampede_safe(key="e", backend=MemoryBackend())
    async def f() -> int:
        nonlocal calls
        calls += 1
        mine = calls
        if mine == 1:
            await until_async("19 joiners", lambda: joiners(f) == 19)
            raise boom
        return mine

    async def scenario() -> list[object]:
        failed = await asyncio.gather(*(f() for _ in range(20)), return_exceptions=True)
        return [*failed, await f()]

    results = run(scenario())
    assert all(r is boom for r in results[:20])
    assert results[20] == 2
    assert calls == 2


def test_on_timeout_raise_in_async_code() -> None:
    """An async waiter that runs out of time raises LockTimeoutError."""
    backend = MemoryBackend()
    assert backend.get_or_lock("held", "someone-else", 60) == "someone-else"

    @cached_stampede_safe(
        key="held",
        backend=backend,
        wait_timeout=0.1,
        base_delay=0.01,
        max_delay=0.02,
        on_timeout="raise",
    )
    async def f() -> int:
        return 1

    with pytest.raises(LockTimeoutError):
        run(f())


def counters(stats: StampedeStats) -> tuple[int, ...]:
    snap = stats.snapshot()
    return (
        snap.requests,
        snap.hits,
        snap.misses,
        snap.computations,
        snap.lock_waits,
        snap.timeouts,
        snap.errors,
    )


def sync_stampede_stats() -> tuple[int, ...]:
    """10 threads miss together, then 5 sequential hits; return the counters."""
    stats = StampedeStats()

    @cached_stampede_safe(
        key="m",
        backend=MemoryBackend(),
        metrics=stats,
        base_delay=0.005,
        max_delay=0.02,
    )
    def f() -> int:
        wait_for_joiners(f, 9)  # every other thread shares this call
        return 1

    barrier = threading.Barrier(10)

    def call() -> None:
        barrier.wait()
        f()

    threads = [threading.Thread(target=call) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for _ in range(5):
        f()
    return counters(stats)


def async_stampede_stats() -> tuple[int, ...]:
    """10 tasks miss together, then 5 sequential hits; return the counters."""
    stats = StampedeStats()

    @cached_stampede_safe(
        key="m",
        backend=MemoryBackend(),
        metrics=stats,
        base_delay=0.005,
        max_delay=0.02,
    )
    async def f() -> int:
        await until_async("9 joiners", lambda: joiners(f) == 9)
        return 1

    async def scenario() -> None:
        await asyncio.gather(*(f() for _ in range(10)))
        for _ in range(5):
            await f()

    run(scenario())
    return counters(stats)


def test_metrics_are_the_same_for_sync_and_async() -> None:
    """The same stampede (1 leader, 9 waiters, then 5 hits) gives identical counters both ways."""
    expected = (15, 14, 10, 1, 9, 0, 0)
    assert sync_stampede_stats() == expected
    assert async_stampede_stats() == expected


# --- Cancellation at every step ------------------------------------------------------


class PausingBackend:
    """An async face over MemoryBackend that can stop inside one named operation."""

    def __init__(self, pause_in: str) -> None:
        self.store = MemoryBackend()
        self.pause_in = pause_in
        self.paused = asyncio.Event()
        self.held = asyncio.Event()  # a get-or-lock found someone else's lock

    async def _maybe_pause(self, name: str) -> None:
        if name == self.pause_in:
            self.paused.set()
            await asyncio.sleep(3600)  # until cancelled

    async def aget(self, key: str) -> Entry | None:
        await self._maybe_pause("aget")
        return self.store.get(key)

    async def aget_or_lock(self, key: str, token: str, lock_ttl: float) -> Entry | str:
        await self._maybe_pause("aget_or_lock")
        got = self.store.get_or_lock(key, token, lock_ttl)
        if isinstance(got, str) and got != token:
            self.held.set()
        return got

    async def alock(self, key: str, token: str, lock_ttl: float) -> str:
        return self.store.lock(key, token, lock_ttl)

    async def aset(
        self, key: str, entry: Entry, ttl: float, *, ticket: int | None = None
    ) -> Entry | None:
        return self.store.set(key, entry, ttl, ticket=ticket)

    async def aset_and_unlock(
        self,
        key: str,
        entry: Entry,
        ttl: float,
        token: str,
        *,
        ticket: int | None = None,
    ) -> Entry | None:
        await self._maybe_pause("aset_and_unlock")
        return self.store.set_and_unlock(key, entry, ttl, token, ticket=ticket)

    async def aunlock(self, key: str, token: str) -> bool:
        return self.store.unlock(key, token)

    async def aextend(self, key: str, token: str, lock_ttl: float) -> bool:
        return self.store.extend(key, token, lock_ttl)

    async def adelete(self, key: str) -> None:
        self.store.delete(key)


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "step", ["aget", "aget_or_lock", "compute", "aset_and_unlock", "wait"]
)
def test_cancellation_at_any_step_leaves_no_lock_and_no_entry(step: str) -> None:
    """With on_cancel="cancel", a cancelled call at any step releases what it holds."""
    backend = PausingBackend(step)
    in_compute = asyncio.Event()
    first = [True]

    @cached_stampede_safe(
        key="c",
        backend=backend,
        lock_timeout=600,
        base_delay=0.01,
        max_delay=0.02,
        on_cancel="cancel",
    )
    async def f() -> str:
        if step == "compute" and first:
            first.clear()
            in_compute.set()
            await asyncio.sleep(3600)  # until cancelled
        return "value"

    async def scenario() -> None:
        if step == "wait":
            assert backend.store.get_or_lock("c", "other-holder", 600) == "other-holder"
        task = asyncio.create_task(f())
        marker = in_compute if step == "compute" else backend.paused
        if step == "wait":
            # Found held: the task goes on to wait between looks, and has by the
            # time this one runs again.
            await asyncio.wait_for(backend.held.wait(), 5)
        else:
            await asyncio.wait_for(marker.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert backend.store.get("c") is None, "no half-written entry"
        if step == "wait":
            assert backend.store.unlock(
                "c", "other-holder"
            )  # someone else's lock untouched
        backend.pause_in = ""
        assert backend.store.get_or_lock("c", "probe", 1) == "probe", (
            "the lock was left held"
        )
        backend.store.unlock("c", "probe")
        assert await f() == "value"

    run(scenario())


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("on_cancel", "served"), [("finish", 1), ("cancel", 2)])
def test_cancelled_leader_does_not_strand_its_waiters(
    on_cancel: Literal["finish", "cancel"], served: int
) -> None:
    """A cancelled leader's waiters get its computation ("finish") or compute once more at once ("cancel")."""
    started, release = asyncio.Event(), asyncio.Event()
    computations = 0

    @cached_stampede_safe(
        key="l",
        backend=MemoryBackend(),
        lock_timeout=600,
        base_delay=0.01,
        max_delay=0.02,
        on_cancel=on_cancel,
    )
    async def f() -> int:
        nonlocal computations
        computations += 1
        mine = computations
        started.set()
        if mine == 1:
            await release.wait()  # until its caller has been cancelled
        return mine

    async def scenario() -> list[int]:
        leader = asyncio.create_task(f())
        await started.wait()
        waiters = [asyncio.create_task(f()) for _ in range(10)]
        await until_async("the waiters joining", lambda: joiners(f) == 10)
        leader.cancel()
        await asyncio.wait([leader])  # its caller gone; its computation may go on
        release.set()
        return list(await asyncio.wait_for(asyncio.gather(*waiters), 10))

    assert run(scenario()) == [served] * 10
    assert computations == served
