"""RQ jobs that read the weather through one stampede-safe function (see rq_worker.py).

An RQ worker imports this module by the job's dotted name, ``rq_tasks.weather_job``,
so start the workers with ``--path examples`` (or with this directory on
``PYTHONPATH``). The module reads its settings from the environment:

    WEATHER_REDIS_URL   the Redis that coordinates the workers (required)
    WEATHER_API_URL     the weather API the function calls (required)
    WEATHER_PREFIX      the cache's key prefix (default "sg-rq-example")

The backend and the decorated function are made at the first call in a process, not
at import: a module imported by a parent that forks gets no connections it would hand
on. (Were it made earlier, the library would still cope: in a forked child it drops
the parent's kept connections, pub/sub listener and in-process calls, and makes its
own.) RQ's default `Worker` forks a work-horse for every job, so each job runs in a
new process that makes its own backend: the in-process coalescing never helps across
jobs, and Redis does all the coordinating. `rq worker -w rq.worker.SimpleWorker` runs
the jobs in the worker's own process, which keeps its backend from one job to the next.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

from demo_weather_api import Weather, WeatherClient

from stampede_guard import RedisBackend, cached_stampede_safe
from stampede_guard.metrics import Event, Miss

DEFAULT_PREFIX = "sg-rq-example"


def misses_key(prefix: str) -> str:
    """Return the Redis hash counting, per cache key, the calls that found no value."""
    return f"{prefix}:misses"


@functools.cache
def _weather() -> Callable[[str], Weather]:
    """Make this process's backend and decorated function (once per process)."""
    redis_url = os.environ["WEATHER_REDIS_URL"]
    prefix = os.environ.get("WEATHER_PREFIX", DEFAULT_PREFIX)
    backend = RedisBackend.from_url(redis_url, prefix=prefix)
    api = WeatherClient(os.environ["WEATHER_API_URL"])

    def count_misses(event: Event, /) -> None:
        # Counted in Redis, across workers: misses per key, against upstream calls.
        if isinstance(event, Miss):
            backend.client.hincrby(misses_key(prefix), event.key, 1)

    # lock_timeout outlives the slowest API call; waiters wait that long too.
    @cached_stampede_safe(
        key="weather:{city}",
        ttl=300,
        lock_timeout=30,
        backend=backend,
        metrics=count_misses,
    )
    def weather(city: str) -> Weather:
        return api.get(city)

    return weather


def weather_job(city: str) -> Weather:
    """Return the weather in *city*: the RQ job, one upstream call per city in all."""
    return _weather()(city)
