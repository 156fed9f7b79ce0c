"""A multiprocessing.Pool shares one computation per key through Redis: 3 API calls.

    uv run examples/multiprocessing_pool.py --redis-url redis://127.0.0.1:6379/0
    uv run examples/multiprocessing_pool.py --redis-url ... --context fork -p 8 -n 500
    uv run examples/multiprocessing_pool.py --backend memory   # no Redis: no sharing

The pool's initializer makes each process's backend and decorated function (a pool
process is a new interpreter under ``spawn`` and ``forkserver``, and under ``fork``
a copy that must not share its parent's sockets). Then the pool maps calls over a
few cities, the first group of each city one call per process, so that every process
misses the city at once, against a weather API on a loopback port (0.5 s a request,
counting them). With a `RedisBackend` one process calls the API per city and the
others wait on its lock and are served its value. With a `MemoryBackend` each
process has a store of its own: nothing is shared, and each process that gets a city
calls the API for it (up to one call per process and city). Under ``fork`` a
`MemoryBackend` made before the pool would be copied into each process with whatever
it held, and would diverge from there.

The pool is made before the API's thread starts, because forking a process that runs
threads can deadlock the child (Python 3.12+ warns); so the API's address goes with
each call instead of through the initializer.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import uuid
from collections.abc import Callable, Sequence
from multiprocessing.pool import Pool

import redis
from demo_weather_api import Weather, WeatherAPI, WeatherClient

from stampede_guard import MemoryBackend, RedisBackend, cached_stampede_safe
from stampede_guard.metrics import Event, Miss

CITIES = ("Oslo", "Lima", "Pune", "Kyiv", "Baku")
UPSTREAM_SECONDS = 0.5

# This process's decorated function, made by `init_worker` in each pool process.
_weather: Callable[[str, str], Weather] | None = None


def misses_key(prefix: str) -> str:
    """Return the Redis hash counting, per cache key, the calls that found no value."""
    return f"{prefix}:misses"


def init_worker(redis_url: str | None, prefix: str) -> None:
    """Make this process's backend and decorated function: the pool's initializer.

    Args:
        redis_url: The Redis that coordinates the processes, or None for a
            `MemoryBackend` of this process's own.
        prefix: The cache's key prefix on that Redis.
    """
    global _weather  # noqa: PLW0603 - how a Pool initializer keeps per-process state
    backend: MemoryBackend | RedisBackend
    if redis_url is None:
        backend = MemoryBackend()
        hook = None
    else:
        redis_backend = backend = RedisBackend.from_url(redis_url, prefix=prefix)

        def hook(event: Event, /) -> None:
            # Counted in Redis, across processes: misses per key, against API calls.
            if isinstance(event, Miss):
                redis_backend.client.hincrby(misses_key(prefix), event.key, 1)

    # The key is the city's alone: every process and API address shares it.
    @cached_stampede_safe(
        key="weather:{city}", ttl=300, lock_timeout=30, backend=backend, metrics=hook
    )
    def weather(api_url: str, city: str) -> Weather:
        return WeatherClient(api_url).get(city)

    _weather = weather


def weather_task(api_url: str, city: str) -> Weather:
    """Return the weather in *city*: the function that the pool maps."""
    if _weather is None:
        msg = "weather_task runs in a pool whose initializer is init_worker"
        raise RuntimeError(msg)
    return _weather(api_url, city)


def make_pool(context: str, processes: int, redis_url: str | None, prefix: str) -> Pool:
    """Return a pool of *processes* started by *context*, each with its own backend."""
    ctx = multiprocessing.get_context(context)
    return ctx.Pool(processes, initializer=init_worker, initargs=(redis_url, prefix))


def call_order(cities: Sequence[str], calls: int, processes: int) -> list[str]:
    """Return the city of each call: *processes* of each city together, then the rest."""
    first = [city for city in cities for _ in range(processes)][:calls]
    return first + [cities[n % len(cities)] for n in range(calls - len(first))]


def map_weather(
    pool: Pool, api_url: str, order: Sequence[str], timeout: float = 60.0
) -> list[Weather]:
    """Call `weather_task` in *pool* for each city of *order*; wait *timeout* at most.

    ``chunksize=1`` hands out one call at a time, so the first group of a city runs
    on every process at once instead of in one process's chunk.
    """
    calls = [(api_url, city) for city in order]
    return pool.starmap_async(weather_task, calls, chunksize=1).get(timeout)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the example; with Redis, exit 1 unless each city cost one API call."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", help="coordinate the processes on this Redis")
    parser.add_argument("--backend", choices=("redis", "memory"), default="redis")
    parser.add_argument(
        "--context", choices=("spawn", "fork", "forkserver"), default="spawn"
    )
    parser.add_argument("--processes", "-p", type=int, default=4, choices=range(1, 65))
    parser.add_argument("--calls", "-n", type=int, default=120, choices=range(1, 10001))
    parser.add_argument("--cities", "-c", type=int, default=3, choices=range(1, 6))
    args = parser.parse_args(argv)
    if args.backend == "redis" and args.redis_url is None:
        parser.error("--backend redis needs --redis-url (or use --backend memory)")
    redis_url = args.redis_url if args.backend == "redis" else None
    cities = CITIES[: args.cities]
    order = call_order(cities, args.calls, args.processes)
    prefix = f"sg-pool-example-{uuid.uuid4().hex[:8]}"  # a cache of this run's own
    # In this order: the pool forks before the API's thread exists.
    with (
        make_pool(args.context, args.processes, redis_url, prefix) as pool,
        WeatherAPI(UPSTREAM_SECONDS) as api,
    ):
        answers = map_weather(pool, api.url, order)
        calls = api.calls()
    misses: dict[bytes, bytes] = {}
    if redis_url is not None:
        with redis.Redis.from_url(redis_url) as client:
            misses = client.hgetall(misses_key(prefix))
            stale = list(client.scan_iter(match=f"{prefix}:*"))
            if stale:
                client.delete(*stale)
    print(f"{args.backend} backend, {args.context} pool of {args.processes} processes")
    print(f"{'city':<8}{'calls':>6}{'misses':>8}{'API calls':>11}")
    for city in cities:
        made = sum(answer["city"] == city for answer in answers)
        missed = int(misses.get(f"weather:{city}".encode(), 0))
        print(
            f"{city:<8}{made:>6}{missed if redis_url else '-':>8}{calls.get(city, 0):>11}"
        )
    if redis_url is None:
        print(
            "memory: each process has its own store, so up to one API call per process"
        )
        return 0
    return 0 if all(calls.get(city) == 1 for city in cities) else 1


if __name__ == "__main__":
    sys.exit(main())
