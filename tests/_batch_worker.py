"""Code run in the worker processes of test_batch.py's cross-process stampede.

A spawned child imports this module by name (the test puts this directory on
``sys.path``, which multiprocessing hands on). Each worker starts its threads, each of
which asks one batch call for a random subset of the same ids; the parent releases
every thread of every worker at once. The batch function counts each id it computes
with HINCRBY on one Redis hash, so the parent sees every computation of every process.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event

import redis

from stampede_guard import RedisBackend, cached_stampede_safe_batch

RELEASE_TIMEOUT = 30.0

# One caller's outcome: (thread, "ok", {id: value}) or (thread, "error", "Type: message").
Outcome = tuple[int, str, object]
# A worker's index and the outcome of each of its threads' calls.
Report = tuple[int, list[Outcome]]


@dataclass(frozen=True, slots=True)
class BatchJob:
    """What one worker process does: *threads* batch calls against the Redis at *url*.

    Each call asks for *per_call* of the ids ``range(ids)``, chosen by `asked`.
    """

    url: str
    prefix: str
    worker: int
    threads: int
    ids: int
    per_call: int
    seed: int


def asked(job: BatchJob, thread: int) -> list[int]:
    """Return the ids thread *thread* of *job*'s worker asks for (the parent's too)."""
    rng = random.Random(f"{job.seed}:{job.worker}:{thread}")
    return rng.sample(range(job.ids), job.per_call)


def value_of(id_: int) -> str:
    """Return the value the batch function computes for *id_*."""
    return f"value-{id_}"


def computed_key(prefix: str) -> str:
    """Return the Redis hash counting computations per id, across all processes."""
    return f"{prefix}:computed"


def stampede(
    job: BatchJob, ready: Queue[int], go: Event, reports: Queue[Report]
) -> None:
    """Start the job's threads, each making one batch call once *go* is set.

    Puts the worker's index on *ready* once every thread is waiting, then one
    `Report` on *reports*.
    """
    backend = RedisBackend.from_url(job.url, prefix=job.prefix)
    counter = redis.Redis.from_url(job.url, socket_timeout=5)
    computed = computed_key(job.prefix)

    @cached_stampede_safe_batch(
        key="item:{}", backend=backend, ttl=60, lock_timeout=20, max_delay=0.2
    )
    def items(ids: Sequence[int]) -> dict[int, str]:
        pipe = counter.pipeline(transaction=False)
        for id_ in ids:
            pipe.hincrby(computed, str(id_), 1)
        pipe.execute()
        # Widens the window in which other callers find these ids locked; what the
        # test proves does not depend on it.
        time.sleep(0.02)
        return {id_: value_of(id_) for id_ in ids}

    outcomes: list[Outcome] = []
    guard = threading.Lock()
    waiting = threading.Barrier(job.threads + 1, timeout=RELEASE_TIMEOUT)

    def call(thread: int) -> None:
        outcome: Outcome
        try:
            waiting.wait()
            if not go.wait(RELEASE_TIMEOUT):
                outcome = (thread, "error", "never released")
            else:
                outcome = (thread, "ok", items(asked(job, thread)))
        except Exception as exc:
            outcome = (thread, "error", f"{type(exc).__name__}: {exc}")
        with guard:
            outcomes.append(outcome)

    workers = [
        threading.Thread(target=call, args=(thread,)) for thread in range(job.threads)
    ]
    for worker in workers:
        worker.start()
    waiting.wait()
    ready.put(job.worker)
    for worker in workers:
        worker.join(RELEASE_TIMEOUT)
    reports.put((job.worker, outcomes))
    backend.close()
    counter.close()
