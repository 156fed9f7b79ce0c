"""Code run in the worker processes of test_processes.py.

A spawned child imports this module by name: the test puts this directory on
``sys.path`` before spawning, and multiprocessing hands the parent's ``sys.path`` on.

A stampede's computation holds until every caller is waiting on it: the other
threads of its process have joined its call, and every process's first caller has
had its get-or-lock answered (each counts its Miss in Redis; a caller that joined
reports its Miss only once served).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event

import redis
import redis.asyncio

from _waiting import until, until_async
from stampede_guard import AsyncRedisBackend, RedisBackend, cached_stampede_safe
from stampede_guard.metrics import Event as MetricsEvent
from stampede_guard.metrics import Miss
from stampede_guard.testing import joiners, wait_for_joiners

RELEASE_TIMEOUT = 30.0

# ("ok", value) or ("error", "ExceptionType: message"), one per call.
Outcome = tuple[str, object]
# A worker's pid and the outcome of each of its threads' calls.
Report = tuple[int, list[Outcome]]


class FirstCallFailsError(RuntimeError):
    """Raised by the first computation of a test run, whichever process makes it."""


@dataclass(frozen=True, slots=True)
class Job:
    """What one worker process does: *threads* calls against the Redis at *url*.

    With *tasks*, the calls are asyncio tasks of one event loop instead of threads.
    """

    url: str
    prefix: str
    threads: int
    fail_first: bool
    tasks: bool = False
    processes: int = 1  # how many workers run this job: each has one caller at the lock


def calls_key(prefix: str) -> str:
    """Return the Redis key counting computations across all processes."""
    return f"{prefix}:calls"


def misses_key(prefix: str) -> str:
    """Return the Redis key counting the Misses of all processes."""
    return f"{prefix}:misses"


def count_misses(counter: redis.Redis, prefix: str) -> Callable[[MetricsEvent], None]:
    """Return a metrics hook counting every Miss in Redis."""

    def hook(event: MetricsEvent, /) -> None:
        if isinstance(event, Miss):
            counter.incr(misses_key(prefix))

    return hook


def every_process_at_the_lock(counter: redis.Redis, job: Job) -> Callable[[], bool]:
    """Return whether every process's first caller has had its get-or-lock answered."""
    return lambda: int(counter.get(misses_key(job.prefix)) or 0) >= job.processes


def stampede(job: Job, ready: Queue[int], go: Event, reports: Queue[Report]) -> None:
    """Start the job's threads, each calling one decorated function once *go* is set.

    Puts this pid on *ready* once every thread is waiting, then one `Report` on
    *reports*. The function counts its runs with INCR on `calls_key`, so the parent
    sees every computation in every process; with ``fail_first`` the first one raises.
    """
    if job.tasks:
        asyncio.run(_stampede_tasks(job, ready, go, reports))
        return
    prefix = job.prefix
    backend = RedisBackend.from_url(job.url, prefix=prefix)
    counter = redis.Redis.from_url(job.url, socket_timeout=5)

    @cached_stampede_safe(
        key="cold",
        backend=backend,
        ttl=60,
        lock_timeout=10,
        max_delay=0.2,
        metrics=count_misses(counter, prefix),
    )
    def compute() -> dict[str, int]:
        n = int(counter.incr(calls_key(prefix)))
        # The work lasts until every other caller waits on it (see the module).
        wait_for_joiners(compute, job.threads - 1)
        until("every process at the lock", every_process_at_the_lock(counter, job))
        if job.fail_first and n == 1:
            msg = f"computation {n} fails"
            raise FirstCallFailsError(msg)
        return {"computation": n}

    outcomes: list[Outcome] = []
    guard = threading.Lock()
    waiting = threading.Barrier(job.threads + 1, timeout=RELEASE_TIMEOUT)

    def call() -> None:
        outcome: Outcome
        try:
            waiting.wait()
            if not go.wait(RELEASE_TIMEOUT):
                outcome = ("error", "never released")
            else:
                outcome = ("ok", compute())
        except Exception as exc:
            outcome = ("error", f"{type(exc).__name__}: {exc}")
        with guard:
            outcomes.append(outcome)

    workers = [threading.Thread(target=call) for _ in range(job.threads)]
    for worker in workers:
        worker.start()
    waiting.wait()
    ready.put(os.getpid())
    for worker in workers:
        worker.join(RELEASE_TIMEOUT)
    reports.put((os.getpid(), outcomes))
    backend.close()
    counter.close()


async def _stampede_tasks(
    job: Job, ready: Queue[int], go: Event, reports: Queue[Report]
) -> None:
    """`stampede` with asyncio tasks on `AsyncRedisBackend`: the same function, async."""
    prefix = job.prefix
    backend = AsyncRedisBackend.from_url(job.url, prefix=prefix)
    counter = redis.asyncio.Redis.from_url(job.url, socket_timeout=5)
    # For the metrics hook and the look at the misses, which are not awaited.
    sync_counter = redis.Redis.from_url(job.url, socket_timeout=5)
    at_the_lock = every_process_at_the_lock(sync_counter, job)

    @cached_stampede_safe(
        key="cold",
        backend=backend,
        ttl=60,
        lock_timeout=10,
        max_delay=0.2,
        metrics=count_misses(sync_counter, prefix),
    )
    async def compute() -> dict[str, int]:
        n = int(await counter.incr(calls_key(prefix)))
        # The work lasts until every other caller waits on it (see the module).
        await until_async(
            "every task joining", lambda: joiners(compute) == job.threads - 1
        )
        await until_async("every process at the lock", at_the_lock)
        if job.fail_first and n == 1:
            msg = f"computation {n} fails"
            raise FirstCallFailsError(msg)
        return {"computation": n}

    release = asyncio.Event()

    async def call() -> Outcome:
        await release.wait()
        try:
            return ("ok", await compute())
        except Exception as exc:
            return ("error", f"{type(exc).__name__}: {exc}")

    calls = [asyncio.create_task(call()) for _ in range(job.threads)]
    await asyncio.sleep(0)  # every task is now waiting on the release
    ready.put(os.getpid())
    if await asyncio.to_thread(go.wait, RELEASE_TIMEOUT):
        release.set()
    else:
        for task in calls:
            task.cancel()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    reports.put(
        (
            os.getpid(),
            [o if isinstance(o, tuple) else ("error", repr(o)) for o in outcomes],
        )
    )
    await backend.aclose()
    await counter.aclose()
    sync_counter.close()


def compute_forever(url: str, prefix: str, started: Event) -> None:
    """Take the lock on "job" and compute until killed (test_faults kills this process)."""
    backend = RedisBackend.from_url(url, prefix=prefix)
    counter = redis.Redis.from_url(url)

    @cached_stampede_safe(key="job", backend=backend, lock_timeout=1, ttl=60)
    def job() -> str:
        counter.incr(f"{prefix}:computations")
        started.set()
        time.sleep(60)  # hung: the test kills this process meanwhile
        return "from-killed-leader"

    job()


def compute_until_told(url: str, prefix: str, started: Event, go: Event) -> None:
    """Take the lock on "doc" and compute "old" until *go*; report what the call got."""
    backend = RedisBackend.from_url(url, prefix=prefix)
    counter = redis.Redis.from_url(url)

    @cached_stampede_safe(key="doc", backend=backend, lock_timeout=30, ttl=60)
    def doc() -> str:
        started.set()
        go.wait(30)
        return "old"

    counter.set(f"{prefix}:child-got", doc())
    backend.close()
    counter.close()
