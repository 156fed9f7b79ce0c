"""Code run in the worker processes of test_tags_processes.py.

A spawned child imports this module by name: pytest's ``pythonpath`` puts this
directory on ``sys.path``, and multiprocessing hands the parent's ``sys.path`` on.

Each worker holds one `RedisBackend` (with a near cache if asked) and two decorated
functions, and answers the parent's commands over a pipe (see `serve`):

- ``user(user_id, org)``, key ``user:{user_id}``, tags ``user:{user_id}`` and
  ``org:{org}``: returns ``{"computation": n}``, n being its INCR on `calls_key`, so
  every process's computations are counted in one place and a newer value is told
  from an older one by its number;
- ``flaky(user_id)``, key ``flaky:{user_id}``, ``cache_errors={TimeoutError: period}``:
  counts its call the same way, then raises ``TimeoutError``.

In a stampede, a computation holds until every caller is waiting on it, as
``_workers`` does: the other threads of its process have joined its call, and every
process's first caller has had its get-or-lock answered (each counts its Miss of the
round in Redis). Outside a stampede, a computation holds while `hold_key` exists in
Redis, until `release_key` does: the parent's way to keep one in flight.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event

import redis

from _waiting import until
from stampede_guard import NearCache, RedisBackend, cached_stampede_safe
from stampede_guard.metrics import Event as MetricsEvent
from stampede_guard.metrics import Miss
from stampede_guard.testing import wait_for_joiners

__all__ = [
    "USER_ID",
    "Setup",
    "calls_key",
    "hold_key",
    "misses_key",
    "release_key",
    "serve",
]

BOUND = 20.0  # seconds any wait of a worker may take before it reports a failure
USER_ID = 42
ORG = "acme"

# ("ok", value) or ("error", "module.Type: message"), one per call.
Outcome = tuple[str, object]


@dataclass(frozen=True, slots=True)
class Setup:
    """What every worker of a test is: its Redis, its share of a stampede, its cache.

    Args:
        url: The Redis every worker uses.
        prefix: The test's key prefix.
        processes: How many workers run: each has one caller at the lock per round.
        threads: Callers per worker in a stampede.
        near: Give the backend a near cache.
        failure_period: Seconds ``flaky``'s TimeoutError is kept (``cache_errors``).
    """

    url: str
    prefix: str
    processes: int
    threads: int = 1
    near: bool = False
    failure_period: float = 2.0


def calls_key(prefix: str, fn: str) -> str:
    """Return the Redis key counting *fn*'s calls across all processes."""
    return f"{prefix}:calls:{fn}"


def misses_key(prefix: str, round_: int | None = None) -> str:
    """Return the Redis key counting the Misses of stampede round *round_*.

    Without a round: the Misses of calls made outside any stampede.
    """
    return f"{prefix}:misses:{'alone' if round_ is None else round_}"


def hold_key(prefix: str) -> str:
    """Return the key that, while it exists, holds computations until `release_key`."""
    return f"{prefix}:hold"


def release_key(prefix: str) -> str:
    """Return the key whose existence lets held computations finish."""
    return f"{prefix}:release"


def _outcome(call: Callable[[], object]) -> Outcome:
    try:
        return ("ok", call())
    except Exception as exc:
        return ("error", f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}")


def _record(call: Callable[[], object], outcomes: list[Outcome]) -> None:
    outcomes.append(_outcome(call))


class _Worker:
    """One worker's backend, functions and the round of the stampede in progress."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        prefix = setup.prefix
        self.backend = RedisBackend.from_url(
            setup.url,
            prefix=prefix,
            near_cache=NearCache(ttl=60) if setup.near else None,
        )
        self.counter = redis.Redis.from_url(setup.url, socket_timeout=5)
        self.round: int | None = None  # set while a stampede runs in this process
        self._background: threading.Thread | None = None  # see `start`
        self._started: list[Outcome] = []

        @cached_stampede_safe(
            key="user:{user_id}",
            tags=("user:{user_id}", "org:{org}"),
            backend=self.backend,
            ttl=60,
            lock_timeout=10,
            max_delay=0.2,
            metrics=self._count_misses,
        )
        def user(user_id: int, org: str) -> dict[str, int]:
            n = int(self.counter.incr(calls_key(prefix, "user")))
            self._hold(user, user_id, org)
            return {"computation": n}

        @cached_stampede_safe(
            key="flaky:{user_id}",
            cache_errors={TimeoutError: setup.failure_period},
            backend=self.backend,
            ttl=60,
            lock_timeout=10,
            max_delay=0.2,
            metrics=self._count_misses,
        )
        def flaky(user_id: int) -> dict[str, int]:
            n = int(self.counter.incr(calls_key(prefix, "flaky")))
            self._hold(flaky, user_id)
            msg = f"upstream timed out (call {n})"
            raise TimeoutError(msg)

        self.calls: dict[str, Callable[[], object]] = {
            "user": lambda: user(USER_ID, ORG),
            "flaky": lambda: flaky(USER_ID),
        }
        self.keys = {
            "user": user.cache_key(USER_ID, ORG),
            "flaky": flaky.cache_key(USER_ID),
        }

    def _count_misses(self, event: MetricsEvent, /) -> None:
        if isinstance(event, Miss):
            self.counter.incr(misses_key(self.setup.prefix, self.round))

    def _hold(self, fn: object, *args: object) -> None:
        """Hold a computation as the module says: until every caller waits on it."""
        setup, round_ = self.setup, self.round
        if round_ is not None:
            wait_for_joiners(fn, setup.threads - 1, *args, timeout=BOUND)
            misses = misses_key(setup.prefix, round_)
            until(
                "every process at the lock",
                lambda: int(self.counter.get(misses) or 0) >= setup.processes,
                BOUND,
            )
        if self.counter.exists(hold_key(setup.prefix)):
            release = release_key(setup.prefix)
            until("the release", lambda: self.counter.exists(release), BOUND)

    def stampede(self, round_: int, fn: str, go: Event, conn: Connection) -> None:
        """Park `Setup.threads` callers of *fn*, say ready, call once *go* is set."""
        call = self.calls[fn]
        outcomes: list[Outcome] = []
        guard = threading.Lock()
        parked = threading.Barrier(self.setup.threads + 1, timeout=BOUND)

        def caller() -> None:
            try:
                parked.wait()
                if not go.wait(BOUND):
                    outcome: Outcome = ("error", "never released")
                else:
                    outcome = _outcome(call)
            except Exception as exc:
                outcome = ("error", f"{type(exc).__qualname__}: {exc}")
            with guard:
                outcomes.append(outcome)

        self.round = round_
        callers = [threading.Thread(target=caller) for _ in range(self.setup.threads)]
        try:
            for thread in callers:
                thread.start()
            parked.wait()
            conn.send(("ready", os.getpid()))
            for thread in callers:
                thread.join(BOUND * 2)
        finally:
            self.round = None
        if any(thread.is_alive() for thread in callers):
            outcomes.append(("error", "a caller did not return"))
        conn.send(("ok", outcomes))

    def call(self, fn: str) -> Outcome:
        """Call *fn* once: its outcome."""
        return _outcome(self.calls[fn])

    def start(self, fn: str) -> None:
        """Call *fn* in a thread of its own (see `finish`)."""
        self._background = threading.Thread(
            target=_record, args=(self.calls[fn], self._started)
        )
        self._background.start()

    def finish(self) -> Outcome:
        """Wait for the call `start` began: its outcome."""
        assert self._background is not None, "nothing was started"
        self._background.join(BOUND)
        assert self._started, "the started call did not return"
        return self._started.pop()

    def invalidate_tag(self, tag: str) -> None:
        """Invalidate *tag* with this process's backend."""
        self.backend.invalidate_tag(tag)

    def warm(self, fn: str) -> None:
        """Call *fn* until the near cache holds its key."""
        read = self.backend.local_read
        assert read is not None, "this worker has no near cache"
        key = self.keys[fn]

        def held() -> bool:
            self.calls[fn]()
            return read(key) is not None

        until(f"{fn} in the near cache", held, BOUND)

    def near_size(self) -> int:
        """Return how many entries the near cache holds, now."""
        near = self.backend._near
        assert near is not None, "this worker has no near cache"
        return len(near)

    def near_emptied(self) -> None:
        """Wait until the near cache holds nothing (it heard an invalidation)."""
        until("an empty near cache", lambda: self.near_size() == 0, BOUND)

    def close(self) -> None:
        self.backend.close()
        self.counter.close()


def serve(setup: Setup, conn: Connection, gos: list[Event]) -> None:
    """Answer the parent's commands until "stop"; answers are ("ok"|"error", value).

    Commands (tuples, the name first):

    - ``("stampede", round, fn)``: park `Setup.threads` callers of *fn*, answer
      ``("ready", pid)``, call once ``gos[round]`` is set, answer their outcomes;
    - ``("call", fn)``: call *fn* once; answers its outcome;
    - ``("start", fn)``: call *fn* in a thread of its own; answers None at once;
    - ``("finish",)``: wait for that thread; answers its outcome;
    - ``("invalidate_tag", tag)``: the backend's `invalidate_tag`; answers None;
    - ``("warm", fn)``: call *fn* until the near cache holds its key; answers None;
    - ``("near_size",)``: answers how many entries the near cache holds, at once;
    - ``("near_emptied",)``: wait until the near cache holds nothing; answers None.
    """
    worker = _Worker(setup)
    answers: dict[str, Callable[..., object]] = {
        "call": worker.call,
        "start": worker.start,
        "finish": worker.finish,
        "invalidate_tag": worker.invalidate_tag,
        "warm": worker.warm,
        "near_size": worker.near_size,
        "near_emptied": worker.near_emptied,
    }
    try:
        while (command := conn.recv()) != ("stop",):
            name, *args = command
            try:
                if name == "stampede":
                    round_, fn = args
                    worker.stampede(round_, fn, gos[round_], conn)
                else:
                    conn.send(("ok", answers[name](*args)))
            except Exception as exc:
                conn.send(("error", f"{type(exc).__qualname__}: {exc}"))
    finally:
        worker.close()
        conn.close()
