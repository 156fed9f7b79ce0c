"""A module-level decorated function for `stampede(..., using="processes")`.

Spawned children import this module afresh, so it makes its backend on import, from
the environment the test sets before spawning.
"""

from __future__ import annotations

import os

import redis

from _waiting import until
from stampede_guard import RedisBackend, cached_stampede_safe
from stampede_guard.metrics import Event, Miss
from stampede_guard.testing import counted, wait_for_joiners

PROCESSES = 4
CALLERS = 40  # spread evenly: CALLERS // PROCESSES threads in each process

URL = os.environ["STAMPEDE_GUARD_WORKER_URL"]
PREFIX = os.environ["STAMPEDE_GUARD_WORKER_PREFIX"]
backend = RedisBackend.from_url(URL, prefix=PREFIX)
counter = redis.Redis.from_url(URL, socket_timeout=5)
MISSES = f"{PREFIX}:misses"


def count_misses(event: Event, /) -> None:
    """Count every Miss in Redis."""
    # Each process's first caller reports its Miss once its get-or-lock has
    # answered; a caller that joined it reports its own only once served.
    if isinstance(event, Miss):
        counter.incr(MISSES)


@cached_stampede_safe(
    key="report", backend=backend, ttl=60, lock_timeout=10, metrics=count_misses
)
@counted
def cold_report() -> str:
    """Take until every other caller waits on this call: here or at the lock."""
    wait_for_joiners(cold_report, CALLERS // PROCESSES - 1)
    until(
        "every process at the lock",
        lambda: int(counter.get(MISSES) or 0) >= PROCESSES,
    )
    return "the report"
