"""RQ workers share one computation per key: 60 jobs, 3 cities, 3 weather API calls.

    uv run examples/rq_worker.py --redis-url redis://127.0.0.1:6379/0
    uv run examples/rq_worker.py --redis-url redis://127.0.0.1:6379/0 -w 4 -j 200 -c 5

It starts a weather API on a loopback port (examples/demo_weather_api.py, 0.5 s per
request, counting them), enqueues the jobs of ``rq_tasks.weather_job`` on a queue of
its own, and runs several ``rq worker --burst`` processes, which call the decorated
function in rq_tasks.py and quit once the queue is empty. It prints, per city, the
jobs, the calls that missed the cache and the API calls that the API counted, and
exits 1 unless every job finished and each city cost one API call.

By hand, the same is (the queue is ``weather``):

    export WEATHER_REDIS_URL=redis://127.0.0.1:6379/0 WEATHER_API_URL=http://...
    rq worker --path examples --url "$WEATHER_REDIS_URL" weather   # in each terminal
    # and, from Python: Queue("weather", connection=...).enqueue(weather_job, "Oslo")

The first jobs of each city are enqueued back to back, one per worker, so that the
workers miss the city together: one calls the API, the others wait on its lock in
Redis and are served its value. Each job runs in a new work-horse process (RQ's
default `Worker` forks one per job), so Redis coordinates everything; with
``-w rq.worker.SimpleWorker`` the jobs of a worker share its process and backend.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import redis
from demo_weather_api import Weather, WeatherAPI
from rq import Queue
from rq.job import Job, JobStatus
from rq_tasks import misses_key, weather_job

EXAMPLES = Path(__file__).resolve().parent
CITIES = ("Oslo", "Lima", "Pune", "Kyiv", "Baku")
UPSTREAM_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class Outcome:
    """One job: its city, its final status, and its value (or its error's text)."""

    city: str
    status: str
    value: Weather | str | None


@dataclass(frozen=True, slots=True)
class Run:
    """What the workers did: each job's outcome, the misses per city, exit codes."""

    outcomes: list[Outcome]
    misses: dict[str, int]
    exit_codes: list[int | None]


def job_order(cities: Sequence[str], jobs: int, workers: int) -> list[str]:
    """Return the city of each job: *workers* of each city back to back, then the rest.

    The first group of each city is a stampede: every worker takes one of its jobs
    and misses the cache at about the same moment.
    """
    first = [city for city in cities for _ in range(workers)][:jobs]
    rest = itertools.islice(itertools.cycle(cities), jobs - len(first))
    return first + list(rest)


def run(
    redis_url: str,
    api_url: str,
    order: Sequence[str],
    *,
    workers: int,
    prefix: str,
    queue_name: str,
    timeout: float = 60.0,
) -> Run:
    """Enqueue a job per city of *order*, run *workers* burst workers, and report.

    The queue's jobs and keys are deleted afterwards; the cache's keys (under
    *prefix*) are left for the caller.
    """
    connection = redis.Redis.from_url(redis_url, socket_timeout=10)
    queue = Queue(queue_name, connection=connection)
    jobs = [queue.enqueue(weather_job, city) for city in order]
    env = os.environ | {
        "WEATHER_REDIS_URL": redis_url,
        "WEATHER_API_URL": api_url,
        "WEATHER_PREFIX": prefix,
    }
    command = [sys.executable, "-m", "rq.cli", "worker", "--burst", "--quiet"]
    command += ["--path", str(EXAMPLES), "--url", redis_url]
    deadline = time.monotonic() + timeout
    procs = [
        subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            [*command, "--name", f"{queue_name}-{n}", queue_name],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for n in range(workers)
    ]
    try:
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break  # reported: its exit code is None
        outcomes = [_outcome(job, city) for job, city in zip(jobs, order, strict=True)]
        counted = connection.hgetall(misses_key(prefix))
        misses = {_city(key): int(n) for key, n in counted.items()}
        return Run(outcomes, misses, [proc.poll() for proc in procs])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        for job in jobs:
            job.delete()
        queue.delete(delete_jobs=True)
        # A dead worker's key would expire within a minute; ours go now, and so do
        # the queue's own bookkeeping keys (RQ 3: rq:queue:<name>:intermediate:...).
        leftovers = [f"rq:worker:{queue_name}-{n}" for n in range(workers)]
        leftovers += connection.scan_iter(match=f"rq:queue:{queue_name}:*")
        connection.delete(*leftovers)
        connection.close()


def _city(cache_key: bytes | str) -> str:
    text = cache_key.decode() if isinstance(cache_key, bytes) else cache_key
    return text.removeprefix("weather:")


def _outcome(job: Job, city: str) -> Outcome:
    status = job.get_status(refresh=True)
    if status == JobStatus.FINISHED:
        value = job.return_value()
        return Outcome(city, status.value, value if isinstance(value, dict) else None)
    result = job.latest_result()
    error = result.exc_string if result is not None else None
    return Outcome(city, str(getattr(status, "value", status)), error)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the example; exit 1 unless every job finished and each city cost one call."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--workers", "-w", type=int, default=3, choices=range(1, 17))
    parser.add_argument("--jobs", "-j", type=int, default=60, choices=range(1, 1001))
    parser.add_argument("--cities", "-c", type=int, default=3, choices=range(1, 6))
    args = parser.parse_args(argv)
    cities = CITIES[: args.cities]
    order = job_order(cities, args.jobs, args.workers)
    tag = uuid.uuid4().hex[:8]  # a queue and a cache of this run's own
    with WeatherAPI(UPSTREAM_SECONDS) as api:
        result = run(
            args.redis_url,
            api.url,
            order,
            workers=args.workers,
            prefix=f"sg-rq-example-{tag}",
            queue_name=f"weather-{tag}",
        )
        calls = api.calls()
    with redis.Redis.from_url(args.redis_url) as client:  # the example's own keys only
        stale = list(client.scan_iter(match=f"sg-rq-example-{tag}:*"))
        if stale:
            client.delete(*stale)
    print(f"{'city':<8}{'jobs':>6}{'finished':>10}{'misses':>8}{'API calls':>11}")
    for city in cities:
        done = [o for o in result.outcomes if o.city == city]
        finished = sum(o.status == JobStatus.FINISHED.value for o in done)
        misses = result.misses.get(city, 0)
        print(
            f"{city:<8}{len(done):>6}{finished:>10}{misses:>8}{calls.get(city, 0):>11}"
        )
    all_done = all(o.status == JobStatus.FINISHED.value for o in result.outcomes)
    return 0 if all_done and all(calls.get(c) == 1 for c in cities) else 1


if __name__ == "__main__":
    sys.exit(main())
