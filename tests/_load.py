"""Stampedes and steady load against the Redis backends, counting what happened.

Several backends in one process stand for several processes: each gets its own
decorated function, so their callers share nothing but the server(s). Each computed
value names its key, so a wrong value (another key's, or a torn one) is told apart.

In a (sync) stampede a computation holds until every other caller of its key waits on it:
its function's other callers have joined its call, and every function's first caller
has had its get-or-lock answered (its Miss; a caller that joined reports its own
only once served).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from _waiting import until_async
from stampede_guard import AsyncRedisBackend, RedisBackend, cached_stampede_safe
from stampede_guard.metrics import Event, Miss
from stampede_guard.testing import joiners, wait_for_joiners

TIMEOUT_S = 30.0


def value_of(key: str) -> str:
    """Return the only right value for *key*."""
    return f"value-of:{key}"


@dataclass(slots=True)
class Tally:
    """What the callers saw and what the computations did, counted under a lock."""

    computations: Counter[str] = field(default_factory=Counter)
    served: int = 0
    wrong: list[tuple[str, object]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    running: Counter[str] = field(default_factory=Counter)
    most_at_once: Counter[str] = field(default_factory=Counter)
    misses: Counter[str] = field(default_factory=Counter)  # by `missed`
    # Held to count; notified on every count, for `Load.until_more`.
    mutex: threading.Condition = field(default_factory=threading.Condition)

    def started(self, key: str) -> None:
        with self.mutex:
            self.computations[key] += 1
            self.running[key] += 1
            self.most_at_once[key] = max(self.most_at_once[key], self.running[key])
            self.mutex.notify_all()

    def finished(self, key: str) -> None:
        with self.mutex:
            self.running[key] -= 1

    def outcome(self, key: str, result: object) -> None:
        with self.mutex:
            if result == value_of(key):
                self.served += 1
            else:
                self.wrong.append((key, result))
            self.mutex.notify_all()

    def missed(self, event: Event, /) -> None:
        """Count a Miss (a metrics hook)."""
        if isinstance(event, Miss):
            with self.mutex:
                self.misses[event.key] += 1
                self.mutex.notify_all()

    def until_missed(self, key: str, count: int) -> None:
        """Wait until *key* has *count* Misses."""
        with self.mutex:
            if not self.mutex.wait_for(lambda: self.misses[key] >= count, TIMEOUT_S):
                msg = f"{self.misses[key]} of {count} callers of {key} at the lock"
                raise AssertionError(msg)

    def error(self, exc: BaseException) -> None:
        with self.mutex:
            self.errors[type(exc).__name__] += 1


def sync_function(
    backend: RedisBackend,
    tally: Tally,
    work: Callable[[Callable[[str], object], str], object],
    **options: Any,
) -> Callable[[str], object]:
    """Return a function of one key, decorated over *backend*, that *tally* counts.

    Its computation of a key does *work* (given the function and the key) first.
    """

    @cached_stampede_safe(key="{key}", backend=backend, **options)
    def compute(key: str) -> str:
        tally.started(key)
        try:
            work(compute, key)
            return value_of(key)
        finally:
            tally.finished(key)

    return compute


def stampede(
    backends: Sequence[RedisBackend],
    keys: Sequence[str],
    *,
    threads_per_key: int = 2,
    timeout: float = TIMEOUT_S,
) -> Tally:
    """Call every key from *threads_per_key* threads per backend, all released at once."""
    tally = Tally()

    def hold(f: Callable[[str], object], key: str) -> None:  # see the module
        wait_for_joiners(f, threads_per_key - 1, key, timeout=TIMEOUT_S)
        tally.until_missed(key, len(backends))

    functions = [
        sync_function(backend, tally, hold, ttl=60, metrics=tally.missed)
        for backend in backends
    ]
    calls = [
        (f, key) for f in functions for key in keys for _ in range(threads_per_key)
    ]
    barrier = threading.Barrier(len(calls))

    def call(f: Callable[[str], object], key: str) -> None:
        barrier.wait(timeout)
        try:
            tally.outcome(key, f(key))
        except Exception as exc:
            tally.error(exc)

    threads = [threading.Thread(target=call, args=pair) for pair in calls]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "callers still running"
    return tally


async def async_stampede(
    backends: Sequence[AsyncRedisBackend],
    keys: Sequence[str],
    *,
    tasks_per_key: int = 2,
) -> Tally:
    """`stampede` with asyncio tasks of one loop over each backend."""
    tally = Tally()

    def function(backend: AsyncRedisBackend) -> Callable[[str], Any]:
        @cached_stampede_safe(
            key="{key}", backend=backend, ttl=60, metrics=tally.missed
        )
        async def compute(key: str) -> str:
            tally.started(key)
            try:
                # Held, as `stampede` does, until this backend's other callers
                # joined and every backend's first caller reached the lock.
                await until_async(
                    f"every caller of {key} waiting",
                    lambda: (
                        joiners(compute, key) >= tasks_per_key - 1
                        and tally.misses[key] >= len(backends)
                    ),
                )
                return value_of(key)
            finally:
                tally.finished(key)

        return compute

    async def call(f: Callable[[str], Any], key: str) -> None:
        try:
            tally.outcome(key, await f(key))
        except Exception as exc:
            tally.error(exc)

    functions = [function(backend) for backend in backends]
    await asyncio.gather(
        *(call(f, key) for f in functions for key in keys for _ in range(tasks_per_key))
    )
    return tally


class Load:
    """Threads calling keys over and over through several backends, until stopped.

    Values live *ttl* seconds, so the keys keep expiring and being computed again
    under the lock while the test disturbs the servers.
    """

    def __init__(
        self,
        backends: Sequence[RedisBackend],
        keys: Sequence[str],
        *,
        threads: int = 2,
        ttl: float = 0.3,
        compute_seconds: float = 0.02,
    ) -> None:
        self.tally = Tally()
        self.keys = list(keys)
        self.stop = threading.Event()
        self.rounds = 0
        options = {
            "ttl": ttl,
            "lock_timeout": ttl,
            "base_delay": 0.02,
            "max_delay": 0.1,
        }

        def work(f: Callable[[str], object], key: str) -> None:
            time.sleep(compute_seconds)  # the load's work, that a lock serializes

        functions = [sync_function(b, self.tally, work, **options) for b in backends]
        self._threads = [
            threading.Thread(target=self._run, args=(f, n))
            for f in functions
            for n in range(threads)
        ]

    def _run(self, f: Callable[[str], object], offset: int) -> None:
        turn = offset
        while not self.stop.is_set():
            key = self.keys[turn % len(self.keys)]
            turn += 1
            try:
                self.tally.outcome(key, f(key))
            except Exception as exc:
                self.tally.error(exc)
                self.stop.wait(0.05)  # a failing backend: do not spin

    def until_more(self, served: int, computed: int = 0, within: float = 30.0) -> None:
        """Wait until *served* more values were served and *computed* more computed.

        The load has then run for a while, by what it did rather than by the clock:
        with *computed* at least the number of keys, every key may have expired and
        been computed again meanwhile.

        Raises:
            AssertionError: Not within *within* seconds.
        """
        tally = self.tally
        with tally.mutex:
            served += tally.served
            computed += tally.computations.total()
            if not tally.mutex.wait_for(
                lambda: (
                    tally.served >= served and tally.computations.total() >= computed
                ),
                within,
            ):
                msg = (
                    f"the load served {tally.served} of {served} values and made "
                    f"{tally.computations.total()} of {computed} computations "
                    f"within {within} s"
                )
                raise AssertionError(msg)

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(30)
        assert not any(t.is_alive() for t in self._threads), "load threads hang"
