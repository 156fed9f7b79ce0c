"""RQ workers and multiprocessing pools (the examples) call the upstream once per key.

Each test runs an example's own functions against a `WeatherAPI` on a loopback port
that counts its requests. The API holds a city's answer until every worker or pool
process has missed that city (each counts its Miss in Redis), so the stampede is
real whatever the machine's speed: the first group of each city's calls is queued
one per process, and each process is then either the caller at the lock or one of
its waiters.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import redis

from _waiting import until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CITIES = ("Oslo", "Lima", "Pune")
HOLD_S = 30.0  # longest a city's answer waits for its callers (workers start slowly)
Fault = Callable[[str, int], bool]


@pytest.fixture
def examples(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], ModuleType]:
    """Return an importer of examples/ modules, importable by spawned children too."""
    # Spawned children start with the parent's sys.path, so they find them as well.
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module


@pytest.fixture
def hold(redis_client: redis.Redis, redis_prefix: str) -> Callable[[int], Fault]:
    """Return a maker of API faults that answer a city once *callers* have missed it."""

    def make(callers: int) -> Fault:
        def fault(city: str, call: int) -> bool:
            def missed() -> bool:
                count = redis_client.hget(f"{redis_prefix}:misses", f"weather:{city}")
                return int(count or 0) >= callers

            try:
                until(f"{callers} callers missing {city}", missed, within=HOLD_S)
            except AssertionError:
                return True  # answered 503: the call fails, and the test with it
            return False

        return fault

    return make


def test_rq_workers_share_one_upstream_call_per_key(
    examples: Callable[[str], ModuleType],
    hold: Callable[[int], Fault],
    redis_client: redis.Redis,
    redis_url: str,
    redis_prefix: str,
) -> None:
    """3 rq burst workers run 60 jobs over 3 cities: every job's value, 3 API calls."""
    rq_worker = examples("rq_worker")
    api_module = examples("demo_weather_api")
    workers = 3
    order = rq_worker.job_order(CITIES, 60, workers)
    queue_name = f"{redis_prefix}-weather"
    with api_module.WeatherAPI(0, fault=hold(workers)) as api:
        run = rq_worker.run(
            redis_url,
            api.url,
            order,
            workers=workers,
            prefix=redis_prefix,
            queue_name=queue_name,
            timeout=75,
        )
        calls = api.calls()
    assert run.exit_codes == [0] * workers
    assert [(o.city, o.status) for o in run.outcomes] == [
        (city, "finished") for city in order
    ]
    for city in CITIES:
        values = {json.dumps(o.value) for o in run.outcomes if o.city == city}
        assert len(values) == 1, f"{city}: {values}"
        assert json.loads(values.pop())["city"] == city
    assert calls == dict.fromkeys(CITIES, 1)
    assert run.misses == dict.fromkeys(CITIES, workers), "each worker missed each city"
    assert list(redis_client.scan_iter(match=f"rq:*{queue_name}*")) == []


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_pool_processes_share_one_upstream_call_per_key(
    context: str,
    *,
    examples: Callable[[str], ModuleType],
    hold: Callable[[int], Fault],
    redis_client: redis.Redis,
    redis_url: str,
    redis_prefix: str,
) -> None:
    """A pool of 4 with a RedisBackend each maps 200 calls over 3 cities: 3 API calls."""
    pool_example = examples("multiprocessing_pool")
    api_module = examples("demo_weather_api")
    processes = 4
    order = pool_example.call_order(CITIES, 200, processes)
    # The pool first: it forks before the API's thread exists.
    with (
        pool_example.make_pool(context, processes, redis_url, redis_prefix) as pool,
        api_module.WeatherAPI(0, fault=hold(processes)) as api,
    ):
        answers = pool_example.map_weather(pool, api.url, order, timeout=75)
        calls = api.calls()
    assert [answer["city"] for answer in answers] == order
    for city in CITIES:
        assert len({json.dumps(a) for a in answers if a["city"] == city}) == 1
    assert calls == dict.fromkeys(CITIES, 1)
    counted = redis_client.hgetall(f"{redis_prefix}:misses")
    assert counted == {
        f"weather:{city}".encode(): str(processes).encode() for city in CITIES
    }


def test_pool_processes_with_memory_backends_each_call_the_upstream(
    examples: Callable[[str], ModuleType],
) -> None:
    """With a MemoryBackend per process nothing is shared: each process calls once per city."""
    pool_example = examples("multiprocessing_pool")
    api_module = examples("demo_weather_api")
    processes = 4
    order = pool_example.call_order(CITIES, 60, processes)
    received: list[Callable[[], dict[str, int]]] = []

    def every_process_called(city: str, call: int) -> bool:
        # Answer a city once every process has asked for it: none waited for another.
        try:
            until(
                f"{processes} calls for {city}",
                lambda: received[0]().get(city, 0) >= processes,
                within=HOLD_S,
            )
        except AssertionError:
            return True  # answered 503: the call fails, and the test with it
        return False

    with (
        pool_example.make_pool("fork", processes, None, "unused") as pool,
        api_module.WeatherAPI(0, fault=every_process_called) as api,
    ):
        received.append(api.calls)
        answers = pool_example.map_weather(pool, api.url, order, timeout=75)
        calls = api.calls()
    assert [answer["city"] for answer in answers] == order
    assert calls == dict.fromkeys(CITIES, processes)
