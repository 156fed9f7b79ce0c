"""cached_stampede_safe_batch: many ids per call, each id computed once, everywhere.

Most tests run on four stores: a `MemoryBackend`, a `RedisBackend`, and each of them
with its batch methods hidden (``one-by-one``), so the shells' per-key fallback is
proven too, whether or not the backends' batch methods (``get_many``...) are there.
The round-trip tests are the only ones that need those methods.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from pathlib import Path
from types import ModuleType
from typing import Any, assert_type, cast

import pytest
import redis

from _proxy import Proxy
from _servers import Server
from _waiting import until, until_async
from stampede_guard import (
    AsyncBackend,
    AsyncBatchFunction,
    AsyncRedisBackend,
    Backend,
    BackendError,
    BatchFunction,
    Entry,
    LockTimeoutError,
    MemoryBackend,
    RedisBackend,
    StampedeStats,
    cached_stampede_safe_batch,
)
from stampede_guard.backends import Claim
from stampede_guard.metrics import (
    Computed,
    Event,
    Hit,
    LockAcquired,
    LockWait,
    Miss,
)

TTL = 60.0
BOUND = 10.0  # seconds any one wait of a test may take before it fails

# The round-trip tests need the backends' batch methods (being added alongside the
# batch decorator); until they land, the shells go a key at a time and those tests
# are expected to fail. Every other test holds either way.
needs_batch_methods = pytest.mark.xfail(
    not hasattr(RedisBackend, "get_or_lock_many"),
    strict=False,
    reason="needs the backends' batch methods",
)
needs_async_batch_methods = pytest.mark.xfail(
    not hasattr(AsyncRedisBackend, "aget_or_lock_many"),
    strict=False,
    reason="needs the backends' batch methods",
)

pytestmark = pytest.mark.usefixtures("abandoned_connections_collected")


# --- stores -----------------------------------------------------------------------


class _Hiding:
    """A backend with its batch methods hidden: the shells then go a key at a time."""

    def __init__(self, backend: object) -> None:
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        if name.endswith("_many"):
            raise AttributeError(name)
        return getattr(self._backend, name)

    def __repr__(self) -> str:
        return f"OneByOne({self._backend!r})"


# The Backend/AsyncBackend protocols' methods: defined on the class, since from
# Python 3.12 isinstance() with a runtime protocol does not look through __getattr__.
_PROTOCOL_METHODS = (
    "get",
    "get_or_lock",
    "lock",
    "set",
    "set_and_unlock",
    "extend",
    "unlock",
    "delete",
    "subscribe",
    *(f"a{n}" for n in ("get", "get_or_lock", "lock", "set", "set_and_unlock")),
    *(f"a{n}" for n in ("extend", "unlock", "delete", "subscribe")),
)


def _forward(name: str) -> Callable[..., Any]:
    def method(self: _Hiding, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._backend, name)(*args, **kwargs)

    method.__name__ = name
    return method


def OneByOne(backend: object) -> Any:  # noqa: N802 - it stands for a class
    """Wrap *backend*, hiding its batch methods and keeping the protocols it has."""
    methods = {n: _forward(n) for n in _PROTOCOL_METHODS if hasattr(backend, n)}
    return type("OneByOne", (_Hiding,), methods)(backend)


@dataclass
class Store:
    """Backends sharing one store, one per simulated process, and a look inside Redis."""

    kind: str
    make: Callable[[], Backend]
    client: redis.Redis | None = None
    prefix: str = ""

    def lock_keys(self) -> list[bytes]:
        """Return the Redis lock keys (``...:l:...``) under the test's prefix."""
        if self.client is None:
            return []  # a memory store: `held` looks at its locks
        return lock_keys(self.client, self.prefix)


def lock_keys(client: redis.Redis, prefix: str) -> list[bytes]:
    """Return the lock keys (``<prefix>:{tag}:l:<key>``) left in Redis under *prefix*."""
    return sorted(
        k for k in client.scan_iter(match=f"{prefix}:*", count=1000) if b":l:" in k
    )


def held(backend: Backend, keys: Sequence[str]) -> list[str]:
    """Return the keys whose lock someone holds: a fresh token cannot take it."""
    taken = []
    for key in keys:
        probe = f"probe-{uuid.uuid4().hex}"
        if backend.lock(key, probe, 5) == probe:
            backend.unlock(key, probe)
        else:
            taken.append(key)
    return taken


def assert_no_lock_left(store: Store, backend: Backend, keys: Sequence[str]) -> None:
    """Every lock of *keys* is free, and no lock key is left in Redis."""
    assert store.lock_keys() == []
    assert held(backend, keys) == []


@pytest.fixture(
    params=[
        "memory",
        "memory-one-by-one",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis-one-by-one", marks=pytest.mark.redis),
    ]
)
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    """Backends on one store (memory, or the session's Redis under this test's prefix)."""
    kind = str(request.param)
    wrap: Callable[[Any], Backend] = (
        (lambda b: cast("Backend", OneByOne(b)))
        if kind.endswith("one-by-one")
        else (lambda b: b)
    )
    if kind.startswith("memory"):
        shared = wrap(MemoryBackend())
        yield Store(kind, lambda: shared)
        return
    url: str = request.getfixturevalue("redis_url")
    prefix: str = request.getfixturevalue("redis_prefix")
    client: redis.Redis = request.getfixturevalue("redis_client")
    made: list[RedisBackend] = []

    def make() -> Backend:
        made.append(RedisBackend.from_url(url, prefix=prefix))
        return wrap(made[-1])

    yield Store(kind, make, client, prefix)
    for backend in made:
        backend.close()


class Recorder:
    """A batch function's body: records each call's ids, returns ``{id: value(id)}``.

    The ids in *leave_out* get no value: they are left out of the mapping.
    """

    def __init__(
        self,
        value: Callable[[int], object] = lambda i: f"v{i}",
        leave_out: frozenset[int] = frozenset(),
    ) -> None:
        self.calls: list[list[int]] = []
        self.value = value
        self.leave_out = leave_out
        self._guard = threading.Lock()

    def __call__(self, ids: Sequence[int]) -> dict[int, object]:
        with self._guard:
            self.calls.append(list(ids))
        return {i: self.value(i) for i in ids if i not in self.leave_out}

    def computed(self) -> Counter[int]:
        """Return how many times each id was computed."""
        with self._guard:
            return Counter(i for call in self.calls for i in call)


def batch(
    backend: Backend,
    body: Callable[[Sequence[int]], Mapping[int, object]],
    **options: Any,
) -> BatchFunction[int, object]:
    """Decorate *body* with the key ``item:{}`` on *backend*."""
    settings: dict[str, Any] = {"ttl": TTL, "lock_timeout": 10} | options

    def items(ids: Sequence[int]) -> Mapping[int, object]:
        return body(ids)

    return cached_stampede_safe_batch(key="item:{}", backend=backend, **settings)(items)


def values(ids: Sequence[int]) -> dict[int, object]:
    """Return what the default `Recorder` computes for *ids*."""
    return {i: f"v{i}" for i in ids}


def start(target: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run *target* in a thread; its result (or exception) lands in the list."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(target())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def finish(thread: threading.Thread, out: list[object]) -> object:
    """Join *thread* (bounded) and return what its target returned or raised."""
    thread.join(BOUND)
    assert not thread.is_alive(), "the call did not return"
    return out[0]


# --- 1. exactly once per id, across processes, tasks and threads ---------------------

PROCESSES = 4
# 25 threads per process, not 50: 100 callers on a 2-core machine already keep every
# id contended while staying well inside the per-test timeout.
THREADS = 25
IDS = 200
PER_CALL = 40
SEED = 20240607


@pytest.fixture
def batch_worker(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Return the `_batch_worker` module, importable by spawned children too."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    import _batch_worker

    return _batch_worker


def _drain(
    channel: Queue[Any], processes: list[SpawnProcess], deadline: float
) -> Iterator[Any]:
    """Yield one message per process, stopping early if all died or time ran out."""
    for _ in processes:
        while True:
            try:
                yield channel.get(timeout=0.2)
                break
            except queue.Empty:
                if time.monotonic() > deadline or not any(
                    p.is_alive() for p in processes
                ):
                    return


@pytest.mark.slow
def test_every_id_is_computed_once_across_four_processes_of_many_threads(
    batch_worker: ModuleType,
    redis_url: str,
    redis_client: redis.Redis,
    redis_prefix: str,
) -> None:
    """100 callers in 4 processes ask overlapping random subsets of 200 cold ids at once: each id computed once, every caller served right."""
    ctx = multiprocessing.get_context("spawn")
    ready: Queue[int] = ctx.Queue()
    reports: Queue[Any] = ctx.Queue()
    go = ctx.Event()
    jobs = [
        batch_worker.BatchJob(redis_url, redis_prefix, w, THREADS, IDS, PER_CALL, SEED)
        for w in range(PROCESSES)
    ]
    processes = [
        ctx.Process(target=batch_worker.stampede, args=(job, ready, go, reports))
        for job in jobs
    ]
    deadline = time.monotonic() + 45  # spawning included; the test's timeout is 60
    try:
        for process in processes:
            process.start()
        started = list(_drain(ready, processes, deadline))
        assert len(started) == PROCESSES, "not every worker got its threads waiting"
        go.set()  # every thread of every process calls at once
        collected = list(_drain(reports, processes, deadline))
    finally:
        go.set()
        for process in processes:
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(5)
    assert [p.exitcode for p in processes] == [0] * PROCESSES
    assert len(collected) == PROCESSES
    asked_in_all: set[int] = set()
    for worker, outcomes in collected:
        assert len(outcomes) == THREADS
        for thread, kind, got in outcomes:
            assert kind == "ok", got
            asked = batch_worker.asked(jobs[worker], thread)
            asked_in_all.update(asked)
            # Every id it asked for, with its value, in the order asked.
            assert list(cast("dict[int, str]", got).items()) == [
                (i, batch_worker.value_of(i)) for i in asked
            ]
    counts = {
        int(k): int(v)
        for k, v in redis_client.hgetall(
            batch_worker.computed_key(redis_prefix)
        ).items()
    }
    assert counts == dict.fromkeys(asked_in_all, 1)
    assert lock_keys(redis_client, redis_prefix) == []


def _subsets(callers: int, seed: int = SEED) -> list[list[int]]:
    rng = random.Random(seed)
    return [rng.sample(range(IDS), PER_CALL) for _ in range(callers)]


def test_every_id_is_computed_once_across_asyncio_tasks_on_two_redis_backends(
    redis_url: str, redis_client: redis.Redis, redis_prefix: str
) -> None:
    """100 tasks (two backends: two processes' worth of locks) ask overlapping subsets at once: each id computed once."""
    asked = _subsets(100)
    computed: Counter[int] = Counter()

    async def scenario() -> list[dict[int, str]]:
        # A small pool with a patient connect: the stampede opens its connections all
        # at once on one event loop, and on a loaded machine (more xdist workers than
        # cores) 100 handshakes can outlast the default 1 s connect timeout; the
        # backend error then computes without the cache (by design), which this test
        # would count as a second computation.
        backends = [
            AsyncRedisBackend.from_url(
                redis_url, prefix=redis_prefix, max_connections=20, connect_timeout=5
            )
            for _ in range(2)
        ]

        async def body(ids: Sequence[int]) -> dict[int, str]:
            computed.update(ids)
            await asyncio.sleep(0.01)  # lets the other tasks run into these ids
            return {i: f"v{i}" for i in ids}

        fns = [
            cached_stampede_safe_batch(
                key="item:{}", backend=b, ttl=TTL, lock_timeout=20, max_delay=0.1
            )(body)
            for b in backends
        ]
        barrier = asyncio.Barrier(len(asked))

        async def call(n: int) -> dict[int, str]:
            await barrier.wait()
            return await fns[n % 2](asked[n])

        try:
            async with asyncio.timeout(45):
                return await asyncio.gather(*(call(n) for n in range(len(asked))))
        finally:
            for b in backends:
                await b.aclose()

    results = asyncio.run(scenario())
    for ids, got in zip(asked, results, strict=True):
        assert list(got.items()) == [(i, f"v{i}") for i in ids]
    everything = {i for ids in asked for i in ids}
    assert computed == Counter(everything)
    assert lock_keys(redis_client, redis_prefix) == []


def test_an_asyncio_call_waits_for_ids_locked_elsewhere_on_one_connection_at_a_time(
    redis_url: str, redis_client: redis.Redis, redis_prefix: str
) -> None:
    """200 ids locked by another process, asked for by 5 tasks of 40: none computed here.

    Waited for all at once, each id took a connection of its own: 200 at a time,
    until, under load, connecting timed out and each id was computed again without
    the cache (found by benchmarks/batch.py). One at a time, 5 tasks need about 5.
    """
    opened: list[int] = []
    keys_of_ids = {i: f"item:{i}" for i in range(200)}
    holder = RedisBackend.from_url(redis_url, prefix=redis_prefix)
    token = f"holder-{uuid.uuid4().hex}"
    tickets = {i: holder.get_or_lock(k, token, 30) for i, k in keys_of_ids.items()}
    computed: list[int] = []
    stats = StampedeStats()

    async def scenario() -> list[dict[int, str]]:
        backend = AsyncRedisBackend.from_url(
            redis_url, prefix=redis_prefix, max_connections=400, connect_timeout=5
        )

        @cached_stampede_safe_batch(
            key="item:{}", backend=backend, ttl=TTL, max_delay=0.1, metrics=stats
        )
        async def body(ids: Sequence[int]) -> dict[int, str]:
            computed.extend(ids)
            return {i: f"mine{i}" for i in ids}

        async def store_later() -> None:
            # Every task waits on its first id (the single plan's Miss, then a wait).
            await until_async(
                "every task waiting", lambda: stats.snapshot().misses >= 5
            )
            for i, key in keys_of_ids.items():
                claim = tickets[i]
                assert isinstance(claim, Claim)
                await asyncio.to_thread(
                    holder.set_and_unlock,
                    key,
                    Entry([f"v{i}"], backend_now(holder), 0.0),
                    TTL,
                    token,
                    ticket=claim.ticket,
                )

        try:
            async with asyncio.timeout(45):
                writer = asyncio.create_task(store_later())
                got = await asyncio.gather(*(body(range(n, 200, 5)) for n in range(5)))
                await writer
                # Idle and in use: every connection the pool has made so far.
                pool: Any = backend.client.connection_pool  # type: ignore[union-attr]
                counts = pool.get_connection_count()
                opened.append(sum(count for count, _ in counts))
                return got
        finally:
            await backend.aclose()

    try:
        results = asyncio.run(scenario())
    finally:
        holder.close()
    assert computed == []
    assert stats.snapshot().backend_errors == 0
    assert opened[0] <= 16
    for n, got in enumerate(results):
        assert got == {i: f"v{i}" for i in range(n, 200, 5)}


@pytest.mark.parametrize("functions", [1, 2], ids=["one-function", "two-functions"])
def test_every_id_is_computed_once_across_threads_on_a_memory_backend(
    functions: int,
) -> None:
    """50 threads ask overlapping subsets of 200 ids at once: each id computed once (two functions on one store: two processes' worth of flights)."""
    backend, recorder = MemoryBackend(), Recorder()

    def body(ids: Sequence[int]) -> dict[int, object]:
        got = recorder(ids)
        time.sleep(0.005)  # lets the other threads run into these ids
        return got

    fns = [batch(backend, body) for _ in range(functions)]
    asked = _subsets(50)
    barrier = threading.Barrier(len(asked), timeout=BOUND)
    results: dict[int, object] = {}

    def call(n: int) -> None:
        barrier.wait()
        try:
            results[n] = fns[n % functions](asked[n])
        except BaseException as exc:
            results[n] = exc

    threads = [threading.Thread(target=call, args=(n,)) for n in range(len(asked))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    for n, ids in enumerate(asked):
        assert results[n] == values(ids)
    assert recorder.computed() == Counter({i for ids in asked for i in ids})


# --- 2. the function only ever sees missing ids -----------------------------------


def test_the_function_is_only_ever_called_with_missing_ids(store: Store) -> None:
    """Twenty seeded calls of overlapping ids: each call computes exactly the ids never computed before, so a warm id is never passed again."""
    body = Recorder()
    fn = batch(store.make(), body)
    rng = random.Random(7)
    seen: set[int] = set()
    for _ in range(20):
        ids = rng.sample(range(60), rng.randint(1, 15))
        before = len(body.calls)
        assert fn(ids) == values(ids)
        passed = [i for call in body.calls[before:] for i in call]
        assert sorted(passed) == sorted(set(ids) - seen)
        seen.update(ids)
    assert body.computed() == Counter(seen)


def test_a_warm_call_does_not_call_the_function(store: Store) -> None:
    """Once every id is cached, a call is served without calling the function."""
    body = Recorder()
    fn = batch(store.make(), body)
    assert fn([1, 2, 3]) == values([1, 2, 3])
    assert fn([3, 2, 1]) == values([3, 2, 1])
    assert body.calls == [[1, 2, 3]]


def test_a_second_process_is_served_what_the_first_computed(store: Store) -> None:
    """Another backend object on the same store (another process) computes only what the first did not."""
    body = Recorder()
    first, second = batch(store.make(), body), batch(store.make(), body)
    assert first([1, 2, 3]) == values([1, 2, 3])
    assert second([2, 3, 4]) == values([2, 3, 4])
    assert body.calls == [[1, 2, 3], [4]]


# --- 3. in-process coalescing per id ------------------------------------------------


class Gate:
    """A body whose calls with *hold* among their ids wait until a later call arrives."""

    def __init__(self, hold: int) -> None:
        self.hold = hold
        self.calls: list[list[int]] = []
        self.holding = threading.Event()
        self.release = threading.Event()
        self._guard = threading.Lock()

    def __call__(self, ids: Sequence[int]) -> dict[int, object]:
        with self._guard:
            self.calls.append(list(ids))
        if self.hold in ids:
            self.holding.set()
            assert self.release.wait(BOUND), "never released"
        else:
            self.release.set()  # the second call got this far: its claims are made
        return values(ids)


def test_overlapping_concurrent_calls_share_the_overlap(store: Store) -> None:
    """While a call computes 1-10, a call for 5-15 computes 11-15 only and is served 5-10 by the first."""
    gate = Gate(hold=1)
    fn = batch(store.make(), gate)
    first, first_out = start(lambda: fn(range(1, 11)))
    assert gate.holding.wait(BOUND)
    second, second_out = start(lambda: fn(range(5, 16)))
    assert finish(first, first_out) == values(range(1, 11))
    assert finish(second, second_out) == values(range(5, 16))
    assert gate.calls == [list(range(1, 11)), list(range(11, 16))]


def test_a_call_whose_ids_are_all_in_flight_does_not_call_the_function(
    store: Store,
) -> None:
    """A call for ids another call of its process is computing waits for that call's values."""
    gate = Gate(hold=1)
    fn = batch(store.make(), gate)
    first, first_out = start(lambda: fn([1, 2, 3, 4]))
    assert gate.holding.wait(BOUND)
    second, second_out = start(lambda: fn([4, 3, 2]))
    # The second call computes nothing; it cannot tell the first to go on, so we do,
    # once it has joined (it does not return before the first's values).
    second.join(0.2)
    assert second.is_alive(), "served before the values it joined were computed"
    gate.release.set()
    assert finish(first, first_out) == values([1, 2, 3, 4])
    assert finish(second, second_out) == values([4, 3, 2])
    assert gate.calls == [[1, 2, 3, 4]]


@pytest.mark.parametrize(
    "kind", ["memory", pytest.param("redis", marks=pytest.mark.redis)]
)
def test_overlapping_concurrent_tasks_share_the_overlap(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """asyncio: while a task computes 1-10, a task for 5-15 computes 11-15 only."""
    calls: list[list[int]] = []

    async def scenario() -> tuple[dict[int, object], dict[int, object]]:
        backend: AsyncBackend
        if kind == "memory":
            backend = MemoryBackend()
        else:
            backend = AsyncRedisBackend.from_url(
                request.getfixturevalue("redis_url"),
                prefix=request.getfixturevalue("redis_prefix"),
            )
        holding, release = asyncio.Event(), asyncio.Event()

        @cached_stampede_safe_batch(key="item:{}", backend=backend, ttl=TTL)
        async def fn(ids: Sequence[int]) -> dict[int, object]:
            calls.append(list(ids))
            if 1 in ids:
                holding.set()
                await asyncio.wait_for(release.wait(), BOUND)
            else:
                release.set()
            return values(ids)

        try:
            first = asyncio.ensure_future(fn(range(1, 11)))
            await asyncio.wait_for(holding.wait(), BOUND)
            second = asyncio.ensure_future(fn(range(5, 16)))
            async with asyncio.timeout(BOUND):
                return await first, await second
        finally:
            if isinstance(backend, AsyncRedisBackend):
                await backend.aclose()

    first, second = asyncio.run(scenario())
    assert first == values(range(1, 11))
    assert second == values(range(5, 16))
    assert calls == [list(range(1, 11)), list(range(11, 16))]


# --- 4. no value, and None ----------------------------------------------------------


def test_ids_left_out_are_absent_and_remembered_as_having_no_value(
    store: Store,
) -> None:
    """Ids the function leaves out are not in the result, and (cache_none=True) not asked for again."""
    body = Recorder(leave_out=frozenset({2, 4}))
    fn = batch(store.make(), body)
    assert fn([1, 2, 3, 4]) == values([1, 3])
    assert fn([4, 3, 2, 1]) == values([3, 1])
    assert body.calls == [[1, 2, 3, 4]]


def test_cache_none_false_asks_again_for_ids_left_out_and_for_none(
    store: Store,
) -> None:
    """cache_none=False: ids with no value and ids valued None are computed again on the next call."""
    body = Recorder(
        value=lambda i: None if i == 3 else f"v{i}", leave_out=frozenset({2})
    )
    fn = batch(store.make(), body, cache_none=False)
    expected = {1: "v1", 3: None, 4: "v4"}
    assert fn([1, 2, 3, 4]) == expected
    assert fn([1, 2, 3, 4]) == expected
    assert body.calls == [[1, 2, 3, 4], [2, 3]]
    assert_no_lock_left(store, store.make(), [fn.cache_key(i) for i in (1, 2, 3, 4)])


def test_an_explicit_none_is_served_as_none_and_is_not_no_value(store: Store) -> None:
    """A value of None is in the result (cached as such); an id left out is not."""
    body = Recorder(value=lambda _: None, leave_out=frozenset({2}))
    fn = batch(store.make(), body)
    assert fn([1, 2]) == {1: None}
    assert fn([1, 2]) == {1: None}
    assert body.calls == [[1, 2]]
    backend = store.make()
    stored = [backend.get(fn.cache_key(i)) for i in (1, 2)]
    assert [None if e is None else e.value for e in stored] == [[None], []]


def test_entries_in_the_stored_form_are_served_whoever_stored_them(
    store: Store,
) -> None:
    """An entry ``[value]`` under an id's key (stored by anyone) is that id's value; ``[]`` is no value."""
    backend = store.make()
    body = Recorder()
    fn = batch(backend, body)
    now = backend_now(backend)
    backend.set(fn.cache_key(1), Entry(["elsewhere"], now, 0.0), TTL)
    backend.set(fn.cache_key(2), Entry([], now, 0.0), TTL)
    assert fn([1, 2, 3]) == {1: "elsewhere", 3: "v3"}
    assert body.calls == [[3]]


# --- 5. duplicates ------------------------------------------------------------------


def test_repeated_ids_are_computed_once_and_returned_once(store: Store) -> None:
    """A request repeating ids calls the function with each id once; the result has each once, in first-asked order."""
    body = Recorder()
    fn = batch(store.make(), body)
    got = fn([3, 1, 3, 2, 1, 3])
    assert list(got.items()) == [(3, "v3"), (1, "v1"), (2, "v2")]
    assert body.calls == [[3, 1, 2]]
    assert list(fn([2, 2, 4, 4]).items()) == [(2, "v2"), (4, "v4")]
    assert body.calls == [[3, 1, 2], [4]]


# --- 6. errors ----------------------------------------------------------------------


def test_unhashable_ids_raise_type_error_naming_the_fix(store: Store) -> None:
    """A list among the ids raises TypeError saying to pass a tuple; nothing is locked or computed."""
    body = Recorder()
    fn = batch(store.make(), body)
    with pytest.raises(TypeError, match=r"not hashable.*tuple"):
        fn([1, [2, 3]])  # type: ignore[list-item]
    assert body.calls == []
    assert fn([1, 2]) == values([1, 2])
    assert_no_lock_left(store, store.make(), [fn.cache_key(1), fn.cache_key(2)])


@pytest.mark.parametrize("ids", ["abc", b"abc"], ids=["str", "bytes"])
def test_a_bare_string_raises_type_error_naming_the_fix(
    store: Store, ids: str | bytes
) -> None:
    """A str or bytes passed as the ids raises TypeError saying to wrap it in a list."""
    body = Recorder()
    fn = batch(store.make(), body)
    with pytest.raises(TypeError, match=r"collection of ids.*pass \["):
        fn(ids)  # type: ignore[arg-type]
    assert body.calls == []


def _after_a_failure(
    store: Store, fn: BatchFunction[int, object], ids: list[int]
) -> None:
    """No lock is left, nothing was cached, and the next call computes every id."""
    backend = store.make()
    keys = [fn.cache_key(i) for i in ids]
    assert_no_lock_left(store, backend, keys)
    assert [backend.get(k) for k in keys] == [None] * len(ids)


class Switch:
    """A body that misbehaves as told by *mode* and computes normally afterwards."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.calls: list[list[int]] = []

    def __call__(self, ids: Sequence[int]) -> Any:
        self.calls.append(list(ids))
        mode, self.mode = self.mode, "ok"
        if mode == "list":
            return [f"v{i}" for i in ids]
        if mode == "extra":
            return {**values(ids), 999: "nobody asked"}
        if mode == "raise":
            msg = "the database is down"
            raise ConnectionError(msg)
        return values(ids)


@pytest.mark.parametrize(
    ("mode", "error", "match"),
    [
        ("list", TypeError, r"returned list, not a mapping.*return \{id: value"),
        ("extra", ValueError, r"not asked for \(999\).*return only the ids"),
        ("raise", ConnectionError, r"^the database is down$"),
    ],
    ids=["non-mapping", "ids-nobody-asked-for", "function-raises"],
)
def test_a_failed_computation_raises_releases_every_lock_and_caches_nothing(
    store: Store, mode: str, error: type[Exception], match: str
) -> None:
    """A non-mapping result (TypeError), ids nobody asked for (ValueError) or the function's own exception: raised, every lock released, nothing cached, the next call computes."""
    body = Switch(mode)
    fn = batch(store.make(), body)
    ids = [1, 2, 3]
    with pytest.raises(error, match=match):
        fn(ids)
    _after_a_failure(store, fn, ids)
    assert fn(ids) == values(ids)
    assert body.calls == [ids, ids]


@pytest.mark.parametrize(
    "kind", ["memory", pytest.param("redis", marks=pytest.mark.redis)]
)
def test_an_async_function_that_raises_releases_every_lock(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """asyncio: the function's exception propagates, its locks are released, the next call computes."""
    calls: list[list[int]] = []

    async def scenario() -> tuple[list[bool], list[Entry | None], dict[int, object]]:
        backend: MemoryBackend | AsyncRedisBackend
        if kind == "memory":
            backend = MemoryBackend()
        else:
            backend = AsyncRedisBackend.from_url(
                request.getfixturevalue("redis_url"),
                prefix=request.getfixturevalue("redis_prefix"),
            )

        @cached_stampede_safe_batch(key="item:{}", backend=backend, ttl=TTL)
        async def fn(ids: Sequence[int]) -> dict[int, object]:
            calls.append(list(ids))
            if len(calls) == 1:
                raise ConnectionError("down")
            return values(ids)

        async def free(key: str) -> bool:
            """Whether a fresh token can take *key*'s lock (it then lets go)."""
            probe = f"probe-{uuid.uuid4().hex}"
            took = await backend.alock(key, probe, 5) == probe
            await backend.aunlock(key, probe)
            return took

        keys = [fn.cache_key(1), fn.cache_key(2)]
        try:
            with pytest.raises(ConnectionError, match=r"^down$"):
                await fn([1, 2])
            unlocked = [await free(k) for k in keys]
            cached = [await backend.aget(k) for k in keys]
            return unlocked, cached, await fn([1, 2])
        finally:
            if isinstance(backend, AsyncRedisBackend):
                await backend.aclose()

    unlocked, cached, second = asyncio.run(scenario())
    assert unlocked == [True, True]
    assert cached == [None, None]
    assert second == values([1, 2])
    assert calls == [[1, 2], [1, 2]]


@pytest.mark.parametrize(
    ("key", "error", "match"),
    [
        ("user", ValueError, r"exactly one field"),
        ("user:{}:{}", ValueError, r"exactly one field"),
        ("user:{id}", ValueError, r"exactly one field.*'\{\}' or '\{0\}'"),
        ("user:{", ValueError, r"not a valid str.format template"),
        (42, TypeError, r"must be a str.format template"),
    ],
    ids=["no-field", "two-fields", "named-field", "unclosed", "not-a-str"],
)
def test_a_bad_key_template_fails_at_decoration(
    key: object, error: type[Exception], match: str
) -> None:
    """key must be a str.format template with one positional field; anything else fails when decorating."""
    decorator = cached_stampede_safe_batch(key=key, backend=MemoryBackend())  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        decorator(values)


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ("lock_renewal", r"'lock_renewal'"),
        ("on_cancel", r"'on_cancel'"),
        ("should_cache", r"'should_cache'"),
        ("ttll", r"'ttll'; did you mean ttl=\?"),
        ("cache_nones", r"did you mean cache_none=\?"),
    ],
)
def test_an_unknown_option_fails_at_decoration_naming_the_fix(
    option: str, match: str
) -> None:
    """The single decorator's options that make no sense per id, and typos, raise TypeError at once."""
    options: dict[str, Any] = {option: True}
    with pytest.raises(TypeError, match=match):
        cached_stampede_safe_batch(key="user:{}", backend=MemoryBackend(), **options)


def test_an_out_of_range_option_fails_at_decoration() -> None:
    """Options are checked as the single decorator's are (a negative ttl: ValueError)."""
    with pytest.raises(ValueError, match="ttl"):
        cached_stampede_safe_batch(key="user:{}", backend=MemoryBackend(), ttl=-1)


def test_cache_keys_follow_the_template_and_namespace() -> None:
    """Each id's key is the template filled with it (format spec and all), after the namespace."""
    fn = cached_stampede_safe_batch(
        key="row:{:04d}", backend=MemoryBackend(), namespace="v2"
    )(values)
    assert fn.cache_key(7) == "v2:row:0007"


def test_an_empty_request_returns_an_empty_mapping_without_calling_the_function(
    store: Store,
) -> None:
    """No ids, no work: an empty mapping, and the function is not called with an empty list."""
    body = Recorder()
    fn = batch(store.make(), body)
    assert fn([]) == {}
    assert body.calls == []


# _batch.unique catches the TypeError of dict.fromkeys, then looks for a non-Hashable id
# to name: a tuple holding a list is Hashable, and an iterator is already consumed, so
# next() finds none and raises StopIteration (a RuntimeError in a coroutine).
@pytest.mark.parametrize(
    "ids",
    [lambda: [1, (2, [3])], lambda: (i for i in [1, [2], 3])],
    ids=["list-in-a-tuple", "iterator"],
)
def test_an_unhashable_id_raises_type_error_however_it_is_hidden(
    ids: Callable[[], Any],
) -> None:
    """An id that only fails to hash deep inside (a tuple holding a list), or one read from an iterator, still raises the TypeError that names the fix."""
    body = Recorder()
    fn = batch(MemoryBackend(), body)
    with pytest.raises(TypeError, match="not hashable"):
        fn(ids())
    assert body.calls == []


# '1' and 1 under 'item:{}' share the key 'item:1': _plan_keys keeps one id per key
# ({key: id}), the function is called with that one, and _answer finds no form for the
# other, which is left out of the result as if it had no value.
def test_ids_sharing_a_key_are_all_served_or_refused() -> None:
    """Two distinct ids with one cache key: both are in the result, or the call says why not."""
    calls: list[list[object]] = []

    @cached_stampede_safe_batch(key="item:{}", backend=MemoryBackend(), ttl=TTL)
    def fn(ids: Sequence[object]) -> dict[object, str]:
        calls.append(list(ids))
        return {i: f"v{i}" for i in ids}

    try:
        got = fn(["1", 1])
    except ValueError:
        return  # refusing, naming the collision, would be a fix as well
    assert set(got) == {"1", 1}


# --- 7. ids locked elsewhere --------------------------------------------------------


def take_lock(backend: Backend, key: str, lease: float) -> tuple[str, int | None]:
    """Take *key*'s lock as another process would; return its token and ticket."""
    token = f"holder-{uuid.uuid4().hex}"
    claim = backend.get_or_lock(key, token, lease)
    assert claim == token, "the lock was not free"
    return token, claim.ticket if isinstance(claim, Claim) else None


def test_an_id_locked_elsewhere_is_waited_for_and_served_the_holders_value(
    store: Store,
) -> None:
    """An id whose lock another process holds is not computed: the call waits and serves the value the holder stores."""
    holder, events, body = store.make(), list[Event](), Recorder()
    fn = batch(store.make(), body, metrics=events.append, max_delay=0.2)
    key = fn.cache_key(2)
    token, ticket = take_lock(holder, key, 30)
    call, out = start(lambda: fn([1, 2, 3]))
    until("the call computed the ids it locked", lambda: body.calls == [[1, 3]])
    call.join(0.2)
    assert call.is_alive(), "served before the holder stored its value"
    holder.set_and_unlock(
        key, Entry(["held"], backend_now(holder), 0.0), TTL, token, ticket=ticket
    )
    assert finish(call, out) == {1: "v1", 2: "held", 3: "v3"}
    assert body.calls == [[1, 3]]
    assert not [e for e in events if isinstance(e, Computed) and e.key == key]
    assert_no_lock_left(store, holder, [fn.cache_key(i) for i in (1, 2, 3)])


def test_an_id_locked_elsewhere_is_computed_alone_after_the_holders_lease_runs_out(
    store: Store,
) -> None:
    """A holder that never stores (it died) is taken over once its lease ends: the call computes that id by itself."""
    holder, events, body = store.make(), list[Event](), Recorder()
    fn = batch(store.make(), body, metrics=events.append, max_delay=0.1)
    key = fn.cache_key(2)
    token, _ = take_lock(holder, key, 30)
    call, out = start(lambda: fn([1, 2, 3]))
    until("the call computed the ids it locked", lambda: body.calls == [[1, 3]])
    # The lease runs out now, not after a time the call might not have reached its
    # wait by: the holder renews it for a tenth of a second, then never again.
    assert holder.extend(key, token, 0.1)
    assert finish(call, out) == values([1, 2, 3])
    assert body.calls == [[1, 3], [2]]
    assert [e.outcome for e in events if isinstance(e, LockWait)] == ["lock"]
    assert_no_lock_left(store, holder, [fn.cache_key(i) for i in (1, 2, 3)])
    assert fn([1, 2, 3]) == values([1, 2, 3])
    assert body.calls == [[1, 3], [2]]


def test_on_timeout_raise_raises_lock_timeout_error_for_an_id_locked_elsewhere(
    store: Store,
) -> None:
    """on_timeout='raise': a wait that runs out raises LockTimeoutError; the ids the call locked are stored and released."""
    holder, body = store.make(), Recorder()
    fn = batch(store.make(), body, on_timeout="raise", wait_timeout=0.3, max_delay=0.1)
    key = fn.cache_key(2)
    token, _ = take_lock(holder, key, 30)
    with pytest.raises(LockTimeoutError) as raised:
        fn([1, 2, 3])
    assert raised.value.key == key
    assert body.calls == [[1, 3]]
    assert held(holder, [fn.cache_key(i) for i in (1, 2, 3)]) == [key]  # the holder's
    holder.unlock(key, token)
    assert_no_lock_left(store, holder, [fn.cache_key(i) for i in (1, 2, 3)])
    assert fn([1, 2, 3]) == values([1, 2, 3])
    assert body.calls == [[1, 3], [2]]


def test_an_async_call_waits_for_an_id_locked_by_a_sync_process(
    redis_url: str, redis_prefix: str
) -> None:
    """asyncio on AsyncRedisBackend: an id locked by another (sync) backend is waited for and served its value."""
    holder = RedisBackend.from_url(redis_url, prefix=redis_prefix)
    calls: list[list[int]] = []

    async def scenario() -> dict[int, object]:
        backend = AsyncRedisBackend.from_url(redis_url, prefix=redis_prefix)
        computed = asyncio.Event()

        @cached_stampede_safe_batch(
            key="item:{}", backend=backend, ttl=TTL, max_delay=0.2
        )
        async def fn(ids: Sequence[int]) -> dict[int, object]:
            calls.append(list(ids))
            computed.set()
            return values(ids)

        key = fn.cache_key(2)
        token, ticket = take_lock(holder, key, 30)
        try:
            task = asyncio.ensure_future(fn([1, 2, 3]))
            await asyncio.wait_for(computed.wait(), BOUND)  # the ids it locked
            await asyncio.sleep(0.2)
            assert not task.done(), "served before the holder stored its value"
            holder.set_and_unlock(
                key,
                Entry(["held"], backend_now(holder), 0.0),
                TTL,
                token,
                ticket=ticket,
            )
            async with asyncio.timeout(BOUND):
                return await task
        finally:
            await backend.aclose()

    try:
        assert asyncio.run(scenario()) == {1: "v1", 2: "held", 3: "v3"}
    finally:
        holder.close()
    assert calls == [[1, 3]]


# An entry that is not a stored form ([value] or []) goes to the single plan
# (sort_claims: "unreadable: the single plan replaces it"), whose look-or-lock finds it
# and returns it as a hit; _one then calls the function outside any lock (`return form
# if form is not None else compute()`) and stores nothing.
def test_a_foreign_entry_under_an_ids_key_is_replaced_once(store: Store) -> None:
    """An entry that is not the batch's stored form (an older format, another function's) is computed once and replaced."""
    backend, body = store.make(), Recorder()
    fn = batch(backend, body)
    backend.set(fn.cache_key(5), Entry("foreign", backend_now(backend), 0.0), TTL)
    assert fn([5]) == {5: "v5"}
    assert fn([5]) == {5: "v5"}
    assert body.calls == [[5]]
    assert stored(backend, fn.cache_key(5)) == ["v5"]


# --- 8. invalidate ------------------------------------------------------------------


def test_invalidate_makes_the_next_call_recompute_exactly_those_ids(
    store: Store,
) -> None:
    """After invalidate([2, 4]) the next call computes 2 and 4, and only them."""
    body = Recorder()
    fn = batch(store.make(), body)
    ids = [1, 2, 3, 4, 5]
    assert fn(ids) == values(ids)
    fn.invalidate([4, 2, 2])
    assert fn(ids) == values(ids)
    assert body.calls == [ids, [2, 4]]


def test_invalidate_reaches_other_processes(store: Store) -> None:
    """An invalidation by one backend object is seen by another on the same store."""
    body = Recorder()
    first, second = batch(store.make(), body), batch(store.make(), body)
    assert first([1, 2]) == values([1, 2])
    second.invalidate([1])
    assert first([1, 2]) == values([1, 2])
    assert body.calls == [[1, 2], [1]]


@pytest.mark.parametrize(
    "kind", ["memory", pytest.param("redis", marks=pytest.mark.redis)]
)
def test_async_invalidate_makes_the_next_call_recompute_those_ids(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """asyncio: ``await fn.invalidate([2])`` makes the next call compute 2 alone."""
    calls: list[list[int]] = []

    async def scenario() -> None:
        backend: MemoryBackend | AsyncRedisBackend
        if kind == "memory":
            backend = MemoryBackend()
        else:
            backend = AsyncRedisBackend.from_url(
                request.getfixturevalue("redis_url"),
                prefix=request.getfixturevalue("redis_prefix"),
            )

        @cached_stampede_safe_batch(key="item:{}", backend=backend, ttl=TTL)
        async def fn(ids: Sequence[int]) -> dict[int, object]:
            calls.append(list(ids))
            return values(ids)

        try:
            assert await fn([1, 2, 3]) == values([1, 2, 3])
            await fn.invalidate([2])
            assert await fn([1, 2, 3]) == values([1, 2, 3])
        finally:
            if isinstance(backend, AsyncRedisBackend):
                await backend.aclose()

    asyncio.run(scenario())
    assert calls == [[1, 2, 3], [2]]


# --- 9. stale values ----------------------------------------------------------------


def test_a_stale_id_is_served_at_once_and_refreshed_alone_in_the_background(
    store: Store,
) -> None:
    """stale_ttl: a stale id is served its old value while the function, called with that id alone, refreshes it."""
    backend = store.make()
    release = threading.Event()
    calls: list[list[int]] = []

    def body(ids: Sequence[int]) -> dict[int, object]:
        calls.append(list(ids))
        assert release.wait(BOUND), "never released"
        return {i: f"new{i}" for i in ids}

    fn = batch(backend, body, stale_ttl=600)
    now = backend_now(backend)
    backend.set(fn.cache_key(7), Entry(["old7"], now - TTL - 5, 0.01), 600)
    backend.set(fn.cache_key(8), Entry(["fresh8"], now, 0.01), TTL)
    # The refresh waits for `release`, which is only set once the call has returned.
    assert fn([7, 8]) == {7: "old7", 8: "fresh8"}
    release.set()
    until(
        "the refreshed value stored",
        lambda: stored(backend, fn.cache_key(7)) == ["new7"],
    )
    assert fn([7, 8]) == {7: "new7", 8: "fresh8"}
    assert calls == [[7]]
    assert_no_lock_left(store, backend, [fn.cache_key(7), fn.cache_key(8)])


def backend_now(backend: Backend) -> float:
    """The clock the backend judges freshness by (Redis: the server's)."""
    now = getattr(backend, "now", None)
    return float(now()) if callable(now) else time.time()


def stored(backend: Backend, key: str) -> object:
    entry = backend.get(key)
    return None if entry is None else entry.value


# --- 10. metrics --------------------------------------------------------------------


def test_metrics_report_each_id_of_a_cold_then_a_warm_call(store: Store) -> None:
    """A cold call of N ids: N misses, N locks taken, N computations; a warm call: N hits."""
    stats, events = StampedeStats(), list[Event]()

    def hook(event: Event, /) -> None:
        events.append(event)
        stats(event)

    fn = batch(store.make(), Recorder(), metrics=hook)
    ids = list(range(20))
    keys = {fn.cache_key(i) for i in ids}
    fn(ids)
    cold = stats.snapshot()
    assert (cold.requests, cold.misses, cold.computations, cold.hits) == (20, 20, 20, 0)
    for kind in (Miss, LockAcquired, Computed):
        assert Counter(e.key for e in events if isinstance(e, kind)) == Counter(keys)
    fn(ids)
    warm = stats.snapshot()
    assert (warm.requests, warm.hits) == (40, 20)
    assert (warm.misses, warm.computations) == (20, 20)  # none more
    assert Counter(e.key for e in events if isinstance(e, Hit)) == Counter(keys)


def test_no_value_is_reported_as_computed(store: Store) -> None:
    """An id the function left out was still computed: one Computed each, then a hit."""
    stats = StampedeStats()
    fn = batch(store.make(), Recorder(leave_out=frozenset({1})), metrics=stats)
    fn([1, 2])
    fn([1, 2])
    snap = stats.snapshot()
    assert (snap.misses, snap.computations, snap.hits) == (2, 2, 2)


# _remote emits Miss for every key it did not find (self._misses([*locked.mine,
# *locked.elsewhere])), then _one runs the single plan for each key locked elsewhere,
# which emits Miss (or Hit) again after its own look-or-lock.
def test_an_id_waited_for_elsewhere_counts_as_one_request(store: Store) -> None:
    """Metrics: a call of 3 ids, one of them locked by another process, is 3 requests and 3 misses."""
    holder, stats, body = store.make(), StampedeStats(), Recorder()
    fn = batch(store.make(), body, metrics=stats, max_delay=0.1)
    key = fn.cache_key(2)
    token, ticket = take_lock(holder, key, 30)
    call, out = start(lambda: fn([1, 2, 3]))
    until("the call computed the ids it locked", lambda: body.calls == [[1, 3]])
    holder.set_and_unlock(
        key, Entry(["held"], backend_now(holder), 0.0), TTL, token, ticket=ticket
    )
    assert finish(call, out) == {1: "v1", 2: "held", 3: "v3"}
    snap = stats.snapshot()
    # Id 2 is a miss if its wait began before the holder stored, a hit after: one
    # request either way.
    assert (snap.requests, snap.computations) == (3, 2)


# _coalesced waits for the slots it joined and emits nothing for them; the single
# decorator's joiners emit Miss and then LockWait, so each caller is a request.
def test_ids_joined_in_process_count_as_requests_of_the_joining_call(
    store: Store,
) -> None:
    """Metrics: calls for 1-10 and 5-15 overlapping in one process are 21 requests (15 computed)."""
    stats, gate = StampedeStats(), Gate(hold=1)
    fn = batch(store.make(), gate, metrics=stats)
    first, first_out = start(lambda: fn(range(1, 11)))
    assert gate.holding.wait(BOUND)
    second, second_out = start(lambda: fn(range(5, 16)))
    finish(first, first_out)
    finish(second, second_out)
    assert gate.calls == [list(range(1, 11)), list(range(11, 16))]
    snap = stats.snapshot()
    assert (snap.requests, snap.computations) == (21, 15)


# --- round trips (need the backends' batch methods) --------------------------------


def commands_sent(
    client: redis.Redis, prefix: str, action: Callable[[], object]
) -> list[str]:
    """Run *action* under MONITOR; return the commands clients sent on *prefix* keys.

    Commands run inside scripts (``lua`` clients) are not round trips, so not counted.
    """
    marker = f"end-{uuid.uuid4().hex}"
    sent: list[str] = []
    with client.monitor() as monitor:  # type: ignore[no-untyped-call]
        action()
        client.echo(marker)
        while True:
            seen = cast("dict[str, Any]", monitor.next_command())
            command = str(seen["command"])
            if marker in command:
                return sent
            if seen["client_type"] != "lua" and prefix in command:
                sent.append(command.split(" ", 1)[0].upper())


@needs_batch_methods
@pytest.mark.parametrize("n", [3, 60])
def test_a_call_costs_the_same_few_round_trips_whatever_its_number_of_ids(
    redis_url: str, redis_client: redis.Redis, redis_prefix: str, n: int
) -> None:
    """A cold call: one read, one look-or-lock, one store (3 commands) for 3 or 60 ids; a warm call: one read."""
    backend = RedisBackend.from_url(redis_url, prefix=redis_prefix)
    try:
        body = Recorder()
        fn = batch(backend, body)
        fn([10_000])  # loads the scripts and opens the connection, outside the count
        ids = list(range(n))
        cold = commands_sent(redis_client, redis_prefix, lambda: fn(ids))
        warm = commands_sent(redis_client, redis_prefix, lambda: fn(ids))
    finally:
        backend.close()
    assert len(cold) == 3, cold
    assert len(warm) == 1, warm
    assert body.calls == [[10_000], ids]


@needs_async_batch_methods
def test_an_async_call_of_sixty_ids_costs_three_round_trips_cold_and_one_warm(
    redis_url: str, redis_client: redis.Redis, redis_prefix: str
) -> None:
    """asyncio: a cold call of 60 ids sends 3 commands, a warm one 1."""

    async def calls() -> None:
        backend = AsyncRedisBackend.from_url(redis_url, prefix=redis_prefix)

        @cached_stampede_safe_batch(key="item:{}", backend=backend, ttl=TTL)
        async def fn(ids: Sequence[int]) -> dict[int, object]:
            return values(ids)

        try:
            assert await fn(range(60)) == values(range(60))
        finally:
            await backend.aclose()

    # Load the scripts once (under another prefix), so the count is of calls only.
    warmup = f"{redis_prefix}w"

    async def load() -> None:
        backend = AsyncRedisBackend.from_url(redis_url, prefix=warmup)

        @cached_stampede_safe_batch(key="item:{}", backend=backend, ttl=TTL)
        async def fn(ids: Sequence[int]) -> dict[int, object]:
            return values(ids)

        try:
            await fn([1])
        finally:
            await backend.aclose()

    try:
        asyncio.run(load())
        cold = commands_sent(redis_client, redis_prefix, lambda: asyncio.run(calls()))
        warm = commands_sent(redis_client, redis_prefix, lambda: asyncio.run(calls()))
    finally:
        stale = list(redis_client.scan_iter(match=f"{warmup}:*"))
        if stale:
            redis_client.delete(*stale)
    assert len(cold) == 3, cold
    assert len(warm) == 1, warm


# --- 11. typing ---------------------------------------------------------------------


def test_batch_functions_are_typed_by_their_ids_and_values() -> None:
    """mypy checks this test: the decorated function maps Sequence[K] -> dict[K, V], sync or async."""
    backend = MemoryBackend()

    @cached_stampede_safe_batch(key="name:{}", backend=backend, ttl=TTL)
    def names(ids: Sequence[int]) -> dict[int, str]:
        return {i: f"n{i}" for i in ids}

    @cached_stampede_safe_batch(key="aname:{}", backend=backend, ttl=TTL)
    async def anames(ids: Sequence[int]) -> Mapping[int, str]:
        return {i: f"a{i}" for i in ids}

    assert_type(names, BatchFunction[int, str])
    assert_type(anames, AsyncBatchFunction[int, str])
    got: dict[int, str] = names([1, 2])
    key: str = names.cache_key(1)
    names.invalidate([1])
    agot: dict[int, str] = asyncio.run(anames((1, 2)))
    assert (got, key, agot) == ({1: "n1", 2: "n2"}, "name:1", {1: "a1", 2: "a2"})


# --- the backend down --------------------------------------------------------------


def test_with_redis_down_a_batch_is_computed_without_the_cache_or_raises(
    own_server: Server,
) -> None:
    """A stopped server: the call computes its ids once, reports each, and the breaker
    opens; with on_backend_error='raise' the call raises BackendError instead (while
    the circuit is closed: an open one skips the server, as for the single decorator).
    """
    backend = RedisBackend.from_url(
        own_server.url, socket_timeout=0.3, connect_timeout=0.3
    )
    stats, body = StampedeStats(), Recorder()
    fn = batch(backend, body, metrics=stats)
    strict = batch(backend, Recorder(), on_backend_error="raise")
    own_server.stop()
    try:
        with pytest.raises(BackendError):  # before the breaker opens: then it skips
            strict([4])
        for _ in range(6):  # the breaker opens after 5 failures (one was strict's)
            assert fn([1, 2, 3]) == values([1, 2, 3])
    finally:
        backend.close()
    snap = stats.snapshot()
    assert body.calls == [[1, 2, 3]] * 6
    assert snap.backend_errors >= 3
    assert snap.backend_skipped >= 3


# --- a cancelled caller, a server that stops answering --------------------------------


def test_a_caller_cancelled_while_it_computes_releases_every_lock(
    redis_url: str, redis_client: redis.Redis, redis_prefix: str
) -> None:
    """asyncio: the caller that holds the ids' locks is cancelled mid-computation:
    the locks are released at once (not at the end of their lease), nothing is
    stored, and the next call computes the ids."""
    started = threading.Event()
    calls: list[list[int]] = []

    async def scenario() -> dict[int, object]:
        backend = AsyncRedisBackend.from_url(redis_url, prefix=redis_prefix)

        @cached_stampede_safe_batch(
            key="item:{}", backend=backend, ttl=TTL, lock_timeout=60
        )
        async def fn(ids: Sequence[int]) -> dict[int, object]:
            calls.append(list(ids))
            if len(calls) == 1:
                started.set()
                await asyncio.Event().wait()  # hangs until cancelled
            return values(ids)

        try:
            task = asyncio.ensure_future(fn([1, 2, 3]))
            await until_async("the computation to start", started.is_set)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert lock_keys(redis_client, redis_prefix) == []  # released, not leased
            async with asyncio.timeout(BOUND):
                return await fn([1, 2, 3])
        finally:
            await backend.aclose()

    assert asyncio.run(scenario()) == values([1, 2, 3])
    assert calls == [[1, 2, 3], [1, 2, 3]]


def test_a_server_that_stops_answering_is_computed_around(
    proxy: Proxy,
) -> None:
    """A black-holed connection (accepts, never answers): the batch call's read
    times out, and its ids are computed without the cache and reported."""
    backend = RedisBackend.from_url(
        proxy.url(), socket_timeout=0.5, connect_timeout=0.5, max_connections=4
    )
    stats, body = StampedeStats(), Recorder()
    fn = batch(backend, body, metrics=stats)
    try:
        assert fn([1]) == values([1])  # connections open and scripts loaded
        proxy.blackhole()
        assert fn([2, 3]) == values([2, 3])  # not hung: the test's timeout bounds it
    finally:
        backend.close()
    assert body.calls == [[1], [2, 3]]
    assert stats.snapshot().backend_errors == 2
