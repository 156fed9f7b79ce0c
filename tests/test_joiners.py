"""Callers of one process that share a call: bounded by their own patience, never hostages.

A hung leader, a function that calls its own key, a BaseException, a cancelled asyncio
caller: on the in-memory backend and on a real redis-server, with exact counts.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from _waiting import until_async
from stampede_guard import (
    AsyncBackend,
    AsyncRedisBackend,
    Backend,
    InterruptedComputationError,
    LockTimeoutError,
    MemoryBackend,
    ReentrantCallError,
    StampedeStats,
    cached_stampede_safe,
)
from stampede_guard.testing import wait_for_joiners

pytestmark = pytest.mark.timeout(60)

HANG = 20.0  # seconds a "hung" computation waits at most for the test to free it
JOINERS = 6


class Hang:
    """A computation that hangs until the test frees it (or *cap* seconds run out)."""

    def __init__(self, cap: float = HANG) -> None:
        self.cap = cap
        self.started = threading.Event()
        self.freed = threading.Event()

    def __call__(self) -> None:
        self.started.set()
        self.freed.wait(self.cap)


def async_backend(kind: str, request: pytest.FixtureRequest) -> AsyncBackend:
    """The in-memory backend, or an AsyncRedisBackend on the session's redis-server."""
    if kind == "memory":
        return MemoryBackend()
    return AsyncRedisBackend.from_url(
        request.getfixturevalue("redis_url"),
        prefix=request.getfixturevalue("redis_prefix"),
    )


def in_threads(n: int, call: Callable[[], object]) -> list[object]:
    """Run *call* in *n* threads at once; return each result or exception, in order."""
    results: list[object] = [None] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = call()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG + 10)
    return results


def test_a_hung_leader_holds_its_joiners_no_longer_than_wait_timeout(
    make_backend: Callable[[], Backend],
) -> None:
    """on_timeout="raise": each joiner gets LockTimeoutError while the leader still hangs.

    Each is counted once in StampedeStats: a request, a timeout.
    """
    hang = Hang()
    stats = StampedeStats()

    @cached_stampede_safe(
        key="k",
        backend=make_backend(),
        metrics=stats,
        lock_timeout=0.5,
        wait_timeout=0.5,
        on_timeout="raise",
        base_delay=0.02,
        max_delay=0.1,
    )
    def f() -> str:
        hang()
        return "v"

    leader = threading.Thread(target=f)
    leader.start()
    assert hang.started.wait(10)
    results = in_threads(JOINERS, f)
    assert leader.is_alive(), "the joiners returned while the leader hung"
    assert [type(r) for r in results] == [LockTimeoutError] * JOINERS
    hang.freed.set()
    leader.join(10)
    snap = stats.snapshot()
    assert (snap.requests, snap.timeouts, snap.computations) == (
        JOINERS + 1,
        JOINERS,
        1,
    )


def test_joiners_that_give_up_compute_once_per_process(
    make_backend: Callable[[], Backend],
) -> None:
    """on_timeout="compute": the joiners of a hung leader compute once, not once each."""
    calls = Counter[str]()
    hang = Hang()

    @cached_stampede_safe(
        key="k",
        backend=make_backend(),
        lock_timeout=0.5,
        wait_timeout=0.5,
        base_delay=0.02,
        max_delay=0.1,
    )
    def f() -> str:
        calls["n"] += 1
        if calls["n"] == 1:
            hang()
            return "late"
        # Every other joiner gives up in turn and joins this replacement call.
        wait_for_joiners(f, JOINERS - 1)
        return "second"

    leader = threading.Thread(target=f)
    leader.start()
    assert hang.started.wait(10)
    results = in_threads(JOINERS, f)
    assert not hang.freed.is_set()
    assert leader.is_alive(), "they gave up while the leader hung"
    assert results == ["second"] * JOINERS
    assert calls["n"] == 2
    hang.freed.set()
    leader.join(10)


def test_a_value_stored_elsewhere_serves_the_joiners_of_a_hung_leader(
    make_backend: Callable[[], Backend],
) -> None:
    """A hung leader's lease runs out, another process stores: its joiners take that value.

    Callers arriving in the hung process afterwards get it at once, from one look.
    """
    hang = Hang()

    def compute() -> str:
        if not hang.started.is_set():
            hang()
            return "late"
        return "from-elsewhere"

    options: dict[str, Any] = {
        "key": "k",
        "lock_timeout": 0.3,
        "wait_timeout": 30,  # long: only a value from elsewhere can end their wait
        "base_delay": 0.02,
        "max_delay": 0.1,
    }
    here = cached_stampede_safe(backend=make_backend(), **options)(compute)
    elsewhere = cached_stampede_safe(backend=make_backend(), **options)(compute)

    leader = threading.Thread(target=here)
    leader.start()
    assert hang.started.wait(10)
    joiners: list[object] = []
    joining = threading.Thread(target=lambda: joiners.extend(in_threads(3, here)))
    joining.start()
    assert elsewhere() == "from-elsewhere"  # after the hung leader's lease ran out
    joining.join(15)
    assert joiners == ["from-elsewhere"] * 3
    assert in_threads(3, here) == ["from-elsewhere"] * 3
    assert leader.is_alive(), "all served while the leader still hung"
    hang.freed.set()
    leader.join(10)
    assert here() == "from-elsewhere", "the late leader's older value was refused"


def test_callers_arriving_after_a_hung_leaders_lease_look_at_once(
    make_backend: Callable[[], Backend],
) -> None:
    """Nobody waited when another process stored: new callers look once and hit.

    The leader hangs for 5 s at most; without that look they would be served only
    when it ends (their periodic looks come every 15 s), after the leader's thread.
    (On the memory backend a hit is read before any flight is joined.)
    """
    hang = Hang(cap=5)
    calls = Counter[str]()

    def compute() -> str:
        calls["n"] += 1
        if calls["n"] == 1:
            hang()
            return "late"
        return "from-elsewhere"

    options: dict[str, Any] = {
        "key": "k",
        "lock_timeout": 0.3,
        "wait_timeout": 60,
        "base_delay": 0.02,
        "max_delay": 30,  # a periodic look only every 15 s
    }
    here = cached_stampede_safe(backend=make_backend(), **options)(compute)
    options["max_delay"] = 0.05  # the other process takes over soon after the lease
    elsewhere = cached_stampede_safe(backend=make_backend(), **options)(compute)
    leader = threading.Thread(target=here)
    leader.start()
    assert hang.started.wait(10)
    assert elsewhere() == "from-elsewhere"
    assert in_threads(3, here) == ["from-elsewhere"] * 3
    assert leader.is_alive(), "served while the leader still hung"
    assert calls["n"] == 2
    hang.freed.set()
    leader.join(10)


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_hung_leader_holds_its_asyncio_joiners_no_longer_than_wait_timeout(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """The same for tasks: LockTimeoutError for each joiner while the leader hangs."""
    backend = async_backend(kind, request)
    freed, computing = asyncio.Event(), asyncio.Event()

    @cached_stampede_safe(
        key="k",
        backend=backend,
        lock_timeout=0.5,
        wait_timeout=0.5,
        on_timeout="raise",
        base_delay=0.02,
        max_delay=0.1,
    )
    async def f() -> str:
        computing.set()
        await asyncio.wait_for(freed.wait(), HANG)
        return "v"

    async def scenario() -> list[object]:
        leader = asyncio.create_task(f())
        await asyncio.wait_for(computing.wait(), 10)
        results = await asyncio.gather(
            *(f() for _ in range(JOINERS)), return_exceptions=True
        )
        assert not leader.done(), "the joiners returned while the leader hung"
        freed.set()
        assert await leader == "v"
        if isinstance(backend, AsyncRedisBackend):
            await backend.aclose()
        return list(results)

    results = asyncio.run(scenario())
    assert [type(r) for r in results] == [LockTimeoutError] * JOINERS


def test_a_function_calling_its_own_key_fails_at_once(
    make_backend: Callable[[], Backend],
) -> None:
    """Re-entrancy is detected: ReentrantCallError names the key; no lock is left behind."""
    backend = make_backend()

    @cached_stampede_safe(key="fib:{n}", backend=backend, lock_timeout=30)
    def fib(n: int) -> int:
        return n if n < 2 else fib(n) + 1  # a bug: the same key again

    with pytest.raises(ReentrantCallError, match="'fib:5'"):
        fib(5)
    assert fib.get_cached(5) is None
    assert backend.get_or_lock("fib:5", "probe", 1) == "probe", "the lock was released"
    backend.unlock("fib:5", "probe")


def test_two_functions_sharing_a_key_fail_instead_of_waiting_out_the_lease(
    make_backend: Callable[[], Backend],
) -> None:
    """One function calling another cached under the same key: an error, not a wait."""
    backend = make_backend()

    @cached_stampede_safe(key="user:{uid}", backend=backend, lock_timeout=30)
    def profile(uid: int) -> dict[str, int]:
        return {"uid": uid}

    @cached_stampede_safe(key="user:{uid}", backend=backend, lock_timeout=30)
    def page(uid: int) -> dict[str, object]:
        try:
            return {"profile": profile(uid)}
        except ReentrantCallError as exc:
            return {"error": exc.key}

    assert page(7) == {"error": "user:7"}


def test_an_async_function_calling_its_own_key_fails_at_once_even_from_a_child_task() -> (
    None
):
    """In asyncio the marker follows the task chain: a child task's call fails too."""

    @cached_stampede_safe(key="k:{n}", backend=MemoryBackend(), lock_timeout=30)
    async def f(n: int) -> int:
        if n == 0:
            return 0
        child = asyncio.create_task(f(n))  # a task of its own, same context
        return await child

    async def scenario() -> None:
        with pytest.raises(ReentrantCallError, match="'k:1'"):
            await asyncio.wait_for(f(1), 5)
        assert await f(0) == 0

    asyncio.run(scenario())


class Abort(BaseException):
    """A BaseException that is not an Exception, as KeyboardInterrupt and SystemExit."""


def test_a_base_exception_runs_the_function_once_more_per_process_not_once_each(
    make_backend: Callable[[], Backend],
) -> None:
    """8 callers, the function aborts every time: 2 runs, the rest get a clear error."""
    backend = make_backend()
    calls = Counter[str]()

    @cached_stampede_safe(key="k", backend=backend, lock_timeout=30)
    def f() -> str:
        calls["n"] += 1
        # Every other caller joins the first run; all but its runner join the second.
        wait_for_joiners(f, 7 if calls["n"] == 1 else 6)
        raise Abort

    results = in_threads(8, f)
    kinds = Counter(type(r).__name__ for r in results)
    assert calls["n"] == 2
    assert kinds == {"Abort": 2, "InterruptedComputationError": 6}
    error = next(r for r in results if isinstance(r, InterruptedComputationError))
    assert isinstance(error.__cause__, Abort)
    assert f.get_cached() is None
    assert backend.get_or_lock("k", "probe", 1) == "probe", "the lock was released"
    backend.unlock("k", "probe")


def test_after_a_base_exception_one_more_run_serves_everyone(
    make_backend: Callable[[], Backend],
) -> None:
    """If the one more run succeeds, every joiner gets its value."""
    calls = Counter[str]()

    @cached_stampede_safe(key="k", backend=make_backend(), lock_timeout=30)
    def f() -> str:
        calls["n"] += 1
        wait_for_joiners(f, 7 if calls["n"] == 1 else 6)  # as above
        if calls["n"] == 1:
            raise Abort
        return "v"

    results = in_threads(8, f)
    assert calls["n"] == 2
    assert sorted(map(repr, results)) == sorted(["Abort()"] + ["'v'"] * 7)


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_impatient_asyncio_callers_do_not_waste_the_computation(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """Requests every 0.1 s, each cancelled after 0.3 s, a 0.5 s origin: it runs once.

    The first caller is cancelled mid-computation; the computation goes on apart, is
    stored, and the requests after it are served.
    """
    backend = async_backend(kind, request)
    calls = Counter[str]()

    @cached_stampede_safe(key="slow", backend=backend, lock_timeout=10)
    async def origin() -> str:
        calls["started"] += 1
        await asyncio.sleep(0.5)  # the slow origin: it outlasts its callers' patience
        calls["finished"] += 1
        return "v"

    async def request_once() -> str:
        try:
            return await asyncio.wait_for(origin(), 0.3)
        except TimeoutError:
            return "timed out"

    async def scenario() -> list[str]:
        requests = []
        for _ in range(12):
            requests.append(asyncio.create_task(request_once()))
            await asyncio.sleep(0.1)  # the cadence of the requests under test
        answers = list(await asyncio.gather(*requests))
        if isinstance(backend, AsyncRedisBackend):
            await backend.aclose()
        return answers

    answers = asyncio.run(scenario())
    assert calls == {"started": 1, "finished": 1}
    assert answers[0] == "timed out"
    assert answers[-5:] == ["v"] * 5, answers


def test_on_cancel_cancel_cancels_the_computation_with_its_caller() -> None:
    """on_cancel="cancel": the origin call is cancelled with each impatient caller."""
    calls = Counter[str]()

    @cached_stampede_safe(key="slow", backend=MemoryBackend(), on_cancel="cancel")
    async def origin() -> str:
        calls["started"] += 1
        try:
            await asyncio.sleep(0.5)  # longer than its callers wait: always cancelled
        except asyncio.CancelledError:
            calls["cancelled"] += 1
            raise
        return "v"

    async def scenario() -> None:
        for _ in range(3):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(origin(), 0.1)

    asyncio.run(scenario())
    assert calls == {"started": 3, "cancelled": 3}


def test_a_computation_left_running_is_cancelled_when_its_lease_runs_out() -> None:
    """Apart from its cancelled caller, a hung computation lives one lease, then lets go."""
    backend = MemoryBackend()
    cancelled = asyncio.Event()

    @cached_stampede_safe(key="k", backend=backend, lock_timeout=0.3)
    async def hangs() -> str:
        try:
            await asyncio.sleep(HANG)  # hung: only the end of its lease cancels it
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    async def scenario() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(hangs(), 0.05)
        await asyncio.wait_for(cancelled.wait(), 5)
        # Its plan releases the lock once the cancellation reaches it; the probe
        # takes the lock as soon as it is free.
        await until_async(
            "the release of the lock",
            lambda: backend.get_or_lock("k", "probe", 1) == "probe",
        )

    asyncio.run(scenario())
